"""Time the routed experts of one MoE layer: five ways to run them, old layer against stacked experts.

What is measured
----------------
N_r routed SwiGLU experts and one router (``deepseek_mini.moe.Gate``: sigmoid affinities,
top-K_r, gates normalised and scaled by 2.5) are built with seeded weights, once as a
``ModuleList`` of ``deepseek_mini.layers.MLP`` (chapter 03's layout) and once stacked,
``GroupedExperts.from_modules`` (the same weights as one (E, out, in) tensor per projection).
T random tokens are routed once, outside the timing; then only the dispatch, the step that
sends every token to its K_r experts and sums their gated outputs, is timed, forward or, with
``--backward``, forward + backward (the gradients of the tokens, the gates and every expert
weight). Before timing, every method's output and gradients are checked against ``naive``'s
(the stacked weight gradients expert by expert against the ``ModuleList``'s). Timing uses the
standard tools, through ``mla_decode.median_ms``: ``torch.utils.benchmark.Timer.blocked_autorange``
on CPU and ``triton.testing.do_bench`` on CUDA. The methods take turns over ``--rounds`` rounds,
so drift hits all of them, and the table reports the median.

The five methods (DeepSeek-V3 §2.1.2; chapter 03)
-------------------------------------------------
* ``naive`` (``moe_naive``): every expert runs on every token and its output is multiplied
  by its gate, 0 for the N_r - K_r experts a token did not choose. Obviously correct; N_r / K_r
  times the expert arithmetic that is needed.
* ``official``: the per-expert loop of the official inference code (deepseek-ai/DeepSeek-V3,
  ``inference/model.py``, ``MoE.forward``), re-written here (``moe_official_style``): for each
  expert with tokens, ``torch.where(indices == i)`` finds them and its output is added into
  their rows. The needed arithmetic, but N_r scans of the indices and N_r scattered writes.
* ``sorted`` (``moe_dispatch`` on the ``ModuleList``), **the old layer**: one stable argsort of
  the T*K_r (token, expert) pairs by expert, one gather, each expert run once on its contiguous
  slice (a Python loop of N_r small SwiGLUs, 3 GEMMs each), one ``index_add_`` back. The ratios
  are against it.
* ``stacked-loop`` (``moe_staged`` on ``GroupedExperts``, ``F.grouped_mm`` switched off): the
  same sort and scatter, each projection a loop of N_r products with slices of one stacked
  weight. Separates what the layout changes from what the grouped GEMM changes.
* ``stacked`` (``moe_staged`` on ``GroupedExperts``), **the new layer**: each projection one
  ``F.grouped_mm`` over all experts where the installed torch runs it for this dtype and
  device (``grouped_mm_supported``), else the loop; the table's header says which ran.

Examples
--------
    python benchmarks/moe_dispatch.py                       # 'toy-plus' size, forward, fp32 on CPU
    python benchmarks/moe_dispatch.py --backward            # forward + backward
    python benchmarks/moe_dispatch.py --dtype bfloat16 --tokens 1024 4096 --experts 64:6 256:8
    python benchmarks/moe_dispatch.py --device cuda         # bf16, triton.testing.do_bench
    python benchmarks/moe_dispatch.py --json moe.json       # also write the rows as JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

import deepseek_mini.moe as moe
from deepseek_mini.layers import MLP
from deepseek_mini.moe import Gate, GroupedExperts, expert_load, max_violation, moe_dispatch, moe_naive, moe_staged

BENCHMARKS = str(Path(__file__).resolve().parent)
if BENCHMARKS not in sys.path:                 # benchmarks/ is no package: make its sibling scripts importable
    sys.path.insert(0, BENCHMARKS)
from mla_decode import device_name, median_ms  # noqa: E402  (the same timing as the MLA benchmark)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Agreement tolerances (absolute and relative, as in torch.testing.assert_close): the methods
# add the same products in different orders (and grouped_mm blocks its sums its own way).
TOLERANCES = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (5e-2, 5e-2)}
METHODS = ["naive", "official", "sorted", "stacked-loop", "stacked"]
BASELINE = "sorted"                                          # the old layer: ratios are against it
STACKED = ("stacked-loop", "stacked")                        # the methods that run GroupedExperts
PROJECTIONS = ("w1", "w2", "w3")


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


@contextmanager
def grouped_mm_answers(answer: bool | None = None) -> Iterator[list[bool]]:
    """Within the block, ``deepseek_mini.moe.grouped_mm_supported`` answers ``answer`` (None: its
    own answer); yields the list of what it answered, one entry per projection run."""
    answers: list[bool] = []
    supported = moe.grouped_mm_supported

    def patched(x: torch.Tensor, weight: torch.Tensor) -> bool:
        answers.append(supported(x, weight) if answer is None else answer)
        return answers[-1]

    moe.grouped_mm_supported = patched
    try:
        yield answers
    finally:
        moe.grouped_mm_supported = supported


def stacked_loop(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                 experts: GroupedExperts) -> torch.Tensor:
    """``moe_staged`` on the stacked experts with ``F.grouped_mm`` off: a loop of N_r products per projection."""
    with grouped_mm_answers(False):
        return moe_staged(x, weights, indices, experts)


DISPATCH: dict[str, Callable] = {"naive": moe_naive, "official": moe_official_style, "sorted": moe_dispatch,
                                 "stacked-loop": stacked_loop, "stacked": moe_staged}


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
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(
        prog="moe_dispatch.py",
        description="Time the routed experts of one MoE layer five ways: naive (every expert on every "
                    "token, masked by its gate), the official inference code's per-expert torch.where "
                    "loop, the sorted dispatch on a ModuleList of experts (the old layer), and the same "
                    "dispatch on stacked experts, with a loop per projection and with F.grouped_mm. "
                    "Checks that they agree, then prints ms per call and each method's speed-up over "
                    "the old layer, for every token count and expert configuration.",
        epilog="examples:\n"
               "  python benchmarks/moe_dispatch.py                        # toy-plus size, forward\n"
               "  python benchmarks/moe_dispatch.py --backward             # forward + backward\n"
               "  python benchmarks/moe_dispatch.py --dtype bfloat16 --tokens 1024 4096 --experts 64:6 256:8\n"
               "  python benchmarks/moe_dispatch.py --json moe.json        # also write the rows as JSON",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096], metavar="T",
                        help="numbers of tokens routed together, i.e. batch x sequence length (default: 4096)")
    parser.add_argument("--experts", type=expert_config, nargs="+", default=[(16, 4), (64, 6)],
                        metavar="N:K", help="expert configurations, N_r routed experts of which each "
                                            "token uses K_r (default: 16:4 64:6)")
    parser.add_argument("--dim", type=int, default=256, help="model width d (default: 256)")
    parser.add_argument("--inter-dim", type=int, default=128,
                        help="expert width, moe_intermediate_size (default: 128; the 'toy' config: 64)")
    parser.add_argument("--backward", action="store_true",
                        help="time forward + backward (gradients of the tokens, the gates and every "
                             "expert weight) instead of forward only")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device,
                        help=f"where to run (default here: {default_device})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="expert weights and tokens; the router stays in float32 "
                             "(default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--min-run-time", type=float, default=0.6, metavar="SECONDS",
                        help="timed seconds per method and size, split over the rounds (default: 0.6)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds in which the methods take turns; the median over them is reported (default: 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and tokens (default: 0)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the machine, the settings and every row to PATH as JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch.cuda.is_available() is False")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if min(args.tokens) < 1 or args.dim < 1 or args.inter_dim < 1 or args.rounds < 1 or not args.min_run_time > 0:
        parser.error("tokens, dim, inter-dim and rounds must be >= 1, --min-run-time > 0")
    return args


def build(n_experts: int, topk: int, args, device, dtype) -> tuple[Gate, nn.ModuleList, GroupedExperts]:
    """A router (sigmoid, top-K_r, normalised gates x 2.5, as in DeepSeek-V3) and N_r experts, twice:
    as a ``ModuleList`` of ``MLP`` (nn.Linear's init) and stacked from it (the same weights)."""
    torch.manual_seed(args.seed)
    gate = Gate(args.dim, n_experts, topk, route_scale=2.5)
    nn.init.normal_(gate.weight, 0.0, args.dim ** -0.5)
    experts = nn.ModuleList(MLP(args.dim, args.inter_dim) for _ in range(n_experts)).to(device=device, dtype=dtype)
    return gate.to(device), experts, GroupedExperts.from_modules(experts)


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


def named_gradients(name: str, grads: tuple, n_experts: int) -> dict[str, torch.Tensor]:
    """Gradients by name, expert by expert: 'x', 'gates', then 'expert 3 w1' and so on for every
    expert and projection. The ``ModuleList``'s come three per expert (None for an expert that got
    no token under the sorted dispatches: its gradient is 0); the stacked ones are (E, out, in)."""
    named = {"x": grads[0], "gates": grads[1]}
    for e in range(n_experts):
        for p, proj in enumerate(PROJECTIONS):
            g = grads[2 + p][e] if name in STACKED else grads[2 + 3 * e + p]
            named[f"expert {e} {proj}"] = g
    return named


def check_agreement(calls: dict, n_experts: int, dtype) -> dict[str, float]:
    """Run each method once; assert its output (and gradients) match naive's; return each one's max |diff|."""
    atol, rtol = TOLERANCES[dtype]
    ref_y, ref_grads = calls["naive"]()
    ref = named_gradients("naive", ref_grads, n_experts) if ref_grads else {}
    worst = {"naive": 0.0}
    for name in METHODS[1:]:
        y, grads = calls[name]()
        pairs = [("output", y, ref_y)]
        if grads:
            pairs += [(f"{what} gradient", g, ref[what])
                      for what, g in named_gradients(name, grads, n_experts).items()]
        worst[name] = 0.0
        for what, got, want in pairs:
            got = torch.zeros_like(want) if got is None else got
            want = torch.zeros_like(got) if want is None else want
            torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol,
                                       msg=lambda m: f"{name} {what} differs from naive's: {m}")
            worst[name] = max(worst[name], (got.float() - want.float()).abs().max().item())
    return worst


