"""The overlapped forward/backward pair of DualPipeV (deepseek_mini.parallel.overlap_fb).

One spawn of 4 gloo processes (pp 2 x dp 2, one EP group of 2 per stage) runs one DualPipeV step
with torch's default OVERLAP_F_B (forward, then backward) and one with ``overlap=True`` (backward in
a second thread, the second stage on its own EP communicator), same weights, same batch: the loss
and every gradient must agree, and the custom function must have run every pair of the schedule.

The collective order (what NCCL needs): the ``CollectiveTurnstile`` alone with two plain threads,
then one spawn of 2 gloo processes (pp 1 x ep 2, the layout that hung on 2 GPUs) that records, on
each rank, the all-to-alls each pair issues, with the two chunks made to arrive in opposite orders
on the two ranks: with the turnstile the records are the same on both ranks and alternate, forward
first; without it (``ordered=False``) they differ.
"""

from __future__ import annotations

import random
import threading
import time
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from deepseek_mini.config import load_config
from deepseek_mini.hooks import MoEBalancing
from deepseek_mini.model import build_model
from deepseek_mini.moe import moe_layers
from deepseek_mini.parallel.distributed import init_distributed
from deepseek_mini.parallel.launch import run_workers
from deepseek_mini.parallel import expert
from deepseek_mini.parallel.overlap_fb import CollectiveTurnstile, exchange_group, overlap_forward_backward
from deepseek_mini.parallel.pipeline import PipelineRunner, check_overlap


def _step(ctx, x, y, overlap: bool, pairs: list[int]):
    share = x.shape[0] // ctx.dp
    mine = slice(ctx.dp_rank * share, (ctx.dp_rank + 1) * share)
    hook = MoEBalancing(0.25, "sequence", 0.05)
    hook.set_process_groups(ctx.dp_group, ctx.pp_group)
    runner = PipelineRunner(ctx, build_model(load_config("toy"), seed=0), "dualpipev", 4, (share, 16, 0), [hook],
                            overlap=overlap)
    if overlap:
        from torch.distributed.pipelining.schedules import OVERLAP_F_B

        def counted(action, pctx):
            pairs.append(1)
            overlap_forward_backward(action, pctx)
        runner.schedule.register_custom_function(OVERLAP_F_B, counted)
    loss, extra = runner.step(x[mine], y[mine], 1)
    grads = {}
    for model in runner.models:
        for name, p in model.named_parameters():
            grads[name] = (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
    return loss, extra, grads


def _compare(rank: int, world_size: int) -> None:
    ctx = init_distributed(pp=2, ep=2)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 260, (8, 16), generator=g)
    y = torch.randint(0, 260, (8, 16), generator=g)
    pairs: list[int] = []
    loss0, extra0, grads0 = _step(ctx, x, y, False, pairs)
    loss1, extra1, grads1 = _step(ctx, x, y, True, pairs)
    assert pairs, f"rank {rank}: the schedule ran no OVERLAP_F_B pair through the custom function"
    if loss0 is not None:
        assert torch.allclose(loss0, loss1, rtol=1e-6), f"rank {rank}: loss {loss1.item()} vs {loss0.item()}"
    assert torch.allclose(extra0["balance_loss"], extra1["balance_loss"], rtol=1e-6)
    assert grads0.keys() == grads1.keys()
    for name, want in grads0.items():
        err = (grads1[name] - want).abs().max() / want.abs().max()
        assert err < 1e-5, f"rank {rank}: gradient of {name} differs by {err:.2e} (relative) with overlap"


def test_overlap_equals_the_default_pair():
    run_workers(_compare, 4, timeout=120)


def test_overlap_needs_dualpipev():
    ctx = SimpleNamespace(ep=1, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="overlap needs schedule 'dualpipev'"):
        PipelineRunner(ctx, None, "1f1b", 2, (2, 16, 0), overlap=True)   # refused before the model is read


def test_check_overlap_refuses_other_schedules_only():
    # Expert parallelism on CUDA is no longer refused: the turnstile orders the two chunks' all-to-alls.
    with pytest.raises(ValueError, match="overlap needs schedule 'dualpipev'"):
        check_overlap("zb1p")
    check_overlap("dualpipev")


# --- the collective order: the turnstile alone -------------------------------------------------------

