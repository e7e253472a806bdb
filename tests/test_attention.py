"""Causal attention (MHA, GQA, MQA) against a hand-built reference, causality, and the KV cache."""

from __future__ import annotations

import math

import pytest
import torch

from deepseek_mini.attention import (Attention, KVCache, attention_reference, cache_mask, causal_mask,
                                     ragged_causal_mask)
from deepseek_mini.rope import rope_cos_sin, rope_frequencies


def rope_complex(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE as complex multiplication (independent of deepseek_mini.rope)."""
    d = x.shape[-1]
    freqs = torch.tensor([10000.0 ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    cis = torch.polar(torch.ones(len(positions), d // 2, dtype=torch.float64),
                      positions.double()[:, None] * freqs)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(xc * cis[None, :, None, :]).flatten(-2)


def attention_by_hand(attn: Attention, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal) v in float64 from the module's weights, kv heads repeated."""
    B, T, _ = x.shape
    H, G, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    x = x.double()

    def proj(lin, heads):
        y = x @ lin.weight.double().T + (0 if lin.bias is None else lin.bias.double())
        return y.reshape(B, T, heads, D)

    pos = torch.arange(start_pos, start_pos + T)
    q, k, v = rope_complex(proj(attn.wq, H), pos), rope_complex(proj(attn.wk, G), pos), proj(attn.wv, G)
    out = torch.empty(B, T, H, D, dtype=torch.float64)
    for h in range(H):
        g = h // (H // G)                       # query head h reads kv head h // group
        scores = torch.einsum("bqd,bkd->bqk", q[:, :, h], k[:, :, g]) / math.sqrt(D)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        out[:, :, h] = scores.softmax(-1) @ v[:, :, g]
    return out.reshape(B, T, H * D) @ attn.wo.weight.double().T + (
        0 if attn.wo.bias is None else attn.wo.bias.double())


def rope_for(head_dim: int, seq_len: int, start: int = 0, dtype=torch.float32):
    cos, sin = rope_cos_sin(rope_frequencies(head_dim), start + seq_len)
    return cos[start:].to(dtype), sin[start:].to(dtype)


def test_causal_mask_values():
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    got = causal_mask(4, 4)
    assert got.dtype == torch.bool and torch.equal(got, expected)


def test_causal_mask_with_q_offset():
    # Two queries at positions 3 and 4 over 5 cached keys.
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(2, 5, q_offset=3), expected)
    # A single decode query sees every key up to its own position.
    assert torch.equal(causal_mask(1, 6, q_offset=5), torch.ones(1, 6, dtype=torch.bool))
    assert torch.equal(causal_mask(1, 6, q_offset=2), torch.tensor([[1, 1, 1, 0, 0, 0]], dtype=torch.bool))


