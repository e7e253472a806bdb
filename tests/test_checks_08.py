"""Chapter 08's exercise checks: they pass correct answers, name each planted mistake, and turn a
broken function (an exception, a wrong type or shape, NaN) into a failed check, never a crash."""

from __future__ import annotations

import math
import re

import pytest
import torch

from deepseek_mini import checks
from deepseek_mini.checks import CheckFailure
from deepseek_mini.grpo.loss import group_advantages, grpo_loss, k3_kl

CHECKS = [checks.check_group_advantages, checks.check_clipped_surrogate, checks.check_k3_kl,
          checks.check_masked_mean_kl]


def _failure(check, fn) -> str:
    with pytest.raises(CheckFailure) as info:
        check(fn)
    return str(info.value)


# ----------------------------------------------------------------- answers written the ways learners do, with a slip


def _advantages(rewards, group_size, mistake=None):
    """Exercise 1 as a learner writes it; ``mistake`` plants one slip."""
    grouped = rewards.view(1, -1) if mistake == "whole_batch" else rewards.view(-1, group_size)
    if mistake == "strided":
        grouped = rewards.view(group_size, -1).T
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, unbiased=mistake != "population", keepdim=True)
    eps = 0.0 if mistake in ("no_eps", "no_eps_no_guard") else 1e-4
    adv = (grouped - mean) / (std + eps)
    if mistake == "eps_in_var":
        adv = (grouped - mean) / (grouped.var(dim=1, keepdim=True) + 1e-4).sqrt()
    if mistake == "mean_only":
        adv = grouped - mean
    if mistake not in ("no_guard", "no_eps_no_guard"):
        adv = torch.where(std == 0, torch.zeros_like(adv), adv)
    return (adv.T if mistake == "strided" else adv).reshape(-1)


def _advantages_loop(rewards, group_size):
    """Exercise 1 with a loop over the groups and statistics module-free maths."""
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size].tolist()
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        out += [0.0 if max(group) == min(group) else (r - mean) / (std + 1e-4) for r in group]
    return torch.tensor(out)


def _surrogate(logp, old_logp, advantages, clip_eps, mistake=None):
    """Exercise 2 as a learner writes it."""
    ratio = {"inverse": torch.exp(old_logp - logp), "no_exp": logp - old_logp}.get(mistake, torch.exp(logp - old_logp))
    a = advantages[None, :] if mistake == "columns" else advantages[:, None]
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    if mistake == "max":
        return torch.max(ratio * a, clipped * a)
    if mistake == "min_of_ratios":                  # right for A > 0 only: forgets the min flips for A < 0
        return torch.min(ratio, clipped) * a
    if mistake == "no_min":
        return clipped * a
    if mistake == "clip_advantage":
        return torch.min(ratio * a, ratio * torch.clamp(a, 1 - clip_eps, 1 + clip_eps))
    if mistake == "clip_product":
        return torch.clamp(ratio * a, 1 - clip_eps, 1 + clip_eps)
    if mistake == "detached":
        return torch.min(ratio * a, clipped * a).detach()
    if mistake == "negated":
        return -torch.min(ratio * a, clipped * a)
    return torch.min(ratio * a, clipped * a)


def _surrogate_where(logp, old_logp, advantages, clip_eps):
    """Exercise 2 with torch.where: the clipped term where it is the smaller one."""
    ratio = (logp - old_logp).exp()
    a = advantages.unsqueeze(1).expand_as(ratio)
    unclipped, clipped = ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a
    return torch.where(clipped < unclipped, clipped, unclipped)


def _k3(logp, ref_logp, mistake=None):
    d = logp - ref_logp if mistake == "reversed" else ref_logp - logp
    if mistake == "k1":
        return ref_logp - logp
    if mistake == "k1_flipped":
        return logp - ref_logp
    if mistake == "negated":
        return -(torch.exp(d) - d - 1)
    if mistake == "no_minus_one":
        return torch.exp(d) - d
    if mistake == "k2":
        return 0.5 * d ** 2
    return torch.exp(d) - d - 1


def _mean_kl(logp, ref_logp, mask, mistake=None):
    """Exercise 4 as a learner writes it."""
    kl = _k3(logp, ref_logp, mistake if mistake in ("k1", "k1_flipped", "reversed", "negated") else None)
    m = mask.float()
    if mistake == "no_mask":
        return kl.mean()
    if mistake == "bnpo":
        return (kl * m).sum() / m.sum()
    if mistake == "over_T":
        return ((kl * m).sum(-1) / kl.shape[1]).mean()
    if mistake == "per_row":
        return (kl * m).sum(-1) / m.sum(-1)
    if mistake == "item":
        return ((kl * m).sum(-1) / m.sum(-1)).mean().item()
    return ((kl * m).sum(-1) / m.sum(-1)).mean()


def _mean_kl_indexing(logp, ref_logp, mask):
    """Exercise 4 row by row, with boolean indexing."""
    d = ref_logp - logp
    kl = d.exp() - d - 1
    return torch.stack([kl[i][mask[i]].mean() for i in range(len(mask))]).mean()


# ----------------------------------------------------------------- the references pass


