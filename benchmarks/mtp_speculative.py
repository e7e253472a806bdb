"""Self-speculative decoding with the MTP module: acceptance rate and tokens/s against plain decoding.

What is measured (DeepSeek-V3 §5.4.3; chapter 04)
-------------------------------------------------
A model with one Multi-Token Prediction module (``num_nextn_predict_layers=1``, §2.2) is trained
on the synthetic corpus for ``--steps`` (``deepseek_mini.train``: the MTP loss is a default
hook), or loaded from a checkpoint that ``deepseek_mini.train`` wrote (``--checkpoint``). Then,
for each synthetic domain, ``--prompts`` fresh documents (drawn with their own seeds, not taken
from the training corpus) give prompts of ``--prompt-len`` tokens (BOS + the document's first
bytes), and each prompt is continued by ``--new-tokens`` tokens twice, greedily:

* ``plain``: ``deepseek_mini.generate.generate``, one main-model forward per token;
* ``speculative``: ``deepseek_mini.generate.speculative_generate``, where the MTP module drafts
  the token after next and one main-model forward over two positions verifies it; an accepted
  draft brings a bonus token.

Greedy speculative output must equal plain output token for token. In float32 a difference is an
error (the script stops); in bfloat16 the one-position and two-position forwards round
differently, so a near-tie between the two best tokens can flip, and the script counts such
prompts and prints the top-2 logit gap where the outputs part (``--strict`` makes it an error).

Columns: ``acceptance`` = drafts accepted / drafts proposed (the paper's "acceptance rate of the
second token"); ``tok/pass`` = tokens emitted per main-model decoding pass after the prefill
(1 for plain decoding, about 1 + acceptance for speculative); ``plain tok/s`` and
``spec tok/s`` = new tokens / seconds, each generation timed by the wall clock between two
``torch.cuda.synchronize()`` (on CUDA) after an untimed warm-up, the median of ``--repeats``
repeats (plain and speculative take turns), summed over the prompts; ``ratio`` = spec / plain.

Why a step is not free: the cost model
--------------------------------------
Speculative decoding wins only if a main-model pass over two positions costs about what a pass
over one costs, and the draft is cheap: the speed-up is about ``(1 + acceptance) * t1 / (t2 + td)``
with t1, t2 the pass times at one and two positions and td the MTP draft's. The script times
the three (``mla_decode.median_ms``: ``torch.utils.benchmark`` on CPU, ``triton.testing.do_bench``
on CUDA) and prints this prediction next to the measured ratio; the loop's own work (sampling from
one-hot distributions, one host read of the accept decision per step) is the rest. At batch 1 both
presets are bound by overhead, not arithmetic: a pass over two positions costs about what one costs
(measured 1.05x for the toy on a 2-core CPU, 1.07x for ``mini`` on an H200). What differs is the
draft: the toy's MTP module is one block beside four (about 0.3 of a pass on CPU), ``mini``'s one
beside sixteen (0.1), DeepSeek-V3's one beside 61. benchmarks/README.md has the numbers.

Examples
--------
    python benchmarks/mtp_speculative.py                                  # CPU: toy, a few minutes
    python benchmarks/mtp_speculative.py --device cuda                    # GPU: mini, bf16
    python benchmarks/mtp_speculative.py --steps 2000 --out-dir runs/mtp  # keep the trained model
    python benchmarks/mtp_speculative.py --checkpoint runs/mtp --json mtp.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from deepseek_mini import generate as gen
from deepseek_mini.config import ModelConfig, load_config
from deepseek_mini.data import DOMAINS, ByteTokenizer, generate_document, make_datasets
from deepseek_mini.model import build_model
from deepseek_mini.mtp import mtp_logits, new_mtp_cache
from deepseek_mini.runs import load_checkpoint
from deepseek_mini.train import TrainConfig, train

BENCHMARKS = str(Path(__file__).resolve().parent)
if BENCHMARKS not in sys.path:                 # benchmarks/ is no package: make its sibling scripts importable
    sys.path.insert(0, BENCHMARKS)
from mla_decode import device_name, median_ms  # noqa: E402  (the same timing as the MLA benchmark)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Training defaults per preset: the CPU toy finishes in a few minutes on two cores; mini trains a
# few minutes on one H200 in bf16 autocast (deepseek_mini.train picks CUDA and bf16 by itself).
PRESET_DEFAULTS = {
    "toy": dict(steps=300, batch_size=16, seq_len=64, lr=3e-3, warmup_steps=30, n_docs=4000),
    "mini": dict(steps=1500, batch_size=16, seq_len=512, lr=1e-3, warmup_steps=100, n_docs=40000),
}


def parse_args(argv=None) -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(
        prog="mtp_speculative.py",
        description="Train a model with one MTP module (or load one), then decode fresh prompts of each "
                    "synthetic domain greedily, plainly and self-speculatively (the MTP module drafts, the "
                    "main model verifies): acceptance rate, tokens per main-model pass, tokens/s and their "
                    "ratio, with outputs checked identical.",
        epilog="examples:\n"
               "  python benchmarks/mtp_speculative.py                                 # CPU, toy\n"
               "  python benchmarks/mtp_speculative.py --device cuda                   # GPU, mini, bf16\n"
               "  python benchmarks/mtp_speculative.py --steps 2000 --out-dir runs/mtp # keep the model\n"
               "  python benchmarks/mtp_speculative.py --checkpoint runs/mtp --json mtp.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(PRESET_DEFAULTS), default=None,
                        help="model preset, with one MTP module added (default: toy on CPU, mini on CUDA)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device,
                        help=f"where to train and decode (default here: {default_device})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weights and caches while decoding; training is float32 weights with bf16 "
                             "autocast on CUDA (default: bfloat16 on CUDA, float32 on CPU)")
    train_group = parser.add_argument_group("training (defaults depend on --config: toy | mini)")
    for name, help_text in (("steps", "optimizer steps"), ("batch_size", "sequences per step"),
                            ("seq_len", "tokens per sequence"), ("warmup_steps", "linear warm-up steps"),
                            ("n_docs", "synthetic documents in the corpus")):
        toy, mini = PRESET_DEFAULTS["toy"][name], PRESET_DEFAULTS["mini"][name]
        train_group.add_argument("--" + name.replace("_", "-"), type=int, default=None, metavar="N",
                                 help=f"{help_text} (default: {toy} | {mini})")
    train_group.add_argument("--lr", type=float, default=None,
                             help=f"peak learning rate (default: {PRESET_DEFAULTS['toy']['lr']:g} | "
                                  f"{PRESET_DEFAULTS['mini']['lr']:g})")
    train_group.add_argument("--out-dir", default=None, metavar="PATH",
                             help="also save the trained run there (checkpoint.pt, for --checkpoint)")
    train_group.add_argument("--checkpoint", default=None, metavar="PATH",
                             help="skip training: load a checkpoint (file or run folder) written by "
                                  "deepseek_mini.train from a model with an MTP module")
    decode = parser.add_argument_group("decoding")
    decode.add_argument("--domains", nargs="+", choices=DOMAINS, default=list(DOMAINS),
                        help="synthetic domains to measure (default: all four)")
    decode.add_argument("--prompts", type=int, default=None, metavar="N",
                        help="fresh documents (prompts) per domain (default: 4)")
    decode.add_argument("--prompt-len", type=int, default=20, metavar="N",
                        help="prompt tokens: BOS + the document's first bytes (default: 20)")
    decode.add_argument("--new-tokens", type=int, default=None, metavar="N",
                        help="tokens generated per prompt (default: 64 on CPU, 96 on CUDA)")
    decode.add_argument("--repeats", type=int, default=3,
                        help="timed repeats of each generation; the median is kept (default: 3)")
    decode.add_argument("--cost-time", type=float, default=0.5, metavar="SECONDS",
                        help="timed seconds for each pass of the cost model; 0 skips it (default: 0.5)")
    decode.add_argument("--strict", action="store_true",
                        help="stop on any speculative output that differs from plain greedy output "
                             "(always on in float32)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the corpus, training and prompts")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the machine, the settings, the training summary and every row as JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch.cuda.is_available() is False")
    args.config = args.config or ("mini" if args.device == "cuda" else "toy")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    for name, value in PRESET_DEFAULTS[args.config].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.prompts = args.prompts or 4
    args.new_tokens = args.new_tokens or (96 if args.device == "cuda" else 64)
    if min(args.steps, args.batch_size, args.seq_len, args.n_docs, args.prompts, args.repeats) < 1:
        parser.error("--steps, --batch-size, --seq-len, --n-docs, --prompts and --repeats must be >= 1")
    if args.prompt_len < 2 or args.new_tokens < 2:
        parser.error("--prompt-len and --new-tokens must be >= 2 (BOS + at least one byte; a draft needs "
                     "a second token)")
    if args.cost_time < 0 or not args.lr > 0:
        parser.error("--cost-time must be >= 0 and --lr > 0")
    if args.checkpoint is not None and args.out_dir is not None:
        parser.error("--checkpoint loads a trained model and --out-dir saves one: give one of them")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_model(path: str, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """A model with an MTP module from a checkpoint of ``deepseek_mini.train``, and what it says of its run."""
    state = load_checkpoint(path)
    config = ModelConfig.from_dict(state["model_config"], source=f"checkpoint {path!r}")
    if config.num_nextn_predict_layers < 1:
        raise ValueError(f"checkpoint {path!r} holds a model without an MTP module; train one with "
                         "`python -m deepseek_mini.train --mtp-depth 1` or let this script train it")
    model = build_model(config, device=device)
    model.load_state_dict(state["model"])
    settings = state.get("train_config") or {}
    history = state.get("history") or {}
    return model, dict(source=f"checkpoint {path}", steps=state.get("step"),
                       tokens=(state.get("step") or 0) * settings.get("batch_size", 0) * settings.get("seq_len", 0),
                       val_loss=(history.get("val_loss") or [None])[-1], config=config)


def train_model(args, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Train the preset with one MTP module on the synthetic corpus (deepseek_mini.train)."""
    config = load_config(args.config, num_nextn_predict_layers=1)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                      warmup_steps=min(args.warmup_steps, args.steps), eval_every=max(1, args.steps // 4),
                      eval_batches=8, seed=args.seed, device=device.type, n_docs=args.n_docs,
                      out_dir=args.out_dir, progress=False)
    data = make_datasets("synthetic", n_docs=args.n_docs, seed=args.seed)
    result = train(config, cfg, data=data, overwrite=args.out_dir is not None)
    h = result.history
    return result.model, dict(source="trained here", steps=args.steps, tokens=args.steps * args.batch_size * args.seq_len,
                              seconds=result.elapsed_s, train_loss=h["train_loss"][-1], val_loss=h["val_loss"][-1],
                              mtp_loss_1=h["mtp_loss_1"][-1], unigram_entropy=result.unigram_entropy, config=config)


