"""Chapter 03's exercise checks: they pass the reference and name each planted mistake."""

from __future__ import annotations

import re

import pytest
import torch

from deepseek_mini import checks, moe
from deepseek_mini.checks import CheckFailure


# ----------------------------------------------------------------- correct answers, written the ways learners do


def _gates(biased=False, normalize=True, scale=True, over_all=False):
    """routing_weights(scores, bias, indices, route_scale), with switches for the usual mistakes."""
    def fn(scores, bias, indices, route_scale):
        s = scores + bias if biased else scores
        w = s.gather(1, indices)
        if normalize:
            w = w / (s.sum(-1, keepdim=True) if over_all else w.sum(-1, keepdim=True))
        return w * route_scale if scale else w
    return fn


def _new_bias(b, load, gamma):
    return b + gamma * torch.sign(load.mean() - load)


def _loop_balance_loss(scores, indices, alpha):
    """Eqs. 17-20 written with explicit loops over sequences, experts and tokens."""
    n_seq, n_tok, n_exp = scores.shape
    k = indices.shape[-1]
    losses = []
    for b in range(n_seq):
        total = scores.new_zeros(())
        for i in range(n_exp):
            f_i = n_exp / (k * n_tok) * sum(float(i in indices[b, t].tolist()) for t in range(n_tok))
            p_i = sum(scores[b, t, i] / scores[b, t].sum() for t in range(n_tok)) / n_tok
            total = total + f_i * p_i
        losses.append(alpha * total)
    return torch.stack(losses).mean()


def test_checks_pass_correct_answers_and_say_so(capsys):
    checks.check_group_limited_topk(moe.group_limited_topk)
    checks.check_group_limited_topk(lambda *args: moe.group_limited_topk(*args).flip(-1))   # order is free
    checks.check_routing_weights(_gates())
    checks.check_update_bias(_new_bias)
    checks.check_sequence_balance_loss(moe.sequence_balance_loss)
    checks.check_sequence_balance_loss(_loop_balance_loss)
    checks.check_max_violation(moe.max_violation)
    checks.check_max_violation(lambda load: float(load.max() / load.mean() - 1))
    out = capsys.readouterr().out
    assert out.count("✓") == 8 and out.count("\n") == 8


def _failure(check, fn) -> str:
    with pytest.raises(CheckFailure) as info:
        check(fn)
    return str(info.value)


# ----------------------------------------------------------------- 03.1 group-limited top-k


