"""The GRPO training loop (draft for chapter 08): sample groups, score them by rules, update the policy.

One step of Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300 §4.1, Algorithm 1;
DeepSeek-V3, arXiv 2412.19437 §5.2.2, eqs. 26-28)::

    problems = verifiable_problems(P, seed=step's seed)         # P prompts with checkable answers
    o_1..o_G ~ pi_old(. | q) for each q                          # batched KV-cache sampling, stop at "\\n"
    r_i = reward(q, o_i);  A_i = (r_i - mean_group) / std_group  # eq. 28, no critic
    repeat mu times: minimise grpo_loss(logp, old_logp, ref_logp, A, mask)   # eq. 26 with the k3 KL (eq. 27)
    MoE bias update after each optimiser step                    # V3 §2.1.2, as in supervised training

``old_logp`` is fixed for the batch: it is the first update's own log-prob, detached, so the first
ratio is exactly 1. The reference policy is a frozen copy of the starting policy, copied again from
the policy every ``ref_refresh`` steps (0 = never; DeepSeekMath §4.2's iterative GRPO resets it).
``algorithm="reinforce"`` is the baseline the chapter compares with: REINFORCE with the group's mean
reward as baseline (advantage r_i - mean, not divided by the std), no ratio clipping and no KL.

A run writes ``metrics.jsonl`` (one record per step), ``checkpoint.pt`` (and ``checkpoint-NNNNNN.pt``
every ``checkpoint_every`` steps) and resumes bit-identically: every step's problems and samples are
drawn from seeds derived from ``(seed, step)``, so a resumed run sees what the uninterrupted one saw.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from deepseek_mini.config import ModelConfig
from deepseek_mini.data import EOS_ID, TASK_DOMAINS, ByteTokenizer, Problem, batch_rewards, verifiable_problems
from deepseek_mini.generate import generate
from deepseek_mini.grpo_draft import LOSS_TYPES, completion_logprobs, group_advantages, grpo_loss
from deepseek_mini.hooks import MoEBalancing
from deepseek_mini.model import build_model
from deepseek_mini.moe import moe_layers
from deepseek_mini.runs import (CHECKPOINT_NAME, PERIODIC_NAME, RunLock, append_metrics, find_checkpoint,
                                load_checkpoint, peek_checkpoint, prepare_folder, save_checkpoint)

__all__ = ["ALGORITHMS", "GRPOConfig", "GRPOResult", "load_policy", "sample_groups", "evaluate_accuracy",
           "grpo_step", "train_grpo", "main"]

ALGORITHMS = ("grpo", "reinforce")
STOP_TOKENS = (ord("\n"), EOS_ID)   # end of answer: the corpus ends every answer line with one of them
EVAL_SEED = 987_654_321             # held-out problems: a seed no training step uses (see _step_seed)
# What a resume may change; every other setting would change the run.
RESUMABLE = ("steps", "out_dir", "checkpoint_every", "progress")


@dataclass
class GRPOConfig:
    """The settings of a GRPO (or REINFORCE) run. ``validate`` checks them with one-line errors."""

    init: str | None = None          # supervised checkpoint (file or run folder) the policy starts from
    steps: int = 50                  # policy-sampling steps (each: sample, score, mu updates)
    prompts_per_step: int = 8        # P problems per step
    group_size: int = 8              # G completions per problem (>= 2: a group of one has no baseline)
    mu: int = 1                      # policy updates per sampled batch (DeepSeekMath's mu; TRL num_iterations)
    clip_eps: float = 0.2            # ratio clip epsilon (eq. 26)
    beta: float = 0.04               # KL coefficient (eq. 26); 0 = no reference model at all
    loss_type: str = "grpo"          # "grpo" | "bnpo" | "dr_grpo" (grpo_draft.grpo_loss)
    algorithm: str = "grpo"          # "grpo" | "reinforce" (mean baseline, no clip, no KL)
    lr: float = 1e-3                 # AdamW learning rate, constant
    grad_clip: float = 1.0           # global gradient-norm clip
    max_new_tokens: int = 24         # completion length limit (an unclosed answer scores 0)
    temperature: float = 1.0         # sampling temperature (the log-probs use the same one)
    ref_refresh: int = 0             # copy the policy into the reference every N steps; 0 = never
    bias_update_speed: float = 0.001  # MoE aux-loss-free bias update gamma (V3 §2.1.2); 0 = off
    domains: tuple[str, ...] = ("arithmetic", "sort")
    seed: int = 0
    out_dir: str | None = None
    checkpoint_every: int = 0        # also keep checkpoint-NNNNNN.pt every N steps; 0 = only the last
    progress: bool = True

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first bad setting."""
        for name in ("steps", "prompts_per_step", "group_size", "mu", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        for name in ("ref_refresh", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} ({value!r}) must be an integer >= 0")
        if self.group_size < 2:
            raise ValueError(f"group_size ({self.group_size}) must be >= 2: a group of one has no baseline")
        for name in ("clip_eps", "beta", "lr", "grad_clip", "temperature", "bias_update_speed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} ({value!r}) must be a finite number")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"clip_eps ({self.clip_eps}) must be in (0, 1)")
        if self.beta < 0 or self.bias_update_speed < 0:
            raise ValueError(f"beta ({self.beta}) and bias_update_speed ({self.bias_update_speed}) must be >= 0")
        if not (self.lr > 0 and self.grad_clip > 0 and self.temperature > 0):
            raise ValueError(f"lr ({self.lr}), grad_clip ({self.grad_clip}) and temperature ({self.temperature}) "
                             "must be > 0")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type ({self.loss_type!r}) must be one of {LOSS_TYPES}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm ({self.algorithm!r}) must be one of {ALGORITHMS}")
        if self.algorithm == "reinforce" and (self.beta != 0 or self.mu != 1):
            raise ValueError(f"algorithm 'reinforce' has no KL term and no old policy: it needs beta 0 and mu 1 "
                             f"(got beta {self.beta}, mu {self.mu})")
        if (isinstance(self.domains, str) or not self.domains
                or any(d not in TASK_DOMAINS for d in self.domains)):
            raise ValueError(f"domains ({self.domains!r}) must be a non-empty sequence of {TASK_DOMAINS}")
        if self.init is not None and not isinstance(self.init, (str, Path)):
            raise ValueError(f"init ({self.init!r}) must be a checkpoint path")
        if self.out_dir is not None and not isinstance(self.out_dir, (str, Path)):
            raise ValueError(f"out_dir ({self.out_dir!r}) must be a folder path or None")


