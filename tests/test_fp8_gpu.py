"""The FP8 Triton kernels compiled on a GPU (chapter 05, issue #12), against the torch reference.

CI has no GPU: every test here skips there (tests/test_fp8_quant.py runs the same kernels under
TRITON_INTERPRET=1). On a CUDA machine: ``pytest tests/test_fp8_gpu.py``.

Tolerances, and why:
* the quantisers are bit-exact: the kernel divides with IEEE rounding like torch, and the GPU's
  saturating round-to-nearest-even cast to E4M3 equals torch's cast;
* the GEMM adds the same FP32-promoted partial sums as ``quant.fp8_gemm`` but each 128-long partial
  dot runs on the tensor cores, whose FP8 accumulator keeps about 14 bits (DeepSeek-V3 §3.3.2):
  about 1e-4 relative per step, so the relative Frobenius error must stay < 1e-3 (measured ~3e-5);
* FP8Linear's CUDA path (Triton) and CPU path (torch reference) differ by that GEMM rounding, which
  can flip an E4M3 rounding in the next quantisation: gradients within 1e-2 relative.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepseek_mini.fp8.linear import FP8Linear
from deepseek_mini.fp8.quant import (dequantize_weight, fp8_gemm, quantize_activation, quantize_weight)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")

CUDA = "cuda"


@pytest.fixture(scope="module")
def kernels():
    from deepseek_mini.fp8 import kernels
    if kernels.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 is set: these tests are for compiled kernels")
    return kernels


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [None, "ue8m0"])
def test_act_quant_is_bit_exact(kernels, dtype, fmt):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 3, 300, generator=g) * torch.logspace(-3, 3, 300)).to(dtype)   # ragged K, wide range
    x[0, 0] = 0.0                                                   # all-zero tiles
    x[1, 1, 5] = 1e4                                                # an outlier
    q, s = kernels.act_quant(x.to(CUDA), scale_fmt=fmt)
    rq, rs = quantize_activation(x, scale_fmt=fmt)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.shape == rs.shape
    assert torch.equal(s.cpu(), rs)
    assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8))


@pytest.mark.parametrize("fmt", [None, "ue8m0"])
def test_weight_quant_and_dequant_are_bit_exact(kernels, fmt):
    w = torch.randn(300, 456, generator=torch.Generator().manual_seed(1)) * 3
    q, s = kernels.weight_quant(w.to(CUDA), scale_fmt=fmt)
    rq, rs = quantize_weight(w, scale_fmt=fmt)
    assert s.shape == (3, 4) and torch.equal(s.cpu(), rs)
    assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8))
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(kernels.weight_dequant(q, s, dtype=dtype).cpu(), dequantize_weight(rq, rs, dtype=dtype))


GEMM_SHAPES = [  # (M, N, K, row scales on w)
    (1, 64, 128, False),          # a single token
    (33, 300, 200, False),        # ragged everything, K % 16 != 0: pointer kernel
    (100, 192, 256, False),       # ragged M and N, TMA kernel
    (257, 576, 512, False),       # V3's wkv_a width (N = 576 = 4.5 blocks)
    (128, 384, 1024, True),       # Wgrad: row scales on both sides
    (200, 384, 200, True),        # Wgrad over 200 tokens: row scales, ragged K
]


def gemm_case(m: int, n: int, k: int, rows: bool):
    g = torch.Generator().manual_seed(m + n + k)
    aq, a_s = quantize_activation(torch.randn(m, k, generator=g))
    wq, w_s = (quantize_activation if rows else quantize_weight)(torch.randn(n, k, generator=g) / k ** 0.5)
    return [t.to(CUDA) for t in (aq, a_s, wq, w_s)], fp8_gemm(aq, a_s, wq, w_s)


@pytest.mark.parametrize("m,n,k,rows", GEMM_SHAPES)
@pytest.mark.parametrize("tma", [None, False])
def test_fp8_gemm_matches_the_reference(kernels, m, n, k, rows, tma):
    """One pinned tile (compiling every autotuner config for every case would take minutes)."""
    args, ref = gemm_case(m, n, k, rows)
    y = kernels.fp8_gemm(*args, BLOCK_M=64, BLOCK_N=128, tma=tma)
    assert y.dtype == torch.float32 and y.shape == (m, n) and torch.isfinite(y).all()
    assert rel(y, ref) < 1e-3
    yb = kernels.fp8_gemm(*args, out_dtype=torch.bfloat16, BLOCK_M=64, BLOCK_N=128, tma=tma)
    assert yb.dtype == torch.bfloat16 and rel(yb, ref) < 1e-2


@pytest.mark.parametrize("tma", [None, False])
def test_autotuned_fp8_gemm_matches_the_reference(kernels, tma):
    args, ref = gemm_case(512, 1536, 7168, False)          # V3's wq_a at 512 tokens
    assert kernels.AUTOTUNE and rel(kernels.fp8_gemm(*args, tma=tma), ref) < 1e-3
    tuned = kernels._fp8_gemm_tma_tuned if tma is None else kernels._fp8_gemm_tuned
    assert tuned.best_config.kwargs["BLOCK_M"] in (64, 128)   # the search ran


@pytest.fixture
def fixed_tiles(kernels, monkeypatch):
    """FP8Linear and training call fp8_gemm without a tile: use one fixed tile, not minutes of autotuning."""
    monkeypatch.setattr(kernels, "AUTOTUNE", False)


def test_fp8_gemm_picks_tma_only_where_rows_are_aligned(kernels):
    aq, a_s = quantize_activation(torch.randn(16, 200))
    wq, w_s = quantize_weight(torch.randn(64, 200))
    with pytest.raises(ValueError, match="tma=True needs"):
        kernels.fp8_gemm(aq.to(CUDA), a_s.to(CUDA), wq.to(CUDA), w_s.to(CUDA), tma=True)   # K = 200: not 16-byte rows
    with pytest.raises(ValueError, match="w_scale must be"):
        kernels.fp8_gemm(aq.to(CUDA), a_s.to(CUDA), wq.to(CUDA), w_s[:, :1].to(CUDA))


def linear_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    cpu = FP8Linear.from_linear(nn.Linear(256, 384))
    gpu = FP8Linear.from_linear(nn.Linear(256, 384)).to(CUDA)
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


@pytest.mark.parametrize("autocast,x_dtype", [(False, torch.float32), (True, torch.float32), (True, torch.bfloat16)])
def test_fp8_linear_on_cuda_matches_the_cpu_reference(fixed_tiles, autocast, x_dtype):
    """CUDA (Triton) vs CPU (reference): forward and both gradients. Under the training loop's bf16
    autocast an FP8Linear stays FP8 (autocast does not touch its custom function) and returns its
    input's dtype; its input is bf16 when the layer before it was an autocast matmul."""
    cpu, gpu = linear_pair()
    x = torch.randn(4, 50, 256, generator=torch.Generator().manual_seed(2)).to(x_dtype)
    # the gradient reaches the layer in its output's dtype: round the reference's the same way
    dy = torch.randn(4, 50, 384, generator=torch.Generator().manual_seed(3)).to(x_dtype).float()
    xc, xg = x.float().clone().requires_grad_(), x.to(CUDA).requires_grad_()      # two leaves
    yc = cpu(xc)
    yc.backward(dy)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        yg = gpu(xg)
        yg.float().backward(dy.to(CUDA))
    assert yg.dtype == x_dtype and xg.grad.dtype == x_dtype
    assert rel(yg, yc) < (1e-3 if x_dtype == torch.float32 else 1e-2)
    assert rel(xg.grad, xc.grad) < 1e-2
    assert gpu.weight.grad.dtype == torch.float32 and rel(gpu.weight.grad, cpu.weight.grad) < 1e-2
    assert rel(gpu.bias.grad, cpu.bias.grad) < 1e-5


def test_fp8_training_runs_three_steps_on_cuda(fixed_tiles):
    from deepseek_mini import load_config
    from deepseek_mini.data import make_datasets
    from deepseek_mini.train import FP8Training, TrainConfig, default_hooks, train

    config = load_config("toy", num_hidden_layers=2)
    cfg = TrainConfig(steps=3, batch_size=4, seq_len=64, warmup_steps=1, eval_every=3, eval_batches=1, seed=0,
                      device=CUDA, progress=False)
    fp8 = FP8Training()
    result = train(config, cfg, data=make_datasets("synthetic", n_docs=200, seed=0),
                   hooks=[*default_hooks(cfg), fp8])
    layers = [m for m in result.model.modules() if isinstance(m, FP8Linear)]
    assert len(layers) == len(fp8.converted) > 0 and all(m.weight.is_cuda for m in layers)
    losses = result.history["train_loss"]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert all(m.weight.dtype == torch.float32 for m in layers)            # FP32 master weights under autocast
