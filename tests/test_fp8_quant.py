"""Fine-grained FP8 (chapter 05): reference quantisers, GEMM, accumulator model, FP8Linear; and the
Triton kernels under TRITON_INTERPRET=1 against the reference (bit for bit with exact_round)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before deepseek_mini.fp8.kernels is imported

import deepseek_mini.pretrained as pretrained
from deepseek_mini.fp8.accum import limited_accumulate
from deepseek_mini.fp8.linear import FP8Linear, convert_to_fp8
from deepseek_mini.fp8.quant import (dequantize_activation, dequantize_weight, fp8_gemm, fp8_gemm_fast,
                                     quantize_activation, quantize_weight)


def test_hand_tile_zero_tile_and_ragged_padding():
    x = torch.zeros(2, 256)
    x[0, 0], x[0, 1], x[0, 200] = 896.0, -3.0, 448.0
    q, s = quantize_activation(x)
    assert s[0].tolist() == [2.0, 1.0] and q[0, :2].float().tolist() == [448.0, -1.5]
    assert torch.isfinite(s).all() and (q[1].float() == 0).all()
    xr = torch.randn(5, 200)
    (qa, sa), (qp, sp) = quantize_activation(xr), quantize_activation(nn.functional.pad(xr, (0, 56)))
    assert torch.equal(sa, sp) and torch.equal(qa.float(), qp.float()[:, :200])


def test_weight_blocks_match_pretrained_dequant_and_gemm():
    w = torch.randn(300, 200)
    wq, ws = quantize_weight(w)
    assert ws.shape == (3, 2) and pretrained.dequantize_weight is dequantize_weight   # one dequantiser
    x = torch.randn(7, 200)
    aq, as_ = quantize_activation(x)
    y = fp8_gemm(aq, as_, wq, ws)
    assert ((y - fp8_gemm_fast(aq, as_, wq, ws)).abs().max() / y.abs().max()) < 1e-5
    assert ((y - x @ w.T).norm() / (x @ w.T).norm()) < 0.06
    assert torch.allclose(dequantize_activation(aq, as_), x, rtol=2 ** -4, atol=1e-2)


def test_promotion_flattens_the_accumulation_error():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 4096, generator=g).to(torch.float8_e4m3fn).double() for _ in range(2))
    exact = a @ b.T
    err = lambda c: ((c.double() - exact).norm() / exact.norm()).item()
    assert 0.01 < err(limited_accumulate(a, b)) < 0.03 and err(limited_accumulate(a, b, promote=128)) < 1e-3


def test_fp8_linear_gradients_and_conversion():
    torch.manual_seed(0)
    base = nn.Linear(256, 384)
    x, t = torch.randn(2, 32, 256), torch.randn(2, 32, 384)
    def grads(layer, dtype):
        xx = x.to(dtype).detach().requires_grad_(True)
        nn.functional.mse_loss(layer(xx), t.to(dtype)).backward()
        return [g.double() for g in (xx.grad, layer.weight.grad, layer.bias.grad)]
    ref, fp8 = grads(copy.deepcopy(base).double(), torch.float64), grads(FP8Linear.from_linear(base), torch.float32)
    for a, b in zip(fp8, ref):
        assert ((a - b).norm() / b.norm()) < 0.06
    from deepseek_mini import build_model, load_config
    model = build_model(load_config("toy"), seed=0)
    names = convert_to_fp8(model)
    assert names and not any(k in n for n in names for k in ("head", "embed", "gate"))
    assert type(model.head) is nn.Linear


def test_triton_kernels_equal_the_reference():
    kernels = pytest.importorskip("deepseek_mini.fp8.kernels")
    if not kernels.INTERPRET and not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = (torch.randn(3, 5, 300) * torch.logspace(-2, 2, 300)).to(dev)
    x[0, 0] = 0.0
    for fmt in (None, "ue8m0"):
        (q, s), (rq, rs) = kernels.act_quant(x, scale_fmt=fmt, rows=64), quantize_activation(x.cpu(), scale_fmt=fmt)
        assert torch.equal(s.cpu(), rs) and torch.equal(q.cpu().float(), rq.float())
    w = torch.randn(300, 200)
    (wq, ws), (rwq, rws) = kernels.weight_quant(w.to(dev)), quantize_weight(w)
    assert torch.equal(ws.cpu(), rws) and torch.equal(wq.cpu().float(), rwq.float())
    assert torch.equal(kernels.weight_dequant(wq, ws).cpu(), dequantize_weight(rwq, rws))
    for m, n, k, rows in [(33, 300, 200, False), (64, 128, 384, True)]:
        aq, as_ = quantize_activation(torch.randn(m, k))
        wq, ws = (quantize_activation if rows else quantize_weight)(torch.randn(n, k) / k ** 0.5)
        r = fp8_gemm(aq, as_, wq, ws)
        c = kernels.fp8_gemm(aq.to(dev), as_.to(dev), wq.to(dev), ws.to(dev)).cpu()
        # the interpreter sums in FP32 like the reference; a GPU's tensor cores keep ~14 bits within a K step
        assert ((c - r).abs().max() / r.abs().max()) < (1e-5 if kernels.INTERPRET else 1e-3)


def test_stored_fp8_weights_one_dequantiser_for_mla_and_checkpoints(tmp_path):
    """store_fp8_ keeps E4M3 codes + weight_scale_inv; MLA's absorbed path and save/from_pretrained dequantise
    them with the same dequantize_weight; decoding with the latent cache equals the full forward."""
    from deepseek_mini import build_model, from_pretrained, load_config, save_pretrained
    from deepseek_mini.fp8.linear import dense_weight
    torch.manual_seed(0)
    layer = FP8Linear.from_linear(nn.Linear(200, 300, bias=False)).store_fp8_()
    assert layer.weight.dtype == torch.float8_e4m3fn and not layer.weight.requires_grad
    assert layer.weight_scale_inv.shape == (3, 2)
    x = torch.randn(5, 200, requires_grad=True)
    y = layer(x)
    xq, xs = quantize_activation(x.detach())
    assert torch.allclose(y, fp8_gemm(xq, xs, layer.weight, layer.weight_scale_inv), rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert x.grad is not None and layer.weight.grad is None
    with pytest.raises(ValueError, match="store_fp8_"):
        layer.to(torch.bfloat16)(x.detach().bfloat16())

    config = load_config("toy")
    model = build_model(config, seed=0).eval()
    convert_to_fp8(model, store_fp8=True)
    attn = model.layers["0"].attn
    dense = dequantize_weight(attn.wkv_b.weight, attn.wkv_b.weight_scale_inv)
    assert torch.equal(dense_weight(attn.wkv_b), dense)
    w_uk, w_uv = attn.up_weights()
    assert torch.equal(torch.cat([w_uk, w_uv], 1).flatten(0, 1), dense)
    tokens = torch.randint(0, config.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2, 24)
        steps = torch.cat([model(tokens[:, :16], cache=cache, start_pos=0)] +
                          [model(tokens[:, t:t + 1], cache=cache, start_pos=t) for t in range(16, 24)], dim=1)
    assert torch.allclose(steps, full, atol=1e-4, rtol=1e-4)

    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)
    assert torch.equal(loaded.get_submodule("layers.0.attn.wkv_b").weight, dense)
    assert "weight_scale_inv" not in "".join(loaded.state_dict())