@dataclass
class GRPOResult:
    """What ``train_grpo`` returns: the trained policy and one record per step (as in ``metrics.jsonl``)."""

    model: nn.Module
    history: list[dict[str, Any]]
    config: GRPOConfig
    elapsed_s: float


# ----------------------------------------------------------------------------- pieces of a step
def load_policy(path: str | Path) -> tuple[nn.Module, ModelConfig]:
    """The model saved in a checkpoint written by ``deepseek_mini.train`` (or by this loop)."""
    state = load_checkpoint(path)
    if state.get("model_config") is None:
        raise ValueError(f"checkpoint {str(path)!r} has no model_config: cannot rebuild its model")
    config = ModelConfig.from_dict(state["model_config"], source=f"checkpoint {str(path)!r}")
    model = build_model(config)
    model.load_state_dict(state["model"])
    return model, config


def _cut_at_stop(tokens: Tensor) -> Tensor:
    """A completion up to and including its first end-of-answer token ("\\n" or EOS); as is if none."""
    stops = (tokens[:, None] == torch.tensor(STOP_TOKENS)).any(-1).nonzero()
    return tokens[: int(stops[0]) + 1] if len(stops) else tokens


def sample_groups(model: nn.Module, problems: Sequence[Problem], group_size: int, max_new_tokens: int,
                  temperature: float, seed: int) -> tuple[list[Tensor], list[Tensor], list[str]]:
    """G completions per problem in one batched, KV-cached ``generate`` call (eval mode: no MoE load counted).

    Returns ``(prompts, completions, texts)``, ``len(problems) * group_size`` each, every problem's G
    rows contiguous. ``generate`` stops at "\\n" only, so each completion is cut at its first "\\n" or
    EOS here, before scoring and before its log-probs are taken.
    """
    if not problems or isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"need at least one problem and a positive int group_size (got {len(problems)}, "
                         f"{group_size!r})")
    if not temperature > 0:
        raise ValueError(f"temperature ({temperature}) must be > 0 to sample a group")
    return _sample(model, problems, group_size, max_new_tokens, temperature, seed)


