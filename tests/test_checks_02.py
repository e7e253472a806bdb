"""The chapter 02 checks pass correct answers and name the usual mistakes with a hint."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

from deepseek_mini import checks
from deepseek_mini.mla import absorbed_attention


def split_query(q, n_heads, qk_nope_head_dim):
    q = rearrange(q, "b t (h d) -> b t h d", h=n_heads)
    return q[..., :qk_nope_head_dim], q[..., qk_nope_head_dim:]


def mla_cache_bytes(kv_lora_rank, qk_rope_head_dim, num_layers, bytes_per_value=2):
    return (kv_lora_rank + qk_rope_head_dim) * num_layers * bytes_per_value


def absorb_query(q_nope, w_uk):
    return torch.einsum("bthd,hdc->bthc", q_nope, w_uk)


def latent_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, mask, scale, *, rope=True, scale_rope=True,
                     use_scale=True, mask_mode="given", softmax_dim=-1, swap=False, project=True, heads_first=False):
    """Absorbed attention written out step by step, with switches for the usual mistakes."""
    if swap:
        w_uk, w_uv = w_uv, w_uk
    nope = torch.einsum("bthd,hdc,bsc->bhts", q_nope, w_uk, c_kv)
    rope_term = torch.einsum("bthr,bsr->bhts", q_rope, k_rope) if rope else 0
    s = scale if use_scale else 1.0
    scores = nope * s + rope_term * (s if scale_rope else 1.0)
    allowed = {"given": mask, "none": torch.ones_like(mask), "tril": torch.ones_like(mask).tril(),
               "inverted": ~mask}[mask_mode]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=softmax_dim)
    o_latent = torch.einsum("bhts,bsc->bthc", probs, c_kv)
    if not project:
        return o_latent
    out = torch.einsum("bthc,hdc->bthd", o_latent, w_uv)
    return rearrange(out, "b t h d -> b h t d") if heads_first else out


def test_checks_pass_correct_answers_and_say_so(capsys):
    checks.check_split_query(split_query)
    checks.check_mla_cache_bytes(mla_cache_bytes)
    checks.check_absorb_query(absorb_query)
    checks.check_absorbed_attention(absorbed_attention)
    checks.check_absorbed_attention(latent_attention)
    out = capsys.readouterr().out
    assert out.count("✓") == 5 and "70,272" in out


def _failure(check, fn) -> str:
    with pytest.raises(checks.CheckFailure) as info:
        check(fn)
    return str(info.value)


def test_split_query_names_the_per_head_layout():
    def split_globally(q, n_heads, qk_nope_head_dim):   # all nope features first, then all rope features
        nope, rope = q.split([n_heads * qk_nope_head_dim, q.shape[-1] - n_heads * qk_nope_head_dim], dim=-1)
        return (rearrange(nope, "b t (h d) -> b t h d", h=n_heads), rearrange(rope, "b t (h d) -> b t h d", h=n_heads))

    message = _failure(checks.check_split_query, split_globally)
    assert "index (0, 0, 1, 0): got 3, expected 5" in message and "heads first" in message

    message = _failure(checks.check_split_query, lambda q, h, d: split_query(q, h, d)[0])
    assert "(q_nope, q_rope) tuple" in message


@pytest.mark.parametrize("wrong, hint", [
    (lambda d_c, d_r, layers, b=2: d_c * layers * b, "k_rope"),
    (lambda d_c, d_r, layers, b=2: (d_c + d_r) * b, "num_layers"),
    (lambda d_c, d_r, layers, b=2: (d_c + d_r) * layers, "bytes_per_value"),
    (lambda d_c, d_r, layers, b=4: (d_c + d_r) * layers * b, "default to 2"),
])
def test_mla_cache_bytes_names_the_forgotten_factor(wrong, hint):
    message = _failure(checks.check_mla_cache_bytes, wrong)
    assert "expected 70,272" in message and "hint:" in message and hint in message


def test_absorb_query_names_the_absorption_identity():
    message = _failure(checks.check_absorb_query, lambda q, w: torch.einsum("bthd,dc->bthc", q, w[0]))
    assert "absorption identity fails" in message and "heads [1, 2] are wrong" in message

    message = _failure(checks.check_absorb_query, lambda q, w: torch.einsum("bthd,hdc->btc", q, w))
    assert "expected (2, 5, 3, 7) = (B, T, H, d_c)" in message


@pytest.mark.parametrize("mistake, hint", [
    (dict(rope=False), "the RoPE term is missing"),
    (dict(use_scale=False), "not multiplied by `scale`"),
    (dict(scale_rope=False), "scale the whole score"),
    (dict(mask_mode="none"), "`mask` is ignored"),
    (dict(mask_mode="tril"), "use the `mask` argument"),
    (dict(mask_mode="inverted"), "the mask is inverted"),
    (dict(softmax_dim=-2), "wrong dimension"),
    (dict(swap=True), "swapped"),
    (dict(project=False), "output in latent space"),
    (dict(heads_first=True), "tokens before heads"),
])
def test_absorbed_attention_names_the_usual_mistake(mistake, hint):
    def wrong(*args):
        return latent_attention(*args, **mistake)

    message = _failure(checks.check_absorbed_attention, wrong)
    assert "vs naive attention on up-projected keys and values" in message and hint in message
