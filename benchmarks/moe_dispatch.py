"""Time the routed experts of one MoE layer: efficient (sorted) dispatch against naive dispatch.

What is measured
----------------
One set of N_r routed SwiGLU experts (``deepseek_mini.layers.MLP``, the package's expert) and
one router (``deepseek_mini.moe.Gate``: sigmoid affinities, top-K_r, gates normalised and
scaled by 2.5) are built with seeded weights. For each token count T, T random tokens are
routed once, outside the timing; then only the dispatch, the step that sends every token to
its K_r experts and sums their gated outputs, is timed. Three implementations share the same
experts, tokens, routing, dtype and threads, run in the same process, rotate their order
within each repeat, and are warmed up first; the table reports the median of the repeats.
Before timing, their outputs (and, with --backward, their gradients) are checked to agree.

The three dispatches (DeepSeek-V3 §2.1.2; chapter 03)
----------------------------------------------------
* ``naive`` (``deepseek_mini.moe.moe_naive``): every expert runs on every token and its
  output is multiplied by its gate, which is 0 for the N_r - K_r experts a token did not
  choose. Obviously correct; N_r / K_r times the expert arithmetic that is needed.
* ``efficient`` (``deepseek_mini.moe.moe_dispatch``): one stable argsort of the T*K_r
  (token, expert) pairs by expert, one gather of the tokens into that order, each expert run
  once on its contiguous slice, one ``index_add_`` back into the tokens' rows. Exactly the
  needed expert arithmetic, plus the sort/gather/scatter.
* ``official-style``: the per-expert loop of the official inference code (deepseek-ai/
  DeepSeek-V3, ``inference/model.py``, ``MoE.forward``), re-written in this file (see
  ``moe_official_style``) as a comparison point: for each expert that has tokens,
  ``torch.where(indices == i)`` finds them, the expert runs on them, and the result is
  added into their rows. The same arithmetic as ``efficient``, but N_r scans of the
  (T, K_r) index tensor and N_r scattered writes instead of one sort and one scatter.

Examples
--------
    python benchmarks/moe_dispatch.py                       # CPU, d=256, expert width 128, fp32
    python benchmarks/moe_dispatch.py --backward            # forward + backward
    python benchmarks/moe_dispatch.py --tokens 4096 --experts 64:6 256:8 --repeats 20
    python benchmarks/moe_dispatch.py --json moe.json       # also write the rows as JSON
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
from torch import nn

from deepseek_mini.layers import MLP
from deepseek_mini.moe import Gate, expert_load, max_violation, moe_dispatch, moe_naive

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Agreement tolerances (absolute and relative, as in torch.testing.assert_close): the three
# paths add the same products in different orders, nothing more.
TOLERANCES = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (5e-2, 5e-2)}
METHODS = ["naive", "official", "efficient"]


def moe_official_style(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                       experts: nn.ModuleList) -> torch.Tensor:
    """Comparison point, NOT the package's dispatch: the official inference code's per-expert loop.

    Mirrors the structure of ``MoE.forward`` in deepseek-ai/DeepSeek-V3 ``inference/model.py``
    (written here independently): count each expert's tokens once, then for every expert that
    has any, find its (token, slot) pairs with ``torch.where`` and add its gated output into
    those tokens' rows. A token picks an expert at most once, so ``idx`` has no repeats and the
    indexed ``+=`` is exact. Works under autograd too (the official code only runs it for
    inference).
    """
    y = torch.zeros_like(x)
    counts = torch.bincount(indices.flatten(), minlength=len(experts)).tolist()
    for i, expert in enumerate(experts):
        if counts[i] == 0:
            continue
        idx, top = torch.where(indices == i)
        y[idx] += (expert(x[idx]) * weights[idx, top, None]).to(x.dtype)
    return y


DISPATCH = {"naive": moe_naive, "official": moe_official_style, "efficient": moe_dispatch}


def expert_config(text: str) -> tuple[int, int]:
    """'64:6' -> (64, 6): N_r routed experts, K_r of them per token."""
    try:
        n, k = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N_r:K_r such as 64:6, got {text!r}") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"need 1 <= K_r <= N_r, got {text!r}")
    return n, k


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="moe_dispatch.py",
        description="Time the routed experts of one MoE layer with three dispatches: naive (every "
                    "expert on every token, masked by its gate), the official inference code's "
                    "per-expert torch.where loop, and the package's efficient sorted dispatch. "
                    "Checks that they agree, then prints ms per call and the ratios against the "
                    "efficient dispatch, for every token count and expert configuration.",
        epilog="examples:\n"
               "  python benchmarks/moe_dispatch.py                        # CPU, forward only\n"
               "  python benchmarks/moe_dispatch.py --backward             # forward + backward\n"
               "  python benchmarks/moe_dispatch.py --tokens 4096 --experts 64:6 256:8 --repeats 20\n"
               "  python benchmarks/moe_dispatch.py --json moe.json        # also write the rows as JSON",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096], metavar="T",
                        help="numbers of tokens routed together, i.e. batch x sequence length "
                             "(default: 256 1024 4096)")
    parser.add_argument("--experts", type=expert_config, nargs="+", default=[(8, 2), (16, 4), (64, 6)],
                        metavar="N:K", help="expert configurations, N_r routed experts of which each "
                                            "token uses K_r (default: 8:2 16:4 64:6)")
    parser.add_argument("--dim", type=int, default=256, help="model width d (default: 256)")
    parser.add_argument("--inter-dim", type=int, default=128,
                        help="expert width, moe_intermediate_size (default: 128; the 'toy' config: 64)")
    parser.add_argument("--backward", action="store_true",
                        help="time forward + backward (gradients of the tokens, the gates and every "
                             "expert weight) instead of forward only")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run (default: cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="expert weights and tokens; the router stays in float32 (default: float32)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per method and size (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (default: 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and tokens (default: 0)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the machine, the settings and every row to PATH as JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch.cuda.is_available() is False")
    if min(args.tokens) < 1 or args.dim < 1 or args.inter_dim < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("tokens, dim, inter-dim and repeats must be >= 1, warmup >= 0")
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, CPU, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(n_experts: int, topk: int, args, device, dtype) -> tuple[Gate, nn.ModuleList]:
    """A router (sigmoid, top-K_r, normalised gates x 2.5, as in DeepSeek-V3) and N_r experts."""
    torch.manual_seed(args.seed)
    gate = Gate(args.dim, n_experts, topk, route_scale=2.5)
    nn.init.normal_(gate.weight, 0.0, args.dim ** -0.5)
    experts = nn.ModuleList(MLP(args.dim, args.inter_dim) for _ in range(n_experts))   # nn.Linear's init
    return gate.to(device), experts.to(device=device, dtype=dtype)


def make_call(name: str, x, weights, indices, experts, backward: bool):
    """One timed call: the dispatch, and with ``backward`` the gradients of x, the gates and the experts."""
    fn = DISPATCH[name]
    if not backward:
        def call():
            with torch.no_grad():
                return fn(x, weights, indices, experts), ()
        return call
    inputs = [x, weights, *experts.parameters()]
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x)

    def call():
        y = fn(x, weights, indices, experts)
        grads = torch.autograd.grad(y, inputs, grad_out, allow_unused=True)   # an expert may get no token
        return y.detach(), grads
    return call


def check_agreement(calls: dict, dtype) -> float:
    """Run each method once; assert the outputs (and gradients) match naive's; return the max |diff|."""
    atol, rtol = TOLERANCES[dtype]
    ref_y, ref_grads = calls["naive"]()
    worst = 0.0
    for name in METHODS[1:]:
        y, grads = calls[name]()
        pairs = [(f"{name} output", y, ref_y)]
        pairs += [(f"{name} gradient #{i}", g if g is not None else torch.zeros_like(r),
                   r if r is not None else torch.zeros_like(g))
                  for i, (g, r) in enumerate(zip(grads, ref_grads)) if g is not None or r is not None]
        for what, got, ref in pairs:
            torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
            worst = max(worst, (got.float() - ref.float()).abs().max().item())
    return worst


