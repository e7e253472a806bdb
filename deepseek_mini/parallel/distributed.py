"""Processes, groups and launch: the plumbing under chapter 06's parallel training.

A parallel run is N processes (ranks), started by ``torchrun``, which gives each its
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and the rendezvous address. The ranks form a
two-dimensional grid, a ``DeviceMesh`` of shape (pp, dp)::

    rank = pp_rank * dp + dp_rank         pp ranks hold different pipeline stages (layers);
                                          dp ranks hold the same stages and see different data

DeepSeek-V3 trains with 16-way pipeline parallelism, 64-way expert parallelism over 8 nodes
and ZeRO-1 data parallelism (arXiv 2412.19437 §3.2); here the grid is (pp, dp) and the expert
-parallel group will sit inside dp (one stage's ranks route different tokens through the same
gate). Two groups matter to the training hooks:

* the *data-parallel group* of a rank (``dp_group``): the ranks that hold the same layers and
  see different data. Gradients are averaged over it (FSDP2), and ``MoEBalancing`` sums the
  expert load over it before moving the bias (§2.1.2): never over WORLD, where other pipeline
  stages hold other layers.
* the *pipeline group* (``pp_group``): the ranks that together hold the whole model. The global
  gradient norm and the MoE metrics are summed over it.

The backend follows the machine: NCCL on CUDA GPUs (one GPU per local rank), gloo on CPUs, so
the same command runs on a laptop and on a GPU node. Multi-node runs add ``--nnodes`` and a
rendezvous endpoint on every node::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m deepseek_mini.train --config toy --pp 4 --schedule dualpipev

``spawn`` and ``run_torchrun`` start small groups of processes for tests with a time limit:
on a timeout every process is killed and the error says which command hung, so a deadlock
(a rank waiting for a message no one sends) fails a test instead of hanging CI.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["ParallelContext", "init_distributed", "pick_backend", "launched_by_torchrun", "free_port", "spawn",
           "run_torchrun", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 120.0      # a collective waiting longer than this has deadlocked (the toy's steps take < 1 s)


def launched_by_torchrun() -> bool:
    """Whether this process is a rank of a ``torchrun`` launch (its environment names the world)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def pick_backend() -> tuple[str, str]:
    """(backend, device type): NCCL on CUDA GPUs when torch sees one, else gloo on the CPU."""
    return ("nccl", "cuda") if torch.cuda.is_available() else ("gloo", "cpu")


@dataclass
class ParallelContext:
    """This rank's place in the (pp, dp) grid, its device and its groups (see the module docstring)."""

    rank: int
    world: int
    pp: int
    dp: int
    ep: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def pp_rank(self) -> int:
        return self.rank // self.dp

    @property
    def dp_rank(self) -> int:
        return self.rank % self.dp

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("pp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("dp")

    @property
    def dp_mesh(self) -> DeviceMesh:
        return self.mesh["dp"]

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run's files (metrics, the lock, the run state beside the shards)."""
        return self.rank == 0


def init_distributed(pp: int = 1, ep: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S) -> ParallelContext:
    """Join the process group ``torchrun`` (or ``spawn``) set up and build the (pp, dp) mesh.

    ``pp`` must divide the number of processes; dp = processes / pp. Expert parallelism (``ep``)
    is not built yet (the all-to-all dispatcher of ``deepseek_mini.parallel.expert`` plugs into
    ``MoE.dispatcher``), so ``ep`` must be 1. Calling it again returns a context on the group
    already initialised.
    """
    if not launched_by_torchrun():
        raise ValueError("no process group to join: launch with torchrun, e.g. "
                         "'torchrun --nproc-per-node 2 -m deepseek_mini.train --config toy --pp 2'")
    world = int(os.environ["WORLD_SIZE"])
    for name, value in (("pp", pp), ("ep", ep)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} ({value!r}) must be a positive integer")
    if world % pp:
        raise ValueError(f"pp ({pp}) must divide the number of processes ({world}): data parallelism runs over "
                         "the processes / pp ranks of each stage")
    if ep != 1:
        raise ValueError(f"ep ({ep}) > 1 is not available yet: expert parallelism plugs "
                         "deepseek_mini.parallel.expert.AllToAllDispatcher into MoE.dispatcher over the "
                         "data-parallel ranks (chapter 06); run with --ep 1")
    backend, device_type = pick_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device_type == "cuda" else None)
    mesh = init_device_mesh(device_type, (pp, world // pp), mesh_dim_names=("pp", "dp"))
    return ParallelContext(rank=dist.get_rank(), world=world, pp=pp, dp=world // pp, ep=ep, device=device, mesh=mesh)


def free_port() -> int:
    """A TCP port free on this machine now (for a test's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple, errors: Any) -> None:
    """One spawned rank: torchrun's environment, one thread, ``fn(*args)``; a failure is reported, not hung."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    try:
        fn(*args)
    except BaseException:   # report every failure, then exit non-zero
        errors.put((rank, traceback.format_exc()))
        raise SystemExit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable[..., Any], nprocs: int, *args: Any, timeout_s: float = 60.0) -> None:
    """Run ``fn(*args)`` in ``nprocs`` fresh processes set up as ``torchrun`` would (ranks 0..n-1,
    a free port, ``OMP_NUM_THREADS=1``); ``fn`` calls ``init_distributed``. ``fn`` must be importable
    (a module-level function). Returns when all exit 0; raises ``RuntimeError`` with the first
    failing rank's traceback, or ``TimeoutError`` after ``timeout_s`` with every process killed."""
    if not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs ({nprocs!r}) must be a positive integer")
    ctx = multiprocessing.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, rank, nprocs, port, args, errors), daemon=True)
             for rank in range(nprocs)]
    for p in procs:
        p.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    try:
        while any(p.is_alive() for p in procs):
            if not errors.empty():
                rank, trace = errors.get()
                raise RuntimeError(f"rank {rank} of {nprocs} failed:\n{trace}")
            if datetime.datetime.now() > deadline:
                stuck = [r for r, p in enumerate(procs) if p.is_alive()]
                raise TimeoutError(f"{getattr(fn, '__name__', fn)} on {nprocs} processes did not finish in "
                                   f"{timeout_s:.0f} s (ranks {stuck} still running): killed; a rank waits for "
                                   "a message no other rank sends")
            time.sleep(0.05)
        if not errors.empty():
            rank, trace = errors.get()
            raise RuntimeError(f"rank {rank} of {nprocs} failed:\n{trace}")
        bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"ranks exited with errors (rank, exit code): {bad}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)


def run_torchrun(args: Sequence[str], nprocs: int, timeout_s: float = 120.0,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nprocs <args>`` on this machine with a free port, in its own
    process group, killed whole after ``timeout_s`` (``TimeoutError`` with its output so far).
    Returns the completed process (check ``returncode`` and ``stderr``)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nprocs),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)      # torchrun and every rank it started
        out, err = proc.communicate()
        raise TimeoutError(f"{' '.join(command[1:])} did not finish in {timeout_s:.0f} s: killed.\n"
                           f"stderr tail:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)
