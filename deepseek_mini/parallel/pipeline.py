"""Pipeline stages on ``torch.distributed.pipelining``: the model cut into stages, run by a schedule.

Pipeline parallelism (DeepSeek-V3 §3.2.1) splits the layers into S stages held by P ranks; a
global batch is split into M micro-batches that flow through the stages, forward then backward,
in the order a *schedule* gives. Here the model is cut with ``deepseek_mini.model.cut`` (a stage
is the model with the other layers removed; parameter names stay the whole model's) and torch's
own runtime sends the activations and runs the schedule:

=============  ===================================  ==========================================
``schedule``   torch schedule                       placement (P ranks)
=============  ===================================  ==========================================
``1f1b``       ``Schedule1F1B``                     S = P, rank r holds stage r
``zb1p``       ``ScheduleInterleavedZeroBubble``    S = P, rank r holds stage r; the backward
                                                    split into input (B) and weight (W) passes
``dualpipev``  ``ScheduleDualPipeV``                S = 2P in a V: rank r holds stages r and
                                                    2P-1-r, so rank 0 has the embedding and the
                                                    head (§3.2.1, DualPipe's "cut-in-half")
``dualpipe``   (none)                               refused: DualPipe runs two copies of every
                                                    stage in two directions; torch ships only
                                                    the V variant, use ``dualpipev``
=============  ===================================  ==========================================

The loss equals the single-process loss. The last stage computes each micro-batch's mean
cross-entropy; the schedule backpropagates each and divides the gradients by M (``scale_grads``),
so with micro-batches of equal size the gradient is that of the mean over the whole batch. The
training hooks' extra losses (``TrainHook.extra_loss``: DeepSeekMoE's sequence-wise balance loss,
MTP) belong to the stage whose layers produce them: ``StageModule`` computes them inside the
stage's forward and attaches them to its output with ``AddLoss`` (its backward gives the loss
gradient 1, Megatron-LM's "aux loss auto-scaler"), so they need no message of their own. A
sequence-wise loss is a mean over sequences, so the mean over micro-batches equals the batch's.

What is refused under pipeline parallelism, with the reason: MTP when pp > 1 (its modules need
the embedding, which sits on the first stage, and the head on the last); the batch-wise balance
loss when the batch is split (over micro-batches or data-parallel ranks its f_i P_i is not the
whole batch's).

Expert parallelism (§3.2.2): with ep > 1 each stage's MoE layers keep N_r / ep of their routed
experts (``shard_experts`` over the rank's expert-parallel group, E consecutive data-parallel
ranks) and exchange rows with an all-to-all; the EP ranks of a stage run the same schedule, so
their collectives meet in the same order, also inside DualPipeV's split backward.

Data parallelism: each stage is ``fully_shard``-ed (FSDP2, ZeRO-3: parameters, gradients and
optimizer state sharded) over the rank's data-parallel group, all dp ranks of the stage; the
schedule reduces the gradients once after the last micro-batch. The expert slices are left out
of FSDP2 and their gradients are summed over the ranks holding the same experts
(``PipelineRunner.sync_expert_grads``). ``clip_grad_norm`` clips by the norm over every stage,
shard and expert slice. ``save_sharded`` / ``load_sharded`` write and read
``torch.distributed.checkpoint`` shards keyed by the whole model's parameter names, the expert
slices as ``Shard(0)`` pieces of the whole (N_r, ...) stacks, so a run saved at one layout
(pp, dp, ep, schedule) resumes at another.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleDualPipeV,
                                          ScheduleInterleavedZeroBubble)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from deepseek_mini.hooks import TrainHook
from deepseek_mini.model import Transformer, cut
from deepseek_mini.moe import MoE, moe_layers
from deepseek_mini.parallel.distributed import ParallelContext
from deepseek_mini.parallel.expert import AllToAllDispatcher, shard_experts
from deepseek_mini.parallel.overlap_fb import install_overlap

__all__ = ["SCHEDULES", "stages_per_rank", "stage_placement", "split_layers", "default_microbatches", "AddLoss",
           "StageModule", "check_overlap", "PipelineRunner", "sharded_experts", "clip_grad_norm", "save_sharded", "load_sharded"]

SCHEDULES = ("1f1b", "zb1p", "dualpipev", "dualpipe")


def stages_per_rank(schedule: str) -> int:
    """How many stages each rank holds: 2 for DualPipeV's V, else 1."""
    check_schedule(schedule)
    return 2 if schedule == "dualpipev" else 1


