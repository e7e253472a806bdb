"""The same ``deepseek_mini.train`` command on one GPU and on several (NCCL): per-step losses and wall time.

Chapter 06 trains with pipeline, expert and data parallelism through ``torchrun``; its CI test runs
4 gloo processes on a CPU. This script runs the same command on GPUs, where ``torchrun`` picks NCCL:
first one process (the reference), then each parallel layout with the same global batch, and prints
how far each step's ``train_loss`` is from the reference and how long each run took.

    python benchmarks/nccl_parity.py --help
    python benchmarks/nccl_parity.py --gpus 2 --steps 30            # on a 2-GPU machine

The model is a ``mini``-sized MoE (hidden 1024, 8 layers, MLA, 1 shared + 16 routed experts of
width 512, top-4), written to ``<out>/config.json``. On CUDA the run is bf16 autocast, so the
layouts differ from the reference by bf16 rounding of different micro-batch reductions, not by
fp32 noise: the printed difference is a measurement, not a test (CI's fp32 gloo test asserts 1e-4).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from deepseek_mini.config import load_config

MOE_MINI = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16,
                kv_lora_rank=256, q_lora_rank=None, qk_nope_head_dim=64, v_head_dim=64, qk_rope_head_dim=32,
                intermediate_size=2816, moe_intermediate_size=512, n_routed_experts=16, num_experts_per_tok=4,
                max_position_embeddings=2048)


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def _run(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {done.returncode}); the last lines of {log}:\n"
                 + "\n".join(log.read_text().splitlines()[-25:]))
    return wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2, help="processes per parallel run (default: 2)")
    p.add_argument("--layouts", default="pp2:1f1b,pp2:dualpipev,ep2",
                   help="comma-separated: ppP:SCHEDULE, epE, or ppP:SCHEDULE:epE (default: %(default)s)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--n-microbatches", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4,
                   help="peak learning rate (default: %(default)s; at train's 3e-3 this model's loss spikes in "
                        "the first steps, which magnifies every rounding difference)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=Path("runs/nccl_parity"))
    args = p.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    config_path = args.out / "config.json"
    load_config("toy", **MOE_MINI).to_json(config_path)
    common = ["--config", str(config_path), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
              "--seq-len", str(args.seq_len), "--eval-every", str(10 * args.steps), "--device", args.device,
              "--no-progress", "--overwrite", "--samples", "0", "--warmup-steps", "5", "--lr", str(args.lr)]

    ref_dir = args.out / "single"
    wall = _run([sys.executable, "-m", "deepseek_mini.train", *common, "--out", str(ref_dir)],
                args.out / "single.log")
    reference = _losses(ref_dir)
    print(f"{'layout':<20} {'wall s':>7} {'rel diff step 1':>16} {'step 2':>9} {'step 3':>9} {'max':>9} "
          f"{'last loss':>10}")
    print(f"{'1 process':<20} {wall:7.1f} {'(reference)':>16} {'':>9} {'':>9} {'':>9} {reference[max(reference)]:10.4f}")
    summary = {"reference": {"wall_s": wall, "train_loss": reference}}

    for layout in args.layouts.split(","):
        parts = layout.split(":")
        flags: list[str] = []
        for part in parts:
            if part.startswith("pp"):
                flags += ["--pp", part[2:]]
            elif part.startswith("ep"):
                flags += ["--ep", part[2:]]
            else:
                flags += ["--schedule", part, "--n-microbatches", str(args.n_microbatches)]
        run_dir = args.out / layout.replace(":", "_")
        wall = _run(["torchrun", "--standalone", "--nproc-per-node", str(args.gpus), "-m", "deepseek_mini.train",
                     *common, *flags, "--out", str(run_dir)], args.out / f"{run_dir.name}.log")
        losses = _losses(run_dir)
        rel = {s: abs(losses[s] - reference[s]) / abs(reference[s]) for s in reference}
        print(f"{layout:<20} {wall:7.1f} {rel[1]:16.2e} {rel[2]:9.2e} {rel[3]:9.2e} {max(rel.values()):9.2e} "
              f"{losses[max(losses)]:10.4f}")
        summary[layout] = {"wall_s": wall, "train_loss": losses}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
