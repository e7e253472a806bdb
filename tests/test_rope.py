"""RoPE: the frequencies, the rotation, and the property that makes it positional (scores
depend on n - m only), checked against DeepSeek's complex-number formulation."""

from __future__ import annotations

import math

import pytest
import torch

from deepseek_mini.rope import apply_rope, rope_cos_sin, rope_frequencies


def rope_complex(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """DeepSeek-V3 inference/model.py's apply_rotary_emb: consecutive channel pairs as complex
    numbers, multiplied by polar(1, m * theta_i). Independent of deepseek_mini.rope."""
    d = x.shape[-1]
    freqs = torch.tensor([theta ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    angles = positions.double()[:, None] * freqs[None, :]              # (T, d/2)
    cis = torch.polar(torch.ones_like(angles), angles)                 # e^{i m theta}
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    out = torch.view_as_real(xc * cis[None, :, None, :])
    return out.flatten(-2)


def tables(d: int, seq_len: int, theta: float = 10000.0, dtype=torch.float32):
    cos, sin = rope_cos_sin(rope_frequencies(d, theta), seq_len)
    return cos.to(dtype), sin.to(dtype)


@pytest.mark.parametrize("d,theta", [(8, 10000.0), (64, 10000.0), (16, 500.0)])
def test_frequencies_are_theta_to_the_minus_2i_over_d(d, theta):
    got = rope_frequencies(d, theta)
    expected = torch.tensor([theta ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float32)
    assert got.shape == (d // 2,)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert got[0].item() == 1.0
    assert torch.all(got[1:] < got[:-1])


def test_cos_sin_tables_are_cos_sin_of_m_theta():
    d, T = 8, 11
    inv = rope_frequencies(d)
    cos, sin = rope_cos_sin(inv, T)
    assert cos.shape == sin.shape == (T, d // 2)
    for m in (0, 1, 7, 10):
        for i in range(d // 2):
            angle = m * 10000.0 ** (-2 * i / d)
            assert cos[m, i].item() == pytest.approx(math.cos(angle), abs=1e-6)
            assert sin[m, i].item() == pytest.approx(math.sin(angle), abs=1e-6)


def test_equals_the_complex_interleaved_formulation():
    torch.manual_seed(0)
    B, T, H, d = 2, 9, 3, 16
    x = torch.randn(B, T, H, d)
    cos, sin = tables(d, T)
    got = apply_rope(x, cos, sin)
    expected = rope_complex(x, torch.arange(T)).float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_interleaved_not_half_split_layout():
    # Pair (x0, x1) rotates together: a vector with only channel 0 set stays within channels 0, 1.
    d, T = 8, 4
    x = torch.zeros(1, T, 1, d)
    x[..., 0] = 1.0
    cos, sin = tables(d, T)
    out = apply_rope(x, cos, sin)
    assert torch.all(out[..., 2:] == 0)
    torch.testing.assert_close(out[0, :, 0, 0], cos[:, 0])
    torch.testing.assert_close(out[0, :, 0, 1], sin[:, 0])


def test_preserves_norms_of_every_pair():
    torch.manual_seed(1)
    x = torch.randn(2, 12, 4, 32) * 3
    cos, sin = tables(32, 12)
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    pairs_in = x.reshape(2, 12, 4, 16, 2).norm(dim=-1)
    pairs_out = out.reshape(2, 12, 4, 16, 2).norm(dim=-1)
    torch.testing.assert_close(pairs_out, pairs_in, rtol=1e-5, atol=1e-5)


def test_position_zero_is_the_identity():
    torch.manual_seed(2)
    x = torch.randn(3, 1, 2, 16)
    cos, sin = tables(16, 1)
    assert torch.equal(apply_rope(x, cos, sin), x)


def test_scores_depend_only_on_relative_position():
    torch.manual_seed(3)
    d, L = 32, 200
    q = torch.randn(1, 1, 1, d, dtype=torch.float64)
    k = torch.randn(1, 1, 1, d, dtype=torch.float64)
    cos, sin = tables(d, L, dtype=torch.float64)

    def score(m: int, n: int) -> float:
        qm = apply_rope(q, cos[m:m + 1], sin[m:m + 1])
        kn = apply_rope(k, cos[n:n + 1], sin[n:n + 1])
        return float((qm * kn).sum())

    gen = torch.Generator().manual_seed(0)
    for offset in (0, 1, 5, 37):
        ref = score(0, offset)
        for m in torch.randint(0, L - offset, (6,), generator=gen).tolist():
            assert score(m, m + offset) == pytest.approx(ref, rel=1e-4, abs=1e-4)
    # ... and it does depend on the offset.
    assert abs(score(0, 1) - score(0, 37)) > 1e-3


def test_rows_of_the_tables_select_positions():
    # Rotating a chunk at positions 5..8 with table rows 5..8 equals slicing a full rotation.
    torch.manual_seed(4)
    x = torch.randn(2, 12, 2, 8)
    cos, sin = tables(8, 12)
    full = apply_rope(x, cos, sin)
    part = apply_rope(x[:, 5:9], cos[5:9], sin[5:9])
    torch.testing.assert_close(part, full[:, 5:9])


def test_per_row_positions_rotate_each_row_by_its_own_angles():
    # A ragged batch: row 0 at positions 0..3, row 1 at 7..10. (B, T, D/2) tables of gathered
    # rows must equal rotating each row alone with its own slice of the tables.
    torch.manual_seed(6)
    x = torch.randn(2, 4, 3, 8)
    cos, sin = tables(8, 16)
    positions = torch.tensor([[0, 1, 2, 3], [7, 8, 9, 10]])
    got = apply_rope(x, cos[positions], sin[positions])
    torch.testing.assert_close(got[0], apply_rope(x[:1], cos[0:4], sin[0:4])[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], apply_rope(x[1:], cos[7:11], sin[7:11])[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], rope_complex(x[1:], positions[1]).float()[0], rtol=1e-5, atol=1e-5)


def test_per_row_tables_must_match_the_batch():
    x = torch.randn(2, 4, 3, 8)
    cos, sin = tables(8, 4)
    with pytest.raises(ValueError, match=r"\(B, T, D/2\)"):
        apply_rope(x, cos.expand(3, 4, 4), sin.expand(3, 4, 4))


def test_keeps_the_input_dtype():
    x = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    cos, sin = tables(8, 4)
    out = apply_rope(x, cos, sin)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), rope_complex(x.float(), torch.arange(4)).float(),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("d", [0, -2, 7])
def test_frequencies_reject_odd_or_non_positive_head_dim(d):
    with pytest.raises(ValueError, match=rf"head_dim \({d}\)"):
        rope_frequencies(d)


def test_apply_rope_rejects_odd_head_dim():
    x = torch.randn(1, 4, 2, 7)
    cos, sin = tables(8, 4)
    with pytest.raises(ValueError, match="apply_rope"):
        apply_rope(x, cos[:, :3], sin[:, :3])


@pytest.mark.parametrize("cos_shape", [(5, 4), (4, 3), (4, 8)], ids=["wrong_T", "too_narrow", "too_wide"])
def test_apply_rope_rejects_mismatched_cos(cos_shape):
    x = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match=r"\(T, D/2\)"):
        apply_rope(x, torch.ones(cos_shape), torch.zeros(cos_shape))


@pytest.mark.parametrize("sin_shape", [(1, 4), (4, 1)], ids=["one_row", "one_column"])
def test_apply_rope_rejects_sin_of_another_shape_than_cos(sin_shape):
    # A sin table that merely broadcasts against x would rotate by wrong angles silently.
    x = torch.randn(1, 4, 2, 8)
    cos, sin = tables(8, 4)
    with pytest.raises(ValueError):
        apply_rope(x, cos, sin[:sin_shape[0], :sin_shape[1]])


def test_gradcheck_float64():
    torch.manual_seed(5)
    x = torch.randn(2, 3, 2, 6, dtype=torch.float64, requires_grad=True)
    freqs = torch.tensor([10000.0 ** (-2 * i / 6) for i in range(3)], dtype=torch.float64)
    angles = torch.arange(3, dtype=torch.float64)[:, None] * freqs     # exact float64 tables
    cos, sin = angles.cos(), angles.sin()
    # In float64 the rotation must be computed in float64 (no silent float32 round trip).
    torch.testing.assert_close(apply_rope(x, cos, sin), rope_complex(x.detach(), torch.arange(3)),
                               rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, cos, sin), (x,))
