"""Train a deepseek_mini model: the loop the notebooks call and ``python -m deepseek_mini.train`` runs.

One flat loop, in the spirit of nanoGPT/nanochat: sample a batch, forward, cross-entropy,
backward, clip, AdamW step, learning-rate schedule, periodic evaluation, checkpoints.
Optimiser settings follow DeepSeek-V3's pre-training (arXiv 2412.19437 §4.2): AdamW with
beta1 = 0.9, beta2 = 0.95, weight decay 0.1, gradient clipping at norm 1.0, linear warmup.
The paper holds the peak rate for most of training and then decays with a cosine; with a
few hundred steps we warm up and decay straight away (``lr_schedule``).

The loop is the same for every model. A feature adds to a step through a ``TrainHook``
(``deepseek_mini.hooks``): extra losses, work after the backward pass or after the optimizer
step, metrics. DeepSeekMoE's load balancing is the first (``MoEBalancing``), Multi-Token
Prediction the second (``MultiTokenPrediction``, chapter 04: the windows then carry D more
targets, ``y`` is (B, T + D) and the main loss reads ``y[:, :T]``), FP8 the third
(``FP8Training``, chapter 05: ``prepare_model`` swaps the linears before the optimizer is
built); parallelism (06) plugs in the same way, without ``if is_moe`` branches here. ``TrainConfig.compile`` runs
the training forward and backward through ``torch.compile``.

Parallel runs (chapter 06): under ``torchrun`` the same loop runs on every process
(``_run_parallel``): the model is cut into pipeline stages (``--pp``, ``--schedule``), each stage's
MoE layers split their routed experts over groups of ``--ep`` of its data-parallel ranks, the rest
is sharded over its data-parallel ranks with FSDP2, and each step's loss equals the
single-process step's on the same global batch (see ``deepseek_mini.parallel``). One GPU per
process with NCCL when CUDA is available, else gloo on the CPU::

    torchrun --nproc-per-node 4 -m deepseek_mini.train --config toy --pp 2 --ep 2 --schedule dualpipev
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m deepseek_mini.train --pp 4 ...          # on every node; --out on a shared file system

Honest simplifications for a CPU course: a fixed batch size (the paper ramps 3072 -> 15360 sequences), FP8 only when
asked for (``TrainConfig(fp8=True)``, ``--fp8``, which adds ``FP8Training`` to the default hooks; emulated on a CPU). On CUDA the forward runs under bf16 autocast with float32 master weights.

A run never loses or mixes work. This module keeps each step whole:

* Resume is exact: ``steps=N`` straight and ``N/2 + resume + N/2`` give bit-identical
  weights on the same machine, at any CPU thread count. Resuming restores the checkpoint's
  settings; a conflicting one is an error, never silently applied.
* Ctrl-C finishes the current step, saves ``checkpoint.pt`` and raises
  ``TrainingInterrupted`` (the CLI prints the command that resumes and exits with 130).
  Any other error before the optimizer step saves the last whole step, then propagates.

``deepseek_mini.runs`` owns the folder a run writes (checkpoints, metrics, the lock, the
rules for occupied folders) and ``deepseek_mini.train_cli`` the command line, which it builds
from ``TrainConfig``'s field declarations; their public names are importable from here too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from deepseek_mini.config import ModelConfig, load_config
from deepseek_mini.data import Batcher, TokenStream, eval_batches, make_datasets, unigram_entropy
from deepseek_mini.hooks import BALANCE_LOSSES, FP8Training, MoEBalancing, MultiTokenPrediction, TrainHook
from deepseek_mini.model import build_model, check_tokens
from deepseek_mini.runs import (CHECKPOINT_NAME, PERIODIC_NAME, SHARDED_SUFFIX, RunLock, StopRequest,
                                TrainingInterrupted, append_metrics, atomic_write, config_differences,
                                find_checkpoint, load_checkpoint, prepare_folder, restore_checkpoint, same_setting,
                                sampler_state, save_after_step, save_checkpoint, save_sharded_checkpoint,
                                stopped_run)

__all__ = ["TrainConfig", "TrainResult", "TrainingInterrupted", "TrainHook", "MoEBalancing", "MultiTokenPrediction",
           "FP8Training", "RESUME_FIXED", "train", "default_hooks", "evaluate", "evaluate_by_domain", "lr_schedule",
           "select_device", "save_checkpoint", "load_checkpoint", "find_checkpoint", "plot_losses", "main"]

DEFAULT_OUT = "runs/toy"   # the command line's --out when none is given (the API writes no files by default)

# Why a resume must keep a setting (the ``fixed`` of its declaration): changing it would not continue the run.
_SCHEDULE = "the learning-rate schedule depends on it"
_OPTIMIZER = "the optimizer's state was built with it"
_SAMPLER = "the data sampler's saved state is for the checkpoint's value"
_CORPUS = "the corpus depends on it"
_BALANCE = "the load-balancing recipe is part of the run"
_MTP = "the MTP loss weight is part of the run"
SCHEDULES = ("1f1b", "zb1p", "dualpipev", "dualpipe")   # --schedule; see deepseek_mini.parallel.pipeline


def _setting(default: Any, help: str, group: str, *, flag: str | None = None, metavar: str | None = None,
             choices: tuple[str, ...] | None = None, fixed: str | None = None, shown: str | None = None) -> Any:
    """A ``TrainConfig`` field, declared once: default, help text, command-line group and flag.

    ``flag`` defaults to ``--field-name``; a bool field's flag turns it to the other value
    (``--no-progress``). ``help`` may place the default with ``{default}``; otherwise the CLI
    appends ``(default: ...)``, showing ``shown`` when given. ``fixed`` says why a resume must
    keep the setting (``RESUME_FIXED``); a setting without it may change on resume.
    ``deepseek_mini.train_cli`` builds its parser and ``--help`` from these declarations.
    """
    return field(default=default, metadata={"help": help, "group": group, "flag": flag, "metavar": metavar,
                                            "choices": choices, "fixed": fixed, "shown": shown})


def _flag(f: dataclasses.Field) -> str:
    """The command-line flag of a ``TrainConfig`` field."""
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


@dataclass
class TrainConfig:
    """Everything about a training run that is not the model's architecture.

    Each field is declared once (``_setting``): its default, its help text, its command-line
    flag and group, and (``fixed``) why a resume must keep it. The CLI's parser and
    ``--help``, and ``RESUME_FIXED``, are built from these declarations.
    """

    steps: int = _setting(800, "total optimizer steps (default: {default}); on --resume, more than the "
                               "checkpoint's step to train further", "run", metavar="N")
    batch_size: int = _setting(16, "sequences per step", "run", metavar="N", fixed=_SAMPLER)
    seq_len: int = _setting(128, "tokens per sequence", "run", metavar="N", fixed=_SAMPLER)
    lr: float = _setting(3e-3, "peak learning rate", "run", fixed=_SCHEDULE)
    min_lr_ratio: float = _setting(0.1, "final learning rate as a fraction of the peak (default: {default}; "
                                        "DeepSeek-V3 decays 2.2e-4 to 2.2e-5)", "optimizer", metavar="RATIO",
                                   fixed=_SCHEDULE)
    warmup_steps: int = _setting(50, "linear warmup steps", "run", metavar="N", fixed=_SCHEDULE)
    weight_decay: float = _setting(0.1, "weight decay of the matrices (default: {default}; norm gains and "
                                        "biases never decay)", "optimizer", metavar="WD", fixed=_OPTIMIZER)
    beta1: float = _setting(0.9, "first-moment decay", "optimizer", metavar="BETA", fixed=_OPTIMIZER)
    beta2: float = _setting(0.95, "second-moment decay", "optimizer", metavar="BETA", fixed=_OPTIMIZER)
    grad_clip: float = _setting(1.0, "clip the gradients' global norm to this", "optimizer", metavar="NORM",
                                fixed=_OPTIMIZER)
    eval_every: int = _setting(100, "evaluate every N steps", "run", metavar="N")
    eval_batches: int = _setting(16, "validation batches per evaluation", "run", metavar="N",
                                 fixed="the validation losses would not be comparable")
    seed: int = _setting(0, "seed for data, initialisation and sampling", "run", metavar="N",
                         fixed="the corpus and the data order depend on it")
    device: str = _setting("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps", "run")
    compile: bool = _setting(False, "train through torch.compile(model): the first steps compile, evaluation "
                                    "stays eager", "run")
    fp8: bool = _setting(False, "FP8 mixed precision (chapter 05, DeepSeek-V3 §3.3): every eligible linear runs "
                                "its three GEMMs in E4M3 with 1x128 / 128x128 scales (emulated on a CPU, Triton "
                                "kernels on CUDA); FP32 master weights", "run",
                         fixed="the model's linear layers and their numerics differ")
    data: str = _setting("synthetic", "'synthetic' (built-in 4-domain corpus) or a UTF-8 text file", "data",
                         metavar="SOURCE", fixed=_CORPUS)
    n_docs: int = _setting(4000, "synthetic documents to generate", "data", metavar="N", fixed=_CORPUS)
    out_dir: str | None = _setting(None, "folder for checkpoint.pt, metrics.jsonl and loss.png", "output",
                                   flag="--out", metavar="DIR",
                                   shown=f"{DEFAULT_OUT}; on --resume, the checkpoint's folder")
    checkpoint_every: int = _setting(0, "also keep checkpoint-NNNNNN.pt every N steps", "output", metavar="N",
                                     shown="only checkpoint.pt at the end")
    progress: bool = _setting(True, "hide the progress bar", "output", flag="--no-progress")
    # DeepSeekMoE load balancing (§2.1.2; MoEBalancing; nothing on dense models). The defaults are V3's
    # recipe: the auxiliary-loss-free bias update plus a tiny sequence-wise balance loss (alpha 0.0001).
    bias_update_speed: float = _setting(0.001, "aux-loss-free bias update speed gamma, 0 = off", "balancing",
                                        metavar="GAMMA", fixed=_BALANCE)
    balance_loss: str = _setting("sequence", "balance loss: sequence-wise (eqs. 17-20), batch (conventional "
                                             "auxiliary loss) or none", "balancing", choices=BALANCE_LOSSES,
                                 fixed=_BALANCE)
    balance_loss_alpha: float = _setting(1e-4, "balance loss weight alpha", "balancing", flag="--balance-alpha",
                                         metavar="ALPHA", fixed=_BALANCE)
    # Multi-Token Prediction (§2.2; MultiTokenPrediction; nothing on models without MTP modules). The loss is
    # main + lambda/D * sum_k L^k (eq. 25), lambda 0.3 for the first 10T of V3's 14.8T tokens, then 0.1 (§4.2),
    # here scaled to the run's steps (a resume with more steps moves the switch, as it stretches the schedule).
    mtp_lambda: float = _setting(0.3, "MTP loss weight lambda for the first part of the run", "mtp",
                                 metavar="LAMBDA", fixed=_MTP)
    mtp_lambda_late: float = _setting(0.1, "MTP loss weight lambda for the rest of the run", "mtp",
                                      metavar="LAMBDA", fixed=_MTP)
    mtp_lambda_switch: float = _setting(10 / 14.8, "fraction of the steps trained with --mtp-lambda before "
                                                   "--mtp-lambda-late takes over", "mtp", metavar="FRACTION",
                                        fixed=_MTP, shown="10/14.8, V3's 10T of 14.8T tokens")
    # Parallelism (chapter 06; DeepSeek-V3 §3.2). Used under torchrun; a resume may change all four: the
    # sharded checkpoint loads into any layout and the loss does not depend on it.
    pp: int = _setting(1, "pipeline-parallel ranks: the model is cut into pp stages (2 pp with dualpipev); the "
                          "other processes / pp ranks are data parallel (FSDP2)", "parallel", metavar="P")
    ep: int = _setting(1, "expert-parallel ranks: groups of E consecutive data-parallel ranks of a stage split "
                          "every MoE layer's routed experts and exchange tokens with an all-to-all; E divides "
                          "processes / pp", "parallel", metavar="E")
    schedule: str = _setting("1f1b", "pipeline schedule (torch.distributed.pipelining): 1f1b, zb1p "
                                     "(zero-bubble), dualpipev (2 stages per rank in a V); dualpipe is refused, "
                                     "use dualpipev", "parallel", choices=SCHEDULES)
    n_microbatches: int = _setting(0, "micro-batches per step and data-parallel rank; each rank's share of "
                                      "--batch-size must divide into them", "parallel", metavar="M",
                                   shown="the schedule's minimum: the number of stages")
    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "n_docs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        for name in ("pp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        if self.schedule == "dualpipe":
            raise ValueError("schedule 'dualpipe' (two directions, every rank holding two copies of its stages) has "
                             "no torch.distributed.pipelining schedule; use 'dualpipev', its V-shaped variant with "
                             "the same bubble and one copy of the weights")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule ({self.schedule!r}) must be '1f1b', 'zb1p' or 'dualpipev'")
        for name in ("warmup_steps", "checkpoint_every", "seed", "n_microbatches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} ({value!r}) must be an integer >= 0")
        for name in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip", "bias_update_speed",
                     "balance_loss_alpha", "mtp_lambda", "mtp_lambda_late", "mtp_lambda_switch"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"{name} ({value!r}) must be a number, not {type(value).__name__}")
        if not self.lr > 0:
            raise ValueError(f"lr ({self.lr}) must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio ({self.min_lr_ratio}) must be in [0, 1]")
        if not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1:
            raise ValueError(f"beta1 ({self.beta1}) and beta2 ({self.beta2}) must be in [0, 1)")
        if not self.weight_decay >= 0 or not self.grad_clip > 0:
            raise ValueError(f"weight_decay ({self.weight_decay}) must be >= 0 and grad_clip ({self.grad_clip}) > 0")
        if not self.bias_update_speed >= 0 or not self.balance_loss_alpha >= 0:
            raise ValueError(f"bias_update_speed ({self.bias_update_speed}) and balance_loss_alpha "
                             f"({self.balance_loss_alpha}) must be >= 0")
        if self.balance_loss not in BALANCE_LOSSES:
            raise ValueError(f"balance_loss ({self.balance_loss!r}) must be 'sequence', 'batch' or 'none'")
        if not self.mtp_lambda >= 0 or not self.mtp_lambda_late >= 0:
            raise ValueError(f"mtp_lambda ({self.mtp_lambda}) and mtp_lambda_late ({self.mtp_lambda_late}) "
                             "must be >= 0")
        if not 0 <= self.mtp_lambda_switch <= 1:
            raise ValueError(f"mtp_lambda_switch ({self.mtp_lambda_switch}) must be a fraction of the run in [0, 1]")
        for name in ("compile", "progress", "fp8"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} ({getattr(self, name)!r}) must be True or False")
        if not isinstance(self.device, str) or (self.device not in ("auto", "cpu", "cuda", "mps")
                                                and not re.fullmatch(r"cuda:\d+", self.device)):
            raise ValueError(f"device ({self.device!r}) must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        if not isinstance(self.data, (str, Path)):
            raise ValueError(f"data ({self.data!r}) must be 'synthetic' or a path to a text file")
        if self.out_dir is not None and not isinstance(self.out_dir, (str, Path)):
            raise ValueError(f"out_dir ({self.out_dir!r}) must be a folder path or None")


# Settings a resume must keep, as {field: (CLI flag, why)}; the others may change on resume.
RESUME_FIXED: dict[str, tuple[str, str]] = {f.name: (_flag(f), f.metadata["fixed"])
                                            for f in fields(TrainConfig) if f.metadata["fixed"]}


def default_hooks(cfg: TrainConfig) -> list[TrainHook]:
    """The hooks ``train`` uses unless given others, with ``cfg``'s settings: Multi-Token Prediction
    (nothing on a model without MTP modules), then DeepSeekMoE's balancing (nothing on a model
    without MoE layers). MTP comes first so that its blocks' routing joins the balance loss. With
    ``cfg.fp8``, ``FP8Training`` follows (chapter 05)."""
    hooks = [MultiTokenPrediction(cfg.steps, cfg.mtp_lambda, cfg.mtp_lambda_late, cfg.mtp_lambda_switch),
             MoEBalancing(cfg.bias_update_speed, cfg.balance_loss, cfg.balance_loss_alpha)]
    return [*hooks, FP8Training()] if cfg.fp8 else hooks


def _saved_train_config(state: dict[str, Any], path: Path) -> TrainConfig:
    """The training settings a checkpoint saved, as a ``TrainConfig`` (unknown fields are an error)."""
    saved = state["train_config"]
    if saved is None or state.get("model_config") is None:
        raise ValueError(f"checkpoint {str(path)!r} holds no training settings or model config: it was not "
                         "written by deepseek_mini.train, so it cannot be resumed (load it with load_checkpoint)")
    unknown = sorted(set(saved) - {f.name for f in fields(TrainConfig)}) if isinstance(saved, dict) else None
    if unknown is None or unknown:
        raise ValueError(f"checkpoint {str(path)!r} has training settings this version does not know: {unknown}")
    return TrainConfig(**saved)


@dataclass
class TrainResult:
    model: nn.Module
    history: dict[str, list[float]]
    model_config: ModelConfig
    train_config: TrainConfig
    unigram_entropy: float
    device: str
    out_dir: Path | None = None
    elapsed_s: float = 0.0
    start_step: int = 0               # the checkpoint's step when resumed, else 0
    hooks: list[TrainHook] = field(default_factory=list)
    layout: str | None = None         # a parallel run's layout ("pp 2 x dp 2, dualpipev, 4 micro-batches"): ``model``
                                      # then holds this rank's stages only


def select_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda, then Apple's mps, then cpu; a named device must exist on this machine."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if not isinstance(name, str) or not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        raise ValueError(f"device ({name!r}) must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "built without CUDA" if torch.version.cuda is None else "unable to find a CUDA GPU"
        raise ValueError(f"device {name!r} is not available: this torch ({torch.__version__}) is {build}; "
                         "use device 'cpu' or 'auto'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} is not available: this machine has {torch.cuda.device_count()} "
                         f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not mps:
        raise ValueError(f"device {name!r} is not available on this machine; use device 'cpu' or 'auto'")
    return device


def lr_schedule(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (weights stay float32); full float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _make_optimizer(model: nn.Module, cfg: TrainConfig, apart: Sequence[nn.Parameter] = ()) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norm gains, biases) do not. ``apart``: matrices kept in a
    group of their own (a parallel run's expert slices, plain tensors among FSDP2's DTensors: one
    group's foreach update cannot mix the two kinds)."""
    kept = {id(p) for p in apart}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in kept]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if apart:
        groups.append({"params": [p for p in apart if p.requires_grad], "weight_decay": cfg.weight_decay})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in float32, (B, T, V) logits against (B, T) targets."""
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _lm_loss(model(x), y)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list, device: torch.device | str = "cpu") -> float:
    """Mean next-token cross-entropy (nats per token) over fixed evaluation batches."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y, _ in batches:
        with _autocast(device):
            total += _loss(model, x.to(device), y.to(device)).item()
    model.train(was_training)
    return total / len(batches)