def test_checks_pass_correct_answers_and_say_so(capsys):
    checks.check_group_advantages(group_advantages)
    checks.check_group_advantages(_advantages)
    checks.check_group_advantages(_advantages_loop)
    checks.check_clipped_surrogate(_surrogate)
    checks.check_clipped_surrogate(_surrogate_where)
    checks.check_k3_kl(k3_kl)
    checks.check_k3_kl(_k3)
    checks.check_masked_mean_kl(_mean_kl)
    checks.check_masked_mean_kl(_mean_kl_indexing)
    out = capsys.readouterr().out
    assert out.count("✓") == 9 and out.count("\n") == 9


def test_the_hand_cases_hold_the_numbers_the_exercises_quote():
    """One right of four: +1.5 and -0.5; [1, 0, 0, 1] in pairs: +-0.707; rho = 1.5: 1.2 (A = +1), -1.5 (A = -1)."""
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4)
    assert adv.tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-3)
    assert group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2).tolist() == pytest.approx(
        [0.7070, -0.7070, -0.7070, 0.7070], abs=1e-4)
    assert group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4).tolist() == pytest.approx(
        [0.8658, -0.8658, -0.8658, 0.8658], abs=1e-4)
    logp = torch.tensor([1.5, 0.5]).log().expand(2, 2)
    got = _surrogate(logp, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), 0.2)
    assert torch.allclose(got, torch.tensor([[1.2, 0.5], [-1.5, -0.8]]), atol=1e-6)
    d = torch.tensor([0.0, math.log(2.0), -math.log(2.0)])
    assert k3_kl(torch.zeros(3), d).tolist() == pytest.approx([0.0, 1 - math.log(2), math.log(2) - 0.5], abs=1e-6)
    # The check's reference for exercise 4 is grpo_loss with A = 0, beta = 1: exactly the GRPO mean of k3.
    logp, ref = -torch.rand(3, 5), -torch.rand(3, 5)
    mask = torch.arange(5)[None, :] < torch.tensor([5, 1, 3])[:, None]
    loss, _ = grpo_loss(logp, logp, ref, torch.zeros(3), mask, beta=1.0)
    assert loss.item() == pytest.approx(_mean_kl_indexing(logp, ref, mask).item(), rel=1e-6)
    # The check's reference for exercise 2 is the package's surrogate: grpo_loss with beta = 0 is its negated GRPO mean.
    old, adv = logp + 0.3 * torch.randn(3, 5), torch.randn(3)
    surrogate = checks._surrogate_variant(logp, old, adv, 0.2).float()
    loss, _ = grpo_loss(logp, old, None, adv, mask, clip_eps=0.2, beta=0.0)
    assert -loss.item() == pytest.approx(((surrogate * mask).sum(-1) / mask.sum(-1)).mean().item(), rel=1e-5)


def test_the_unguarded_formula_leaves_rounding_noise_in_a_constant_group():
    """The check's case [0.9, 0.9, 0.9]: r - mean is not exactly 0 in float32, so the guard matters."""
    r = torch.full((3,), 0.9)
    assert (r - r.mean()).abs().max() > 0


# ----------------------------------------------------------------- each planted mistake is named


@pytest.mark.parametrize("mistake,message", [
    ("population", "Bessel's correction"),
    ("whole_batch", "normalise within each group"),
    ("strided", "each prompt's G completions are contiguous"),
    ("mean_only", "divide by the group's std"),
    ("no_eps", "add 1e-4 to the std"),
    ("eps_in_var", "not to the variance"),
    ("no_eps_no_guard", "NaN or inf \\(at a group whose rewards are all equal\\).*\n.*add 1e-4 to the std"),
    ("no_guard", "expected exactly 0"),
])
def test_advantage_mistakes_are_named(mistake, message):
    text = _failure(checks.check_group_advantages, lambda r, g: _advantages(r, g, mistake))
    assert re.search(message, text), text
    assert "hint:" in text


@pytest.mark.parametrize("mistake,message", [
    ("max", "take the min of the two terms, not the max"),
    ("min_of_ratios", "not of the ratios before multiplying: for a negative advantage"),
    ("no_min", "take the min with the unclipped term"),
    ("clip_advantage", "clip the ratio rho, not the advantage"),
    ("clip_product", "clip the ratio rho, not the advantage or the product"),
    ("inverse", "not exp\\(old_logp - logp\\)"),
    ("no_exp", "the log of the ratio"),
    ("columns", "advantages is \\(B,\\), one per row: broadcast it over the row's tokens with advantages\\[:, None\\]"),
    ("negated", "not its negation"),
    ("detached", "carries no gradient with respect to logp"),
])
def test_surrogate_mistakes_are_named(mistake, message):
    text = _failure(checks.check_clipped_surrogate, lambda *args: _surrogate(*args, mistake=mistake))
    assert re.search(message, text), text
    assert "hint:" in text


def test_the_surrogate_names_the_clipped_case_first():
    text = _failure(checks.check_clipped_surrogate, lambda *args: _surrogate(*args, mistake="max"))
    assert "rho = [1.5, 0.5, 1.1, 1.0] in both rows, A = [+1, -1]" in text


