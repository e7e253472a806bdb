"""Run a function on several local processes with a process group: tests and notebooks of chapter 06.

``run_workers(fn, world_size, *args)`` spawns ``world_size`` processes, each joins one process
group (gloo on a CPU: every collective of ``torch.distributed`` runs without a GPU), calls
``fn(rank, world_size, *args)`` and hands its return value back to the caller, one per rank.
Spawned processes import ``fn`` by its module and name, so it must be a module-level function
(a lambda or a function defined inside a test cannot be sent).

Nothing may hang: the whole run has a hard ``timeout`` (start-up included). When it passes, every
worker is killed and a ``TimeoutError`` names the function; the process group's own timeout is
the same, so a collective that waits for a missing rank fails inside the workers too. A worker
that raises stops the others, and the error names the rank that failed first (the others often
fail next, in a collective that lost its peer) and carries its traceback.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_workers", "free_port"]

DEFAULT_TIMEOUT_S = 120.0
POLL_S = 0.2                       # how often the parent looks at its workers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, fn: Callable[..., Any], world_size: int, port: int, timeout: float, out_dir: str,
            args: tuple) -> None:
    """One spawned process: one thread, join the group, run ``fn``, save what it returns."""
    torch.set_num_threads(1)                     # P workers on a few shared cores: no oversubscription
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        # When a rank fails, the others usually fail next (a collective loses its peer): the
        # failure time lets the parent report the first one, the cause.
        (Path(out_dir) / f"rank{rank}.err").write_text(f"{time.time()!r}\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def _first_failure(out_dir: str, name: str, world_size: int) -> str:
    """The error of the rank that failed first, naming the ranks that failed after it."""
    failures = []
    for path in Path(out_dir).glob("rank*.err"):
        when, trace = path.read_text().split("\n", 1)
        failures.append((float(when), int(path.stem[len("rank"):]), trace))
    if not failures:
        return ""
    failures.sort()
    _, rank, trace = failures[0]
    later = f" (then ranks {[r for _, r, _ in failures[1:]]})" if len(failures) > 1 else ""
    return f"{name} failed on rank {rank} of {world_size}{later}:\n{trace}"


def run_workers(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo processes; return the results by rank.

    A result must load with ``torch.load(weights_only=True)``: tensors, numbers, strings, and
    lists, tuples and dicts of them. Raises ``TimeoutError`` after ``timeout`` seconds (the
    workers are killed) and ``RuntimeError`` naming the rank when a worker fails.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size ({world_size!r}) must be an int >= 1")
    if not timeout > 0:
        raise ValueError(f"timeout ({timeout!r}) must be > 0 seconds")
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
    if not callable(fn) or "<" in name:
        raise ValueError(f"{name} cannot be sent to spawned processes: pass a module-level function")
    with tempfile.TemporaryDirectory(prefix="deepseek_mini_workers_") as out_dir:
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"      # inherited at start, before the workers import torch
        try:
            context = mp.start_processes(_worker, args=(fn, world_size, free_port(), timeout, out_dir, args),
                                         nprocs=world_size, join=False, start_method="spawn")
        finally:
            if saved is None:
                del os.environ["OMP_NUM_THREADS"]
            else:
                os.environ["OMP_NUM_THREADS"] = saved
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=POLL_S):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} workers running {name} did not finish within {timeout:g} s "
                                       "and were killed (a rank waiting in a collective the others never reached?)")
        except mp.ProcessRaisedException as error:
            raise RuntimeError(_first_failure(out_dir, name, world_size)
                               or f"{name} failed on rank {error.error_index} of {world_size}:\n{error}") from None
        except mp.ProcessExitedException as error:
            raise RuntimeError(f"{name}: rank {error.error_index} of {world_size} exited with code "
                               f"{error.exit_code}") from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join()
        return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]