def test_attention_reference_equals_explicit_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    mask = causal_mask(3, 5, q_offset=2)
    out = attention_reference(q, k, v, mask, scale=0.5)
    for h in range(2):
        for i in range(3):
            visible = [j for j in range(5) if j <= i + 2]
            s = torch.tensor([0.5 * float(q[0, h, i] @ k[0, h, j]) for j in visible])
            w = s.exp() / s.exp().sum()
            expected = sum(w[n] * v[0, h, j] for n, j in enumerate(visible))
            torch.testing.assert_close(out[0, h, i], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_kv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("bias", [False, True])
def test_attention_matches_hand_reference(n_kv, bias):
    torch.manual_seed(1)
    d, T = 32, 7
    attn = Attention(d, 4, n_kv, bias=bias)
    if bias:
        with torch.no_grad():
            for lin in (attn.wq, attn.wk, attn.wv, attn.wo):
                lin.bias.normal_()
    x = torch.randn(2, T, d)
    got = attn(x, rope_for(8, T))
    torch.testing.assert_close(got, attention_by_hand(attn, x).float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_kv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_fused_path_matches_attention_reference_on_module_tensors(n_kv):
    # attention_reference (the notebook's written-out formula) fed the module's own q, k, v.
    torch.manual_seed(2)
    d, T, H = 32, 6, 4
    attn = Attention(d, H, n_kv)
    x = torch.randn(2, T, d)
    pos = torch.arange(T)
    D = d // H
    q = rope_complex((x @ attn.wq.weight.T).reshape(2, T, H, D), pos).float().transpose(1, 2)
    k = rope_complex((x @ attn.wk.weight.T).reshape(2, T, n_kv, D), pos).float().transpose(1, 2)
    v = (x @ attn.wv.weight.T).reshape(2, T, n_kv, D).transpose(1, 2)
    k, v = (t.repeat_interleave(H // n_kv, dim=1) for t in (k, v))
    out = attention_reference(q, k, v, causal_mask(T, T), D ** -0.5)
    expected = out.transpose(1, 2).reshape(2, T, d) @ attn.wo.weight.T
    torch.testing.assert_close(attn(x, rope_for(D, T)), expected, rtol=1e-4, atol=1e-5)


def test_gqa_weight_shapes_and_cache_shape():
    attn = Attention(64, 8, 2)
    assert (attn.n_heads, attn.n_kv_heads, attn.head_dim) == (8, 2, 8)
    assert attn.wq.weight.shape == (64, 64)
    assert attn.wk.weight.shape == (16, 64) and attn.wv.weight.shape == (16, 64)
    assert attn.wo.weight.shape == (64, 64)
    assert attn.softmax_scale == pytest.approx(8 ** -0.5)
    cache = attn.new_cache(3, 10)
    assert cache.k.shape == cache.v.shape == (3, 2, 10, 8) and cache.max_len == 10
    mqa = Attention(64, 8, 1)
    assert mqa.wk.weight.shape == (8, 64)
    assert Attention(64, 8).n_kv_heads == 8


@pytest.mark.parametrize("args", [(30, 4, 4), (32, 4, 3), (32, 4, 8)])
def test_attention_rejects_bad_head_counts(args):
    with pytest.raises(ValueError, match="Attention"):
        Attention(*args)


@pytest.mark.parametrize("n_kv", [4, 2])
def test_causality(n_kv):
    torch.manual_seed(3)
    d, T, j = 32, 8, 4
    attn = Attention(d, 4, n_kv)
    rope = rope_for(8, T)
    x = torch.randn(1, T, d)
    y = x.clone()
    y[:, j] = torch.randn(d)
    a, b = attn(x, rope), attn(y, rope)
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-6)
    diff = (a - b).abs().amax(dim=-1)[0]
    assert torch.all(diff[j:] > 1e-4), diff


@pytest.mark.parametrize("n_kv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("prefill", [1, 5])
def test_cached_decode_equals_full_forward(n_kv, prefill):
    torch.manual_seed(4)
    d, T = 32, 9
    attn = Attention(d, 4, n_kv)
    cos, sin = rope_for(8, T)
    x = torch.randn(2, T, d)
    full = attn(x, (cos, sin))
    cache = attn.new_cache(2, T)
    outs = [attn(x[:, :prefill], (cos[:prefill], sin[:prefill]), 0, cache)]
    for t in range(prefill, T):
        outs.append(attn(x[:, t:t + 1], (cos[t:t + 1], sin[t:t + 1]), t, cache))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-4, atol=1e-5)


def test_chunk_without_cache_at_start_pos_attends_within_chunk():
    # Without a cache, a chunk at positions 3.. only sees itself: equals the hand formula with
    # positions shifted (RoPE is relative, so it also equals the chunk at position 0).
    torch.manual_seed(5)
    attn = Attention(16, 2)
    x = torch.randn(1, 4, 16)
    got = attn(x, rope_for(8, 4, start=3), 3)
    torch.testing.assert_close(got, attention_by_hand(attn, x, start_pos=3).float(), rtol=1e-4, atol=1e-5)


def test_kvcache_update_writes_and_returns_prefix():
    cache = KVCache.empty(2, 1, 6, 3)
    k1, v1 = torch.randn(2, 1, 2, 3), torch.randn(2, 1, 2, 3)
    k, v = cache.update(k1, v1, 0)
    assert torch.equal(k, k1) and torch.equal(v, v1)
    k2, v2 = torch.randn(2, 1, 1, 3), torch.randn(2, 1, 1, 3)
    k, v = cache.update(k2, v2, 2)
    assert torch.equal(k, torch.cat([k1, k2], dim=2)) and torch.equal(v, torch.cat([v1, v2], dim=2))
    assert torch.all(cache.k[:, :, 3:] == 0)


def test_kvcache_overflow_raises_naming_max_len():
    cache = KVCache.empty(1, 2, 4, 8)
    with pytest.raises(ValueError, match="max_len"):
        cache.update(torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8), 0)
    cache.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 0)
    with pytest.raises(ValueError, match=r"max_len >= 5"):
        cache.update(torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8), 3)


