"""Chapter 05's exercise checks: they pass correct answers, name each planted mistake, and turn a
broken function (an exception, a wrong type or shape, NaN) into a failed check, never a crash."""

from __future__ import annotations

import re

import pytest
import torch

from deepseek_mini import checks
from deepseek_mini.checks import CheckFailure
from deepseek_mini.fp8.accum import limited_accumulate
from deepseek_mini.fp8.quant import fp8_gemm, fp8_gemm_fast, quantize_activation

CHECKS = [checks.check_quantize_tiles, checks.check_quantize_blocks, checks.check_blockwise_gemm, checks.check_promoted_gemm]
E4M3 = torch.float8_e4m3fn


def _failure(check, fn) -> str:
    with pytest.raises(CheckFailure) as info:
        check(fn)
    return str(info.value)


# ----------------------------------------------------------------- correct answers, written the ways learners do


def _tiles(x):
    tiles = x.float().view(*x.shape[:-1], -1, 128)
    scale = tiles.abs().amax(-1).clamp(min=1e-12) / 448
    return (tiles / scale[..., None]).to(E4M3).view(x.shape), scale


def _loop_tiles(x):
    """Exercise 1 one tile at a time."""
    q = torch.empty(x.shape, dtype=E4M3)
    scale = torch.empty(x.shape[0], x.shape[1] // 128)
    for i in range(x.shape[0]):
        for j in range(x.shape[1] // 128):
            tile = x[i, j * 128:(j + 1) * 128]
            s = max(float(tile.abs().max()), 1e-12) / 448.0
            scale[i, j] = s
            q[i, j * 128:(j + 1) * 128] = (tile / scale[i, j]).to(E4M3)
    return q, scale


def _loop_gemm(a_q, a_scale, w_q, w_scale):
    """Exercise 2 as the paper's K loop with the weight scale per output row."""
    y = torch.zeros(a_q.shape[0], w_q.shape[0])
    rows = w_scale.repeat_interleave(128, 0)                     # (N, K/128)
    for i in range(a_q.shape[1] // 128):
        ks = slice(i * 128, (i + 1) * 128)
        y += (a_q[:, ks].float() @ w_q[:, ks].float().T) * a_scale[:, i, None] * rows[None, :, i]
    return y


def _promoted(a, b, accumulate, n_c):
    total = torch.zeros(a.shape[0], b.shape[0])
    for start in range(0, a.shape[1], n_c):
        total += accumulate(a[:, start:start + n_c], b[:, start:start + n_c])
    return total


def test_checks_pass_correct_answers_and_say_so(capsys):
    checks.check_quantize_tiles(quantize_activation)
    checks.check_quantize_tiles(_tiles)
    checks.check_quantize_tiles(_loop_tiles)
    checks.check_blockwise_gemm(fp8_gemm)
    checks.check_blockwise_gemm(fp8_gemm_fast)
    checks.check_blockwise_gemm(_loop_gemm)
    checks.check_promoted_gemm(_promoted)
    checks.check_promoted_gemm(lambda a, b, acc, n_c: limited_accumulate(a, b, promote=n_c)
                               if n_c == 128 and a.shape[1] % 128 == 0 else _promoted(a, b, acc, n_c))
    out = capsys.readouterr().out
    assert out.count("✓") == 8 and out.count("\n") == 8


def _raises(*args):
    raise IndexError("index 9 is out of bounds for dimension 1 with size 5")


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("broken", [_raises, lambda *args: None, lambda *args: "tokens",
                                    lambda *args: torch.zeros(3), lambda *args: (torch.zeros(3), torch.zeros(3)),
                                    lambda *args: [float("nan")], lambda *args: (1, 2, 3),
                                    lambda *args: torch.full((4, 256), float("nan")),
                                    lambda x, *args: (torch.full(x.shape, float("nan")).to(E4M3),
                                                      torch.full((x.shape[0], x.shape[1] // 128), float("nan")))],
                         ids=["raises", "None", "str", "tensor", "pair", "nan-list", "triple", "nan", "nan-pair"])
def test_a_broken_function_fails_the_check_without_crashing_it(check, broken):
    message = _failure(check, broken)       # a CheckFailure, never another exception from inside the check
    assert message.startswith(check.__name__.removeprefix("check_") + ": ")


def test_an_exception_names_the_input_it_was_raised_on():
    message = _failure(checks.check_blockwise_gemm, _raises)
    assert "raised IndexError on x (4, 256), W (256, 256)" in message
    assert "index 9 is out of bounds" in message


# ----------------------------------------------------------------- 05.1 tile quantization


def _tiles_wrong(mistake):
    def fn(x):
        x = x.float()
        m, k = x.shape
        if mistake == "tensor":
            scale = x.abs().amax().clamp(min=1e-12) / 448
            return (x / scale).to(E4M3), scale
        if mistake == "row":
            scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448
            return (x / scale).to(E4M3), scale
        if mistake == "column":
            amax = x.abs().view(m // 128, 128, k).amax(1) if m % 128 == 0 else x.abs().view(m, -1, 128).amax(-1)
            full = amax.repeat_interleave(128, 0) if m % 128 == 0 else amax.repeat_interleave(128, -1)
            scale = amax.clamp(min=1e-12) / 448
            return (x / (full.clamp(min=1e-12) / 448)).to(E4M3), scale
        tiles = x.view(m, -1, 128)
        amax = tiles.abs().amax(-1)
        divisor = {"127": 127.0, "240": 240.0}.get(mistake, 448.0)
        scale = (amax if mistake == "no_floor" else amax.clamp(min=1e-12)) / divisor
        if mistake == "multiply":
            return (tiles * scale[..., None]).to(E4M3).view(m, k), scale
        q = (tiles / scale[..., None]).view(m, k)
        if mistake == "no_cast":
            return q, scale
        if mistake == "bf16_scale":
            return q.to(E4M3), scale.bfloat16()
        return q.to(E4M3), scale
    return fn


@pytest.mark.parametrize("mistake,message", [
    ("tensor", "per-tensor scaling"),
    ("row", "one scale per row"),
    ("column", "tiles run along the wrong dimension"),
    ("127", "not 127 \\(that is INT8\\)"),
    ("240", "fnuz"),
    ("multiply", "q = x / scale, not x \\* scale"),
    ("no_floor", "floor the max at 1e-12"),
    ("no_cast", "float8_e4m3fn"),
    ("bf16_scale", "dtype torch.bfloat16, expected torch.float32"),
])
def test_quantize_tiles_mistakes_are_named(mistake, message):
    text = _failure(checks.check_quantize_tiles, _tiles_wrong(mistake))
    assert re.search(message, text), text


# ----------------------------------------------------------------- 05.3 the blockwise GEMM


def _gemm_wrong(mistake):
    def fn(a_q, a_scale, w_q, w_scale):
        a = a_q.float() * a_scale.repeat_interleave(128, 1)
        ws = w_scale.T if mistake == "w_scale_t" else w_scale
        rows = ws.repeat(128, 1) if mistake == "tiled" else ws.repeat_interleave(128, 0)
        w = w_q.float() * rows.repeat_interleave(128, 1)
        if mistake == "only_a":
            w = w_q.float()
        if mistake == "only_w":
            a = a_q.float()
        if mistake == "w_not_t":
            return a @ w
        if mistake == "bf16":
            return (a.bfloat16() @ w.bfloat16().T).float()
        if mistake == "bf16_out":
            return a.bfloat16() @ w.bfloat16().T
        if mistake == "scale_once":            # the scales' product applied once, after summing over K
            return (a_q.float() @ w_q.float().T) * a_scale[:, :1] * w_scale[:, 0].repeat_interleave(128)[None]
        return a @ w.T
    return fn


@pytest.mark.parametrize("mistake,message", [
    ("only_a", "apply the weight scales too"),
    ("only_w", "apply the activation scales too"),
    ("tiled", "n // 128 \\(repeat_interleave\\)"),
    ("w_scale_t", "not transposed"),
    ("w_not_t", "multiply by its transpose"),
    ("bf16", "accumulate in float32, not bfloat16"),
    ("bf16_out", "returned torch.bfloat16"),
    ("scale_once", "for each K step i of 128"),
])
def test_blockwise_gemm_mistakes_are_named(mistake, message):
    text = _failure(checks.check_blockwise_gemm, _gemm_wrong(mistake))
    assert re.search(message, text), text


# ----------------------------------------------------------------- 05.4 promotion


def _promoted_wrong(mistake):
    def fn(a, b, accumulate, n_c):
        k = a.shape[1]
        if mistake == "every":
            return _promoted(a, b, accumulate, 1)
        if mistake == "never":
            return accumulate(a, b).float()
        if mistake == "exact":
            return a @ b.T
        if mistake == "drop_tail":
            return _promoted(a[:, :k // n_c * n_c], b[:, :k // n_c * n_c], accumulate, n_c)
        if mistake == "plus_one":
            return _promoted(a, b, accumulate, n_c + 1)
        if mistake == "minus_one":
            total = torch.zeros(a.shape[0], b.shape[0])
            for start in range(0, k, n_c):
                total += accumulate(a[:, start:start + n_c - 1], b[:, start:start + n_c - 1])
            return total
        if mistake == "double":
            return _promoted(a, b, accumulate, n_c).double()
        raise AssertionError(mistake)
    return fn


@pytest.mark.parametrize("mistake,message", [
    ("every", "promoted after every product"),
    ("never", "you never promoted"),
    ("exact", "without `accumulate`"),
    ("drop_tail", "the last, shorter chunk is missing"),
    ("plus_one", "off by one"),
    ("minus_one", "for start in range\\(0, K, n_c\\)"),
    ("double", "dtype torch.float64, expected torch.float32"),
])
def test_promoted_gemm_mistakes_are_named(mistake, message):
    text = _failure(checks.check_promoted_gemm, _promoted_wrong(mistake))
    assert re.search(message, text), text


def test_promotion_shrinks_the_error_as_the_paper_says():
    """The check's property case: about 2-3% at K = 4096 without promotion, several times less with N_C = 128."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 4096, generator=g), torch.randn(4, 4096, generator=g)
    exact = a.double() @ b.double().T
    plain = (limited_accumulate(a, b).double() - exact).norm() / exact.norm()
    promoted = (_promoted(a, b, limited_accumulate, 128).double() - exact).norm() / exact.norm()
    assert 0.005 < plain < 0.06 and promoted < plain / 5


# ----------------------------------------------------------------- 05.2 weight blocks


def _blocks(w):
    n, k = w.shape
    blocks = w.float().view(n // 128, 128, k // 128, 128)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448
    return (blocks / scale[:, None, :, None]).to(E4M3).view(n, k), scale


def _blocks_wrong(mistake):
    def fn(w):
        w = w.float()
        n, k = w.shape
        if mistake == "tiles":
            return _tiles(w)
        if mistake == "tensor":
            s = w.abs().amax() / 448
            return (w / s).to(E4M3), s
        if mistake == "row":
            s = w.abs().amax(-1, keepdim=True) / 448
            return (w / s).to(E4M3), s
        q, s = _blocks(w)
        if mistake == "transposed":
            return q, s.T.contiguous()
        if mistake == "127":
            return (w / (s * 448 / 127).repeat_interleave(128, 0).repeat_interleave(128, 1)).to(E4M3), s * 448 / 127
        if mistake == "multiply":
            return (w * s.repeat_interleave(128, 0).repeat_interleave(128, 1)).to(E4M3), s
        if mistake == "no_cast":
            return q.float(), s
        raise AssertionError(mistake)
    return fn


def test_quantize_blocks_passes_the_reference_and_a_hand_version(capsys):
    from deepseek_mini.fp8.quant import quantize_weight
    checks.check_quantize_blocks(quantize_weight)
    checks.check_quantize_blocks(_blocks)
    assert capsys.readouterr().out.count("✓") == 2


@pytest.mark.parametrize("mistake,message", [
    ("tiles", "those are 1x128 activation tiles"),
    ("tensor", "one scale for the whole tensor"),
    ("row", "one scale per row"),
    ("transposed", "not transposed"),
    ("127", "not 127 \\(INT8\\)"),
    ("multiply", "W / scale, not W \\* scale"),
    ("no_cast", "float8_e4m3fn"),
])
def test_quantize_blocks_mistakes_are_named(mistake, message):
    text = _failure(checks.check_quantize_blocks, _blocks_wrong(mistake))
    assert re.search(message, text), text
