"""RMSNorm, the SwiGLU MLP and the pre-norm block against hand computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepseek_mini.attention import Attention
from deepseek_mini.layers import MLP, Block, RMSNorm, init_linear
from deepseek_mini.rope import rope_cos_sin, rope_frequencies


def rmsnorm_by_hand(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    out = torch.empty_like(x)
    flat, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
    for r in range(flat.shape[0]):
        ms = sum(v * v for v in flat[r].tolist()) / flat.shape[1]
        flat_out[r] = flat[r] / (ms + eps) ** 0.5 * weight.double()
    return out


def random_gain(d: int, seed: int) -> torch.Tensor:
    return 1 + 0.5 * torch.randn(d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_rmsnorm_matches_hand_computation(eps):
    torch.manual_seed(0)
    norm = RMSNorm(8, eps)
    with torch.no_grad():
        norm.weight.copy_(random_gain(8, 1))
    x = torch.randn(3, 5, 8) * 0.1
    expected = rmsnorm_by_hand(x, norm.weight.detach(), eps).float()
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-6)


def test_rmsnorm_matches_torch_rms_norm():
    torch.manual_seed(1)
    norm = RMSNorm(16, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(random_gain(16, 2))
    x = torch.randn(4, 7, 16)
    expected = F.rms_norm(x, (16,), norm.weight.detach(), eps=1e-5)
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-6)


def test_rmsnorm_starts_with_unit_gain_and_init_weights_restores_it():
    norm = RMSNorm(6)
    assert torch.equal(norm.weight.detach(), torch.ones(6))
    with torch.no_grad():
        norm.weight.mul_(3)
    norm.init_weights(0.02, torch.Generator().manual_seed(0))
    assert torch.equal(norm.weight.detach(), torch.ones(6))
    assert norm.eps == 1e-6


def test_rmsnorm_output_has_unit_rms_and_no_mean_subtraction():
    norm = RMSNorm(4, eps=0.0)
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, -1.0, 3.0, -1.0]])
    out = norm(x)
    torch.testing.assert_close(out[0], torch.ones(4))   # LayerNorm would give zeros here
    torch.testing.assert_close(out[1], torch.ones(4))
    torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(3))


@pytest.mark.parametrize("scale", [1e-2, 3.0, 1e3])
def test_rmsnorm_is_scale_invariant(scale):
    torch.manual_seed(2)
    norm = RMSNorm(32, eps=1e-12)
    x = torch.randn(5, 32)
    torch.testing.assert_close(norm(x * scale), norm(x), rtol=1e-5, atol=1e-5)


def test_rmsnorm_bf16_in_bf16_out_close_to_float32():
    torch.manual_seed(3)
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.copy_(random_gain(64, 3))
    x = torch.randn(4, 64) * 50
    out16 = norm.to(torch.bfloat16)(x.bfloat16())
    assert out16.dtype == torch.bfloat16
    ref = rmsnorm_by_hand(x.bfloat16().float(), norm.weight.float(), 1e-6).float()
    torch.testing.assert_close(out16.float(), ref, rtol=1.6e-2, atol=1e-2)


def test_mlp_is_swiglu_by_hand():
    torch.manual_seed(4)
    mlp = MLP(8, 20)
    assert mlp.w1.weight.shape == (20, 8) and mlp.w3.weight.shape == (20, 8)
    assert mlp.w2.weight.shape == (8, 20)
    assert all(m.bias is None for m in (mlp.w1, mlp.w2, mlp.w3))
    x = torch.randn(2, 3, 8)
    w1, w2, w3 = (m.weight.detach().double() for m in (mlp.w1, mlp.w2, mlp.w3))
    a = x.double() @ w1.T
    gate = a / (1 + torch.exp(-a))                      # silu written out
    expected = (gate * (x.double() @ w3.T)) @ w2.T
    torch.testing.assert_close(mlp(x), expected.float(), rtol=1e-5, atol=1e-6)


def test_gradcheck_rmsnorm_float64():
    torch.manual_seed(5)
    norm = RMSNorm(5, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(random_gain(5, 5).double())
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    # In float64 the statistic must stay float64 (no silent float32 round trip).
    torch.testing.assert_close(norm(x), rmsnorm_by_hand(x.detach(), norm.weight.detach(), 1e-6),
                               rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(norm, (x,))


def test_gradcheck_rmsnorm_weight_float64():
    torch.manual_seed(6)
    norm = RMSNorm(4).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    w = (1 + torch.randn(4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda w: torch.func.functional_call(norm, {"weight": w}, (x,)), (w,))


def test_gradcheck_mlp_float64():
    torch.manual_seed(7)
    mlp = MLP(4, 6).double()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mlp, (x,))


def test_block_is_prenorm_residual_by_hand():
    torch.manual_seed(8)
    d, T = 16, 6
    attn, ffn = Attention(d, 4), MLP(d, 24)
    block = Block(attn, ffn, d, eps=1e-5)
    with torch.no_grad():                      # distinct gains: swapping the norms would show
        block.attn_norm.weight.copy_(random_gain(d, 10))
        block.ffn_norm.weight.copy_(random_gain(d, 11))
    assert block.attn is attn and block.ffn is ffn
    rope = rope_cos_sin(rope_frequencies(d // 4), T)
    x = torch.randn(2, T, d)

    def norm(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    h = x + attn(norm(x, block.attn_norm.weight), rope)
    expected = h + ffn(norm(h, block.ffn_norm.weight))
    torch.testing.assert_close(block(x, rope), expected, rtol=1e-5, atol=1e-5)


def test_block_passes_start_pos_cache_and_mask_to_attention():
    calls = []

    class Spy(torch.nn.Module):
        def forward(self, x, rope, start_pos, cache, mask):
            calls.append((rope, start_pos, cache, mask))
            return torch.zeros_like(x)

    block = Block(Spy(), torch.nn.Identity(), 4)
    x = torch.randn(1, 2, 4)
    sentinel, mask = object(), object()
    out = block(x, ("cos", "sin"), 7, sentinel, mask)
    assert calls == [(("cos", "sin"), 7, sentinel, mask)]
    # attn adds 0; ffn = identity adds norm(x), with unit gains
    torch.testing.assert_close(out, x + x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_init_weights_of_each_module_draws_normal_weights_and_zero_biases():
    # Each module initialises its own weights: an MLP and a block need no model around them.
    torch.manual_seed(0)
    mlp = MLP(64, 256)
    block = Block(Attention(64, 4, bias=True), MLP(64, 256), 64)
    with torch.no_grad():
        for p in [*mlp.parameters(), *block.parameters()]:
            p.fill_(7.0)
    mlp.init_weights(0.05, torch.Generator().manual_seed(0))
    block.init_weights(0.05, torch.Generator().manual_seed(0))
    for name, p in [*mlp.named_parameters(), *block.named_parameters()]:
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            assert p.std().item() == pytest.approx(0.05, rel=0.1) and abs(p.mean().item()) < 0.01, name
    again = MLP(64, 256)
    again.init_weights(0.05, torch.Generator().manual_seed(0))
    assert torch.equal(again.w1.weight, mlp.w1.weight)           # seeded: reproducible


def test_init_linear_draws_from_the_generator_only():
    lin = torch.nn.Linear(8, 8)
    state = torch.get_rng_state()
    init_linear(lin, 0.1, torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(lin.bias, torch.zeros(8))