def _topk(group_score="top2", fill=float("-inf"), use_groups=True, values=False, strided=False):
    def fn(biased_scores, topk, n_group, topk_group):
        t, n = biased_scores.shape
        if not use_groups:
            out = biased_scores.topk(topk, dim=-1)
            return out.values if values else out.indices
        if strided:
            grouped = biased_scores.view(t, n // n_group, n_group).transpose(1, 2)
        else:
            grouped = biased_scores.view(t, n_group, n // n_group)
        score = grouped.amax(-1) if group_score == "max" else grouped.topk(min(2, grouped.shape[-1]), -1).values.sum(-1)
        keep = torch.zeros(t, n_group, dtype=torch.bool).scatter_(1, score.topk(topk_group, -1).indices, True)
        masked = grouped.masked_fill(~keep[..., None], fill)
        out = (masked.transpose(1, 2) if strided else masked).flatten(1).topk(topk, dim=-1)
        return out.values if values else out.indices
    return fn


@pytest.mark.parametrize("fn,message", [
    (_topk(fill=0.0), "not 0: these biased scores are negative"),
    (_topk(group_score="max"), "sum of its two highest biased scores, not by its maximum"),
    (_topk(use_groups=False), "restrict the choice to the topk_group best groups"),
    (_topk(values=True), "should return expert \\*indices\\*"),
    (_topk(strided=True), "\\*consecutive\\* experts"),
])
def test_group_limited_topk_mistakes_are_named(fn, message):
    with pytest.raises(CheckFailure, match=message):
        checks.check_group_limited_topk(fn)


def test_group_limited_topk_reports_the_first_wrong_token():
    message = _failure(checks.check_group_limited_topk, _topk(fill=0.0))
    assert "negative biased scores (n_group=4, topk_group=2, topk=3)" in message
    assert "first token" in message and "chose [" in message and "expected [" in message


# ----------------------------------------------------------------- 03.2 gates


@pytest.mark.parametrize("fn,message", [
    (_gates(biased=True), "the bias only chooses experts"),
    (_gates(biased=True, normalize=False), "use the unbiased scores s"),
    (_gates(normalize=False), "normalise the chosen scores"),
    (_gates(scale=False), "multiply by route_scale"),
    (_gates(normalize=False, scale=False), "normalise over the chosen experts, then multiply"),
    (_gates(over_all=True), "\\*chosen\\* experts only"),
])
def test_routing_weights_mistakes_are_named(fn, message):
    text = _failure(checks.check_routing_weights, fn)
    assert re.search(message, text), text
    assert "gates (T, K) differs at" in text and "first at index" in text    # expected vs got, like the others


# ----------------------------------------------------------------- 03.3 bias update


def _in_place(b, load, g):
    b += g * torch.sign(load.mean() - load)
    return b


def _in_place_no_return(b, load, g):
    b += g * torch.sign(load.mean() - load)


@pytest.mark.parametrize("fn,message", [
    (lambda b, load, g: b - g * torch.sign(load.mean() - load), "the sign is flipped"),
    (lambda b, load, g: b + g * (load.mean() - load), "use only the sign"),
    (lambda b, load, g: b + g * torch.where(load > load.mean(), -1.0, 1.0), "sign\\(0\\) = 0"),
    (lambda b, load, g: b + g * torch.where(load < load.mean(), 1.0, -1.0), "sign\\(0\\) = 0"),
    (_in_place, "modified the bias passed in"),
    (_in_place_no_return, "returned None after changing the bias passed in"),
])
def test_update_bias_mistakes_are_named(fn, message):
    with pytest.raises(CheckFailure, match=message):
        checks.check_update_bias(fn)


def test_update_bias_reports_the_first_differing_element():
    message = _failure(checks.check_update_bias, lambda b, load, g: b - g * torch.sign(load.mean() - load))
    assert "first at index (0,): got 0.01, expected -0.01" in message


# ----------------------------------------------------------------- 03.4 sequence-wise balance loss


def _loss_without_factor(s, idx, alpha):
    chosen = torch.zeros_like(s).scatter_(-1, idx, 1.0)
    return alpha * (chosen.sum(1) / s.shape[1] * (s / s.sum(-1, keepdim=True)).mean(1)).sum(-1).mean()


def _loss_unnormalised_p(s, idx, alpha):
    n, k, t = s.shape[-1], idx.shape[-1], s.shape[1]
    chosen = torch.zeros_like(s).scatter_(-1, idx, 1.0)
    return alpha * (chosen.sum(1) * n / (k * t) * s.mean(1)).sum(-1).mean()


def _loss_detached(s, idx, alpha):
    return moe.sequence_balance_loss(s.detach(), idx, alpha)


@pytest.mark.parametrize("fn,message", [
    (_loss_without_factor, "N_r / K_r"),
    (_loss_unnormalised_p, "\\*normalised\\* scores"),
    (lambda s, idx, a: moe.batch_balance_loss(s, idx, a), "per sequence"),
    (lambda s, idx, a: moe.sequence_balance_loss(s, idx, a) * s.shape[0], "do not sum them"),
    (_loss_detached, "no gradient"),
    (lambda s, idx, a: moe.sequence_balance_loss(s, idx, a).item(), "should return a scalar tensor"),
])
def test_sequence_balance_loss_mistakes_are_named(fn, message):
    with pytest.raises(CheckFailure, match=message):
        checks.check_sequence_balance_loss(fn)


# ----------------------------------------------------------------- 03.5 MaxVio


@pytest.mark.parametrize("fn,message", [
    (lambda load: (load.max() / load.mean()).item(), "subtract 1"),
    (lambda load: load.max() / load.mean() - 1, "return a Python float"),
    (lambda load: (load.max() / load.sum()).item() - 1, "\\*mean\\* load"),
    (lambda load: (load.min() / load.mean()).item() - 1, "max, not min"),
])
def test_max_violation_mistakes_are_named(fn, message):
    with pytest.raises(CheckFailure, match=message):
        checks.check_max_violation(fn)
