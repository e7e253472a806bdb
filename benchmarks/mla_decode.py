"""Time one MLA decode step, naive against absorbed, as the context grows.

What is measured
----------------
One Multi-head Latent Attention layer (``deepseek_mini.mla.MLA``) decodes a single new token
against a cache that already holds N past tokens. The caches are filled directly (the model
is not run to prefill them: only the attention over N cached positions matters here): random
c_kv and k_rope for the absorbed path, and the per-head keys and values they stand for in the
naive path's cache, so both paths compute the same attention; the last column is their
relative difference, checked before timing. Both paths use the same weights, dtype, device and
thread count, and run in the same process. Timing uses the standard tools rather than a
hand-rolled loop: ``torch.utils.benchmark.Timer.blocked_autorange`` on CPU (warm-up, blocks
of calls sized to beat the clock's resolution, the thread count pinned to torch's) and
``triton.testing.do_bench`` on CUDA (CUDA events, and the L2 cache flushed before every call,
so a step reads its cache from HBM as a real decode step would, not from L2). The two paths
take turns over ``--rounds`` rounds, so drift hits both, and the table reports the median.

Why the two paths differ (DeepSeek-V3 §2.1.1; chapter 02)
---------------------------------------------------------
* ``naive`` caches per-head keys (d_h + d_h^R) and values (d_h) for every head:
  n_h (2 d_h + d_h^R) values per token. At V3 dims that is 128 x 320 = 40,960 values.
  Attending costs n_h (2 d_h + d_h^R) multiply-adds per cached token: one read per MAC.
* ``absorb`` caches only c_kv (d_c) and k_rope (d_h^R): 512 + 64 = 576 values per token at
  V3 dims, 71x fewer bytes to read. W^{UK} is folded into the query and W^{UV} applied after
  the softmax, so every head works in the d_c-wide latent space: n_h (2 d_c + d_h^R)
  multiply-adds per cached token, 3.4x *more* arithmetic than naive at V3 dims (139,264 vs
  40,960), but each cached value is reused by all n_h heads.

Decoding one token reads the whole cache and does little arithmetic per byte, so it is bound
by memory traffic: the absorbed path should win once the cache, not the weights, dominates
the bytes moved, i.e. at long contexts. At short contexts both paths are dominated by the
same weight projections (wq, wkv_a, wkv_b, wo) and kernel overheads, and the ratio nears 1.

Two costs of the package's naive path are not cache reads, and show at every context: on CPU,
``scaled_dot_product_attention`` has no fused kernel when the key width (d_h + d_h^R) differs
from the value width (d_h), so it falls back to the math path, which copies the scaled key
cache each step; and the naive up-projection ``einsum`` over slices of ``wkv_b`` copies W^{UK}
and W^{UV} each step. They are the code as the course ships it, so they are timed as is
(benchmarks/README.md gives the ratios with both removed by hand).

Examples
--------
    python benchmarks/mla_decode.py                                # CPU: mini dims, fp32
    python benchmarks/mla_decode.py --contexts 512 2048 8192 --min-run-time 2
    python benchmarks/mla_decode.py --device cuda --dims v3        # GPU: DeepSeek-V3 dims, bf16
    python benchmarks/mla_decode.py --device cuda --cuda-graph --batch 16 --contexts 1024 4096 16384

On a GPU a batch-1 step of one layer is less GPU work than the Python and kernel-launch time
around it: without --cuda-graph the GPU table measures
that overhead (the same for both paths, ratio ~1). --cuda-graph removes it; --batch raises
the bytes each step reads, as serving many requests does.
"""

from __future__ import annotations

import argparse
import platform
import statistics
from dataclasses import dataclass

import torch
from einops import rearrange
from torch.utils import benchmark

from deepseek_mini.attention import KVCache
from deepseek_mini.mla import MLA, LatentCache
from deepseek_mini.rope import rope_cos_sin, rope_frequencies


@dataclass(frozen=True)
class Dims:
    dim: int
    n_heads: int
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    def naive_values_per_token(self) -> int:
        return self.n_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim)

    def absorbed_values_per_token(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    def naive_macs_per_token(self) -> int:
        """Scores (d_h + d_h^R) plus weighted values (d_h), per head, per cached token."""
        return self.n_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim)

    def absorbed_macs_per_token(self) -> int:
        """Scores in latent space (d_c + d_h^R) plus the latent weighted sum (d_c), per head."""
        return self.n_heads * (2 * self.kv_lora_rank + self.qk_rope_head_dim)