def test_attention_with_too_small_cache_raises():
    attn = Attention(16, 2)
    cache = attn.new_cache(1, 3)
    x = torch.randn(1, 4, 16)
    with pytest.raises(ValueError, match="max_len"):
        attn(x, rope_for(8, 4), 0, cache)


def test_kvcache_batch_mismatch_raises():
    cache = KVCache.empty(2, 2, 4, 8)
    with pytest.raises(ValueError, match="batch size 2"):
        cache.update(torch.zeros(3, 2, 1, 8), torch.zeros(3, 2, 1, 8), 0)
    attn = Attention(16, 2)
    with pytest.raises(ValueError, match="batch"):
        attn(torch.randn(1, 1, 16), rope_for(8, 1), 0, attn.new_cache(2, 4))


def test_gradcheck_attention_float64():
    torch.manual_seed(6)
    attn = Attention(8, 2, 1).double()
    cos, sin = rope_for(4, 3, dtype=torch.float64)
    x = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: attn(t, (cos, sin)), (x,))


# ------------------------------------------------------------------ fused kernels, ragged batches

def test_no_cache_uses_sdpa_is_causal_not_an_explicit_mask(monkeypatch):
    # An explicit boolean mask rules out SDPA's flash kernels; without a cache the keys are the
    # chunk's own tokens and is_causal=True says the same thing.
    import torch.nn.functional as F
    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal", False)))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    attn = Attention(16, 2)
    x = torch.randn(1, 4, 16)
    attn(x, rope_for(8, 4))
    attn(x, rope_for(8, 4, start=3), 3)                      # a chunk at start_pos 3, still no cache
    assert calls == [(None, True), (None, True)]
    attn(x, rope_for(8, 4), 0, attn.new_cache(1, 4))         # with a cache: the offset causal mask
    assert calls[-1][0] is not None and calls[-1][1] is False


def test_ragged_causal_mask_without_cache_hides_padding_keys():
    # Row 0: 4 real tokens. Row 1: one left pad, then 3 real tokens.
    positions = torch.tensor([[0, 1, 2, 3], [0, 0, 1, 2]])
    real = torch.tensor([[True, True, True, True], [False, True, True, True]])
    mask = ragged_causal_mask(positions, real)
    assert mask.shape == (2, 1, 4, 4) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], causal_mask(4, 4))
    expected = torch.tensor([[1, 0, 0, 0],      # the pad sees only itself: its softmax is not empty
                             [0, 1, 0, 0],      # real tokens never see the pad
                             [0, 1, 1, 0],
                             [0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[1, 0], expected)
    assert torch.equal(ragged_causal_mask(positions)[1, 0], causal_mask(4, 4))   # no padding: causal


def test_ragged_causal_mask_with_cache_gives_each_row_its_own_length():
    # Decoding one token per row, row 0 at position 2, row 1 at position 4, in a 6-slot cache.
    mask = ragged_causal_mask(torch.tensor([[2], [4]]), kv_len=6)
    assert mask.shape == (2, 1, 1, 6)
    assert mask[:, 0, 0].int().tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]
    # A chunk's padding is masked where it is written (slots = its positions).
    mask = ragged_causal_mask(torch.tensor([[0, 1, 2]]), torch.tensor([[True, True, False]]), kv_len=4)
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]]
    # cache_mask: an int start is causal_mask; per-row positions are ragged_causal_mask
    assert torch.equal(cache_mask(3, 2, 5), causal_mask(2, 5, 3))
    assert torch.equal(cache_mask(torch.tensor([[2], [4]]), 1, 6), ragged_causal_mask(torch.tensor([[2], [4]]), kv_len=6))


