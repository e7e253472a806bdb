"""Checks for the graded exercises, with diagnostics a learner can act on.

Each ``check_<exercise>(fn)`` runs the learner's function on fixed inputs, compares it with
the package's reference implementation (which the lecture notebooks built and the tests
verify independently) and tests the property the exercise is about. A failure raises
``CheckFailure`` (an ``AssertionError``) whose message says what went wrong:

* expected vs got shape and dtype;
* the first differing element, with its index and both values;
* which property failed, e.g. "row 3 attends to a future position (column 5)";
* a hint pointing at the usual mistake.

Passing prints one short line. The grader (``python -m deepseek_mini.grade``) scores a
check cell by whether it raised. Later chapters add their ``check_*`` functions here.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Callable

import torch

__all__ = ["CheckFailure", "assert_tensor_close", "check_rms_norm", "check_rope_rotation",
           "check_causal_mask", "check_kv_cache_append", "check_top_p_filter",
           "check_split_query", "check_mla_cache_bytes", "check_absorb_query", "check_absorbed_attention",
           "check_group_limited_topk", "check_routing_weights", "check_update_bias", "check_sequence_balance_loss",
           "check_max_violation", "check_mtp_shift", "check_mtp_depth_loss", "check_greedy_verify",
           "check_speculative_rule", "check_quantize_tiles", "check_quantize_blocks", "check_blockwise_gemm", "check_promoted_gemm",
           "check_bubble", "check_one_f_one_b", "check_all_to_all_counts",
           "check_dualpipev_stage_ranks", "check_ntk_by_parts_ramp", "check_yarn_mscale",
           "check_yarn_softmax_scale", "check_interpolated_inv_freq", "check_group_advantages",
           "check_clipped_surrogate", "check_k3_kl", "check_masked_mean_kl"]


class CheckFailure(AssertionError):
    """An exercise check failed; the message explains how."""


def _fail(exercise: str, problem: str, hint: str | None = None) -> None:
    message = f"{exercise}: {problem}"
    if hint:
        message += f"\n  hint: {hint}"
    raise CheckFailure(message)


def _passed(exercise: str, what: str) -> None:
    print(f"✓ {exercise}: {what}")


def _call(exercise: str, fn: Callable, *args, **kwargs):
    """Run the learner's function, turning an unfinished stub into a clear failure."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        _fail(exercise, "not implemented yet (the function still raises NotImplementedError)",
              "replace the `raise NotImplementedError(...)` line with your code")


def assert_tensor_close(exercise: str, got, expected: torch.Tensor, name: str = "output",
                        atol: float = 1e-5, rtol: float = 1e-4, hint: str | None = None) -> None:
    """Type, shape, dtype and values of ``got`` against ``expected``, reporting the first difference."""
    if not isinstance(got, torch.Tensor):
        _fail(exercise, f"{name} should be a torch.Tensor, got {type(got).__name__}", hint)
    if tuple(got.shape) != tuple(expected.shape):
        _fail(exercise, f"{name} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}", hint)
    if got.dtype != expected.dtype:
        _fail(exercise, f"{name} has dtype {got.dtype}, expected {expected.dtype}", hint)
    if expected.dtype == torch.bool or not expected.is_floating_point():
        bad = got != expected
    else:
        bad = ~torch.isclose(got, expected, atol=atol, rtol=rtol, equal_nan=True)
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        n_bad, n = int(bad.sum()), bad.numel()
        _fail(exercise, f"{name} differs at {n_bad} of {n} elements; first at index {index}: "
                        f"got {got[index].item():.6g}, expected {expected[index].item():.6g}", hint)


# ----------------------------------------------------------------------- chapter 01


def check_rms_norm(rms_norm: Callable) -> None:
    """Exercise 01.1: rms_norm(x, weight, eps) = x / sqrt(mean(x^2) + eps) * weight."""
    from deepseek_mini.layers import RMSNorm

    ex = "rms_norm"
    got = _call(ex, rms_norm, torch.tensor([[3.0, 4.0]]), torch.ones(2), 0.0)
    assert_tensor_close(ex, got, torch.tensor([[0.848528, 1.131371]]), "rms_norm([[3, 4]])",
                        hint="divide by the root of the MEAN of squares over the last dimension, not the sum")
    torch.manual_seed(0)
    x, weight = torch.randn(2, 5, 16), torch.rand(16) + 0.5
    reference = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        reference.weight.copy_(weight)
    assert_tensor_close(ex, _call(ex, rms_norm, x, weight, 1e-6), reference(x), "rms_norm(x, weight)",
                        hint="multiply by `weight` after normalising; reduce over dim=-1 with keepdim=True")
    _passed(ex, "matches the hand-computed value and the package's RMSNorm")


def check_rope_rotation(apply_rope: Callable) -> None:
    """Exercise 01.2: rotate interleaved pairs (x_2i, x_2i+1) of x (B, T, H, D) by cos/sin (T, D/2)."""
    from deepseek_mini.rope import apply_rope as reference, rope_cos_sin, rope_frequencies

    ex = "apply_rope"
    x = torch.zeros(1, 1, 1, 4)
    x[..., 0] = 1.0                                   # the unit vector of pair 0
    cos, sin = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])  # pair 0 turns by 90 degrees
    got = _call(ex, apply_rope, x, cos, sin)
    assert_tensor_close(ex, got, torch.tensor([[[[0.0, 1.0, 0.0, 0.0]]]]), "90-degree turn of (1, 0)",
                        hint="pairs are interleaved: channel 0 pairs with channel 1, not with channel D/2")
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, 8)
    cos, sin = rope_cos_sin(rope_frequencies(8), 6)
    got = _call(ex, apply_rope, x, cos, sin)
    assert_tensor_close(ex, got, reference(x, cos, sin), "apply_rope(x, cos, sin)",
                        hint="x0' = x0*cos - x1*sin and x1' = x0*sin + x1*cos for each pair")
    if not torch.allclose(got.norm(dim=-1), x.norm(dim=-1), atol=1e-4):
        _fail(ex, "the rotation changed vector lengths", "a rotation must preserve the norm")
    _passed(ex, "rotates interleaved pairs exactly like the package")


def check_causal_mask(causal_mask: Callable) -> None:
    """Exercise 01.3: (q_len, kv_len) bool mask, True where query i (at q_offset + i) may see key j."""
    ex = "causal_mask"
    for q_len, kv_len, offset in ((5, 5, 0), (2, 6, 4), (3, 7, 2)):
        got = _call(ex, causal_mask, q_len, kv_len, offset)
        if not isinstance(got, torch.Tensor) or got.dtype != torch.bool:
            _fail(ex, f"expected a bool tensor, got {getattr(got, 'dtype', type(got).__name__)}",
                  "compare positions with <= to get a bool tensor")
        if tuple(got.shape) != (q_len, kv_len):
            _fail(ex, f"shape {tuple(got.shape)} for q_len={q_len}, kv_len={kv_len}; expected ({q_len}, {kv_len})")
        for i in range(q_len):
            for j in range(kv_len):
                allowed = j <= offset + i
                if bool(got[i, j]) and not allowed:
                    _fail(ex, f"row {i} attends to a future position (column {j}) with q_offset={offset}",
                          "query i sits at position q_offset + i; it may only see keys j <= q_offset + i")
                if allowed and not bool(got[i, j]):
                    _fail(ex, f"row {i} cannot see position {j}, which is not in its future (q_offset={offset})",
                          "True means 'may attend'; every key at or before the query's position is allowed")
    _passed(ex, "no query sees the future and none is blind to its past")


def check_kv_cache_append(append: Callable) -> None:
    """Exercise 01.4: write k_new/v_new (B, H, T, D) at start_pos into the cache; return keys/values so far."""
    ex = "append_to_cache"
    torch.manual_seed(0)
    cache_k, cache_v = torch.zeros(2, 3, 10, 4), torch.zeros(2, 3, 10, 4)
    first_k, first_v = torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4)
    new_k, new_v = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    result = _call(ex, append, cache_k, cache_v, first_k, first_v, 0)
    result = _call(ex, append, cache_k, cache_v, new_k, new_v, 6)
    if not (isinstance(result, tuple) and len(result) == 2):
        _fail(ex, f"should return a (keys, values) tuple, got {type(result).__name__}")
    keys, values = result
    assert_tensor_close(ex, keys, torch.cat([first_k, new_k], dim=2), "keys after two appends",
                        hint="return cache_k[:, :, :start_pos + T], i.e. every position written so far")
    assert_tensor_close(ex, values, torch.cat([first_v, new_v], dim=2), "values after two appends")
    if cache_k[:, :, 6:8].abs().sum() == 0:
        _fail(ex, "the cache tensor itself was not updated", "write in place: cache_k[:, :, start:end] = k_new")
    if cache_k[:, :, 8:].abs().sum() != 0:
        _fail(ex, "positions beyond start_pos + T were written")
    _passed(ex, "appends in place and returns every position so far")


def check_top_p_filter(top_p_filter: Callable) -> None:
    """Exercise 01.5: keep the smallest set of most likely tokens whose probability reaches p."""
    from deepseek_mini.generate import top_p_filter as reference

    ex = "top_p_filter"
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()   # deliberately unsorted
    for p, keep in ((0.5, [0, 1, 0, 0]), (0.7, [0, 1, 0, 1]), (0.81, [0, 1, 1, 1]), (1.0, [1, 1, 1, 1])):
        got = _call(ex, top_p_filter, logits, p)
        kept = torch.isfinite(got)[0].int().tolist() if isinstance(got, torch.Tensor) else None
        if kept != keep:
            _fail(ex, f"with p={p} and probabilities (0.05, 0.5, 0.15, 0.3) you kept tokens {kept}, expected {keep}",
                  "sort descending, and drop a token only if the mass of the MORE likely tokens already reaches p")
        if isinstance(got, torch.Tensor) and not torch.equal(got[torch.isfinite(got)], logits[torch.isfinite(got)]):
            _fail(ex, "kept logits must keep their original values (and positions)",
                  "scatter the filtered sorted logits back to their original order")
    torch.manual_seed(0)
    batch = torch.randn(4, 50)
    assert_tensor_close(ex, _call(ex, top_p_filter, batch, 0.9), reference(batch, 0.9), "top_p_filter(batch, 0.9)")
    _passed(ex, "keeps exactly the nucleus, in the original order")


# ----------------------------------------------------------------------- chapter 02


def check_split_query(split_query: Callable) -> None:
    """Exercise 02.1: q (B, T, H*(d_h + d_h^R)) -> q_nope (B, T, H, d_h), q_rope (B, T, H, d_h^R)."""
    from deepseek_mini.mla import MLA

    ex = "split_query"
    layout_hint = ("the features are laid out heads first: [head 0: d_h nope, d_h^R rope | head 1: ...]; "
                   "reshape to (B, T, H, d_h + d_h^R) first, then split the last dimension")
    q = torch.arange(10.0).view(1, 1, 10)             # 2 heads of 3 nope + 2 rope features
    result = _call(ex, split_query, q, 2, 3)
    if not (isinstance(result, tuple) and len(result) == 2):
        _fail(ex, f"should return a (q_nope, q_rope) tuple, got {type(result).__name__}")
    q_nope, q_rope = result
    assert_tensor_close(ex, q_nope, torch.tensor([[[[0.0, 1, 2], [5, 6, 7]]]]),
                        "q_nope of q = arange(10) with 2 heads, d_h = 3, d_h^R = 2", hint=layout_hint)
    assert_tensor_close(ex, q_rope, torch.tensor([[[[3.0, 4], [8, 9]]]]),
                        "q_rope of q = arange(10) with 2 heads, d_h = 3, d_h^R = 2", hint=layout_hint)
    torch.manual_seed(0)
    mla = MLA(dim=16, n_heads=4, kv_lora_rank=8, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=6)
    x = torch.randn(2, 5, 16)
    no_rotation = (torch.ones(5, 2), torch.zeros(5, 2))  # cos 1, sin 0: RoPE leaves q_rope as it is
    with torch.no_grad():
        expected_nope, expected_rope = mla.query(x, no_rotation)
        q_nope, q_rope = _call(ex, split_query, mla.wq(x), 4, 6)
    assert_tensor_close(ex, q_nope, expected_nope, "q_nope (4 heads, d_h = 6) vs MLA.query", hint=layout_hint)
    assert_tensor_close(ex, q_rope, expected_rope, "q_rope (4 heads, d_h^R = 4) vs MLA.query", hint=layout_hint)
    _passed(ex, "splits every head into its nope and rope parts, like MLA.query")


def check_mla_cache_bytes(mla_cache_bytes: Callable) -> None:
    """Exercise 02.2: bytes cached per token = (d_c + d_h^R) * layers * bytes per value."""
    ex = "mla_cache_bytes"
    cases = [  # kv_lora_rank, qk_rope_head_dim, num_layers, bytes_per_value (None: the default 2), bytes/token
        (512, 64, 61, None, 70_272),   # DeepSeek-V3 in BF16: (512 + 64) * 61 * 2
        (7, 3, 5, 4, 200),             # (7 + 3) * 5 * 4
        (32, 16, 4, 2, 384),           # toy-mla in BF16: (32 + 16) * 4 * 2
    ]
    for d_c, d_r, layers, nbytes, expected in cases:
        args = (d_c, d_r, layers) if nbytes is None else (d_c, d_r, layers, nbytes)
        b = 2 if nbytes is None else nbytes
        got = _call(ex, mla_cache_bytes, *args)
        if isinstance(got, bool) or not isinstance(got, (int, float)):
            _fail(ex, f"should return a number of bytes, got {type(got).__name__}")
        if got == expected:
            continue
        call = f"mla_cache_bytes({', '.join(map(str, args))})"
        mistakes = {d_c * layers * b: "the cache holds k_rope (d_h^R values) next to c_kv: count d_c + d_h^R",
                    (d_c + d_r) * b: "every layer keeps its own cache: multiply by num_layers",
                    (d_c + d_r) * layers: "multiply the number of values by bytes_per_value (2 in BF16)",
                    d_c * b: "count k_rope next to c_kv, and multiply by num_layers"}
        hint = mistakes.get(got, "bytes per token = (kv_lora_rank + qk_rope_head_dim) * num_layers * bytes_per_value")
        if nbytes is None and got == (d_c + d_r) * layers * 4:
            hint = "bytes_per_value should default to 2 (BF16)"
        _fail(ex, f"{call} returned {got:,}, expected {expected:,}", hint)
    _passed(ex, "70,272 bytes per token for DeepSeek-V3 (61 layers, BF16), and the hand-computed cases")


def check_absorb_query(absorb_query: Callable) -> None:
    """Exercise 02.3: q_latent[b, t, h] = W^{UK}_h^T q_nope[b, t, h], shape (B, T, H, d_c)."""
    from deepseek_mini.mla import MLA

    ex = "absorb_query"
    torch.manual_seed(0)
    mla = MLA(dim=16, n_heads=3, kv_lora_rank=7, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4)
    w_uk = mla.up_weights()[0].detach()                   # (H=3, d_h=4, d_c=7)
    q_nope, c_kv = torch.randn(2, 5, 3, 4), torch.randn(2, 6, 7)
    got = _call(ex, absorb_query, q_nope, w_uk)
    if not isinstance(got, torch.Tensor):
        _fail(ex, f"should return a torch.Tensor, got {type(got).__name__}")
    if tuple(got.shape) != (2, 5, 3, 7):
        _fail(ex, f"q_latent has shape {tuple(got.shape)}, expected (2, 5, 3, 7) = (B, T, H, d_c)",
              "contract q_nope's d_h with w_uk's d_h, head by head, keeping b, t and h: einsum 'bthd,hdc->bthc'")
    # The property: q_latent . c_kv equals q_nope . k_nope with the explicit keys k_nope = W^{UK} c_kv (eq. 2).
    k_nope = torch.einsum("bsc,hdc->bshd", c_kv, w_uk)
    latent_scores = torch.einsum("bthc,bsc->bhts", got, c_kv)
    explicit_scores = torch.einsum("bthd,bshd->bhts", q_nope, k_nope)
    bad = ~torch.isclose(latent_scores, explicit_scores, atol=1e-4, rtol=1e-4)
    if bad.any():
        b, h, t, s = (int(i) for i in bad.nonzero()[0])
        wrong_heads = sorted({int(i) for i in bad.nonzero()[:, 1]})
        hint = ("q_latent = W^UK_h^T q_nope: sum over d_h, not over d_c (w_uk is (H, d_h, d_c))"
                if len(wrong_heads) == 3 else
                f"heads {wrong_heads} are wrong: use each head's own W^UK_h (h in both einsum inputs and the output)")
        got_s, expected_s = latent_scores[b, h, t, s].item(), explicit_scores[b, h, t, s].item()
        _fail(ex, "the absorption identity fails: q_latent . c_kv should equal q_nope . k_nope with "
                  f"k_nope = W^UK c_kv; first at batch {b}, head {h}, query {t}, key {s}: "
                  f"got {got_s:.6g}, expected {expected_s:.6g}", hint)
    assert_tensor_close(ex, got, torch.einsum("bthd,hdc->bthc", q_nope, w_uk), "q_latent")
    _passed(ex, "q_latent . c_kv equals q_nope . (W^UK c_kv) for every head, query and key")


