"""The dtype policy: which tensors stay FP32 whatever dtype the model is cast to.

DeepSeek-V3 trains in FP8 and BF16 but keeps a few small tensors in FP32 because low
precision would break them (arXiv 2412.19437, §3.3.1 keeps "the gating module" and the
normalisation in their original precision): the router's balancing bias b_i moves by
gamma = 0.001 per step (§2.1.2), which BF16 rounds away near |b| = 0.5; a per-expert token
count stops being exact above 256 in BF16; chapter 05's FP8 scales are FP32 by design.

A module lists such buffers in ``fp32_buffers``. ``FP32Buffers._apply`` is the one place
every cast goes through (``.to(dtype)``, ``.half()``, ``.bfloat16()``, ``.double()``,
``.cuda()``, ``to_empty``), so a listed buffer follows the model's *device* but never its
dtype, and no code has to cast it back after ``model.to(torch.bfloat16)``: a cast back would
come too late, after BF16 had already rounded the values.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import nn

__all__ = ["FP32Buffers"]


class FP32Buffers(nn.Module):
    """A module whose buffers named in ``fp32_buffers`` stay float32 through every cast.

    Subclass it instead of ``nn.Module`` and name the buffers::

        class Gate(FP32Buffers):
            fp32_buffers = ("bias",)

    Parameters and other buffers are cast as usual.
    """

    fp32_buffers: ClassVar[tuple[str, ...]] = ()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> FP32Buffers:
        kept = {name: self._buffers[name] for name in self.fp32_buffers if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:          # a dtype cast: move the FP32 original instead
                self._buffers[name] = before.to(device=after.device)
        return self
