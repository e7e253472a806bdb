"""Train a deepseek_mini model: the loop the notebooks call and ``python -m deepseek_mini.train`` runs.

One flat loop, in the spirit of nanoGPT/nanochat: sample a batch, forward, cross-entropy,
backward, clip, AdamW step, learning-rate schedule, periodic evaluation, checkpoints.
Optimiser settings follow DeepSeek-V3's pre-training (arXiv 2412.19437 §4.2): AdamW with
beta1 = 0.9, beta2 = 0.95, weight decay 0.1, gradient clipping at norm 1.0, linear warmup.
The paper holds the peak rate for most of training and then decays with a cosine; with a
few hundred steps we warm up and decay straight away (``lr_schedule``).

Honest simplifications for a CPU course: one process (chapter 06 adds pipeline and expert
parallelism), a fixed batch size (the paper ramps 3072 -> 15360 sequences), no FP8
(chapter 05). On CUDA the forward runs under bf16 autocast with float32 master weights.

A run never loses or mixes work:

* Resume is exact: the checkpoint stores the model, the optimiser, the data sampler's RNG
  state, the global RNG states, the model config and the training settings, so ``steps=N``
  straight and ``N/2 + resume + N/2`` give bit-identical weights on the same machine, at
  any CPU thread count. Resuming restores the checkpoint's settings; a conflicting one is
  an error, never silently applied.
* Ctrl-C finishes the current step, saves ``checkpoint.pt`` and raises
  ``TrainingInterrupted`` (the CLI prints the command that resumes and exits with 130).
* A folder that already holds a run is refused unless ``overwrite=True``; ``<out>/.lock``
  (holding the pid) keeps a second process out of a folder in use.
* Checkpoints are written atomically (a unique temporary file, then ``os.replace``) and read
  with ``torch.load(weights_only=True)``: a checkpoint is data, it cannot run code.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pickle
import re
import shlex
import signal
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from deepseek_mini.config import ModelConfig, load_config, preset_names
from deepseek_mini.data import (EOS_ID, Batcher, ByteTokenizer, TokenStream, eval_batches, make_datasets,
                                unigram_entropy)
from deepseek_mini.generate import generate
from deepseek_mini.model import build_model, count_parameters
from deepseek_mini.moe import balance_loss, max_violation, moe_layers, update_biases

__all__ = ["TrainConfig", "TrainResult", "TrainingInterrupted", "train", "evaluate", "evaluate_by_domain",
           "lr_schedule", "select_device", "save_checkpoint", "load_checkpoint", "find_checkpoint",
           "plot_losses", "main"]

CHECKPOINT_NAME = "checkpoint.pt"             # the run's newest state: written at the end and on Ctrl-C
PERIODIC_NAME = "checkpoint-{step:06d}.pt"    # kept every checkpoint_every steps
PERIODIC_PATTERN = re.compile(r"checkpoint-(\d+)\.pt")
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"
LOCK_NAME = ".lock"
DEFAULT_OUT = "runs/toy"
SAMPLE_PROMPTS = ("37+25=", "sort: 9 4 7 1 -> ", "def add_4(x):\n", "the small ")
SAMPLE_TOKENS = 48
EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130   # 130 = 128 + SIGINT, the shell's convention
CHECKPOINT_KEYS = frozenset({"step", "model", "optimizer", "batcher", "torch_rng", "model_config",
                             "train_config", "history"})


@dataclass
class TrainConfig:
    """Everything about a training run that is not the model's architecture."""

    steps: int = 800
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1          # final LR = lr * min_lr_ratio (the paper decays 2.2e-4 -> 2.2e-5)
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 16
    seed: int = 0
    device: str = "auto"
    data: str = "synthetic"            # "synthetic" or a path to a UTF-8 text file
    n_docs: int = 4000
    out_dir: str | None = None         # where checkpoints, metrics.jsonl and loss.png go
    checkpoint_every: int = 0          # also keep checkpoint-NNNNNN.pt every N steps (0: only the final one)
    progress: bool = True
    # DeepSeekMoE load balancing (§2.1.2; ignored by dense models). The defaults are V3's recipe:
    # the auxiliary-loss-free bias update plus a tiny sequence-wise balance loss.
    bias_update_speed: float = 0.001   # gamma; 0 turns the bias update off
    balance_loss: str = "sequence"     # "sequence" (eqs. 17-20), "batch" (conventional aux loss) or "none"
    balance_loss_alpha: float = 1e-4   # alpha (V3: 0.0001)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "n_docs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        for name in ("warmup_steps", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} ({value!r}) must be an integer >= 0")
        for name in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip", "bias_update_speed",
                     "balance_loss_alpha"):
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
        if self.balance_loss not in ("sequence", "batch", "none"):
            raise ValueError(f"balance_loss ({self.balance_loss!r}) must be 'sequence', 'batch' or 'none'")
        if not isinstance(self.device, str) or (self.device not in ("auto", "cpu", "cuda", "mps")
                                                and not re.fullmatch(r"cuda:\d+", self.device)):
            raise ValueError(f"device ({self.device!r}) must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        if not isinstance(self.data, (str, Path)):
            raise ValueError(f"data ({self.data!r}) must be 'synthetic' or a path to a text file")
        if self.out_dir is not None and not isinstance(self.out_dir, (str, Path)):
            raise ValueError(f"out_dir ({self.out_dir!r}) must be a folder path or None")


# Settings a resume must keep: changing one would not continue the same run. The others
# (steps, device, eval_every, out_dir, checkpoint_every, progress) may change on resume.
_SCHEDULE = "the learning-rate schedule depends on it"
_OPTIMIZER = "the optimizer's state was built with it"
_SAMPLER = "the data sampler's saved state is for the checkpoint's value"
_CORPUS = "the corpus depends on it"
_BALANCE = "the load-balancing recipe is part of the run"
RESUME_FIXED: dict[str, tuple[str | None, str]] = {   # field: (CLI flag or None, why it is fixed)
    "seed": ("--seed", "the corpus and the data order depend on it"),
    "data": ("--data", _CORPUS), "n_docs": ("--n-docs", _CORPUS),
    "batch_size": ("--batch-size", _SAMPLER), "seq_len": ("--seq-len", _SAMPLER),
    "lr": ("--lr", _SCHEDULE), "warmup_steps": ("--warmup-steps", _SCHEDULE), "min_lr_ratio": (None, _SCHEDULE),
    "weight_decay": (None, _OPTIMIZER), "beta1": (None, _OPTIMIZER), "beta2": (None, _OPTIMIZER),
    "grad_clip": (None, _OPTIMIZER),
    "eval_batches": (None, "the validation losses would not be comparable"),
    "bias_update_speed": ("--bias-update-speed", _BALANCE), "balance_loss": ("--balance-loss", _BALANCE),
    "balance_loss_alpha": ("--balance-alpha", _BALANCE),
}


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


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training; ``checkpoint`` (None without an out_dir) holds the state after ``step``."""

    def __init__(self, message: str, step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


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


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norm gains, biases) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


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


# ----------------------------------------------------------------------------- checkpoints

def _plain_train_config(cfg: TrainConfig) -> dict[str, Any]:
    """The settings as plain Python values (paths as str), so weights_only loading accepts them."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}


def _atomic_write(path: Path, write) -> None:
    """``write(file)`` into a temporary file unique to this process, then rename it over ``path``.

    A reader sees the old file or the new one, never half of one; two writers never share a
    temporary name; a failed write leaves no temporary file behind.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, batcher: Batcher,
                    step: int, model_config: ModelConfig, train_config: TrainConfig,
                    history: dict[str, list[float]]) -> Path:
    """Everything needed to continue bit-identically, as tensors and plain Python values only
    (``torch.load(weights_only=True)`` reads it back); written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "batcher": batcher.state_dict(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "model_config": model_config.to_dict(), "train_config": _plain_train_config(train_config),
        "history": history,
    }
    _atomic_write(path, lambda f: torch.save(state, f))
    return path


def _torch_load(path: Path, mmap: bool = False) -> Any:
    """``torch.load`` restricted to tensors and plain data, with one-line errors."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if refused:   # weights_only met a Python callable: unpickling it could run code
            raise ValueError(f"checkpoint {str(path)!r} refers to Python code ({refused.group(1)}), not only to "
                             "tensors and plain data; refused because loading it could run code (deepseek_mini "
                             "checkpoints never do)") from None
        raise ValueError(f"checkpoint {str(path)!r} is not a torch checkpoint (or is damaged)") from None
    except Exception as exc:  # a truncated or foreign file: say which and why
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"checkpoint {str(path)!r} could not be read: {reason}") from None


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints in ``folder``, oldest first; ``checkpoint.pt`` wins a tie."""
    found = []
    for path in folder.iterdir():
        match = PERIODIC_PATTERN.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), 0, path))
        elif path.name == CHECKPOINT_NAME:
            found.append((_peek(path)["step"], 1, path))
    return [(step, path) for step, _, path in sorted(found)]


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or the newest checkpoint (highest step) in a run folder."""
    path = Path(path)
    if path.is_dir():
        found = _checkpoints(path)
        if not found:
            raise ValueError(f"folder {str(path)!r} holds no checkpoint ({CHECKPOINT_NAME} or checkpoint-NNNNNN.pt)")
        return found[-1][1]
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    return path


def _check_state(state: Any, path: Path) -> dict[str, Any]:
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {str(path)!r} is not a deepseek_mini.train checkpoint "
                         f"(it holds a {type(state).__name__}, not a dict)")
    missing = CHECKPOINT_KEYS - set(state)
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks {sorted(missing)}: not written by deepseek_mini.train")
    if not isinstance(state["step"], int) or state["step"] < 0:
        raise ValueError(f"checkpoint {str(path)!r} has an invalid step ({state['step']!r})")
    return state


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (a file, or the newest in a run folder).

    Loads with ``weights_only=True``: only tensors and plain data, so a crafted file cannot
    run code. Errors are one-line ``ValueError``s naming the file.
    """
    path = find_checkpoint(path)
    return _check_state(_torch_load(path), path)


