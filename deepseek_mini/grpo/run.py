"""The GRPO run (hand-written): settings, the training loop with files, resume and ``python -m deepseek_mini.grpo``.

The pieces are built in ``notebooks/08_grpo.ipynb`` and exported: ``deepseek_mini.grpo.loss`` (group
advantages, the k3 KL, the clipped loss, completion log-probs) and ``deepseek_mini.grpo.step`` (group
sampling and one GRPO step, DeepSeekMath arXiv 2402.03300 Algorithm 1; DeepSeek-V3 arXiv 2412.19437
§5.2.2, eqs. 26-28). This module adds what needs files and a command line, as ``deepseek_mini.train``
does for supervised training:

* ``GRPOConfig``: the settings, each checked by ``validate`` with a one-line error;
* ``train_grpo``: start from a supervised checkpoint, run ``grpo_step`` for ``steps`` steps, refresh the
  frozen reference every ``ref_refresh`` steps, write ``metrics.jsonl`` (one record per step) and
  ``checkpoint.pt`` (and ``checkpoint-NNNNNN.pt`` every ``checkpoint_every`` steps), under a run lock;
* resume: bit-identical to an uninterrupted run, because every step's problems and samples are drawn
  from seeds derived from ``(seed, step)`` and the checkpoint holds the policy, the optimizer, the
  reference, the records and the global RNG state; only ``RESUMABLE`` settings may change;
* the folder and stop rules of ``deepseek_mini.runs``, as for ``train``: an occupied folder is refused
  without ``overwrite``, metrics after the resumed checkpoint's step are dropped, files are written
  whole, and Ctrl-C (or SIGTERM) finishes the step, saves and raises ``TrainingInterrupted`` (exit status 130, 143);
* ``main``: the command line (``python -m deepseek_mini.grpo --help``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from deepseek_mini.config import ModelConfig
from deepseek_mini.data import TASK_DOMAINS, verifiable_problems
from deepseek_mini.grpo.loss import LOSS_TYPES
from deepseek_mini.grpo.step import ALGORITHMS, evaluate_accuracy, frozen_reference, grpo_step
from deepseek_mini.hooks import MoEBalancing
from deepseek_mini.model import build_model
from deepseek_mini.moe import moe_layers
from deepseek_mini.runs import (RunLock, StopRequest, TrainingInterrupted, append_metrics, find_checkpoint,
                                load_checkpoint, peek_checkpoint, prepare_folder, restore_checkpoint, save_after_step,
                                save_checkpoint, stopped_run)
from deepseek_mini.train_cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE

__all__ = ["EVAL_SEED", "RESUMABLE", "GRPOConfig", "GRPOResult", "load_policy", "train_grpo", "main"]

EVAL_SEED = 987_654_321             # held-out problems: a seed no training step uses (see step.step_seed)
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
    loss_type: str = "grpo"          # "grpo" | "bnpo" | "dr_grpo" (deepseek_mini.grpo.grpo_loss)
    algorithm: str = "grpo"          # "grpo" | "reinforce" (mean baseline, no clip, no KL)
    lr: float = 3e-4                 # AdamW learning rate, constant (chapter 08: 1e-3 collapsed the groups)
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


# ----------------------------------------------------------------------------- the run
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

    Stopping keeps the run whole, as in ``deepseek_mini.train``: Ctrl-C (or SIGTERM) finishes the current step,
    saves ``checkpoint.pt`` and raises ``TrainingInterrupted`` (a KeyboardInterrupt); any other error
    saves the last whole step before it propagates; a stop after the step's first optimizer update
    saves nothing (the folder's newest checkpoint stays intact).
    """
    return _train_grpo(cfg, resume, overwrite, cli=False)


def _train_grpo(cfg: GRPOConfig, resume: str | Path | None, overwrite: bool, cli: bool) -> GRPOResult:
    """``train_grpo``; ``cli`` words the folder errors for the command line (``--overwrite``)."""
    if not isinstance(cfg, GRPOConfig):
        raise ValueError(f"cfg must be a GRPOConfig, not {type(cfg).__name__}")
    cfg.validate()
    state, checkpoint = None, None
    if resume is not None:
        checkpoint = find_checkpoint(resume)
        state = load_checkpoint(checkpoint)
        cfg = _check_resume(state["train_config"], cfg, checkpoint)
        if cfg.out_dir is None:
            cfg.out_dir = str(checkpoint.parent)
        if cfg.steps <= state["step"]:
            raise ValueError(f"steps ({cfg.steps}) must exceed the checkpoint's step ({state['step']}) to continue")
    elif cfg.init is None:
        raise ValueError("init is None: give the supervised checkpoint the policy starts from (--init PATH)")
    policy, model_config = load_policy(checkpoint if checkpoint is not None else cfg.init)
    out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
    with RunLock(out_dir) if out_dir is not None else contextlib.nullcontext():
        start = state["step"] if state is not None else 0
        clean_folder = prepare_folder(out_dir, checkpoint, start, overwrite, cli) if out_dir is not None else None
        torch.manual_seed(cfg.seed)   # nothing in a step draws from it now; a resume restores it all the same
        reference = frozen_reference(policy) if cfg.beta > 0 else None
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
        balancing = MoEBalancing(cfg.bias_update_speed, balance_loss="none", alpha=0.0)
        history: list[dict[str, Any]] = []
        if state is not None:
            restore_checkpoint(state, optimizer=optimizer, rng=True, source=f"checkpoint {str(checkpoint)!r}")
            if reference is not None:
                reference.load_state_dict(state["hooks"]["reference"])
            history = list(state["history"]["records"])
        state = None
        for layer in moe_layers(policy):      # count only this run's load
            layer.tokens_per_expert.zero_()
        if clean_folder is not None:          # only now: a failing start leaves the folder as it was
            clean_folder()
        return _loop(cfg, policy, reference, optimizer, balancing, history, start, out_dir, model_config)


