"""FP32 vs FP8 training of a preset: final validation loss per seed, the relative gap and the seed spread.

What is measured (DeepSeek-V3 §3.3; chapter 05)
-----------------------------------------------
For each seed the preset is trained twice through ``deepseek_mini.train`` with the same data,
weights and batches: once as is, once with the ``FP8Training`` hook, which converts every
eligible linear to ``fp8.FP8Linear`` before the optimizer is built (Fprop, Dgrad and Wgrad in
E4M3 with 1x128 / 128x128 scales; embedding, head and MoE gates stay high precision; emulated on
a CPU, Triton kernels on CUDA). On CUDA the baseline runs under the loop's bf16 autocast, so it
is the paper's BF16 baseline; on a CPU it is FP32.

Columns: ``val (base)`` and ``val (fp8)`` = validation loss after ``--steps`` steps
(``--eval-batches`` batches); ``gap`` = (fp8 - base) / base; ``s`` = each run's wall time.
The summary line gives the mean gap, its range over seeds, and the spread of the baseline's
own final loss over seeds ((max - min) / mean): a gap smaller than that spread is not resolved.
The paper reports a relative loss error below 0.25% at scale; a toy run of a few hundred steps
cannot resolve that.

Examples
--------
python benchmarks/fp8_training_gap.py                        # toy, seeds 0-2, 100 steps (about 90 s on 2 CPU cores)
python benchmarks/fp8_training_gap.py --steps 300 --seeds 0 1 2 3 4
python benchmarks/fp8_training_gap.py --config mini --device cuda --steps 500 --json runs/fp8_gap.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from deepseek_mini import load_config
from deepseek_mini.train import FP8Training, TrainConfig, default_hooks, train


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="FP32 (BF16 on CUDA) vs FP8 training: final validation loss, relative gap, seed spread.",
        epilog=__doc__.split("Examples\n--------\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="toy", help="model preset (default: toy)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run (default: 100)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: 16)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default: 64)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    parser.add_argument("--warmup-steps", type=int, default=10, help="linear warmup steps (default: 10)")
    parser.add_argument("--eval-batches", type=int, default=8, help="validation batches (default: 8)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write settings and rows as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = "bf16" if args.device.startswith("cuda") else "fp32"
    print(f"{args.config}, {args.steps} steps, batch {args.batch_size} x {args.seq_len}, device {args.device} "
          f"(baseline {base})")
    print(f"{'seed':>4} {'val (base)':>11} {'val (fp8)':>10} {'gap':>8} {'s base':>7} {'s fp8':>7}")
    rows = []
    for seed in args.seeds:
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                          warmup_steps=args.warmup_steps, eval_every=args.steps, eval_batches=args.eval_batches,
                          seed=seed, device=args.device, progress=False)
        row = {"seed": seed}
        for mode, hooks in (("base", None), ("fp8", [*default_hooks(cfg), FP8Training()])):
            started = time.perf_counter()
            result = train(load_config(args.config), cfg, hooks=hooks)
            row[f"val_{mode}"], row[f"s_{mode}"] = result.history["val_loss"][-1], time.perf_counter() - started
        row["gap"] = (row["val_fp8"] - row["val_base"]) / row["val_base"]
        rows.append(row)
        print(f"{seed:4d} {row['val_base']:11.4f} {row['val_fp8']:10.4f} {100 * row['gap']:+7.2f}% "
              f"{row['s_base']:7.1f} {row['s_fp8']:7.1f}", flush=True)
    gaps, bases = [r["gap"] for r in rows], [r["val_base"] for r in rows]
    spread = (max(bases) - min(bases)) / statistics.mean(bases)
    print(f"gap: mean {100 * statistics.mean(gaps):+.2f}%, range {100 * min(gaps):+.2f}% .. {100 * max(gaps):+.2f}% "
          f"over {len(rows)} seed(s); {base} final loss spread over seeds {100 * spread:.2f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