def _peek(path: Path) -> dict[str, Any]:
    """A checkpoint's step and configs without reading its tensors (memory-mapped)."""
    state = _check_state(_torch_load(path, mmap=True), path)
    return {key: state[key] for key in ("step", "model_config", "train_config")}


def _saved_train_config(state: dict[str, Any], path: Path) -> TrainConfig:
    saved = state["train_config"]
    unknown = sorted(set(saved) - {f.name for f in fields(TrainConfig)}) if isinstance(saved, dict) else None
    if unknown is None or unknown:
        raise ValueError(f"checkpoint {str(path)!r} has training settings this version does not know: {unknown}")
    return TrainConfig(**saved)


def _config_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    return [f"{f.name} {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}" for f in fields(ModelConfig)
            if getattr(a, f.name) != getattr(b, f.name)]


def _same_setting(name: str, a: Any, b: Any) -> bool:
    """Equal settings; two spellings of one text file's path are the same data."""
    if name != "data":
        return a == b
    if "synthetic" in (str(a), str(b)):
        return str(a) == str(b)
    return Path(a).resolve() == Path(b).resolve()


# ----------------------------------------------------------------------------- run folder: lock, occupancy, metrics

def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs; without a safe probe (Windows) assume it does."""
    if pid == os.getpid():
        return True
    if os.name != "posix":   # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:           # EPERM: it exists, under another user
        return True
    return True


class _RunLock:
    """``<folder>/.lock`` holding this process's pid while a run writes the folder.

    Creation is exclusive (``O_EXCL``), so of two runs started on one folder the second
    refuses and names the first's pid. A lock whose pid no longer runs (a killed run) is
    taken over with a message. (Two processes taking over the same stale lock at the same
    instant could both succeed; starting two runs within microseconds of each other on a
    crashed run's folder is the one case this does not cover.)
    """

    def __init__(self, folder: Path) -> None:
        self.folder, self.path, self.held = folder, folder / LOCK_NAME, False

    def __enter__(self) -> _RunLock:
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"output folder {str(self.folder)!r} is a file, not a folder; choose another path")
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                text = self.path.read_text(errors="replace").strip() if self.path.exists() else ""
                pid = int(text) if text.isdigit() else None
                if pid is not None and _pid_alive(pid):
                    raise ValueError(f"{str(self.folder)!r} is in use by another run (pid {pid}); wait for it "
                                     f"to end or choose another output folder (if no run uses it, delete "
                                     f"{str(self.path)!r})") from None
                print(f"note: taking over the stale lock {str(self.path)!r} (pid {text or '?'} is not running)",
                      file=sys.stderr)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            self.held = True
            return self
        raise ValueError(f"could not lock {str(self.folder)!r}: other runs keep taking it")

    def __exit__(self, *exc: object) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _run_files(folder: Path) -> list[Path]:
    """The files a run writes into its folder (what --overwrite removes)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name in (CHECKPOINT_NAME, METRICS_NAME, PLOT_NAME)
                  or PERIODIC_PATTERN.fullmatch(p.name))


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a corrupt line is a one-line error naming it.

    A last line without its newline is a record whose write was cut off (the process was
    killed); it is after the newest checkpoint, so it is dropped rather than refused.
    """
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    if lines and not text.endswith("\n"):
        lines = lines[:-1]
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with an integer 'step'")
        except ValueError as exc:
            raise ValueError(f"{str(path)!r} line {number} is not a metrics record ({exc}); delete that "
                             "line, or start the run over with overwrite (--overwrite)") from None
        records.append(record)
    return records


def _append_metrics(out_dir: Path | None, record: dict[str, Any]) -> None:
    if out_dir is not None:
        with open(out_dir / METRICS_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")


def _prepare_folder(out_dir: Path, resume_from: Path | None, start_step: int, overwrite: bool,
                    cli: bool) -> Callable[[], None]:
    """Refuse to mix two runs in one folder; returns the clean-up to do before the first step.

    Resuming in the checkpoint's own folder continues that run: metrics after its step are
    dropped (a hard-killed run's tail), and newer checkpoints would be lost, so they are
    refused unless ``overwrite``. Elsewhere, any run's files make the folder occupied;
    ``overwrite`` deletes them. Everything is checked now (the metrics file is parsed); the
    returned function deletes and truncates, and is called only once the data and the model
    are built, so a failing start leaves the folder as it was.
    """
    replace_hint = "pass --overwrite to discard it" if cli else "pass overwrite=True to discard it"
    in_place = resume_from is not None and resume_from.parent.resolve() == out_dir.resolve()
    if in_place:
        newer = [(step, path) for step, path in _checkpoints(out_dir) if step > start_step]
        if newer and not overwrite:
            other = "--out DIR to continue in a new folder" if cli else "another out_dir to continue elsewhere"
            raise ValueError(f"{str(out_dir)!r} holds newer work ({newer[-1][1].name} at step {newer[-1][0]}) "
                             f"than {resume_from.name} (step {start_step}); {replace_hint}, or {other}")
        metrics = out_dir / METRICS_NAME
        kept = [r for r in _read_metrics(metrics) if r["step"] <= start_step] if metrics.exists() else None

        def clean() -> None:
            if kept is not None:
                _atomic_write(metrics, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
            for _, path in newer:
                path.unlink()
        return clean
    existing = _run_files(out_dir)
    if existing and not overwrite:
        resume_hint = f"--resume {shlex.quote(str(out_dir))} to continue it" if cli else "resume=... to continue it"
        other = "--out DIR" if cli else "another out_dir"
        raise ValueError(f"{str(out_dir)!r} already holds a run ({', '.join(p.name for p in existing)}); "
                         f"{replace_hint}, {resume_hint}, or {other} for a new folder")

    def clean() -> None:
        for path in existing:
            path.unlink()
    return clean


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


def _plan(model_config: ModelConfig | str | None, train_config: TrainConfig | None,
          resume: str | Path | None, overwrite: bool, cli: bool = False) -> _Plan:
    """Check every input and settle the configs; nothing is trained or written here."""
    state = checkpoint = None
    if resume is not None:
        checkpoint = find_checkpoint(resume)
        state = load_checkpoint(checkpoint)
        saved_model = ModelConfig.from_dict(state["model_config"], source=f"checkpoint {str(checkpoint)!r}")
        if model_config is not None:
            given = load_config(model_config)
            if given != saved_model:
                diff = _config_differences(given, saved_model)
                raise ValueError(f"the model config differs from the checkpoint's ({'; '.join(diff[:3])}"
                                 f"{'; ...' if len(diff) > 3 else ''}); resume restores the checkpoint's model, "
                                 "so pass model_config=None")
        model_config = saved_model
        saved = _saved_train_config(state, checkpoint)
        if train_config is None:   # continue with the checkpoint's settings, in its folder
            train_config = dataclasses.replace(saved, out_dir=str(checkpoint.parent))
        train_config.validate()
        for name, (_, why) in RESUME_FIXED.items():
            mine, theirs = getattr(train_config, name), getattr(saved, name)
            if not _same_setting(name, mine, theirs):
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
    return _Plan(model_config, cfg, select_device(cfg.device), state, checkpoint, out_dir, overwrite, cli)


class _StopRequest:
    """The first Ctrl-C asks training to stop after the current step, so that what is saved is
    a whole step; a second Ctrl-C interrupts at once. Only the main thread receives signals,
    so elsewhere this does nothing (Ctrl-C then arrives as a plain KeyboardInterrupt)."""

    def __init__(self, saves: bool) -> None:
        self.saves, self.requested, self.previous, self.installed = saves, False, None, False

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        then = " to save a checkpoint" if self.saves else ""
        print(f"\nCtrl-C: stopping after this step{then} (press again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, self.previous if self.previous is not None else signal.SIG_DFL)


def _run(plan: _Plan, data: tuple[TokenStream, TokenStream] | None) -> TrainResult:
    """The training loop (the caller holds the folder's lock)."""
    cfg, model_config, device, state, out_dir = plan.cfg, plan.model_config, plan.device, plan.state, plan.out_dir
    start_step = state["step"] if state is not None else 0
    clean_folder = (_prepare_folder(out_dir, plan.checkpoint, start_step, plan.overwrite, plan.cli)
                    if out_dir is not None else None)
    torch.manual_seed(cfg.seed)
    train_stream, val_stream = data if data is not None else make_datasets(cfg.data, cfg.n_docs, cfg.seed)
    model = build_model(model_config, device=device, seed=cfg.seed)
    optimizer = _make_optimizer(model, cfg)
    batcher = Batcher(train_stream, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    val_batches = eval_batches(val_stream, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    history: dict[str, list[float]] = {"step": [], "train_loss": [], "lr": [], "eval_step": [], "val_loss": []}
    is_moe = bool(moe_layers(model))
    if is_moe:   # per step: MaxVio of the batch (mean over MoE layers) and the balance loss added
        history |= {"maxvio": [], "balance_loss": []}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        batcher.load_state_dict(state["batcher"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        history = state["history"]
    plan.state = state = None   # the tensors now live in the model and optimizer
    if clean_folder is not None:
        clean_folder()
    baseline = unigram_entropy(train_stream)
    model.train()
    started = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not cfg.progress,
               desc=f"train {model_config.num_hidden_layers}L d{model_config.hidden_size} on {device.type}",
               unit="step", dynamic_ncols=True)

    def save(name: str, step: int) -> Path:
        return save_checkpoint(out_dir / name, model, optimizer, batcher, step, model_config, cfg, history)

    done = start_step          # steps whose effect is in model, optimizer, biases, history and metrics
    phase = "between steps"    # "drawing": undoable (only RNG states moved); "committing": not undoable
    with _StopRequest(saves=out_dir is not None) as stop:
        try:
            while done < cfg.steps:
                undo = (batcher.generator.get_state(), torch.get_rng_state())
                phase = "drawing"
                lr = lr_schedule(done, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x, y, _ = batcher.next_batch()
                with _autocast(device):
                    loss = _loss(model, x.to(device), y.to(device))
                    bal = balance_loss(model, cfg.balance_loss, cfg.balance_loss_alpha) if is_moe else None
                optimizer.zero_grad(set_to_none=True)
                (loss if bal is None else loss + bal).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                phase = "committing"
                optimizer.step()
                step = done + 1
                record: dict[str, Any] = {"step": step, "train_loss": loss.item(), "lr": lr,
                                          "tokens": step * cfg.batch_size * cfg.seq_len}
                if is_moe:   # once per optimizer step, from the whole step's load (§2.1.2)
                    loads = update_biases(model, cfg.bias_update_speed)
                    record["maxvio"] = sum(max_violation(load) for load in loads) / len(loads)
                    record["balance_loss"] = 0.0 if bal is None else bal.item()
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    record["val_loss"] = evaluate(model, val_batches, device)
                    history["eval_step"].append(step)
                    history["val_loss"].append(record["val_loss"])
                    bar.set_postfix(loss=f"{record['train_loss']:.3f}", val=f"{record['val_loss']:.3f}",
                                    **({"maxvio": f"{record['maxvio']:.2f}"} if is_moe else {}))
                for key in ("step", "train_loss", "lr") + (("maxvio", "balance_loss") if is_moe else ()):
                    history[key].append(record[key])
                _append_metrics(out_dir, record)
                if out_dir is not None:
                    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                        save(PERIODIC_NAME.format(step=step), step)
                    if step == cfg.steps:
                        save(CHECKPOINT_NAME, step)
                done, phase = step, "between steps"
                bar.update(1)
                if stop.requested and done < cfg.steps:
                    raise KeyboardInterrupt
        except BaseException as exc:
            bar.close()
            if phase == "drawing":   # put the RNG states back: the step is redone on resume
                batcher.generator.set_state(undo[0])
                torch.set_rng_state(undo[1])
            saved = None
            if phase != "committing" and out_dir is not None and done > start_step:
                try:
                    saved = save(CHECKPOINT_NAME, done)
                except Exception as save_error:   # keep the original error; say why nothing was saved
                    print(f"could not save a checkpoint: {save_error}", file=sys.stderr)
            if isinstance(exc, KeyboardInterrupt):
                if saved is not None:
                    message = (f"training interrupted after step {done} of {cfg.steps}; saved {str(saved)!r}: "
                               f"continue with resume={str(out_dir)!r}")
                elif phase == "committing":
                    message = (f"training interrupted in the middle of step {done + 1}; its state is not "
                               "whole, so nothing was saved (the folder's newest checkpoint is intact)")
                else:
                    message = f"training interrupted after step {done} of {cfg.steps}; nothing to save"
                    message += " (no out_dir)" if out_dir is None else ""
                raise TrainingInterrupted(message, done, saved) from None
            if saved is not None and hasattr(exc, "add_note"):
                exc.add_note(f"the run's state after step {done} was saved to {str(saved)!r}")
            raise
    bar.close()
    return TrainResult(model=model, history=history, model_config=model_config, train_config=cfg,
                       unigram_entropy=baseline, device=str(device), out_dir=out_dir,
                       elapsed_s=time.perf_counter() - started, start_step=start_step)


def train(model_config: ModelConfig | str | None, train_config: TrainConfig | None = None, *,
          data: tuple[TokenStream, TokenStream] | None = None, resume: str | Path | None = None,
          overwrite: bool = False) -> TrainResult:
    """Train a model from scratch, or continue the run saved at ``resume``.

    ``data`` = (train_stream, val_stream) skips building the corpus (the notebooks pass
    streams they already made). Returns the trained model and its loss history.

    ``resume`` is a checkpoint file or a run folder (its newest checkpoint). The checkpoint's
    model config and training settings are restored: pass ``model_config=None`` and
    ``train_config=None`` to continue in the checkpoint's folder, or a ``TrainConfig`` to
    change only ``steps`` (greater than the checkpoint's step), ``device``, ``eval_every``,
    ``out_dir``, ``checkpoint_every`` or ``progress``; any other difference is a ValueError.

    With ``train_config.out_dir`` set, a folder already holding a run is refused unless
    ``overwrite=True`` (which deletes that run's files), and the folder is locked while
    training. Ctrl-C finishes the step, saves ``checkpoint.pt`` and raises
    ``TrainingInterrupted`` (a KeyboardInterrupt); other errors also save the last whole
    step before propagating.
    """
    plan = _plan(model_config, train_config, resume, overwrite)
    with _RunLock(plan.out_dir) if plan.out_dir is not None else contextlib.nullcontext():
        return _run(plan, data)


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
    _atomic_write(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    """Every option defaults to None, so that ``main`` can tell a flag the user typed from a default."""
    d = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m deepseek_mini.train",
        description="Train a deepseek_mini model on the built-in synthetic corpus (or your own text "
                    "file), write metrics, a checkpoint and a loss plot, and print samples.",
        epilog="examples:\n"
               "  python -m deepseek_mini.train                        # toy DeepSeek (MLA + MoE) on CPU, ~4 min on 2 cores\n"
               "  python -m deepseek_mini.train --steps 200 --out runs/quick\n"
               "  python -m deepseek_mini.train --data my_text.txt --out runs/mine\n"
               "  python -m deepseek_mini.train --resume runs/toy      # continue a stopped run (Ctrl-C saves one)\n"
               "  python -m deepseek_mini.train --resume runs/toy --steps 1600   # train a finished run further\n"
               "  python -m deepseek_mini.train --config mini --device cuda --steps 5000 --out runs/mini\n"
               "\n"
               "A folder that holds a run is never silently replaced: pass --overwrite, --resume it or\n"
               "choose another --out. --resume restores the checkpoint's model and settings; a flag that\n"
               "would change them (--config, --seed, --lr, ...) is an error. Ctrl-C finishes the step,\n"
               "saves a checkpoint and prints the command that resumes (exit status 130).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--config", metavar="NAME_OR_PATH",
                       help=f"preset ({', '.join(preset_names())}) or path to a config.json "
                            "(default: toy; on --resume, the checkpoint's)")
    run = parser.add_argument_group("run (on --resume: the checkpoint's, except --steps, --eval-every, --device)")
    run.add_argument("--steps", type=int, metavar="N",
                     help=f"total optimizer steps (default: {d.steps}); on --resume, more than the "
                          "checkpoint's step to train further")
    run.add_argument("--batch-size", type=int, metavar="N", help=f"sequences per step (default: {d.batch_size})")
    run.add_argument("--seq-len", type=int, metavar="N", help=f"tokens per sequence (default: {d.seq_len})")
    run.add_argument("--lr", type=float, help=f"peak learning rate (default: {d.lr})")
    run.add_argument("--warmup-steps", type=int, metavar="N", help=f"linear warmup steps (default: {d.warmup_steps})")
    run.add_argument("--eval-every", type=int, metavar="N", help=f"evaluate every N steps (default: {d.eval_every})")
    run.add_argument("--seed", type=int, metavar="N", help=f"seed for data, initialisation and sampling (default: {d.seed})")
    run.add_argument("--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps (default: auto)")
    moe = parser.add_argument_group("load balancing (MoE models only; DeepSeek-V3 §2.1.2)")
    moe.add_argument("--bias-update-speed", type=float, metavar="GAMMA",
                     help=f"aux-loss-free bias update speed gamma, 0 = off (default: {d.bias_update_speed})")
    moe.add_argument("--balance-loss", choices=("sequence", "batch", "none"),
                     help="balance loss: sequence-wise (eqs. 17-20), batch (conventional auxiliary loss) "
                          f"or none (default: {d.balance_loss})")
    moe.add_argument("--balance-alpha", type=float, metavar="ALPHA",
                     help=f"balance loss weight alpha (default: {d.balance_loss_alpha})")
    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="SOURCE",
                      help="'synthetic' (built-in 4-domain corpus) or a UTF-8 text file (default: synthetic)")
    data.add_argument("--n-docs", type=int, metavar="N", help=f"synthetic documents to generate (default: {d.n_docs})")
    out = parser.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", help=f"folder for checkpoint.pt, metrics.jsonl and loss.png "
                                                  f"(default: {DEFAULT_OUT}; on --resume, the checkpoint's folder)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace the run already in --out (its checkpoints, metrics and plot are deleted)")
    out.add_argument("--checkpoint-every", type=int, metavar="N",
                     help="also keep checkpoint-NNNNNN.pt every N steps (default: only checkpoint.pt at the end)")
    out.add_argument("--resume", metavar="PATH",
                     help="continue a run: a checkpoint file, or a run folder (its newest checkpoint)")
    out.add_argument("--samples", type=int, metavar="N",
                     help=f"prompts to complete at the end, 0 to {len(SAMPLE_PROMPTS)} (default: {len(SAMPLE_PROMPTS)})")
    out.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


# CLI option -> TrainConfig field, for the options that are training settings
_FLAG_FIELDS = {"steps": "steps", "batch_size": "batch_size", "seq_len": "seq_len", "lr": "lr",
                "warmup_steps": "warmup_steps", "eval_every": "eval_every", "seed": "seed", "device": "device",
                "bias_update_speed": "bias_update_speed", "balance_loss": "balance_loss",
                "balance_alpha": "balance_loss_alpha", "data": "data", "n_docs": "n_docs",
                "checkpoint_every": "checkpoint_every"}


def _cli_configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig, Path | None]:
    """Model config, training settings and checkpoint from the flags the user typed.

    Fresh run: typed flags over ``TrainConfig`` defaults. Resume: the checkpoint's config and
    settings; a typed flag that would change them is an error naming the flag.
    """
    given = {field: getattr(args, flag) for flag, field in _FLAG_FIELDS.items() if getattr(args, flag) is not None}
    if args.resume is None:
        cfg = TrainConfig(**given, out_dir=args.out or DEFAULT_OUT, progress=not args.no_progress)
        return load_config(args.config or "toy"), cfg, None
    checkpoint = find_checkpoint(args.resume)
    meta = _peek(checkpoint)
    saved = _saved_train_config(meta, checkpoint)
    saved_model = ModelConfig.from_dict(meta["model_config"], source=f"checkpoint {str(checkpoint)!r}")
    if args.config is not None and load_config(args.config) != saved_model:
        diff = _config_differences(load_config(args.config), saved_model)
        raise ValueError(f"--config {args.config} differs from the checkpoint's model ({'; '.join(diff[:3])}"
                         f"{'; ...' if len(diff) > 3 else ''}); --resume restores the checkpoint's model: drop --config")
    for flag, field in _FLAG_FIELDS.items():
        if field in RESUME_FIXED and field in given and not _same_setting(field, given[field], getattr(saved, field)):
            why = RESUME_FIXED[field][1]
            raise ValueError(f"--{flag.replace('_', '-')} {given[field]} differs from the checkpoint's "
                             f"{getattr(saved, field)}; {why} (drop the flag to continue the run, or start a new "
                             "run without --resume)")
    steps = given.get("steps", saved.steps)
    if steps <= meta["step"]:
        raise ValueError(f"--steps {steps} must be greater than the checkpoint's step ({meta['step']}): "
                         f"{'the run in ' + repr(str(checkpoint)) + ' is finished; ' if 'steps' not in given else ''}"
                         f"pass --steps N with N > {meta['step']} to train further")
    changeable = {k: given[k] for k in ("steps", "device", "eval_every", "checkpoint_every") if k in given}
    cfg = dataclasses.replace(saved, **changeable, out_dir=args.out or str(checkpoint.parent),
                              progress=not args.no_progress)
    return saved_model, cfg, checkpoint


def _check_samples(n: int, config: ModelConfig) -> None:
    """Each sample prompt must leave room for a generated token in the model's context."""
    if not 0 <= n <= len(SAMPLE_PROMPTS):
        raise ValueError(f"--samples ({n}) must be between 0 and {len(SAMPLE_PROMPTS)}")
    tok = ByteTokenizer()
    for i, text in enumerate(SAMPLE_PROMPTS[:n]):
        length = len(tok.encode(text, bos=True))
        if length >= config.max_position_embeddings:
            raise ValueError(f"sample prompt {i + 1} ({text!r}, {length} tokens) does not fit the model's context "
                             f"(max_position_embeddings {config.max_position_embeddings}); pass --samples {i}")


def _print_samples(result: TrainResult, n: int) -> None:
    tok = ByteTokenizer()
    device = next(result.model.parameters()).device
    print("\nsamples (greedy):")
    for text in SAMPLE_PROMPTS[:n]:
        prompt = torch.tensor([tok.encode(text, bos=True)], device=device)
        room = result.model_config.max_position_embeddings - prompt.shape[1]
        out = generate(result.model, prompt, max_new_tokens=min(SAMPLE_TOKENS, room), temperature=0,
                       stop_token=EOS_ID)
        print(f"  {tok.decode(out[0])!r}")


def _report(result: TrainResult, samples: int) -> None:
    """Summary, then the files (written first), then samples: a failing sample loses nothing."""
    cfg, h, out = result.train_config, result.history, result.out_dir
    print(f"\nmodel: {count_parameters(result.model)}")
    trained = f"steps {result.start_step + 1}-{cfg.steps}" if result.start_step else f"{cfg.steps} steps"
    print(f"trained {trained} in {result.elapsed_s:.0f} s on {result.device}")
    val = h["val_loss"][-1]
    print(f"validation loss {val:.3f} nats/token vs unigram entropy {result.unigram_entropy:.3f} "
          f"(a model that ignores context); {result.unigram_entropy - val:.3f} below it")
    if "maxvio" in h:
        last = h["maxvio"][-50:]
        print(f"expert load balance: MaxVio {sum(last) / len(last):.3f} over the last {len(last)} steps "
              f"(max/mean tokens per expert - 1; 0 = perfectly balanced)")
    plot = plot_losses(result, out / PLOT_NAME)
    print(f"\nloss plot:  {plot}")
    print(f"metrics:    {out / METRICS_NAME}")
    print(f"checkpoint: {out / CHECKPOINT_NAME}")
    if samples:
        _print_samples(result, samples)


def _error(message: object, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """The CLI. Exit status: 0 done, 2 a flag or input to change, 1 a failure while running, 130 Ctrl-C.

    Every error is one line on stderr that says what to change; whatever was already
    computed (checkpoint, metrics, plot) is on disk before an error is reported.
    """
    args = _parser().parse_args(argv)
    try:
        model_config, cfg, checkpoint = _cli_configs(args)
        samples = len(SAMPLE_PROMPTS) if args.samples is None else args.samples
        _check_samples(samples, model_config)
        plan = _plan(model_config, cfg, checkpoint, args.overwrite, cli=True)
    except (ValueError, NotImplementedError) as exc:
        return _error(exc, EXIT_USAGE)
    except TypeError as exc:   # a config value of the wrong type that validation did not name
        return _error(f"a value in {args.config or 'the config'} has the wrong type ({exc}); "
                      "write numbers without quotes", EXIT_USAGE)
    except OSError as exc:
        return _error(exc, EXIT_FAILED)
    out = shlex.quote(str(plan.out_dir))
    try:
        with _RunLock(plan.out_dir):
            result = _run(plan, data=None)
            _report(result, samples)
    except TrainingInterrupted as exc:
        where = f"checkpoint: {exc.checkpoint}" if exc.checkpoint is not None else str(exc)
        print(f"\ninterrupted after step {exc.step}; {where}", file=sys.stderr)
        if exc.checkpoint is not None or _run_files(plan.out_dir):
            print(f"resume with: python -m deepseek_mini.train --resume {out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(f"\ninterrupted; nothing more to save in {out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, NotImplementedError) as exc:
        return _error(exc, EXIT_USAGE)
    except (OSError, RuntimeError) as exc:
        notes = " ".join(getattr(exc, "__notes__", []))
        return _error(f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0]}"
                      f"{'; ' + notes if notes else ''}", EXIT_FAILED)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