def check_schedule(schedule: str) -> None:
    """Raise a one-line ``ValueError`` for a schedule this module cannot run."""
    if schedule == "dualpipe":
        raise ValueError("schedule 'dualpipe' (two directions, each rank holding two copies of its stages) has no "
                         "torch.distributed.pipelining schedule; use 'dualpipev', its V-shaped variant with the "
                         "same bubble and one copy of the weights")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule ({schedule!r}) must be one of {', '.join(repr(s) for s in SCHEDULES[:3])}")


def stage_placement(schedule: str, pp: int) -> list[list[int]]:
    """The stage ids each pipeline rank holds: ``[[0], [1], ...]``, or the V ``[[0, 2P-1], [1, 2P-2], ...]``."""
    if not isinstance(pp, int) or isinstance(pp, bool) or pp < 1:
        raise ValueError(f"pp ({pp!r}) must be a positive integer")
    if stages_per_rank(schedule) == 2:
        return [[r, 2 * pp - 1 - r] for r in range(pp)]
    return [[r] for r in range(pp)]


def split_layers(n_layers: int, n_stages: int) -> list[list[int]]:
    """Contiguous layer ids per stage, as even as possible (the first stages take one more)."""
    if n_stages > n_layers:
        raise ValueError(f"{n_stages} pipeline stages need at least {n_stages} layers, the model has {n_layers}: "
                         "lower --pp (DualPipeV cuts 2 stages per rank)")
    base, extra = divmod(n_layers, n_stages)
    bounds = [0]
    for s in range(n_stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return [list(range(bounds[s], bounds[s + 1])) for s in range(n_stages)]


def default_microbatches(schedule: str, pp: int) -> int:
    """The fewest micro-batches the schedule accepts: the number of stages (DualPipeV: 2P), at least 1."""
    return pp * stages_per_rank(schedule)


class AddLoss(torch.autograd.Function):
    """``AddLoss.apply(out, loss)`` returns a copy of ``out``; in backward ``loss`` receives gradient 1.

    It adds ``loss`` to the objective without sending it anywhere: a pipeline stage attaches its
    own extra losses (MoE balance) to the activations it sends, and the backward of the
    micro-batch's main loss reaches them (Megatron-LM's ``MoEAuxLossAutoScaler``). A copy, not
    ``out`` itself: returned as is it would be a view, which the zero-bubble schedules' split
    backward cannot detach in place."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(loss)
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (loss,) = ctx.saved_tensors
        return grad, torch.ones_like(loss)


class StageModule(nn.Module):
    """What a pipeline stage runs: the stage's ``Transformer`` (``self.model``, whole-model names)
    and the training hooks' extra losses of its own forward pass, attached with ``AddLoss``.

    ``forward(x, y)`` in training mode returns the stage's output (hidden states, or logits on the
    last stage) and adds ``hook.extra_loss(model, (x, y), output, step)`` of every hook; their
    detached values are summed per name in ``extra`` (``reset`` clears them). In eval mode, or
    without ``y``, it is the plain model. ``step`` is the training step the hooks see.
    """

    def __init__(self, model: Transformer, hooks: Sequence[TrainHook] = (), device_type: str = "cpu") -> None:
        super().__init__()
        self.model = model
        self.hooks = list(hooks)
        self.device_type = device_type
        self.step = 0
        self.extra: dict[str, torch.Tensor] = {}

    def reset(self, step: int) -> None:
        self.step, self.extra = step, {}

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16) if self.device_type == "cuda" else contextlib.nullcontext():
            if not self.training or y is None:
                return self.model(x)
            output = self.model(x, return_aux=True)
            losses: dict[str, torch.Tensor] = {}
            for hook in self.hooks:
                for name, value in hook.extra_loss(self.model, (x, y), output, self.step).items():
                    if name in losses:
                        raise ValueError(f"hook {hook.name!r} adds the loss {name!r}, which another hook already adds")
                    losses[name] = value
        out = output[0]
        if losses and out.device.type != "meta":
            for name, value in losses.items():
                self.extra[name] = self.extra.get(name, 0) + value.detach().float()
            out = AddLoss.apply(out, sum(losses.values()))
        return out


def _second_ep_group(ctx: ParallelContext) -> dist.ProcessGroup:
    """A second communicator over this rank's EP ranks. Every rank creates every EP group's copy
    (``new_group`` is collective); the (pp, edp, ep) mesh puts each EP group on ``ep`` consecutive ranks."""
    mine = None
    for start in range(0, ctx.world, ctx.ep):
        group = dist.new_group(list(range(start, start + ctx.ep)))
        if start <= ctx.rank < start + ctx.ep:
            mine = group
    if dist.get_process_group_ranks(ctx.ep_group) != dist.get_process_group_ranks(mine):
        raise RuntimeError("the EP group is not ep consecutive ranks: the mesh layout changed")
    return mine


def _lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in float32, as ``deepseek_mini.train`` computes it."""
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def sharded_experts(models: Sequence[nn.Module]) -> dict[str, nn.Parameter]:
    """The expert slices held by this rank (whole-model name -> parameter): the routed-expert
    weights of every MoE layer that ``shard_experts`` gave an all-to-all dispatcher."""
    found: dict[str, nn.Parameter] = {}
    for model in models:
        for prefix, module in model.named_modules():
            if isinstance(module, MoE) and isinstance(module.dispatcher, AllToAllDispatcher):
                for name, p in module.experts.named_parameters():
                    found[f"{prefix}.experts.{name}"] = p
    return found