def time_size(n_tokens: int, gate: Gate, experts: nn.ModuleList, args, device, dtype) -> dict:
    g = torch.Generator(device).manual_seed(args.seed + n_tokens)
    x = torch.randn(n_tokens, args.dim, device=device, generator=g).to(dtype)
    with torch.no_grad():
        weights, indices, _ = gate(x)                    # routing is shared and not timed
    weights = weights.to(dtype)
    if args.backward:
        x.requires_grad_(True)
        weights.requires_grad_(True)
    calls = {name: make_call(name, x, weights, indices, experts, args.backward) for name in METHODS}
    max_diff = check_agreement(calls, dtype)

    def step(name: str) -> float:
        sync(device)
        t0 = time.perf_counter()
        calls[name]()
        sync(device)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        for name in METHODS:
            step(name)
    times = {name: [] for name in METHODS}
    for i in range(args.repeats):
        order = METHODS[i % 3:] + METHODS[:i % 3]        # rotate, so drift hits every method alike
        for name in order:
            times[name].append(step(name))
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    load = expert_load(indices, len(experts))
    return {"ms": ms, "max_abs_diff": max_diff, "max_violation": max_violation(load)}


def main(argv=None) -> list[dict]:
    """Run the benchmark; print the table and return its rows (one dict per size)."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    mode = "forward + backward" if args.backward else "forward only"

    print(f"device: {device_name(device)}; torch {torch.__version__}; dtype {args.dtype}")
    print(f"routed experts only (no shared expert, routing not timed): d={args.dim}, expert width "
          f"{args.inter_dim}; {mode}; median of {args.repeats} repeats after {args.warmup} warm-up")
    print("naive = moe_naive (all experts on all tokens), official = per-expert torch.where loop in the "
          "style of DeepSeek-V3 inference/model.py, efficient = moe_dispatch (sorted)\n")
    header = (f"{'tokens':>6} | {'N_r:K_r':>7} | {'N_r/K_r':>7} | {'naive ms':>9} | {'official ms':>11} | "
              f"{'efficient ms':>12} | {'naive/efficient':>15} | {'official/efficient':>18} | {'max |diff|':>10}")
    print(header)
    print("-" * len(header))
    rows = []
    for n_experts, topk in args.experts:
        gate, experts = build(n_experts, topk, args, device, dtype)
        for n_tokens in args.tokens:
            r = time_size(n_tokens, gate, experts, args, device, dtype)
            ms = r["ms"]
            row = {"tokens": n_tokens, "n_experts": n_experts, "topk": topk, "naive_ms": ms["naive"],
                   "official_ms": ms["official"], "efficient_ms": ms["efficient"],
                   "naive_over_efficient": ms["naive"] / ms["efficient"],
                   "official_over_efficient": ms["official"] / ms["efficient"],
                   "max_abs_diff": r["max_abs_diff"], "max_violation": r["max_violation"]}
            rows.append(row)
            print(f"{n_tokens:>6} | {f'{n_experts}:{topk}':>7} | {n_experts / topk:>6.1f}x | {ms['naive']:>9.2f} | "
                  f"{ms['official']:>11.2f} | {ms['efficient']:>12.2f} | {row['naive_over_efficient']:>14.2f}x | "
                  f"{row['official_over_efficient']:>17.2f}x | {r['max_abs_diff']:>10.1e}")
            sys.stdout.flush()

    # "Largest" = the most naive expert arithmetic, T x N_r (ties: more tokens).
    big = max(rows, key=lambda r: (r["tokens"] * r["n_experts"], r["tokens"]))
    print(f"\nat the largest size (T={big['tokens']}, N_r={big['n_experts']}, K_r={big['topk']}; {mode}): "
          f"naive/efficient = {big['naive_over_efficient']:.2f}x (naive does N_r/K_r = "
          f"{big['n_experts'] / big['topk']:.1f}x the expert arithmetic), official/efficient = "
          f"{big['official_over_efficient']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(device), "torch": torch.__version__,
                       "settings": {k: v for k, v in vars(args).items() if k != "json"},
                       "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
