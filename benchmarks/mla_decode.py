"""Time one MLA decode step, naive against absorbed, as the context grows.

What is measured
----------------
One Multi-head Latent Attention layer (``deepseek_mini.mla.MLA``) decodes a single new token
against a cache that already holds N past tokens. The caches are filled with random values
directly (the model is not run to prefill them: only the attention over N cached positions
matters here, not what they contain). Both paths use the same weights, dtype, device and
thread count, run in the same process, alternate within each repeat, and are warmed up first;
the table reports the median of the repeats.

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
    python benchmarks/mla_decode.py --contexts 512 2048 8192 --repeats 50
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
import time
from dataclasses import dataclass

import torch

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
               "  python benchmarks/mla_decode.py --contexts 512 8192 --repeats 50\n"
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
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per path and context (default: 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: 5)")
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
    if min(args.contexts) < 1 or args.repeats < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("contexts, repeats and batch must be >= 1, warmup >= 0")
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
    with torch.device("meta"):
        absorb = MLA(d.dim, d.n_heads, d.kv_lora_rank, d.q_lora_rank, d.qk_nope_head_dim,
                     d.qk_rope_head_dim, d.v_head_dim, attn_impl="absorb")
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
        naive = MLA(d.dim, d.n_heads, d.kv_lora_rank, d.q_lora_rank, d.qk_nope_head_dim,
                    d.qk_rope_head_dim, d.v_head_dim, attn_impl="naive")
    naive = naive.to_empty(device=device).to(dtype).eval()
    naive.load_state_dict(absorb.state_dict())
    return {"naive": naive, "absorb": absorb}


def random_cache(layer: MLA, batch: int, n_past: int, device, dtype, g: torch.Generator):
    """A cache for n_past + 1 positions whose first n_past hold random values."""
    cache = layer.new_cache(batch, n_past + 1, device=device, dtype=dtype)
    tensors = (cache.c_kv, cache.k_rope) if isinstance(cache, LatentCache) else (cache.k, cache.v)
    for t in tensors:
        view = t[:, :n_past] if isinstance(cache, LatentCache) else t[:, :, :n_past]
        view.copy_(torch.randn(view.shape, device=device, generator=g, dtype=torch.float32).to(dtype))
    return cache


def cache_bytes_read(cache, n_read: int) -> int:
    """Bytes of cache the step reads: every cached position up to and including the new one."""
    if isinstance(cache, LatentCache):
        per_pos = cache.c_kv.shape[-1] + cache.k_rope.shape[-1]
        return cache.c_kv.shape[0] * n_read * per_pos * cache.c_kv.element_size()
    assert isinstance(cache, KVCache)
    batch, heads = cache.k.shape[:2]
    return batch * n_read * heads * (cache.k.shape[-1] + cache.v.shape[-1]) * cache.k.element_size()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


@torch.inference_mode()
def time_context(layers, d: Dims, n_past: int, args, device, dtype):
    g = torch.Generator(device).manual_seed(args.seed + n_past)
    caches = {name: random_cache(layer, args.batch, n_past, device, dtype, g) for name, layer in layers.items()}
    x = torch.randn(args.batch, 1, d.dim, device=device, generator=g).to(dtype)
    cos, sin = rope_cos_sin(rope_frequencies(d.qk_rope_head_dim).to(device), n_past + 1)
    rope = (cos[n_past:], sin[n_past:])                   # the row of the new token's position
    # Each step writes the new token at position n_past and attends over n_past + 1 positions;
    # repeating it rewrites the same slot, so every repeat does identical work.
    run = {name: (lambda name=name: layers[name](x, rope, n_past, caches[name])) for name in layers}
    if args.cuda_graph:
        run = {name: capture(fn) for name, fn in run.items()}

    def step(name: str) -> float:
        sync(device)
        t0 = time.perf_counter()
        run[name]()
        sync(device)
        return time.perf_counter() - t0

    order = ["naive", "absorb"]
    for _ in range(args.warmup):
        for name in order:
            step(name)
    times = {name: [] for name in order}
    for i in range(args.repeats):
        for name in (order if i % 2 == 0 else order[::-1]):    # alternate, so drift hits both
            times[name].append(step(name))
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    read = {name: cache_bytes_read(caches[name], n_past + 1) for name in order}
    return ms, read


def main(argv=None) -> None:
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
    print(f"one decode step = 1 new token for each of {args.batch} sequence(s)"
          f"{', replayed from a CUDA graph' if args.cuda_graph else ''}; "
          f"median of {args.repeats} repeats after {args.warmup} warm-up\n")
    header = (f"{'context':>8} | {'naive ' + unit:>14} | {'absorbed ' + unit:>17} | {'naive/absorbed':>14} | "
              f"{'naive cache read':>16} | {'absorbed cache read':>19}")
    print(header)
    print("-" * len(header))
    for n_past in args.contexts:
        ms, read = time_context(layers, d, n_past, args, device, dtype)
        print(f"{n_past:>8} | {ms['naive']:>14.3f} | {ms['absorb']:>17.3f} | {ms['naive'] / ms['absorb']:>13.2f}x | "
              f"{read['naive'] / 2**20:>13.2f} MiB | {read['absorb'] / 2**20:>16.2f} MiB")


if __name__ == "__main__":
    main()