def check_overlap(schedule: str) -> None:
    """Refuse ``overlap=True`` where it has nothing to overlap, with what to change.

    The overlapped pair exists only in DualPipeV (its ``OVERLAP_F_B`` actions). It runs with expert
    parallelism on NCCL too: its two threads' all-to-alls go through a ``CollectiveTurnstile``
    (``overlap_fb``) that fixes their order across the two EP communicators, the same on every
    rank. Without it a 2-GPU run (pp 1 x ep 2) hung: NCCL kernels of two communicators enqueued
    in different orders on two GPUs wait for each other forever.
    """
    if schedule != "dualpipev":
        raise ValueError(f"overlap needs schedule 'dualpipev' (its OVERLAP_F_B pairs), got {schedule!r}")


class PipelineRunner:
    """This rank's stages of ``model``, their experts split over its expert-parallel group, the
    rest sharded over its data-parallel group, and the schedule.

    ``model`` is the whole, initialised model (every rank builds it with the same seed, so the
    stages hold exactly the single-process weights; a stage keeps only its layers and, with
    ep > 1, only its share of each MoE layer's experts; the rest is freed). ``hooks`` are the
    run's training hooks. ``step(x, y, step)`` runs one schedule over this rank's share of the
    batch and returns the mean micro-batch loss (on the last stage's rank, else None) and the
    hooks' extra losses of this rank's stages (sums over stages, means over micro-batches).
    After it every gradient is the single-process gradient of the whole batch (``sync_expert_grads``).
    ``overlap`` (DualPipeV only): run each of the schedule's overlapped forward/backward pairs
    concurrently (``overlap_fb.overlap_forward_backward``, §3.2.1), the rank's second stage on its
    own expert-parallel communicator; the results are those of torch's sequential pair.
    """

    def __init__(self, ctx: ParallelContext, model: Transformer, schedule: str, n_microbatches: int,
                 batch_shape: tuple[int, int, int], hooks: Sequence[TrainHook] = (), overlap: bool = False) -> None:
        check_schedule(schedule)
        if overlap:
            check_overlap(schedule)
        self.ctx, self.schedule_name, self.n_microbatches = ctx, schedule, n_microbatches
        placement = stage_placement(schedule, ctx.pp)
        self.n_stages = ctx.pp * stages_per_rank(schedule)
        if n_microbatches < self.n_stages and ctx.pp > 1:
            raise ValueError(f"n_microbatches ({n_microbatches}) must be >= the number of stages ({self.n_stages}) "
                             f"for schedule {schedule!r} with pp {ctx.pp}")
        layers = split_layers(len(model.layers), self.n_stages)
        self.stage_ids = placement[ctx.pp_rank]
        self.modules: list[StageModule] = []
        stages = []
        self.expert_params: list[nn.Parameter] = []
        # With overlap the rank's two stages run at the same time in two threads (overlap_fb): the
        # second stage gets its own EP communicator, so the two threads' all-to-alls never share one.
        ep_groups = [ctx.ep_group, _second_ep_group(ctx) if overlap and ctx.ep > 1 else ctx.ep_group]
        for slot, sid in enumerate(self.stage_ids):
            part = cut(model, layers[sid], embed=sid == 0, head=sid == self.n_stages - 1).to(ctx.device)
            if ctx.ep > 1 and moe_layers(part):
                shard_experts(part, ep_groups[slot])
            experts = list(sharded_experts([part]).values())
            self.expert_params += experts
            module = StageModule(part, hooks, ctx.device.type)
            # One FSDP2 unit per stage. Not one per block: FSDP2 rebuilds a block's keyword inputs to hook
            # the tensors in them, so the ``routing`` list the model hands each MoE block would be a copy
            # from the second MoE block on, and its balance loss would be lost. The expert slices are
            # not FSDP2's: they differ between the EP ranks (see ``sync_expert_grads``).
            fully_shard(module, mesh=ctx.dp_mesh, ignored_params=set(experts) or None)
            self.modules.append(module)
            stages.append(PipelineStage(module, sid, self.n_stages, ctx.device, group=ctx.pp_group))
        self.is_last = self.n_stages - 1 in self.stage_ids
        self.losses: list[torch.Tensor] = []
        if schedule == "1f1b":
            self.schedule = Schedule1F1B(stages[0], n_microbatches, loss_fn=_lm_loss)
        elif schedule == "zb1p":
            self.schedule = ScheduleInterleavedZeroBubble(stages, n_microbatches, loss_fn=_lm_loss)
        else:
            self.schedule = ScheduleDualPipeV(stages, n_microbatches, loss_fn=_lm_loss)
            if overlap:
                install_overlap(self.schedule)
        self._warm_up(*batch_shape)

    def _warm_up(self, batch: int, length: int, extra_targets: int) -> None:
        """One step on a dummy batch of the run's shape, then every trace of it undone.

        torch's stages learn the shapes they send from a first forward and backward on the first
        micro-batch, and the stages after the first run it on uninitialised inputs. That pass
        would count tokens in the MoE layers (moving the bias) and add to the extra losses, so it
        happens here, and the counts, the gradients and the recorded losses are cleared after it.
        """
        tokens = torch.zeros(batch, length + extra_targets, dtype=torch.long, device=self.ctx.device)
        self.step(tokens[:, :length], tokens, 0)
        for module in self.modules:
            module.reset(0)
            module.zero_grad(set_to_none=True)
            for name, buffer in module.named_buffers():
                if name.endswith("tokens_per_expert"):
                    buffer.zero_()

    @property
    def models(self) -> nn.ModuleList:
        """This rank's stage ``Transformer``s, in one container (hooks and the optimizer take it as the model)."""
        return nn.ModuleList(module.model for module in self.modules)

    def train(self, mode: bool = True) -> None:
        for module in self.modules:
            module.train(mode)

    def step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Forward and backward of this rank's batch share (x (b, T) tokens, y (b, T + D) targets)."""
        for module in self.modules:
            module.reset(step)
        losses: list[torch.Tensor] = []
        target = y[:, :x.shape[1]]
        args = (x,) if 0 in self.stage_ids else ()
        self.schedule.step(*args, target=target if self.is_last else None, losses=losses, y=y)
        extra: dict[str, torch.Tensor] = {}
        for module in self.modules:
            for name, value in module.extra.items():
                extra[name] = extra.get(name, 0) + value / self.n_microbatches
        self.sync_expert_grads()
        loss = torch.stack(losses).mean().detach() if self.is_last else None
        return loss, extra

    @torch.no_grad()
    def sync_expert_grads(self) -> None:
        """Make each expert slice's gradient the whole batch's: summed over the ranks holding the
        same experts (the expert-data-parallel group, dp / ep ranks), divided by dp.

        Why: the loss of rank r is the mean over its share, L_r, and the whole batch's loss is
        L = (1/dp) sum_r L_r. A replicated parameter's gradient on rank r is dL_r/dθ (its tokens
        never leave it), so FSDP2's average over the dp ranks gives dL/dθ. An expert slice's
        gradient on rank r already holds the rows of every rank of its EP group (the backward
        all-to-all brings them), so it must be *summed* over the edp replicas of the slice and
        divided by dp, not averaged over edp (that would be ep times too large).

        Why a manual all-reduce and not FSDP2 over the edp group: the slices stay plain tensors,
        so the all-to-all's experts read them as they are, a checkpoint can name each slice by
        its place in the whole (N_r, ...) stack (``Shard(0)`` over the EP group, which DCP
        reshards to any layout), and the clipping norm counts each slice once. The cost is
        that expert weights and their AdamW state are replicated over the edp ranks (not
        ZeRO-sharded); DeepSeek-V3 spreads them over 64 EP ranks instead (§3.2).
        """
        if not self.expert_params:
            return
        for p in self.expert_params:
            if p.grad is None:            # every replica joins the all-reduce, also one whose experts got no row
                p.grad = torch.zeros_like(p)
            if self.ctx.edp > 1:
                dist.all_reduce(p.grad, group=self.ctx.expert_dp_group)
            p.grad.div_(self.ctx.dp)

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Mean next-token loss of (x, y) through the stages, forward only, returned on the last
        stage's rank (None elsewhere). Evaluation needs no schedule: the stages run in order and
        each sends its hidden states (B, T, d) to the rank of the next (not every torch schedule
        has a forward-only mode: DualPipeV's ``eval`` fails)."""
        owner = {sid: rank for rank, ids in enumerate(stage_placement(self.schedule_name, self.ctx.pp)) for sid in ids}
        me, group = self.ctx.pp_rank, self.ctx.pp_group
        modules = dict(zip(self.stage_ids, self.modules))
        h = x
        self.train(False)
        try:
            for sid in range(self.n_stages):
                if owner[sid] != me:
                    continue
                if sid > 0 and owner[sid - 1] != me:
                    h = torch.empty(*x.shape, self.modules[0].model.config.hidden_size, device=self.ctx.device)
                    dist.recv(h, group_src=owner[sid - 1], group=group)
                h = modules[sid](h)
                if sid < self.n_stages - 1 and owner[sid + 1] != me:
                    dist.send(h.float().contiguous(), group_dst=owner[sid + 1], group=group)
        finally:
            self.train(True)
        return _lm_loss(h, y) if self.is_last else None


def clip_grad_norm(parameters: Sequence[nn.Parameter], max_norm: float, ctx: ParallelContext,
                   expert_parameters: Sequence[nn.Parameter] = ()) -> torch.Tensor:
    """Clip by the global gradient norm, as one process would: FSDP2's DTensor shards reduce over
    dp, the expert slices (``expert_parameters``, plain tensors, part of ``parameters``) add their
    squares over the EP group (each slice once: the edp replicas hold equal gradients), and the
    stages' squares are summed over the pipeline group."""
    experts = {id(p) for p in expert_parameters}
    replicated = [p for p in parameters if id(p) not in experts]
    total = torch.nn.utils.get_total_norm([p.grad for p in replicated if p.grad is not None], 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    total = total.double() ** 2
    if expert_parameters:
        local = torch.nn.utils.get_total_norm([p.grad for p in expert_parameters if p.grad is not None], 2.0)
        squares = local.double().to(total.device) ** 2
        dist.all_reduce(squares, group=ctx.ep_group)
        total = total + squares
    if ctx.pp > 1:
        dist.all_reduce(total, group=ctx.pp_group)
    total = total.sqrt().float()
    torch.nn.utils.clip_grads_with_norm_(replicated, max_norm, total)
    if expert_parameters:
        torch.nn.utils.clip_grads_with_norm_(list(expert_parameters), max_norm, total)
    return total


def _as_global(tensor: torch.Tensor, ep_mesh: DeviceMesh) -> DTensor:
    """This rank's expert slice as the ``Shard(0)`` piece of the whole (N_r, ...) stack over the EP group."""
    return DTensor.from_local(tensor, ep_mesh, [Shard(0)], run_check=False)


def _state(models: nn.ModuleList, optimizer: torch.optim.Optimizer, template: bool,
           ep_mesh: DeviceMesh | None) -> dict[str, Any]:
    """What DCP saves or loads into: the stages' state dicts and AdamW's per-parameter state, keyed
    by whole-model names (layout independent), the expert slices as global ``Shard(0)`` pieces.
    ``template``: the optimizer state as zeros shaped like each parameter (a fresh optimizer has
    none yet) to load into."""
    experts = sharded_experts(models)
    if experts and ep_mesh is None:
        raise ValueError("this rank holds expert slices (expert parallelism): pass the expert-parallel mesh")
    glob = (lambda name, t: _as_global(t, ep_mesh) if name in experts else t)
    model_state = {k: glob(k, v) for model in models for k, v in model.state_dict().items()}
    optimizer_state: dict[str, Any] = {}
    for model in models:
        for name, p in model.named_parameters():
            if template:
                optimizer_state[name] = {"step": torch.zeros((), dtype=torch.float32),
                                         "exp_avg": glob(name, torch.zeros_like(p)),
                                         "exp_avg_sq": glob(name, torch.zeros_like(p))}
            elif p in optimizer.state:
                optimizer_state[name] = {k: glob(name, v) if k != "step" else v
                                         for k, v in optimizer.state[p].items()}
    return {"model": model_state, "optimizer": optimizer_state}


def save_sharded(path: str | Path, models: nn.ModuleList, optimizer: torch.optim.Optimizer,
                 ep_mesh: DeviceMesh | None = None) -> None:
    """Write this rank's parameters, persistent buffers and optimizer state into the shards at ``path``
    (every rank calls it). Keys are whole-model names and the expert slices are pieces of the whole
    stacks (``ep_mesh``: the EP group's mesh, needed with expert parallelism), so any layout can load
    them (``load_sharded``)."""
    dcp.save(_state(models, optimizer, False, ep_mesh), checkpoint_id=str(path))


def load_sharded(path: str | Path, models: nn.ModuleList, optimizer: torch.optim.Optimizer,
                 ep_mesh: DeviceMesh | None = None) -> None:
    """Read the shards at ``path`` into this rank's stages and optimizer, whatever layout wrote them."""
    state = _state(models, optimizer, True, ep_mesh)
    dcp.load(state, checkpoint_id=str(path))
    experts = sharded_experts(models)
    local = (lambda name, t: t.to_local() if name in experts and isinstance(t, DTensor) else t)
    for model in models:
        model.load_state_dict({k: local(k, state["model"][k]) for k in model.state_dict()})
        for name, p in model.named_parameters():
            optimizer.state[p] = {k: local(name, v) for k, v in state["optimizer"][name].items()}
