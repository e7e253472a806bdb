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

from typing import Callable

import torch

__all__ = ["CheckFailure", "assert_tensor_close", "check_rms_norm", "check_rope_rotation",
           "check_causal_mask", "check_kv_cache_append", "check_top_p_filter"]


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
