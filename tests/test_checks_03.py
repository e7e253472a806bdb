"""Chapter 03's exercise checks: they pass the reference and name each planted mistake."""

from __future__ import annotations

import pytest
import torch

from deepseek_mini import checks
from deepseek_mini.checks import CheckFailure
from deepseek_mini.moe import group_limited_topk, max_violation, sequence_balance_loss


def _topk(group_score: str = "top2", fill: float = float("-inf"), use_groups: bool = True, values: bool = False):
    def fn(biased_scores, topk, n_group, topk_group):
        t, n = biased_scores.shape
        if not use_groups:
            out = biased_scores.topk(topk, dim=-1)
            return out.values if values else out.indices
        grouped = biased_scores.view(t, n_group, n // n_group)
        score = grouped.amax(-1) if group_score == "max" else grouped.topk(min(2, grouped.shape[-1]), -1).values.sum(-1)
        keep = torch.zeros(t, n_group, dtype=torch.bool).scatter_(1, score.topk(topk_group, -1).indices, True)
        out = grouped.masked_fill(~keep[..., None], fill).flatten(1).topk(topk, dim=-1)
        return out.values if values else out.indices
    return fn


def _gates(biased=False, normalize=True, scale=True):
    def fn(scores, bias, indices, route_scale):
        s = scores + bias if biased else scores
        w = s.gather(1, indices)
        if normalize:
            w = w / w.sum(-1, keepdim=True)
        return w * route_scale if scale else w
    return fn


def test_reference_implementations_pass(capsys):
    checks.check_group_limited_topk(group_limited_topk)
    checks.check_routing_weights(_gates())
    checks.check_update_bias(lambda b, load, g: b + g * torch.sign(load.mean() - load))
    checks.check_sequence_balance_loss(sequence_balance_loss)
    checks.check_max_violation(max_violation)
    assert capsys.readouterr().out.count("✓") == 5


@pytest.mark.parametrize("fn,message", [
    (_topk(group_score="max"), "sum of its two highest biased scores, not by its maximum"),
    (_topk(fill=0.0), "not 0: these biased scores are negative"),
    (_topk(use_groups=False), "restrict the choice to the topk_group best groups"),
    (_topk(values=True), "should return expert \\*indices\\*"),
])
def test_group_limited_topk_mistakes_are_named(fn, message):
    with pytest.raises(CheckFailure, match=message):
        checks.check_group_limited_topk(fn)


@pytest.mark.parametrize("fn,message", [
    (_gates(biased=True), "the bias only chooses experts"),
    (_gates(normalize=False), "normalise the chosen scores"),
    (_gates(scale=False), "multiply by route_scale"),
])
def test_routing_weights_mistakes_are_named(fn, message):
    with pytest.raises(CheckFailure, match=message):
        checks.check_routing_weights(fn)


def _in_place(b, load, g):
    b += g * torch.sign(load.mean() - load)
    return b


@pytest.mark.parametrize("fn,message", [
    (lambda b, load, g: b - g * torch.sign(load.mean() - load), "the sign is flipped"),
    (lambda b, load, g: b + g * (load.mean() - load), "use only the sign"),
    (lambda b, load, g: b + g * torch.where(load > load.mean(), -1.0, 1.0), "sign\\(0\\) = 0"),
    (_in_place, "modified the bias passed in"),
])
def test_update_bias_mistakes_are_named(fn, message):
    with pytest.raises(CheckFailure, match=message):
        checks.check_update_bias(fn)


def _loss_without_factor(s, idx, alpha):
    chosen = torch.zeros_like(s).scatter_(-1, idx, 1.0)
    return alpha * (chosen.sum(1) / s.shape[1] * (s / s.sum(-1, keepdim=True)).mean(1)).sum(-1).mean()


def _loss_unnormalised_p(s, idx, alpha):
    n, k, t = s.shape[-1], idx.shape[-1], s.shape[1]
    chosen = torch.zeros_like(s).scatter_(-1, idx, 1.0)
    return alpha * (chosen.sum(1) * n / (k * t) * s.mean(1)).sum(-1).mean()


@pytest.mark.parametrize("fn,message", [
    (_loss_without_factor, "N_r / K_r"),
    (_loss_unnormalised_p, "normalised"),
    (lambda s, idx, a: sequence_balance_loss(s.reshape(1, -1, s.shape[-1]), idx.reshape(1, -1, idx.shape[-1]), a),
     "per sequence"),
])
def test_sequence_balance_loss_mistakes_are_named(fn, message):
    with pytest.raises(CheckFailure, match=message):
        checks.check_sequence_balance_loss(fn)


@pytest.mark.parametrize("fn,message", [
    (lambda load: (load.max() / load.mean()).item(), "subtract 1"),
    (lambda load: load.max() / load.mean() - 1, "return a Python float"),
    (lambda load: (load.max() / load.sum()).item() - 1, "\\*mean\\* load"),
])
def test_max_violation_mistakes_are_named(fn, message):
    with pytest.raises(CheckFailure, match=message):
        checks.check_max_violation(fn)


def test_unfinished_stub_is_reported():
    def stub(*args):
        raise NotImplementedError("Exercise group_limited_topk")
    with pytest.raises(CheckFailure, match="not implemented yet"):
        checks.check_group_limited_topk(stub)