def _sample(model: nn.Module, problems: Sequence[Problem], group_size: int, max_new_tokens: int,
            temperature: float, seed: int | None) -> tuple[list[Tensor], list[Tensor], list[str]]:
    """``sample_groups`` without its checks; temperature 0 is greedy (held-out evaluation)."""
    tok = ByteTokenizer()
    prompts = [torch.tensor(tok.encode(p.prompt, bos=True)) for p in problems for _ in range(group_size)]
    seqs = generate(model, prompts, max_new_tokens, temperature=temperature, stop_token=ord("\n"), seed=seed)
    completions = [_cut_at_stop(s[len(p):]) for s, p in zip(seqs, prompts)]
    texts = [tok.decode(c, skip_special=False) for c in completions]
    return prompts, completions, texts


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, problems: Sequence[Problem], max_new_tokens: int = 24,
                      batch_size: int = 64) -> dict[str, float]:
    """Greedy pass@1 on ``problems``: the fraction answered exactly, overall and per domain."""
    if not problems:
        raise ValueError("problems is empty: need at least one to evaluate")
    correct: dict[str, list[float]] = {}
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        _, _, texts = _sample(model, chunk, 1, max_new_tokens, temperature=0.0, seed=None)
        scores = batch_rewards(chunk, texts, 1)["accuracy"].tolist()
        for p, s in zip(chunk, scores):
            correct.setdefault(p.domain, []).append(s)
    every = [s for v in correct.values() for s in v]
    return {"accuracy": sum(every) / len(every), **{f"accuracy_{d}": sum(v) / len(v) for d, v in correct.items()}}


