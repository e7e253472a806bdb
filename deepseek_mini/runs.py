"""The run folder: what a training run keeps on disk, and the rules that keep that work safe.

A run writes into one folder (``TrainConfig.out_dir``; ``--out`` on the command line)::

    runs/toy/
        checkpoint.pt          the newest state: written after the last step, on Ctrl-C and on an error
        checkpoint-000400.pt   kept every ``checkpoint_every`` steps (none by default)
        checkpoint.dcp/        a parallel run's checkpoint instead (chapter 06): a folder of shards
        metrics.jsonl          one JSON record per step: train_loss, lr, tokens, val_loss, MaxVio, ...
        loss.png               the loss curves (``plot_losses``; the CLI draws them at the end)
        .lock                  the pid of the process writing the folder, only while it runs

A checkpoint holds everything needed to continue bit-identically: the model, the optimiser,
the data sampler's RNG state, the global RNG states, the model config and the training
settings (as plain dicts), the loss history and the state of the loop's hooks. Only the
model is required: ``save_checkpoint`` and ``load_checkpoint`` take the optimiser, any
sampler with ``state_dict``/``load_state_dict`` and the rest as options, so loops other than
``deepseek_mini.train`` (GRPO in chapter 08, the parallel loops of chapter 06) use them too. At scale this is what makes a run
recoverable: a rollback reloads an earlier checkpoint after a loss spike or a failure, and
DeepSeek-V3's report (arXiv 2412.19437, abstract) counts needing none in its whole training
run as a sign of stability. Here the usual events are Ctrl-C and a crash.

Each rule below keeps a run from losing or mixing work:

* *One run per folder* (``prepare_folder``). Two runs' records in one ``metrics.jsonl``, or one
  run's checkpoint beside another's plot, would be wrong without looking wrong, so a folder
  holding a run's files is refused unless ``overwrite`` deletes them. Resuming in the
  checkpoint's own folder continues that run: its metrics after the checkpoint's step (the
  tail of a killed run) are dropped, and checkpoints newer than the one resumed are refused,
  because continuing from the older one would delete newer work.
* *One writer per folder* (``RunLock``). ``.lock`` is created exclusively and holds the pid,
  so a second process refuses the folder; a lock whose pid is gone (a killed run) is taken over.
* *A resume continues the same run* (``RESUME_FIXED`` in ``deepseek_mini.train``, declared
  with each ``TrainConfig`` field). Changing the seed, data, batch shape, schedule, optimiser,
  balancing recipe or the loop's hooks would give a run that is neither the old one nor a
  fresh one, so each is checked against the checkpoint, with the reason in the error.
* *Whole files only* (``atomic_write``). Every file a run rewrites goes to a temporary name
  unique to the process, then ``os.replace`` renames it: a reader, or a run killed mid-write,
  sees the old file or the new one, never half of one. A ``metrics.jsonl`` line cut off by a
  kill is dropped; any other corrupt line is an error naming it.
* *A parallel run's checkpoint is sharded* (``save_sharded_checkpoint``). Under ``torchrun`` each
  rank holds part of the model (its pipeline stages, its FSDP shards, its expert slices), so each
  writes its part with ``torch.distributed.checkpoint`` into ``checkpoint.dcp/``
  (``checkpoint-NNNNNN.dcp/``), keyed by the whole model's parameter names (an expert slice as its
  piece of the whole stack), and rank 0 adds ``run.pt`` with the rest (step, configs, history,
  sampler and RNG states). The shards load into any layout (another ``--pp`` or ``--ep``, more or
  fewer processes), so a run saved on 4 processes resumes on 2. The folder is written under a
  temporary name and renamed whole, like a file.
* *A stop is a whole step* (``StopRequest``, ``stopped_run``). The first Ctrl-C or SIGTERM lets the
  step finish, then the loop saves ``checkpoint.pt`` and raises ``TrainingInterrupted`` (the command
  lines exit with 128 + the signal: 130, 143); another error saves the last whole step before it
  propagates; a stop after the optimizer stepped saves nothing, because half a step is neither run.
* *A checkpoint is data* (``load_checkpoint``). ``torch.load(weights_only=True)`` accepts only
  tensors and plain Python values; a full unpickler calls whatever functions the file names,
  so a crafted ``.pt`` file could run code. That is why configs are saved as dicts.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shlex
import shutil
import signal
import sys
import threading
import uuid
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

from deepseek_mini.config import ModelConfig

__all__ = ["CHECKPOINT_NAME", "PERIODIC_NAME", "SHARDED_SUFFIX", "RUN_STATE_NAME", "save_sharded_checkpoint",
           "is_sharded", "METRICS_NAME", "PLOT_NAME", "LOCK_NAME", "Stateful",
           "atomic_write", "save_checkpoint", "load_checkpoint", "restore_checkpoint", "find_checkpoint",
           "peek_checkpoint", "sampler_state", "config_differences", "same_setting", "RunLock", "run_files",
           "append_metrics", "prepare_folder", "StopRequest", "TrainingInterrupted", "save_after_step", "stopped_run"]

CHECKPOINT_NAME = "checkpoint.pt"             # the run's newest state: written at the end and on Ctrl-C
PERIODIC_NAME = "checkpoint-{step:06d}.pt"    # kept every checkpoint_every steps
PERIODIC_PATTERN = re.compile(r"checkpoint-(\d+)\.(?:pt|dcp)")
SHARDED_SUFFIX = ".dcp"                       # a parallel run's checkpoint: a folder of shards (chapter 06)
RUN_STATE_NAME = "run.pt"                     # inside it: everything but the model and optimizer tensors
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"
LOCK_NAME = ".lock"

CHECKPOINT_KEYS = frozenset({"step", "model"})   # every checkpoint; the rest is optional


class Stateful(Protocol):
    """What a checkpoint saves and restores: a data sampler (``Batcher``), an optimizer, a hook."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