def test_kvcache_update_with_per_row_positions_writes_each_row_at_its_slots():
    cache = KVCache.empty(2, 1, 5, 3)
    k, v = torch.randn(2, 1, 2, 3), torch.randn(2, 1, 2, 3)
    keys, values = cache.update(k, v, torch.tensor([[0, 1], [3, 4]]))
    assert keys.shape == (2, 1, 5, 3)                         # every slot: the mask hides the rest
    assert torch.equal(cache.k[0, :, :2], k[0]) and torch.equal(cache.k[1, :, 3:], k[1])
    assert torch.equal(cache.v[1, :, 3:], v[1]) and torch.all(cache.k[0, :, 2:] == 0)
    assert torch.all(cache.k[1, :, :3] == 0)


def test_left_padded_row_without_cache_equals_the_row_alone():
    torch.manual_seed(7)
    attn = Attention(32, 4, 2)
    cos, sin = rope_for(8, 8)
    x = torch.randn(1, 5, 32)
    alone = attn(x, (cos[:5], sin[:5]))
    padded = torch.cat([torch.randn(1, 3, 32), x], dim=1)            # 3 pads of junk on the left
    positions = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4]])
    real = positions.new_ones(1, 8, dtype=torch.bool)
    real[:, :3] = False
    out = attn(padded, (cos[positions], sin[positions]), positions, None, ragged_causal_mask(positions, real))
    torch.testing.assert_close(out[:, 3:], alone, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(out).all()                                  # the pads' own rows are not NaN


@pytest.mark.parametrize("n_kv", [4, 1], ids=["mha", "mqa"])
def test_rows_of_different_lengths_decode_together_as_if_alone(n_kv):
    # Row 0 has 3 real tokens, row 1 has 6; right-padded prefill, then 3 decode steps with each
    # row at its own position (per-row cache lengths). Every real output equals the row alone.
    torch.manual_seed(8)
    attn = Attention(32, 4, n_kv)
    cos, sin = rope_for(8, 12)
    lengths, steps = [3, 6], 3
    rows = [torch.randn(1, n + steps, 32) for n in lengths]
    alone = [attn(r, (cos[:r.shape[1]], sin[:r.shape[1]])) for r in rows]
    width = max(lengths)
    prefill = torch.zeros(2, width, 32)
    for b, n in enumerate(lengths):
        prefill[b, :n] = rows[b][0, :n]
    positions = torch.arange(width).expand(2, width)
    real = positions < torch.tensor(lengths)[:, None]
    cache = attn.new_cache(2, width + steps)
    out = attn(prefill, (cos[positions], sin[positions]), positions, cache,
               ragged_causal_mask(positions, real, cache.max_len))
    for b, n in enumerate(lengths):
        torch.testing.assert_close(out[b, :n], alone[b][0, :n], rtol=1e-5, atol=1e-6)
    for i in range(steps):
        pos = torch.tensor(lengths)[:, None] + i                         # (B, 1): each row's next position
        x = torch.stack([rows[b][0, lengths[b] + i] for b in range(2)])[:, None]
        out = attn(x, (cos[pos], sin[pos]), pos, cache)                  # the module builds the mask itself
        for b in range(2):
            torch.testing.assert_close(out[b, 0], alone[b][0, lengths[b] + i], rtol=1e-5, atol=1e-6)
