"""Processes and groups: the plumbing under chapter 06's parallel training.

A parallel run is N processes (ranks), started by ``torchrun``, which gives each its
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and the rendezvous address. The ranks form a
three-dimensional grid, a ``DeviceMesh`` of shape (pp, edp, ep) with dp = edp * ep::

    rank = pp_rank * dp + dp_rank         pp ranks hold different pipeline stages (layers);
    dp_rank = edp_rank * ep + ep_rank     the dp = N / pp ranks of a stage see different data;
                                          E consecutive ones of them form an expert-parallel
                                          group, each holding N_r / E of every MoE layer's experts

DeepSeek-V3 trains with 16-way pipeline parallelism, 64-way expert parallelism over 8 nodes
and ZeRO-1 data parallelism (arXiv 2412.19437 §3.2): expert parallelism sits inside the
data-parallel ranks, as here. The groups of a rank:

* the *data-parallel group* (``dp_group``, all dp = N / pp ranks of the stage): they hold the same
  layers and route different tokens through the same gates. The replicated parameters' gradients
  are averaged over it (FSDP2), and ``MoEBalancing`` sums the expert load over it before moving
  the bias (§2.1.2): the expert-parallel ranks included (each routes its own tokens), never
  WORLD, where other pipeline stages hold other layers.
* the *expert-parallel group* (``ep_group``, E ranks): the all-to-all of the MoE exchange
  (``deepseek_mini.parallel.expert``); its ranks hold different experts.
* the *expert-data-parallel group* (``expert_dp_group``, edp = dp / E ranks, one per EP group):
  the ranks holding the same experts; expert gradients are summed over it.
* the *pipeline group* (``pp_group``): the ranks that together hold the whole model. The global
  gradient norm and the MoE metrics are summed over it.

The backend follows the machine: NCCL on CUDA GPUs (one GPU per local rank), gloo on CPUs, so
the same command runs on a laptop and on a GPU node. Multi-node runs add ``--nnodes`` and a
rendezvous endpoint on every node::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m deepseek_mini.train --config toy --pp 4 --ep 2 --schedule dualpipev

Test launchers with a hard time limit (spawned workers, a ``torchrun`` subprocess) are in
``deepseek_mini.parallel.launch``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from deepseek_mini.parallel.launch import DEFAULT_TIMEOUT_S

__all__ = ["ParallelContext", "init_distributed", "mesh_shape", "pick_backend", "launched_by_torchrun",
           "DEFAULT_TIMEOUT_S"]


def launched_by_torchrun() -> bool:
    """Whether this process is a rank of a ``torchrun`` launch (its environment names the world)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def pick_backend() -> tuple[str, str]:
    """(backend, device type): NCCL on CUDA GPUs when torch sees one, else gloo on the CPU."""
    return ("nccl", "cuda") if torch.cuda.is_available() else ("gloo", "cpu")


def mesh_shape(world: int, pp: int = 1, ep: int = 1) -> tuple[int, int, int]:
    """The (pp, edp, ep) grid of ``world`` processes, with one-line errors for a layout that does not fit."""
    for name, value in (("pp", pp), ("ep", ep)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} ({value!r}) must be a positive integer")
    if world % pp:
        raise ValueError(f"pp ({pp}) must divide the number of processes ({world}): data parallelism runs over "
                         "the processes / pp ranks of each stage")
    dp = world // pp
    if dp % ep:
        raise ValueError(f"ep ({ep}) must divide the data-parallel ranks of a stage (processes {world} / pp {pp} "
                         f"= {dp}): expert-parallel groups are made of {ep} of them")
    return pp, dp // ep, ep


@dataclass
class ParallelContext:
    """This rank's place in the (pp, edp, ep) grid, its device and its groups (see the module docstring)."""

    rank: int
    world: int
    pp: int
    dp: int
    ep: int
    device: torch.device
    mesh: DeviceMesh            # (pp, edp, ep)
    dp_mesh: DeviceMesh         # this stage's dp ranks, (edp, ep) flattened into one dimension

    @property
    def edp(self) -> int:
        """Ranks holding the same experts: dp / ep."""
        return self.dp // self.ep

    @property
    def pp_rank(self) -> int:
        return self.rank // self.dp

    @property
    def dp_rank(self) -> int:
        return self.rank % self.dp

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("pp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.dp_mesh.get_group()

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("ep")

    @property
    def ep_mesh(self) -> DeviceMesh:
        return self.mesh["ep"]

    @property
    def expert_dp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("edp")

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run's files (metrics, the lock, the run state beside the shards)."""
        return self.rank == 0


TESTED_TORCH = (2, 13)       # gloo (CPUs): tested with torch 2.13; torch 2.11 fails it (below)
TESTED_TORCH_NCCL = (2, 11)  # NCCL (GPUs): torch 2.11 measured on 2 H200s (benchmarks/README.md)


def check_torch_version(version: str | None = None, backend: str | None = None) -> None:
    """Refuse a torch older than the one parallel training is tested with on this backend, in one line.

    Multi-process training runs on torch.distributed's newest parts (DeviceMesh flattening,
    ``ScheduleDualPipeV``, FSDP2). On gloo (CPUs) torch 2.13 passes every test and torch 2.11
    (measured with its PyPI build on a CPU) fails twice over: before the first step its V schedules
    send a warm-up tensor from a stage to the next stage on the same rank, which gloo cannot do
    ("Pair is not connected"); and with that message skipped, its split backward gives other
    gradients than one process (ZB1P, pp 2 x dp 2: the MLA up-projection ``wkv_b`` 1% off;
    DualPipeV: the loss 1.3e-4 off by step 3). On NCCL (GPUs) torch 2.11 runs every schedule:
    NCCL accepts the self-send, and on two H200s in fp32 each layout's first three losses were
    within 5e-6 of one GPU's (``benchmarks/nccl_parity.py``). ``backend`` defaults to this
    machine's (``pick_backend``).
    """
    version = torch.__version__ if version is None else version
    backend = pick_backend()[0] if backend is None else backend
    floor = TESTED_TORCH_NCCL if backend == "nccl" else TESTED_TORCH
    major_minor = tuple(int(part) for part in version.split("+")[0].split(".")[:2])
    if major_minor < floor:
        raise ValueError(f"parallel training on {backend} needs torch >= {'.'.join(map(str, floor))} (the version "
                         f"it is tested with; torch 2.11's pipeline schedules on gloo give other gradients than one "
                         f"process), found torch {version}: upgrade torch")


def init_distributed(pp: int = 1, ep: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S) -> ParallelContext:
    """Join the process group ``torchrun`` (or ``launch.run_workers``) set up and build the (pp, edp, ep) mesh.

    ``pp`` must divide the number of processes N; dp = N / pp; ``ep`` must divide dp
    (``mesh_shape``). Calling it again returns a context on the group already initialised.
    """
    if not launched_by_torchrun():
        raise ValueError("no process group to join: launch with torchrun, e.g. "
                         "'torchrun --nproc-per-node 2 -m deepseek_mini.train --config toy --pp 2'")
    check_torch_version()
    world = int(os.environ["WORLD_SIZE"])
    shape = mesh_shape(world, pp, ep)
    backend, device_type = pick_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device_type == "cuda" else None)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=("pp", "edp", "ep"))
    dp_mesh = mesh["edp", "ep"]._flatten("dp")
    return ParallelContext(rank=dist.get_rank(), world=world, pp=pp, dp=world // pp, ep=ep, device=device, mesh=mesh,
                           dp_mesh=dp_mesh)
