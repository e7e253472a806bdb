"""Time building DeepSeek-V3's 671B layout on the meta device (no memory, shapes only).

Building is dominated by the routed experts: 58 MoE layers x 256 routed experts plus the
shared expert and the router (the official config, ``load_config("deepseek-v3")``; MTP and
YaRN are left out, as in notebook 03, since neither changes the main model). With a
``ModuleList`` of 256 SwiGLU ``MLP``s per layer (three ``nn.Linear`` each) that was 60,486
modules and a 4.83 s median on the course's 2-core CPU; stacked experts (``GroupedExperts``:
one (E, out, in) weight per projection, issue #10 item 4) make it 1094 modules. The first
build in a process also pays one-time costs (imports, first allocations, caches), so one
untimed build runs first; the script reports the median of ``--repeats`` builds after it
and the module count, so a change in the layout shows in both.

Example
-------
    python benchmarks/moe_build.py --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from deepseek_mini import build_model, load_config


def build_seconds(repeats: int) -> tuple[list[float], int]:
    """Wall-clock seconds of each meta build after one untimed warm-up build, and the number of modules built."""
    config = load_config("deepseek-v3").replace(rope_scaling=None, num_nextn_predict_layers=0)
    n_modules = sum(1 for _ in build_model(config, device="meta").modules())   # warm-up, not timed
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model = build_model(config, device="meta")
        times.append(time.perf_counter() - start)
        del model
    return times, n_modules


def main(argv=None) -> tuple[list[float], int]:
    """Print the module count and the build times; return them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="builds to time (median reported)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats ({args.repeats}) must be >= 1")
    times, n_modules = build_seconds(args.repeats)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    print(f"DeepSeek-V3 671B on meta: {n_modules} modules, median {statistics.median(times):.2f} s "
          f"over {args.repeats} builds after one untimed warm-up build (each: {', '.join(f'{t:.2f}' for t in times)} s)")
    return times, n_modules


if __name__ == "__main__":
    main()