# ----------------------------------------------------------------------------- files and checkpoints

def _plain_settings(settings: Any) -> dict[str, Any]:
    """A settings dataclass (``TrainConfig``) or dict as plain Python values (paths as str),
    so weights_only loading accepts them."""
    values = asdict(settings) if is_dataclass(settings) and not isinstance(settings, type) else settings
    if not isinstance(values, dict):
        raise ValueError(f"train_config must be a dataclass instance or a dict, not {type(settings).__name__}")
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


def atomic_write(path: Path, write) -> None:
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


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    sampler: Stateful | None = None, step: int = 0, model_config: ModelConfig | None = None,
                    train_config: Any = None, history: dict[str, list[float]] | None = None,
                    hooks: dict[str, dict[str, Any]] | None = None) -> Path:
    """Save a training state as tensors and plain Python values only (``torch.load(weights_only=True)``
    reads it back), written atomically; the global RNG states are always included.

    Only ``model`` is required. ``sampler`` is any object with ``state_dict`` (``Batcher``, a
    prompt sampler); ``train_config`` a settings dataclass or dict; ``hooks`` the states of
    the loop's hooks by name. ``deepseek_mini.train`` passes all of them, so its runs resume
    bit-identically; ``load_checkpoint`` restores what was given.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, not {type(model).__name__}")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step ({step!r}) must be an integer >= 0")
    for label, obj in (("optimizer", optimizer), ("sampler", sampler)):
        if obj is not None and not callable(getattr(obj, "state_dict", None)):
            raise ValueError(f"{label} ({type(obj).__name__}) has no state_dict(); pass an object with "
                             "state_dict and load_state_dict, or None")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step, "model": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "sampler": None if sampler is None else sampler.state_dict(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "model_config": None if model_config is None else model_config.to_dict(),
        "train_config": None if train_config is None else _plain_settings(train_config),
        "history": history, "hooks": dict(hooks or {}),
    }
    atomic_write(path, lambda f: torch.save(state, f))
    return path


def is_sharded(path: Path) -> bool:
    """Whether ``path`` is a parallel run's sharded checkpoint (a ``.dcp`` folder)."""
    return path.suffix == SHARDED_SUFFIX and path.is_dir()