def _absorbed_mistakes(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, mask, scale) -> list[tuple[str, torch.Tensor]]:
    """The outputs of the usual wrong versions of absorbed attention, each with the hint that fixes it."""
    def attend(scores, allowed=mask, dim=-1, w_out=w_uv):
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=dim)
        return torch.einsum("bhts,bsc,hdc->bthd", probs, c_kv, w_out)

    nope = torch.einsum("bthd,hdc,bsc->bhts", q_nope, w_uk, c_kv)
    rope = torch.einsum("bthr,bsr->bhts", q_rope, k_rope)
    scores = (nope + rope) * scale
    swapped = (torch.einsum("bthd,hdc,bsc->bhts", q_nope, w_uv, c_kv) + rope) * scale
    part_scaled = "scale the whole score, (q_latent . c_kv + q_rope . k_rope) * scale, not only one of its terms"
    return [
        ("the RoPE term is missing: score = (q_latent . c_kv + q_rope . k_rope) * scale", attend(nope * scale)),
        ("the scores are not multiplied by `scale`", attend(nope + rope)),
        (part_scaled, attend(nope * scale + rope)),
        (part_scaled, attend(nope + rope * scale)),
        ("`mask` is ignored: set the scores to -inf where mask is False, before the softmax",
         attend(scores, torch.ones_like(mask))),
        ("use the `mask` argument: a square lower-triangular mask ignores the cached positions",
         attend(scores, torch.ones_like(mask).tril())),
        ("the mask is inverted: True means 'may attend', so fill -inf where the mask is False (~mask)",
         attend(scores, ~mask)),
        ("the softmax runs over the wrong dimension: normalise over the keys (s in 'bhts')", attend(scores, dim=-2)),
        ("W^UK and W^UV are swapped: fold w_uk into the query and apply w_uv after the weighted sum",
         attend(swapped, w_out=w_uk)),
    ]


def check_absorbed_attention(absorbed_attention: Callable) -> None:
    """Exercise 02.4: attention in latent space equals attention on up-projected keys and values."""
    from deepseek_mini.attention import causal_mask
    from deepseek_mini.mla import absorbed_attention as reference, naive_attention

    ex = "absorbed_attention"
    B, H, d_h, d_r, d_c = 2, 3, 4, 2, 7
    scale = (d_h + d_r) ** -0.5
    torch.manual_seed(0)
    w_uk, w_uv = torch.randn(H, d_h, d_c) * 0.5, torch.randn(H, d_h, d_c) * 0.5
    for T, S, offset, case in ((5, 5, 0, "prefill, 5 tokens"), (2, 6, 4, "2 new tokens after 4 cached")):
        q_nope, q_rope = torch.randn(B, T, H, d_h), torch.randn(B, T, H, d_r)
        c_kv, k_rope = torch.randn(B, S, d_c), torch.randn(B, S, d_r)
        mask = causal_mask(T, S, offset)
        args = (q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, mask, scale)
        got = _call(ex, absorbed_attention, *args)
        # The equivalence: explicit per-head keys [W^UK c_kv; k_rope] and values W^UV c_kv (eqs. 2, 4, 5).
        k = torch.cat([torch.einsum("bsc,hdc->bshd", c_kv, w_uk), k_rope[:, :, None].expand(-1, -1, H, -1)], -1)
        v = torch.einsum("bsc,hdc->bshd", c_kv, w_uv)
        expected = naive_attention(torch.cat([q_nope, q_rope], -1), k, v, mask, scale)
        hint = "o[b, t, h] = W^UV_h (sum_s p[b, h, t, s] c_kv[b, s]) with p = softmax over s of the masked scores"
        if isinstance(got, torch.Tensor):
            if tuple(got.shape) == (B, T, H, d_c):
                hint = "this is the output in latent space (d_c): project it back with each head's W^UV_h"
            elif tuple(got.shape) == (B, H, T, d_h):
                hint = "return (B, T, H, d_h): tokens before heads"
            elif tuple(got.shape) == tuple(expected.shape) and not torch.allclose(got, expected, atol=1e-5):
                for mistake_hint, wrong in _absorbed_mistakes(*args):
                    if torch.allclose(got, wrong, atol=1e-5, equal_nan=True):
                        hint = mistake_hint
                        break
        assert_tensor_close(ex, got, expected, f"output ({case}) vs naive attention on up-projected keys and values",
                            hint=hint)
        assert_tensor_close(ex, got, reference(*args), f"output ({case}) vs the package's absorbed_attention",
                            hint=hint)
    _passed(ex, "equals attention on explicit keys [W^UK c_kv; k_rope] and values W^UV c_kv, without forming them")


# ----------------------------------------------------------------------- chapter 03