def stacked_path(calls: dict) -> str:
    """What ``stacked`` ran for its projections: 'grouped_mm', 'loop', or 'mixed'."""
    with grouped_mm_answers() as answers:
        calls["stacked"]()
    return "grouped_mm" if all(answers) else "loop" if not any(answers) else "mixed"


def time_size(n_tokens: int, gate: Gate, experts: dict[str, nn.Module], args, device, dtype) -> dict:
    """Route T tokens, check the methods agree, then time them taking turns; medians in ms."""
    g = torch.Generator(device).manual_seed(args.seed + n_tokens)
    x = torch.randn(n_tokens, args.dim, device=device, generator=g).to(dtype)
    with torch.no_grad():
        weights, indices, _ = gate(x)                    # routing is shared and not timed
    weights = weights.to(dtype)
    if args.backward:
        x.requires_grad_(True)
        weights.requires_grad_(True)
    calls = {name: make_call(name, x, weights, indices, experts["stacked" if name in STACKED else "list"],
                             args.backward) for name in METHODS}
    n_experts = len(experts["list"])
    max_diff = check_agreement(calls, n_experts, dtype)
    path = stacked_path(calls)

    times = {name: [] for name in METHODS}
    for i in range(args.rounds):
        shift = i % len(METHODS)
        for name in METHODS[shift:] + METHODS[:shift]:   # take turns, so drift hits every method alike
            times[name].append(median_ms(calls[name], device, args.min_run_time / args.rounds))
    ms = {name: statistics.median(t) for name, t in times.items()}
    return {"ms": ms, "max_abs_diff": max_diff, "stacked_path": path,
            "max_violation": max_violation(expert_load(indices, n_experts))}


