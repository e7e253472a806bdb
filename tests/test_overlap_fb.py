"""The overlapped forward/backward pair of DualPipeV (deepseek_mini.parallel.overlap_fb).

One spawn of 4 gloo processes (pp 2 x dp 2, one EP group of 2 per stage) runs one DualPipeV step
with torch's default OVERLAP_F_B (forward, then backward) and one with ``overlap=True`` (backward in
a second thread, the second stage on its own EP communicator), same weights, same batch: the loss
and every gradient must agree, and the custom function must have run every pair of the schedule.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from deepseek_mini.config import load_config
from deepseek_mini.hooks import MoEBalancing
from deepseek_mini.model import build_model
from deepseek_mini.parallel.distributed import init_distributed
from deepseek_mini.parallel.launch import run_workers
from deepseek_mini.parallel.overlap_fb import overlap_forward_backward
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


def test_overlap_with_expert_parallelism_is_refused_on_cuda_only():
    # Two threads' all-to-alls on two NCCL communicators hung a 2-GPU run (pp 1 x ep 2); gloo runs it.
    with pytest.raises(ValueError, match=r"overlap with expert parallelism \(ep 2\) hangs on NCCL"):
        check_overlap("dualpipev", 2, "cuda")
    check_overlap("dualpipev", 2, "cpu")
    check_overlap("dualpipev", 1, "cuda")


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
