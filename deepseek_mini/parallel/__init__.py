"""Parallel training on real processes (chapter 06; DeepSeek-V3 §3.2, arXiv 2412.19437).

Written by hand; the model stays pure (no ``torch.distributed`` in ``model.py`` or ``moe.py``) and
this package applies parallelism to it from outside:

* ``deepseek_mini.parallel.distributed``: process groups from ``torchrun``'s environment, the
  (pp, dp) device mesh, gloo on CPU and NCCL on GPUs, a launcher with a timeout for tests;
* ``deepseek_mini.parallel.pipeline``: pipeline stages cut from the model (``model.cut``), their
  placement per schedule (1F1B, ZB1P, DualPipeV), the loss, the global gradient norm, and the
  sharded checkpoints (``torch.distributed.checkpoint``).

Names are imported lazily (PEP 562): ``import deepseek_mini.parallel`` initialises nothing.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    **dict.fromkeys(["ParallelContext", "init_distributed", "spawn", "run_torchrun", "free_port", "pick_backend"],
                    "deepseek_mini.parallel.distributed"),
    **dict.fromkeys(["SCHEDULES", "stage_placement", "split_layers", "default_microbatches", "StageModule",
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
