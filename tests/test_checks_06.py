"""Chapter 06's exercise checks: they pass correct answers, name each planted mistake, and turn a
broken function (an exception, a wrong type or shape) into a failed check, never a crash."""

from __future__ import annotations

import re

import pytest
import torch

from deepseek_mini import checks
from deepseek_mini.checks import CheckFailure
from deepseek_mini.parallel.schedules import bubble_formula, schedule_1f1b, stage_rank

CHECKS = [checks.check_bubble, checks.check_one_f_one_b, checks.check_all_to_all_counts,
          checks.check_dualpipev_stage_ranks]


def _failure(check, fn) -> str:
    with pytest.raises(CheckFailure) as info:
        check(fn)
    return str(info.value)


# ----------------------------------------------------------------- correct answers, written the ways learners do


def _bubble(schedule, pp, F, B, W, FB):
    if schedule == "1f1b":
        return (pp - 1) * (F + B)
    if schedule == "zb1p":
        return (pp - 1) * (F + B - 2 * W)
    return (pp // 2 - 1) * (FB + B - 3 * W)


def _one_f_one_b(pp, n_micro):
    """Exercise 2 with counters, the way the notebook's _Rank numbers micro-batches."""
    out = []
    for r in range(pp):
        warmup = pp - 1 - r
        ops, f, b = [], 0, 0
        for _ in range(warmup):
            ops.append(("F", f))
            f += 1
        for _ in range(n_micro - warmup):
            ops += [("F", f), ("B", b)]
            f, b = f + 1, b + 1
        ops += [("B", i) for i in range(b, n_micro)]
        out.append(ops)
    return out


def _one_f_one_b_lists(pp, n_micro):
    """The same with lists instead of tuples and the B-F form of the steady state (one more warm-up forward)."""
    out = []
    for r in range(pp):
        w = min(pp - r, n_micro)
        ops = [["F", i] for i in range(w)]
        for i in range(n_micro - w):
            ops += [["B", i], ["F", w + i]]
        ops += [["B", i] for i in range(n_micro - w, n_micro)]
        out.append(ops)
    return out


def test_checks_pass_correct_answers_and_say_so(capsys):
    checks.check_bubble(bubble_formula)
    checks.check_bubble(_bubble)
    checks.check_one_f_one_b(lambda pp, m: [[(a.kind, a.micro) for a in rank] for rank in schedule_1f1b(pp, m)])
    checks.check_one_f_one_b(_one_f_one_b)
    checks.check_one_f_one_b(_one_f_one_b_lists)
    out = capsys.readouterr().out
    assert out.count("✓") == 5 and out.count("\n") == 5


def _ranks(args) -> int:
    """pp for one_f_one_b(pp, n_micro), so a malformed answer has the right number of rank lists; 1 otherwise."""
    return args[0] if isinstance(args[0], int) else 1


def _raises(*args):
    raise IndexError("list index out of range")


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("broken", [_raises, lambda *args: None, lambda *args: "tokens", lambda *args: [1, 2],
                                    lambda *args: float("nan"), lambda *args: True, lambda *args: [[("F",)]],
                                    lambda *args: [[("X", 0)]] * _ranks(args), lambda *args: [[("F", 0.5)]] * _ranks(args),
                                    lambda *args: [None] * _ranks(args)],
                         ids=["raises", "None", "str", "short-list", "nan", "bool", "short-tuple", "kind", "micro",
                              "None-ranks"])
def test_a_broken_function_fails_the_check_without_crashing_it(check, broken):
    message = _failure(check, broken)       # a CheckFailure, never another exception from inside the check
    assert message.startswith(check.__name__.removeprefix("check_") + ": ")


def test_an_exception_names_the_input_it_was_raised_on():
    message = _failure(checks.check_bubble, _raises)
    assert "raised IndexError on bubble('1f1b', pp=4" in message and "list index out of range" in message
    message = _failure(checks.check_one_f_one_b, _raises)
    assert "raised IndexError on one_f_one_b(pp=4, n_micro=8)" in message


# ----------------------------------------------------------------- 06.1 Table 2's bubble


def _bubble_wrong(mistake):
    def fn(schedule, pp, F, B, W, FB):
        steps = pp if mistake == "pp" else pp - 1
        half = {"PP": pp, "PP/2": pp / 2}.get(mistake, pp / 2) - (0 if mistake == "PP/2" else 1)
        if schedule == "1f1b":
            return steps * (F + B - (2 * W if mistake == "zb_for_1f1b" else 0))
        if schedule == "zb1p":
            return steps * (F + B - {"no_2w": 0, "one_w": W, "three_w": 3 * W}.get(mistake, 2 * W))
        if mistake == "zb_for_dual":
            return (pp - 1) * (F + B - 2 * W)
        fb = F + B if mistake == "f_plus_b" else FB
        w = {"two_w": 2 * W, "no_3w": 0}.get(mistake, 3 * W)
        return half * (fb + (0 if mistake == "no_b" else B) - w)
    return fn


@pytest.mark.parametrize("mistake,message", [
    ("pp", "use pp - 1, not pp"),
    ("zb_for_1f1b", "that is ZB1P's bubble: 1F1B runs each backward whole"),
    ("no_2w", "the -2W is missing"),
    ("one_w", "2W per pipeline step, not W"),
    ("three_w", "-3W is DualPipe's"),
    ("PP", "PP/2 - 1, not PP - 1"),
    ("PP/2", "PP/2 - 1 steps, not PP/2"),
    ("f_plus_b", "use F&B \\(the argument FB\\), not F \\+ B"),
    ("two_w", "DualPipe fills 3W per step"),
    ("no_3w", "the -3W is missing"),
    ("no_b", "the \\+ B is missing"),
    ("zb_for_dual", "that is ZB1P's bubble; DualPipe's is"),
])
def test_bubble_mistakes_are_named(mistake, message):
    text = _failure(checks.check_bubble, _bubble_wrong(mistake))
    assert re.search(message, text), text
    assert "returned" in text and "expected" in text


def test_bubble_cases_separate_every_mistake():
    """The check's costs are chosen so that no two formulas of one schedule give the same number on the
    check's first case of that schedule (else a hint could name the wrong mistake)."""
    F, B, W, FB = 1.5, 2.5, 0.75, 3.5
    for schedule, pp in [("1f1b", 4), ("zb1p", 4), ("dualpipe", 8)]:
        values = [bubble_formula(schedule, pp, F, B, W, FB)]
        values += [wrong(pp, F, B, W, FB) for wrong, _ in checks._bubble_mistakes(schedule)]
        assert len(set(values)) == len(values), schedule


# ----------------------------------------------------------------- 06.2 the 1F1B order


def _one_f_one_b_wrong(mistake):
    def fn(pp, n_micro):
        if mistake == "gpipe":
            return [[("F", i) for i in range(n_micro)] + [("B", i) for i in range(n_micro)] for _ in range(pp)]
        if mistake == "lifo":
            out = []
            for ops in _one_f_one_b(pp, n_micro):
                live, fixed = [], []
                for kind, i in ops:
                    if kind == "F":
                        live.append(i)
                        fixed.append(("F", i))
                    else:
                        fixed.append(("B", live.pop()))
                out.append(fixed)
            return out
        warmups = {"plus_one": lambda r: pp - r, "minus_one": lambda r: pp - 2 - r, "reversed": lambda r: r,
                   "same": lambda r: pp - 1, "none": lambda r: 0}
        if mistake in warmups:
            out = []
            for r in range(pp):
                w = min(max(warmups[mistake](r), 0), n_micro)
                ops = [("F", i) for i in range(w)]
                for i in range(n_micro - w):
                    ops += [("F", w + i), ("B", i)]
                out.append(ops + [("B", i) for i in range(n_micro - w, n_micro)])
            return out
        out = _one_f_one_b(pp, n_micro)
        if mistake == "no_drain":
            return [[op for op in ops if not (op[0] == "B" and op[1] >= n_micro - (pp - 1 - r))]
                    for r, ops in enumerate(out)]
        if mistake == "b_before_f":
            return [[(k, i) for k, i in reversed(ops)] for ops in out]
        if mistake == "swap_last":
            return [ops[:-2] + [ops[-1], ops[-2]] if r == 0 and pp > 1 else ops for r, ops in enumerate(out)]
        raise AssertionError(mistake)
    return fn


@pytest.mark.parametrize("mistake,message", [
    ("gpipe", "that is GPipe"),
    ("lifo", "backwards in the wrong order"),
    ("plus_one", "not pp - r"),
    ("minus_one", "not pp - 2 - r"),
    ("reversed", "the warm-up is reversed"),
    ("same", "every rank gets the same warm-up"),
    ("none", "no warm-up"),
    ("no_drain", "runs the backwards of micro-batches \\[0, 1, 2, 3, 4\\], expected each of 0..7 once"),
    ("b_before_f", "the backward of micro-batch 7 comes before its forward"),
    ("swap_last", "rank 0, position 14: got \\('B', 7\\), expected \\('B', 6\\)"),
])
def test_one_f_one_b_mistakes_are_named(mistake, message):
    text = _failure(checks.check_one_f_one_b, _one_f_one_b_wrong(mistake))
    assert re.search(message, text), text


def test_one_f_one_b_names_the_rank_that_holds_too_much():
    """A valid order that is not 1F1B and holds more than pp - r micro-batches is caught by that property."""
    def two_ahead(pp, n_micro):
        out = _one_f_one_b(pp, n_micro)
        ops = out[1]
        first_b = next(i for i, op in enumerate(ops) if op[0] == "B")
        ops.insert(first_b + 1, ops.pop(first_b))          # rank 1: one more forward before its first backward
        return out

    text = _failure(checks.check_one_f_one_b, two_ahead)
    assert "rank 1 holds 4 micro-batches in flight at once; 1F1B holds at most pp - r = 3" in text


# ----------------------------------------------------------------- 06.3 the counts all-to-all


def _all_to_all_counts(counts, ep_size):
    """Exercise 3 with a view: [source, destination rank, local expert]."""
    P, n_experts = counts.shape
    if n_experts % ep_size:
        raise ValueError(f"n_experts ({n_experts}) must be divisible by ep_size ({ep_size})")
    blocks = counts.view(P, ep_size, n_experts // ep_size)
    return blocks.sum(-1), blocks.transpose(0, 1).contiguous()


def _all_to_all_loops(counts, ep_size):
    """Exercise 3 with loops, as a learner new to views writes it (a tuple of a tensor and a tensor)."""
    P, n_experts = counts.shape
    if n_experts % ep_size:
        raise ValueError("indivisible")
    per = n_experts // ep_size
    send = torch.zeros(P, P, dtype=counts.dtype)
    received = torch.zeros(P, P, per, dtype=counts.dtype)
    for s in range(P):
        for e in range(n_experts):
            send[s, e // per] += counts[s, e]
            received[e // per, s, e % per] = counts[s, e]
    return send, received


def test_all_to_all_counts_passes_correct_answers_and_the_chapter_example(capsys):
    checks.check_all_to_all_counts(_all_to_all_counts)
    checks.check_all_to_all_counts(_all_to_all_loops)
    assert capsys.readouterr().out.count("✓") == 2
    send, received = _all_to_all_counts(torch.tensor([[2, 1, 1, 2], [1, 0, 2, 1]]), 2)     # notebook 06, §7.1
    assert send.tolist() == [[3, 3], [1, 3]] and received.tolist() == [[[2, 1], [1, 0]], [[1, 2], [2, 1]]]


def _all_to_all_wrong(mistake):
    def fn(counts, ep_size):
        if mistake == "no_value_error":
            per = counts.shape[1] // ep_size
            return _all_to_all_counts(counts[:, :per * ep_size], ep_size)
        if counts.shape[1] % ep_size:
            raise ValueError("indivisible")
        if mistake in ("transpose_send", "placement", "self_send", "transpose_received"):
            kw = {"placement": {"placement": "round_robin"}, "self_send": {"self_send": False}}.get(mistake, {mistake: True})
            return checks._all_to_all_variant(counts, ep_size, **kw)
        send, received = _all_to_all_counts(counts, ep_size)
        if mistake == "block_of_p":
            return checks._all_to_all_variant(counts, ep_size, placement="block_of_p")[0], received
        if mistake == "summed_sources":
            return send, received.sum(1)
        if mistake == "float":
            return send.float(), received.float()
        if mistake == "off_by_one":
            return send, received + (received == 3).long()
        raise AssertionError(mistake)
    return fn


@pytest.mark.parametrize("mistake,message", [
    ("transpose_send", "send is transposed"),
    ("placement", "experts are placed round-robin"),
    ("block_of_p", "a rank holds N_r / ep_size experts, not ep_size"),
    ("self_send", "the diagonal is missing"),
    ("transpose_received", "received is indexed \\[source, receiver, expert\\]"),
    ("summed_sources", "received has shape \\(4, 2\\), expected \\(4, 4, 2\\)"),
    ("float", "send has dtype torch.float32, expected torch.int64"),
    ("off_by_one", "received\\[.*\\] = 4, expected 3"),
    ("no_value_error", "returned; expected ValueError"),
])
def test_all_to_all_counts_mistakes_are_named(mistake, message):
    text = _failure(checks.check_all_to_all_counts, _all_to_all_wrong(mistake))
    assert re.search(message, text), text


def test_all_to_all_counts_cases_separate_every_mistake():
    """On the check's first case every planted variant differs from the answer (else its hint could not fire)."""
    counts = torch.randint(0, 6, (4, 8), generator=torch.Generator().manual_seed(6))
    counts[1, 4:6] = 0
    send, received = checks._all_to_all_variant(counts, 4)
    for kw in [dict(transpose_send=True), dict(placement="round_robin"), dict(placement="block_of_p"),
               dict(self_send=False)]:
        assert not torch.equal(checks._all_to_all_variant(counts, 4, **kw)[0], send), kw
    for kw in [dict(transpose_received=True), dict(placement="round_robin"), dict(self_send=False)]:
        assert not torch.equal(checks._all_to_all_variant(counts, 4, **kw)[1], received), kw


def test_all_to_all_counts_names_a_function_that_changes_its_input():
    def in_place(counts, ep_size):
        out = _all_to_all_counts(counts.clone(), ep_size)
        counts.zero_()
        return out

    assert "changed its input counts" in _failure(checks.check_all_to_all_counts, in_place)


# ----------------------------------------------------------------- 06.4 DualPipeV's V


def test_dualpipev_stage_ranks_passes_correct_answers(capsys):
    checks.check_dualpipev_stage_ranks(lambda pp: [stage_rank("dualpipev", pp, s) for s in range(2 * pp)])
    checks.check_dualpipev_stage_ranks(lambda pp: list(range(pp)) + list(reversed(range(pp))))
    checks.check_dualpipev_stage_ranks(lambda pp: torch.tensor([min(s, 2 * pp - 1 - s) for s in range(2 * pp)]))
    assert capsys.readouterr().out.count("✓") == 3


@pytest.mark.parametrize("fn,message", [
    (lambda pp: [s % pp for s in range(2 * pp)], "the looped \\(interleaved\\) placement"),
    (lambda pp: [s if s < pp else 2 * pp - s for s in range(2 * pp)], "off by one on the way back"),
    (lambda pp: [pp - 1 - s if s < pp else s - pp for s in range(2 * pp)], "the V is upside down"),
    (lambda pp: [[r, 2 * pp - 1 - r] for r in range(pp)], "not the stages of each rank"),
    (lambda pp: list(range(pp)), "one per rank; expected 2 \\* pp = 8, one per stage"),
    (lambda pp: [s if s < pp else s + 1 for s in range(2 * pp)], "stage 4 on rank 5, but the ranks are 0..3"),
    (lambda pp: [0] * (2 * pp), "returned \\[0, 0, 0, 0, 0, 0, 0, 0\\], expected \\[0, 1, 2, 3, 3, 2, 1, 0\\]"),
    (lambda pp: [float(min(s, 2 * pp - 1 - s)) for s in range(2 * pp)], "the ranks must be ints"),
], ids=["looped", "off-by-one", "upside-down", "per-rank", "per-rank-length", "out-of-range", "all-zero", "floats"])
def test_dualpipev_stage_ranks_mistakes_are_named(fn, message):
    text = _failure(checks.check_dualpipev_stage_ranks, fn)
    assert re.search(message, text), text
