"""Multi-head Latent Attention (chapter 02): the absorbed path against the naive path and
against DeepSeek-V3's equations 1-11 written out by hand, the latent cache and its size,
decoupled RoPE, gradients, dimension checks, the 671B layer's shapes and the whole model."""

from __future__ import annotations

import math

import pytest
import torch

from deepseek_mini import build_model, load_config
from deepseek_mini.attention import KVCache, ragged_causal_mask
from deepseek_mini.generate import generate
from deepseek_mini.mla import MLA, LatentCache, absorbed_attention, naive_attention
from deepseek_mini.rope import rope_cos_sin, rope_frequencies

# Tiny dimensions: d, n_h, d_c, d_h (nope), d_h^R (rope), d_h (value).
DIM, H, KV, DN, DR, DV = 64, 4, 16, 8, 4, 8
Q_LORA = [None, 24]
IMPLS = ["naive", "absorb"]


# ----------------------------------------------------------------------------- helpers
def rope_for(seq_len: int, start: int = 0, dtype=torch.float32, head_dim: int = DR):
    cos, sin = rope_cos_sin(rope_frequencies(head_dim), start + seq_len)
    return cos[start:].to(dtype), sin[start:].to(dtype)


def rope_complex(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE on x (B, T, ..., d) as complex multiplication (independent of deepseek_mini.rope)."""
    d = x.shape[-1]
    freqs = torch.tensor([10000.0 ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    cis = torch.polar(torch.ones(len(positions), d // 2, dtype=torch.float64), positions.double()[:, None] * freqs)
    cis = cis.reshape(1, len(positions), *([1] * (x.dim() - 3)), d // 2)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(xc * cis).flatten(-2)


def make_mla(q_lora_rank=None, attn_impl="absorb", seed=0, dims=(DIM, H, KV, DN, DR, DV)) -> MLA:
    """An MLA with weights ~ N(0, 1/fan_in) and random norm gains, so scores are O(1) and
    every weight (norm gains included) visibly changes the output."""
    dim, h, kv, dn, dr, dv = dims
    mla = MLA(dim, h, kv_lora_rank=kv, q_lora_rank=q_lora_rank, qk_nope_head_dim=dn, qk_rope_head_dim=dr,
              v_head_dim=dv, attn_impl=attn_impl)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mla.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    return mla


def twin(mla: MLA, attn_impl: str) -> MLA:
    """The same weights under the other attn_impl (load_state_dict, not a shared seed)."""
    q_lora = mla.wq_a.out_features if hasattr(mla, "wq_a") else None
    other = MLA(DIM, H, kv_lora_rank=KV, q_lora_rank=q_lora, qk_nope_head_dim=DN, qk_rope_head_dim=DR,
                v_head_dim=DV, attn_impl=attn_impl)
    other.load_state_dict(mla.state_dict())
    return other


def rms_by_hand(x: torch.Tensor, gain: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * gain.double()


def mla_by_hand(mla: MLA, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
    """DeepSeek-V3 eqs. 1-11 in float64 from the module's weight matrices, head by head.

    The keys are x's own T tokens at positions start_pos.. (prefill, or a chunk without a
    cache); query i sees keys j <= i. RMSNorm follows both compressed latents (§4.2).
    """
    B, T, _ = x.shape
    x = x.double()
    pos = torch.arange(start_pos, start_pos + T)
    W = {k: v.double() for k, v in mla.state_dict().items()}
    # eq. 1: c_kv = W^{DKV} x (then kv_norm);  eq. 3: k^R = RoPE(W^{KR} x), one for all heads.
    w_dkv, w_kr = W["wkv_a.weight"][:KV], W["wkv_a.weight"][KV:]
    c_kv = rms_by_hand(x @ w_dkv.T, W["kv_norm.weight"])                      # (B, T, d_c)
    k_r = rope_complex((x @ w_kr.T)[:, :, None], pos)[:, :, 0]                 # (B, T, d_h^R)
    # eqs. 6-8: c^Q = W^{DQ} x (then q_norm), q^C = W^{UQ} c^Q, q^R = RoPE(W^{QR} c^Q).
    if "wq.weight" in W:
        c_q, w_q = x, W["wq.weight"]
    else:
        c_q, w_q = rms_by_hand(x @ W["wq_a.weight"].T, W["q_norm.weight"]), W["wq_b.weight"]
    w_kvb = W["wkv_b.weight"]
    heads = []
    for h in range(H):
        rows_q = w_q[h * (DN + DR):(h + 1) * (DN + DR)]
        w_uq, w_qr = rows_q[:DN], rows_q[DN:]
        rows_kv = w_kvb[h * (DN + DV):(h + 1) * (DN + DV)]
        w_uk, w_uv = rows_kv[:DN], rows_kv[DN:]
        q = torch.cat([c_q @ w_uq.T, rope_complex((c_q @ w_qr.T)[:, :, None], pos)[:, :, 0]], -1)  # eq. 9
        k = torch.cat([c_kv @ w_uk.T, k_r], -1)                                 # eqs. 2, 4
        v = c_kv @ w_uv.T                                                       # eq. 5
        scores = torch.einsum("bid,bjd->bij", q, k) / math.sqrt(DN + DR)        # eq. 10
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        e = torch.exp(scores - scores.amax(-1, keepdim=True))
        heads.append((e / e.sum(-1, keepdim=True)) @ v)
    return torch.cat(heads, dim=-1) @ W["wo.weight"].T                         # eq. 11


def decode(mla: MLA, x: torch.Tensor, prefill: int, chunks=None) -> torch.Tensor:
    """Prefill `prefill` tokens through a fresh cache, then feed the rest one by one (or in chunks)."""
    B, T, _ = x.shape
    cos, sin = rope_for(T)
    cache = mla.new_cache(B, T)
    outs = [mla(x[:, :prefill], (cos[:prefill], sin[:prefill]), 0, cache)]
    bounds = list(range(prefill, T)) if chunks is None else chunks
    for s, e in zip(bounds, bounds[1:] + [T]):
        outs.append(mla(x[:, s:e], (cos[s:e], sin[s:e]), s, cache))
    return torch.cat(outs, dim=1)


def cache_values_per_token(cache) -> int:
    tensors = (cache.c_kv, cache.k_rope) if isinstance(cache, LatentCache) else (cache.k, cache.v)
    batch = tensors[0].shape[0]
    return sum(t.numel() for t in tensors) // (batch * cache.max_len)


# ------------------------------------------------------------ absorbed = naive = equations
@pytest.mark.parametrize("q_lora", Q_LORA, ids=["no_q_lora", "q_lora"])
def test_absorbed_equals_naive_on_prefill(q_lora):
    torch.manual_seed(0)
    absorb = make_mla(q_lora, "absorb")
    naive = twin(absorb, "naive")
    x = torch.randn(2, 7, DIM)
    a, n = absorb(x, rope_for(7)), naive(x, rope_for(7))
    assert a.shape == (2, 7, DIM)
    torch.testing.assert_close(a, n, rtol=1e-5, atol=1e-5)
    assert a.abs().mean() > 0.1          # not trivially equal because tiny


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("q_lora", Q_LORA, ids=["no_q_lora", "q_lora"])
def test_both_paths_match_equations_1_to_11_by_hand(q_lora, impl):
    torch.manual_seed(1)
    mla = make_mla(q_lora, impl, seed=1)
    x = torch.randn(2, 6, DIM)
    expected = mla_by_hand(mla, x)
    torch.testing.assert_close(mla(x, rope_for(6)), expected.float(), rtol=1e-4, atol=1e-5)


def test_hand_reference_is_sensitive_to_every_weight():
    # The reference must not be vacuous: changing any weight or gain changes its output.
    torch.manual_seed(2)
    mla = make_mla(24, seed=2)
    x = torch.randn(1, 5, DIM)
    base = mla_by_hand(mla, x)
    for name, p in mla.named_parameters():
        saved = p.detach().clone()
        with torch.no_grad():
            p.add_(0.1 * torch.randn_like(p) * p.std())   # a random change, not a scale: RMSNorm undoes those
        assert (mla_by_hand(mla, x) - base).abs().max() > 1e-3, name
        with torch.no_grad():
            p.copy_(saved)


@pytest.mark.parametrize("prefill", [1, 4])
@pytest.mark.parametrize("q_lora", Q_LORA, ids=["no_q_lora", "q_lora"])
def test_token_by_token_decode_cached_equals_full_and_paths_agree(q_lora, prefill):
    torch.manual_seed(3)
    absorb = make_mla(q_lora, "absorb", seed=3)
    naive = twin(absorb, "naive")
    x = torch.randn(2, 9, DIM)
    expected = mla_by_hand(absorb, x).float()
    outs = {}
    for mla in (absorb, naive):
        full = mla(x, rope_for(9))
        outs[mla.attn_impl] = decode(mla, x, prefill)
        torch.testing.assert_close(outs[mla.attn_impl], full, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(outs[mla.attn_impl], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs["absorb"], outs["naive"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_chunked_prefill_through_the_cache(impl):
    # prefill 3, then a 4-token chunk at start_pos 3, then single tokens.
    torch.manual_seed(4)
    mla = make_mla(24, impl, seed=4)
    x = torch.randn(1, 9, DIM)
    torch.testing.assert_close(decode(mla, x, 3, chunks=[3, 7, 8]), mla(x, rope_for(9)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_chunk_at_start_pos_without_cache_attends_within_chunk(impl):
    # Without a cache, a chunk at positions 5.. sees only its own tokens, rotated for positions 5..
    torch.manual_seed(5)
    mla = make_mla(None, impl, seed=5)
    x = torch.randn(2, 4, DIM)
    got = mla(x, rope_for(4, start=5), 5)
    torch.testing.assert_close(got, mla_by_hand(mla, x, start_pos=5).float(), rtol=1e-4, atol=1e-5)
    other = twin(mla, "naive" if impl == "absorb" else "absorb")
    torch.testing.assert_close(got, other(x, rope_for(4, start=5), 5), rtol=1e-5, atol=1e-5)
    # RoPE is relative, so the same chunk at position 0 gives the same output.
    torch.testing.assert_close(got, mla(x, rope_for(4)), rtol=1e-4, atol=1e-5)


def test_absorbed_attention_equals_explicit_keys_and_values():
    # The two functions on their own: absorbed_attention on (c_kv, k_rope) against
    # naive_attention on the per-head keys and values formed explicitly.
    torch.manual_seed(6)
    B, T, S = 2, 3, 5
    q_nope, q_rope = torch.randn(B, T, H, DN), torch.randn(B, T, H, DR)
    c_kv, k_rope = torch.randn(B, S, KV), torch.randn(B, S, DR)
    w_uk, w_uv = torch.randn(H, DN, KV) / 4, torch.randn(H, DV, KV) / 4
    mask = torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)
    got = absorbed_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, mask, 0.3)
    k = torch.cat([torch.einsum("bsc,hdc->bshd", c_kv, w_uk), k_rope[:, :, None].expand(B, S, H, DR)], -1)
    v = torch.einsum("bsc,hdc->bshd", c_kv, w_uv)
    q = torch.cat([q_nope, q_rope], -1)
    ref = torch.empty(B, T, H, DV)
    for h in range(H):
        s = torch.einsum("btd,bsd->bts", q[:, :, h], k[:, :, h]) * 0.3
        ref[:, :, h] = s.masked_fill(~mask, float("-inf")).softmax(-1) @ v[:, :, h]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(naive_attention(q, k, v, mask, 0.3), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the caches
def test_latent_cache_holds_c_kv_and_k_rope_only():
    torch.manual_seed(7)
    mla = make_mla(24, "absorb", seed=7)
    cache = mla.new_cache(2, 10)
    assert isinstance(cache, LatentCache) and cache.max_len == 10
    assert cache.c_kv.shape == (2, 10, KV) and cache.k_rope.shape == (2, 10, DR)
    assert cache_values_per_token(cache) == KV + DR == 20
    x = torch.randn(2, 6, DIM)
    cos, sin = rope_for(6)
    mla(x, (cos, sin), 0, cache)
    c_kv, k_rope = mla.latent(x, (cos, sin))
    torch.testing.assert_close(cache.c_kv[:, :6], c_kv)
    torch.testing.assert_close(cache.k_rope[:, :6], k_rope)
    assert torch.all(cache.c_kv[:, 6:] == 0) and torch.all(cache.k_rope[:, 6:] == 0)


def test_naive_cache_holds_per_head_keys_and_values():
    torch.manual_seed(8)
    mla = make_mla(None, "naive", seed=8)
    cache = mla.new_cache(2, 10)
    assert isinstance(cache, KVCache)
    assert cache.k.shape == (2, H, 10, DN + DR) and cache.v.shape == (2, H, 10, DV)
    assert cache_values_per_token(cache) == H * (DN + DR) + H * DV == 80
    x = torch.randn(2, 6, DIM)
    cos, sin = rope_for(6)
    mla(x, (cos, sin), 0, cache)
    c_kv, k_rope = mla.latent(x, (cos, sin))
    w = mla.wkv_b.weight.reshape(H, DN + DV, KV)
    for h in range(H):
        torch.testing.assert_close(cache.k[:, h, :6, :DN], c_kv @ w[h, :DN].T)
        torch.testing.assert_close(cache.k[:, h, :6, DN:], k_rope)          # shared by every head
        torch.testing.assert_close(cache.v[:, h, :6], c_kv @ w[h, DN:].T)


def test_latent_cache_update_writes_and_returns_prefix():
    cache = LatentCache.empty(2, 6, KV, DR)
    c1, r1 = torch.randn(2, 2, KV), torch.randn(2, 2, DR)
    c, r = cache.update(c1, r1, 0)
    assert torch.equal(c, c1) and torch.equal(r, r1)
    c2, r2 = torch.randn(2, 1, KV), torch.randn(2, 1, DR)
    c, r = cache.update(c2, r2, 2)
    assert torch.equal(c, torch.cat([c1, c2], 1)) and torch.equal(r, torch.cat([r1, r2], 1))
    assert torch.all(cache.c_kv[:, 3:] == 0) and torch.all(cache.k_rope[:, 3:] == 0)
    half = LatentCache.empty(1, 4, KV, DR, dtype=torch.bfloat16)
    assert half.c_kv.dtype == half.k_rope.dtype == torch.bfloat16


def test_latent_cache_overflow_raises_naming_max_len():
    cache = LatentCache.empty(1, 4, KV, DR)
    with pytest.raises(ValueError, match="max_len"):
        cache.update(torch.zeros(1, 5, KV), torch.zeros(1, 5, DR), 0)
    cache.update(torch.zeros(1, 3, KV), torch.zeros(1, 3, DR), 0)
    with pytest.raises(ValueError, match=r"max_len >= 5"):
        cache.update(torch.zeros(1, 2, KV), torch.zeros(1, 2, DR), 3)


@pytest.mark.parametrize("impl", IMPLS)
def test_mla_with_too_small_cache_raises(impl):
    mla = make_mla(None, impl)
    with pytest.raises(ValueError, match="max_len"):
        mla(torch.randn(1, 4, DIM), rope_for(4), 0, mla.new_cache(1, 3))


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_mismatch_raises(impl):
    with pytest.raises(ValueError, match="batch size 2"):
        LatentCache.empty(2, 4, KV, DR).update(torch.zeros(3, 1, KV), torch.zeros(3, 1, DR), 0)
    mla = make_mla(None, impl)
    with pytest.raises(ValueError, match="batch"):
        mla(torch.randn(1, 1, DIM), rope_for(1), 0, mla.new_cache(2, 4))


@pytest.mark.parametrize("impl", IMPLS)
def test_whole_model_cache_types_and_sizes(impl):
    config = load_config("toy-mla", attn_impl=impl)
    model = build_model(config, seed=0)
    caches = model.new_cache(2, 16)
    assert list(caches) == ["0", "1", "2", "3"] and config.num_hidden_layers == 4
    h, dc, dr = config.num_attention_heads, config.kv_lora_rank, config.qk_rope_head_dim
    dn, dv = config.qk_nope_head_dim, config.v_head_dim
    for cache in caches.values():
        if impl == "absorb":
            assert type(cache) is LatentCache
            assert cache.c_kv.shape == (2, 16, dc) and cache.k_rope.shape == (2, 16, dr)
            assert cache_values_per_token(cache) == dc + dr == 48     # the preset's docstring
        else:
            assert type(cache) is KVCache
            assert cache.k.shape == (2, h, 16, dn + dr) and cache.v.shape == (2, h, 16, dv)
            assert cache_values_per_token(cache) == h * (dn + dr) + h * dv == 320


# ------------------------------------------------------------------------ decoupled RoPE
def test_rope_touches_only_the_decoupled_key():
    torch.manual_seed(9)
    mla = make_mla(24, seed=9)
    x = torch.randn(1, 5, DIM)
    at0, at7 = rope_for(5), rope_for(5, start=7)
    c0, r0 = mla.latent(x, at0)
    c7, r7 = mla.latent(x, at7)
    assert torch.equal(c0, c7)                             # c_kv carries no position
    assert (r0 - r7).abs().max() > 1e-2                    # k_rope does
    raw = (x @ mla.wkv_a.weight.T)[..., KV:]
    torch.testing.assert_close(r7, rope_complex(raw[:, :, None], torch.arange(7, 12))[:, :, 0].float(),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r0[:, 0], raw[:, 0])         # position 0: no rotation
    torch.testing.assert_close(c0, mla.kv_norm(x @ mla.wkv_a.weight[:KV].T))


@pytest.mark.parametrize("q_lora", Q_LORA, ids=["no_q_lora", "q_lora"])
def test_rope_touches_only_the_decoupled_query(q_lora):
    torch.manual_seed(10)
    mla = make_mla(q_lora, seed=10)
    x = torch.randn(1, 5, DIM)
    n0, r0 = mla.query(x, rope_for(5))
    n7, r7 = mla.query(x, rope_for(5, start=7))
    assert n0.shape == (1, 5, H, DN) and r0.shape == (1, 5, H, DR)
    assert torch.equal(n0, n7)
    assert (r0 - r7).abs().max() > 1e-2
    # Rotations compose: positions 7.. are positions 0.. turned by 7 more.
    torch.testing.assert_close(r7, rope_complex(r0, torch.full((5,), 7)).float(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- gradients
SMALL = (16, 2, 6, 4, 2, 4)     # dim, heads, d_c, nope, rope, v: small enough for gradcheck


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_mla_float64(impl):
    mla = make_mla(8, impl, seed=11, dims=SMALL).double()
    cos, sin = rope_for(3, dtype=torch.float64, head_dim=2)
    x = torch.randn(1, 3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(11), requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mla(t, (cos, sin)), (x,))


def test_gradcheck_absorbed_attention_float64():
    g = torch.Generator().manual_seed(12)

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)

    inputs = (rand(1, 2, 2, 3), rand(1, 2, 2, 2), rand(1, 3, 4), rand(1, 3, 2), rand(2, 3, 4), rand(2, 3, 4))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda *t: absorbed_attention(*t, mask, 0.4), inputs)


@pytest.mark.parametrize("q_lora", Q_LORA, ids=["no_q_lora", "q_lora"])
def test_float64_paths_agree_to_float64_precision(q_lora):
    # Cast to float64, the two paths differ only by rounding: no step may go through float32
    # (the softmax included), or they differ by ~1e-7.
    torch.manual_seed(13)
    absorb = make_mla(q_lora, "absorb", seed=13)
    naive = twin(absorb, "naive")
    absorb, naive = absorb.double(), naive.double()
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    rope = rope_for(6, dtype=torch.float64)
    a, n = absorb(x, rope), naive(x, rope)
    assert a.dtype == n.dtype == torch.float64
    torch.testing.assert_close(a, n, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a, mla_by_hand(absorb, x), rtol=1e-6, atol=1e-6)   # RoPE tables are float32


# ------------------------------------------------------------------------ dimension checks
@pytest.mark.parametrize("kwargs,pattern", [
    (dict(kv_lora_rank=64), r"kv_lora_rank \(64\).*dim=64"),
    (dict(kv_lora_rank=100), r"kv_lora_rank \(100\)"),
    (dict(kv_lora_rank=0), r"kv_lora_rank \(0\)"),
    (dict(q_lora_rank=64), r"q_lora_rank \(64\).*dim=64"),
    (dict(qk_rope_head_dim=3), r"qk_rope_head_dim \(3\).*even"),
    (dict(qk_rope_head_dim=0), r"qk_rope_head_dim \(0\)"),
    (dict(attn_impl="flash"), r"attn_impl \('flash'\).*'naive' or 'absorb'"),
], ids=["kv_eq_dim", "kv_gt_dim", "kv_zero", "q_eq_dim", "rope_odd", "rope_zero", "impl"])
def test_bad_dimensions_raise_clear_errors(kwargs, pattern):
    args = dict(dim=DIM, n_heads=H, kv_lora_rank=KV, q_lora_rank=None, qk_nope_head_dim=DN,
                qk_rope_head_dim=DR, v_head_dim=DV) | kwargs
    with pytest.raises(ValueError, match=pattern):
        MLA(**args)


def test_config_rejects_bad_mla_fields():
    with pytest.raises(ValueError, match=r"kv_lora_rank \(200\).*hidden_size \(128\)"):
        load_config("toy-dense", kv_lora_rank=200)
    with pytest.raises(ValueError, match=r"q_lora_rank \(128\)"):
        load_config("toy-mla", q_lora_rank=128)
    with pytest.raises(ValueError, match=r"qk_rope_head_dim \(15\)"):
        load_config("toy-mla", qk_rope_head_dim=15)
    with pytest.raises(ValueError, match=r"num_key_value_heads \(2\).*num_attention_heads \(4\).*MLA"):
        load_config("toy-mla", num_key_value_heads=2)
    with pytest.raises(ValueError, match="attn_impl"):
        load_config("toy-mla", attn_impl="flash")


# ---------------------------------------------------------------- the 671B layer (meta device)
def v3_layer() -> MLA:
    c = load_config("deepseek-v3")
    with torch.device("meta"):
        return MLA(c.hidden_size, c.num_attention_heads, kv_lora_rank=c.kv_lora_rank, q_lora_rank=c.q_lora_rank,
                   qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim,
                   v_head_dim=c.v_head_dim, eps=c.rms_norm_eps, attn_impl=c.attn_impl)


def test_deepseek_v3_mla_layer_shapes_and_parameter_count():
    mla = v3_layer()
    shapes = {name: tuple(p.shape) for name, p in mla.named_parameters()}
    assert shapes == {                                       # book/facts.md (MLA, from config_671B.json); (out, in)
        "wq_a.weight": (1536, 7168),
        "q_norm.weight": (1536,),
        "wq_b.weight": (128 * 192, 1536),
        "wkv_a.weight": (512 + 64, 7168),
        "kv_norm.weight": (512,),
        "wkv_b.weight": (128 * (128 + 128), 512),
        "wo.weight": (7168, 128 * 128),
    }
    assert all(p.device.type == "meta" for p in mla.parameters())
    assert sum(p.numel() for p in mla.parameters()) == 187_107_328      # 187.11M
    assert mla.softmax_scale == pytest.approx(192 ** -0.5)
    w_uk, w_uv = mla.up_weights()
    assert w_uk.shape == w_uv.shape == (128, 128, 512)


def test_deepseek_v3_latent_cache_is_70272_bytes_per_token():
    mla = v3_layer()
    cache = mla.new_cache(1, 1, device="meta", dtype=torch.bfloat16)
    assert isinstance(cache, LatentCache) and cache.c_kv.device.type == "meta"
    per_layer = sum(t.numel() * t.element_size() for t in (cache.c_kv, cache.k_rope))
    assert per_layer == 576 * 2
    assert 61 * per_layer == 70_272
    with torch.device("meta"):
        naive = MLA(7168, 128, kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64,
                    v_head_dim=128, attn_impl="naive")
    nc = naive.new_cache(1, 1, device="meta", dtype=torch.bfloat16)
    assert cache_values_per_token(nc) == 128 * 192 + 128 * 128 == 40_960
    assert round(40_960 / 576, 1) == 71.1                  # "about 71x more"


# ------------------------------------------------------------------------- whole model
@pytest.fixture(scope="module")
def models():
    absorb = build_model(load_config("toy-mla"), seed=0).eval()
    naive = build_model(load_config("toy-mla", attn_impl="naive")).eval()
    naive.load_state_dict(absorb.state_dict())
    return absorb, naive


def test_whole_model_is_mla_and_paths_give_the_same_logits(models):
    absorb, naive = models
    assert all(isinstance(b.attn, MLA) and b.attn.attn_impl == "absorb" for b in absorb.layers.values())
    assert all(b.attn.attn_impl == "naive" for b in naive.layers.values())
    assert absorb.rope_cos.shape == (512, 8)                 # d_h^R = 16 -> 8 pairs
    torch.manual_seed(14)
    tokens = torch.randint(0, 260, (2, 20))
    with torch.no_grad():
        a, n = absorb(tokens), naive(tokens)
    torch.testing.assert_close(a, n, rtol=1e-5, atol=1e-5)
    assert a.std() > 0.1


@pytest.mark.parametrize("which", [0, 1], ids=IMPLS[::-1])
def test_whole_model_is_causal(models, which):
    model = models[which]
    torch.manual_seed(15)
    tokens = torch.randint(0, 260, (2, 12))
    changed = tokens.clone()
    j = 5
    changed[:, j] = (tokens[:, j] + 1) % 260
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-6)
    assert torch.all((a[:, j:] - b[:, j:]).abs().amax(dim=-1) > 1e-5)


@pytest.mark.parametrize("which", [0, 1], ids=IMPLS[::-1])
def test_whole_model_cached_decode_equals_full_forward(models, which):
    model = models[which]
    torch.manual_seed(16)
    tokens = torch.randint(0, 260, (2, 14))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2, 14)
        steps = [model(tokens[:, :5], 0, cache)]
        for t in range(5, 14):
            steps.append(model(tokens[:, t:t + 1], t, cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


def test_generate_greedy_is_identical_for_both_paths(models):
    absorb, naive = models
    prompt = torch.tensor([[257, 72, 101, 108], [257, 1, 2, 3]])
    a = generate(absorb, prompt, max_new_tokens=12, temperature=0)
    n = generate(naive, prompt, max_new_tokens=12, temperature=0)
    assert a.shape == (2, 16) and torch.equal(a[:, :4], prompt)
    assert torch.equal(a, n)


# ------------------------------------------------------------------ keywords, kernels, ragged batches
def test_mla_sizes_are_keyword_arguments():
    # Nine positional scalars were easy to swap silently (d_h and d_h^R are both small ints).
    with pytest.raises(TypeError):
        MLA(DIM, H, KV, None, DN, DR, DV)
    assert MLA(DIM, H, kv_lora_rank=KV).kv_lora_rank == KV


def test_naive_path_without_cache_lets_sdpa_pick_a_causal_kernel(monkeypatch):
    import torch.nn.functional as F
    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal", False)))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    mla = make_mla(None, "naive")
    mla(torch.randn(1, 5, DIM), rope_for(5))
    assert calls == [(None, True)]


@pytest.mark.parametrize("impl", IMPLS)
def test_mla_rows_of_different_lengths_decode_together_as_if_alone(impl):
    # Right-padded prefill of rows with 2 and 5 real tokens, then decode steps with per-row
    # positions: each row writes its own cache slots (per-row cache lengths), on both paths.
    torch.manual_seed(21)
    mla = make_mla(24, impl, seed=21)
    lengths, steps, width = [2, 5], 3, 5
    cos, sin = rope_for(width + steps)
    rows = [torch.randn(1, n + steps, DIM) for n in lengths]
    alone = [mla(r, (cos[:r.shape[1]], sin[:r.shape[1]])) for r in rows]
    prefill = torch.zeros(2, width, DIM)
    for b, n in enumerate(lengths):
        prefill[b, :n] = rows[b][0, :n]
    positions = torch.arange(width).expand(2, width)
    cache = mla.new_cache(2, width + steps)
    mask = ragged_causal_mask(positions, positions < torch.tensor(lengths)[:, None], cache.max_len)
    out = mla(prefill, (cos[positions], sin[positions]), positions, cache, mask)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(out[b, :n], alone[b][0, :n], rtol=1e-5, atol=1e-5)
    for i in range(steps):
        pos = torch.tensor(lengths)[:, None] + i
        x = torch.stack([rows[b][0, lengths[b] + i] for b in range(2)])[:, None]
        out = mla(x, (cos[pos], sin[pos]), pos, cache)
        for b in range(2):
            torch.testing.assert_close(out[b, 0], alone[b][0, lengths[b] + i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_mla_left_padding_without_cache_is_masked(impl):
    torch.manual_seed(22)
    mla = make_mla(None, impl, seed=22)
    cos, sin = rope_for(6)
    x = torch.randn(1, 4, DIM)
    alone = mla(x, (cos[:4], sin[:4]))
    padded = torch.cat([torch.randn(1, 2, DIM), x], dim=1)
    positions = torch.tensor([[0, 0, 0, 1, 2, 3]])
    real = torch.tensor([[False, False, True, True, True, True]])
    out = mla(padded, (cos[positions], sin[positions]), positions, None, ragged_causal_mask(positions, real))
    torch.testing.assert_close(out[:, 2:], alone, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()


def test_latent_cache_update_with_per_row_positions():
    cache = LatentCache.empty(2, 5, KV, DR)
    c_kv, k_rope = torch.randn(2, 1, KV), torch.randn(2, 1, DR)
    got_c, got_r = cache.update(c_kv, k_rope, torch.tensor([[1], [4]]))
    assert got_c.shape == (2, 5, KV) and got_r.shape == (2, 5, DR)
    assert torch.equal(cache.c_kv[0, 1], c_kv[0, 0]) and torch.equal(cache.k_rope[1, 4], k_rope[1, 0])
    assert cache.c_kv[0, [0, 2, 3, 4]].abs().sum() == 0 and cache.c_kv[1, :4].abs().sum() == 0


@pytest.mark.parametrize("q_lora", Q_LORA, ids=["no_q_lora", "q_lora"])
def test_mla_init_weights_initialises_every_projection_and_norm(q_lora):
    mla = make_mla(q_lora)
    mla.init_weights(0.02, torch.Generator().manual_seed(0))
    for name, p in mla.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert 0.01 < p.std().item() < 0.03 and abs(p.mean().item()) < 0.01, name
