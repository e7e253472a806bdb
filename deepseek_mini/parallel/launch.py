"""Start small groups of processes with a hard time limit: the tests and notebooks of chapter 06.

Two ways to start N ranks on one machine, and nothing may hang in either:

* ``run_workers(fn, world_size, *args)`` spawns ``world_size`` Python processes, sets each up as
  ``torchrun`` would (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``,
  one thread), joins one gloo process group (every collective of ``torch.distributed`` runs
  without a GPU), calls ``fn(rank, world_size, *args)`` and hands its return value back to the
  caller, one per rank. ``fn`` may call ``deepseek_mini.parallel.distributed.init_distributed``
  to build the training mesh on that group. Spawned processes import ``fn`` by its module and
  name, so it must be a module-level function (a lambda or a function defined inside a test
  cannot be sent).
* ``run_torchrun(args, nprocs)`` runs the real launcher, ``torchrun --nproc-per-node nprocs
  args``, as a subprocess in its own process group (for end-to-end runs of
  ``python -m deepseek_mini.train``).

Both have a hard ``timeout`` (start-up included). When it passes, every process is killed and a
``TimeoutError`` names what was running; ``run_workers`` also gives the process group the same
timeout, so a collective that waits for a missing rank fails inside the workers too. A worker
that raises stops the others, and the error names the rank that failed first (the others often
fail next, in a collective that lost its peer) and carries its traceback. ``free_port`` picks
the rendezvous port of both.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_workers", "run_torchrun", "free_port", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 120.0          # a collective waiting longer than this has deadlocked (toy steps take < 1 s)
POLL_S = 0.2                       # how often the parent looks at its workers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, fn: Callable[..., Any], world_size: int, port: int, timeout: float, out_dir: str,
            args: tuple) -> None:
    """One spawned process: torchrun's environment, one thread, join the group, run ``fn``, save its result."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)                     # P workers on a few shared cores: no oversubscription
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()          # all results saved before any rank tears its connections down
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
            # gloo's teardown can abort a process ("terminate called without an active exception",
            # about 1 run in 20 here) after the barrier above: then every result is saved and sound.
            saved_all = all((Path(out_dir) / f"rank{r}.pt").exists() for r in range(world_size))
            if not saved_all or any(Path(out_dir).glob("rank*.err")):
                raise RuntimeError(f"{name}: rank {error.error_index} of {world_size} exited with code "
                                   f"{error.exit_code}") from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join()
        return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]


def _process_tree(pid: int) -> list[int]:
    """``pid`` and every process under it, read from Linux's /proc (just ``pid`` elsewhere). torchrun
    starts each rank in a session of its own, so killing torchrun's process group misses them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])   # the field after "(name) state"
        except (OSError, IndexError, ValueError):
            continue                                                     # the process ended meanwhile
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def run_torchrun(args: Sequence[str], nprocs: int, timeout: float = DEFAULT_TIMEOUT_S,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nprocs <args>`` on this machine with a free port and one thread
    per rank, in its own process group, killed whole after ``timeout`` seconds (``TimeoutError``
    with the tail of its stderr). Returns the completed process (check ``returncode``, ``stderr``)."""
    if not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs ({nprocs!r}) must be an int >= 1")
    if not timeout > 0:
        raise ValueError(f"timeout ({timeout!r}) must be > 0 seconds")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nprocs),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in _process_tree(proc.pid):      # torchrun and every rank it started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:        # a survivor still holds the pipes: give up on the output
            out, err = "", ""
        raise TimeoutError(f"{' '.join(command[1:])} did not finish within {timeout:g} s and was killed.\n"
                           f"stderr tail:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)
