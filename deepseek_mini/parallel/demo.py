"""A worker for notebook 06 (chapter 06): one expert-parallel MoE layer step on spawned gloo processes.

``run_workers`` starts its processes with ``spawn``, which imports the worker function by module
and name: a function defined in a notebook cannot be sent. The notebook therefore runs
``expert_parallel_step`` from here and checks its results against the same layer on one process,
built with ``demo_moe`` and fed with ``demo_batch`` (the same seed gives the same weights and the
same tokens in both places).

    from deepseek_mini.parallel.launch import run_workers
    from deepseek_mini.parallel.demo import expert_parallel_step
    results = run_workers(expert_parallel_step, 4, [5, 3, 7, 1])   # tokens on each rank
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from deepseek_mini.moe import MoE
from deepseek_mini.parallel.expert import shard_experts

__all__ = ["demo_moe", "demo_batch", "expert_parallel_step"]


def demo_moe(n_experts: int = 8, dim: int = 16, inter_dim: int = 8, topk: int = 2, seed: int = 0) -> MoE:
    """A small MoE layer (one shared expert, ``n_experts`` routed ones, top-``topk``), the same for one seed."""
    if n_experts < 1 or topk < 1 or topk > n_experts:
        raise ValueError(f"need 1 <= topk ({topk}) <= n_experts ({n_experts})")
    moe = MoE(dim, moe_inter_dim=inter_dim, n_routed_experts=n_experts, n_shared_experts=1, topk=topk)
    moe.init_weights(0.2, torch.Generator().manual_seed(seed))
    return moe.train()


def demo_batch(tokens: list[int], dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' tokens concatenated (rank 0's first), and the weights of a linear loss ``(y * target).sum()``."""
    if any(n < 0 for n in tokens):
        raise ValueError(f"tokens per rank must be >= 0, got {tokens}")
    generator = torch.Generator().manual_seed(seed + 1)
    n = sum(tokens)
    return torch.randn(n, dim, generator=generator), torch.randn(n, dim, generator=generator)


def expert_parallel_step(rank: int, world_size: int, tokens: list[int], n_experts: int = 8, dim: int = 16,
                         inter_dim: int = 8, topk: int = 2, seed: int = 0) -> dict:
    """Forward and backward of ``demo_moe`` with its experts split over the WORLD group (EP = world_size).

    Rank r takes its ``tokens[r]`` tokens of ``demo_batch``, routes them, and exchanges rows with
    the other ranks through ``AllToAllDispatcher``. Returns the output and input gradient of its
    tokens, the gradients of its expert slices (w1, w2, w3), the global ids of its experts, and
    what its dispatch saw: ``sent`` (rows per global expert, this rank's tokens),
    ``received[s][e]`` (rows from rank s for local expert e) and ``local_counts`` (rows per local
    expert, all sources).
    """
    if len(tokens) != world_size:
        raise ValueError(f"tokens ({tokens}) must give one count per rank ({world_size})")
    moe = shard_experts(demo_moe(n_experts, dim, inter_dim, topk, seed), dist.group.WORLD)
    seen: dict = {}
    dispatcher, dispatch = moe.dispatcher, moe.dispatcher.dispatch

    def recording_dispatch(rows: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, list[int]]:
        out = dispatch(rows, counts)
        seen.update(sent=list(counts), received=dispatcher._plan.received, local_counts=out[1])
        return out

    dispatcher.dispatch = recording_dispatch
    x, target = demo_batch(tokens, dim, seed)
    mine = slice(sum(tokens[:rank]), sum(tokens[:rank + 1]))
    x = x[mine].clone().requires_grad_()
    y = moe(x)
    (y * target[mine]).sum().backward()
    return {"y": y.detach(), "x_grad": x.grad, "experts": list(dispatcher.local_experts(n_experts)),
            **{name: p.grad for name, p in moe.experts.named_parameters()}, **seen}
