"""Expert parallelism: the MoE exchange as an all-to-all (DeepSeek-V3 §3.2.2, §2.1.2; chapter 06).

With expert parallelism (EP) the N_r routed experts of a layer are split over the P ranks of an
EP group: rank r holds experts [r N_r/P, (r+1) N_r/P) (DeepSeek-V3 trains with EP64: a layer's
256 experts on 64 GPUs of 8 nodes, §3.2, §4.2). Everything else in the layer (the gate with its
bias b_i, the shared expert) is replicated, and every rank routes *its own* tokens. The MoE
layer's exchange seam (``MoE.dispatcher``, see ``deepseek_mini.moe.moe_staged``) then becomes
two all-to-alls:

* **dispatch**: each (token, expert) row goes to the rank holding the expert. The ranks first
  swap how many rows they will send to each of the other's experts (a small all-to-all of
  counts), because a receiver must size its buffer and its experts need per-expert counts; then
  the rows move (``all_to_all_single`` with uneven split sizes); then the receiver reorders
  them from (source rank, local expert) to (local expert, source rank), so each local expert's
  rows are contiguous for the grouped GEMM.
* **combine**: the inverse. Outputs go back in the order they came, so the token's rank can
  weight them by their gates and sum them into the token (``moe_combine``) as if nothing had
  moved. Routing, gating and the load count never leave the token's rank.

Autograd flows through both: the backward of an all-to-all is the all-to-all with the split
sizes swapped (``AllToAll``), so gradients of the rows travel back to the tokens' ranks and
each rank accumulates the full gradient of its own experts.

§3.2.2 sends this traffic over InfiniBand to the GPU with the same in-node index on each target
node, then over NVLink to the GPU holding the expert, and caps every token at M = 4 nodes
(node-limited routing, §2.1.2) so that the slower IB links carry at most M copies of it.
``expert_traffic`` counts what each rank sends and how many nodes each token reaches;
``group_limited_topk`` with one group per node (``n_group`` = nodes, ``topk_group`` = M) is
node-limited routing. The cap pays off only with that per-node sending: counted per (token,
expert) row, as this module's dispatcher sends, about as many rows cross nodes with the cap as
without it. On a real cluster DeepEP (``book/facts.md``) does the exchange in fused
GPU kernels that send each token once per destination rank with its top-k indices, not once per
(token, expert) pair as here, and forward IB traffic over NVLink inside the node.

The bias update under EP (§2.1.2): the gate is replicated, but each rank routes different
tokens, so the load c_i that moves b_i must be summed over **every rank that routes a different
batch through this layer's gate**: the data-parallel x expert-parallel ranks holding the layer
(one pipeline stage's ranks), never WORLD (under pipeline parallelism other stages hold other
layers). ``hooks.MoEBalancing(process_group=that group)`` does the sum; every rank then applies
the same update and the replicas stay equal.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from deepseek_mini.moe import GroupedExperts, moe_layers

__all__ = ["AllToAll", "AllToAllDispatcher", "ExchangePlan", "shard_experts", "Traffic", "expert_traffic"]


class AllToAll(torch.autograd.Function):
    """``dist.all_to_all_single`` of rows, differentiable: the backward is the reverse all-to-all.

    ``recv_splits[s]`` rows arrive from rank s, ``send_splits[d]`` rows go to rank d. Every rank of
    ``group`` must call it (and, in backward, its reverse) in the same order.
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, recv_splits: list[int], send_splits: list[int],
                group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.recv_splits, ctx.send_splits, ctx.group = recv_splits, send_splits, group
        out = rows.new_empty((sum(recv_splits), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        grad_rows = grad.new_empty((sum(ctx.send_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_rows, grad.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return grad_rows, None, None, None


class ExchangePlan(NamedTuple):
    """What ``dispatch`` learned and ``combine`` needs to undo it.

    ``received[s][e]``: rows rank s sent to local expert e; ``send_splits`` / ``recv_splits``: rows
    per destination / source rank; ``order``: the received row (in (source, expert) order) at
    each position of the (expert, source) order the experts see.
    """

    received: list[list[int]]
    send_splits: list[int]
    recv_splits: list[int]
    order: torch.Tensor


class AllToAllDispatcher:
    """The MoE exchange over an expert-parallel group: rows to the experts' ranks and back (§3.2.2).

    ``group`` is the EP process group (None: WORLD); ``n_experts`` is the layer's N_r (None: the
    length of the counts dispatched, which must then cover every expert). With P ranks rank r holds
    experts ``local_experts(N_r)`` = [r N_r/P, (r+1) N_r/P). ``dispatch(rows, counts)`` takes this
    rank's rows sorted by expert with ``counts[e]`` rows for global expert e (``moe_permute``) and
    returns the rows of this rank's experts from every rank, each local expert's rows contiguous,
    with their N_r/P counts. ``combine(out, counts)`` returns the experts' outputs for the rows
    this rank dispatched, in their original order. One dispatch is followed by its combine before
    the next dispatch (``moe_staged`` does exactly that); the plan between them is kept here.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, n_experts: int | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("AllToAllDispatcher needs torch.distributed initialised: "
                               "call dist.init_process_group first")
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.n_experts = n_experts
        if n_experts is not None:
            self.local_experts(n_experts)            # checks N_r % P now, not at the first forward
        self._plan: ExchangePlan | None = None

    def local_experts(self, n_experts: int) -> range:
        """The global ids of the experts this rank holds."""
        if n_experts % self.size:
            raise ValueError(f"n_routed_experts ({n_experts}) must be divisible by the expert-parallel "
                             f"size ({self.size})")
        per_rank = n_experts // self.size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)

    def dispatch(self, rows: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, list[int]]:
        """rows (n, d) sorted by global expert -> (rows of the local experts (m, d), their counts)."""
        n_experts = len(counts) if self.n_experts is None else self.n_experts
        if len(counts) > n_experts:
            raise ValueError(f"got counts for {len(counts)} experts, the layer has {n_experts}")
        # moe_staged counts with bincount(minlength=len(experts)), the *local* number once sharded:
        # the trailing idle experts are missing from its counts. They are zeros.
        counts = list(counts) + [0] * (n_experts - len(counts))
        per_rank = len(self.local_experts(n_experts))
        if sum(counts) != rows.shape[0]:
            raise ValueError(f"counts sum to {sum(counts)}, but {rows.shape[0]} rows were given")
        # 1. counts first: rank s learns how many rows each rank sends to each of its experts.
        sent = torch.tensor(counts, dtype=torch.int64, device=rows.device)        # (P * E_local,)
        received = torch.empty_like(sent)
        dist.all_to_all_single(received, sent, group=self.group)                   # E_local entries per rank
        # On the host: the next all-to-all takes its split sizes as integers (a sync on a GPU).
        received = received.view(self.size, per_rank).tolist()                     # [source][local expert]
        send_splits = [sum(counts[d * per_rank:(d + 1) * per_rank]) for d in range(self.size)]
        recv_splits = [sum(row) for row in received]
        # 2. the rows, with uneven split sizes.
        rows = AllToAll.apply(rows, recv_splits, send_splits, self.group)
        # 3. (source, expert) blocks -> (expert, source): each local expert's rows contiguous.
        blocks = torch.arange(rows.shape[0], device=rows.device).split([n for row in received for n in row])
        order = torch.cat([blocks[s * per_rank + e] for e in range(per_rank) for s in range(self.size)])
        self._plan = ExchangePlan(received, send_splits, recv_splits, order)
        local_counts = [sum(row[e] for row in received) for e in range(per_rank)]
        return rows.index_select(0, order), local_counts   # index_select: deterministic backward

    def combine(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The experts' outputs (m, d), in dispatch's output order -> (n, d) in the order dispatched."""
        if self._plan is None:
            raise RuntimeError("combine called without a dispatch before it")
        plan, self._plan = self._plan, None
        if rows.shape[0] != plan.order.numel():
            raise ValueError(f"combine got {rows.shape[0]} rows, dispatch delivered {plan.order.numel()}")
        inverse = torch.empty_like(plan.order)
        inverse[plan.order] = torch.arange(plan.order.numel(), device=plan.order.device)
        rows = AllToAll.apply(rows.index_select(0, inverse), plan.send_splits, plan.recv_splits, self.group)
        if rows.shape[0] != sum(counts):
            raise ValueError(f"combine returned {rows.shape[0]} rows for counts summing to {sum(counts)}")
        return rows


def shard_experts(module: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Keep only this rank's routed experts in every MoE layer of ``module`` and plug in the all-to-all.

    ``module`` is an ``MoE`` layer or a model holding some. Each layer's ``GroupedExperts`` is
    replaced by one holding the slices [r N_r/P, (r+1) N_r/P) of w1, w2, w3 (copies: the full
    stacks are freed), and its ``dispatcher`` becomes an ``AllToAllDispatcher(group)``. The
    gate (centroids and bias b_i), the shared experts and the load count stay whole and
    replicated. Build the model with the same seed on every rank, then shard: the ranks together
    hold exactly the single-process model. Returns ``module``.
    """
    layers = moe_layers(module)
    if not layers:
        raise ValueError(f"shard_experts found no MoE layer in {type(module).__name__}")
    for layer in layers:
        if layer.dispatch != "sorted":
            raise ValueError(f"expert parallelism needs dispatch='sorted', the layer has {layer.dispatch!r}")
        if len(layer.experts) != layer.n_routed_experts:
            raise ValueError(f"the layer holds {len(layer.experts)} of its {layer.n_routed_experts} experts: "
                             "already sharded")
        dispatcher = AllToAllDispatcher(group, n_experts=layer.n_routed_experts)
        mine = dispatcher.local_experts(layer.n_routed_experts)
        whole = layer.experts
        inter_dim, dim = whole.w1.shape[1:]
        with torch.device("meta"):                   # no allocation: the slices replace the weights
            local = GroupedExperts(len(mine), dim, inter_dim)
        for name in ("w1", "w2", "w3"):
            weight = getattr(whole, name)
            setattr(local, name, nn.Parameter(weight[mine.start:mine.stop].detach().clone(),
                                              requires_grad=weight.requires_grad))
        layer.experts, layer.dispatcher = local, dispatcher
    return module


class Traffic(NamedTuple):
    """Where one MoE layer's dispatch sends its tokens (``expert_traffic``), counted two ways.

    ``rows[s, d]``: (token, expert) rows rank s sends to rank d, one per chosen expert, as
    ``AllToAllDispatcher`` sends them (the diagonal stays on the rank). ``node_copies[s, n]``:
    tokens rank s sends to node n when each token goes to a node once and is forwarded inside
    it over NVLink (§3.2.2's scheme; what crosses InfiniBand). ``nodes_per_token``: distinct
    nodes holding a token's experts; ``remote_nodes``: those other than the token's own node.
    """

    rows: torch.Tensor
    node_copies: torch.Tensor
    nodes_per_token: torch.Tensor
    remote_nodes: torch.Tensor
    ranks_per_node: int

    def cross_node_rows(self) -> int:
        """Rows whose source and destination ranks are on different nodes (one per (token, expert))."""
        node = torch.arange(self.rows.shape[0], device=self.rows.device) // self.ranks_per_node
        return int(self.rows[node[:, None] != node[None, :]].sum())

    def cross_node_copies(self) -> int:
        """Token copies that cross nodes when each token is sent once per node: what M caps."""
        return int(self.remote_nodes.sum())


def expert_traffic(indices: torch.Tensor, token_rank: torch.Tensor, n_experts: int, ep_size: int,
                   ranks_per_node: int = 1) -> Traffic:
    """Count what each rank sends for one routing result: the P x P row matrix, copies per node.

    ``indices`` (T, K): the experts chosen for T tokens; ``token_rank`` (T,): the rank each token
    lives on. Experts are placed as ``AllToAllDispatcher`` places them (rank r holds
    [r N_r/P, (r+1) N_r/P)) and ranks fill nodes in order (rank r on node r // ranks_per_node),
    so the groups of ``group_limited_topk`` are nodes when ``n_group`` = P / ranks_per_node.
    Node-limited routing caps ``nodes_per_token`` at M and so the copies that cross nodes; it
    does not lower the per-(token, expert) rows that cross nodes on average, which is why
    §3.2.2 sends a token once per node and forwards it over NVLink.
    """
    if indices.dim() != 2 or token_rank.shape != indices.shape[:1]:
        raise ValueError(f"indices must be (T, K) and token_rank (T,), got {tuple(indices.shape)} "
                         f"and {tuple(token_rank.shape)}")
    if n_experts % ep_size or ep_size % ranks_per_node:
        raise ValueError(f"n_experts ({n_experts}) must be divisible by ep_size ({ep_size}), and ep_size by "
                         f"ranks_per_node ({ranks_per_node})")
    if indices.numel() and not (0 <= int(indices.min()) and int(indices.max()) < n_experts):
        raise ValueError(f"expert indices must be in [0, {n_experts})")
    if token_rank.numel() and not (0 <= int(token_rank.min()) and int(token_rank.max()) < ep_size):
        raise ValueError(f"token ranks must be in [0, {ep_size})")
    n_nodes, token_rank = ep_size // ranks_per_node, token_rank.long()
    dest = indices.long() // (n_experts // ep_size)                               # (T, K) destination rank
    pairs = token_rank[:, None] * ep_size + dest
    rows = torch.bincount(pairs.flatten(), minlength=ep_size * ep_size).view(ep_size, ep_size)
    reached = torch.zeros(indices.shape[0], n_nodes, dtype=torch.long, device=indices.device)
    reached.scatter_(1, dest // ranks_per_node, 1)                              # (T, nodes): 1 if reached
    node_copies = torch.zeros(ep_size, n_nodes, dtype=torch.long, device=indices.device)
    node_copies.index_add_(0, token_rank, reached)
    own = reached.gather(1, (token_rank // ranks_per_node)[:, None]).squeeze(1)
    nodes = reached.sum(dim=1)
    return Traffic(rows, node_copies, nodes, nodes - own, ranks_per_node)
