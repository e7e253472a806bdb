"""Group Relative Policy Optimization (chapter 08; DeepSeek-V3 §5.2.2, arXiv 2412.19437; DeepSeekMath §4.1).

Written by hand; two modules inside are exported from ``notebooks/08_grpo.ipynb``:

* ``deepseek_mini.grpo.loss``: ``group_advantages`` (eq. 28), ``k3_kl`` (eq. 27), ``grpo_loss`` (eq. 26,
  with the ``grpo`` / ``bnpo`` / ``dr_grpo`` token averages) and ``completion_logprobs``;
* ``deepseek_mini.grpo.step``: ``sample_groups`` (G completions per problem, batched with the KV cache),
  ``evaluate_accuracy``, ``frozen_reference`` and ``grpo_step`` (sample, score, mu updates);

and one is hand-written, because it needs files and a command line:

* ``deepseek_mini.grpo.run``: ``GRPOConfig``, ``train_grpo`` (metrics.jsonl, checkpoints, exact resume)
  and ``main``, which ``python -m deepseek_mini.grpo`` runs.

A package rather than one ``grpo.py``: the exported pieces and the hand-written run live side by side
under one name, and ``python -m deepseek_mini.grpo`` needs a ``__main__`` that a notebook cell cannot
hold (a notebook runs as ``__main__`` itself).
"""

from deepseek_mini.grpo.loss import LOSS_TYPES, STD_EPS, completion_logprobs, group_advantages, grpo_loss, k3_kl
from deepseek_mini.grpo.step import (ALGORITHMS, STOP_TOKENS, evaluate_accuracy, frozen_reference, grpo_step,
                                     sample_groups, step_seed)
from deepseek_mini.grpo.run import EVAL_SEED, GRPOConfig, GRPOResult, load_policy, main, train_grpo

__all__ = ["LOSS_TYPES", "STD_EPS", "group_advantages", "k3_kl", "grpo_loss", "completion_logprobs",
           "ALGORITHMS", "STOP_TOKENS", "sample_groups", "evaluate_accuracy", "frozen_reference", "step_seed",
           "grpo_step", "EVAL_SEED", "GRPOConfig", "GRPOResult", "load_policy", "train_grpo", "main"]
