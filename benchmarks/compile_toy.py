"""Time toy training steps eager and through ``torch.compile``: steps per second, and their ratio.

What is measured
----------------
``deepseek_mini.train.train`` itself, the loop the notebooks and the CLI run, once with
``TrainConfig(compile=False)`` and once with ``compile=True`` (``torch.compile(model)`` with its
defaults: inductor, automatic dynamic shapes), on the same model config, data, seed and
threads, in one process. A step is the whole training step: sample a batch, forward, loss
(plus the MoE balance loss), backward, gradient clipping, AdamW, the MoE bias update. A
``TrainHook`` notes the time after each optimizer step, so the numbers come from the real
loop; evaluation runs once, after the last timed step.

* *warm-up*: the first ``--warmup`` steps, timed from the call to ``train`` (model build
  included). Compiling happens here: dynamo traces the model, inductor generates and builds
  C++ kernels. MoE layers send a data-dependent number of tokens to each expert, so their
  dispatch breaks the graph and recompiles as new shapes come (until dynamo's recompile
  limit, after which that part runs eagerly); more warm-up steps let this settle.
* *steady*: the next ``--steps`` steps, wall time from the end of the last warm-up step
  to the end of the last timed step; ``steps/s = steps / that time``.

Each configuration runs eager first, then compiled (``torch._dynamo.reset()`` before, so no
compiled code is shared between configurations). The ratio compiled/eager of steady steps/s
is printed for each; above 1 means compiled is faster.

Examples
--------
    python benchmarks/compile_toy.py                           # toy-dense and toy, batch 16 x 128, CPU
    python benchmarks/compile_toy.py --configs toy --warmup 30 --steps 50
    python benchmarks/compile_toy.py --cold                    # the warm-up compiles everything (no disk cache)
    python benchmarks/compile_toy.py --device cuda --batch-size 64 --seq-len 256
    python benchmarks/compile_toy.py --json compile.json       # also write the rows as JSON
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from deepseek_mini.config import load_config
from deepseek_mini.data import make_datasets
from deepseek_mini.train import TrainConfig, TrainHook, default_hooks, train

BENCHMARKS = str(Path(__file__).resolve().parent)
if BENCHMARKS not in sys.path:                 # benchmarks/ is no package: make its sibling scripts importable
    sys.path.insert(0, BENCHMARKS)
from mla_decode import device_name  # noqa: E402  (one description of the machine for every benchmark)


class StepClock(TrainHook):
    """Notes ``time.perf_counter()`` after every optimizer step (and the hooks before it)."""

    name = "step_clock"

    def __init__(self) -> None:
        self.times: list[float] = []

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        if next(model.parameters()).device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/compile_toy.py",
        description="Steps per second of deepseek_mini.train, eager against torch.compile, in one process.",
        epilog=__doc__.split("Examples\n--------\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["toy-dense", "toy"], metavar="NAME",
                        help="model presets to time (default: toy-dense toy)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: 16, the CLI's)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: 128, the CLI's)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first, compiling included (default: 20)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps after the warm-up (default: 30)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, the number of cores)")
    parser.add_argument("--n-docs", type=int, default=1000, help="synthetic documents (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data and weights (default: 0)")
    parser.add_argument("--cold", action="store_true",
                        help="disable inductor's on-disk caches, so the warm-up includes all compiling, as on a "
                             "machine's first run (default: caches on, as on later runs)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write settings and rows as JSON")
    args = parser.parse_args(argv)
    for name in ("batch_size", "seq_len", "warmup", "steps", "n_docs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def time_run(config: str, compiled: bool, data, args) -> dict:
    """One ``train`` call; returns its warm-up seconds and steady steps/s."""
    cfg = TrainConfig(steps=args.warmup + args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                      eval_every=args.warmup + args.steps, eval_batches=1, seed=args.seed, device=args.device,
                      progress=False, compile=compiled)
    clock = StepClock()
    if compiled:
        torch._dynamo.reset()    # no compiled code or recompile counts carried over from an earlier run
    start = time.perf_counter()
    result = train(load_config(config), cfg, data=data, hooks=[*default_hooks(cfg), clock])
    t = clock.times
    steady = t[-1] - t[args.warmup - 1]
    return {"config": config, "compiled": compiled, "warmup_s": t[args.warmup - 1] - start,
            "steps_per_s": args.steps / steady, "ms_per_step": 1000 * steady / args.steps,
            "final_train_loss": result.history["train_loss"][-1],
            "step_s": [round(b - a, 4) for a, b in zip([start, *t], t)]}   # each step's seconds, warm-up included


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.cold:
        from torch._inductor import config as inductor_config

        inductor_config.force_disable_caches = True
    print(f"device: {device_name(torch.device(args.device))}; torch {torch.__version__}; float32 weights")
    print(f"train(): batch {args.batch_size} x {args.seq_len} tokens; {args.warmup} warm-up steps, then "
          f"{args.steps} timed steps; compiled = torch.compile(model) with its defaults; inductor caches "
          f"{'off (--cold)' if args.cold else 'on'}")
    data = make_datasets("synthetic", n_docs=args.n_docs, seed=args.seed)
    header = (f"{'config':>10} | {'eager warm-up s':>15} | {'compiled warm-up s':>18} | {'eager steps/s':>13} | "
              f"{'compiled steps/s':>16} | {'compiled/eager':>14}")
    print(header)
    print("-" * len(header))
    rows = []
    for config in args.configs:
        eager, compiled = time_run(config, False, data, args), time_run(config, True, data, args)
        row = {"config": config, "eager": eager, "compiled": compiled,
               "ratio": compiled["steps_per_s"] / eager["steps_per_s"]}
        rows.append(row)
        print(f"{config:>10} | {eager['warmup_s']:15.1f} | {compiled['warmup_s']:18.1f} | "
              f"{eager['steps_per_s']:13.2f} | {compiled['steps_per_s']:16.2f} | {row['ratio']:13.2f}x", flush=True)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "device": device_name(torch.device(args.device)), "torch": torch.__version__,
                       "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