def _run_chunks(turnstile: CollectiveTurnstile | None, chunks: dict[str, tuple[object, int]],
                first_to_arrive: str) -> list[tuple[str, str]]:
    """Two threads, one per chunk (name -> (group, collectives)), each issuing through ``turnstile``
    (None: at once); ``first_to_arrive``'s first collective arrives before the other's. The issue order."""
    issued: list[tuple[str, str]] = []
    arrived = threading.Event()
    label = {id(group): name for name, (group, _) in chunks.items()}
    gate = turnstile.gate if turnstile is not None else expert.issue_now

    def chunk(name: str) -> None:
        group, n = chunks[name]
        for i in range(n):
            if i == 0 and name != first_to_arrive:
                arrived.wait()
                time.sleep(0.02)           # let the first one reach the gate (an order bias, not a check)
            if i == 0 and name == first_to_arrive:
                arrived.set()
            gate(lambda: issued.append((label[id(group)], f"#{i}")), group, "rows")
        if turnstile is not None:
            turnstile.finish(group)

    threads = [threading.Thread(target=chunk, args=(name,)) for name in chunks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive(), "the turnstile deadlocked"
    return issued


def test_turnstile_alternates_forward_first_whatever_arrives_first():
    a, b = object(), object()
    for first_to_arrive in ("A", "B"):
        for n_a, n_b in ((2, 4), (3, 1), (2, 2)):
            issued = _run_chunks(CollectiveTurnstile(a, b, expert.issue_now), {"A": (a, n_a), "B": (b, n_b)},
                                 first_to_arrive)
            k = min(n_a, n_b)
            want = [x for i in range(k) for x in (("A", f"#{i}"), ("B", f"#{i}"))]
            want += [("A", f"#{i}") for i in range(k, n_a)] + [("B", f"#{i}") for i in range(k, n_b)]
            assert issued == want, f"{n_a} A and {n_b} B collectives, {first_to_arrive} first: {issued}"
    # The same planted arrival without the turnstile: B goes first.
    assert _run_chunks(None, {"A": (a, 1), "B": (b, 1)}, "B")[0][0] == "B"


def test_turnstile_finish_errors_and_other_groups():
    a, b, other = object(), object(), object()
    turnstile = CollectiveTurnstile(a, b, expert.issue_now)
    issued: list[str] = []
    turnstile.gate(lambda: issued.append("other"), other, "counts")     # not a chunk's group: at once
    turnstile.finish(a)                                                  # A had nothing to issue
    for _ in range(3):
        turnstile.gate(lambda: issued.append("B"), b, "rows")            # B alone, never waits
    assert issued == ["other", "B", "B", "B"]
    with pytest.raises(RuntimeError, match="finished"):
        turnstile.gate(lambda: None, a, "rows")
    with pytest.raises(ValueError, match="neither"):
        turnstile.finish(other)
    with pytest.raises(ValueError, match="different process groups"):
        CollectiveTurnstile(a, a)

    # A collective that fails still hands the turn on: B is not left waiting for A forever.
    turnstile = CollectiveTurnstile(a, b, expert.issue_now)

    def fail() -> None:
        raise OSError("link down")
    with pytest.raises(OSError):
        turnstile.gate(fail, a, "rows")
    turnstile.gate(lambda: issued.append("B after A failed"), b, "rows")
    assert issued[-1] == "B after A failed"


# --- the collective order: a real pair, pp 1 x ep 2 ------------------------------------------------

def _pair_orders(rank: int, world_size: int) -> dict[str, object]:
    """Each rank's record of the all-to-alls of every pair, with and without the turnstile."""
    ctx = init_distributed(pp=1, ep=2)
    runner = PipelineRunner(ctx, build_model(load_config("toy"), seed=0), "dualpipev", 4, (4, 8, 0), overlap=True)
    group_of = {stage.stage_index: exchange_group(stage)[1] for stage in runner.schedule._stages}
    moe_count = {stage.stage_index: len(moe_layers(stage.submod)) for stage in runner.schedule._stages}
    rng = random.Random(1000 + rank)                        # a different timing on each rank
    pair: dict[str, object] = {"active": False}            # exchanges outside a pair pass untouched

    def record(issue, group, kind):                         # innermost gate: the order really issued
        if not pair["active"]:
            return issue()
        name = pair["label"][id(group)]
        pair["log"].append((name, kind))
        pair["recorded"][name].set()
        issue()

    original_exchange = expert.exchange

    def delayed(output, input, output_splits, input_splits, group, kind):   # outside the turnstile
        if not pair["active"]:
            return original_exchange(output, input, output_splits, input_splits, group, kind)
        name = pair["label"][id(group)]
        pair["arrived"][name].set()
        time.sleep(rng.random() * 0.002)
        # Plant opposite arrival orders: on rank 0 the backward chunk (B) waits for the forward's
        # first all-to-all, on rank 1 the forward (A) waits for the backward's.
        late = "B" if rank == 0 else "A"
        if name == late and not pair["late_waited"]:
            pair["late_waited"] = True
            early = "A" if late == "B" else "B"
            # With the turnstile the early chunk can only arrive (the late one may hold its turn); without,
            # wait for it to be recorded: then it is first on this rank for sure.
            assert pair["wait_for"][early].wait(timeout=60), f"rank {rank}: chunk {early} never arrived"
        original_exchange(output, input, output_splits, input_splits, group, kind)

    def counted(action, pctx, ordered: bool, logs: list):
        fwd, bwd = action.sub_actions
        events = {"arrived": {"A": threading.Event(), "B": threading.Event()},
                  "recorded": {"A": threading.Event(), "B": threading.Event()}}
        pair.update(events, label={id(group_of[fwd.stage_index]): "A", id(group_of[bwd.stage_index]): "B"},
                    log=[], late_waited=False, wait_for=events["arrived" if ordered else "recorded"], active=True)
        try:
            overlap_forward_backward(action, pctx, ordered=ordered)
        finally:
            pair["active"] = False
        logs.append({"log": pair["log"], "moe": [moe_count[fwd.stage_index], moe_count[bwd.stage_index]]})

    from torch.distributed.pipelining.schedules import OVERLAP_F_B
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 260, (8, 8), generator=g), torch.randint(0, 260, (8, 8), generator=g)
    out: dict[str, object] = {}
    expert.exchange_gate, expert.exchange = record, delayed
    try:
        for ordered in (True, False):
            logs: list = []
            runner.schedule.register_custom_function(OVERLAP_F_B, partial(counted, ordered=ordered, logs=logs))
            runner.step(x[4 * rank:4 * rank + 4], y[4 * rank:4 * rank + 4], 1)
            out["ordered" if ordered else "unordered"] = logs
    finally:
        expert.exchange_gate, expert.exchange = expert.issue_now, original_exchange
    return out


