"""Pipeline stages on torch.distributed.pipelining (deepseek_mini.parallel.pipeline) and the test launcher.

The multi-process tests start gloo processes with ``spawn`` (a time limit, a clear message on a
hang or a failure) and compare one schedule step with the single-process model: the loss and
every parameter's gradient, with a balance loss large enough that losing it would show.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from deepseek_mini.config import load_config
from deepseek_mini.hooks import MoEBalancing
from deepseek_mini.model import build_model
from deepseek_mini.parallel.distributed import init_distributed, spawn
from deepseek_mini.parallel.pipeline import (AddLoss, PipelineRunner, clip_grad_norm, default_microbatches,
                                             split_layers, stage_placement, stages_per_rank)

ALPHA = 0.05   # the balance loss weight: large, so a lost balance loss changes the gradients visibly


def test_placement_and_split():
    assert stage_placement("1f1b", 3) == [[0], [1], [2]]
    assert stage_placement("zb1p", 2) == [[0], [1]]
    assert stage_placement("dualpipev", 2) == [[0, 3], [1, 2]]     # the V: rank 0 holds embedding and head
    assert stages_per_rank("dualpipev") == 2 and default_microbatches("dualpipev", 2) == 4
    assert split_layers(4, 4) == [[0], [1], [2], [3]]
    assert split_layers(5, 2) == [[0, 1, 2], [3, 4]]
    with pytest.raises(ValueError, match="at least 4 layers"):
        split_layers(3, 4)
    with pytest.raises(ValueError, match="use 'dualpipev'"):
        stage_placement("dualpipe", 2)
    with pytest.raises(ValueError, match="must be one of"):
        stage_placement("gpipe", 2)


def test_add_loss_passes_output_and_gives_the_loss_gradient_one():
    out = torch.randn(2, 3, requires_grad=True)
    loss = (out.detach() * 0 + 1).sum().requires_grad_()
    w = torch.tensor(2.0, requires_grad=True)
    attached = AddLoss.apply(out, w * loss)
    assert torch.equal(attached, out)
    attached.sum().backward()
    assert torch.equal(out.grad, torch.ones(2, 3))
    assert w.grad.item() == loss.item()          # d(total)/dw = loss: the attached loss joined the objective


def _reference(x: torch.Tensor, y: torch.Tensor):
    """The single-process loss (LM + balance) and gradients of the toy model on (x, y)."""
    config = load_config("toy")
    model = build_model(config, seed=0)
    logits, aux = model(x, return_aux=True)
    lm = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    balance = MoEBalancing(0.001, "sequence", ALPHA).extra_loss(model, (x, y), (logits, aux), 1)["balance_loss"]
    (lm + balance).backward()
    return lm.item(), balance.item(), {name: p.grad for name, p in model.named_parameters()}


def _check_schedules(layouts: list[tuple[int, str, int]]) -> None:
    """On each rank: for each (pp, schedule, micro-batches), one schedule step equals the single process."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 260, (4, 16), generator=g)
    y = torch.randint(0, 260, (4, 16), generator=g)
    lm, balance, grads = _reference(x, y)
    for pp, schedule, n_micro in layouts:
        ctx = init_distributed(pp=pp)
        share = x.shape[0] // ctx.dp
        mine = slice(ctx.dp_rank * share, (ctx.dp_rank + 1) * share)
        runner = PipelineRunner(ctx, build_model(load_config("toy"), seed=0), schedule, n_micro, (share, 16, 0),
                                [MoEBalancing(0.001, "sequence", ALPHA)])
        loss, extra = runner.step(x[mine], y[mine], 1)
        what = f"{schedule} pp {pp} dp {ctx.dp}, rank {ctx.rank}"
        if runner.is_last and ctx.dp == 1:
            assert abs(loss.item() - lm) < 1e-5 * lm, f"{what}: loss {loss.item()} vs {lm}"
        parts = torch.tensor([extra.get("balance_loss", torch.tensor(0.0)).item()])
        torch.distributed.all_reduce(parts)
        assert abs(parts.item() / ctx.dp - balance) < 1e-5 * balance, f"{what}: balance {parts.item()} vs {balance}"
        params = list(runner.models.parameters())
        for model in runner.models:
            for name, p in model.named_parameters():
                grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                err = (grad - grads[name]).abs().max() / grads[name].abs().max()
                assert err < 1e-4, f"{what}: gradient of {name} differs by {err:.2e} (relative)"
        norm = clip_grad_norm(params, 1e9, ctx)
        whole = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
        assert abs(norm.item() - whole.item()) < 1e-4 * whole.item(), f"{what}: grad norm {norm} vs {whole}"


def test_schedules_equal_one_process():
    """pp 2 with 1F1B, ZB1P and DualPipeV (4 stages), and pp 1 with FSDP2 over dp 2: loss, balance
    loss, every gradient and the global gradient norm equal the single-process model's."""
    spawn(_check_schedules, 2, [(2, "1f1b", 2), (2, "zb1p", 2), (2, "dualpipev", 4), (1, "1f1b", 2)],
          timeout_s=120)


def _fail_on_rank_zero() -> None:
    import os
    if os.environ["RANK"] == "0":
        raise ValueError("planted failure")
    time.sleep(60)


def _hang() -> None:
    time.sleep(60)


def test_spawn_reports_a_failing_rank():
    with pytest.raises(RuntimeError, match="(?s)rank 0 of 2 failed.*ValueError: planted failure"):
        spawn(_fail_on_rank_zero, 2, timeout_s=60)


def test_spawn_kills_a_hang():
    with pytest.raises(TimeoutError, match="did not finish in 2 s"):
        spawn(_hang, 2, timeout_s=2)