DIMS = {
    "mini": Dims(dim=1024, n_heads=16, kv_lora_rank=256, q_lora_rank=None,
                 qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64),
    "v3": Dims(dim=7168, n_heads=128, kv_lora_rank=512, q_lora_rank=1536,
               qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(
        prog="mla_decode.py",
        description="Time one decode step (one new token) of one MLA layer against a cache of N past "
                    "tokens, naive path (per-head keys and values cached) against absorbed path (only "
                    "c_kv and k_rope cached), and print ms per token, their ratio and the cache bytes "
                    "each path reads.",
        epilog="examples:\n"
               "  python benchmarks/mla_decode.py                          # CPU, mini dims, fp32\n"
               "  python benchmarks/mla_decode.py --contexts 512 8192 --min-run-time 2\n"
               "  python benchmarks/mla_decode.py --device cuda --dims v3  # DeepSeek-V3 layer, bf16\n"
               "  python benchmarks/mla_decode.py --device cuda --cuda-graph --batch 16  # without launch overhead",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", choices=sorted(DIMS), default=None,
                        help="layer dimensions: 'mini' (d=1024, 16 heads, d_c=256, no q_lora, nope 64, "
                             "rope 32, v 64) or 'v3' (DeepSeek-V3: d=7168, 128 heads, d_c=512, "
                             "q_lora 1536, nope 128, rope 64, v 128). Default: mini on CPU, v3 on CUDA")
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096], metavar="N",
                        help="numbers of past tokens in the cache (default: 256 1024 4096)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device,
                        help=f"where to run (default here: {default_device})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weights, activations and caches (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--min-run-time", type=float, default=1.0, metavar="SECONDS",
                        help="timed seconds per path and context, split over the rounds (default: 1.0)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds in which the two paths take turns; the median over them is reported (default: 3)")
    parser.add_argument("--batch", type=int, default=1,
                        help="sequences decoded together, each with its own cache of N tokens (default: 1)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="CUDA only: replay each step from a captured CUDA graph, which removes the "
                             "Python and kernel-launch overhead that dominates a batch-1 step on a GPU")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and cache contents")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch.cuda.is_available() is False")
    if args.dims is None:
        args.dims = "v3" if args.device == "cuda" else "mini"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if min(args.contexts) < 1 or args.rounds < 1 or args.batch < 1 or not args.min_run_time > 0:
        parser.error("contexts, rounds and batch must be >= 1, --min-run-time > 0")
    if args.cuda_graph and args.device != "cuda":
        parser.error("--cuda-graph needs --device cuda")
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


def build_layers(d: Dims, device, dtype, seed: int) -> dict[str, MLA]:
    """One layer per path, with identical weights ~ N(0, 1/fan_in)."""
    sizes = dict(kv_lora_rank=d.kv_lora_rank, q_lora_rank=d.q_lora_rank, qk_nope_head_dim=d.qk_nope_head_dim,
                 qk_rope_head_dim=d.qk_rope_head_dim, v_head_dim=d.v_head_dim)
    with torch.device("meta"):
        absorb = MLA(d.dim, d.n_heads, **sizes, attn_impl="absorb")
    absorb = absorb.to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in absorb.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=g)
    absorb = absorb.to(dtype).eval()
    with torch.device("meta"):
        naive = MLA(d.dim, d.n_heads, **sizes, attn_impl="naive")
    naive = naive.to_empty(device=device).to(dtype).eval()
    naive.load_state_dict(absorb.state_dict())
    return {"naive": naive, "absorb": absorb}


def random_caches(layers: dict[str, MLA], batch: int, n_past: int, device, dtype,
                  g: torch.Generator) -> dict[str, LatentCache | KVCache]:
    """Caches for n_past + 1 positions whose first n_past hold the same past in both layouts:
    random c_kv and k_rope for the absorbed path, and the keys [W^UK c_kv; k_rope] and values
    W^UV c_kv they stand for in the naive path's cache (eqs. 2, 4, 5), so both steps compute
    the same attention and their outputs can be compared before timing."""
    latent = layers["absorb"].new_cache(batch, n_past + 1, device=device, dtype=dtype)
    for t in (latent.c_kv, latent.k_rope):
        t[:, :n_past].copy_(torch.randn(batch, n_past, t.shape[-1], device=device, generator=g).to(dtype))
    naive = layers["naive"]
    explicit = naive.new_cache(batch, n_past + 1, device=device, dtype=dtype)
    for start in range(0, n_past, 1024):           # in chunks: the naive cache is up to 71x larger
        c_kv, k_rope = latent.c_kv[:, start:n_past][:, :1024], latent.k_rope[:, start:n_past][:, :1024]
        kv = rearrange(naive.wkv_b(c_kv), "b s (h d) -> b h s d", h=naive.n_heads)
        k_nope, v = kv.split([naive.dn, naive.dv], dim=-1)
        k_pe = k_rope[:, None].expand(-1, naive.n_heads, -1, -1)
        end = start + c_kv.shape[1]
        explicit.k[:, :, start:end] = torch.cat([k_nope, k_pe], dim=-1)
        explicit.v[:, :, start:end] = v
    return {"naive": explicit, "absorb": latent}