def test_pair_issues_all_to_alls_in_one_order_on_every_rank():
    by_rank = run_workers(_pair_orders, 2, timeout=120)
    ordered = [r["ordered"] for r in by_rank]
    assert ordered[0], "the schedule ran no overlapped pair"
    assert ordered[0] == ordered[1], f"the ranks issued the pairs' all-to-alls in different orders: {ordered}"
    for pair in ordered[0]:
        log, (moe_a, moe_b) = pair["log"], pair["moe"]
        a = [kind for name, kind in log if name == "A"]
        b = [kind for name, kind in log if name == "B"]
        # Every all-to-all goes through the seam: per MoE layer the forward's counts, rows and rows
        # back, the backward's two reverse row exchanges.
        assert a == ["counts", "rows", "rows"] * moe_a and b == ["rows", "rows"] * moe_b, log
        k = min(len(a), len(b))
        assert [name for name, _ in log] == ["A", "B"] * k + ["A"] * (len(a) - k) + ["B"] * (len(b) - k), log
    # Without the turnstile the planted arrival order decides: rank 0 starts with A, rank 1 with B.
    unordered = [r["unordered"] for r in by_rank]
    assert [pair["log"][0][0] for pair in unordered[0]] == ["A"] * len(unordered[0])
    assert [pair["log"][0][0] for pair in unordered[1]] == ["B"] * len(unordered[1])
    assert unordered[0] != unordered[1]


def test_benchmark_checks_agreement_and_prints_both_timings(capsys, monkeypatch):
    import importlib
    from pathlib import Path
    # An importable module (not one loaded from a file spec): spawned workers import ``bench`` by name.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bench = importlib.import_module("dualpipe_overlap")
    assert bench.parse_overrides(["hidden_size=64", "rope_theta=1e4", "attn_impl=naive"]) == {
        "hidden_size": 64, "rope_theta": 1e4, "attn_impl": "naive"}
    with pytest.raises(ValueError, match="key=value"):
        bench.parse_overrides(["hidden_size"])
    bench.main(["--procs", "2", "--pp", "1", "--ep", "2", "--batch", "4", "--seq-len", "8", "--steps", "1",
                "--rounds", "1", "--timeout", "120"])
    out = capsys.readouterr().out
    assert "overlapped F&B pairs per step on rank 0: 1" in out and "gradients differ by at most 0.0e+00" in out
    assert "default" in out and "overlap" in out and "ratio default / overlap" in out