def main(argv=None) -> list[dict]:
    """Run the benchmark; print the table and return its rows (one dict per size)."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    mode = "forward + backward" if args.backward else "forward only"
    tool = "triton.testing.do_bench" if device.type == "cuda" else "torch.utils.benchmark"

    print(f"device: {device_name(device)}; torch {torch.__version__}; dtype {args.dtype}")
    print(f"routed experts only (no shared expert, routing not timed): d={args.dim}, expert width "
          f"{args.inter_dim}; {mode}; median over {args.rounds} rounds of {args.min_run_time:g} s per method ({tool})")
    print("naive = moe_naive (all experts on all tokens); official = per-expert torch.where loop in the style of "
          "DeepSeek-V3 inference/model.py;\nsorted = moe_dispatch on a ModuleList of MLPs (the old layer); "
          "stacked = moe_staged on GroupedExperts, stacked-loop with F.grouped_mm off")
    print("speed-up = sorted ms / method ms (> 1: faster than the old layer); max |diff| against naive, "
          "output and every gradient\n")
    header = (f"{'tokens':>6} | {'N_r:K_r':>7} | {'method':<24} | {'ms':>9} | {'speed-up':>8} | {'max |diff|':>10}")
    print(header)
    print("-" * len(header))
    rows = []
    for n_experts, topk in args.experts:
        gate, module_list, stacked = build(n_experts, topk, args, device, dtype)
        for n_tokens in args.tokens:
            r = time_size(n_tokens, gate, {"list": module_list, "stacked": stacked}, args, device, dtype)
            ms = r["ms"]
            speedup = {name: ms[BASELINE] / ms[name] for name in METHODS}
            rows.append({"tokens": n_tokens, "n_experts": n_experts, "topk": topk, "ms": ms,
                         "speedup_vs_sorted": speedup, "stacked_path": r["stacked_path"],
                         "max_abs_diff": r["max_abs_diff"], "max_violation": r["max_violation"]})
            for name in METHODS:
                label = f"stacked ({r['stacked_path']})" if name == "stacked" else name
                print(f"{n_tokens:>6} | {f'{n_experts}:{topk}':>7} | {label:<24} | {ms[name]:>9.2f} | "
                      f"{speedup[name]:>7.2f}x | {r['max_abs_diff'][name]:>10.1e}")
            print("-" * len(header))
            sys.stdout.flush()

    # "Largest" = the most expert work, T x K_r (ties: more experts).
    big = max(rows, key=lambda r: (r["tokens"] * r["topk"], r["n_experts"]))
    s = big["speedup_vs_sorted"]
    print(f"\nat the largest size (T={big['tokens']}, N_r={big['n_experts']}, K_r={big['topk']}; {mode}): stacked "
          f"({big['stacked_path']}) runs {s['stacked']:.2f}x the speed of the old layer (stacked-loop "
          f"{s['stacked-loop']:.2f}x, official {s['official']:.2f}x, naive {s['naive']:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(device), "torch": torch.__version__,
                       "settings": {k: v for k, v in vars(args).items() if k != "json"},
                       "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