def cache_bytes_read(cache, n_read: int) -> int:
    """Bytes of cache the step reads: every cached position up to and including the new one."""
    if isinstance(cache, LatentCache):
        per_pos = cache.c_kv.shape[-1] + cache.k_rope.shape[-1]
        return cache.c_kv.shape[0] * n_read * per_pos * cache.c_kv.element_size()
    assert isinstance(cache, KVCache)
    batch, heads = cache.k.shape[:2]
    return batch * n_read * heads * (cache.k.shape[-1] + cache.v.shape[-1]) * cache.k.element_size()


def capture(fn):
    """Record fn's kernels once in a CUDA graph (after warm-up on a side stream); return its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def median_ms(fn, device: torch.device, min_run_time: float) -> float:
    """Median milliseconds per call of fn, after warm-up, measured by the standard tools:
    ``triton.testing.do_bench`` on CUDA (CUDA events; the L2 cache is flushed before each call)
    and ``torch.utils.benchmark`` elsewhere (or on CUDA without triton), at torch's thread count."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            pass
        else:
            return do_bench(fn, warmup=max(1, int(min_run_time * 250)), rep=max(1, int(min_run_time * 1e3)),
                            return_mode="median")
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


@torch.inference_mode()
def time_context(layers, d: Dims, n_past: int, args, device, dtype):
    g = torch.Generator(device).manual_seed(args.seed + n_past)
    caches = random_caches(layers, args.batch, n_past, device, dtype, g)
    x = torch.randn(args.batch, 1, d.dim, device=device, generator=g).to(dtype)
    cos, sin = rope_cos_sin(rope_frequencies(d.qk_rope_head_dim).to(device), n_past + 1)
    rope = (cos[n_past:], sin[n_past:])                   # the row of the new token's position
    # Each step writes the new token at position n_past and attends over n_past + 1 positions;
    # repeating it rewrites the same slot, so every repeat does identical work.
    run = {name: (lambda name=name: layers[name](x, rope, n_past, caches[name])) for name in layers}
    outputs = {name: fn().float() for name, fn in run.items()}    # the two paths must agree before timing
    diff = (outputs["naive"] - outputs["absorb"]).abs().max().item() / outputs["naive"].abs().max().item()
    if args.cuda_graph:
        run = {name: capture(fn) for name, fn in run.items()}

    order = ["naive", "absorb"]
    times = {name: [] for name in order}
    for i in range(args.rounds):
        for name in (order if i % 2 == 0 else order[::-1]):    # take turns, so drift hits both
            times[name].append(median_ms(run[name], device, args.min_run_time / args.rounds))
    ms = {name: statistics.median(t) for name, t in times.items()}
    read = {name: cache_bytes_read(caches[name], n_past + 1) for name in order}
    return ms, read, diff


def main(argv=None) -> list[dict]:
    """Print the table; return its rows (context, ms and cache bytes read per path, relative difference)."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype, d = torch.device(args.device), DTYPES[args.dtype], DIMS[args.dims]
    layers = build_layers(d, device, dtype, args.seed)

    print(f"device: {device_name(device)}; torch {torch.__version__}; dtype {args.dtype}")
    print(f"dims '{args.dims}': {d}")
    print(f"cached values per token: naive {d.naive_values_per_token():,}, absorbed "
          f"{d.absorbed_values_per_token():,} ({d.naive_values_per_token() / d.absorbed_values_per_token():.1f}x "
          f"fewer); attention MACs per cached token: naive {d.naive_macs_per_token():,}, absorbed "
          f"{d.absorbed_macs_per_token():,} ({d.absorbed_macs_per_token() / d.naive_macs_per_token():.1f}x more)")
    unit = "ms/token" if args.batch == 1 else "ms/step"
    tool = "triton.testing.do_bench, L2 flushed" if device.type == "cuda" else "torch.utils.benchmark"
    print(f"one decode step = 1 new token for each of {args.batch} sequence(s)"
          f"{', replayed from a CUDA graph' if args.cuda_graph else ''}; "
          f"median over {args.rounds} rounds of {args.min_run_time:g} s per path ({tool})\n")
    header = (f"{'context':>8} | {'naive ' + unit:>14} | {'absorbed ' + unit:>17} | {'naive/absorbed':>14} | "
              f"{'naive cache read':>16} | {'absorbed cache read':>19} | {'rel. diff':>9}")
    print(header)
    print("-" * len(header))
    rows = []
    for n_past in args.contexts:
        ms, read, diff = time_context(layers, d, n_past, args, device, dtype)
        print(f"{n_past:>8} | {ms['naive']:>14.3f} | {ms['absorb']:>17.3f} | {ms['naive'] / ms['absorb']:>13.2f}x | "
              f"{read['naive'] / 2**20:>13.2f} MiB | {read['absorb'] / 2**20:>16.2f} MiB | {diff:>9.1e}")
        rows.append(dict(context=n_past, naive_ms=ms["naive"], absorb_ms=ms["absorb"], naive_bytes=read["naive"],
                         absorb_bytes=read["absorb"], rel_diff=diff))
    return rows


if __name__ == "__main__":
    main()
