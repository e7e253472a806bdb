"""A real overlapped forward/backward chunk pair for DualPipeV (DeepSeek-V3 §3.2.1, Figure 4).

DualPipeV's steady state runs, on each rank, the forward of one micro-batch through one of its two
stages *paired with* the backward of another micro-batch through its other stage: torch's
``ScheduleDualPipeV`` emits these pairs as ``OVERLAP_F_B`` actions whose two ``sub_actions`` are a
``FORWARD`` and a ``FULL_BACKWARD`` on different stages. torch's default runs them one after the
other, so the MoE all-to-alls of each chunk leave the rank idle. §3.2.1 instead overlaps them: while
one chunk waits on its dispatch or combine, the other computes.

``overlap_forward_backward`` is a custom ``OVERLAP_F_B`` function that does this at the granularity
torch allows without rewriting the model: the backward chunk runs in a second thread while the
forward chunk runs in the calling thread. Every MoE all-to-all (``AllToAllDispatcher``) of one chunk
then blocks only its own thread; torch releases the GIL inside its kernels and collectives, so the
other chunk's attention and expert GEMMs run meanwhile. The two chunks are on different stages,
and ``PipelineRunner(..., overlap=True)`` gives the rank's second stage its own expert-parallel
process group (same ranks, a second communicator), so the collectives of the two threads never
share a group: within each group every EP rank issues them in the same order (one chunk's layers
in order), as a process group requires. Autograd saves the group in each all-to-all's context, so
a stage's backward exchanges on the group its forward used, whichever thread runs it.

That is enough for gloo, not for NCCL. The order in which the two threads issue their all-to-alls
*across* the two groups depends on thread timing, so it differs between ranks; NCCL kernels of two
communicators enqueued in different orders on two GPUs can wait for each other forever (a 2-GPU
run, pp 1 x ep 2, hung so). Hence the ``CollectiveTurnstile``: while a pair runs it replaces
``expert.exchange_gate``, the seam through which every all-to-all of the MoE exchange goes (counts
and rows, forward and backward), and makes the two chunks take turns, one collective each,
forward first, until one chunk is done; then the other goes on alone. Each chunk's own sequence is
the same on every rank of its group, so the merged sequence is too. The chunks still overlap:
a chunk computes (attention, experts, its counts' host sync) while the other holds the turn.

What stays in the calling thread (torch's runtime bookkeeping is not thread safe): waiting for the
pipeline receives of both chunks, fetching the loss, counting backwards (the last one triggers
nothing here: FSDP2's gradient reduction is a separate ``REDUCE_GRAD`` action), and handing the
outputs to the rank's other stage (the V's local hand-over). The pipeline sends are separate
actions that follow the pair and are asynchronous already.

On CUDA the backward thread issues its kernels on a side stream ordered after the main stream, and
the main stream waits for it at the end. Autograd runs a backward kernel on the stream of its
forward kernel, so the overlap on a GPU comes mainly from NCCL running one chunk's all-to-all on its
own stream while the other chunk's kernels run: the thing to measure (``benchmarks/dualpipe_overlap.py``).

This uses torch 2.13's runtime internals (``_PipelineContext``, the schedule's receive maps,
``_maybe_compute_loss``); ``check_torch_version`` pins the version the parallel code was tested on.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.pipelining.schedules import (FORWARD, FULL_BACKWARD, OVERLAP_F_B, _Action,
                                                    _PipelineContext, _wait_batch_p2p)

from deepseek_mini.moe import moe_layers
from deepseek_mini.parallel import expert
from deepseek_mini.parallel.expert import AllToAllDispatcher

__all__ = ["CollectiveTurnstile", "exchange_group", "overlap_forward_backward", "install_overlap"]

_Group = Any        # a torch.distributed.ProcessGroup, or None for WORLD


class CollectiveTurnstile:
    """Two chunks' collectives in a fixed order: one of ``first``'s, one of ``second``'s, and so on.

    ``first`` and ``second`` are the process groups of the two chunks (for a DualPipeV pair: the
    forward's EP group, then the backward's); a chunk is known by its group, not by its thread,
    because autograd may run a backward ``Function`` in its own device thread (on CUDA it does).
    ``gate(issue, group, kind)`` is an ``expert.exchange_gate``: a collective on a chunk's group
    waits until it is that chunk's turn, is issued through ``inner`` (the gate it stands in for),
    and hands the turn to the other chunk. ``finish(group)`` says a chunk has no more collectives;
    from then on the other issues alone. Each chunk issues the same sequence on every rank of its
    group, so the merged sequence (``first`` starts, strict alternation until one chunk finishes)
    is the same on every rank whatever the threads' timing. A collective on any other group is
    passed to ``inner`` at once.
    """

    def __init__(self, first: _Group, second: _Group,
                 inner: Callable[[Callable[[], object], _Group, str], None] = expert.issue_now) -> None:
        if first is second:
            raise ValueError("the two chunks of a CollectiveTurnstile need different process groups: "
                             "with one group their collectives cannot be told apart")
        self._groups = (first, second)
        self._inner = inner
        self._turn = 0                       # the chunk (0: first, 1: second) whose collective goes next
        self._issuing = False
        self._finished = [False, False]
        self._cond = threading.Condition()

    def _chunk(self, group: _Group) -> int | None:
        for chunk, mine in enumerate(self._groups):
            if group is mine:
                return chunk
        return None

    def gate(self, issue: Callable[[], object], group: _Group, kind: str) -> None:
        """Issue ``issue`` (a collective of ``kind`` on ``group``) when it is its chunk's turn."""
        chunk = self._chunk(group)
        if chunk is None:
            self._inner(issue, group, kind)
            return
        other = 1 - chunk
        with self._cond:
            if self._finished[chunk]:
                raise RuntimeError(f"a {kind} collective arrived for a chunk that was finished: "
                                   "finish a chunk only after its last collective")
            self._cond.wait_for(lambda: not self._issuing and (self._turn == chunk or self._finished[other]))
            self._issuing = True
        try:
            self._inner(issue, group, kind)
        finally:
            with self._cond:
                self._issuing = False
                if not self._finished[other]:
                    self._turn = other
                self._cond.notify_all()

    def finish(self, group: _Group) -> None:
        """The chunk on ``group`` has issued its last collective: the other one goes on alone."""
        chunk = self._chunk(group)
        if chunk is None:
            raise ValueError("finish got a process group that is neither of the turnstile's two")
        with self._cond:
            self._finished[chunk] = True
            self._turn = 1 - chunk
            self._cond.notify_all()


