"""Verifiable tasks and rule-based rewards (chapter 08 draft): prompts cut from the pretraining corpus's
lines with correct answers, seeded, the end-of-line answer marker, accuracy and format rewards with
their documented weights, and the grouped reward layout that group_advantages expects."""

from __future__ import annotations

import random

import pytest
import torch

from deepseek_mini.data import (ACCURACY_WEIGHT, EOS_ID, FORMAT_WEIGHT, ByteTokenizer, Problem, accuracy_reward,
                                arithmetic_problem, batch_rewards, format_reward, parse_answer, reward, sort_problem,
                                verifiable_problems)
from deepseek_mini.grpo import group_advantages


def _solve(task: Problem) -> str:
    """The answer worked out from the prompt text alone (an independent check of the generators)."""
    if task.domain == "arithmetic":
        expr = task.prompt.removesuffix("=")
        op = next(c for c in "+-*" if c in expr)
        a, b = map(int, expr.split(op))
        return str({"+": a + b, "-": a - b, "*": a * b}[op])
    op, rest = task.prompt.removesuffix(" -> ").split(": ")
    values = list(map(int, rest.split()))
    return " ".join(map(str, {"sort": sorted(values), "max": [max(values)], "reverse": values[::-1]}[op]))


def test_tasks_have_correct_answers_and_corpus_shape():
    tasks = verifiable_problems(200, seed=3)
    assert [t.domain for t in tasks[:4]] == ["arithmetic", "sort", "arithmetic", "sort"]
    for t in tasks:
        assert t.answer == _solve(t)
        assert t.prompt.endswith("=" if t.domain == "arithmetic" else " -> ")
    assert any(t.prompt.startswith("sort: ") for t in tasks)


def test_tasks_are_seeded():
    assert verifiable_problems(20, seed=1) == verifiable_problems(20, seed=1)
    assert verifiable_problems(20, seed=1) != verifiable_problems(20, seed=2)
    assert {t.domain for t in verifiable_problems(10, domains=("sort",))} == {"sort"}


def test_parse_answer_stops_at_the_first_end_of_answer():
    assert parse_answer("85\n12+3=15\n") == "85"
    assert parse_answer("85<|eos|>") == "85"
    assert parse_answer("1 3 5<|eos|>\n") == "1 3 5"
    assert parse_answer("85") is None            # never closed (ran into the length limit)
    assert parse_answer("\n") == ""


def test_the_marker_is_what_the_decoder_writes():
    tok = ByteTokenizer()
    assert parse_answer(tok.decode(tok.encode("62") + [EOS_ID], skip_special=False)) == "62"


def test_rewards_and_weights():
    task = Problem("arithmetic", "37+25=", "62")
    assert reward(task, "62\n") == {"reward": ACCURACY_WEIGHT + FORMAT_WEIGHT, "accuracy": 1.0, "format": 1.0}
    assert reward(task, "61\n") == {"reward": FORMAT_WEIGHT, "accuracy": 0.0, "format": 1.0}
    assert reward(task, "62") == {"reward": 0.0, "accuracy": 0.0, "format": 0.0}      # unclosed: nothing
    assert reward(task, "6 2x\n")["format"] == 0.0
    assert reward(task, "062\n")["accuracy"] == 0.0                                      # exact match only
    assert ACCURACY_WEIGHT > FORMAT_WEIGHT > 0       # being right always beats being well formed
    sort_task = Problem("sort", "sort: 5 3 9 -> ", "3 5 9")
    assert accuracy_reward(sort_task, "3 5 9\n") == 1.0
    assert format_reward("3  5 9\n") == 0.0 and format_reward("3 5 9 \n") == 0.0
    assert format_reward("3 5 9<|eos|>") == 1.0


def test_batch_rewards_layout_feeds_group_advantages():
    tasks = [Problem("arithmetic", "1+1=", "2"), Problem("arithmetic", "2+2=", "4")]
    completions = ["2\n", "3\n", "x", "4\n", "4\n", "4\n"]          # G = 3, task by task
    scores = batch_rewards(tasks, completions, group_size=3)
    r = ACCURACY_WEIGHT + FORMAT_WEIGHT
    torch.testing.assert_close(scores["reward"], torch.tensor([r, FORMAT_WEIGHT, 0.0, r, r, r]))
    torch.testing.assert_close(scores["accuracy"], torch.tensor([1.0, 0, 0, 1, 1, 1]))
    adv = group_advantages(scores["reward"], 3)
    assert adv[0] > adv[1] > adv[2] and torch.equal(adv[3:], torch.zeros(3))


@pytest.mark.parametrize("call, match", [
    (lambda: verifiable_problems(3, domains=("poetry",)), "names from"),
    (lambda: sort_problem(0), "random.Random"),
    (lambda: arithmetic_problem(None), "random.Random"),
    (lambda: verifiable_problems(0), "positive int"),
    (lambda: verifiable_problems(3, domains="sort"), "non-empty sequence"),
    (lambda: parse_answer(b"62\n"), "must be a str"),
    (lambda: batch_rewards([Problem("arithmetic", "1+1=", "2")], ["2\n"], group_size=2), "expected 2"),
    (lambda: batch_rewards([], [], group_size=0), "positive int"),
])
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