@torch.no_grad()
def evaluate_by_domain(model: nn.Module, stream: TokenStream, batch_size: int = 16, seq_len: int = 128,
                       max_batches: int | None = None) -> dict[str, float]:
    """Validation loss per corpus domain (each target token counts for its document's domain)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = len(stream.domain_names)
    sums, counts = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for x, y, dom in eval_batches(stream, batch_size, seq_len, max_batches):
        with _autocast(device):
            logits = model(x.to(device))
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="none")
        sums.index_add_(0, dom.flatten(), losses.double().cpu())
        counts.index_add_(0, dom.flatten(), torch.ones_like(losses, dtype=torch.float64).cpu())
    model.train(was_training)
    return {name: (sums[i] / counts[i]).item() for i, name in enumerate(stream.domain_names) if counts[i] > 0}


# ----------------------------------------------------------------------------- the loop

@dataclass
class _Plan:
    """A checked run: what ``train`` will do, decided before anything is computed or written."""

    model_config: ModelConfig
    cfg: TrainConfig
    device: torch.device
    state: dict[str, Any] | None
    checkpoint: Path | None
    out_dir: Path | None
    overwrite: bool
    cli: bool
    hooks: list[TrainHook]
    parallel: bool = False            # run under torchrun: ``_run_parallel``


def _check_hooks(hooks: Sequence[TrainHook], state: dict[str, Any] | None, checkpoint: Path | None,
                 model_config: ModelConfig) -> list[TrainHook]:
    """Hooks are TrainHook instances with unique names, MTP before MoE balancing; a resume has the
    checkpoint's hooks (it may lack one that does nothing for this model: ``TrainHook.applies_to``)."""
    if isinstance(hooks, TrainHook) or not all(isinstance(h, TrainHook) for h in hooks):
        raise ValueError(f"hooks must be a list of TrainHook instances, got {hooks!r}")
    names = [h.name for h in hooks]
    if len(set(names)) != len(names):
        raise ValueError(f"hook names must be unique (they key the hooks' states in checkpoints): {names}")
    kinds = [type(h) for h in hooks]
    if MultiTokenPrediction in kinds and MoEBalancing in kinds[:kinds.index(MultiTokenPrediction)]:
        raise ValueError("put the MultiTokenPrediction hook before MoEBalancing: the MTP blocks' routing must join "
                         "the balance loss, which MoEBalancing computes")
    saved = state.get("hooks") if state is not None else None
    # a hook the checkpoint lacks is fine if it does nothing for this model (added to the defaults since)
    needed = sorted(h.name for h in hooks if saved is not None and (h.name in saved or h.applies_to(model_config)))
    if saved is not None and sorted(saved) != needed:   # checkpoints before issue #10 saved no hooks
        raise ValueError(f"the checkpoint {str(checkpoint)!r} was trained with hooks {sorted(saved)}, this run "
                         f"has {sorted(names)}; the hooks are part of the run: pass the same ones (hooks=None "
                         "gives the defaults)")
    return list(hooks)