def _step_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s problems and samples: a function of (seed, step) only, so a resumed
    run draws what the uninterrupted one drew."""
    return 1_000_003 * seed + step


def grpo_step(policy: nn.Module, reference: nn.Module | None, optimizer: torch.optim.Optimizer,
              balancing: MoEBalancing, cfg: GRPOConfig, step: int) -> dict[str, Any]:
    """One GRPO (or REINFORCE) step: sample, score, advantages, ``cfg.mu`` updates. Returns its record."""
    started = time.perf_counter()
    problems = verifiable_problems(cfg.prompts_per_step, seed=_step_seed(cfg.seed, step), domains=cfg.domains)
    prompts, completions, texts = sample_groups(policy, problems, cfg.group_size, cfg.max_new_tokens,
                                                cfg.temperature, seed=_step_seed(cfg.seed, step))
    scores = batch_rewards(problems, texts, cfg.group_size)
    advantages = group_advantages(scores["reward"], cfg.group_size, scale=cfg.algorithm == "grpo")
    ref_logp = None
    if reference is not None:        # frozen within the batch: one forward, no gradient, eval mode (no load)
        with torch.no_grad():
            ref_logp, _ = completion_logprobs(reference, prompts, completions, cfg.temperature)
    old_logp = None
    losses, kls, clips, maxvios = [], [], [], []
    policy.train()                   # MoE layers count their load: the bias update below uses it
    for _ in range(cfg.mu):
        logp, mask = completion_logprobs(policy, prompts, completions, cfg.temperature)
        if old_logp is None or cfg.algorithm == "reinforce":
            old_logp = logp.detach()     # pi_old = the policy that sampled: the first ratio is exactly 1
        loss, metrics = grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=cfg.clip_eps,
                                  beta=cfg.beta, loss_type=cfg.loss_type, max_completion_length=cfg.max_new_tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        optimizer.step()
        balancing.after_optimizer_step(policy, step)    # V3 §2.1.2: b_i += gamma * sign(mean load - load_i)
        losses.append(loss.item())
        clips.append(metrics["clip_fraction"])
        kls.append(metrics.get("kl", 0.0))
        maxvios.append(balancing.metrics(policy, step).get("maxvio", 0.0))
    grouped = scores["reward"].view(-1, cfg.group_size)
    return {
        "step": step, "reward": scores["reward"].mean().item(), "accuracy": scores["accuracy"].mean().item(),
        "format": scores["format"].mean().item(), "loss": sum(losses) / len(losses),
        "kl": sum(kls) / len(kls), "clip_fraction": sum(clips) / len(clips),
        "completion_length": sum(len(c) for c in completions) / len(completions),
        "zero_std_fraction": (grouped.amax(1) == grouped.amin(1)).float().mean().item(),
        "maxvio": max(maxvios), "step_time_s": time.perf_counter() - started,
    }


# ----------------------------------------------------------------------------- the run
def _frozen_copy(model: nn.Module) -> nn.Module:
    reference = copy.deepcopy(model).eval()   # eval: no dropout, MoE layers count no load
    return reference.requires_grad_(False)


def _check_resume(saved: dict[str, Any], cfg: GRPOConfig, path: Path) -> GRPOConfig:
    """The checkpoint's settings with ``cfg``'s resumable ones; any other difference is an error."""
    merged = GRPOConfig(**{**saved, "domains": tuple(saved["domains"])})
    for f in fields(GRPOConfig):
        mine, theirs = getattr(cfg, f.name), getattr(merged, f.name)
        if f.name in RESUMABLE:
            setattr(merged, f.name, mine if mine is not None else theirs)
        elif f.name != "init" and mine != theirs:
            raise ValueError(f"resuming {str(path)!r}: {f.name} ({mine!r}) differs from the checkpoint's "
                             f"({theirs!r}); only {', '.join(RESUMABLE)} may change on resume")
    return merged


def train_grpo(cfg: GRPOConfig, resume: str | Path | None = None, overwrite: bool = False) -> GRPOResult:
    """Run GRPO from ``cfg.init`` (a supervised checkpoint), or continue the run saved at ``resume``.

    With ``cfg.out_dir`` the run writes ``metrics.jsonl`` and checkpoints there (locked while it runs;
    a folder holding another run is refused unless ``overwrite``). On resume the checkpoint's
    settings are kept; only ``RESUMABLE`` ones may differ (e.g. more ``steps``).
    """
    if not isinstance(cfg, GRPOConfig):
        raise ValueError(f"cfg must be a GRPOConfig, not {type(cfg).__name__}")
    cfg.validate()
    state = None
    if resume is not None:
        path = find_checkpoint(resume)
        state = load_checkpoint(path)
        cfg = _check_resume(state["train_config"], cfg, path)
        if cfg.out_dir is None:
            cfg.out_dir = str(path.parent)
        if cfg.steps <= state["step"]:
            raise ValueError(f"steps ({cfg.steps}) must exceed the checkpoint's step ({state['step']}) to continue")
    elif cfg.init is None:
        raise ValueError("init is None: give the supervised checkpoint the policy starts from (--init PATH)")
    policy, model_config = load_policy(resume if resume is not None else cfg.init)
    out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
    with RunLock(out_dir) if out_dir is not None else contextlib.nullcontext():
        start = state["step"] if state is not None else 0
        if out_dir is not None:
            prepare_folder(out_dir, find_checkpoint(resume) if resume is not None else None, start, overwrite,
                           cli=False)()
        reference = _frozen_copy(policy) if cfg.beta > 0 else None
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
        balancing = MoEBalancing(cfg.bias_update_speed, balance_loss="none", alpha=0.0)
        history: list[dict[str, Any]] = []
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            if reference is not None:
                reference.load_state_dict(state["hooks"]["reference"])
            history = list(state["history"]["records"])
        for layer in moe_layers(policy):      # count only this run's load
            layer.tokens_per_expert.zero_()

        def save(name: str, step: int) -> None:
            extra = {"reference": reference.state_dict()} if reference is not None else {}
            save_checkpoint(out_dir / name, policy, optimizer, None, step, model_config, asdict(cfg),
                            {"records": history}, hooks=extra)

        started = time.perf_counter()
        bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress, unit="step", dynamic_ncols=True,
                   desc=f"{cfg.algorithm} G={cfg.group_size}")
        for step in range(start + 1, cfg.steps + 1):
            record = grpo_step(policy, reference, optimizer, balancing, cfg, step)
            if reference is not None and cfg.ref_refresh and step % cfg.ref_refresh == 0:
                reference.load_state_dict(policy.state_dict())   # iterative GRPO (DeepSeekMath §4.2)
            history.append(record)
            append_metrics(out_dir, record)
            last = step == cfg.steps
            if out_dir is not None and (last or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
                save(CHECKPOINT_NAME if last else PERIODIC_NAME.format(step=step), step)
            bar.set_postfix(reward=f"{record['reward']:.2f}", kl=f"{record['kl']:.3f}")
            bar.update(1)
        bar.close()
    return GRPOResult(policy, history, cfg, time.perf_counter() - started)


# ----------------------------------------------------------------------------- command line
_HELP = {
    "init": "supervised checkpoint (file or run folder) the policy starts from, e.g. runs/toy",
    "steps": "sampling steps; on --resume, more than the checkpoint's step to continue",
    "prompts_per_step": "problems sampled per step (P)",
    "group_size": "completions per problem (G >= 2): the group is the baseline, no critic",
    "mu": "policy updates per sampled batch, with the sampling policy's log-probs fixed",
    "clip_eps": "ratio clip epsilon of the surrogate (V3 eq. 26)",
    "beta": "weight of the k3 KL to the frozen reference (V3 eq. 27); 0 = no reference",
    "loss_type": "how token losses are averaged: grpo (per completion, DeepSeekMath), bnpo, dr_grpo",
    "algorithm": "grpo, or reinforce (mean baseline, no clip, no KL; needs --beta 0)",
    "lr": "AdamW learning rate (constant)",
    "grad_clip": "clip the gradients' global norm to this",
    "max_new_tokens": "longest completion; an answer not closed by then scores 0",
    "temperature": "sampling temperature (log-probs use the same)",
    "ref_refresh": "copy the policy into the reference every N steps (0 = never)",
    "bias_update_speed": "MoE auxiliary-loss-free bias update speed gamma (V3 §2.1.2); 0 = off",
    "domains": "problem domains, comma-separated, from arithmetic, sort, addition (1-digit a+b)",
    "seed": "seed of the problems and samples",
    "out_dir": "folder for metrics.jsonl and checkpoint.pt",
    "checkpoint_every": "also keep checkpoint-NNNNNN.pt every N steps (0 = only at the end)",
    "progress": "hide the progress bar",
}


def _flag(f) -> str:
    """A GRPOConfig field's command-line flag."""
    return {"out_dir": "--out", "progress": "--no-progress"}.get(f.name, "--" + f.name.replace("_", "-"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deepseek_mini.grpo",
        description="Reinforcement learning with verifiable rewards (GRPO, DeepSeek-V3 §5.2.2) on a supervised "
                    "toy checkpoint: sample G answers per arithmetic/sort problem, score them by rules, update.",
        epilog="example: python -m deepseek_mini.grpo --init runs/toy --out runs/grpo --steps 50")
    defaults = GRPOConfig()
    for f in fields(GRPOConfig):
        flag = _flag(f)
        default = getattr(defaults, f.name)
        if f.name == "progress":
            parser.add_argument("--no-progress", dest="progress", action="store_false", help=_HELP[f.name])
        elif f.name == "domains":
            parser.add_argument(flag, default=",".join(default), metavar="LIST",
                                help=f"{_HELP[f.name]} (default: %(default)s)")
        else:
            kind = str if f.name in ("init", "out_dir", "loss_type", "algorithm") else type(default)
            choices = {"loss_type": LOSS_TYPES, "algorithm": ALGORITHMS}.get(f.name)
            parser.add_argument(flag, dest=f.name, type=kind, default=default, choices=choices,
                                metavar=None if choices else {str: "PATH", int: "N", float: "X"}[kind],
                                help=f"{_HELP[f.name]} (default: %(default)s)")
    parser.add_argument("--resume", metavar="PATH", help="continue the run saved at PATH (file or folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    parser.add_argument("--eval", type=int, default=200, metavar="N",
                        help="held-out problems for greedy accuracy before and after (0 = skip; default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m deepseek_mini.grpo``: train, print held-out accuracy before and after; errors in one line."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(GRPOConfig)}
    values["domains"] = tuple(d.strip() for d in values["domains"].split(",") if d.strip())
    try:
        if args.resume is not None:   # the checkpoint's settings, changed only where a flag was given
            given = {f.name for f in fields(GRPOConfig) if any(a.split("=")[0] == _flag(f) for a in argv)}
            saved = peek_checkpoint(find_checkpoint(args.resume))["train_config"] or {}
            values = {**saved, "domains": tuple(saved.get("domains", ())), **{k: values[k] for k in given}}
        cfg = GRPOConfig(**values)
        held_out = verifiable_problems(args.eval, EVAL_SEED, cfg.domains) if args.eval > 0 else None
        if held_out and args.resume is None:
            cfg.validate()
            before = evaluate_accuracy(load_policy(cfg.init)[0], held_out, cfg.max_new_tokens) if cfg.init else None
            if before:
                print(f"held-out greedy accuracy before: {json.dumps(before)}")
        result = train_grpo(cfg, resume=args.resume, overwrite=args.overwrite)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if held_out:
        after = evaluate_accuracy(result.model, held_out, result.config.max_new_tokens)
        print(f"held-out greedy accuracy after:  {json.dumps(after)}")
    last = result.history[-1] if result.history else {}
    print(f"{len(result.history)} steps in {result.elapsed_s:.0f} s; last step: "
          + ", ".join(f"{k} {v:.3g}" for k, v in last.items() if k != "step"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
