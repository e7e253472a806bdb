"""The dtype policy: buffers a module names in ``fp32_buffers`` follow the model's device and
never its dtype, through every cast torch offers, without being rounded on the way."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepseek_mini.precision import FP32Buffers


class Scaled(FP32Buffers):
    fp32_buffers = ("scale",)

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))
        self.register_buffer("scale", torch.full((3,), 1 + 2 ** -12))     # not representable in bf16/fp16
        self.register_buffer("other", torch.ones(3))
        self.inner = nn.Linear(3, 3)


CASTS = {
    "to_bf16": lambda m: m.to(torch.bfloat16),
    "half": lambda m: m.half(),
    "double": lambda m: m.double(),
    "to_device_dtype": lambda m: m.to("cpu", torch.bfloat16),
    "type": lambda m: m.type(torch.float16),
}


@pytest.mark.parametrize("cast", CASTS.values(), ids=CASTS.keys())
def test_listed_buffers_keep_float32_and_their_values(cast):
    m = cast(Scaled())
    assert m.scale.dtype == torch.float32 and torch.equal(m.scale, torch.full((3,), 1 + 2 ** -12))
    assert m.weight.dtype == m.other.dtype == m.inner.weight.dtype != torch.float32   # the rest is cast


def test_listed_buffers_follow_the_device():
    with torch.device("meta"):
        m = Scaled().to(torch.bfloat16)
    assert m.scale.is_meta and m.scale.dtype == torch.float32
    m = m.to_empty(device="cpu")                    # what build_model does after a meta construction
    assert m.scale.device.type == "cpu" and m.scale.dtype == torch.float32 and m.weight.dtype == torch.bfloat16


def test_nested_modules_apply_their_own_policy():
    outer = nn.Sequential(Scaled(), nn.Linear(3, 3)).to(torch.float16)
    assert outer[0].scale.dtype == torch.float32 and outer[1].weight.dtype == torch.float16


def test_a_module_without_the_buffer_is_fine():
    class Maybe(FP32Buffers):
        fp32_buffers = ("scale",)

    m = Maybe()
    m.register_buffer("scale", None)
    assert m.to(torch.bfloat16).scale is None