def _plan(model_config: ModelConfig | str | None, train_config: TrainConfig | None,
          resume: str | Path | None, overwrite: bool, cli: bool = False,
          hooks: Sequence[TrainHook] | None = None) -> _Plan:
    """Check every input and settle the configs; nothing is trained or written here."""
    state = checkpoint = None
    if resume is not None:
        checkpoint = find_checkpoint(resume)
        state = load_checkpoint(checkpoint)
        needed = ("torch_rng", "history") if state.get("sharded") else ("optimizer", "torch_rng", "history")
        missing = [k for k in needed if state.get(k) is None]   # a sharded checkpoint's optimizer is in its shards
        if missing or sampler_state(state) is None:
            raise ValueError(f"checkpoint {str(checkpoint)!r} holds no {', '.join(missing or ['sampler'])} state: "
                             "it was not written by deepseek_mini.train, so it cannot be resumed")
        saved = _saved_train_config(state, checkpoint)
        saved_model = ModelConfig.from_dict(state["model_config"], source=f"checkpoint {str(checkpoint)!r}")
        if model_config is not None:
            given = load_config(model_config)
            if given != saved_model:
                diff = config_differences(given, saved_model)
                raise ValueError(f"the model config differs from the checkpoint's ({'; '.join(diff[:3])}"
                                 f"{'; ...' if len(diff) > 3 else ''}); resume restores the checkpoint's model, "
                                 "so pass model_config=None")
        model_config = saved_model
        if train_config is None:   # continue with the checkpoint's settings, in its folder
            train_config = dataclasses.replace(saved, out_dir=str(checkpoint.parent))
        train_config.validate()
        for name, (_, why) in RESUME_FIXED.items():
            mine, theirs = getattr(train_config, name), getattr(saved, name)
            if not same_setting(name, mine, theirs):
                raise ValueError(f"train_config.{name} ({mine!r}) differs from the checkpoint's ({theirs!r}); "
                                 f"{why}. Pass train_config=None to continue with the checkpoint's settings")
        if train_config.steps <= state["step"]:
            raise ValueError(f"steps ({train_config.steps}) must be greater than the checkpoint's step "
                             f"({state['step']}) to continue the run")
    elif model_config is None:
        raise ValueError("model_config is None: pass a preset name, a config.json path or a ModelConfig "
                         "(only a resumed run takes its model config from the checkpoint)")
    else:
        model_config = load_config(model_config)
    cfg = dataclasses.replace(train_config or TrainConfig())
    cfg.validate()
    cfg.data = str(cfg.data)
    cfg.out_dir = None if cfg.out_dir is None else str(cfg.out_dir)
    if cfg.seq_len > model_config.max_position_embeddings:
        raise ValueError(f"seq_len ({cfg.seq_len}) must be <= max_position_embeddings "
                         f"({model_config.max_position_embeddings}) of the model config")
    out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output folder {str(out_dir)!r} is a file, not a folder; choose another path")
    hooks = _check_hooks(default_hooks(cfg) if hooks is None else hooks, state, checkpoint, model_config)
    parallel = _check_parallel(cfg, model_config, state, checkpoint)
    device = select_device("cpu" if parallel else cfg.device)   # a parallel run's device follows its rank
    return _Plan(model_config, cfg, device, state, checkpoint, out_dir, overwrite, cli, hooks, parallel)


