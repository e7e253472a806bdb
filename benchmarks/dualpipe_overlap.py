"""Time DualPipeV training steps with and without the overlapped forward/backward pair (#13).

What is measured
----------------
Two ``PipelineRunner``s with schedule ``dualpipev`` are built from the same seeded model on the
same (pp, dp, ep) mesh: one runs torch's default ``OVERLAP_F_B`` (the pair's forward, then its
backward), the other ``overlap=True`` (``deepseek_mini.parallel.overlap_fb``: the backward chunk
in a second thread, so one chunk's MoE all-to-alls and waits hide behind the other's compute,
DeepSeek-V3 §3.2.1, Figure 4). First one step of each on the same batch is checked: the losses
(on the last stage's rank) and every gradient must agree. Then the two take turns for
``--rounds`` rounds of ``--steps`` steps each (so drift hits both); a step is ``runner.step``
(the whole schedule: forwards, backwards, pipeline sends, all-to-alls, FSDP2's reduction, the
expert gradients' all-reduce) followed by ``zero_grad``; no optimizer step (it is the same for
both and does not overlap). Step time is the slowest rank's; the table gives the median over
rounds and the ratio default / overlap (> 1: overlap is faster).

Where it runs
-------------
Under ``torchrun`` it uses the launch's processes (NCCL on CUDA, one GPU per rank). Without it,
it spawns ``--procs`` gloo processes on the CPU itself (``run_workers``). CPU numbers on a
shared, small machine are noise-dominated: gloo has no streams and the processes share cores.

Examples
--------
    python benchmarks/dualpipe_overlap.py                                  # 4 gloo procs, pp 2 x ep 2, toy
    python benchmarks/dualpipe_overlap.py --procs 2 --pp 2 --ep 1
    torchrun --nproc-per-node 2 benchmarks/dualpipe_overlap.py --pp 1 --ep 2 ...   # see STATUS / README
    python benchmarks/dualpipe_overlap.py --help
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from deepseek_mini.config import load_config
from deepseek_mini.hooks import MoEBalancing
from deepseek_mini.model import build_model
from deepseek_mini.parallel.distributed import init_distributed, launched_by_torchrun
from deepseek_mini.parallel.launch import run_workers
from deepseek_mini.parallel.pipeline import PipelineRunner


def parse_overrides(items: list[str]) -> dict[str, object]:
    """``["hidden_size=1024", "num_hidden_layers=8"]`` -> config overrides (ints, floats or strings)."""
    out: dict[str, object] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set takes key=value, got {item!r}")
        key, value = item.split("=", 1)
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(rank: int, world_size: int, args: dict) -> dict:
    """One rank's part: build both runners, check they agree, time them in turns. Returns rank 0's table."""
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    ctx = init_distributed(pp=args["pp"], ep=args["ep"])
    config = load_config(args["config"], **args["overrides"])
    batch, length, micro = args["batch"], args["seq_len"], args["microbatches"] or 2 * args["pp"]
    if batch % (ctx.dp * micro):
        raise ValueError(f"--batch ({batch}) must be divisible by dp ({ctx.dp}) x micro-batches ({micro})")
    share = batch // ctx.dp
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, config.vocab_size, (batch, length), generator=g)
    y = torch.randint(0, config.vocab_size, (batch, length), generator=g)
    mine = slice(ctx.dp_rank * share, (ctx.dp_rank + 1) * share)
    x, y = x[mine].to(ctx.device), y[mine].to(ctx.device)
    runners = {}
    for name, overlap in (("default", False), ("overlap", True)):
        hook = MoEBalancing(1e-3, "sequence", 1e-4)
        hook.set_process_groups(ctx.dp_group, ctx.pp_group)
        runners[name] = PipelineRunner(ctx, build_model(config, seed=0), "dualpipev", micro, (share, length, 0),
                                       [hook], overlap=overlap)

    # 1. Agreement before timing: same loss, same gradients.
    results = {}
    for name, runner in runners.items():
        loss, _ = runner.step(x, y, 1)
        grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                 for p in runner.models.parameters()]
        results[name] = (loss, grads)
        runner.models.zero_grad(set_to_none=True)
    (l0, g0), (l1, g1) = results["default"], results["overlap"]
    worst = max(((a.float() - b.float()).abs().max() / a.float().abs().max().clamp_min(1e-30)).item()
                for a, b in zip(g0, g1))
    if l0 is not None and not torch.allclose(l0.float(), l1.float(), rtol=1e-4):
        raise RuntimeError(f"rank {rank}: losses differ, default {l0.item():.6f} vs overlap {l1.item():.6f}")
    if worst > args["tolerance"]:
        raise RuntimeError(f"rank {rank}: gradients differ by {worst:.2e} (relative) > --tolerance")

    # 2. Timing, in turns.
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args["rounds"]):
        for name, runner in runners.items():
            dist.barrier()
            _synchronize(ctx.device)
            start = time.perf_counter()
            for _ in range(args["steps"]):
                runner.step(x, y, 1)
                runner.models.zero_grad(set_to_none=True)
            _synchronize(ctx.device)
            elapsed = torch.tensor([(time.perf_counter() - start) / args["steps"]], device=ctx.device)  # NCCL: on the GPU
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)                 # the slowest rank sets the step time
            times[name].append(elapsed.item())
    loss = l0.item() if l0 is not None else float("nan")
    schedule = runners["overlap"].schedule
    pairs = sum(1 for a in schedule.pipeline_order[schedule.rank] if a is not None and a.sub_actions)
    return {"median_s": {name: statistics.median(t) for name, t in times.items()},
            "all_s": times, "worst_grad_diff": worst, "pairs": pairs, "loss": loss, "dp": ctx.dp,
            "device": str(ctx.device), "backend": dist.get_backend()}


def report(result: dict, args: dict, world: int) -> str:
    med = result["median_s"]
    lines = [f"DualPipeV step, {args['config']} {args['overrides'] or ''} on {world} x {result['device']} "
             f"({result['backend']}): pp {args['pp']} x dp {result['dp']} (ep {args['ep']}), batch {args['batch']} "
             f"x {args['seq_len']} tokens, {args['microbatches'] or 2 * args['pp']} micro-batches",
             f"overlapped F&B pairs per step on rank 0: {result['pairs']} (none: nothing to overlap, "
             "raise --microbatches)",
             f"agreement: gradients differ by at most {result['worst_grad_diff']:.1e} (relative)",
             f"{'pair':<10}{'median ms/step':>16}{'rounds (ms)':>40}"]
    for name in ("default", "overlap"):
        rounds = " ".join(f"{t * 1e3:.1f}" for t in result["all_s"][name])
        lines.append(f"{name:<10}{med[name] * 1e3:>16.1f}{rounds:>40}")
    lines.append(f"ratio default / overlap: {med['default'] / med['overlap']:.3f} (> 1: the overlapped pair is faster)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--procs", type=int, default=4, help="gloo processes to spawn when not under torchrun")
    parser.add_argument("--pp", type=int, default=2, help="pipeline ranks (DualPipeV: 2 stages each)")
    parser.add_argument("--ep", type=int, default=2, help="expert-parallel ranks per stage (must divide dp)")
    parser.add_argument("--config", default="toy", help="model preset or config.json")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. hidden_size=1024 num_hidden_layers=8")
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=0, help="default: 2 x pp (DualPipeV's minimum)")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (0: torch's default)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest relative gradient difference")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before spawned workers are killed")
    ns = parser.parse_args(argv)
    if ns.pp < 1 or ns.ep < 1 or ns.steps < 1 or ns.rounds < 1 or ns.batch < 1:
        parser.error("--pp, --ep, --steps, --rounds and --batch must be >= 1")
    args = vars(ns) | {"overrides": parse_overrides(ns.overrides), "seq_len": ns.seq_len}
    if launched_by_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        result = bench(int(os.environ["RANK"]), world, args)
        if int(os.environ["RANK"]) == 0:
            print(report(result, args, world))
        dist.destroy_process_group()
    else:
        result = run_workers(bench, ns.procs, args, timeout=ns.timeout)[0]
        print(report(result, args, ns.procs))


if __name__ == "__main__":
    main()
