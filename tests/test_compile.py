"""torch.compile on the toy (issue #10): compiled equals eager, and ``TrainConfig.compile`` trains through it.

The equivalence test compiles for real with inductor (about 50 s on 2 cores with a cold
inductor cache, 10-15 s with a warm one): a one-layer toy, MLA + DeepSeekMoE, forward and
one backward. MoE
dispatch has data-dependent shapes (tokens per expert), so dynamo breaks the graph there;
that is expected, and the results must still agree.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepseek_mini import load_config
from deepseek_mini.data import make_datasets
from deepseek_mini.model import build_model
from deepseek_mini.moe import balance_loss, moe_layers
from deepseek_mini.train import TrainConfig, train

# The toy preset (MLA + DeepSeekMoE) cut to one MoE layer with 4 routed experts: small enough to compile quickly.
ONE_MOE_LAYER = dict(num_hidden_layers=1, first_k_dense_replace=0, hidden_size=32, num_attention_heads=4,
                     max_position_embeddings=64, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                     v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                     moe_intermediate_size=16)
# Compiled kernels add in other orders than eager ones: float32 rounding, a few 1e-7 relative in practice.
RTOL = 5e-5


def has_cpp_compiler() -> bool:
    """Inductor generates C++ for CPU kernels and needs a compiler to build them."""
    return any(shutil.which(name) for name in (os.environ.get("CXX", "c++"), "g++", "clang++"))


requires_inductor = pytest.mark.skipif(not has_cpp_compiler(), reason="inductor needs a C++ compiler on CPU")


@pytest.fixture
def fresh_dynamo():
    """No compiled code or recompile counts shared with other tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@requires_inductor
def test_compiled_toy_equals_eager_forward_and_backward(fresh_dynamo):
    config = load_config("toy", **ONE_MOE_LAYER)
    eager, twin = build_model(config, seed=0).train(), build_model(config, seed=0).train()
    compiled = torch.compile(twin, dynamic=False)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (2, 16), generator=g), torch.randint(0, 256, (2, 16), generator=g)

    def step(module: nn.Module, owner: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        logits, aux = module(x, return_aux=True)      # the routing comes out of the (compiled) forward
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten()) + balance_loss(aux["routing"], "sequence", 0.01)
        loss.backward()
        return logits.detach(), loss.detach()

    logits_e, loss_e = step(eager, eager)
    logits_c, loss_c = step(compiled, twin)
    torch.testing.assert_close(logits_c, logits_e, rtol=RTOL, atol=RTOL * logits_e.abs().max().item())
    torch.testing.assert_close(loss_c, loss_e, rtol=RTOL, atol=0)
    (layer_e,), (layer_c,) = moe_layers(eager), moe_layers(twin)
    assert torch.equal(layer_c.tokens_per_expert, layer_e.tokens_per_expert)   # the bias update's input
    assert layer_e.tokens_per_expert.sum() == 2 * 16 * 2                       # every token, top-2
    for (name, p_e), p_c in zip(eager.named_parameters(), twin.parameters()):
        assert p_c.grad is not None, name
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=RTOL, atol=RTOL * p_e.grad.abs().max().item(),
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")


class CompileSpy(nn.Module):
    """Stands in for torch.compile's wrapper: records each call's train/eval mode."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.modes = model, []

    def forward(self, x: torch.Tensor, **kwargs):
        self.modes.append("train" if self.model.training else "eval")
        return self.model(x, **kwargs)


def test_train_with_compile_trains_through_the_compiled_module_and_evaluates_eagerly(monkeypatch):
    spies: list[CompileSpy] = []

    def fake_compile(model, **kwargs):
        spies.append(CompileSpy(model))
        return spies[-1]

    monkeypatch.setattr(torch, "compile", fake_compile)
    data = make_datasets("synthetic", n_docs=60, seed=0)
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=16, warmup_steps=1, eval_every=1, eval_batches=1,
                      device="cpu", progress=False, compile=True)
    result = train(load_config("toy", **ONE_MOE_LAYER), cfg, data=data)
    (spy,) = spies
    assert spy.model is result.model and spy.modes == ["train"] * 3     # 3 evaluations ran on the eager model
    assert len(result.history["maxvio"]) == 3                           # the hooks saw the step's routing
    assert not any(name.startswith("model.") for name in result.model.state_dict())
    train(load_config("toy", **ONE_MOE_LAYER), TrainConfig(**{**vars(cfg), "compile": False}), data=data)
    assert len(spies) == 1


def test_compile_setting_must_be_a_bool():
    with pytest.raises(ValueError, match="compile"):
        TrainConfig(compile="yes").validate()


# ----------------------------------------------------------------------------- benchmarks/compile_toy.py

def test_compile_benchmark_runs_and_prints_its_ratio(monkeypatch, capsys, tmp_path):
    """The script's logic at the smallest size, with torch.compile replaced by the identity (no compiling)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "compile_toy.py"
    spec = importlib.util.spec_from_file_location("benchmark_compile_toy", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)
    threads = torch.get_num_threads()
    try:
        rows = script.main(["--configs", "toy-dense", "--batch-size", "2", "--seq-len", "16", "--warmup", "1",
                            "--steps", "2", "--n-docs", "40", "--threads", "1", "--json", str(tmp_path / "c.json")])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    (row,) = rows
    assert row["config"] == "toy-dense" and row["eager"]["steps_per_s"] > 0 and row["compiled"]["steps_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["compiled"]["steps_per_s"] / row["eager"]["steps_per_s"])
    assert len(row["eager"]["step_s"]) == 3 and "compiled/eager" in printed and "toy-dense" in printed
    assert (tmp_path / "c.json").is_file()