def _routing_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Affinities s (T=4, N_r=8 experts) and a bias b that makes every biased score s + b negative."""
    g = torch.Generator().manual_seed(3)
    s = torch.rand(4, 8, generator=g)
    bias = torch.rand(8, generator=g) * 0.2 - 1.5
    return s, bias


def _variant_topk(scores: torch.Tensor, k: int, n_group: int, topk_group: int, group_score: str = "top2",
                  fill: float = float("-inf"), strided: bool = False) -> list[list[int]]:
    """A usual wrong version of group-limited top-k, for diagnosis: the sorted expert list of each token."""
    t, n = scores.shape
    grouped = scores.view(t, n // n_group, n_group).transpose(1, 2) if strided else scores.view(t, n_group, -1)
    score = grouped.amax(-1) if group_score == "max" else grouped.topk(min(2, grouped.shape[-1]), -1).values.sum(-1)
    keep = torch.zeros(t, n_group, dtype=torch.bool).scatter_(1, score.topk(topk_group, -1).indices, True)
    masked = grouped.masked_fill(~keep[..., None], fill)
    masked = (masked.transpose(1, 2) if strided else masked).flatten(1)
    return [sorted(r) for r in masked.topk(k, dim=-1).indices.tolist()]


def check_group_limited_topk(group_limited_topk: Callable) -> None:
    """Exercise 03.1: group-limited top-k over the biased scores s + b (DeepSeek-V3 §2.1.2, eq. 13)."""
    from deepseek_mini.moe import group_limited_topk as reference

    ex = "group_limited_topk"
    s, bias = _routing_case()
    g = torch.Generator().manual_seed(4)
    v3_scores = torch.rand(16, 256, generator=g) + (torch.rand(256, generator=g) - 0.5) * 0.1
    cases = [(s + bias, 3, 4, 2, "8 experts in 4 groups, negative biased scores"),
             (s, 2, 2, 1, "8 experts in 2 groups"),
             (s + bias, 4, 1, 1, "a single group: plain top-k"),
             (v3_scores, 8, 8, 4, "DeepSeek-V3's routing: 256 experts, 8 groups, 4 kept, top-8")]
    for scores, k, n_group, topk_group, case in cases:
        got = _call(ex, group_limited_topk, scores.clone(), k, n_group, topk_group)
        expected = reference(scores, k, n_group, topk_group)
        if not isinstance(got, torch.Tensor) or got.dtype != torch.long:
            _fail(ex, "should return expert *indices* (a torch.long tensor), got "
                  f"{got.dtype if isinstance(got, torch.Tensor) else type(got).__name__}",
                  "use .topk(...).indices, not .values")
        if tuple(got.shape) != tuple(expected.shape):
            _fail(ex, f"returned shape {tuple(got.shape)}, expected {tuple(expected.shape)} = (tokens, topk)",
                  "top-k over the expert dimension (the last one) of the masked (T, N_r) scores")
        got_sets, expected_sets = [sorted(r) for r in got.tolist()], [sorted(r) for r in expected.tolist()]
        if got_sets == expected_sets:       # the order of the chosen experts does not matter
            continue
        t = next(i for i, (a, b) in enumerate(zip(got_sets, expected_sets)) if a != b)
        mistakes = [(_variant_topk(scores, k, n_group, topk_group, fill=0.0),
                     "mask the dropped groups with float('-inf'), not 0: these biased scores are negative, "
                     "so a 0 beats every kept expert"),
                    (_variant_topk(scores, k, n_group, topk_group, group_score="max"),
                     "score each group by the sum of its two highest biased scores, not by its maximum"),
                    ([sorted(r) for r in scores.topk(k, dim=-1).indices.tolist()],
                     "restrict the choice to the topk_group best groups before the final top-k"),
                    (_variant_topk(scores, k, n_group, topk_group, strided=True),
                     "a group is n_routed_experts // n_group *consecutive* experts: "
                     "view(T, n_group, N_r // n_group), not (T, N_r // n_group, n_group)")]
        hint = next((h for wrong, h in mistakes if wrong == got_sets),
                    "group score = sum of the top-2 scores in each group; keep topk_group groups; mask the rest "
                    "with -inf; then top-k")
        n_bad = sum(a != b for a, b in zip(got_sets, expected_sets))
        _fail(ex, f"{case} (n_group={n_group}, topk_group={topk_group}, topk={k}): {n_bad} of {len(got_sets)} "
              f"tokens chose the wrong experts; first token {t}: chose {got_sets[t]}, expected {expected_sets[t]}",
              hint)
    _passed(ex, "matches the reference, with negative biased scores, one group, and V3's 8 groups / top-4 / top-8")


def check_routing_weights(routing_weights: Callable) -> None:
    """Exercise 03.2: gates from the *unbiased* affinities, normalised, times route_scale (eqs. 13, 16).

    The exercise's signature is ``routing_weights(scores, bias, indices, route_scale)``: the bias
    is passed in (and the biased scores are negative) so that using it shows up and is named.
    """
    from deepseek_mini.moe import routing_weights as reference

    ex = "routing_weights"
    s, bias = _routing_case()
    indices = (s + bias).topk(3, dim=-1).indices
    got = _call(ex, routing_weights, s.clone(), bias.clone(), indices, 2.5)
    expected = reference(s, indices, 2.5)
    chosen, biased = s.gather(1, indices), (s + bias).gather(1, indices)
    hint = "gather s at the chosen indices, divide by their sum over the K chosen experts, multiply by route_scale"
    if isinstance(got, torch.Tensor) and got.shape == expected.shape and not torch.allclose(got, expected, atol=1e-5):
        mistakes = [(biased / biased.sum(-1, keepdim=True) * 2.5,
                     "the bias only chooses experts: take the gate values from the unbiased scores s (eq. 16)"),
                    (biased * 2.5, "use the unbiased scores s (the bias only chooses experts), and normalise them "
                                   "over the chosen experts"),
                    (chosen * 2.5, "normalise the chosen scores so they sum to 1 before scaling (eq. 13)"),
                    (chosen / chosen.sum(-1, keepdim=True),
                     "multiply by route_scale (routed_scaling_factor, 2.5 in V3)"),
                    (chosen, "normalise over the chosen experts, then multiply by route_scale"),
                    (chosen / s.sum(-1, keepdim=True) * 2.5,
                     "normalise over the K *chosen* experts only, not over all N_r experts")]
        hint = next((h for wrong, h in mistakes if torch.allclose(got, wrong, atol=1e-5)), hint)
    assert_tensor_close(ex, got, expected, "gates (T, K)", hint=hint)
    _passed(ex, "gates come from the unbiased scores, normalised over the chosen experts, times route_scale")


def check_update_bias(update_bias: Callable) -> None:
    """Exercise 03.3: b_new = b + gamma * sign(mean load - load), returned as a *new* tensor.

    The exercise asks for a pure function: the bias passed in must stay unchanged (the package's
    ``moe.update_bias`` updates the router's buffer in place; the exercise does not).
    """
    from deepseek_mini.moe import update_bias as reference

    ex = "update_bias"
    bias = torch.tensor([0.0, 0.1, -0.2, 0.05, 0.3])
    load = torch.tensor([6.0, 2.0, 3.0, 1.0, 3.0])              # mean 3: experts 2 and 4 sit exactly at it
    original = bias.clone()
    got = _call(ex, update_bias, bias, load.clone(), 0.01)
    expected = reference(original.clone(), load, 0.01)              # [-0.01, 0.11, -0.2, 0.06, 0.3]
    if got is None:
        _fail(ex, "returned None" + (" after changing the bias passed in" if not torch.equal(bias, original) else ""),
              "return the new bias as a new tensor: `return bias + gamma * ...` (do not update in place)")
    hint = "b + gamma * sign(load.mean() - load)"
    if isinstance(got, torch.Tensor) and got.shape == expected.shape and not torch.allclose(got, expected, atol=1e-7):
        mistakes = [(original - 0.01 * torch.sign(load.mean() - load),
                     "the sign is flipped: an overloaded expert (load above the mean) must go *down*"),
                    (original + 0.01 * (load.mean() - load),
                     "use only the sign of (mean - load): every bias moves by exactly gamma"),
                    (original + 0.01 * torch.where(load > load.mean(), -1.0, 1.0),
                     "an expert exactly at the mean load keeps its bias: sign(0) = 0"),
                    (original + 0.01 * torch.where(load < load.mean(), 1.0, -1.0),
                     "an expert exactly at the mean load keeps its bias: sign(0) = 0")]
        hint = next((h for wrong, h in mistakes if torch.allclose(got, wrong, atol=1e-7)), hint)
    assert_tensor_close(ex, got, expected, f"new bias for load {load.tolist()}, gamma 0.01", atol=1e-7, rtol=0,
                        hint=hint)
    if not torch.equal(bias, original):
        _fail(ex, "modified the bias passed in (the returned values are right)", "return a new tensor (b + ...) instead of updating in place")
    _passed(ex, "overloaded experts go down by gamma, underloaded go up, experts at the mean stay")


def check_sequence_balance_loss(sequence_balance_loss: Callable) -> None:
    """Exercise 03.4: eqs. 17-20 per sequence, averaged over the sequences of a batch."""
    from deepseek_mini.moe import sequence_balance_loss as reference

    ex = "sequence_balance_loss"
    g = torch.Generator().manual_seed(5)
    s = torch.rand(3, 6, 8, generator=g)
    idx = (s + torch.rand(8, generator=g)).topk(2, dim=-1).indices
    scores = s.clone().requires_grad_()
    got = _call(ex, sequence_balance_loss, scores, idx, 0.01)
    expected = reference(s, idx, 0.01)
    if not isinstance(got, torch.Tensor) or got.numel() != 1:
        _fail(ex, f"should return a scalar tensor, got {got!r}"[:200], "return alpha * (f * P).sum(-1).mean()")
    hint = "L = alpha * sum_i f_i P_i per sequence, f_i = N_r/(K_r T) * count_i, P_i = mean_t s'_i,t; then the mean"
    if not torch.allclose(got.detach().reshape(()), expected, rtol=1e-5):
        n, k, t = 8, 2, 6
        chosen = torch.zeros_like(s).scatter_(-1, idx, 1.0)
        p = (s / s.sum(-1, keepdim=True)).mean(1)
        mistakes = [(0.01 * (chosen.sum(1) / t * p).sum(-1).mean(), "f_i carries the factor N_r / K_r (eq. 18): "
                     "a perfectly balanced router then has f_i = 1"),
                    (0.01 * (chosen.sum(1) * n / (k * t) * s.mean(1)).sum(-1).mean(),
                     "P_i averages the *normalised* scores s' = s / sum_j s_j (eqs. 19-20)"),
                    (reference(s.reshape(1, -1, 8), idx.reshape(1, -1, 2), 0.01),
                     "compute f and P per sequence (over its T tokens), then average the per-sequence losses; "
                     "pooling the whole batch is the batch-wise auxiliary loss"),
                    (reference(s, idx, 0.01) * 3, "average the per-sequence losses over the batch, do not sum them")]
        hint = next((h for wrong, h in mistakes if torch.allclose(got.detach().reshape(()), wrong, rtol=1e-5)), hint)
    assert_tensor_close(ex, got.detach().reshape(()), expected, "loss (B=3 sequences, T=6, N_r=8, K_r=2, alpha=0.01)",
                        rtol=1e-5, hint=hint)
    if not got.requires_grad:
        _fail(ex, "the loss carries no gradient to the scores", "gradients reach the router through P_i: compute it "
              "from `scores` with differentiable operations (no .detach(), .item() or torch.no_grad())")
    uniform = torch.full((1, 4, 4), 0.5)
    balanced = torch.tensor([[[0, 1], [2, 3], [0, 2], [1, 3]]])
    value = _call(ex, sequence_balance_loss, uniform, balanced, 0.003)
    if abs(float(value) - 0.003) > 1e-9:
        _fail(ex, f"a perfectly balanced router should give exactly alpha = 0.003, got {float(value):.6g}", hint)
    _passed(ex, "equals eqs. 17-20 averaged over sequences; differentiable; a balanced router gives exactly alpha")


def check_max_violation(max_violation: Callable) -> None:
    """Exercise 03.5: MaxVio = max load / mean load - 1, a Python float."""
    from deepseek_mini.moe import max_violation as reference

    ex = "max_violation"
    g = torch.Generator().manual_seed(6)
    random_load = torch.bincount(torch.randint(0, 16, (200,), generator=g), minlength=16).float()
    loads = [[4.0, 2, 2, 0], [3.0, 3, 3, 3], [8.0, 0, 0, 0], [5.0, 1, 0], random_load.tolist()]
    for load in loads:
        got = _call(ex, max_violation, torch.tensor(load))
        expected = reference(torch.tensor(load))
        if isinstance(got, torch.Tensor):
            _fail(ex, "returned a tensor", "return a Python float: call .item()")
        if not isinstance(got, float):
            _fail(ex, f"should return a float, got {type(got).__name__}")
        if abs(got - expected) > 1e-6:
            mean = sum(load) / len(load)
            hint = ("subtract 1: a perfectly balanced load has MaxVio 0" if abs(got - expected - 1) < 1e-6 else
                    "divide the maximum load by the *mean* load" if abs(got - (max(load) / sum(load) - 1)) < 1e-6 else
                    "the busiest expert counts: max, not min" if abs(got - (min(load) / mean - 1)) < 1e-6 else
                    "MaxVio = max_i load_i / mean_i load_i - 1")
            shown = load if len(load) <= 8 else f"{load[:4]} ... ({len(load)} experts)"
            _fail(ex, f"MaxVio of load {shown} is {got:.6g}, expected {expected:.6g}", hint)
    _passed(ex, "MaxVio = max / mean - 1 on hand-computed and random loads")


# ----------------------------------------------------------------------- chapter 04


def _call_safe(exercise: str, fn: Callable, case: str, *args, hint: str | None = None):
    """Run the learner's function on ``case``; any exception it raises becomes a CheckFailure naming the case."""
    try:
        return _call(exercise, fn, *args)
    except CheckFailure:
        raise
    except Exception as exc:        # a broken solution is a failed check, never a crash of the check
        _fail(exercise, f"raised {type(exc).__name__} on {case}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
              hint or "run your function on this input in a cell of your own to see where it fails")


def _tensor_of(exercise: str, got, name: str, shape: tuple, dtype: torch.dtype,
               hint: str | None = None) -> torch.Tensor:
    """``got`` as a tensor of this shape and dtype, or a CheckFailure that says what it is instead."""
    if not isinstance(got, torch.Tensor):
        _fail(exercise, f"{name} should be a torch.Tensor, got {type(got).__name__}", hint)
    if tuple(got.shape) != tuple(shape):
        _fail(exercise, f"{name} has shape {tuple(got.shape)}, expected {tuple(shape)}", hint)
    if got.dtype != dtype:
        _fail(exercise, f"{name} has dtype {got.dtype}, expected {dtype}", hint)
    return got.detach()


def _number_of(exercise: str, got, case: str, hint: str) -> float:
    """``got`` as a finite Python float (a number or a one-element tensor), or a CheckFailure saying what it is."""
    if isinstance(got, torch.Tensor) and got.numel() == 1 and got.dtype != torch.bool:
        got = got.item()
    if isinstance(got, bool) or not isinstance(got, numbers.Real):
        _fail(exercise, f"{case} returned {type(got).__name__}; expected a number", hint)
    got = float(got)
    if not math.isfinite(got):
        _fail(exercise, f"{case} returned {got}; expected a finite number", hint)
    return got


def _shift_variant(labels: torch.Tensor, length: int, start: int, fill: int, left: bool = False) -> torch.Tensor:
    """labels[:, start : start + length], padded to ``length`` with ``fill`` (at the end, or at the start)."""
    piece = labels[:, max(start, 0):max(start, 0) + length]
    pad = length - piece.shape[1]
    return torch.nn.functional.pad(piece, (pad, 0) if left else (0, pad), value=fill)


def check_mtp_shift(mtp_shift: Callable) -> None:
    """Exercise 04.1: depth k's inputs t_{i+k} = labels[:, k-1 : k-1+T] and targets t_{i+k+1} = labels[:, k : k+T]."""
    from deepseek_mini.mtp import IGNORE_INDEX
    from deepseek_mini.mtp import mtp_shift as reference

    ex = "mtp_shift"
    hand = torch.arange(11, 16)[None]        # the labels of inputs 10..13 in the window 10..15
    rand = torch.randint(1, 50, (2, 7), generator=torch.Generator().manual_seed(7))   # no 0: padding shows
    cases = [(hand, 4, 1, "labels [[11, 12, 13, 14, 15]], length 4, depth 1"),
             (hand, 4, 2, "labels [[11, 12, 13, 14, 15]], length 4, depth 2"),
             (hand[:, :4], 4, 1, "a plain T + 1 window: labels [[11, 12, 13, 14]], length 4, depth 1"),
             (rand, 6, 3, "random labels (2, 7), length 6, depth 3")]
    general = ("inputs = labels[:, k-1 : k-1+T] padded with 0 at the end, "
               "targets = labels[:, k : k+T] padded with IGNORE_INDEX (-100) at the end")
    for labels, length, depth, case in cases:
        got = _call_safe(ex, mtp_shift, case, labels.clone(), length, depth)
        inputs, targets = reference(labels, length, depth)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            _fail(ex, f"should return a pair (inputs, targets), got {type(got).__name__}"
                  + (f" of length {len(got)}" if isinstance(got, (tuple, list)) else ""), "return inputs, targets")
        shape_hint = ("both are (batch, length): pad the positions beyond the window "
                      "(inputs with 0, targets with IGNORE_INDEX), do not drop them")
        got_in = _tensor_of(ex, got[0], f"inputs for {case}", inputs.shape, torch.long, shape_hint)
        got_tgt = _tensor_of(ex, got[1], f"targets for {case}", targets.shape, torch.long, shape_hint)
        if torch.equal(got_in, targets) and torch.equal(got_tgt, inputs) and not torch.equal(inputs, targets):
            _fail(ex, f"{case}: inputs and targets are swapped", "return (inputs, targets), in that order")
        for name, got_part, expected, start, fill in (("inputs", got_in, inputs, depth - 1, 0),
                                                      ("targets", got_tgt, targets, depth, IGNORE_INDEX)):
            if torch.equal(got_part, expected):
                continue
            mistakes = [(_shift_variant(labels, length, start + 1, fill),
                         f"off by one: depth k's {name} start at labels[:, {'k-1' if name == 'inputs' else 'k'}] "
                         "(labels[:, j] is the token *after* input j, so t_{i+k} = labels[:, i+k-1])"),
                        (_shift_variant(labels, length, start - 1, fill),
                         f"off by one: depth k's {name} start at labels[:, {'k-1' if name == 'inputs' else 'k'}]; "
                         + ("labels[:, k-1 : k-1+T] are its inputs, its targets are one token later"
                            if name == "targets" else "you took depth k-1's inputs")),
                        (_shift_variant(labels, length, start, fill, left=True),
                         f"pad the {name} at the end (the right): position i of depth k is token i's slot, "
                         "so the missing tokens are the last positions'"),
                        (_shift_variant(labels, length, start, 0 if fill == IGNORE_INDEX else IGNORE_INDEX),
                         "pad the targets with IGNORE_INDEX (-100), not 0: a 0 target would train the model to "
                         "predict token 0 where the window has no token" if name == "targets" else
                         "pad the inputs with token 0: -100 is not a token id (the embedding cannot look it up); "
                         "causal attention keeps the padded inputs from every earlier position")]
            hint = next((h for wrong, h in mistakes if torch.equal(got_part, wrong)), general)
            assert_tensor_close(ex, got_part, expected, f"{name} for {case}", hint=hint)
    _passed(ex, "inputs labels[:, k-1 : k-1+T] padded with 0, targets labels[:, k : k+T] padded with IGNORE_INDEX")


def _depth_loss_variant(logits: torch.Tensor, labels: torch.Tensor, start: int, fill: int | None = None,
                        over_all: bool = False, reduction: str = "mean",
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The depth loss with targets labels[:, start : start + T], for diagnosis of the usual mistakes."""
    from deepseek_mini.mtp import IGNORE_INDEX

    length = logits.shape[1]
    targets = _shift_variant(labels, length, start, IGNORE_INDEX if fill is None else fill)
    nll = torch.nn.functional.cross_entropy(logits.to(dtype).flatten(0, 1), targets.flatten(),
                                            ignore_index=IGNORE_INDEX, reduction="none")
    if reduction == "sum":
        return nll.sum().float()
    count = nll.numel() if over_all else (targets != IGNORE_INDEX).sum()
    return (nll.sum() / count).float()


def check_mtp_depth_loss(mtp_depth_loss: Callable) -> None:
    """Exercise 04.2: L^k_MTP (eq. 24), the mean cross-entropy over depth k's positions that have a target."""
    from deepseek_mini.mtp import mtp_losses

    ex = "mtp_depth_loss"
    g = torch.Generator().manual_seed(8)
    vocab = 11
    cases = [(torch.randn(2, 5, vocab, generator=g) * 2, torch.randint(0, vocab, (2, 5), generator=g), 3,
              "logits (2, 5, 11), a plain window of labels (2, 5), depth 3 (2 of 5 positions have a target)"),
             (torch.randn(2, 5, vocab, generator=g) * 2, torch.randint(0, vocab, (2, 5), generator=g), 1,
              "logits (2, 5, 11), labels (2, 5), depth 1 (the last position has no target)"),
             (torch.randn(3, 7, vocab, generator=g) * 2, torch.randint(0, vocab, (3, 9), generator=g), 2,
              "logits (3, 7, 11), a T + D window of labels (3, 9), depth 2 (every position has a target)"),
             ((torch.randn(2, 6, vocab, generator=g) * 4).bfloat16(), torch.randint(0, vocab, (2, 7), generator=g), 1,
              "bfloat16 logits (2, 6, 11), labels (2, 7), depth 1")]
    general = ("targets = labels[:, k : k+T]; the last positions have none when the window ends; "
               "average -log softmax(logits)[target] over the positions that have one")
    for logits, labels, depth, case in cases:
        leaf = logits.clone().requires_grad_()
        got = _call_safe(ex, mtp_depth_loss, case, leaf, labels.clone(), depth)
        expected = mtp_losses([logits] * depth, labels)[depth - 1]
        if not isinstance(got, torch.Tensor) or got.numel() != 1:
            shape = f"shape {tuple(got.shape)}" if isinstance(got, torch.Tensor) else type(got).__name__
            _fail(ex, f"should return a scalar tensor, got {shape} for {case}",
                  "average over the positions with a target: one number per depth (a float would carry no gradient)")
        if logits.dtype == torch.bfloat16 and got.dtype != torch.float32:
            _fail(ex, f"returned a {got.dtype} loss for {case}", "compute the cross-entropy in float32 "
                  "(logits.float() before the softmax): bf16 keeps about 3 significant digits, too few for a loss")
        value = got.detach().reshape(()).float()
        if not torch.isclose(value, expected, rtol=1e-5, atol=1e-6):
            mistakes = [(dict(start=depth, over_all=True), "divide by the number of positions that have a target, "
                         "not by B*T: the masked positions add nothing to the sum and must not count in the mean"),
                        (dict(start=depth, fill=0), "the positions beyond the window have no target: leave them out "
                         "(or mark them IGNORE_INDEX), do not score them against token 0"),
                        (dict(start=0), "depth k predicts t_{i+k+1}: its targets are labels[:, k : k+T]; "
                                        "labels[:, :T] are the main model's (depth 0) targets"),
                        (dict(start=depth - 1), "off by one: depth k's targets are labels[:, k : k+T]; "
                                                "labels[:, k-1 : k-1+T] are its inputs"),
                        (dict(start=depth + 1), "off by one: depth k's targets are labels[:, k : k+T]"),
                        (dict(start=depth, reduction="sum"), "eq. 24 averages over positions: a mean, not a sum"),
                        (dict(start=depth, dtype=logits.dtype), "compute the cross-entropy in float32 "
                         "(logits.float() before the softmax): bf16 keeps about 3 significant digits")]
            hint = next((h for kw, h in mistakes
                         if torch.isclose(value, _depth_loss_variant(logits, labels, **kw), rtol=1e-5, atol=1e-6)),
                        "the loss is NaN: a mean over no positions, or the log of a 0 probability? Use log_softmax"
                        if value.isnan() else general)
            if logits.dtype == torch.bfloat16 and torch.isclose(value, expected, rtol=2e-2) and hint == general:
                hint = mistakes[-1][1]          # near, not equal: computed in bf16, then cast
            _fail(ex, f"{case}: got {value.item():.6g}, expected {expected.item():.6g}", hint)
        if not got.requires_grad:
            _fail(ex, f"{case}: the loss carries no gradient to the logits", "compute it from `logits` with "
                  "differentiable operations (no .detach(), .item(), torch.no_grad() or integer casts)")
    _passed(ex, "the mean cross-entropy over the positions with a target (eq. 24), in float32, differentiable")


def _greedy_verify_reference(logits: torch.Tensor, draft: int) -> list[int]:
    """Accept the draft iff it is the main model's argmax for its position; then the bonus token follows."""
    choice, bonus = int(logits[0].argmax()), int(logits[1].argmax())
    return [draft, bonus] if choice == draft else [choice]


def _token_list(exercise: str, got, case: str) -> list[int]:
    """A list/tuple of ints (or 0-d tensors) or a 1-D integer tensor, as a list of ints."""
    hint = "return a list of token ids: [draft, bonus] when the draft is accepted, [main model's token] when not"
    items = got.tolist() if isinstance(got, torch.Tensor) and got.dim() == 1 else got
    if not isinstance(items, (list, tuple)):
        _fail(exercise, f"{case}: should return a list of token ids, got {type(got).__name__}", hint)
    tokens = []
    for item in items:
        try:                    # ints, NumPy ints and one-element integer tensors; not floats or bools
            if isinstance(item, bool) or (isinstance(item, torch.Tensor) and item.dtype == torch.bool):
                raise TypeError
            tokens.append(operator.index(item))
        except TypeError:
            _fail(exercise, f"{case}: should return a list of token ids (ints), got an element of type "
                  f"{type(item).__name__}", hint)
    return tokens


def _verify_logits(choice: int, bonus: int, vocab: int = 6, seed: int = 0) -> torch.Tensor:
    """(2, vocab) logits whose argmaxes are ``choice`` (row 0) and ``bonus`` (row 1), with clear margins."""
    logits = torch.rand(2, vocab, generator=torch.Generator().manual_seed(seed))
    logits[0, choice] += 2.0
    logits[1, bonus] += 2.0
    return logits


_REJECTED_EMITTED = ("a rejected draft is never emitted: the main model disagreed, so its own token "
                     "argmax(logits[0]) replaces the draft")
_WRONG_ROW = ("compare the draft with argmax(logits[0]): row 0 is the main model's prediction for the draft's "
              "position; row 1 predicts the token after the draft")
_NO_BONUS = ("an accepted draft brings a bonus token: logits[1] is the main model's prediction after the draft, "
             "so emit [draft, argmax(logits[1])]: two tokens for one forward pass")
# The usual wrong verify steps, as functions of (choice = argmax row 0, bonus = argmax row 1, draft).
_VERIFY_MISTAKES: list[tuple[Callable[[int, int, int], list[int]], str]] = [
    (lambda c, b, d: [d, b], _REJECTED_EMITTED),
    (lambda c, b, d: [d, b] if c == d else [d], _REJECTED_EMITTED),
    (lambda c, b, d: [d] if c == d else [c], _NO_BONUS),
    (lambda c, b, d: [d, b] if c == d else [c, b],
     "after a rejection emit only argmax(logits[0]): logits[1] was computed with the rejected draft in the context, "
     "so its prediction is discarded"),
    (lambda c, b, d: [d, b] if b == d else [b], _WRONG_ROW),
    (lambda c, b, d: [d, b] if b == d else [c], _WRONG_ROW),
    (lambda c, b, d: [d, c] if c == d else [c],
     "the bonus token is argmax(logits[1]), the main model's prediction after the accepted draft"),
]


def check_greedy_verify(greedy_verify: Callable) -> None:
    """Exercise 04.3: the greedy verify step of self-speculative decoding (DeepSeek-V3 §5.4.3)."""
    ex = "greedy_verify"
    # (choice = argmax of row 0, bonus = argmax of row 1, draft)
    cases = [(3, 5, 3, "accepted"), (2, 1, 4, "rejected"), (1, 4, 4, "rejected; row 1's argmax equals the draft"),
             (0, 2, 0, "accepted; row 1's argmax differs from the draft"), (5, 5, 5, "accepted; the bonus repeats")]
    got_all, expected_all, names = [], [], []
    for number, (choice, bonus, draft, kind) in enumerate(cases):
        logits = _verify_logits(choice, bonus, seed=number)
        case = f"argmax(logits[0]) = {choice}, argmax(logits[1]) = {bonus}, draft {draft} ({kind})"
        got_all.append(_token_list(ex, _call_safe(ex, greedy_verify, case, logits.clone(), draft), case))
        expected_all.append(_greedy_verify_reference(logits, draft))
        names.append(case)
    if got_all != expected_all:
        # Name the mistake by the learner's answers on all five cases: one case alone is ambiguous.
        hint = next((h for wrong, h in _VERIFY_MISTAKES if [wrong(c, b, d) for c, b, d, _ in cases] == got_all),
                    "accept iff draft == argmax(logits[0]); accepted: [draft, argmax(logits[1])]; "
                    "rejected: [argmax(logits[0])]")
        at = next(i for i, (a, b) in enumerate(zip(got_all, expected_all)) if a != b)
        _fail(ex, f"{names[at]}: returned {got_all[at]}, expected {expected_all[at]}", hint)

    # The property: with this step, speculative decoding emits exactly plain greedy decoding's tokens.
    vocab, steps = 8, 24
    following = torch.tensor([3, 6, 0, 5, 1, 7, 2, 4])          # greedy bigram "main model": one cycle 0 3 5 7 4 1 6 2
    table = torch.rand(vocab, vocab, generator=torch.Generator().manual_seed(9))
    table[torch.arange(vocab), following] += 2.0
    guess = torch.where(torch.arange(vocab) % 2 == 0, following, (following + 1) % vocab)   # right after even tokens
    plain, token = [], 0
    for _ in range(steps):
        token = int(table[token].argmax())
        plain.append(token)
    fast = [int(table[0].argmax())]
    for _ in range(steps):
        if len(fast) >= steps:
            break
        last, draft = fast[-1], int(guess[fast[-1]])
        case = f"a bigram model's decoding step after token {last}, draft {draft}"
        emitted = _token_list(ex, _call_safe(ex, greedy_verify, case, table[[last, draft]].clone(), draft), case)
        if not 1 <= len(emitted) <= 2:
            _fail(ex, f"{case}: returned {len(emitted)} tokens", "a verify step emits one or two tokens")
        fast += emitted
    if fast[:steps] != plain:
        at = next(i for i, (a, b) in enumerate(zip(fast, plain)) if a != b)
        _fail(ex, f"speculative decoding of a bigram model with your step differs from plain greedy decoding "
              f"at token {at}: {fast[at]} instead of {plain[at]}",
              "every emitted token must be the main model's argmax given the tokens before it")
    _passed(ex, "accepts exactly the main model's argmax, adds the bonus, and decodes like plain greedy decoding")


def _speculative_rule_reference(p: torch.Tensor, q: torch.Tensor,
                                draft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """min(1, p(d)/q(d)) and max(p - q, 0) normalised (p itself where p == q: the residual is never drawn)."""
    p_d, q_d = p.gather(-1, draft[..., None])[..., 0], q.gather(-1, draft[..., None])[..., 0]
    residual = (p - q).clamp(min=0)
    total = residual.sum(-1, keepdim=True)
    return (p_d / q_d).clamp(max=1.0), torch.where(total > 0, residual / total.clamp(min=1e-30), p)


def _emitted_distribution(p: torch.Tensor, q: torch.Tensor, accept_all: torch.Tensor,
                          residual: torch.Tensor) -> torch.Tensor:
    """P(token x) = q(x) a(x) + (1 - sum_y q(y) a(y)) r(x): the rule's output distribution, exactly."""
    kept = q * accept_all
    return kept + (1 - kept.sum(-1, keepdim=True)) * residual


def check_speculative_rule(speculative_rule: Callable) -> None:
    """Exercise 04.4: the accept/reject rule of speculative sampling (Leviathan et al. 2023, Theorem 1)."""
    from deepseek_mini.generate import token_distribution

    ex = "speculative_rule"
    p_hand = torch.tensor([[0.5, 0.2, 0.2, 0.1, 0.0]] * 4)
    q_hand = torch.tensor([[0.2, 0.2, 0.25, 0.25, 0.1]] * 4)
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 6, 12, generator=g) * 1.5
    p_rand = token_distribution(logits[0], temperature=1.0, top_k=8)       # some zeros: filtered tokens
    q_rand = token_distribution(logits[1], temperature=0.8)
    same = torch.softmax(torch.randn(2, 12, generator=g), dim=-1)
    cases = [(p_hand, q_hand, torch.tensor([0, 1, 3, 4]), "p = [0.5, 0.2, 0.2, 0.1, 0], q = [0.2, 0.2, 0.25, "
              "0.25, 0.1], drafts 0, 1, 3, 4 (p/q = 2.5, 1, 0.4, 0)"),
             (p_rand, q_rand, torch.multinomial(q_rand, 1, generator=g)[:, 0],
              "random p (top-k filtered) and q over 12 tokens, 6 drafts drawn from q"),
             (same, same.clone(), torch.tensor([3, 7]), "p == q (the draft is exactly the target)")]
    general = "accept = min(1, p[d] / q[d]); residual = max(p - q, 0) / its sum (p itself when that sum is 0)"
    for p, q, draft, case in cases:
        got = _call_safe(ex, speculative_rule, case, p.clone(), q.clone(), draft.clone())
        accept, residual = _speculative_rule_reference(p, q, draft)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            _fail(ex, f"should return a pair (accept, residual), got {type(got).__name__}", "return accept, residual")
        got_accept = _tensor_of(ex, got[0], f"accept for {case}", accept.shape, accept.dtype,
                                "one acceptance probability per draft: shape (N,), float")
        got_residual = _tensor_of(ex, got[1], f"residual for {case}", residual.shape, residual.dtype,
                                  "one distribution per draft: shape (N, V), like p")
        p_d, q_d = p.gather(-1, draft[:, None])[:, 0], q.gather(-1, draft[:, None])[:, 0]
        if not torch.allclose(got_accept, accept, atol=1e-6, equal_nan=True):
            mistakes = [((q_d / p_d).clamp(max=1.0), "the ratio is p(d) / q(d), target over draft: a draft the "
                         "target likes more than the draft model does is always kept"),
                        (p_d / q_d, "clamp at 1 (min(1, p/q)): it is a probability"),
                        (q_d / p_d, "the ratio is p(d) / q(d), and it is clamped at 1"),
                        (p_d, "divide by q(d): the draft was proposed with probability q(d), and p(d) / q(d) "
                              "corrects for it")]
            hint = next((h for wrong, h in mistakes if torch.allclose(got_accept, wrong, atol=1e-6)), general)
            assert_tensor_close(ex, got_accept, accept, f"accept for {case}", atol=1e-6, hint=hint)
        if not torch.allclose(got_residual, residual, atol=1e-6):
            raw = p - q
            mistakes = [(raw.clamp(min=0), "normalise the residual: divide max(p - q, 0) by its sum"),
                        (raw, "clamp p - q at 0, then normalise"),
                        ((q - p).clamp(min=0) / (q - p).clamp(min=0).sum(-1, keepdim=True).clamp(min=1e-30),
                         "the residual is max(p - q, 0): the tokens the draft proposes *less* often than the target"),
                        (p.expand_as(residual), "after a rejection draw from max(p - q, 0) normalised, not from p: the "
                                                "accepted drafts already supply min(p, q) of each token")]
            hint = next((h for wrong, h in mistakes if torch.allclose(got_residual, wrong, atol=1e-6)), general)
            if got_residual.isnan().any() and (residual == p).all():
                hint = ("when p == q, max(p - q, 0) is all zeros and 0 / 0 is NaN: the draft is always accepted, "
                        "so the residual is never drawn; return p there (torch.where on the sum)")
            assert_tensor_close(ex, got_residual, residual, f"residual for {case}", atol=1e-6, hint=hint)

    # Theorem 1: whatever q is, the token that comes out is distributed exactly as p.
    n, vocab = p_rand.shape
    every = torch.arange(vocab).repeat(n)                       # every possible draft of every row
    case = "every possible draft of the random case"
    got = _call_safe(ex, speculative_rule, case, p_rand.repeat_interleave(vocab, 0),
                     q_rand.repeat_interleave(vocab, 0), every)
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        _fail(ex, f"should return a pair (accept, residual), got {type(got).__name__}", "return accept, residual")
    accept_all = _tensor_of(ex, got[0], f"accept for {case}", (n * vocab,), torch.float32).view(n, vocab)
    residual = _tensor_of(ex, got[1], f"residual for {case}", (n * vocab, vocab), torch.float32)[::vocab]
    emitted = _emitted_distribution(p_rand, q_rand, accept_all, residual)
    if not torch.allclose(emitted, p_rand, atol=1e-5):
        _fail(ex, "the emitted token does not follow p: draft from q, accept with your probability, else draw "
              "from your residual", general)
    _passed(ex, "accept min(1, p/q), else draw from max(p - q, 0) normalised: the emitted token follows p exactly")


# ----------------------------------------------------------------------- chapter 05


def _pair_of(exercise: str, got, names: str, hint: str) -> tuple:
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        _fail(exercise, f"should return a pair ({names}), got {type(got).__name__}"
              + (f" of length {len(got)}" if isinstance(got, (tuple, list)) else ""), hint)
    return tuple(got)


def _tiles_variant(x: torch.Tensor, group: str = "tile", divisor: float = 448.0, multiply: bool = False):
    """(q, scale) with one scale per 1x128 tile ('tile'), per 128x1 tile ('column'), per row or per tensor."""
    x = x.float()
    m, k = x.shape
    if group == "tile":
        amax = x.abs().unflatten(-1, (-1, 128)).amax(-1)                  # (M, K/128)
        full = amax.repeat_interleave(128, -1)
    elif group == "column":
        amax = x.abs().unflatten(0, (-1, 128)).amax(1)                    # (M/128, K)
        full = amax.repeat_interleave(128, 0)
    elif group == "row":
        amax = x.abs().amax(-1, keepdim=True)                             # (M, 1)
        full = amax.expand(m, k)
    else:
        amax = x.abs().amax()                                             # ()
        full = amax.expand(m, k)
    scale = amax.clamp(min=1e-12) / divisor
    full_scale = full.clamp(min=1e-12) / divisor
    q = (x * full_scale if multiply else x / full_scale).to(torch.float8_e4m3fn)
    return q, scale


def check_quantize_tiles(quantize_tiles: Callable) -> None:
    """Exercise 05.1: 1x128 tiles along K, scale = max|tile| / 448, q = x / scale in E4M3."""
    from deepseek_mini.fp8.quant import quantize_activation

    ex = "quantize_tiles"
    g = torch.Generator().manual_seed(51)
    hand = torch.zeros(2, 256)
    hand[0, :128] = torch.linspace(-1, 1, 128)          # tile (0, 0): max 1, scale 1/448
    hand[0, 128:] = torch.linspace(-896, 448, 128)      # tile (0, 1): max 896, scale 2
    hand[1, :128] = 0.5                                 # tile (1, 0): all 0.5, scale 0.5/448, codes 448
    rand = torch.randn(128, 384, generator=g) * torch.logspace(-3, 3, 384 // 8).repeat_interleave(8)
    rand[5] *= 1000.0                                   # an outlier row
    rand[:, 200] *= 1000.0                              # an outlier channel (one tile of every row)
    cases = [(hand, "the hand case (2, 256): tile maxima 1, 896, 0.5 and an all-zero tile"),
             (rand, "random x (128, 384) with magnitudes 1e-3..1e3 along K, an outlier row and channel")]
    general = ("split the last dimension into tiles of 128, scale = max|tile| / 448 (floored at 1e-12), "
               "q = (x / scale).to(torch.float8_e4m3fn)")
    for x, case in cases:
        got = _call_safe(ex, quantize_tiles, case, x.clone())
        q_ref, s_ref = quantize_activation(x)
        q, s = _pair_of(ex, got, "q, scale", "return q, scale")
        mistakes = [(dict(group="tensor"), "one scale for the whole tensor (per-tensor scaling): one outlier then "
                     "squeezes every other value into E4M3's subnormals; take the max per 1x128 tile"),
                    (dict(group="row"), "one scale per row: an outlier channel still sets the scale of the whole "
                     "token; take the max over each 1x128 tile of the row"),
                    (dict(group="column"), "your tiles run along the wrong dimension (128 rows x 1 column): "
                     "activation tiles are 1x128 along the last dimension K, the GEMM's inner dimension"),
                    (dict(divisor=127.0), "divide the max by 448, the largest E4M3 value (torch.finfo("
                     "torch.float8_e4m3fn).max), not 127 (that is INT8)"),
                    (dict(divisor=240.0), "divide the max by 448: 240 is the largest value of the *fnuz* E4M3 "
                     "variant (AMD), but the tensor is float8_e4m3fn"),
                    (dict(multiply=True), "q = x / scale, not x * scale: scale = max/448 maps the tile's max to 448")]
        if isinstance(s, torch.Tensor) and isinstance(q, torch.Tensor):
            for kw, hint in mistakes:
                if kw.get("group") == "column" and x.shape[0] % 128:
                    continue
                q_v, s_v = _tiles_variant(x, **kw)
                if (tuple(s.shape) == tuple(s_v.shape) and tuple(q.shape) == tuple(q_v.shape)
                        and q.dtype == q_v.dtype and s.dtype.is_floating_point
                        and torch.allclose(s.detach().float(), s_v, rtol=1e-5, atol=0)
                        and torch.equal(q.detach().float(), q_v.float())
                        and not (torch.equal(q_v.float(), q_ref.float()) and torch.allclose(s_v, s_ref))):
                    _fail(ex, f"{case}: the codes and scales are those of another rule", hint)
                if (kw.get("group") in ("tensor", "row", "column") and tuple(s.shape) == tuple(s_v.shape)
                        and s.dtype.is_floating_point and s_v.shape != s_ref.shape):
                    _fail(ex, f"scale for {case} has shape {tuple(s.shape)}, expected {tuple(s_ref.shape)}", hint)
        q = _tensor_of(ex, q, f"q for {case}", q_ref.shape, torch.float8_e4m3fn,
                       "cast the scaled values with .to(torch.float8_e4m3fn)")
        s = _tensor_of(ex, s, f"scale for {case}", s_ref.shape, torch.float32,
                       "one float32 scale per 1x128 tile: shape (M, K // 128)")
        if s.isnan().any() or q.float().isnan().any():
            _fail(ex, f"{case}: NaN in the output", "an all-zero tile has max 0: floor the max at 1e-12 "
                  "(amax.clamp(min=1e-12)) before dividing, so 0 / scale stays 0")
        assert_tensor_close(ex, s, s_ref, f"scale for {case}", rtol=1e-6, atol=0, hint=general)
        assert_tensor_close(ex, q.float(), q_ref.float(), f"q (as float) for {case}", rtol=0, atol=0, hint=general)
    _passed(ex, "1x128 tiles along K, scale = max|tile| / 448, q = x / scale in float8_e4m3fn")


def _gemm_variant(a_q, a_scale, w_q, w_scale, use_a=True, use_w=True, w_rows="blocks", w_scale_t=False,
                  w_t=False, dtype=torch.float32):
    """Dequantise both operands with the given mistakes, then one matmul in ``dtype``."""
    a = a_q.float() * (a_scale.float().repeat_interleave(128, -1) if use_a else 1.0)
    ws = w_scale.float().T if w_scale_t else w_scale.float()
    if w_rows == "blocks":
        rows = ws.repeat_interleave(128, 0)
    else:                                               # "tiled": row n gets block n % nb's scale
        rows = ws.repeat(128, 1)
    w = w_q.float()
    if use_w:
        if rows.shape[0] != w.shape[0]:
            return None
        w = w * rows.repeat_interleave(128, 1)
    w = w if w_t else w.T
    if a.shape[-1] != w.shape[0]:
        return None
    return (a.to(dtype) @ w.to(dtype)).float()


def check_blockwise_gemm(blockwise_gemm: Callable) -> None:
    """Exercise 05.3: y = x W^T from 1x128 activation tiles and 128x128 weight blocks, in float32."""
    from deepseek_mini.fp8.quant import fp8_gemm, quantize_activation, quantize_weight

    ex = "blockwise_gemm"
    g = torch.Generator().manual_seed(52)

    def operands(m, k, n):
        x = torch.randn(m, k, generator=g) * torch.logspace(-2, 2, k // 128).repeat_interleave(128)
        w = torch.randn(n, k, generator=g) * torch.logspace(1, -1, (n // 128) * (k // 128)).view(n // 128, k // 128) \
            .repeat_interleave(128, 0).repeat_interleave(128, 1)
        return (*quantize_activation(x), *quantize_weight(w))

    cases = [(operands(4, 256, 256), "x (4, 256), W (256, 256): scales (4, 2) and (2, 2)"),
             (operands(3, 384, 256), "x (3, 384), W (256, 384): scales (3, 3) and (2, 3)")]
    general = ("for each K step i of 128: y += (a_q[:, i] @ w_q[:, i].T in float32) * a_scale[:, i, None] * "
               "(w_scale[n // 128, i] for each output row n); or dequantise both operands and do one float32 matmul")
    for (a_q, a_s, w_q, w_s), case in cases:
        got = _call_safe(ex, blockwise_gemm, case, a_q.clone(), a_s.clone(), w_q.clone(), w_s.clone())
        expected = fp8_gemm(a_q, a_s, w_q, w_s)
        if isinstance(got, torch.Tensor) and got.dtype in (torch.bfloat16, torch.float16):
            _fail(ex, f"returned {got.dtype} for {case}", "accumulate and return float32: the point of the "
                  "blockwise GEMM is FP32 accumulation of the scaled partial sums")
        got = _tensor_of(ex, got, f"y for {case}", expected.shape, torch.float32,
                         "y = x W^T is (M, N): a_q (M, K) times w_q (N, K) transposed")
        tol = dict(rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
        if torch.allclose(got, expected, **tol):
            continue
        mistakes = [(dict(use_w=False), "apply the weight scales too: y needs a_scale *and* w_scale"),
                    (dict(use_a=False), "apply the activation scales too: y needs a_scale *and* w_scale"),
                    (dict(use_a=False, use_w=False), "the codes alone are not the values: multiply by both scales"),
                    (dict(w_rows="tiled"), "output row n uses weight block n // 128 (repeat_interleave), "
                     "not n % n_blocks (repeat)"),
                    (dict(w_scale_t=True), "w_scale is (N/128, K/128): index it [n // 128, i], not transposed"),
                    (dict(w_t=True), "y = x W^T: W is (N, K) = (out, in), so multiply by its transpose"),
                    (dict(dtype=torch.bfloat16), "accumulate in float32, not bfloat16: bf16 keeps 8 significant "
                     "bits and loses the precision FP8 training relies on (§3.3.2)")]
        for kw, hint in mistakes:
            variant = _gemm_variant(a_q, a_s, w_q, w_s, **kw)
            if variant is None:
                continue
            close = (torch.allclose(got, variant, rtol=2e-2, atol=2e-2 * float(variant.abs().max()))
                     if kw.get("dtype") == torch.bfloat16 else torch.allclose(got, variant, **tol))
            if close:
                _fail(ex, f"{case}: y is off", hint)
        if torch.allclose(got, expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max())):
            general = mistakes[-1][1] + " (your y is within 2% of the answer, not within 1e-4)"
        assert_tensor_close(ex, got, expected, f"y for {case}", **tol, hint=general)
    _passed(ex, "y = x W^T with activation and weight scales applied per 128-wide K step, in float32")


def check_promoted_gemm(promoted_gemm: Callable) -> None:
    """Exercise 05.4: sum each N_C-wide K chunk in the limited accumulator, add the chunks in FP32."""
    from functools import partial

    from deepseek_mini.fp8.accum import limited_accumulate

    ex = "promoted_gemm"
    g = torch.Generator().manual_seed(53)
    coarse = partial(limited_accumulate, group=1, bits=8)        # a small, very lossy accumulator: mistakes show

    def reference(a, b, accumulate, n_c):
        out = torch.zeros(a.shape[0], b.shape[0])
        for start in range(0, a.shape[1], n_c):
            out += accumulate(a[:, start:start + n_c], b[:, start:start + n_c]).float()
        return out

    cases = [(torch.randn(3, 256, generator=g), torch.randn(2, 256, generator=g), coarse, 64,
              "a (3, 256), b (2, 256), an 8-bit accumulator, N_C = 64 (4 chunks)"),
             (torch.randn(2, 300, generator=g).abs(), torch.randn(3, 300, generator=g).abs(), coarse, 128,
              "positive a (2, 300), b (3, 300), an 8-bit accumulator, N_C = 128 (chunks of 128, 128, 44)")]
    for a, b, acc, n_c, case in cases:
        got = _call_safe(ex, promoted_gemm, case, a.clone(), b.clone(), acc, n_c)
        expected = reference(a, b, acc, n_c)
        got = _tensor_of(ex, got, f"C for {case}", expected.shape, torch.float32,
                         "C = a @ b.T is (M, N) float32: add each chunk's accumulate(...) into an FP32 total")
        if torch.equal(got, expected):
            continue
        k = a.shape[1]
        mistakes = [(reference(a, b, acc, 1), "you promoted after every product: each chunk of N_C products must "
                     "be summed by `accumulate` first (the tensor core's job); only its result goes to FP32"),
                    ((a.double() @ b.double().T).float(), "you summed exactly (or in float32) without `accumulate`: "
                     "the exercise models the tensor core, so each chunk's sum must come from accumulate(...)"),
                    ((a @ b.T), "you summed in float32 without `accumulate`: each chunk's sum must come from "
                     "accumulate(a[:, chunk], b[:, chunk])"),
                    (acc(a, b).float(), "you never promoted: accumulate(a, b) over all of K is the limited "
                     "accumulator's error without FP32 promotion; split K into chunks of n_c"),
                    (reference(a[:, :k // n_c * n_c], b[:, :k // n_c * n_c], acc, n_c),
                     "the last, shorter chunk is missing: when K is not a multiple of n_c, "
                     "range(0, K, n_c) still visits it (K // n_c chunks drop the tail)"),
                    (reference(a, b, acc, n_c + 1), "off by one: chunks of n_c products, slice [start:start + n_c]"),
                    (reference(a, b, acc, n_c - 1), "off by one: chunks of n_c products, slice [start:start + n_c]")]
        hint = next((h for wrong, h in mistakes if torch.allclose(got, wrong, rtol=1e-6, atol=1e-6)),
                    "for start in range(0, K, n_c): total += accumulate(a[:, start:start+n_c], "
                    "b[:, start:start+n_c]).float(), with total a float32 zeros (M, N)")
        assert_tensor_close(ex, got, expected, f"C for {case}", rtol=1e-6, atol=1e-6, hint=hint)
    # the paper's claim, with the calibrated accumulator: ~2% at K = 4096 without promotion, far less with N_C = 128
    a, b = torch.randn(4, 4096, generator=g), torch.randn(4, 4096, generator=g)
    exact = a.double() @ b.double().T
    got = _call_safe(ex, promoted_gemm, "a (4, 4096), b (4, 4096), limited_accumulate, N_C = 128",
                     a, b, limited_accumulate, 128)
    got = _tensor_of(ex, got, "C for K = 4096", (4, 4), torch.float32)
    err = float((got.double() - exact).norm() / exact.norm())
    plain = float((limited_accumulate(a, b).double() - exact).norm() / exact.norm())
    if not err < plain / 5:
        _fail(ex, f"at K = 4096 the relative error is {err:.3%} with promotion vs {plain:.3%} without",
              "promotion every N_C = 128 products should cut the error many times")
    _passed(ex, f"chunks of N_C summed by the limited accumulator, added in FP32 "
                f"(K = 4096: error {err:.3%} vs {plain:.3%} without promotion)")


def _blocks_variant(w: torch.Tensor, rows: int, cols: int, divisor: float = 448.0, transpose: bool = False):
    """(q, scale) with one scale per rows x cols block of w (N, K); the scale transposed if asked."""
    w = w.float()
    n, k = w.shape
    amax = w.abs().reshape(n // rows, rows, k // cols, cols).amax(dim=(1, 3))
    scale = amax.clamp(min=1e-12) / divisor
    full = scale.repeat_interleave(rows, 0).repeat_interleave(cols, 1)
    return (w / full).to(torch.float8_e4m3fn), (scale.T.contiguous() if transpose else scale)


def check_quantize_blocks(quantize_blocks: Callable) -> None:
    """Exercise 05.2: 128x128 weight blocks, scale = max|block| / 448 of shape (N/128, K/128)."""
    from deepseek_mini.fp8.quant import quantize_weight

    ex = "quantize_blocks"
    g = torch.Generator().manual_seed(54)
    hand = torch.zeros(256, 256)
    hand[:128, :128] = torch.linspace(-3, 1, 128 * 128).view(128, 128)   # block (0, 0): max 3
    hand[:128, 128:] = 0.25                                               # block (0, 1): max 0.25
    hand[200, 7] = 4480.0                                             # block (1, 0): max 4480, scale 10
    rand = torch.randn(384, 256, generator=g) * torch.logspace(-2, 2, 6).view(3, 1, 2, 1).expand(3, 128, 2, 128) \
        .reshape(384, 256)
    rand[10] *= 50.0
    cases = [(hand, "the hand case W (256, 256): block maxima 3, 0.25, 4480 and an all-zero block"),
             (rand, "random W (384, 256): six blocks of magnitudes 1e-2..1e2 and one outlier row")]
    general = ("cut W (N, K) into 128 x 128 blocks, scale[b, j] = max|block| / 448 (floored at 1e-12), "
               "q = (W / scale repeated over its block).to(torch.float8_e4m3fn)")
    for w, case in cases:
        got = _call_safe(ex, quantize_blocks, case, w.clone())
        q_ref, s_ref = quantize_weight(w)
        q, s = _pair_of(ex, got, "q, scale", "return q, scale")
        n, k = w.shape
        mistakes = [(dict(rows=1, cols=128), "those are 1x128 activation tiles: weights get one scale per "
                     "128 x 128 block, scale shape (N // 128, K // 128)"),
                    (dict(rows=n, cols=k), "one scale for the whole tensor: weights get one per 128 x 128 block"),
                    (dict(rows=1, cols=k), "one scale per row: weights get one per 128 x 128 block"),
                    (dict(rows=128, cols=128, transpose=True), "the scale is (N // 128, K // 128), "
                     "blocks of output rows first (the released checkpoint's weight_scale_inv layout), not transposed"),
                    (dict(rows=128, cols=128, divisor=127.0), "divide the max by 448, the largest E4M3 value, "
                     "not 127 (INT8)"),
                    (dict(rows=128, cols=128, divisor=240.0), "divide the max by 448: 240 is the fnuz variant's max")]
        if isinstance(s, torch.Tensor) and isinstance(q, torch.Tensor):
            variants = [(_blocks_variant(w, **kw)[1], hint) for kw, hint in mistakes]
            for s_v, hint in variants:           # the values of another rule
                if (tuple(s.shape) == tuple(s_v.shape) and s.dtype.is_floating_point
                        and torch.allclose(s.detach().float(), s_v, rtol=1e-5, atol=0) and not torch.allclose(s_v, s_ref)
                        if tuple(s_v.shape) == tuple(s_ref.shape) else False):
                    _fail(ex, f"{case}: the scales are those of another rule", hint)
            if tuple(s.shape) != tuple(s_ref.shape):
                for s_v, hint in variants:       # the shape of another rule
                    if tuple(s.shape) == tuple(s_v.shape) or s.numel() == s_v.numel() != s_ref.numel():
                        _fail(ex, f"scale for {case} has shape {tuple(s.shape)}, expected {tuple(s_ref.shape)}", hint)
        q = _tensor_of(ex, q, f"q for {case}", q_ref.shape, torch.float8_e4m3fn,
                       "cast the scaled weights with .to(torch.float8_e4m3fn); q has W's shape")
        s = _tensor_of(ex, s, f"scale for {case}", s_ref.shape, torch.float32,
                       "one float32 scale per 128 x 128 block: shape (N // 128, K // 128)")
        if s.isnan().any() or q.float().isnan().any():
            _fail(ex, f"{case}: NaN in the output", "floor the max at 1e-12 before dividing")
        assert_tensor_close(ex, s, s_ref, f"scale for {case}", rtol=1e-6, atol=0, hint=general)
        hint = general
        if torch.equal(q.float(), (w.float() * s_ref.repeat_interleave(128, 0).repeat_interleave(128, 1))
                       .to(torch.float8_e4m3fn).float()):
            hint = "q = W / scale, not W * scale"
        assert_tensor_close(ex, q.float(), q_ref.float(), f"q (as float) for {case}", rtol=0, atol=0, hint=hint)
    _passed(ex, "128 x 128 blocks, scale (N/128, K/128) = max|block| / 448, q = W / scale in float8_e4m3fn")


# ----------------------------------------------------------------------- chapter 06


def _bubble_mistakes(schedule: str) -> list[tuple[Callable, str]]:
    """(formula, hint) for the usual slips in Table 2's bubble column, for one schedule."""
    steps = ("pp - 1 steps: the first micro-batch needs pp - 1 stage hops before the last stage starts, "
             "and the last one pp - 1 hops back; use pp - 1, not pp")
    if schedule == "1f1b":
        return [(lambda pp, F, B, W, FB: pp * (F + B), steps),
                (lambda pp, F, B, W, FB: (pp - 1) * (F + B - 2 * W), "that is ZB1P's bubble: 1F1B runs each "
                 "backward whole, nothing fills the gaps, so its bubble is (PP-1)(F+B)"),
                (lambda pp, F, B, W, FB: (pp - 1) * F, "each bubble step costs a forward *and* a backward: (PP-1)(F+B)")]
    if schedule == "zb1p":
        return [(lambda pp, F, B, W, FB: pp * (F + B - 2 * W), steps),
                (lambda pp, F, B, W, FB: (pp - 1) * (F + B), "the -2W is missing: ZB1P moves weight-gradient steps "
                 "into the gaps, 2W per pipeline step, so its bubble is (PP-1)(F+B-2W)"),
                (lambda pp, F, B, W, FB: (pp - 1) * (F + B - W), "ZB1P fills 2W per pipeline step, not W: (PP-1)(F+B-2W)"),
                (lambda pp, F, B, W, FB: (pp - 1) * (F + B - 3 * W), "-3W is DualPipe's; ZB1P's is (PP-1)(F+B-2W)")]
    return [(lambda pp, F, B, W, FB: (pp - 1) * (FB + B - 3 * W), "PP/2 - 1, not PP - 1: the micro-batches enter "
             "from both ends, so each direction's pipeline is only PP/2 deep"),
            (lambda pp, F, B, W, FB: pp / 2 * (FB + B - 3 * W), "PP/2 - 1 steps, not PP/2: as in 1F1B, the bubble "
             "has one step fewer than the pipeline is deep"),
            (lambda pp, F, B, W, FB: (pp / 2 - 1) * (F + B + B - 3 * W), "a DualPipe step overlaps a forward with a "
             "backward: use F&B (the argument FB), not F + B"),
            (lambda pp, F, B, W, FB: (pp / 2 - 1) * (FB + B - 2 * W), "DualPipe fills 3W per step (-3W), ZB1P 2W"),
            (lambda pp, F, B, W, FB: (pp / 2 - 1) * (FB + B), "the -3W is missing: the weight-gradient steps fill "
             "part of each bubble step"),
            (lambda pp, F, B, W, FB: (pp / 2 - 1) * (FB - 3 * W), "the + B is missing: (PP/2-1)(F&B+B-3W)"),
            (lambda pp, F, B, W, FB: (pp - 1) * (F + B - 2 * W), "that is ZB1P's bubble; DualPipe's is "
             "(PP/2-1)(F&B+B-3W)")]


def check_bubble(bubble: Callable) -> None:
    """Exercise 06.1: Table 2's bubble for 1F1B, ZB1P and DualPipe (DeepSeek-V3 §3.2.1)."""
    from deepseek_mini.parallel.schedules import bubble_formula

    ex = "bubble"
    # Costs with no coincidences: every mistake above gives a different number from the answer.
    F, B, W, FB = 1.5, 2.5, 0.75, 3.5
    cases = [("1f1b", 4), ("1f1b", 1), ("zb1p", 4), ("zb1p", 8), ("dualpipe", 8), ("dualpipe", 4), ("dualpipe", 2)]
    for schedule, pp in cases:
        case = f"bubble({schedule!r}, pp={pp}, F={F}, B={B}, W={W}, FB={FB})"
        got = _call_safe(ex, bubble, case, schedule, pp, F, B, W, FB)
        got = _number_of(ex, got, case, "return the formula's value, a time in the units of F and B, "
                                        "e.g. (pp - 1) * (F + B) for 1F1B")
        expected = bubble_formula(schedule, pp, F, B, W, FB)
        if math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-9):
            continue
        hint = next((h for wrong, h in _bubble_mistakes(schedule)
                     if math.isclose(got, wrong(pp, F, B, W, FB), rel_tol=1e-9, abs_tol=1e-9)),
                    {"1f1b": "1F1B: (PP-1)(F+B)", "zb1p": "ZB1P: (PP-1)(F+B-2W)",
                     "dualpipe": "DualPipe: (PP/2-1)(F&B+B-3W), with F&B the argument FB"}[schedule])
        _fail(ex, f"{case} returned {got:g}, expected {expected:g}", hint)
    _passed(ex, "Table 2's bubble: 1F1B (PP-1)(F+B), ZB1P (PP-1)(F+B-2W), DualPipe (PP/2-1)(F&B+B-3W)")


def _one_f_one_b_variant(pp: int, n_micro: int, warmup: Callable[[int], int] | None = None,
                         lifo: bool = False, gpipe: bool = False) -> list[list[tuple[str, int]]]:
    """1F1B per-rank lists, or one of the usual mistakes: another warm-up count, backwards newest first, GPipe."""
    out = []
    for r in range(pp):
        w = min(max((pp - 1 - r) if warmup is None else warmup(r), 0), n_micro)
        kinds = ["F"] * n_micro + ["B"] * n_micro if gpipe else ["F"] * w + ["F", "B"] * (n_micro - w) + ["B"] * w
        ops, live, nxt = [], [], 0
        for kind in kinds:
            if kind == "F":
                ops.append(("F", nxt))
                live.append(nxt)
                nxt += 1
            else:
                ops.append(("B", live.pop() if lifo else live.pop(0)))
        out.append(ops)
    return out


def _schedule_lists(exercise: str, got, case: str, pp: int) -> list[list[tuple[str, int]]]:
    """``got`` as pp lists of (kind, micro) tuples, or a CheckFailure that says what it is instead."""
    shape = "a list of pp lists, one per rank, of ('F', micro) and ('B', micro) tuples"
    if not isinstance(got, (list, tuple)):
        _fail(exercise, f"{case} returned {type(got).__name__}; expected {shape}", "return the list of rank lists")
    if len(got) != pp:
        _fail(exercise, f"{case} returned {len(got)} rank lists; expected pp = {pp}", "one list per rank")
    out = []
    for r, rank in enumerate(got):
        if not isinstance(rank, (list, tuple)):
            _fail(exercise, f"{case}: rank {r}'s entry is a {type(rank).__name__}; expected a list", shape)
        ops = []
        for i, op in enumerate(rank):
            if not (isinstance(op, (list, tuple)) and len(op) == 2 and op[0] in ("F", "B")):
                _fail(exercise, f"{case}: rank {r}, position {i} is {op!r}; expected ('F', micro) or ('B', micro)",
                      shape)
            try:
                ops.append((op[0], operator.index(op[1])))
            except TypeError:
                _fail(exercise, f"{case}: rank {r}, position {i} is {op!r}; the micro-batch must be an int", shape)
        out.append(ops)
    return out


def check_one_f_one_b(one_f_one_b: Callable) -> None:
    """Exercise 06.2: the 1F1B order per rank (warm-up pp-1-r forwards, one forward one backward, drain)."""
    ex = "one_f_one_b"
    general = ("rank r: pp - 1 - r warm-up forwards, then n_micro - (pp - 1 - r) times (a forward, a backward), "
               "then pp - 1 - r backwards; micro-batches go backward in the order they went forward")
    for pp, n_micro in [(4, 8), (3, 3), (1, 2), (5, 7)]:
        case = f"one_f_one_b(pp={pp}, n_micro={n_micro})"
        got = _schedule_lists(ex, _call_safe(ex, one_f_one_b, case, pp, n_micro), case, pp)
        expected = _one_f_one_b_variant(pp, n_micro)
        if got == expected:
            continue
        mistakes = [(dict(gpipe=True), "that is GPipe (all forwards, then all backwards): 1F1B starts alternating "
                     "after the warm-up, so a rank holds at most pp - r micro-batches instead of n_micro"),
                    (dict(lifo=True), "backwards in the wrong order: the oldest micro-batch in flight goes backward "
                     "first (first in, first out), as its gradient arrives from the next stage first"),
                    (dict(warmup=lambda r: pp - r), "warm-up off by one: rank r runs pp - 1 - r forwards before "
                     "its first (forward, backward) pair, not pp - r"),
                    (dict(warmup=lambda r: pp - 2 - r), "warm-up off by one: rank r runs pp - 1 - r forwards "
                     "before its first (forward, backward) pair, not pp - 2 - r"),
                    (dict(warmup=lambda r: r), "the warm-up is reversed: rank 0 (the first stage) runs pp - 1 "
                     "warm-up forwards and the last rank none, pp - 1 - r in general"),
                    (dict(warmup=lambda r: pp - 1), "every rank gets the same warm-up: rank r runs pp - 1 - r "
                     "(the last rank starts its backwards at once)"),
                    (dict(warmup=lambda r: 0), "no warm-up: rank r first runs pp - 1 - r forwards, so that the "
                     "pipeline fills before the ranks alternate")]
        for kw, hint in mistakes:
            variant = _one_f_one_b_variant(pp, n_micro, **kw)
            if variant != expected and got == variant:
                _fail(ex, f"{case} is not 1F1B's order", hint)
        for r, (ops, want) in enumerate(zip(got, expected)):
            for kind in "FB":
                micros = sorted(i for k, i in ops if k == kind)
                if micros != list(range(n_micro)):
                    _fail(ex, f"{case}: rank {r} runs the {'forwards' if kind == 'F' else 'backwards'} of micro-batches "
                              f"{micros}, expected each of 0..{n_micro - 1} once",
                          "every rank runs one forward and one backward of every micro-batch")
            done, live, peak = set(), 0, 0
            for i, (kind, micro) in enumerate(ops):
                if kind == "B" and micro not in done:
                    _fail(ex, f"{case}: rank {r}, position {i}: the backward of micro-batch {micro} comes before "
                              f"its forward", "a micro-batch goes backward only after its forward")
                done.add(micro)
                live += 1 if kind == "F" else -1
                peak = max(peak, live)
            if peak > pp - r:
                _fail(ex, f"{case}: rank {r} holds {peak} micro-batches in flight at once; 1F1B holds at most "
                          f"pp - r = {pp - r}", general)
            if ops != want:
                i = next(i for i, (a, b) in enumerate(zip(ops, want)) if a != b)
                _fail(ex, f"{case}: rank {r}, position {i}: got {ops[i]}, expected {want[i]}", general)
    _passed(ex, "warm-up pp-1-r forwards, one forward one backward, drain: at most pp - r micro-batches in flight")


def _all_to_all_variant(counts: torch.Tensor, ep_size: int, placement: str = "block", self_send: bool = True,
                        transpose_send: bool = False, transpose_received: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(send, received) of the counts all-to-all, or one of the usual mistakes.

    ``placement``: "block" (rank r holds experts [r N_r/P, (r+1) N_r/P), right), "round_robin" (expert e
    on rank e % P) or "block_of_p" (blocks of P experts: N_r/P and P swapped; send only).
    """
    P, n_experts = counts.shape
    experts = torch.arange(n_experts)
    dest = {"block": experts // (n_experts // P), "round_robin": experts % P, "block_of_p": experts // P}[placement]
    send = torch.stack([torch.stack([counts[s, dest == d].sum() for d in range(P)]) for s in range(P)])
    if placement == "block_of_p":
        return send, torch.zeros(0)
    received = torch.stack([torch.stack([counts[s, dest == d] for s in range(P)]) for d in range(P)])
    if not self_send:
        send = send * (1 - torch.eye(P, dtype=send.dtype))
        received = received.clone()
        received[range(P), range(P)] = 0
    return (send.T if transpose_send else send), (received.transpose(0, 1) if transpose_received else received)


def _diagnose_counts(ex: str, case: str, name: str, got: torch.Tensor, want: torch.Tensor,
                     mistakes: list[tuple[dict, str]], variant: Callable[[dict], torch.Tensor], hint: str) -> None:
    """Fail naming the first known mistake whose result ``got`` equals, else the first wrong element."""
    if torch.equal(got, want):
        return
    for kw, mistake in mistakes:
        wrong = variant(kw)
        if not torch.equal(wrong, want) and torch.equal(got, wrong):
            _fail(ex, f"{case}: {name} is wrong", mistake)
    index = tuple(int(i) for i in (got != want).nonzero()[0])
    _fail(ex, f"{case}: {name}{list(index)} = {int(got[index])}, expected {int(want[index])}", hint)


def check_all_to_all_counts(all_to_all_counts: Callable) -> None:
    """Exercise 06.3: the counts exchange of the expert-parallel all-to-all (DeepSeek-V3 §3.2.2)."""
    ex = "all_to_all_counts"
    layout = ("rank r holds the contiguous block of experts [r * N_r/P, (r+1) * N_r/P); send[s, d] sums row s of "
              "counts over rank d's block, and received[d, s, e] = counts[s, d * N_r/P + e]")
    generator = torch.Generator().manual_seed(6)
    cases = [torch.randint(0, 6, (4, 8), generator=generator), torch.randint(0, 9, (2, 6), generator=generator),
             torch.tensor([[3, 0, 2]]), torch.tensor([[1, 0, 4, 2], [0, 0, 0, 0], [5, 1, 0, 3], [2, 2, 1, 0]])]
    cases[0][1, 4:6] = 0                                      # an idle block and a rank that sends it nothing
    for counts in cases:
        P, n_experts = counts.shape
        case = f"all_to_all_counts(counts of shape {tuple(counts.shape)}, ep_size={P})"
        original = counts.clone()
        got = _call_safe(ex, all_to_all_counts, case, counts, P)
        if not torch.equal(counts, original):
            _fail(ex, f"{case} changed its input counts", "compute new tensors; do not write into counts")
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            _fail(ex, f"{case} returned {type(got).__name__}; expected a pair (send, received)",
                  "return send, received")
        shape_hint = "send is (P, P): rows each rank sends to each rank; received is (P, P, N_r/P): [receiver, " \
                     "source, local expert]; keep counts' dtype (torch.int64)"
        send = _tensor_of(ex, got[0], f"{case}: send", (P, P), counts.dtype, shape_hint)
        received = _tensor_of(ex, got[1], f"{case}: received", (P, P, n_experts // P), counts.dtype, shape_hint)
        want_send, want_received = _all_to_all_variant(counts, P)
        send_mistakes = [(dict(transpose_send=True), "send is transposed: send[s, d] is what rank s (row s of "
                          "counts: its own tokens) sends to rank d"),
                         (dict(placement="round_robin"), "experts are placed round-robin (expert e on rank e % P); "
                          "they sit in contiguous blocks: " + layout),
                         (dict(placement="block_of_p"), "blocks of ep_size experts: a rank holds N_r / ep_size "
                          "experts, not ep_size"),
                         (dict(self_send=False), "the diagonal is missing: a rank also 'sends' to itself the rows "
                          "of its own experts (the all-to-all includes the diagonal; on a GPU a local copy)")]
        _diagnose_counts(ex, case, "send", send, want_send, send_mistakes,
                         lambda kw: _all_to_all_variant(counts, P, **kw)[0], layout)
        received_mistakes = [(dict(transpose_received=True), "received is indexed [source, receiver, expert]: "
                              "received[d, s, e] is what rank d gets from rank s, i.e. counts[s, d * N_r/P + e]"),
                             (dict(placement="round_robin"), "local experts taken round-robin; rank d's local "
                              "expert e is global expert d * N_r/P + e"),
                             (dict(self_send=False), "received[d, d] is missing: a rank's own rows for its own "
                              "experts count too")]
        _diagnose_counts(ex, case, "received", received, want_received, received_mistakes,
                         lambda kw: _all_to_all_variant(counts, P, **kw)[1], layout)
    try:
        _call(ex, all_to_all_counts, torch.ones(2, 5, dtype=torch.int64), 2)
    except ValueError:
        pass
    except CheckFailure:
        raise
    except Exception as exc:
        _fail(ex, f"all_to_all_counts(counts of shape (2, 5), ep_size=2) raised {type(exc).__name__}; expected "
                  "ValueError", "5 experts cannot be split over 2 ranks: raise ValueError with a one-line message")
    else:
        _fail(ex, "all_to_all_counts(counts of shape (2, 5), ep_size=2) returned; expected ValueError",
              "5 experts cannot be split over 2 ranks: check n_experts % ep_size and raise ValueError")
    _passed(ex, "send[s, d] and received[d, s, e]: the counts matrix transposes, contiguous expert blocks, "
                "the diagonal included")


def check_dualpipev_stage_ranks(dualpipev_stage_ranks: Callable) -> None:
    """Exercise 06.4: the rank of each of DualPipeV's 2*pp stages (the V; DeepSeek-V3 §3.2.1)."""
    ex = "dualpipev_stage_ranks"
    general = "stage s < pp on rank s; stage s >= pp on rank 2 * pp - 1 - s (down the ranks, then back up)"
    for pp in (4, 1, 3, 8):
        case = f"dualpipev_stage_ranks({pp})"
        got = _call_safe(ex, dualpipev_stage_ranks, case, pp)
        if isinstance(got, torch.Tensor):
            got = got.tolist()
        if not isinstance(got, (list, tuple)):
            _fail(ex, f"{case} returned {type(got).__name__}; expected a list of 2 * pp ranks", general)
        if got and all(isinstance(g, (list, tuple)) for g in got):
            _fail(ex, f"{case} returned a list of lists", "return the rank of each stage (a flat list of 2 * pp "
                  "ints), not the stages of each rank")
        if len(got) == pp and pp > 1:
            _fail(ex, f"{case} returned {len(got)} entries, one per rank; expected 2 * pp = {2 * pp}, one per stage",
                  "DualPipeV cuts the model into 2 * pp stages, two per rank")
        if len(got) != 2 * pp:
            _fail(ex, f"{case} returned {len(got)} entries; expected 2 * pp = {2 * pp}", general)
        try:
            ranks = [operator.index(r) for r in got]
        except TypeError:
            _fail(ex, f"{case} returned {got!r}; the ranks must be ints", general)
        expected = [s if s < pp else 2 * pp - 1 - s for s in range(2 * pp)]
        if ranks == expected:
            continue
        mistakes = [([s % pp for s in range(2 * pp)], "that is the looped (interleaved) placement, stage s on "
                     "rank s % pp; the V comes back up: stage pp + i on rank pp - 1 - i, so the last stage (head "
                     "and loss) is on rank 0 with the first"),
                    ([s if s < pp else 2 * pp - s for s in range(2 * pp)], "off by one on the way back: stage s >= "
                     "pp is on rank 2 * pp - 1 - s (stage pp on rank pp - 1), not 2 * pp - s"),
                    ([pp - 1 - s if s < pp else s - pp for s in range(2 * pp)], "the V is upside down: stage 0 "
                     "(where the micro-batch enters) is on rank 0")]
        for variant, hint in mistakes:
            if variant != expected and ranks == variant:
                _fail(ex, f"{case} returned {ranks}, expected {expected}", hint)
        bad = next(((s, r) for s, r in enumerate(ranks) if not 0 <= r < pp), None)
        if bad:
            _fail(ex, f"{case}: stage {bad[0]} on rank {bad[1]}, but the ranks are 0..{pp - 1}", general)
        _fail(ex, f"{case} returned {ranks}, expected {expected}", general)
    _passed(ex, "the V: rank r holds stages r and 2*pp-1-r, the first and last stage on rank 0")


# ----------------------------------------------------------------------- chapter 07


def _correction_dim(n: float, dim: int, base: float, original_max: int, log_top: Callable = math.log,
                    two_pi: bool = True) -> float:
    """The pair index i where r_i = L / lambda_i = n (YaRN eq. 17-20), with an optional slip in it."""
    return dim * log_top(original_max / (n * (2 * math.pi if two_pi else 1.0))) / (2 * math.log(base))


def _ramp_variant(dim: int, base: float, original_max: int, beta_fast: float, beta_slow: float,
                  reverse: bool = False, log_top: Callable = math.log, two_pi: bool = True, truncate: bool = True,
                  clip: bool = True, denom: int = 0, channel_index: bool = False, swap: bool = False) -> torch.Tensor:
    """The NTK-by-parts ramp gamma over the dim/2 pairs, or one of the usual mistakes (float32)."""
    fast, slow = (beta_slow, beta_fast) if swap else (beta_fast, beta_slow)
    low = _correction_dim(fast, dim, base, original_max, log_top, two_pi)
    high = _correction_dim(slow, dim, base, original_max, log_top, two_pi)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    if clip:
        low, high = max(low, 0), min(high, dim - 1)
    width = high - low + denom
    if width == 0:
        width = 0.001
    index = torch.arange(0, dim, 2) if channel_index else torch.arange(dim // 2)
    rising = ((index.float() - low) / width).clamp(0, 1)
    return rising if reverse else 1 - rising


def check_ntk_by_parts_ramp(ntk_by_parts_ramp: Callable) -> None:
    """Exercise 07.1: YaRN's ramp gamma_i over the pairs, 1 (keep theta) below the correction range, 0 above."""
    from deepseek_mini.rope import yarn_correction_range, yarn_ramp

    ex = "ntk_by_parts_ramp"
    general = ("low = floor(i(beta_fast)), high = ceil(i(beta_slow)) with i(n) = dim * ln(L / (2 pi n)) / (2 ln base), "
               "low clipped at 0 and high at dim - 1; gamma_i = 1 - clamp((i - low) / (high - low), 0, 1) "
               "for the pair indices i = 0 .. dim/2 - 1")
    cases = [(64, 10000.0, 4096, 32, 1, "DeepSeek-V3: dim 64, base 10000, L 4096, beta_fast 32, beta_slow 1"),
             (16, 10000.0, 64, 32, 1, "dim 16, base 10000, L 64, beta_fast 32, beta_slow 1 (i(32) < 0)"),
             (128, 10000.0, 2048, 16, 2, "dim 128, base 10000, L 2048, beta_fast 16, beta_slow 2"),
             (32, 500000.0, 8192, 32, 1, "dim 32, base 500000, L 8192, beta_fast 32, beta_slow 1")]
    mistakes = [(dict(reverse=True), "the ramp is reversed (you returned 1 - gamma): the fast pairs (small i, many "
                 "turns over L) keep theta, gamma = 1; the slow pairs (large i) are interpolated, gamma = 0"),
                (dict(swap=True), "beta_fast and beta_slow are swapped: low comes from beta_fast (32 turns, the "
                 "faster pairs, smaller i), high from beta_slow (1 turn)"),
                (dict(log_top=math.log10), "mixed logarithms: i(n) = dim * ln(L / (2 pi n)) / (2 ln base), the "
                 "same log (math.log, natural) above and below"),
                (dict(log_top=math.log2), "mixed logarithms: i(n) = dim * ln(L / (2 pi n)) / (2 ln base), the "
                 "same log (math.log, natural) above and below"),
                (dict(two_pi=False), "the wavelength is lambda_i = 2 pi / theta_i: the pair with r = L / lambda = n "
                 "has i = dim * ln(L / (2 pi n)) / (2 ln base); the 2 pi is missing"),
                (dict(truncate=False), "round the range outwards as DeepSeek's code and transformers do: "
                 "low = math.floor(i(beta_fast)), high = math.ceil(i(beta_slow))"),
                (dict(clip=False), "clip low at 0 (max(low, 0)): with a short L, i(beta_fast) is negative"),
                (dict(denom=1), "off by one in the ramp's denominator: (i - low) / (high - low), not high - low + 1"),
                (dict(denom=-1), "off by one in the ramp's denominator: (i - low) / (high - low), not high - low - 1"),
                (dict(channel_index=True), "the ramp runs over the pair index i = 0 .. dim/2 - 1, not the channel "
                 "index 2i (torch.arange(dim // 2), not torch.arange(0, dim, 2))")]
    for dim, base, length, fast, slow, what in cases:
        case = f"ntk_by_parts_ramp({dim}, {base:g}, {length}, {fast}, {slow}) [{what}]"
        got = _call_safe(ex, ntk_by_parts_ramp, case, dim, base, length, fast, slow)
        expected = yarn_ramp(*yarn_correction_range(fast, slow, dim, base, length), dim // 2)
        got = _tensor_of(ex, got, f"gamma for {case}", expected.shape, torch.float32,
                         "one float32 gamma per pair: shape (dim // 2,); torch.arange(dim // 2, dtype=torch.float32)")
        if torch.allclose(got, expected, rtol=0, atol=1e-6):
            continue
        for kw, hint in mistakes:
            wrong = _ramp_variant(dim, base, length, fast, slow, **kw)
            if not torch.allclose(wrong, expected, rtol=0, atol=1e-6) and torch.allclose(got, wrong, rtol=0, atol=1e-6):
                _fail(ex, f"{case}: gamma is that of another rule", hint)
        if not ((got >= 0) & (got <= 1)).all():
            bad = int((~((got >= 0) & (got <= 1))).nonzero()[0])
            _fail(ex, f"{case}: gamma[{bad}] = {got[bad].item():.6g} is outside [0, 1]",
                  "clamp (i - low) / (high - low) to [0, 1] before taking 1 - it")
        if (got[1:] > got[:-1] + 1e-6).any():
            _fail(ex, f"{case}: gamma rises with the pair index",
                  "gamma falls from 1 (fast pairs, keep theta) to 0 (slow pairs, theta / s) as i grows")
        assert_tensor_close(ex, got, expected, f"gamma for {case}", rtol=0, atol=1e-6, hint=general)
    _passed(ex, "gamma = 1 up to floor(i(beta_fast)), 0 from ceil(i(beta_slow)), linear between "
                "(DeepSeek-V3: pairs 0-10 kept, 23-31 interpolated)")


def _mscale_variant(s: float, mscale: float = 1.0, log: Callable = math.log, guard: bool = True,
                    power: float = 1.0, use_mscale: bool = True) -> float:
    """YaRN's sqrt(1/t) = 0.1 * mscale * ln(s) + 1 (1 when s <= 1), or one of the usual mistakes."""
    if guard and s <= 1:
        return 1.0
    return (0.1 * (mscale if use_mscale else 1.0) * log(s) + 1.0) ** power


_MSCALE_MISTAKES = [
    (dict(log=math.log10), "use the natural logarithm: 0.1 * mscale * math.log(s) + 1, not math.log10"),
    (dict(log=math.log2), "use the natural logarithm: 0.1 * mscale * math.log(s) + 1, not math.log2"),
    (dict(guard=False), "for s <= 1 (no extension) return 1: YaRN's temperature only applies when the context "
     "is stretched"),
    (dict(use_mscale=False), "the log term is multiplied by the `mscale` argument: 0.1 * mscale * ln(s) + 1"),
]


def check_yarn_mscale(yarn_mscale: Callable) -> None:
    """Exercise 07.2: YaRN's attention temperature sqrt(1/t) = 0.1 * mscale * ln(s) + 1, and 1 for s <= 1."""
    from deepseek_mini.rope import yarn_mscale as reference

    ex = "yarn_mscale"
    general = "sqrt(1/t) = 0.1 * mscale * math.log(s) + 1 when s > 1, and 1.0 when s <= 1 (YaRN eq. 22)"
    mistakes = [*_MSCALE_MISTAKES,
                (dict(power=2.0), "return sqrt(1/t) = 0.1 * mscale * ln(s) + 1 itself, not its square: the square "
                 "(1/t) is what the logits get, because both q and k are scaled"),
                (dict(power=0.5), "0.1 * mscale * ln(s) + 1 is already sqrt(1/t): do not take another square root")]
    cases = [(40.0, 1.0, "s = 40, mscale = 1 (DeepSeek-V3)"), (4.0, 1.0, "s = 4, mscale = 1"),
             (8.0, 0.707, "s = 8, mscale = 0.707"), (1.0, 1.0, "s = 1 (no extension)"),
             (0.5, 1.0, "s = 0.5 (shorter than trained: no temperature)"), (16.0, 0.0, "s = 16, mscale = 0")]
    for s, mscale, what in cases:
        case = f"yarn_mscale({s:g}, {mscale:g}) [{what}]"
        got = _number_of(ex, _call_safe(ex, yarn_mscale, case, s, mscale), case, general)
        expected = reference(s, mscale)
        if math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9):
            continue
        hint = next((h for kw, h in mistakes
                     if not math.isclose(_mscale_variant(s, mscale, **kw), expected, rel_tol=1e-6, abs_tol=1e-9)
                     and math.isclose(got, _mscale_variant(s, mscale, **kw), rel_tol=1e-6, abs_tol=1e-9)), general)
        _fail(ex, f"{case} returned {got:.6g}, expected {expected:.6g}", hint)
    _passed(ex, f"sqrt(1/t) = 0.1 mscale ln(s) + 1, 1 for s <= 1 (DeepSeek-V3: {reference(40.0, 1.0):.5f} at s = 40)")


def check_yarn_softmax_scale(yarn_softmax_scale: Callable) -> None:
    """Exercise 07.3: the attention's logit scale d_qk^-1/2 * mscale(s, mscale_all_dim)^2, d_qk = d_h + d_h^R."""
    from deepseek_mini.rope import yarn_mscale

    ex = "yarn_softmax_scale"
    general = ("(qk_nope_head_dim + qk_rope_head_dim) ** -0.5 * m ** 2 with m = 0.1 * mscale_all_dim * ln(s) + 1 "
               "(m = 1 when s <= 1)")

    def scale(nope, rope, s, m_all, d="both", power=-0.5, m_power=2.0, divide=False, **mscale_kw):
        d_qk = {"both": nope + rope, "rope": rope, "nope": nope}[d]
        m = _mscale_variant(s, m_all, **mscale_kw) ** m_power
        return d_qk ** power / m if divide else d_qk ** power * m

    mistakes = [(dict(m_power=1.0), "multiply by mscale squared: q and k each carry sqrt(1/t), so the logits "
                 "(and the softmax scale) get (0.1 * mscale_all_dim * ln(s) + 1) ** 2"),
                (dict(divide=True), "multiply by mscale ** 2, do not divide: a longer context needs sharper "
                 "attention (a larger logit scale, 1/t > 1)"),
                (dict(d="rope"), "d_qk is the whole query-key head, d_h + d_h^R = qk_nope_head_dim + "
                 "qk_rope_head_dim (192 in DeepSeek-V3), not the RoPE part alone"),
                (dict(d="nope"), "d_qk is the whole query-key head, d_h + d_h^R = qk_nope_head_dim + "
                 "qk_rope_head_dim (192 in DeepSeek-V3), not the non-RoPE part alone"),
                (dict(power=-1.0), "the base scale is 1 / sqrt(d_qk), d_qk ** -0.5, not 1 / d_qk"),
                *[(kw, hint) for kw, hint in _MSCALE_MISTAKES]]
    cases = [(128, 64, 40.0, 1.0, "DeepSeek-V3: d_h 128, d_h^R 64, s 40, mscale_all_dim 1"),
             (16, 8, 4.0, 0.707, "d_h 16, d_h^R 8, s 4, mscale_all_dim 0.707"),
             (32, 16, 1.0, 1.0, "d_h 32, d_h^R 16, s 1 (no extension)"),
             (32, 32, 0.5, 1.0, "d_h 32, d_h^R 32, s 0.5 (shorter than trained)"),
             (64, 32, 8.0, 0.0, "d_h 64, d_h^R 32, s 8, mscale_all_dim 0 (no temperature)")]
    for nope, rope, s, m_all, what in cases:
        case = f"yarn_softmax_scale({nope}, {rope}, {s:g}, {m_all:g}) [{what}]"
        got = _number_of(ex, _call_safe(ex, yarn_softmax_scale, case, nope, rope, s, m_all), case, general)
        expected = (nope + rope) ** -0.5 * yarn_mscale(s, m_all) ** 2
        if math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-12):
            continue
        hint = next((h for kw, h in mistakes
                     if not math.isclose(scale(nope, rope, s, m_all, **kw), expected, rel_tol=1e-6, abs_tol=1e-12)
                     and math.isclose(got, scale(nope, rope, s, m_all, **kw), rel_tol=1e-6, abs_tol=1e-12)),
                    general)
        _fail(ex, f"{case} returned {got:.6g}, expected {expected:.6g}", hint)
    _passed(ex, "d_qk^-1/2 * mscale(s, mscale_all_dim)^2 (DeepSeek-V3: 192^-0.5 * 1.36889^2 = "
                f"{192 ** -0.5 * yarn_mscale(40.0, 1.0) ** 2:.6f})")


def _inv_freq_variant(dim: int, base: float, s: float, gamma: torch.Tensor, swap: bool = False,
                      times_s: bool = False, no_gamma: bool = False, exponent: str = "2i/d",
                      wavelength: bool = False) -> torch.Tensor:
    """h(theta_i) = (1 - gamma_i) theta_i / s + gamma_i theta_i in float64, or one of the usual mistakes."""
    i = torch.arange(dim // 2, dtype=torch.float64)
    power = {"2i/d": 2 * i / dim, "i/d": i / dim}[exponent]
    theta = base ** power if wavelength else base ** -power
    g = torch.zeros_like(theta) if no_gamma else gamma.double()
    slow = theta * s if times_s else theta / s
    if swap:
        return g * slow + (1 - g) * theta
    return (1 - g) * slow + g * theta


def check_interpolated_inv_freq(interpolated_inv_freq: Callable) -> None:
    """Exercise 07.4: NTK-by-parts h(theta_i) = (1 - gamma_i) theta_i / s + gamma_i theta_i (YaRN eq. 17-20)."""
    from deepseek_mini.rope import (ntk_by_parts_inv_freq, pi_inv_freq, rope_frequencies, yarn_correction_range,
                                    yarn_ramp)

    ex = "interpolated_inv_freq"
    general = ("theta_i = base ** (-2i / dim) for i = 0 .. dim/2 - 1, then (1 - gamma) * theta / s + gamma * theta: "
               "gamma = 1 keeps theta, gamma = 0 divides it by s")
    g = torch.Generator().manual_seed(7)
    v3_gamma = yarn_ramp(*yarn_correction_range(32, 1, 64, 10000.0, 4096), 32)
    cases = [(64, 10000.0, 40.0, v3_gamma, ntk_by_parts_inv_freq(64, 10000.0, 40.0, 32, 1, 4096),
              "DeepSeek-V3: dim 64, base 10000, s 40, gamma = the ramp over pairs 10..23"),
             (16, 10000.0, 8.0, torch.zeros(8), pi_inv_freq(16, 10000.0, 8.0),
              "dim 16, base 10000, s 8, gamma = 0 (Position Interpolation: every pair theta / s)"),
             (16, 10000.0, 8.0, torch.ones(8), rope_frequencies(16, 10000.0).float(),
              "dim 16, base 10000, s 8, gamma = 1 (every pair keeps theta)"),
             (32, 500000.0, 4.0, torch.rand(16, generator=g), None,
              "dim 32, base 500000, s 4, random gamma in [0, 1)")]
    mistakes = [(dict(swap=True), "you divided the wrong part by s: gamma = 1 keeps theta (extrapolate), "
                 "gamma = 0 interpolates: (1 - gamma) * theta / s + gamma * theta"),
                (dict(times_s=True), "interpolation slows a pair down: divide theta by s, do not multiply"),
                (dict(no_gamma=True), "gamma is ignored (every pair theta / s is plain Position Interpolation): "
                 "blend (1 - gamma) * theta / s + gamma * theta"),
                (dict(exponent="i/d"), "theta_i = base ** (-2i / dim) with i the pair index (the exponent steps "
                 "by 2/dim), not base ** (-i / dim)"),
                (dict(wavelength=True), "theta_i = base ** (-2i / dim) is a frequency (radians per position, "
                 "<= 1), not base ** (+2i / dim)")]
    for dim, base, s, gamma, reference, what in cases:
        case = f"interpolated_inv_freq({dim}, {base:g}, {s:g}, gamma) [{what}]"
        original = gamma.clone()
        got = _call_safe(ex, interpolated_inv_freq, case, dim, base, s, gamma)
        if not torch.equal(gamma, original):
            _fail(ex, f"{case} changed its input gamma", "compute a new tensor; do not write into gamma")
        expected = _inv_freq_variant(dim, base, s, gamma).float() if reference is None else reference
        got = _tensor_of(ex, got, f"inv_freq for {case}", expected.shape, torch.float32,
                         "one float32 frequency per pair: shape (dim // 2,)")
        if torch.allclose(got, expected, rtol=1e-5, atol=0):
            continue
        for kw, hint in mistakes:
            wrong = _inv_freq_variant(dim, base, s, gamma, **kw).float()
            if not torch.allclose(wrong, expected, rtol=1e-5, atol=0) and torch.allclose(got, wrong, rtol=1e-5, atol=0):
                _fail(ex, f"{case}: inv_freq is that of another rule", hint)
        assert_tensor_close(ex, got, expected, f"inv_freq for {case}", rtol=1e-5, atol=0, hint=general)
    _passed(ex, "h(theta_i) = (1 - gamma_i) theta_i / s + gamma_i theta_i: PI at gamma = 0, RoPE at gamma = 1, "
                "DeepSeek-V3's frequencies at its ramp")


# ----------------------------------------------------------------------- chapter 08


def _advantages_variant(rewards: torch.Tensor, group_size: int, groups: str = "contiguous", std_over: str = "group",
                        correction: int = 1, eps: float = 1e-4, eps_in_var: bool = False, scale: bool = True,
                        zero_guard: bool = True) -> torch.Tensor:
    """(r - group mean) / (group std + 1e-4), 0 for constant groups (float64 maths), or one of the usual mistakes."""
    r = rewards.double()
    if groups == "batch":
        grouped = r.view(1, -1)
    elif groups == "strided":                 # groups taken as rewards i, i + n, i + 2n, ...: the wrong layout
        grouped = r.view(group_size, -1).T
    else:
        grouped = r.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        spread = r.view(1, -1) if std_over == "batch" else grouped
        if eps_in_var:
            std = (spread.var(dim=1, correction=correction, keepdim=True) + eps).sqrt()
        else:
            std = spread.std(dim=1, correction=correction, keepdim=True) + eps
        centred = centred / std
    if zero_guard:
        centred = centred.masked_fill(grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True), 0.0)
    return (centred.T if groups == "strided" else centred).reshape(-1).float()


def check_group_advantages(group_advantages: Callable) -> None:
    """Exercise 08.1: A_i = (r_i - mean of its group) / (Bessel std of its group + 1e-4); 0 for a constant group."""
    from deepseek_mini.grpo.loss import group_advantages as reference

    ex = "group_advantages"
    general = ("view the rewards as (n_prompts, group_size) (each prompt's G completions are contiguous); per row: "
               "(r - mean) / (std + 1e-4) with std(correction=1) (Bessel); a row whose rewards are all equal gets 0")
    g = torch.Generator().manual_seed(8)
    cases = [(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]), 4,
              "rewards [1, 0, 0, 0 | 0, 0, 0, 0] in groups of 4 (one right of four; then all four wrong)"),
             (torch.tensor([1.0, 0.0, 0.0, 1.0]), 2, "rewards [1, 0, 0, 1] in groups of 2"),
             (torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, "rewards [1, 0, 0, 1] in one group of 4"),
             (torch.tensor([0.9, 0.9, 0.9, 0.2, 0.5, 0.8]), 3,
              "rewards [0.9, 0.9, 0.9 | 0.2, 0.5, 0.8] in groups of 3"),
             (torch.tensor([0.0, 0.001, 0.3, 0.7]), 2, "rewards [0, 0.001 | 0.3, 0.7] in groups of 2 (a tiny std)"),
             (torch.rand(24, generator=g), 6, "24 random rewards in groups of 6"),
             (torch.randint(0, 2, (32,), generator=g).float(), 4, "32 random 0/1 rewards in groups of 4")]
    mistakes = [(dict(correction=0), "the std uses Bessel's correction, 1/(G - 1): std(dim=1, correction=1) (torch's "
                 "default; unbiased=False / correction=0 is the population std)"),
                (dict(groups="batch"), "normalise within each group (each prompt's G completions), not over the "
                 "whole batch: view the rewards as (-1, group_size) and reduce over dim=1"),
                (dict(std_over="batch"), "the std is the group's too, not the whole batch's: reduce over dim=1 of the "
                 "(n_prompts, group_size) view"),
                (dict(groups="strided"), "each prompt's G completions are contiguous: group k is rewards[k*G:(k+1)*G], "
                 "so view(-1, group_size), not view(group_size, -1)"),
                (dict(scale=False), "divide by the group's std (+ 1e-4) too: subtracting the mean alone is REINFORCE's "
                 "baseline (scale=False)"),
                (dict(eps=0.0), "add 1e-4 to the std: (r - mean) / (std + 1e-4); a tiny std must not blow up the "
                 "advantages"),
                (dict(eps_in_var=True), "add 1e-4 to the std, not to the variance: (r - mean) / (std + 1e-4)"),
                (dict(eps=1e-8), "the epsilon is 1e-4 (TRL's value), added to the std")]
    for rewards, size, what in cases:
        case = f"group_advantages(rewards, {size}) [{what}]"
        original = rewards.clone()
        got = _call_safe(ex, group_advantages, case, rewards, size)
        if not torch.equal(rewards, original):
            _fail(ex, f"{case} changed its input rewards", "compute a new tensor; do not write into rewards")
        expected = reference(rewards, size)
        got = _tensor_of(ex, got, f"advantages for {case}", expected.shape, torch.float32,
                         "one float32 advantage per completion: the same shape as rewards")
        if torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            continue
        grouped, got_grouped = rewards.view(-1, size), got.view(-1, size)
        constant = grouped.amax(dim=1) == grouped.amin(dim=1)
        if not torch.isfinite(got).all():
            where = "a group whose rewards are all equal" if (~torch.isfinite(got_grouped[constant])).any() else "it"
            _fail(ex, f"{case}: the advantages hold NaN or inf (at {where})",
                  "a group whose rewards are all equal has std 0, and 0 / 0 is NaN: add 1e-4 to the std, and "
                  "give such a group advantage 0")
        for kw, hint in mistakes:
            wrong = _advantages_variant(rewards, size, **kw)
            if not torch.allclose(wrong, expected, rtol=1e-4, atol=1e-5, equal_nan=True) \
                    and torch.allclose(got, wrong, rtol=1e-4, atol=1e-5):
                _fail(ex, f"{case}: the advantages are those of another rule", hint)
        if constant.any() and got_grouped[constant].abs().max() > 0:
            _fail(ex, f"{case}: a group whose rewards are all equal got advantages up to "
                      f"{got_grouped[constant].abs().max().item():.3g}, expected exactly 0",
                  "r - mean is rounding noise there (about 1e-8), and noise / 1e-4 is a random push: set the "
                  "advantages of a group whose max equals its min to 0 (masked_fill or torch.where)")
        assert_tensor_close(ex, got, expected, f"advantages for {case}", rtol=1e-4, atol=1e-5, hint=general)
    _passed(ex, "per-group (r - mean) / (Bessel std + 1e-4), 0 for a constant group "
                "(one right of four: +1.5, three times -0.5)")


def _logp_grad(ex: str, out: torch.Tensor, logp: torch.Tensor, case: str) -> torch.Tensor:
    """d out.sum() / d logp, or a CheckFailure when ``out`` lost the gradient that the loss needs."""
    if not out.requires_grad:
        _fail(ex, f"{case}: the result carries no gradient with respect to logp",
              "keep the computation in torch on logp itself: no .detach(), .item(), .tolist(), numpy or "
              "torch.no_grad(); the policy learns through this gradient")
    try:
        (grad,) = torch.autograd.grad(out.sum(), logp, allow_unused=True)
    except Exception as exc:            # a broken graph is a failed check, never a crash of the check
        _fail(ex, f"{case}: backpropagating through the result raised {type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:200] if str(exc) else ''}")
    if grad is None:
        _fail(ex, f"{case}: the result does not depend on logp", "compute it from logp, the policy's log-probs")
    return grad


def _surrogate_variant(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_eps: float,
                       rule: str = "min", ratio: str = "exp") -> torch.Tensor:
    """min(rho A, clip(rho, 1 - eps, 1 + eps) A) per token, in float64, or one of the usual mistakes."""
    lp, old = logp.double(), old_logp.double()
    rho = {"exp": torch.exp(lp - old), "inverse": torch.exp(old - lp), "log": lp - old, "quotient": lp / old}[ratio]
    a = advantages.double()[:, None]
    clipped = rho.clamp(1 - clip_eps, 1 + clip_eps)
    if rule == "max":
        return torch.max(rho * a, clipped * a)
    if rule == "clip_only":
        return clipped * a
    if rule == "no_clip":
        return rho * a
    if rule == "min_of_ratios":
        return torch.min(rho, clipped) * a
    if rule == "clip_product":
        return (rho * a).clamp(1 - clip_eps, 1 + clip_eps)
    if rule == "clip_advantage":
        return torch.min(rho * a, rho * a.clamp(1 - clip_eps, 1 + clip_eps))
    surrogate = torch.min(rho * a, clipped * a)
    return -surrogate if rule == "negated" else surrogate


def check_clipped_surrogate(clipped_surrogate: Callable) -> None:
    """Exercise 08.2: per token min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = exp(logp - old_logp) (V3 eq. 26)."""
    ex = "clipped_surrogate"
    general = ("rho = torch.exp(logp - old_logp); return torch.min(rho * A, rho.clamp(1 - clip_eps, 1 + clip_eps) * A) "
               "with A = advantages[:, None] (one advantage per row, broadcast over its tokens)")
    rho = torch.tensor([1.5, 0.5, 1.1, 1.0])                        # above, below and inside the clip range
    hand_logp = rho.log().expand(2, 4).clone()
    g = torch.Generator().manual_seed(8)
    rand_old = -torch.rand(4, 7, generator=g) * 4
    square_old = -torch.rand(3, 3, generator=g) * 3
    cases = [(hand_logp, torch.zeros(2, 4), torch.tensor([1.0, -1.0]), 0.2,
              "rho = [1.5, 0.5, 1.1, 1.0] in both rows, A = [+1, -1], eps = 0.2"),
             (hand_logp, torch.zeros(2, 4), torch.tensor([2.0, -0.5]), 0.2,
              "rho = [1.5, 0.5, 1.1, 1.0] in both rows, A = [+2, -0.5], eps = 0.2"),
             (rand_old + 0.4 * torch.randn(4, 7, generator=g), rand_old, torch.randn(4, generator=g), 0.1,
              "random log-probs (4, 7), random A, eps = 0.1"),
             (square_old + 0.4 * torch.randn(3, 3, generator=g), square_old, torch.tensor([1.5, -1.0, 0.5]), 0.2,
              "random log-probs (3, 3): as many tokens as rows, A = [1.5, -1, 0.5], eps = 0.2")]
    clip_hint = ("clip the ratio rho, not the advantage or the product: rho.clamp(1 - eps, 1 + eps) * A, and take "
                 "the min with the unclipped rho * A")
    mistakes = [(dict(rule="negated"), "return the objective min(rho A, clip(rho) A) itself, not its negation: "
                 "the loss negates it later"),
                (dict(rule="max"), "take the min of the two terms, not the max: the min is the pessimistic bound "
                 "that stops the push once rho leaves [1 - eps, 1 + eps] in the direction A favours"),
                (dict(rule="min_of_ratios"), "take the min of the two products rho * A and clip(rho) * A, not of "
                 "the ratios before multiplying: for a negative advantage the min picks the other term"),
                (dict(rule="clip_only"), "take the min with the unclipped term rho * A as well: a token that moved "
                 "against its advantage must keep its full gradient"),
                (dict(rule="no_clip"), "the ratio is never clipped; " + clip_hint),
                (dict(rule="clip_advantage"), clip_hint),
                (dict(rule="clip_product"), clip_hint),
                (dict(ratio="inverse"), "rho = pi_theta / pi_old = exp(logp - old_logp), not exp(old_logp - logp)"),
                (dict(ratio="log"), "logp - old_logp is the log of the ratio: rho = torch.exp(logp - old_logp)"),
                (dict(ratio="quotient"), "logp and old_logp are log-probabilities: the probability ratio is "
                 "exp(logp - old_logp), not logp / old_logp")]
    for logp_values, old_logp, adv, eps, what in cases:
        case = f"clipped_surrogate(logp, old_logp, advantages, {eps:g}) [{what}]"
        logp = logp_values.clone().requires_grad_(True)
        inputs = (logp_values.clone(), old_logp.clone(), adv.clone())
        got = _call_safe(ex, clipped_surrogate, case, logp, old_logp, adv, eps,
                         hint="logp and old_logp are (B, T), advantages is (B,), one per row: broadcast it over "
                              "the row's tokens with advantages[:, None]; run your function on this input in a "
                              "cell of your own to see where it fails")
        if not all(torch.equal(x, y) for x, y in zip(inputs, (logp.detach(), old_logp, adv))):
            _fail(ex, f"{case} changed one of its inputs", "compute new tensors; do not write into the inputs")
        expected = _surrogate_variant(logp_values, old_logp, adv, eps).float()
        got_values = _tensor_of(ex, got, f"surrogate for {case}", expected.shape, torch.float32,
                                "one float32 value per token: the shape of logp, (B, T)")
        if not torch.allclose(got_values, expected, rtol=1e-5, atol=1e-6):
            for kw, hint in mistakes:
                wrong = _surrogate_variant(logp_values, old_logp, adv, eps, **kw).float()
                if not torch.allclose(wrong, expected, rtol=1e-5, atol=1e-6) \
                        and torch.allclose(got_values, wrong, rtol=1e-5, atol=1e-6):
                    _fail(ex, f"{case}: the surrogate is that of another rule", hint)
            assert_tensor_close(ex, got_values, expected, f"surrogate for {case}", rtol=1e-5, atol=1e-6, hint=general)
        grad = _logp_grad(ex, got, logp, case)
        reference_logp = logp_values.double().requires_grad_(True)
        (want,) = torch.autograd.grad(_surrogate_variant(reference_logp, old_logp, adv, eps).sum(), reference_logp)
        assert_tensor_close(ex, grad, want.float(), f"d surrogate / d logp for {case}", rtol=1e-4, atol=1e-6,
                            hint="the clipped term has no gradient where it is taken (rho outside the range); "
                                 "build it with torch ops on logp (torch.exp, clamp, torch.min), old_logp fixed")
    _passed(ex, "min(rho A, clip(rho, 1 - eps, 1 + eps) A): rho = 1.5 gives 1.2 with A = +1 (clipped) and -1.5 "
                "with A = -1 (not clipped), and the gradient follows")


def _kl_variant(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """The per-token KL estimate, in float64: k3 = exp(d) - d - 1 with d = ref - logp, or one of the usual mistakes."""
    d = ref_logp.double() - logp.double()
    if estimator == "quotient":
        q = ref_logp.double() / logp.double()
        return q - q.log() - 1
    return {"k3": torch.exp(d) - d - 1, "k1": d, "k1_flipped": -d, "reversed": torch.exp(-d) + d - 1,
            "negated": -(torch.exp(d) - d - 1), "k2": d ** 2 / 2, "no_minus_one": torch.exp(d) - d,
            "plus_d": torch.exp(d) + d - 1}[estimator]


_KL_MISTAKES = [
    *[(dict(estimator=name), "that is k1, the log-ratio itself (ref_logp - logp, or logp - ref_logp): unbiased "
       "but negative for about half the tokens; k3 = exp(d) - d - 1 with d = ref_logp - logp is never negative "
       "(V3 eq. 27)") for name in ("k1", "k1_flipped")],
    (dict(estimator="reversed"), "d is reversed: d = ref_logp - logp (the reference over the policy, pi_ref / "
     "pi_theta in V3 eq. 27), not logp - ref_logp"),
    (dict(estimator="negated"), "the sign is flipped: k3 = exp(d) - d - 1 >= 0 is a penalty, added to the loss "
     "with + beta"),
    (dict(estimator="k2"), "that is k2, d ** 2 / 2; V3 uses k3 = exp(d) - d - 1 (eq. 27)"),
    (dict(estimator="no_minus_one"), "the - 1 is missing: k3 = exp(d) - d - 1, which is 0 where the policies agree"),
    (dict(estimator="plus_d"), "k3 = exp(d) - d - 1: minus d, not plus d"),
    (dict(estimator="quotient"), "logp and ref_logp are log-probabilities: the ratio pi_ref / pi_theta is "
     "exp(ref_logp - logp), not ref_logp / logp"),
]


def check_k3_kl(k3_kl: Callable) -> None:
    """Exercise 08.3: the per-token k3 estimate exp(d) - d - 1, d = ref_logp - logp (V3 eq. 27)."""
    from deepseek_mini.grpo.loss import k3_kl as reference

    ex = "k3_kl"
    general = "d = ref_logp - logp; return torch.exp(d) - d - 1, token by token (the shape of logp)"
    g = torch.Generator().manual_seed(8)
    hand_logp = torch.tensor([[-1.0, -2.0, -1.0, -0.5]])
    hand_d = torch.tensor([[0.0, math.log(2.0), -math.log(2.0), 3.0]])
    rand_logp = -torch.rand(3, 6, generator=g) * 5
    cases = [(hand_logp, hand_logp + hand_d, "d = ref_logp - logp = [0, ln 2, -ln 2, 3]: k3 = [0, 1 - ln 2, "
              "ln 2 - 1/2, e^3 - 4]"),
             (rand_logp, rand_logp + 0.5 * torch.randn(3, 6, generator=g), "random log-probs (3, 6)"),
             (rand_logp, rand_logp.clone(), "ref_logp == logp: the policies agree")]
    for logp_values, ref_logp, what in cases:
        case = f"k3_kl(logp, ref_logp) [{what}]"
        logp = logp_values.clone().requires_grad_(True)
        ref_original = ref_logp.clone()
        got = _call_safe(ex, k3_kl, case, logp, ref_logp)
        if not torch.equal(logp.detach(), logp_values) or not torch.equal(ref_logp, ref_original):
            _fail(ex, f"{case} changed one of its inputs", "compute new tensors; do not write into the inputs")
        expected = reference(logp_values, ref_logp)
        got_values = _tensor_of(ex, got, f"k3 for {case}", expected.shape, torch.float32,
                                "one float32 value per token: the shape of logp")
        if not torch.allclose(got_values, expected, rtol=1e-5, atol=1e-6):
            for kw, hint in _KL_MISTAKES:
                wrong = _kl_variant(logp_values, ref_logp, **kw).float()
                if not torch.allclose(wrong, expected, rtol=1e-5, atol=1e-6, equal_nan=True) \
                        and torch.allclose(got_values, wrong, rtol=1e-5, atol=1e-6):
                    _fail(ex, f"{case}: that is another estimate", hint)
            if (got_values < -1e-6).any():
                _fail(ex, f"{case}: k3 is negative at {int((got_values < -1e-6).sum())} tokens, e.g. "
                          f"{got_values.min().item():.4g}", "k3 = exp(d) - d - 1 >= 0 for every d (e^d >= 1 + d)")
            same = ref_logp == logp_values
            if same.any() and got_values[same].abs().max() > 1e-6:
                _fail(ex, f"{case}: k3 is {got_values[same].abs().max().item():.4g} where ref_logp == logp, expected 0",
                      "where the two policies agree, d = 0 and exp(0) - 0 - 1 = 0")
            assert_tensor_close(ex, got_values, expected, f"k3 for {case}", rtol=1e-5, atol=1e-6, hint=general)
        grad = _logp_grad(ex, got, logp, case)
        assert_tensor_close(ex, grad, 1 - torch.exp(ref_logp - logp_values), f"d k3 / d logp for {case}",
                            rtol=1e-4, atol=1e-6, hint="the gradient flows through logp only; d k3 / d logp = "
                                                       "1 - exp(ref_logp - logp)")
    _passed(ex, "exp(d) - d - 1 with d = ref_logp - logp: 0 where the policies agree, >= 0 everywhere "
                "(1 - ln 2 = 0.3069 at d = ln 2, ln 2 - 1/2 = 0.1931 at d = -ln 2)")


def _mean_kl_variant(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: str = "k3",
                     average: str = "grpo") -> float:
    """The k3 KL averaged over each row's completion tokens, then over rows, or one of the usual mistakes."""
    kl = _kl_variant(logp, ref_logp, estimator)
    m = mask.double()
    if average == "all":
        return kl.mean().item()
    if average == "bnpo":
        return ((kl * m).sum() / m.sum()).item()
    if average == "over_T":
        return ((kl * m).sum(-1) / kl.shape[-1]).mean().item()
    if average == "row_sum":
        return (kl * m).sum(-1).mean().item()
    if average == "total":
        return (kl * m).sum().item()
    return ((kl * m).sum(-1) / m.sum(-1)).mean().item()


def check_masked_mean_kl(masked_mean_kl: Callable) -> None:
    """Exercise 08.4: mean k3 over each completion's tokens (mask), then over completions: GRPO's average."""
    from deepseek_mini.grpo.loss import grpo_loss

    ex = "masked_mean_kl"
    general = ("k3 = exp(d) - d - 1 with d = ref_logp - logp per token; per row, sum k3 * mask and divide by "
               "mask.sum(-1) (that row's completion tokens); then the mean over rows")
    g = torch.Generator().manual_seed(8)
    hand_logp = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-1.0, -2.0, -0.5, -1.5]])
    hand_d = torch.tensor([[math.log(2.0), -2.0, -2.0, -2.0], [-math.log(2.0)] * 4])
    hand_mask = torch.tensor([[True, False, False, False], [True, True, True, True]])
    rand_logp = -torch.rand(5, 8, generator=g) * 5
    rand_mask = torch.arange(8)[None, :] < torch.tensor([8, 2, 5, 1, 7])[:, None]
    cases = [(hand_logp, hand_logp + hand_d, hand_mask, "row 0: 1 completion token, k3 = 1 - ln 2, then padding; "
              "row 1: 4 tokens, each k3 = ln 2 - 1/2; expected ((1 - ln 2) + (ln 2 - 1/2)) / 2 = 0.25"),
             (rand_logp, rand_logp + 0.5 * torch.randn(5, 8, generator=g), rand_mask,
              "random log-probs (5, 8), completions of 8, 2, 5, 1, 7 tokens, random values in the padding"),
             (rand_logp, rand_logp.clone(), rand_mask, "ref_logp == logp: the policies agree, the KL is 0")]
    mistakes = [(dict(average="all"), "the padding is averaged in: only the completion tokens count (mask == True); "
                 "multiply k3 by the mask and divide each row's sum by mask.sum(-1)"),
                (dict(average="bnpo"), "that is one token mean over the whole batch (bnpo): GRPO averages within "
                 "each completion first, (1/|o_i|) sum_t, then over completions, so every completion weighs the "
                 "same"),
                (dict(average="over_T"), "divide each row's sum by its number of completion tokens, mask.sum(-1), "
                 "not by the padded length T"),
                (dict(average="row_sum"), "average over each row's completion tokens (divide by mask.sum(-1)), "
                 "not just sum them"),
                (dict(average="total"), "average, do not sum: per row divide by mask.sum(-1), then take the mean "
                 "over rows"),
                *[(kw, hint) for kw, hint in _KL_MISTAKES]]
    right_values = []
    for logp_values, ref_logp, mask, what in cases:
        case = f"masked_mean_kl(logp, ref_logp, mask) [{what}]"
        logp = logp_values.clone().requires_grad_(True)
        originals = (ref_logp.clone(), mask.clone())
        got = _call_safe(ex, masked_mean_kl, case, logp, ref_logp, mask)
        if not (torch.equal(logp.detach(), logp_values) and torch.equal(ref_logp, originals[0])
                and torch.equal(mask, originals[1])):
            _fail(ex, f"{case} changed one of its inputs", "compute new tensors; do not write into the inputs")
        scalar_hint = "return a 0-dim tensor: the mean over rows of each row's mean over its completion tokens"
        if isinstance(got, torch.Tensor) and got.numel() != 1:
            _fail(ex, f"{case} returned a tensor of shape {tuple(got.shape)}; expected one number (a 0-dim tensor)",
                  "one value per row: take the mean over the rows too" if got.shape == mask.shape[:1]
                  else scalar_hint)
        if not isinstance(got, torch.Tensor):
            _number_of(ex, got, case, scalar_hint)    # says what else it is
            _fail(ex, f"{case} returned a Python {type(got).__name__}; expected a 0-dim tensor",
                  "keep it a tensor (no .item() or float()): the loss backpropagates through the KL")
        value = _number_of(ex, got, case, scalar_hint)
        expected = float(grpo_loss(logp_values, logp_values, ref_logp, torch.zeros(len(mask)), mask, beta=1.0)[0])
        if math.isclose(value, expected, rel_tol=1e-5, abs_tol=1e-6):
            right_values.append((got, logp, logp_values, ref_logp, mask, case))   # gradients once all values hold
            continue
        for kw, hint in mistakes:
            wrong = _mean_kl_variant(logp_values, ref_logp, mask, **kw)
            if not math.isclose(wrong, expected, rel_tol=1e-5, abs_tol=1e-6) \
                    and math.isclose(value, wrong, rel_tol=1e-5, abs_tol=1e-6):
                _fail(ex, f"{case} returned {value:.6g}, expected {expected:.6g}", hint)
        if value < -1e-6:
            _fail(ex, f"{case} returned {value:.6g}, a negative KL", "k3 = exp(d) - d - 1 >= 0 for every token")
        _fail(ex, f"{case} returned {value:.6g}, expected {expected:.6g}", general)
    for got, logp, logp_values, ref_logp, mask, case in right_values:
        grad = _logp_grad(ex, got, logp, case)
        reference_logp = logp_values.clone().requires_grad_(True)
        (want,) = torch.autograd.grad(grpo_loss(reference_logp, logp_values, ref_logp, torch.zeros(len(mask)), mask,
                                                beta=1.0)[0], reference_logp)
        assert_tensor_close(ex, grad, want, f"d masked_mean_kl / d logp for {case}", rtol=1e-4, atol=1e-7,
                            hint="the gradient flows through logp only, per token (1 - exp(ref_logp - logp)) * mask "
                                 "/ mask.sum(-1) / rows: build the value with torch ops on logp")
    _passed(ex, "k3 over each completion's own tokens, then the mean over completions (0.25 on the hand case; "
                "padding ignored, every completion weighs the same)")
