"""Chapter 07's exercise checks: they pass correct answers, name each planted mistake, and turn a
broken function (an exception, a wrong type or shape, NaN) into a failed check, never a crash."""

from __future__ import annotations

import math
import re

import pytest
import torch

from deepseek_mini import checks
from deepseek_mini.checks import CheckFailure
from deepseek_mini.rope import ntk_by_parts_inv_freq, yarn_correction_range, yarn_mscale, yarn_ramp

CHECKS = [checks.check_ntk_by_parts_ramp, checks.check_yarn_mscale, checks.check_yarn_softmax_scale,
          checks.check_interpolated_inv_freq]


def _failure(check, fn) -> str:
    with pytest.raises(CheckFailure) as info:
        check(fn)
    return str(info.value)


# ----------------------------------------------------------------- answers written the ways learners do, with a slip


def _ramp(dim, base, original_max, beta_fast=32, beta_slow=1, mistake=None):
    """Exercise 1 as a learner writes it; ``mistake`` plants one slip."""
    log_top = {"log10": math.log10}.get(mistake, math.log)
    two_pi = 1.0 if mistake == "no_2pi" else 2 * math.pi
    fast, slow = (beta_slow, beta_fast) if mistake == "swap" else (beta_fast, beta_slow)

    def index_of(n):
        return dim * log_top(original_max / (n * two_pi)) / (2 * math.log(base))

    low, high = index_of(fast), index_of(slow)
    if mistake != "no_floor_ceil":
        low, high = math.floor(low), math.ceil(high)
    if mistake != "no_clip":
        low, high = max(low, 0), min(high, dim - 1)
    width = high - low + {"denominator+1": 1, "denominator-1": -1}.get(mistake, 0)
    i = torch.arange(0, dim, 2) if mistake == "channels" else torch.arange(dim // 2)
    i = i.float()
    rising = torch.clamp((i - low) / width, 0.0, 1.0)
    return rising if mistake == "reversed" else 1.0 - rising


def _ramp_loop(dim, base, original_max, beta_fast=32, beta_slow=1):
    """Exercise 1 with a loop over the pairs and the ramp written as (high - i) / (high - low)."""
    low = math.floor(dim * math.log(original_max / (beta_fast * 2 * math.pi)) / (2 * math.log(base)))
    high = math.ceil(dim * math.log(original_max / (beta_slow * 2 * math.pi)) / (2 * math.log(base)))
    low, high = max(low, 0), min(high, dim - 1)
    return torch.tensor([min(max((high - i) / (high - low), 0.0), 1.0) for i in range(dim // 2)])


def _mscale(s, mscale=1.0, mistake=None):
    if s <= 1 and mistake != "no_guard":
        return 1.0
    log = {"log10": math.log10, "log2": math.log2}.get(mistake, math.log)
    m = 0.1 * (1.0 if mistake == "no_mscale" else mscale) * log(s) + 1.0
    return {"squared": m ** 2, "sqrt": math.sqrt(m)}.get(mistake, m)


def _softmax_scale(nope, rope, s, mscale_all_dim, mistake=None):
    d = {"rope_only": rope, "nope_only": nope}.get(mistake, nope + rope)
    base = 1.0 / d if mistake == "one_over_d" else 1.0 / math.sqrt(d)
    m = _mscale(s, mscale_all_dim, mistake if mistake in ("log10", "no_guard") else None)
    if mistake == "not_squared":
        return base * m
    return base / m ** 2 if mistake == "divided" else base * m ** 2


def _inv_freq(dim, base, s, gamma, mistake=None):
    i = torch.arange(dim // 2, dtype=torch.float32)
    exponent = i / dim if mistake == "i_over_d" else 2 * i / dim
    theta = base ** exponent if mistake == "wavelength" else 1.0 / base ** exponent
    slow = theta * s if mistake == "times_s" else theta / s
    if mistake == "pi_only":
        return slow
    if mistake == "swapped":
        return gamma * slow + (1 - gamma) * theta
    return (1 - gamma) * slow + gamma * theta


# ----------------------------------------------------------------- the references pass


def test_checks_pass_correct_answers_and_say_so(capsys):
    checks.check_ntk_by_parts_ramp(lambda d, b, L, f, s: yarn_ramp(*yarn_correction_range(f, s, d, b, L), d // 2))
    checks.check_ntk_by_parts_ramp(_ramp)
    checks.check_ntk_by_parts_ramp(_ramp_loop)
    checks.check_yarn_mscale(yarn_mscale)
    checks.check_yarn_mscale(_mscale)
    checks.check_yarn_mscale(lambda s, mscale=1.0: torch.tensor(_mscale(s, mscale)))   # a 0-d tensor is a number
    checks.check_yarn_softmax_scale(_softmax_scale)
    checks.check_interpolated_inv_freq(_inv_freq)
    checks.check_interpolated_inv_freq(lambda dim, base, s, gamma: torch.lerp(
        1 / (s * base ** (torch.arange(0, dim, 2).float() / dim)), base ** (-torch.arange(0, dim, 2).float() / dim),
        gamma))
    out = capsys.readouterr().out
    assert out.count("✓") == 9 and out.count("\n") == 9
    assert "0.135234" in out and "1.36889" in out


def test_the_hand_cases_are_deepseek_v3s_numbers():
    """The facts the checks rest on: V3's ramp runs over pairs (10, 23), mscale(40) = 1.36889, scale 0.135234."""
    assert yarn_correction_range(32, 1, 64, 10000.0, 4096) == (10, 23)
    gamma = _ramp(64, 10000.0, 4096)
    assert gamma[:11].eq(1).all() and gamma[23:].eq(0).all() and gamma[11].item() == pytest.approx(12 / 13)
    assert yarn_mscale(40.0) == pytest.approx(1.368888, abs=1e-6)
    assert _softmax_scale(128, 64, 40.0, 1.0) == pytest.approx(0.135234, abs=1e-6)
    theta = 1.0 / 10000.0 ** (torch.arange(0, 64, 2).float() / 64)
    assert torch.allclose(_inv_freq(64, 10000.0, 40.0, gamma), ntk_by_parts_inv_freq(64, 10000.0, 40.0), rtol=1e-6)
    assert torch.allclose(_inv_freq(64, 10000.0, 40.0, torch.zeros(32)), theta / 40, rtol=1e-6)    # PI


# ----------------------------------------------------------------- each planted mistake is named


@pytest.mark.parametrize("mistake,message", [
    ("reversed", "the ramp is reversed \\(you returned 1 - gamma\\)"),
    ("swap", "beta_fast and beta_slow are swapped"),
    ("log10", "mixed logarithms"),
    ("no_2pi", "the 2 pi is missing"),
    ("no_floor_ceil", "round the range outwards"),
    ("no_clip", "clip low at 0"),
    ("denominator+1", "off by one in the ramp's denominator: .* not high - low \\+ 1"),
    ("denominator-1", "off by one in the ramp's denominator: .* not high - low - 1"),
    ("channels", "the ramp runs over the pair index"),
])
def test_ramp_mistakes_are_named(mistake, message):
    text = _failure(checks.check_ntk_by_parts_ramp, lambda *args: _ramp(*args, mistake=mistake))
    assert re.search(message, text), text
    assert "hint:" in text


def test_ramp_names_an_unknown_rise_and_values_outside_0_1():
    def rising(*args):
        return torch.linspace(0, 1, args[0] // 2)

    assert "gamma rises with the pair index" in _failure(checks.check_ntk_by_parts_ramp, rising)
    text = _failure(checks.check_ntk_by_parts_ramp, lambda *args: 2 * _ramp(*args))
    assert re.search(r"gamma\[0\] = 2 is outside \[0, 1\]", text), text


@pytest.mark.parametrize("mistake,message", [
    ("log10", "use the natural logarithm: .* not math.log10"),
    ("log2", "not math.log2"),
    ("no_guard", "for s <= 1 \\(no extension\\) return 1"),
    ("no_mscale", "multiplied by the `mscale` argument"),
    ("squared", "not its square"),
    ("sqrt", "do not take another square root"),
])
def test_mscale_mistakes_are_named(mistake, message):
    text = _failure(checks.check_yarn_mscale, lambda s, mscale=1.0: _mscale(s, mscale, mistake))
    assert re.search(message, text), text
    assert "returned" in text and "expected" in text


@pytest.mark.parametrize("mistake,message", [
    ("not_squared", "multiply by mscale squared"),
    ("divided", "multiply by mscale \\*\\* 2, do not divide"),
    ("rope_only", "not the RoPE part alone"),
    ("nope_only", "not the non-RoPE part alone"),
    ("one_over_d", "d_qk \\*\\* -0.5, not 1 / d_qk"),
    ("log10", "not math.log10"),
    ("no_guard", "for s <= 1 \\(no extension\\) return 1"),
])
def test_softmax_scale_mistakes_are_named(mistake, message):
    text = _failure(checks.check_yarn_softmax_scale, lambda *args: _softmax_scale(*args, mistake=mistake))
    assert re.search(message, text), text


def test_softmax_scale_names_v3s_case_first():
    text = _failure(checks.check_yarn_softmax_scale, lambda *args: _softmax_scale(*args, mistake="not_squared"))
    assert "yarn_softmax_scale(128, 64, 40, 1) [DeepSeek-V3" in text and "expected 0.135234" in text


@pytest.mark.parametrize("mistake,message", [
    ("swapped", "you divided the wrong part by s"),
    ("times_s", "divide theta by s, do not multiply"),
    ("pi_only", "gamma is ignored"),
    ("i_over_d", "not base \\*\\* \\(-i / dim\\)"),
    ("wavelength", "not base \\*\\* \\(\\+2i / dim\\)"),
])
def test_inv_freq_mistakes_are_named(mistake, message):
    text = _failure(checks.check_interpolated_inv_freq, lambda *args: _inv_freq(*args, mistake=mistake))
    assert re.search(message, text), text


def test_inv_freq_names_a_function_that_changes_its_input():
    def in_place(dim, base, s, gamma):
        out = _inv_freq(dim, base, s, gamma.clone())
        gamma.mul_(0.5)
        return out

    assert "changed its input gamma" in _failure(checks.check_interpolated_inv_freq, in_place)


def test_inv_freq_reports_the_first_differing_pair_otherwise():
    def off_at_pair_3(*args):
        out = _inv_freq(*args).clone()
        out[3] *= 1.01
        return out

    text = _failure(checks.check_interpolated_inv_freq, off_at_pair_3)
    assert "first at index (3,)" in text and "hint: theta_i = base ** (-2i / dim)" in text


def test_mistake_variants_differ_from_the_answer_on_the_first_case():
    """Each planted ramp slip changes V3's (or the short-L) case, so its hint can fire."""
    v3 = [(64, 10000.0, 4096, 32, 1), (16, 10000.0, 64, 32, 1)]
    for kw in [dict(reverse=True), dict(swap=True), dict(log_top=math.log10), dict(two_pi=False),
               dict(truncate=False), dict(clip=False), dict(denom=1), dict(denom=-1), dict(channel_index=True)]:
        changed = [not torch.allclose(checks._ramp_variant(*case, **kw), checks._ramp_variant(*case)) for case in v3]
        assert any(changed), kw


# ----------------------------------------------------------------- a broken function fails the check, never crashes it


def _raises(*args):
    raise IndexError("list index out of range")


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
@pytest.mark.parametrize("broken", [_raises, lambda *args: None, lambda *args: "gamma",
                                    lambda *args: [1.0, 2.0],
                                    lambda *args: float("nan"), lambda *args: True, lambda *args: (1.0, 2.0),
                                    lambda *args: torch.zeros(3, dtype=torch.int64),
                                    lambda *args: torch.full((args[0] // 2,), float("nan")),
                                    lambda *args: torch.ones(args[0] // 2, dtype=torch.float64),
                                    lambda *args: torch.tensor(True), lambda *args: float("inf")],
                         ids=["raises", "None", "str", "list", "nan", "bool", "tuple", "int-tensor", "nan-tensor",
                              "float64", "bool-tensor", "inf"])
def test_a_broken_function_fails_the_check_without_crashing_it(check, broken):
    message = _failure(check, broken)       # a CheckFailure, never another exception from inside the check
    assert message.startswith(check.__name__.removeprefix("check_") + ": ")


def test_an_exception_names_the_input_it_was_raised_on():
    message = _failure(checks.check_ntk_by_parts_ramp, _raises)
    assert "raised IndexError on ntk_by_parts_ramp(64, 10000, 4096, 32, 1)" in message
    message = _failure(checks.check_yarn_mscale, _raises)
    assert "raised IndexError on yarn_mscale(40, 1)" in message and "list index out of range" in message