def _remove(path: Path) -> None:
    """Delete a run file, or a sharded checkpoint's folder."""
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def save_sharded_checkpoint(path: str | Path, write_shards: Callable[[Path], None], is_main: bool,
                            barrier: Callable[[], None], sampler: Stateful, step: int, model_config: ModelConfig,
                            train_config: Any, history: dict[str, list[float]],
                            hooks: dict[str, dict[str, Any]] | None = None, layout: dict[str, Any] | None = None) -> Path:
    """A parallel run's checkpoint: every rank calls it; ``write_shards(folder)`` writes this rank's
    shards (``deepseek_mini.parallel.pipeline.save_sharded``), the main rank adds ``run.pt`` (what
    ``save_checkpoint`` stores, but the model and optimizer, which are in the shards) and renames
    the temporary folder over ``path``. ``barrier`` waits for every rank."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{step}.tmp")
    if is_main and tmp.exists():
        shutil.rmtree(tmp)
    barrier()
    write_shards(tmp)
    if is_main:
        state = {"step": step, "model": None, "optimizer": None, "sharded": True, "layout": layout,
                 "sampler": sampler.state_dict(), "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                 "model_config": model_config.to_dict(), "train_config": _plain_settings(train_config),
                 "history": history, "hooks": dict(hooks or {})}
        atomic_write(tmp / RUN_STATE_NAME, lambda f: torch.save(state, f))
    barrier()
    if is_main:
        old = path.with_name(f".{path.name}.{step}.old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    barrier()
    return path


def _torch_load(path: Path, mmap: bool = False) -> Any:
    """``torch.load`` restricted to tensors and plain data, with one-line errors (a sharded
    checkpoint: its ``run.pt``)."""
    if is_sharded(path):
        path = path / RUN_STATE_NAME
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
        elif path.name in (CHECKPOINT_NAME, Path(CHECKPOINT_NAME).stem + SHARDED_SUFFIX):
            found.append((peek_checkpoint(path)["step"], 1, path))
    return [(step, path) for step, _, path in sorted(found)]


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or the newest checkpoint (highest step) in a run folder."""
    path = Path(path)
    if path.is_dir() and not is_sharded(path):
        found = _checkpoints(path)
        if not found:
            raise ValueError(f"folder {str(path)!r} holds no checkpoint ({CHECKPOINT_NAME} or checkpoint-NNNNNN.pt)")
        return found[-1][1]
    if not path.is_file() and not is_sharded(path):
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    return path


def _check_state(state: Any, path: Path) -> dict[str, Any]:
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {str(path)!r} is not a deepseek_mini checkpoint "
                         f"(it holds a {type(state).__name__}, not a dict)")
    missing = CHECKPOINT_KEYS - set(state)
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks {sorted(missing)}: not written by save_checkpoint")
    if not isinstance(state["step"], int) or state["step"] < 0:
        raise ValueError(f"checkpoint {str(path)!r} has an invalid step ({state['step']!r})")
    return state


def sampler_state(state: dict[str, Any]) -> Any:
    """The saved sampler state, or None (checkpoints before issue #10 named it ``batcher``)."""
    return state["sampler"] if state.get("sampler") is not None else state.get("batcher")


def restore_checkpoint(state: dict[str, Any], model: nn.Module | None = None,
                       optimizer: torch.optim.Optimizer | None = None, sampler: Stateful | None = None, *,
                       rng: bool = False, source: str = "the checkpoint") -> dict[str, Any]:
    """Load a checkpoint's saved states into the objects given (each optional); ``rng=True``
    also restores the global torch (and CUDA) RNG states. Returns ``state``.

    Asking for a state the checkpoint does not hold is a one-line ``ValueError``.
    """
    wanted = {"optimizer": (optimizer is not None, state.get("optimizer")),
              "sampler": (sampler is not None, sampler_state(state)), "RNG": (rng, state.get("torch_rng"))}
    for label, (asked, saved) in wanted.items():
        if asked and saved is None:
            raise ValueError(f"{source} holds no {label} state to restore (it was saved without one)")
    if state.get("sharded") and (model is not None or optimizer is not None):
        raise ValueError(f"{source} is sharded (written by a parallel run): its model and optimizer load with "
                         "deepseek_mini.parallel.pipeline.load_sharded under torchrun, or resume it with torchrun")
    if model is not None:
        model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if sampler is not None:
        sampler.load_state_dict(sampler_state(state))
    if rng:
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state


