"""Chapter 04's exercise checks: they pass correct answers, name each planted mistake, and turn a
broken function (an exception, a wrong type or shape, NaN) into a failed check, never a crash."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from deepseek_mini import checks, mtp
from deepseek_mini.checks import CheckFailure
from deepseek_mini.mtp import IGNORE_INDEX

CHECKS = [checks.check_mtp_shift, checks.check_mtp_depth_loss, checks.check_greedy_verify,
          checks.check_speculative_rule]


def _failure(check, fn) -> str:
    with pytest.raises(CheckFailure) as info:
        check(fn)
    return str(info.value)


# ----------------------------------------------------------------- correct answers, written the ways learners do


def _loop_shift(labels, length, depth):
    """Exercise 1 with explicit loops over positions."""
    inputs = torch.zeros(labels.shape[0], length, dtype=torch.long)
    targets = torch.full((labels.shape[0], length), IGNORE_INDEX, dtype=torch.long)
    for i in range(length):
        if i + depth - 1 < labels.shape[1]:
            inputs[:, i] = labels[:, i + depth - 1]
        if i + depth < labels.shape[1]:
            targets[:, i] = labels[:, i + depth]
    return inputs, targets


def _dropped_positions_loss(logits, labels, depth):
    """Exercise 2 without a mask: only the positions that have a target are scored."""
    targets = labels[:, depth:depth + logits.shape[1]]
    log_probs = logits[:, :targets.shape[1]].float().log_softmax(dim=-1)
    return -log_probs.gather(-1, targets[..., None]).mean()


def _verify(logits, draft):
    choice = int(logits[0].argmax())
    return [draft, int(logits[1].argmax())] if choice == draft else [choice]


def _rule(p, q, draft):
    p_d, q_d = p.gather(-1, draft[:, None])[:, 0], q.gather(-1, draft[:, None])[:, 0]
    residual = (p - q).clamp(min=0)
    total = residual.sum(-1, keepdim=True)
    return (p_d / q_d).clamp(max=1.0), torch.where(total > 0, residual / total, p)


def _loop_rule(p, q, draft):
    """Exercise 4 one row at a time, returning tensors built from Python lists."""
    accept, residual = [], []
    for row_p, row_q, d in zip(p, q, draft.tolist()):
        accept.append(min(1.0, float(row_p[d] / row_q[d])))
        r = (row_p - row_q).clamp(min=0)
        residual.append(r / r.sum() if r.sum() > 0 else row_p)
    return torch.tensor(accept), torch.stack(residual)


def test_checks_pass_correct_answers_and_say_so(capsys):
    checks.check_mtp_shift(mtp.mtp_shift)
    checks.check_mtp_shift(_loop_shift)
    checks.check_mtp_depth_loss(lambda logits, labels, k: mtp.mtp_losses([logits] * k, labels)[k - 1])
    checks.check_mtp_depth_loss(_dropped_positions_loss)
    checks.check_greedy_verify(_verify)
    checks.check_greedy_verify(lambda logits, draft: torch.stack([logits[0].argmax(), logits[1].argmax()])
                               if int(logits[0].argmax()) == draft else logits[0].argmax()[None])   # tensors
    checks.check_speculative_rule(_rule)
    checks.check_speculative_rule(_loop_rule)
    out = capsys.readouterr().out
    assert out.count("✓") == 8 and out.count("\n") == 8


def _raises(*args):
    raise IndexError("index 9 is out of bounds for dimension 1 with size 5")


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("broken", [_raises, lambda *args: None, lambda *args: "tokens",
                                    lambda *args: torch.zeros(3), lambda *args: (torch.zeros(3), torch.zeros(3)),
                                    lambda *args: [float("nan")], lambda *args: (1, 2, 3)],
                         ids=["raises", "None", "str", "tensor", "pair", "nan-list", "triple"])
def test_a_broken_function_fails_the_check_without_crashing_it(check, broken):
    message = _failure(check, broken)       # a CheckFailure, never another exception from inside the check
    assert message.startswith(check.__name__.removeprefix("check_") + ": ")


def test_an_exception_names_the_input_it_was_raised_on():
    message = _failure(checks.check_mtp_depth_loss, _raises)
    assert "raised IndexError on logits (2, 5, 11), a plain window of labels (2, 5), depth 3" in message
    assert "index 9 is out of bounds" in message


# ----------------------------------------------------------------- 04.1 the targets shift


def _shift(in_start=-1, tgt_start=0, in_fill=0, tgt_fill=IGNORE_INDEX, left=False, pad=True, swap=False,
           dtype=torch.long):
    """mtp_shift with switches for the usual mistakes; starts are relative to depth."""
    def fn(labels, length, depth):
        parts = []
        for start, fill in ((depth + in_start, in_fill), (depth + tgt_start, tgt_fill)):
            piece = labels[:, start:start + length]
            missing = length - piece.shape[1]
            if pad:
                piece = F.pad(piece, (missing, 0) if left else (0, missing), value=fill)
            parts.append(piece.to(dtype))
        return (parts[1], parts[0]) if swap else tuple(parts)
    return fn


@pytest.mark.parametrize("fn,message", [
    (_shift(in_start=0, tgt_start=1), "off by one: depth k's inputs start at labels\\[:, k-1\\]"),
    (_shift(tgt_start=-1), "labels\\[:, k-1 : k-1\\+T\\] are its inputs, its targets are one token later"),
    (_shift(tgt_start=1), "off by one: depth k's targets start at labels\\[:, k\\]"),
    (_shift(tgt_fill=0), "pad the targets with IGNORE_INDEX \\(-100\\), not 0"),
    (_shift(in_fill=IGNORE_INDEX), "pad the inputs with token 0"),
    (_shift(left=True), "pad the targets at the end"),
    (_shift(pad=False), "do not drop them"),
    (_shift(swap=True), "inputs and targets are swapped"),
    (_shift(dtype=torch.float32), "dtype torch.float32, expected torch.int64"),
    (lambda labels, length, depth: labels[:, depth:depth + length], "should return a pair \\(inputs, targets\\)"),
])
def test_mtp_shift_mistakes_are_named(fn, message):
    text = _failure(checks.check_mtp_shift, fn)
    assert "hint:" in text
    assert re.search(message, text), text


def test_mtp_shift_reports_the_case_and_the_first_difference():
    message = _failure(checks.check_mtp_shift, _shift(tgt_fill=0))
    assert "targets for labels [[11, 12, 13, 14, 15]], length 4, depth 2 differs at 1 of 4 elements" in message
    assert "first at index (0, 3): got 0, expected -100" in message


# ----------------------------------------------------------------- 04.2 the depth-k loss


def _loss(start=0, fill=None, over_all=False, reduction="mean", in_float32=True, detach=False):
    """mtp_depth_loss with switches for the usual mistakes; ``start`` is relative to depth."""
    def fn(logits, labels, depth):
        length = logits.shape[1]
        targets = labels[:, depth + start:depth + start + length]
        targets = F.pad(targets, (0, length - targets.shape[1]), value=IGNORE_INDEX if fill is None else fill)
        x = (logits.float() if in_float32 else logits).flatten(0, 1)
        nll = F.cross_entropy(x, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        if reduction == "sum":
            loss = nll.sum()
        else:
            loss = nll.sum() / (nll.numel() if over_all else (targets != IGNORE_INDEX).sum())
        return loss.detach() if detach else loss
    return fn


@pytest.mark.parametrize("fn,message", [
    (_loss(over_all=True), "not by B\\*T"),
    (_loss(fill=0), "do not score them against token 0"),
    (lambda logits, labels, depth: _loss(start=-depth)(logits, labels, depth), "labels\\[:, :T\\] are the main"),
    (_loss(start=-1), "labels\\[:, k-1 : k-1\\+T\\] are its inputs"),
    (_loss(start=1), "off by one: depth k's targets are labels\\[:, k : k\\+T\\]"),
    (_loss(reduction="sum"), "a mean, not a sum"),
    (_loss(in_float32=False), "returned a torch.bfloat16 loss"),
    (lambda logits, labels, depth: _loss(in_float32=False)(logits, labels, depth).float(), "in float32"),
    (_loss(detach=True), "carries no gradient"),
    (lambda logits, labels, depth: _loss()(logits, labels, depth).item(), "should return a scalar tensor, got float"),
    (lambda logits, labels, depth: torch.tensor(float("nan"), requires_grad=True), "the loss is NaN"),
])
def test_mtp_depth_loss_mistakes_are_named(fn, message):
    text = _failure(checks.check_mtp_depth_loss, fn)
    assert "hint:" in text
    assert re.search(message, text), text


def test_mtp_depth_loss_reports_both_values():
    message = _failure(checks.check_mtp_depth_loss, _loss(over_all=True))
    assert "depth 3 (2 of 5 positions have a target): got" in message and ", expected " in message


# ----------------------------------------------------------------- 04.3 the greedy verify step


def _verify_wrong(mistake):
    def fn(logits, draft):
        choice, bonus = int(logits[0].argmax()), int(logits[1].argmax())
        if mistake == "always_draft":
            return [draft, bonus]
        if mistake == "draft_on_reject":
            return [draft, bonus] if choice == draft else [draft]
        if mistake == "no_bonus":
            return [draft] if choice == draft else [choice]
        if mistake == "bonus_after_reject":
            return [draft, bonus] if choice == draft else [choice, bonus]
        if mistake == "row_1":
            return [draft, bonus] if bonus == draft else [bonus]
        if mistake == "bonus_from_row_0":
            return [draft, choice] if choice == draft else [choice]
        if mistake == "floats":
            return [float(t) for t in _verify(logits, draft)]
        if mistake == "wrong_for_large_drafts":       # right on tokens 0-5, the hand cases' vocabulary
            return [draft] if draft >= 6 else _verify(logits, draft)
        raise AssertionError(mistake)
    return fn


@pytest.mark.parametrize("mistake,message", [
    ("always_draft", "a rejected draft is never emitted"),
    ("draft_on_reject", "a rejected draft is never emitted"),
    ("no_bonus", "an accepted draft brings a bonus token"),
    ("bonus_after_reject", "logits\\[1\\] was computed with the rejected draft"),
    ("row_1", "compare the draft with argmax\\(logits\\[0\\]\\)"),
    ("bonus_from_row_0", "the bonus token is argmax\\(logits\\[1\\]\\)"),
    ("floats", "token ids \\(ints\\)"),
    ("wrong_for_large_drafts", "differs from plain greedy decoding at token"),
])
def test_greedy_verify_mistakes_are_named(mistake, message):
    text = _failure(checks.check_greedy_verify, _verify_wrong(mistake))
    assert re.search(message, text), text


def test_greedy_verify_reports_the_case():
    message = _failure(checks.check_greedy_verify, _verify_wrong("no_bonus"))
    assert "argmax(logits[0]) = 3, argmax(logits[1]) = 5, draft 3 (accepted): returned [3], expected [3, 5]" in message


# ----------------------------------------------------------------- 04.4 the accept/reject rule


def _rule_wrong(mistake):
    def fn(p, q, draft):
        p_d, q_d = p.gather(-1, draft[:, None])[:, 0], q.gather(-1, draft[:, None])[:, 0]
        accept, residual = _rule(p, q, draft)
        raw = p - q
        if mistake == "q_over_p":
            accept = (q_d / p_d).clamp(max=1.0)
        elif mistake == "no_clamp":
            accept = p_d / q_d
        elif mistake == "p_only":
            accept = p_d
        elif mistake == "unnormalised":
            residual = raw.clamp(min=0)
        elif mistake == "no_residual_clamp":
            residual = raw
        elif mistake == "q_minus_p":
            r = (q - p).clamp(min=0)
            residual = r / r.sum(-1, keepdim=True)
        elif mistake == "resample_p":
            residual = p.clone()
        elif mistake == "no_fallback":
            residual = raw.clamp(min=0) / raw.clamp(min=0).sum(-1, keepdim=True)
        elif mistake == "column":
            accept = accept[:, None]
        elif mistake == "wrong_when_many":        # right on the hand cases (N <= 6), wrong on Theorem 1's batch
            residual = p.clone() if p.shape[0] > 6 else residual
        else:
            raise AssertionError(mistake)
        return accept, residual
    return fn


@pytest.mark.parametrize("mistake,message", [
    ("q_over_p", "the ratio is p\\(d\\) / q\\(d\\), target over draft"),
    ("no_clamp", "clamp at 1"),
    ("p_only", "divide by q\\(d\\)"),
    ("unnormalised", "normalise the residual"),
    ("no_residual_clamp", "clamp p - q at 0"),
    ("q_minus_p", "\\*less\\* often"),
    ("resample_p", "not from p"),
    ("no_fallback", "0 / 0 is NaN"),
    ("column", "accept for .* has shape \\(4, 1\\), expected \\(4,\\)"),
    ("wrong_when_many", "the emitted token does not follow p"),
])
def test_speculative_rule_mistakes_are_named(mistake, message):
    text = _failure(checks.check_speculative_rule, _rule_wrong(mistake))
    assert re.search(message, text), text


def test_the_rule_reference_keeps_the_target_distribution():
    """The check's own reference satisfies Theorem 1 for random p and q (so the property check can pass)."""
    g = torch.Generator().manual_seed(0)
    p, q = torch.softmax(torch.randn(3, 9, generator=g) * 2, -1), torch.softmax(torch.randn(3, 9, generator=g) * 2, -1)
    every = torch.arange(9).repeat(3)
    accept, residual = checks._speculative_rule_reference(p.repeat_interleave(9, 0), q.repeat_interleave(9, 0), every)
    emitted = checks._emitted_distribution(p, q, accept.view(3, 9), residual[::9])
    torch.testing.assert_close(emitted, p)
