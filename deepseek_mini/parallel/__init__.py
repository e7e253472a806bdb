"""Parallelism for deepseek-mini (chapter 06; DeepSeek-V3 §3.2, arXiv 2412.19437).

The model modules never import ``torch.distributed``; this package applies parallelism to the pure
model from outside.

* ``deepseek_mini.parallel.schedules`` (notebook 06): per-rank action lists for the 1F1B, ZB1P,
  DualPipe and DualPipeV pipeline schedules, a timeline simulator that measures their bubble and
  memory against the paper's Table 2, and Figure-5-style plots;
* ``deepseek_mini.parallel.overlap`` (notebook 06): a two-stream model of one overlapped
  forward/backward chunk pair (attention, dispatch, MLP, combine, PP send; Figure 4);
* ``deepseek_mini.parallel.expert`` (notebook 06): expert parallelism, the MoE exchange as an
  all-to-all (``AllToAllDispatcher``, ``shard_experts``) and the traffic of node-limited routing;
* ``deepseek_mini.parallel.demo``: notebook 06's expert-parallel worker for ``run_workers``;
* ``deepseek_mini.parallel.distributed``: process groups from ``torchrun``'s environment, the
  (pp, edp, ep) device mesh, gloo on CPU and NCCL on GPUs;
* ``deepseek_mini.parallel.launch``: spawned workers and ``torchrun`` subprocesses with a hard
  timeout (tests, notebooks);
* ``deepseek_mini.parallel.pipeline``: pipeline stages cut from the model (``model.cut``) on
  ``torch.distributed.pipelining``, expert parallelism inside each stage, FSDP2 data parallelism,
  the global gradient norm and sharded checkpoints (``torch.distributed.checkpoint``).

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
    **dict.fromkeys(["AllToAll", "AllToAllDispatcher", "ExchangePlan", "shard_experts", "Traffic",
                     "expert_traffic"], "deepseek_mini.parallel.expert"),
    **dict.fromkeys(["run_workers", "run_torchrun", "free_port"], "deepseek_mini.parallel.launch"),
    **dict.fromkeys(["ParallelContext", "init_distributed", "mesh_shape", "pick_backend"],
                    "deepseek_mini.parallel.distributed"),
    **dict.fromkeys(["stage_placement", "split_layers", "default_microbatches", "StageModule",
                     "PipelineRunner", "clip_grad_norm", "save_sharded", "load_sharded"],
                    "deepseek_mini.parallel.pipeline"),
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'deepseek_mini.parallel' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