def load_checkpoint(path: str | Path, model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                    sampler: Stateful | None = None, *, rng: bool = False) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (a file, or the newest in a run folder),
    and restore it into ``model``, ``optimizer`` and ``sampler`` where given (``rng=True``: the
    global RNG states too). Returns the checkpoint's dict.

    Loads with ``weights_only=True``: only tensors and plain data, so a crafted file cannot
    run code. Errors are one-line ``ValueError``s naming the file.
    """
    path = find_checkpoint(path)
    state = _check_state(_torch_load(path), path)
    return restore_checkpoint(state, model, optimizer, sampler, rng=rng, source=f"checkpoint {str(path)!r}")


def peek_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's step and configs without reading its tensors (memory-mapped)."""
    state = _check_state(_torch_load(path, mmap=True), path)
    return {key: state[key] for key in ("step", "model_config", "train_config")}


# ----------------------------------------------------------------------------- the folder: lock, occupancy, metrics

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


class RunLock:
    """``<folder>/.lock`` holding this process's pid while a run writes the folder.

    The lock appears with its pid already in it: the pid is written to a private file that
    is then hard-linked to ``.lock`` (``os.link`` fails if ``.lock`` exists), so no other run
    ever reads an empty lock and mistakes it for a stale one. Of two runs started on one
    folder the second refuses and names the first's pid. A lock whose pid no longer runs (a
    killed run) is taken over with a message. (Two processes taking over the same stale lock
    at the same instant could both succeed; starting two runs within microseconds of each
    other on a crashed run's folder is the one case this does not cover.)
    """

    def __init__(self, folder: Path) -> None:
        self.folder, self.path, self.held = folder, folder / LOCK_NAME, False

    def __enter__(self) -> RunLock:
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"output folder {str(self.folder)!r} is a file, not a folder; choose another path")
        self.folder.mkdir(parents=True, exist_ok=True)
        mine = self.folder / f"{LOCK_NAME}.{os.getpid()}"
        mine.write_text(f"{os.getpid()}\n")
        try:
            return self._take(mine)
        finally:
            mine.unlink(missing_ok=True)

    def _take(self, mine: Path) -> RunLock:
        for _ in range(3):
            try:
                os.link(mine, self.path)
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
            self.held = True
            return self
        raise ValueError(f"could not lock {str(self.folder)!r}: other runs keep taking it")

    def __exit__(self, *exc: object) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def run_files(folder: Path) -> list[Path]:
    """The files a run writes into its folder (what --overwrite removes)."""
    if not folder.is_dir():
        return []
    names = (CHECKPOINT_NAME, Path(CHECKPOINT_NAME).stem + SHARDED_SUFFIX, METRICS_NAME, PLOT_NAME)
    return sorted(p for p in folder.iterdir() if p.name in names or PERIODIC_PATTERN.fullmatch(p.name))


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


