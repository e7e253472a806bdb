"""Pipeline stages on torch.distributed.pipelining (deepseek_mini.parallel.pipeline), with expert
parallelism inside the stages, and the (pp, edp, ep) mesh.

One spawn of 4 gloo processes (``run_workers``: a time limit, a clear message on a hang or a
failure) compares one schedule step of several layouts with the single-process model: the loss,
the balance loss, every parameter's gradient (each rank's expert slices against the matching
rows of the whole stacks) and the global gradient norm, with a balance loss large enough that
losing it would show. Gradients, not losses, catch a wrong expert-gradient scale: AdamW's update
hardly changes when one parameter's gradient is scaled.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepseek_mini.config import load_config
from deepseek_mini.hooks import MoEBalancing
from deepseek_mini.model import build_model
from deepseek_mini.parallel.distributed import init_distributed, mesh_shape
from deepseek_mini.parallel.launch import run_workers
from deepseek_mini.parallel.pipeline import (AddLoss, PipelineRunner, clip_grad_norm, default_microbatches,
                                             sharded_experts, split_layers, stage_placement, stages_per_rank)

ALPHA = 0.05   # the balance loss weight: large, so a lost balance loss changes the gradients visibly
GAMMA = 0.25   # the bias update speed: large, so the biases show which load moved them


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
    """The single-process loss (LM + balance), gradients and moved MoE biases of the toy model on (x, y)."""
    config = load_config("toy")
    model = build_model(config, seed=0)
    logits, aux = model(x, return_aux=True)
    lm = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    hook = MoEBalancing(GAMMA, "sequence", ALPHA)
    balance = hook.extra_loss(model, (x, y), (logits, aux), 1)["balance_loss"]
    (lm + balance).backward()
    hook.after_optimizer_step(model, 1)
    biases = {name: b for name, b in model.named_buffers() if name.endswith("gate.bias")}
    return lm.item(), balance.item(), {name: p.grad for name, p in model.named_parameters()}, biases


def _check_schedules(rank: int, world_size: int, layouts: list[tuple[int, int, str, int]]) -> None:
    """On each rank: for each (pp, ep, schedule, micro-batches), one schedule step equals the single process."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 260, (8, 16), generator=g)
    y = torch.randint(0, 260, (8, 16), generator=g)
    lm, balance, grads, biases = _reference(x, y)
    for pp, ep, schedule, n_micro in layouts:
        ctx = init_distributed(pp=pp, ep=ep)
        share = x.shape[0] // ctx.dp
        mine = slice(ctx.dp_rank * share, (ctx.dp_rank + 1) * share)
        hook = MoEBalancing(GAMMA, "sequence", ALPHA)
        hook.set_process_groups(ctx.dp_group, ctx.pp_group)   # as the trainer does: the stage's dp x ep ranks
        runner = PipelineRunner(ctx, build_model(load_config("toy"), seed=0), schedule, n_micro, (share, 16, 0),
                                [hook])
        loss, extra = runner.step(x[mine], y[mine], 1)
        what = f"{schedule} pp {pp} dp {ctx.dp} ep {ep}, rank {ctx.rank}"
        if runner.is_last and ctx.dp == 1:
            assert abs(loss.item() - lm) < 1e-5 * lm, f"{what}: loss {loss.item()} vs {lm}"
        parts = torch.tensor([extra.get("balance_loss", torch.tensor(0.0)).item()])
        torch.distributed.all_reduce(parts)
        assert abs(parts.item() / ctx.dp - balance) < 1e-5 * balance, f"{what}: balance {parts.item()} vs {balance}"
        experts = sharded_experts(runner.models)
        assert len(experts) == (3 * sum(1 for m in runner.models for n, _ in m.named_parameters()
                                        if n.endswith("experts.w1")) if ep > 1 else 0), f"{what}: expert slices"
        for model in runner.models:
            for name, p in model.named_parameters():
                grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                want = grads[name]
                if name in experts:                       # this rank's slice of the whole stack
                    per_rank = want.shape[0] // ep
                    assert grad.shape[0] == per_rank, f"{what}: {name} holds {grad.shape[0]} experts"
                    want = want[ctx.ep_rank * per_rank:(ctx.ep_rank + 1) * per_rank]
                err = (grad - want).abs().max() / want.abs().max()
                assert err < 1e-4, f"{what}: gradient of {name} differs by {err:.2e} (relative)"
        norm = clip_grad_norm(list(runner.models.parameters()), 1e9, ctx, runner.expert_params)
        whole = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
        assert abs(norm.item() - whole.item()) < 1e-4 * whole.item(), f"{what}: grad norm {norm} vs {whole}"
        # The bias update (§2.1.2): each rank routed only its share; the load summed over the stage's
        # dp ranks (EP ranks included) moves every replica of b_i as the whole batch's load does.
        hook.after_optimizer_step(runner.models, 1)
        moved = {n: b for model in runner.models for n, b in model.named_buffers() if n.endswith("gate.bias")}
        assert moved, f"{what}: no MoE layer on this rank"
        for name, bias in moved.items():
            assert torch.equal(bias, biases[name]), f"{what}: {name} moved unlike one process's"


def test_schedules_equal_one_process():
    """On 4 processes: pp 2 x dp 2 with 1F1B and ZB1P; pp 2 x dp 2 as one EP group of 2 with DualPipeV
    (4 stages); pp 1 x dp 4 as two EP groups of 2 (each expert slice on 2 ranks: its gradient is
    summed over them). Loss, balance loss, every gradient and the global gradient norm equal the
    single-process model's."""
    run_workers(_check_schedules, 4, [(2, 1, "1f1b", 2), (2, 1, "zb1p", 2), (2, 2, "dualpipev", 4),
                                      (1, 2, "1f1b", 2)], timeout=120)


def test_mesh_shape():
    assert mesh_shape(8, pp=2, ep=2) == (2, 2, 2)      # rank = pp_rank * 4 + edp_rank * 2 + ep_rank
    assert mesh_shape(4, pp=1, ep=4) == (1, 1, 4)
    with pytest.raises(ValueError, match=r"^pp \(3\) must divide the number of processes \(4\)"):
        mesh_shape(4, pp=3)
    with pytest.raises(ValueError, match=r"^ep \(4\) must divide the data-parallel ranks of a stage "
                                         r"\(processes 4 / pp 2 = 2\)"):
        mesh_shape(4, pp=2, ep=4)
    with pytest.raises(ValueError, match="must be a positive integer"):
        mesh_shape(4, ep=0)


def test_parallel_training_refuses_an_untested_torch():
    from deepseek_mini.parallel.distributed import check_torch_version
    check_torch_version("2.13.0+cpu", "gloo")
    check_torch_version("3.0.1", "gloo")
    with pytest.raises(ValueError, match=r"on gloo needs torch >= 2.13 .* found torch 2.11.0\+cpu: upgrade torch"):
        check_torch_version("2.11.0+cpu", "gloo")
    # NCCL: torch 2.11 ran every schedule on two GPUs with the single-GPU losses (benchmarks/README.md)
    check_torch_version("2.11.0+cu130", "nccl")
    with pytest.raises(ValueError, match=r"on nccl needs torch >= 2.11 .* found torch 2.10.0\+cu128"):
        check_torch_version("2.10.0+cu128", "nccl")