def _check_parallel(cfg: TrainConfig, model_config: ModelConfig, state: dict[str, Any] | None,
                    checkpoint: Path | None) -> bool:
    """Whether the run is parallel (under torchrun, or asked for with pp > 1 or ep > 1), and what it refuses."""
    from deepseek_mini.parallel.distributed import launched_by_torchrun, mesh_shape   # no process group set up here

    sharded = state is not None and bool(state.get("sharded"))
    if sharded and not launched_by_torchrun():
        raise ValueError(f"checkpoint {str(checkpoint)!r} is sharded (written by a parallel run): resume it under "
                         "torchrun, in any layout ('torchrun --nproc-per-node 1 -m deepseek_mini.train --resume ... "
                         "--pp 1 --ep 1' works)")
    parallel = launched_by_torchrun() or cfg.pp > 1 or cfg.ep > 1
    if parallel and not launched_by_torchrun():
        n = cfg.pp * cfg.ep
        raise ValueError(f"pp {cfg.pp} x ep {cfg.ep} needs {n} or more processes: launch with torchrun, e.g. "
                         f"'torchrun --nproc-per-node {n} -m deepseek_mini.train --pp {cfg.pp} --ep {cfg.ep} ...'")
    if not parallel:
        return False
    if state is not None and not sharded:
        raise ValueError(f"checkpoint {str(checkpoint)!r} was written by a single-process run: resume it without "
                         "torchrun (a parallel run reads only sharded .dcp checkpoints)")
    mesh_shape(int(os.environ["WORLD_SIZE"]), cfg.pp, cfg.ep)     # pp divides N, ep divides N / pp
    if cfg.ep > 1 and not model_config.n_routed_experts:
        raise ValueError(f"ep {cfg.ep} splits routed experts, and this model has none (a dense model): use --ep 1")
    if cfg.ep > 1 and model_config.n_routed_experts % cfg.ep:
        raise ValueError(f"n_routed_experts ({model_config.n_routed_experts}) must be divisible by ep ({cfg.ep}): "
                         "every expert-parallel rank holds the same number of experts")
    if cfg.pp > 1 and model_config.num_nextn_predict_layers:
        raise ValueError("MTP (num_nextn_predict_layers > 0) is not supported with pp > 1: its modules need the "
                         "embedding of the first stage and the head of the last; use --pp 1 (data parallel) or "
                         "--mtp-depth 0")
    if cfg.balance_loss == "batch" and cfg.balance_loss_alpha and model_config.n_routed_experts:
        raise ValueError("balance_loss 'batch' is not supported in a parallel run: its f_i P_i over a split batch "
                         "(micro-batches, data-parallel ranks) is not the whole batch's; use 'sequence' (V3's) or "
                         "'none'")
    if cfg.compile:
        raise ValueError("compile is not supported in a parallel run yet; drop --compile")
    return True