def append_metrics(out_dir: Path | None, record: dict[str, Any]) -> None:
    """Add one step's record to ``metrics.jsonl`` (nothing without an out_dir)."""
    if out_dir is not None:
        with open(out_dir / METRICS_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")


def prepare_folder(out_dir: Path, resume_from: Path | None, start_step: int, overwrite: bool,
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
                atomic_write(metrics, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
            for _, path in newer:
                _remove(path)
        return clean
    existing = run_files(out_dir)
    if existing and not overwrite:
        resume_hint = f"--resume {shlex.quote(str(out_dir))} to continue it" if cli else "resume=... to continue it"
        other = "--out DIR" if cli else "another out_dir"
        raise ValueError(f"{str(out_dir)!r} already holds a run ({', '.join(p.name for p in existing)}); "
                         f"{replace_hint}, {resume_hint}, or {other} for a new folder")

    def clean() -> None:
        for path in existing:
            _remove(path)
    return clean


# ----------------------------------------------------------------------------- Ctrl-C: stop after a whole step

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)   # Ctrl-C, and what kill and a cluster scheduler send first


def _signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class StopRequest:
    """The first Ctrl-C (or SIGTERM, which a cluster's scheduler sends before it kills a job) asks
    training to stop after the current step, so that what is saved is a whole step; a second one
    interrupts at once. Only the main thread receives signals, so elsewhere this does nothing
    (Ctrl-C then arrives as a plain KeyboardInterrupt).

    A loop checks ``requested`` after each step and raises ``TrainingInterrupted`` once it has
    saved; ``deepseek_mini.train`` and the GRPO loop (``deepseek_mini.grpo.run``) both do.
    ``signum`` is the signal that asked (the command lines exit with 128 + it: 130, 143).
    """

    def __init__(self, saves: bool) -> None:
        self.saves, self.requested, self.installed = saves, False, False
        self.signum, self.previous = int(signal.SIGINT), {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, int(signum)
        then = " to save a checkpoint" if self.saves else ""
        print(f"\n{_signal_name(signum)}: stopping after this step{then} (send it again to stop at once)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self.previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.installed:
            for signum, previous in self.previous.items():
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM (``signum``) stopped training; ``checkpoint`` (None without an out_dir) holds
    the state after ``step``."""

    def __init__(self, message: str, step: int, checkpoint: Path | None, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.step, self.checkpoint, self.signum = step, checkpoint, int(signum)


def save_after_step(save: Callable[[str, int], Path], step: int, steps: int, checkpoint_every: int) -> None:
    """After a whole ``step``: ``checkpoint-NNNNNN.pt`` every ``checkpoint_every`` steps (0 = never), and
    ``checkpoint.pt`` after the last of ``steps``; ``save(name, step)`` writes one (both loops' rule)."""
    if checkpoint_every and step % checkpoint_every == 0:
        save(PERIODIC_NAME.format(step=step), step)
    if step == steps:
        save(CHECKPOINT_NAME, step)


def stopped_run(exc: BaseException, phase: str, done: int, start_step: int, steps: int, out_dir: Path | None,
                save: Callable[[str, int], Path], signum: int = signal.SIGINT) -> TrainingInterrupted | None:
    """What a loop does when ``exc`` stops it: save the last whole step, then say what happened.

    ``phase`` is where the step was: ``"between steps"`` or ``"drawing"`` (nothing applied yet; the
    caller has put the RNG states back), or ``"committing"`` (the optimizer has stepped: the state is
    half a step, so nothing is saved and the folder's newest checkpoint stays the truth). ``done``
    steps are whole; ``save(CHECKPOINT_NAME, done)`` writes them when there is something new and an
    ``out_dir``. Returns the ``TrainingInterrupted`` to raise for a KeyboardInterrupt (Ctrl-C or SIGTERM,
    ``signum``: ``StopRequest.signum``); for
    any other error returns None after noting on ``exc`` what was saved (the caller re-raises it).
    """
    saved = None
    if phase != "committing" and out_dir is not None and done > start_step:
        try:
            saved = save(CHECKPOINT_NAME, done)
        except Exception as save_error:   # keep the original error; say why nothing was saved
            print(f"could not save a checkpoint: {save_error}", file=sys.stderr)
    if isinstance(exc, KeyboardInterrupt):
        if saved is not None:
            message = (f"training interrupted after step {done} of {steps}; saved {str(saved)!r}: "
                       f"continue with resume={str(out_dir)!r}")
        elif phase == "committing":
            message = (f"training interrupted in the middle of step {done + 1}; its state is not "
                       "whole, so nothing was saved (the folder's newest checkpoint is intact)")
        else:
            message = f"training interrupted after step {done} of {steps}; nothing to save"
            message += " (no out_dir)" if out_dir is None else ""
        return TrainingInterrupted(message, done, saved, signum)
    if saved is not None and hasattr(exc, "add_note"):
        exc.add_note(f"the run's state after step {done} was saved to {str(saved)!r}")
    return None


# ----------------------------------------------------------------------------- resume: what must stay the same
# Which training settings a resume must keep is declared with each TrainConfig field
# (deepseek_mini.train.RESUME_FIXED); these helpers compare values.

def config_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """The fields where two model configs differ, as ``name a vs b`` (for error messages)."""
    return [f"{f.name} {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}" for f in fields(ModelConfig)
            if getattr(a, f.name) != getattr(b, f.name)]


def same_setting(name: str, a: Any, b: Any) -> bool:
    """Equal settings; two spellings of one text file's path are the same data."""
    if name != "data":
        return a == b
    if "synthetic" in (str(a), str(b)):
        return str(a) == str(b)
    return Path(a).resolve() == Path(b).resolve()
