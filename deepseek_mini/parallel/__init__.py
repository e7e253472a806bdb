"""Parallelism for deepseek-mini (chapter 06; DeepSeek-V3 §3.2, arXiv 2412.19437).

Written by hand:

* ``deepseek_mini.parallel.schedules``: per-rank action lists for the 1F1B, ZB1P, DualPipe and
  DualPipeV pipeline schedules, a timeline simulator that measures their bubble and memory against
  the paper's Table 2, and Figure-5-style plots;
* ``deepseek_mini.parallel.overlap``: a two-stream model of one overlapped forward/backward chunk pair
  (attention, dispatch, MLP, combine, PP send; Figure 4) that gives the simulator its F&B.

Names are imported lazily (PEP 562), so ``import deepseek_mini.parallel`` imports neither
matplotlib nor ``torch.distributed``.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    **dict.fromkeys(["Action", "Costs", "Timeline", "SCHEDULES", "stage_rank", "n_stages", "schedule_1f1b",
                     "schedule_zb1p", "schedule_dualpipe", "schedule_dualpipev", "make_schedule", "simulate",
                     "bubble_formula", "table2", "plot_timeline"], "deepseek_mini.parallel.schedules"),
    **dict.fromkeys(["ChunkCosts", "PairTimeline", "overlap_pair", "plot_overlap"], "deepseek_mini.parallel.overlap"),
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'deepseek_mini.parallel' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