def _loop(cfg: GRPOConfig, policy: nn.Module, reference: nn.Module | None, optimizer: torch.optim.Optimizer,
          balancing: MoEBalancing, history: list[dict[str, Any]], start: int, out_dir: Path | None,
          model_config: ModelConfig) -> GRPOResult:
    """Steps ``start + 1 .. cfg.steps`` (the caller holds the folder's lock), each kept whole on a stop.

    A step is ``"drawing"`` (sampling, scoring, log-probs: undoable, only the RNG state moved) until
    the optimizer's first update, then ``"committing"`` (not undoable) until its record and
    checkpoints are written; ``deepseek_mini.runs.stopped_run`` decides what a stop saves.
    """
    def save(name: str, step: int) -> Path:
        extra = {"reference": reference.state_dict()} if reference is not None else {}
        return save_checkpoint(out_dir / name, policy, optimizer, None, step, model_config, asdict(cfg),
                               {"records": history}, hooks=extra)

    def committing(*_: object) -> None:
        nonlocal phase
        phase = "committing"

    started = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress, unit="step", dynamic_ncols=True,
               desc=f"{cfg.algorithm} G={cfg.group_size}")
    done, phase = start, "between steps"
    hook = optimizer.register_step_pre_hook(committing)
    with StopRequest(saves=out_dir is not None) as stop:
        try:
            while done < cfg.steps:
                undo, phase, step = torch.get_rng_state(), "drawing", done + 1
                record = grpo_step(policy, reference, optimizer, balancing, cfg, step)
                phase = "committing"
                if reference is not None and cfg.ref_refresh and step % cfg.ref_refresh == 0:
                    reference.load_state_dict(policy.state_dict())   # iterative GRPO (DeepSeekMath §4.1.4, Algorithm 1)
                history.append(record)
                append_metrics(out_dir, record)
                if out_dir is not None:
                    save_after_step(save, step, cfg.steps, cfg.checkpoint_every)
                done, phase = step, "between steps"
                bar.set_postfix(reward=f"{record['reward']:.2f}", kl=f"{record['kl']:.3f}")
                bar.update(1)
                if stop.requested and done < cfg.steps:
                    raise KeyboardInterrupt
        except BaseException as exc:
            bar.close()
            if phase == "drawing":            # put the RNG state and MoE load back: the step is redone on resume
                torch.set_rng_state(undo)
                for layer in moe_layers(policy):
                    layer.tokens_per_expert.zero_()
            interrupted = stopped_run(exc, phase, done, start, cfg.steps, out_dir, save, stop.signum)
            if interrupted is not None:
                raise interrupted from None
            raise
        finally:
            hook.remove()
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
        epilog="example, chapter 08's GRPO run of seed 0 (held-out accuracy 25.5% -> 56.0%; 45 s on 2 CPU cores): "
               "python -m deepseek_mini.grpo --init notebooks/data/toy_moe_addition_sft.pt --domains addition "
               "--max-new-tokens 6 --steps 600 --out runs/grpo")
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
    """``python -m deepseek_mini.grpo``: train, print held-out accuracy before and after.

    Exit status as ``python -m deepseek_mini.train``'s: 0 done, 2 a setting to change, 1 a failure while
    running, 130 Ctrl-C / 143 SIGTERM (after saving the last whole step and printing the command that resumes).
    Every error is one line on stderr.
    """
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
        result = _train_grpo(cfg, resume=args.resume, overwrite=args.overwrite, cli=True)
        if held_out:
            after = evaluate_accuracy(result.model, held_out, result.config.max_new_tokens)
            print(f"held-out greedy accuracy after:  {json.dumps(after)}")
    except TrainingInterrupted as exc:
        where = f"checkpoint: {exc.checkpoint}" if exc.checkpoint is not None else str(exc)
        print(f"\ninterrupted after step {exc.step}; {where}", file=sys.stderr)
        if exc.checkpoint is not None:
            print(f"resume with: python -m deepseek_mini.grpo --resume {shlex.quote(str(exc.checkpoint.parent))}",
                  file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("\ninterrupted; nothing more was saved", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, RuntimeError) as exc:
        notes = " ".join(getattr(exc, "__notes__", []))
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"error: {first}{'; ' + notes if notes else ''}", file=sys.stderr)
        return EXIT_FAILED
    last = result.history[-1] if result.history else {}
    print(f"{len(result.history)} steps in {result.elapsed_s:.0f} s; last step: "
          + ", ".join(f"{k} {v:.3g}" for k, v in last.items() if k != "step"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
