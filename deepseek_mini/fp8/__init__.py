"""Fine-grained FP8 training (chapter 05; DeepSeek-V3 §3.3, arXiv 2412.19437).

Written by hand; the modules inside are exported from ``notebooks/05_fp8.ipynb``:

* ``deepseek_mini.fp8.quant``: E4M3 quantisation in 1x128 tiles (activations) and 128x128 blocks
  (weights), the dequantisers and the blockwise GEMM with FP32 promotion, in plain torch (any CPU);
* ``deepseek_mini.fp8.accum``: a model of the limited-precision tensor-core accumulator (§3.3.2);
* ``deepseek_mini.fp8.kernels``: the same operations as Triton kernels (compiled on a GPU,
  ``TRITON_INTERPRET=1`` on a CPU);
* ``deepseek_mini.fp8.linear``: ``FP8Linear`` (Fprop, Dgrad and Wgrad in FP8) and ``convert_to_fp8``.

Names are imported lazily (PEP 562), so ``import deepseek_mini.fp8`` never imports Triton.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    **dict.fromkeys(["E4M3", "E4M3_MAX", "AMAX_FLOOR", "quantize_activation", "dequantize_activation",
                     "quantize_weight", "dequantize_weight", "fp8_gemm", "fp8_gemm_fast"], "deepseek_mini.fp8.quant"),
    **dict.fromkeys(["FP8Linear", "convert_to_fp8"], "deepseek_mini.fp8.linear"),
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'deepseek_mini.fp8' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