def make_prompts(domain: str, n: int, length: int, seed: int) -> list[torch.Tensor]:
    """n prompts of ``length`` tokens: BOS + the first bytes of fresh documents of ``domain``
    (each drawn from its own seed, so not the training corpus's; a short one is padded with
    another document's opening)."""
    tokenizer, prompts = ByteTokenizer(), []
    for i in range(n):
        rng = random.Random(f"mtp-speculative-{seed}-{domain}-{i}")
        ids = tokenizer.encode(generate_document(domain, rng).text, bos=True)
        while len(ids) < length:
            ids += tokenizer.encode(generate_document(domain, rng).text, bos=True)
        prompts.append(torch.tensor(ids[:length], dtype=torch.long))
    return prompts


def timed(fn, device: torch.device):
    """fn()'s result and its wall-clock seconds, with the GPU's queue drained before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def top2_gap(model: torch.nn.Module, sequence: torch.Tensor, index: int) -> float:
    """The main model's top-1 minus top-2 logit for the token at ``index`` of ``sequence`` (one
    full forward, no cache): small where greedy decoding hangs on a near-tie."""
    with torch.no_grad():
        logits = model(sequence[None, :index])[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def measure_domain(model: torch.nn.Module, prompts: list[torch.Tensor], args, device: torch.device) -> dict:
    """Decode every prompt plainly and speculatively (greedy), check the outputs, time both."""
    n = args.new_tokens
    run_plain = lambda p: gen.generate(model, p[None], n, temperature=0.0)[0]          # noqa: E731
    run_spec = lambda p: gen.speculative_generate(model, p, n, temperature=0.0, return_stats=True)  # noqa: E731
    prompts = [p.to(device) for p in prompts]
    run_plain(prompts[0]), run_spec(prompts[0])               # warm-up (allocator, kernels), untimed
    drafted = accepted = forwards = emitted = 0
    plain_s = spec_s = 0.0
    mismatches = []
    for k, prompt in enumerate(prompts):
        times = {"plain": [], "spec": []}
        plain_out = spec_out = stats = None
        for r in range(args.repeats):
            for name in (("plain", "spec") if r % 2 == 0 else ("spec", "plain")):   # take turns
                if name == "plain":
                    plain_out, seconds = timed(lambda: run_plain(prompt), device)
                else:
                    (spec_out, stats), seconds = timed(lambda: run_spec(prompt), device)
                times[name].append(seconds)
        plain_s += statistics.median(times["plain"])
        spec_s += statistics.median(times["spec"])
        drafted, accepted, forwards = drafted + stats.drafted, accepted + stats.accepted, forwards + stats.forwards
        emitted += n - 1                                       # tokens after the one the prefill gives
        if not torch.equal(plain_out, spec_out):
            differ = (plain_out != spec_out).nonzero()
            index = int(differ[0]) if len(differ) else min(len(plain_out), len(spec_out))
            gap = top2_gap(model, plain_out, index)
            if args.strict or args.dtype == "float32":
                raise AssertionError(f"speculative output differs from plain greedy output (prompt {k}, new token "
                                     f"{index - len(prompt)}, top-2 logit gap {gap:.3g}): a bug, not rounding")
            mismatches.append(dict(prompt=k, new_token=index - len(prompt), top2_gap=gap))
    return dict(prompts=len(prompts), new_tokens=n, drafted=drafted, accepted=accepted, forwards=forwards,
                acceptance=accepted / drafted if drafted else 0.0,
                tokens_per_pass=emitted / forwards if forwards else 0.0,
                plain_tok_s=len(prompts) * n / plain_s, spec_tok_s=len(prompts) * n / spec_s,
                ratio=plain_s / spec_s, identical=len(prompts) - len(mismatches), mismatches=mismatches)


@torch.no_grad()
def pass_costs(model: torch.nn.Module, context: int, args, device: torch.device) -> dict:
    """Milliseconds of one main-model decoding pass over 1 and over 2 new positions, and of one
    MTP draft (1 position), each after ``context`` cached tokens: the cost model of a step."""
    model.eval()
    g = torch.Generator().manual_seed(args.seed)
    prefix = torch.randint(0, 256, (1, context), generator=g).to(device)
    cache, mtp_cache = model.new_cache(1, context + 2), new_mtp_cache(model, 1, context + 2)
    hidden = model.hidden_states(prefix, 0, cache)
    mtp_logits(model, hidden, prefix, 0, mtp_cache)
    x1, x2 = prefix[:, -1:], prefix[:, -2:]
    h1 = hidden[:, -1:]
    # Each call writes the same cache slots again, so every repeat does the same work.
    calls = {"one": lambda: model(x1, context, cache),
             "two": lambda: model(x2, context, cache),
             "draft": lambda: mtp_logits(model, h1, x1, context, mtp_cache)}
    return {name: median_ms(fn, device, args.cost_time) for name, fn in calls.items()}


def table_header() -> str:
    header = (f"{'domain':<11}| {'acceptance':>10} | {'accepted':>11} | {'tok/pass':>8} | {'plain tok/s':>11} | "
              f"{'spec tok/s':>10} | {'ratio':>6} | {'identical':>9}")
    return header + "\n" + "-" * len(header)


def table_row(r: dict) -> str:
    return (f"{r['domain']:<11}| {r['acceptance']:>10.1%} | {r['accepted']:>5}/{r['drafted']:<5} | "
            f"{r['tokens_per_pass']:>8.2f} | {r['plain_tok_s']:>11.1f} | {r['spec_tok_s']:>10.1f} | "
            f"{r['ratio']:>5.2f}x | {r['identical']:>4}/{r['prompts']:<4}")


def main(argv=None) -> dict:
    """Train or load, measure every domain, print the table; return the rows and the run's summary."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.checkpoint is not None:
        model, run = load_model(args.checkpoint, device)
    else:
        model, run = train_model(args, device)
    config = run.pop("config")
    if args.prompt_len + args.new_tokens + 1 > config.max_position_embeddings:
        raise ValueError(f"--prompt-len ({args.prompt_len}) + --new-tokens ({args.new_tokens}) + 1 exceeds the "
                         f"model's max_position_embeddings ({config.max_position_embeddings})")
    model = model.to(device=device, dtype=dtype).eval()

    print(f"device: {device_name(device)}; torch {torch.__version__}; decoding in {args.dtype}")
    trained = (f"{run['steps']} steps x {args.batch_size} x {args.seq_len} tokens = {run['tokens']:,} tokens in "
               f"{run['seconds']:.0f} s; final train loss {run['train_loss']:.3f}, MTP depth-1 loss "
               f"{run['mtp_loss_1']:.3f}, validation loss {run['val_loss']:.3f} nats/token (unigram "
               f"{run['unigram_entropy']:.3f})" if run["source"] == "trained here" else
               f"{run['steps']} steps, {run['tokens']:,} tokens")
    print(f"model: '{args.config if args.checkpoint is None else 'checkpoint'}' with one MTP module, "
          f"{config.num_hidden_layers} layers, d={config.hidden_size}; {run['source']}: {trained}")
    print(f"greedy, {args.prompts} fresh prompts of {args.prompt_len} tokens per domain, {args.new_tokens} new tokens "
          f"each; time = median of {args.repeats} wall-clock repeats{' (CUDA-synchronized)' if device.type == 'cuda' else ''}"
          f", after one untimed warm-up, summed over the prompts\n")
    print(table_header())
    rows = []
    for domain in args.domains:                                # each row printed as soon as it is measured
        row = dict(domain=domain, **measure_domain(model, make_prompts(domain, args.prompts, args.prompt_len,
                                                                        args.seed), args, device))
        rows.append(row)
        print(table_row(row), flush=True)
    total = {key: sum(r[key] for r in rows) for key in ("prompts", "drafted", "accepted", "forwards", "identical")}
    plain_s = sum(r["prompts"] * r["new_tokens"] / r["plain_tok_s"] for r in rows)
    spec_s = sum(r["prompts"] * r["new_tokens"] / r["spec_tok_s"] for r in rows)
    tokens = sum(r["prompts"] * r["new_tokens"] for r in rows)
    overall = dict(domain="all", **total, new_tokens=args.new_tokens, acceptance=total["accepted"] / total["drafted"],
                   tokens_per_pass=sum(r["prompts"] * (r["new_tokens"] - 1) for r in rows) / total["forwards"],
                   plain_tok_s=tokens / plain_s, spec_tok_s=tokens / spec_s, ratio=plain_s / spec_s,
                   mismatches=[m for r in rows for m in r["mismatches"]])
    print(table_row(overall))
    for r in rows:
        for m in r["mismatches"]:
            print(f"  {r['domain']}, prompt {m['prompt']}: outputs part at new token {m['new_token']}, where the "
                  f"main model's top-2 logits are {m['top2_gap']:.3g} apart ({args.dtype} rounding of a near-tie)")

    costs = None
    if args.cost_time > 0:
        context = args.prompt_len + args.new_tokens // 2
        costs = pass_costs(model, context, args, device)
        alpha = overall["acceptance"]
        costs.update(context=context, predicted_ratio=(1 + alpha) * costs["one"] / (costs["two"] + costs["draft"]))
        print(f"\ncost model at {context} cached tokens ({'triton.testing.do_bench' if device.type == 'cuda' else 'torch.utils.benchmark'}): "
              f"main-model pass over 1 position {costs['one']:.3f} ms, over 2 positions {costs['two']:.3f} ms "
              f"({costs['two'] / costs['one']:.2f}x), MTP draft {costs['draft']:.3f} ms "
              f"({costs['draft'] / costs['one']:.2f}x of a pass)")
        print(f"predicted speed-up (1 + acceptance) x t1 / (t2 + t_draft) = {costs['predicted_ratio']:.2f}x; "
              f"measured {overall['ratio']:.2f}x (the rest is the loop's own overhead: sampling from one-hot "
              f"distributions and one host read of the accept decision per step)")

    result = dict(device=device_name(device), torch=torch.__version__,
                  settings={k: v for k, v in vars(args).items() if k != "json"},
                  training={k: v for k, v in run.items()}, rows=rows, overall=overall, pass_costs_ms=costs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