def exchange_group(stage: Any) -> tuple[bool, _Group]:
    """(whether ``stage``'s module exchanges rows with an all-to-all, the EP group it uses)."""
    groups = {id(layer.dispatcher.group): layer.dispatcher.group for layer in moe_layers(stage.submod)
              if isinstance(layer.dispatcher, AllToAllDispatcher)}
    if len(groups) > 1:
        raise ValueError(f"stage {stage.stage_index} exchanges on {len(groups)} process groups; "
                         "shard its experts over one (shard_experts(stage_module, group))")
    return (True, next(iter(groups.values()))) if groups else (False, None)


def overlap_forward_backward(action: _Action, ctx: _PipelineContext, ordered: bool = True) -> None:
    """Run ``action``'s forward and backward sub-actions at the same time: backward in a second thread.

    Gives the same results as torch's default (forward, then backward): the two chunks touch
    different stages, so they share no parameter, activation or gradient. ``ordered`` (the default)
    runs the pair's all-to-alls through a ``CollectiveTurnstile`` when both chunks have some, so every
    rank issues them in the same order (needed on NCCL); ``ordered=False`` leaves their order to the
    threads' timing (for tests that show the difference).
    """
    schedule = ctx.schedule_ref
    if action.sub_actions is None or [a.computation_type for a in action.sub_actions] != [FORWARD, FULL_BACKWARD]:
        raise ValueError(f"OVERLAP_F_B action {action} must hold a FORWARD then a FULL_BACKWARD sub-action")
    fwd, bwd = action.sub_actions
    stages = {stage.stage_index: stage for stage in schedule._stages}
    if fwd.stage_index == bwd.stage_index:
        raise ValueError(f"cannot overlap forward and backward of the same stage {fwd.stage_index}: "
                         "they would share the stage's expert-parallel group")
    f_stage, b_stage = stages[fwd.stage_index], stages[bwd.stage_index]
    f_mb, b_mb = fwd.microbatch_index, bwd.microbatch_index
    (f_exchanges, f_group), (b_exchanges, b_group) = exchange_group(f_stage), exchange_group(b_stage)
    if f_exchanges and b_exchanges and f_group is b_group:
        raise ValueError(f"stages {fwd.stage_index} and {bwd.stage_index} exchange on one expert-parallel group: "
                         "give the rank's second stage its own (PipelineRunner(overlap=True) does)")
    turnstile = CollectiveTurnstile(f_group, b_group, expert.exchange_gate) \
        if ordered and f_exchanges and b_exchanges else None

    # Bookkeeping in this thread, exactly as torch's runtime does it for the two actions.
    for stage in (f_stage, b_stage):
        schedule._assert_unsharded(stage)
    if not f_stage.is_first and fwd.stage_index - 1 not in stages:
        _wait_batch_p2p(schedule.fwd_recv_ops.pop((fwd.stage_index, f_mb)))
    if not b_stage.is_last and bwd.stage_index + 1 not in stages:
        _wait_batch_p2p(schedule.bwd_recv_ops.pop((bwd.stage_index, b_mb)))
    loss = schedule._maybe_get_loss(b_stage, b_mb)
    schedule.backward_counter[bwd.stage_index] += 1
    last_backward = schedule.backward_counter[bwd.stage_index] == schedule._n_microbatches

    cuda = f_stage.device.type == "cuda"
    side = _side_stream(f_stage.device) if cuda else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(f_stage.device))
    failure: list[BaseException] = []

    def backward() -> None:
        try:
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                b_stage.backward_one_chunk(b_mb, loss=loss, full_backward=True, last_backward=last_backward)
        except BaseException as error:      # re-raised in the calling thread
            failure.append(error)
        finally:
            if turnstile is not None:
                turnstile.finish(b_group)

    previous_gate = expert.exchange_gate
    if turnstile is not None:
        expert.exchange_gate = turnstile.gate
    thread = threading.Thread(target=backward, name=f"backward stage {bwd.stage_index} mb {b_mb}")
    try:
        thread.start()
        try:
            output = f_stage.forward_one_chunk(f_mb, ctx.arg_mbs[f_mb], ctx.kwarg_mbs[f_mb])  # type: ignore[index]
            schedule._maybe_compute_loss(f_stage, output, ctx.target_mbs, f_mb)
        finally:
            if turnstile is not None:
                turnstile.finish(f_group)   # before the join: the backward may be waiting for its turn
            thread.join()
    finally:
        expert.exchange_gate = previous_gate
    if failure:
        raise failure[0]
    if side is not None:
        torch.cuda.current_stream(f_stage.device).wait_stream(side)
    # The V's local hand-overs (torch's [Note: V-schedule special case]): no send between own stages.
    if fwd.stage_index + 1 in stages:
        stages[fwd.stage_index + 1].set_local_fwd_input(output, f_mb)
    if bwd.stage_index - 1 in stages:
        stages[bwd.stage_index - 1].set_local_bwd_input(b_stage.get_local_bwd_output(b_mb), b_mb)


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for the backward chunks (created once, reused by every pair)."""
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device=device)
    return _STREAMS[device]


def install_overlap(schedule: Any) -> None:
    """Register ``overlap_forward_backward`` for the ``OVERLAP_F_B`` actions of a ``ScheduleDualPipeV``."""
    if not hasattr(schedule, "register_custom_function"):
        raise ValueError(f"{type(schedule).__name__} takes no custom functions: overlap needs ScheduleDualPipeV")
    schedule.register_custom_function(OVERLAP_F_B, overlap_forward_backward)