_BASE_KEYS = ("step", "train_loss", "lr", "tokens", "val_loss")   # what every step records; hooks add to it


def _add(record: dict[str, Any], values: dict[str, Any], hook: TrainHook, what: str) -> None:
    """Put a hook's losses or metrics into the step's record; a key has one owner."""
    for key, value in values.items():
        if key in record or key in _BASE_KEYS:
            raise ValueError(f"hook {hook.name!r} {what} {key!r}, which another hook or the loop already records")
        record[key] = value


def _run(plan: _Plan, data: tuple[TokenStream, TokenStream] | None) -> TrainResult:
    """The training loop (the caller holds the folder's lock)."""
    if plan.parallel:
        return _run_parallel(plan, data)
    cfg, model_config, device, state, out_dir = plan.cfg, plan.model_config, plan.device, plan.state, plan.out_dir
    hooks = plan.hooks
    start_step = state["step"] if state is not None else 0
    clean_folder = (prepare_folder(out_dir, plan.checkpoint, start_step, plan.overwrite, plan.cli)
                    if out_dir is not None else None)
    torch.manual_seed(cfg.seed)
    train_stream, val_stream = data if data is not None else make_datasets(cfg.data, cfg.n_docs, cfg.seed)
    for name, stream in (("training", train_stream), ("validation", val_stream)):
        try:   # once, here: the model's forward does not check ids (that would sync a GPU every step)
            check_tokens(stream.tokens, model_config.vocab_size)
        except ValueError as exc:
            raise ValueError(f"the {name} data does not fit the model: {exc}") from None
    model = build_model(model_config, device=device, seed=cfg.seed)
    for hook in hooks:   # e.g. FP8: swap the linears before the optimizer takes the parameters
        hook.prepare_model(model)
    optimizer = _make_optimizer(model, cfg)
    # MTP's depth k needs targets up to k tokens past the window: y is (B, T + D), the main loss reads y[:, :T]
    batcher = Batcher(train_stream, cfg.batch_size, cfg.seq_len, seed=cfg.seed,
                      extra_targets=model_config.num_nextn_predict_layers)
    val_batches = eval_batches(val_stream, cfg.batch_size, cfg.seq_len, cfg.eval_batches)   # next-token loss only
    # per step: step, train_loss, lr and whatever the hooks log (MoE: maxvio, balance_loss; MTP: mtp_loss,
    # mtp_loss_1..D, mtp_lambda)
    history: dict[str, list[float]] = {"step": [], "train_loss": [], "lr": [], "eval_step": [], "val_loss": []}
    if state is not None:
        restore_checkpoint(state, model, optimizer, batcher, rng=True)
        for hook in hooks:
            hook.load_state_dict((state.get("hooks") or {}).get(hook.name, {}))
        history = state["history"]
    plan.state = state = None   # the tensors now live in the model and optimizer
    if clean_folder is not None:
        clean_folder()
    # The training forward goes through the compiled module; it shares the parameters, buffers and
    # submodules of ``model``, which evaluation, the hooks and the checkpoints use as is.
    forward = torch.compile(model) if cfg.compile else model
    baseline = unigram_entropy(train_stream)
    model.train()
    started = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not cfg.progress,
               desc=f"train {model_config.num_hidden_layers}L d{model_config.hidden_size} on {device.type}",
               unit="step", dynamic_ncols=True)

    def save(name: str, step: int) -> Path:
        return save_checkpoint(out_dir / name, model, optimizer, batcher, step, model_config, cfg, history,
                               hooks={hook.name: hook.state_dict() for hook in hooks})

    done = start_step          # steps whose effect is in model, optimizer, hooks, history and metrics
    phase = "between steps"    # "drawing": undoable (only RNG states moved); "committing": not undoable
    with StopRequest(saves=out_dir is not None) as stop:
        try:
            while done < cfg.steps:
                undo = (batcher.generator.get_state(), torch.get_rng_state())
                phase = "drawing"
                step = done + 1
                lr = lr_schedule(done, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x, y, _ = batcher.next_batch()
                x, y = x.to(device), y.to(device)
                extra: dict[str, torch.Tensor] = {}
                with _autocast(device):
                    output = forward(x, return_aux=True)     # (logits, aux): aux["routing"] for MoE
                    loss = _lm_loss(output[0], y[:, :x.shape[1]])   # the main model's next tokens
                    for hook in hooks:
                        _add(extra, hook.extra_loss(model, (x, y), output, step), hook, "adds the loss")
                optimizer.zero_grad(set_to_none=True)
                total = loss
                for value in extra.values():
                    total = total + value
                total.backward()
                for hook in hooks:
                    hook.after_backward(model, step)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                phase = "committing"
                optimizer.step()
                for hook in hooks:   # e.g. the MoE bias update, once per step from the whole step's load
                    hook.after_optimizer_step(model, step)
                record: dict[str, Any] = {"step": step, "train_loss": loss.item(), "lr": lr,
                                          "tokens": step * cfg.batch_size * cfg.seq_len}
                for hook in hooks:
                    _add(record, hook.metrics(model, step), hook, "logs the metric")
                for name, value in extra.items():
                    record[name] = value.item()
                for key in record:
                    if key != "tokens":
                        history.setdefault(key, []).append(record[key])
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    record["val_loss"] = evaluate(model, val_batches, device)
                    history["eval_step"].append(step)
                    history["val_loss"].append(record["val_loss"])
                    shown = {key: f"{record[key]:.2f}" for hook in hooks for key in hook.progress_keys if key in record}
                    bar.set_postfix(loss=f"{record['train_loss']:.3f}", val=f"{record['val_loss']:.3f}", **shown)
                append_metrics(out_dir, record)
                if out_dir is not None:
                    save_after_step(save, step, cfg.steps, cfg.checkpoint_every)
                done, phase = step, "between steps"
                bar.update(1)
                if stop.requested and done < cfg.steps:
                    raise KeyboardInterrupt
        except BaseException as exc:
            bar.close()
            if phase == "drawing":   # put the RNG states back: the step is redone on resume
                batcher.generator.set_state(undo[0])
                torch.set_rng_state(undo[1])
            interrupted = stopped_run(exc, phase, done, start_step, cfg.steps, out_dir, save, stop.signum)
            if interrupted is not None:
                raise interrupted from None
            raise
    bar.close()
    return TrainResult(model=model, history=history, model_config=model_config, train_config=cfg,
                       unigram_entropy=baseline, device=str(device), out_dir=out_dir,
                       elapsed_s=time.perf_counter() - started, start_step=start_step, hooks=hooks)


def _reduce(values: dict[str, Any], ctx: Any, divide_by: int | None = None) -> dict[str, float]:
    """Sum each named value over every rank and divide by ``divide_by`` (None: by the number of
    ranks that have it). Ranks may hold different names (a stage without MoE layers has no
    balance loss), so the names are gathered first."""
    import torch.distributed as dist

    names: list[list[str]] = [[] for _ in range(ctx.world)]
    dist.all_gather_object(names, sorted(values))
    keys = sorted(set().union(*names))
    both = torch.tensor([[float(values[k]) if k in values else 0.0 for k in keys],
                         [1.0 if k in values else 0.0 for k in keys]], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(both)
    return {k: both[0, i].item() / (divide_by or both[1, i].item()) for i, k in enumerate(keys)}


def _run_parallel(plan: _Plan, data: tuple[TokenStream, TokenStream] | None) -> TrainResult:
    """The loop of ``_run`` on every rank of a ``torchrun`` launch (chapter 06).

    Every rank draws the same global batch (same seed) and takes its data-parallel share; the
    pipeline schedule runs the forward and backward of this rank's stages over the micro-batches
    (with ep > 1 the MoE layers exchange rows with the other ranks of the EP group); the
    gradients are averaged over the data-parallel ranks (FSDP2; the expert slices over the ranks
    holding the same experts, ``PipelineRunner.sync_expert_grads``) and clipped by the global
    norm; AdamW steps each rank's shards and slices. MoE biases move by the load summed over all
    dp ranks of the stage, the EP ranks included (``MoEBalancing`` gets the stage's dp group). The logged numbers are the whole batch's (summed over
    the ranks), rank 0 writes ``metrics.jsonl``, and every rank writes its shards of the
    checkpoint (``checkpoint.dcp``). Ctrl-C or a failure stops every rank (torchrun ends the
    group) without saving: resume from the newest checkpoint (``--checkpoint-every``).
    """
    import torch.distributed as dist

    from deepseek_mini.parallel.distributed import init_distributed
    from deepseek_mini.parallel.pipeline import (PipelineRunner, clip_grad_norm, default_microbatches, load_sharded,
                                                 save_sharded)

    cfg, model_config, state, out_dir, hooks = plan.cfg, plan.model_config, plan.state, plan.out_dir, plan.hooks
    ctx = init_distributed(cfg.pp, cfg.ep)
    n_micro = cfg.n_microbatches or default_microbatches(cfg.schedule, cfg.pp)
    share, rest = divmod(cfg.batch_size, ctx.dp)
    if rest or share % n_micro:
        raise ValueError(f"batch_size ({cfg.batch_size}) must split into {ctx.dp} data-parallel shares of "
                         f"{n_micro} equal micro-batches (world {ctx.world} / pp {cfg.pp} = dp {ctx.dp}): use a "
                         f"multiple of {ctx.dp * n_micro}")
    start_step = state["step"] if state is not None else 0
    problem, clean_folder = None, None
    if ctx.is_main and out_dir is not None:   # rank 0 owns the folder; the others learn whether it is usable
        try:
            clean_folder = prepare_folder(out_dir, plan.checkpoint, start_step, plan.overwrite, plan.cli)
        except ValueError as exc:
            problem = str(exc)
    shared = [problem]
    dist.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        raise ValueError(shared[0])
    torch.manual_seed(cfg.seed)
    train_stream, val_stream = data if data is not None else make_datasets(cfg.data, cfg.n_docs, cfg.seed)
    for name, stream in (("training", train_stream), ("validation", val_stream)):
        try:
            check_tokens(stream.tokens, model_config.vocab_size)
        except ValueError as exc:
            raise ValueError(f"the {name} data does not fit the model: {exc}") from None
    # The whole model, seeded, on every rank: the stages then hold exactly the single-process weights.
    model = build_model(model_config, device=ctx.device, seed=cfg.seed)
    for hook in hooks:
        hook.prepare_model(model)
        hook.set_process_groups(ctx.dp_group, ctx.pp_group)
    depth = model_config.num_nextn_predict_layers
    runner = PipelineRunner(ctx, model, cfg.schedule, n_micro, (share, cfg.seq_len, depth), hooks)
    del model
    stages = runner.models
    optimizer = _make_optimizer(stages, cfg, apart=runner.expert_params)
    batcher = Batcher(train_stream, cfg.batch_size, cfg.seq_len, seed=cfg.seed, extra_targets=depth)
    val_batches = eval_batches(val_stream, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    history: dict[str, list[float]] = {"step": [], "train_loss": [], "lr": [], "eval_step": [], "val_loss": []}
    if state is not None:
        load_sharded(plan.checkpoint, stages, optimizer, ctx.ep_mesh)
        restore_checkpoint(state, sampler=batcher, rng=True)
        for hook in hooks:
            hook.load_state_dict((state.get("hooks") or {}).get(hook.name, {}))
        history = state["history"]
    plan.state = state = None
    dist.barrier()
    if clean_folder is not None:
        clean_folder()
    mine = slice(ctx.dp_rank * share, (ctx.dp_rank + 1) * share)   # this rank's rows of the global batch
    layout = (f"pp {ctx.pp} x dp {ctx.dp}" + (f" (ep {ctx.ep} x {ctx.edp})" if ctx.ep > 1 else "")
              + f", {cfg.schedule}, {n_micro} micro-batches")
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (cfg.progress and ctx.is_main),
               desc=f"train {layout} on {ctx.world} x {ctx.device.type}", unit="step", dynamic_ncols=True)
    started = time.perf_counter()

    def save(name: str, step: int) -> None:
        save_sharded_checkpoint(out_dir / name, lambda folder: save_sharded(folder, stages, optimizer, ctx.ep_mesh),
                                ctx.is_main, dist.barrier, batcher, step, model_config, cfg, history,
                                hooks={hook.name: hook.state_dict() for hook in hooks},
                                layout={"pp": ctx.pp, "dp": ctx.dp, "ep": ctx.ep, "schedule": cfg.schedule})

    for step in range(start_step + 1, cfg.steps + 1):
        lr = lr_schedule(step - 1, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y, _ = batcher.next_batch()
        optimizer.zero_grad(set_to_none=True)
        loss, extra = runner.step(x[mine].to(ctx.device), y[mine].to(ctx.device), step)
        for hook in hooks:
            hook.after_backward(stages, step)
        clip_grad_norm(list(stages.parameters()), cfg.grad_clip, ctx, runner.expert_params)
        optimizer.step()
        for hook in hooks:
            hook.after_optimizer_step(stages, step)
        metrics: dict[str, Any] = {}
        for hook in hooks:
            _add(metrics, hook.metrics(stages, step), hook, "logs the metric")
        # the whole batch's numbers: losses are means over equal shares (sum / dp); an extra loss is summed
        # over the stages that add it; a metric is the mean of the ranks reporting it
        losses = _reduce({"train_loss": loss.item()} if loss is not None else {}, ctx, divide_by=ctx.dp)
        extras = _reduce({k: v.item() for k, v in extra.items()}, ctx, divide_by=ctx.dp)
        metrics = {k: v for k, v in _reduce(metrics, ctx).items() if k not in extras}
        record: dict[str, Any] = {"step": step, "train_loss": losses["train_loss"], "lr": lr,
                                  "tokens": step * cfg.batch_size * cfg.seq_len, **metrics, **extras}
        for key in record:
            if key != "tokens":
                history.setdefault(key, []).append(record[key])
        if step % cfg.eval_every == 0 or step == cfg.steps:
            total = 0.0
            for vx, vy, _ in val_batches:
                part = runner.eval_loss(vx[mine].to(ctx.device), vy[mine].to(ctx.device))
                total += _reduce({"val": part.item()} if part is not None else {}, ctx, divide_by=ctx.dp)["val"]
            record["val_loss"] = total / len(val_batches)
            history["eval_step"].append(step)
            history["val_loss"].append(record["val_loss"])
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", val=f"{record['val_loss']:.3f}")
        if ctx.is_main:
            append_metrics(out_dir, record)
        if out_dir is not None:
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save(PERIODIC_NAME.format(step=step).replace(".pt", SHARDED_SUFFIX), step)
            if step == cfg.steps:
                save(CHECKPOINT_NAME.replace(".pt", SHARDED_SUFFIX), step)
        bar.update(1)
    bar.close()
    return TrainResult(model=stages, history=history, model_config=model_config, train_config=cfg,
                       unigram_entropy=unigram_entropy(train_stream), device=str(ctx.device), out_dir=out_dir,
                       elapsed_s=time.perf_counter() - started, start_step=start_step, hooks=hooks, layout=layout)


def train(model_config: ModelConfig | str | None, train_config: TrainConfig | None = None, *,
          data: tuple[TokenStream, TokenStream] | None = None, resume: str | Path | None = None,
          overwrite: bool = False, hooks: Sequence[TrainHook] | None = None) -> TrainResult:
    """Train a model from scratch, or continue the run saved at ``resume``.

    ``data`` = (train_stream, val_stream) skips building the corpus (the notebooks pass
    streams they already made). Returns the trained model and its loss history.

    ``hooks`` are the features plugged into the loop (``TrainHook``); None gives
    ``default_hooks(train_config)``: Multi-Token Prediction and DeepSeekMoE's balancing, each doing
    nothing on a model without the feature. To add one, pass
    ``[*default_hooks(cfg), MyHook()]``. Their extra losses and metrics go to the history
    and ``metrics.jsonl`` under their names.

    ``resume`` is a checkpoint file or a run folder (its newest checkpoint). The checkpoint's
    model config and training settings are restored: pass ``model_config=None`` and
    ``train_config=None`` to continue in the checkpoint's folder, or a ``TrainConfig`` to
    change only ``steps`` (greater than the checkpoint's step), ``device``, ``compile``,
    ``eval_every``, ``out_dir``, ``checkpoint_every`` or ``progress``; any other difference
    (``RESUME_FIXED``), or other hooks, is a ValueError.

    With ``train_config.out_dir`` set, a folder already holding a run is refused unless
    ``overwrite=True`` (which deletes that run's files), and the folder is locked while
    training. Ctrl-C finishes the step, saves ``checkpoint.pt`` and raises
    ``TrainingInterrupted`` (a KeyboardInterrupt); other errors also save the last whole
    step before propagating.
    """
    plan = _plan(model_config, train_config, resume, overwrite, hooks=hooks)
    with _lock(plan):
        return _run(plan, data)


def _lock(plan: _Plan):
    """The run folder's lock; in a parallel run only rank 0 writes the folder and holds it."""
    from deepseek_mini.parallel.distributed import launched_by_torchrun

    main_rank = not (plan.parallel and launched_by_torchrun()) or int(os.environ["RANK"]) == 0
    return RunLock(plan.out_dir) if plan.out_dir is not None and main_rank else contextlib.nullcontext()


def plot_losses(result: TrainResult, path: str | Path) -> Path:
    """Write the training and validation loss curves with the unigram baseline to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = result.history
    if "maxvio" in h:   # MoE: loss and expert balance side by side
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        ax2.plot(h["step"], h["maxvio"], lw=1)
        ax2.set(xlabel="step", ylabel="MaxVio (max load / mean load - 1)", title="expert load balance (lower is better)")
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(h["step"], h["train_loss"], lw=1, alpha=0.7, label="train")
    ax.plot(h["eval_step"], h["val_loss"], "o-", label="validation")
    ax.axhline(result.unigram_entropy, color="gray", ls="--", label="unigram entropy (no context)")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)",
           title=f"deepseek_mini: {result.model_config.num_hidden_layers}-layer model, d={result.model_config.hidden_size}")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """The command line, ``python -m deepseek_mini.train`` (see ``deepseek_mini.train_cli.main``)."""
    from deepseek_mini.train_cli import main as cli_main   # imported here: train_cli imports this module
    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