@pytest.mark.parametrize("mistake,message", [
    ("k1", "that is k1, the log-ratio itself"),
    ("k1_flipped", "that is k1, the log-ratio itself"),
    ("reversed", "d is reversed"),
    ("negated", "the sign is flipped"),
    ("no_minus_one", "the - 1 is missing"),
    ("k2", "that is k2"),
])
def test_k3_mistakes_are_named(mistake, message):
    text = _failure(checks.check_k3_kl, lambda logp, ref: _k3(logp, ref, mistake))
    assert re.search(message, text), text
    assert "hint:" in text


def test_k3_names_a_negative_estimate_and_a_nonzero_one_where_the_policies_agree():
    text = _failure(checks.check_k3_kl, lambda logp, ref: torch.exp(ref - logp) - (ref - logp) - 1.5)
    assert "k3 is negative at" in text and "e^d >= 1 + d" in text
    text = _failure(checks.check_k3_kl, lambda logp, ref: (ref - logp).abs() * 2 + 0.1)
    assert "k3 is 0.1 where ref_logp == logp, expected 0" in text


@pytest.mark.parametrize("mistake,message", [
    ("no_mask", "the padding is averaged in"),
    ("bnpo", "one token mean over the whole batch \\(bnpo\\)"),
    ("over_T", "not by the padded length T"),
    ("per_row", "one value per row: take the mean over the rows too"),
    ("item", "keep it a tensor"),
    ("k1", "that is k1, the log-ratio itself"),
    ("k1_flipped", "that is k1, the log-ratio itself"),
    ("reversed", "d is reversed"),
    ("negated", "the sign is flipped"),
])
def test_mean_kl_mistakes_are_named(mistake, message):
    text = _failure(checks.check_masked_mean_kl, lambda logp, ref, mask: _mean_kl(logp, ref, mask, mistake))
    assert re.search(message, text), text
    assert "hint:" in text


def test_the_mean_kl_checks_the_gradient_values_not_only_that_one_exists():
    # Right value, wrong gradient: the KL's value is computed from a detached logp plus a term whose
    # value is 0 but whose gradient is not (here 0.5 * (logp - logp.detach()) summed over the mask).
    def wrong_gradient(logp, ref, mask):
        value = _mean_kl(logp.detach(), ref, mask)
        return value + 0.5 * ((logp - logp.detach()) * mask).sum()
    text = _failure(checks.check_masked_mean_kl, wrong_gradient)
    assert "d masked_mean_kl / d logp" in text and "hint:" in text


def test_the_mean_kl_gives_the_hand_case_and_its_value():
    text = _failure(checks.check_masked_mean_kl, lambda logp, ref, mask: _mean_kl(logp, ref, mask, "bnpo"))
    assert "expected ((1 - ln 2) + (ln 2 - 1/2)) / 2 = 0.25" in text and "expected 0.25" in text


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
def test_a_function_that_writes_into_its_input_is_named(check):
    def in_place(first, *args):
        result = {checks.check_group_advantages: group_advantages,
                  checks.check_clipped_surrogate: _surrogate,
                  checks.check_k3_kl: k3_kl, checks.check_masked_mean_kl: _mean_kl}[check](first, *args)
        args[0].mul_(2.0) if check is not checks.check_group_advantages else first.mul_(2.0)
        return result

    assert "changed" in _failure(check, in_place)


# ----------------------------------------------------------------- a broken function fails the check, never crashes it


def _raises(*args):
    raise IndexError("list index out of range")


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
@pytest.mark.parametrize("broken", [_raises, lambda *args: None, lambda *args: "advantages",
                                    lambda *args: [1.0, 2.0], lambda *args: float("nan"), lambda *args: True,
                                    lambda *args: (1.0, 2.0), lambda *args: 0.25,
                                    lambda *args: torch.zeros(3, dtype=torch.int64),
                                    lambda *args: torch.full_like(args[0], float("nan")),
                                    lambda *args: torch.ones_like(args[0], dtype=torch.float64),
                                    lambda *args: torch.tensor(True), lambda *args: float("inf"),
                                    lambda *args: torch.tensor(float("nan")), lambda *args: args[0] * 0,
                                    lambda *args: torch.zeros(()).requires_grad_(True) * 1],
                         ids=["raises", "None", "str", "list", "nan", "bool", "tuple", "float", "int-tensor",
                              "nan-tensor", "float64", "bool-tensor", "inf", "nan-0d", "zeros-like", "grad-0d"])
def test_a_broken_function_fails_the_check_without_crashing_it(check, broken):
    message = _failure(check, broken)       # a CheckFailure, never another exception from inside the check
    assert message.startswith(check.__name__.removeprefix("check_") + ": ")


def test_an_exception_names_the_input_it_was_raised_on():
    message = _failure(checks.check_group_advantages, _raises)
    assert "raised IndexError on group_advantages(rewards, 4) [rewards [1, 0, 0, 0 | 0, 0, 0, 0]" in message
    message = _failure(checks.check_masked_mean_kl, _raises)
    assert "raised IndexError on masked_mean_kl(logp, ref_logp, mask)" in message
