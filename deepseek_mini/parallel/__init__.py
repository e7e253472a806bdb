"""Parallelism applied from outside to a pure model (chapter 06; DeepSeek-V3 §3.2, arXiv 2412.19437).

Written by hand. The model modules never import ``torch.distributed``; this package does:

* ``deepseek_mini.parallel.expert``: expert parallelism, the MoE exchange as an all-to-all
  (``AllToAllDispatcher``, ``shard_experts``) and the traffic of node-limited routing
  (``expert_traffic``);
* ``deepseek_mini.parallel.launch``: ``run_workers``, local processes with a process group and a
  hard timeout, for tests and notebooks.

Names are imported lazily (PEP 562), so ``import deepseek_mini.parallel`` imports nothing heavy.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    **dict.fromkeys(["AllToAll", "AllToAllDispatcher", "ExchangePlan", "shard_experts", "Traffic",
                     "expert_traffic"], "deepseek_mini.parallel.expert"),
    **dict.fromkeys(["run_workers", "free_port"], "deepseek_mini.parallel.launch"),
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'deepseek_mini.parallel' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
