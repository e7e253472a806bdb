"""Verifiable tasks and rule-based rewards for GRPO on the byte-level toy (draft for chapter 08).

DeepSeek-V3's RL stage scores questions with deterministic answers (maths, code) by rules, not by a
learned reward model, which cannot be gamed the way a network can (arXiv 2412.19437 §5.2.1,
"Rule-Based RM"; DeepSeek-R1, arXiv 2501.12948 §2.2.2: an *accuracy* reward plus a *format* reward).
This module makes such tasks for the toy model: prompts drawn from the very generators of the
pretraining corpus (``deepseek_mini.data``), so a supervised toy checkpoint already solves some of
them and RL has a signal to start from (a group whose rewards are all equal has zero advantage).

* ``arithmetic``: ``"37+48="`` -> ``"85"`` (``+``, ``-`` and ``*`` as in the corpus);
* ``sort``: ``"sort: 5 3 9 1 -> "`` -> ``"1 3 5 9"`` (and the corpus's ``max:`` and ``reverse:`` lines).

The answer marker is the end of the line. In the corpus every answer is the last thing on its line,
followed by ``"\\n"`` (or EOS at the end of a document), so the supervised toy already closes its
answers with one; the sampler stops there. A tag such as ``<a>...</a>`` never occurs in the corpus,
so the toy would almost never emit it, nearly every group would score the same, and GRPO would get
almost no signal: the toy cannot learn that format by RL alone.

Rewards (each in [0, 1]) are combined as ``ACCURACY_WEIGHT * accuracy + FORMAT_WEIGHT * format``:

* accuracy = 1 when the closed answer equals the expected one exactly (an unclosed answer scores 0,
  so rambling past the answer never pays);
* format = 1 when the answer is closed and well formed: non-negative integers separated by single
  spaces. It is a small shaping term (0.2): a well-formed wrong answer beats garbage, but no amount
  of formatting outweighs being right. DeepSeek-R1 does not publish its weights; these are ours.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# The corpus's own line generators: RL prompts come from the pretraining distribution.
from deepseek_mini.data import _arithmetic_line, _sort_line

__all__ = ["TASK_KINDS", "ACCURACY_WEIGHT", "FORMAT_WEIGHT", "END_OF_ANSWER", "Task", "make_task", "make_tasks",
           "parse_answer", "accuracy_reward", "format_reward", "reward", "batch_rewards"]

TASK_KINDS = ("arithmetic", "sort")
ACCURACY_WEIGHT, FORMAT_WEIGHT = 1.0, 0.2
END_OF_ANSWER = ("\n", "<|eos|>")   # a newline, or EOS as ``ByteTokenizer.decode(skip_special=False)`` writes it
_SEPARATOR = {"arithmetic": "=", "sort": "-> "}      # the prompt ends with it, the answer follows
_WELL_FORMED = re.compile(r"\d+( \d+)*")


@dataclass(frozen=True)
class Task:
    """One verifiable prompt: the text the model continues, and the one answer that scores."""

    kind: str
    prompt: str      # e.g. "37+48=" or "sort: 5 3 9 1 -> "
    answer: str      # e.g. "85"   or "1 3 5 9"


def make_task(kind: str, rng: random.Random) -> Task:
    """One task of ``kind``, cut from a corpus line at its answer separator."""
    if kind not in TASK_KINDS:
        raise ValueError(f"unknown task kind {kind!r}; valid kinds are {TASK_KINDS}")
    if not isinstance(rng, random.Random):
        raise ValueError(f"rng must be a random.Random, got {type(rng).__name__}")
    line = (_arithmetic_line if kind == "arithmetic" else _sort_line)(rng)
    prompt, answer = line.split(_SEPARATOR[kind])
    return Task(kind, prompt + _SEPARATOR[kind], answer)


def make_tasks(n: int, seed: int = 0, kinds: Sequence[str] = TASK_KINDS) -> list[Task]:
    """``n`` tasks, kinds cycled in order; the same seed gives the same tasks."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n ({n!r}) must be a positive int")
    if isinstance(kinds, str) or not kinds:
        raise ValueError(f"kinds must be a non-empty sequence of {TASK_KINDS}, got {kinds!r}")
    rng = random.Random(seed)
    return [make_task(kinds[i % len(kinds)], rng) for i in range(n)]


def parse_answer(completion: str) -> str | None:
    """The answer text before the first end-of-answer marker, or None when the completion never closes it."""
    if not isinstance(completion, str):
        raise ValueError(f"completion must be a str, got {type(completion).__name__}")
    ends = [i for i in (completion.find(marker) for marker in END_OF_ANSWER) if i >= 0]
    return completion[:min(ends)] if ends else None


def accuracy_reward(task: Task, completion: str) -> float:
    """1.0 when the closed answer is exactly the expected one, else 0.0."""
    return float(parse_answer(completion) == task.answer)


def format_reward(completion: str) -> float:
    """1.0 when the answer is closed and is non-negative integers separated by single spaces, else 0.0."""
    answer = parse_answer(completion)
    return float(answer is not None and _WELL_FORMED.fullmatch(answer) is not None)


def reward(task: Task, completion: str) -> dict[str, float]:
    """The combined reward and its parts: ``{"reward", "accuracy", "format"}``."""
    accuracy, fmt = accuracy_reward(task, completion), format_reward(completion)
    return {"reward": ACCURACY_WEIGHT * accuracy + FORMAT_WEIGHT * fmt, "accuracy": accuracy, "format": fmt}


def batch_rewards(tasks: Sequence[Task], completions: Sequence[str], group_size: int) -> dict[str, Tensor]:
    """Rewards of ``len(tasks) * group_size`` completions, each task's G completions contiguous.

    Returns float32 tensors ``reward``, ``accuracy``, ``format`` of shape ``(len(tasks) * group_size,)``,
    laid out as ``grpo_draft.group_advantages`` expects.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size ({group_size!r}) must be a positive int")
    if len(completions) != len(tasks) * group_size:
        raise ValueError(f"got {len(completions)} completions for {len(tasks)} tasks x group_size {group_size}; "
                         f"expected {len(tasks) * group_size}")
    scores = [reward(tasks[i // group_size], c) for i, c in enumerate(completions)]
    return {key: torch.tensor([s[key] for s in scores], dtype=torch.float32) for key in ("reward", "accuracy", "format")}
