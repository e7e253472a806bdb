"""Blockwise FP8 GEMM throughput: our Triton kernel against cuBLAS BF16 and ``torch._scaled_mm``.

What is measured (DeepSeek-V3 §3.3; chapter 05)
-----------------------------------------------
y = x W^T with x (M, K) in E4M3 with one scale per 1 x 128 tile and W (N, K) in E4M3 with one
scale per 128 x 128 block, FP32 promotion every 128 products along K, BF16 output. Shapes are
written M x N x K: M tokens, N output features, K input features (W is stored (N, K), as in
``nn.Linear`` and the checkpoint). Methods, all on the same inputs:

* ``triton``: ``deepseek_mini.fp8.kernels.fp8_gemm``, the persistent TMA kernel, autotuned;
* ``triton-ptr``: the same kernel body with pointer loads and one program per tile (tma=False);
* ``bf16``: cuBLAS through ``torch.matmul`` on the dequantised operands in BF16 (the baseline the
  paper's FP8 is measured against);
* ``scaled-mm``: ``torch._scaled_mm`` with the same 1 x 128 / 128 x 128 block scales (cuBLAS's
  blockwise FP8 path). Where the installed torch rejects block scales, the row-wise variant (one
  scale per row of x and per row of W) is timed instead and the table says so.

Each method's output is first checked against dequantise-then-FP32-matmul of its own operands
(relative Frobenius error, must be < 1e-2); then it is timed with ``triton.testing.do_bench``
(median, L2 flushed before each call) on CUDA, ``torch.utils.benchmark`` on a CPU. TFLOP/s =
2 M N K / time. The default shapes are 4096 x 7168 x 16384 (V3's attention output projection at
4096 tokens) and the other GEMMs of one DeepSeek-V3 layer at M = 4096 tokens. The first call of
each shape autotunes the Triton kernel (untimed).

On a CPU the kernels run under TRITON_INTERPRET=1 (NumPy): only the smoke path, tiny shapes.

Examples
--------
python benchmarks/fp8_gemm.py                                  # CUDA: all V3 shapes, all methods
python benchmarks/fp8_gemm.py --shapes wo 4096x4096x4096 --methods triton scaled-mm
python benchmarks/fp8_gemm.py --device cpu --shapes 64x128x256  # interpreter smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

BENCHMARKS = str(Path(__file__).resolve().parent)
if BENCHMARKS not in sys.path:                 # benchmarks/ is no package: make its sibling scripts importable
    sys.path.insert(0, BENCHMARKS)
from mla_decode import device_name, median_ms  # noqa: E402  (the same timing as the other benchmarks)

M_TOKENS = 4096
# name -> (N, K) of DeepSeek-V3's linears (config_671B.json; book/facts.md), y = x W^T with W (N, K).
V3_SHAPES = {
    "wo": (7168, 16384),         # attention output, 128 heads x v 128 -> hidden
    "wq_a": (1536, 7168),        # hidden -> q_lora_rank
    "wq_b": (24576, 1536),       # q_lora_rank -> 128 heads x (nope 128 + rope 64)
    "wkv_a": (576, 7168),        # hidden -> kv_lora_rank 512 + rope 64
    "wkv_b": (32768, 512),       # kv_lora_rank -> 128 heads x (nope 128 + v 128)
    "ffn_w13": (18432, 7168),    # dense FFN gate / up (first three layers)
    "ffn_w2": (7168, 18432),     # dense FFN down
    "expert_w13": (2048, 7168),  # one routed or shared expert, gate / up
    "expert_w2": (7168, 2048),   # expert down
}
METHODS = ["triton", "triton-ptr", "bf16", "scaled-mm"]
TOLERANCE = 1e-2


def parse_args(argv=None) -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(
        prog="fp8_gemm.py",
        description="TFLOP/s of the blockwise FP8 GEMM y = x W^T (1x128 activation tiles, 128x128 weight "
                    "blocks, BF16 output): our Triton kernel, cuBLAS BF16 and torch._scaled_mm, with ratios.",
        epilog=__doc__.split("Examples\n--------\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=None, metavar="SHAPE",
                        help=f"names of V3 GEMMs ({', '.join(V3_SHAPES)}; M = --tokens) or MxNxK. "
                             "Default on CUDA: all names; on a CPU: 64x128x256")
    parser.add_argument("--tokens", type=int, default=M_TOKENS, metavar="M",
                        help=f"M for the named shapes (default: {M_TOKENS})")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS,
                        help="what to time (default: all)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device,
                        help=f"where to run (default here: {default_device}); cpu runs Triton's interpreter")
    parser.add_argument("--min-run-time", type=float, default=0.5, metavar="SECONDS",
                        help="timed seconds per method and shape (default: 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random operands")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write settings and rows as JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch.cuda.is_available() is False")
    if args.shapes is None:
        args.shapes = list(V3_SHAPES) if args.device == "cuda" else ["64x128x256"]
    try:
        args.dims = [shape_dims(s, args.tokens) for s in args.shapes]
    except ValueError as exc:
        parser.error(str(exc))
    if args.tokens < 1 or not args.min_run_time > 0:
        parser.error("--tokens must be >= 1 and --min-run-time > 0")
    return args


def shape_dims(shape: str, tokens: int) -> tuple[int, int, int]:
    """'wo' -> (tokens, 7168, 16384); '64x128x256' -> (64, 128, 256)."""
    if shape in V3_SHAPES:
        return (tokens, *V3_SHAPES[shape])
    parts = shape.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"shape {shape!r} is neither a V3 GEMM name ({', '.join(V3_SHAPES)}) nor MxNxK")
    return tuple(int(p) for p in parts)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def scaled_mm_call(x: torch.Tensor, w: torch.Tensor, quant) -> tuple[str, object, torch.Tensor, torch.Tensor]:
    """(label, fn, output, reference) for torch._scaled_mm: blockwise scales if this torch takes them, else row-wise.

    Blockwise layout (torch's checks for 1x128 x 128x128): a (M, K) row-major with scales (M, K/128)
    stored column-major; b = W^T (K, N) column-major with scales (K/128, N/128) = W's block scales
    transposed (a view)."""
    aq, a_s = quant.quantize_activation(x)
    wq, w_s = quant.quantize_weight(w)
    fn = lambda: torch._scaled_mm(aq, wq.t(), scale_a=a_s.t().contiguous().t(), scale_b=w_s.t(),
                                  out_dtype=torch.bfloat16)
    try:
        y = fn()
        ref = quant.fp8_gemm_fast(aq, a_s, wq, w_s)
        return "blockwise", fn, y, ref
    except (RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0][:80]
    # row-wise fallback: one scale per row of x over all of K, one per row of W
    sa = x.abs().amax(1, keepdim=True).clamp(min=1e-12) / 448.0
    sw = w.abs().amax(1, keepdim=True).clamp(min=1e-12) / 448.0
    aq, wq = (x / sa).to(torch.float8_e4m3fn), (w / sw).to(torch.float8_e4m3fn)
    fn = lambda: torch._scaled_mm(aq, wq.t(), scale_a=sa, scale_b=sw.t(), out_dtype=torch.bfloat16)
    ref = (aq.float() * sa) @ (wq.float() * sw).T
    return f"row-wise (blockwise refused: {reason})", fn, fn(), ref


def run_shape(m: int, n: int, k: int, args, device: torch.device, kernels, quant) -> dict:
    g = torch.Generator(device).manual_seed(args.seed)
    x = torch.randn(m, k, device=device, generator=g)
    w = torch.randn(n, k, device=device, generator=g) / math.sqrt(k)
    aq, a_s = kernels.act_quant(x)
    wq, w_s = kernels.weight_quant(w)
    ref = quant.fp8_gemm_fast(aq, a_s, wq, w_s)              # dequantise, one FP32 matmul
    calls = {
        "triton": lambda: kernels.fp8_gemm(aq, a_s, wq, w_s, out_dtype=torch.bfloat16),
        "triton-ptr": lambda: kernels.fp8_gemm(aq, a_s, wq, w_s, out_dtype=torch.bfloat16, tma=False),
    }
    row = {"m": m, "n": n, "k": k}
    for method in args.methods:
        try:
            if method in calls:
                fn, y, r = calls[method], calls[method](), ref
                tuned = kernels._fp8_gemm_tma_tuned if method == "triton" else kernels._fp8_gemm_tuned
                best = getattr(tuned, "best_config", None)
                if best is not None:
                    kw = best.kwargs
                    row[f"{method}_config"] = (f"{kw['BLOCK_M']}x{kw['BLOCK_N']} s{best.num_stages} "
                                               f"w{best.num_warps}")
            elif method == "bf16":
                xb = quant.dequantize_activation(aq, a_s, dtype=torch.bfloat16)
                wb = quant.dequantize_weight(wq, w_s, dtype=torch.bfloat16)
                fn = lambda: xb @ wb.T
                y, r = fn(), xb.float() @ wb.float().T
            else:
                row["scaled_mm_scales"], fn, y, r = scaled_mm_call(x, w, quant)
            row[f"{method}_err"] = err = rel_err(y, r)
            if not err < TOLERANCE:
                raise RuntimeError(f"output differs from its reference: relative error {err:.2e}")
            ms = median_ms(fn, device, args.min_run_time)
            row[f"{method}_tflops"] = 2 * m * n * k / (ms * 1e-3) / 1e12
        except Exception as exc:                    # one failing method must not hide the others
            row[f"{method}_error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120]}"
    return row


def main(argv=None) -> list[dict]:
    """Print the table; return its rows (shape, TFLOP/s and error per method, chosen tiles)."""
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")     # before the kernels module is imported
    import triton

    from deepseek_mini.fp8 import kernels, quant

    device = torch.device(args.device)
    print(f"device: {device_name(device)}; torch {torch.__version__}; triton {triton.__version__}"
          f"{' (interpreter)' if kernels.INTERPRET else ''}")
    print("y = x W^T, M x N x K = tokens x out x in; x 1x128 tiles, W 128x128 blocks, BF16 output; "
          f"median of do_bench over {args.min_run_time:g} s (L2 flushed)" if device.type == "cuda" else
          "y = x W^T, M x N x K = tokens x out x in; torch.utils.benchmark")
    names = {"triton": "triton", "triton-ptr": "tri-ptr", "bf16": "bf16", "scaled-mm": "_scaled_mm"}
    header = (f"{'shape':>10} {'M x N x K':>19} | " + " ".join(f"{names[m]:>10}" for m in args.methods)
              + " | TFLOP/s" + ("; triton / bf16, / _scaled_mm" if {"triton", "bf16", "scaled-mm"} <= set(args.methods)
                                else ""))
    print(header)
    print("-" * len(header))
    rows = []
    for shape, (m, n, k) in zip(args.shapes, args.dims):
        row = run_shape(m, n, k, args, device, kernels, quant)
        row["shape"] = shape
        rows.append(row)
        cells = [f"{row[f'{x}_tflops']:10.1f}" if f"{x}_tflops" in row else f"{'failed':>10}" for x in args.methods]
        ratio = ""
        if all(f"{x}_tflops" in row for x in ("triton", "bf16", "scaled-mm")):
            ratio = (f" | {row['triton_tflops'] / row['bf16_tflops']:.2f}x, "
                     f"{row['triton_tflops'] / row['scaled-mm_tflops']:.2f}x")
        print(f"{shape:>10} {f'{m}x{n}x{k}':>19} | " + " ".join(cells) + ratio, flush=True)
    print()
    for row in rows:
        notes = [f"{key[:-7]} {row[key]}" for key in row if key.endswith("_config")]
        notes += [f"{key[:-6]} FAILED {row[key]}" for key in row if key.endswith("_error")]
        notes += [f"rel. err {', '.join(f'{key[:-4]} {row[key]:.1e}' for key in row if key.endswith('_err'))}"]
        if "scaled_mm_scales" in row:
            notes.append(f"_scaled_mm scales {row['scaled_mm_scales']}")
        print(f"{row['shape']}: " + "; ".join(notes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": {k: v for k, v in vars(args).items() if k != "dims"}, "device": device_name(device),
                       "torch": torch.__version__, "triton": triton.__version__, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
