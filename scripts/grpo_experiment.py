"""Does GRPO raise reward on a CPU? The chapter 08 measurement, end to end (draft).

1. ``sft``: a supervised toy MoE (the toy preset cut to 2 layers, d = 64: layer 0 dense, layer 1
   DeepSeekMoE with 16 routed experts) trained by ``deepseek_mini.train`` on a corpus of the
   verifiable problems' own lines (``prompt + answer``), for few enough steps that its held-out
   greedy accuracy is non-trivial but imperfect. Writes ``OUT/sft`` (``checkpoint-NNNNNN.pt`` every
   ``--every`` steps) and prints each checkpoint's held-out accuracy.
2. ``rl``: GRPO / REINFORCE / GRPO with beta 0 from one SFT checkpoint, one run per (variant, seed),
   each in ``OUT/<variant>-s<seed>``, with held-out greedy accuracy before and after.
3. ``sanity``: GRPO (beta 0) on one fixed batch of problems, resampled every step: the loop's
   update direction, separated from the task's difficulty.
4. ``plot``: reward, accuracy, KL and completion length over steps for every run in OUT.
5. ``summarize``: the runs' metrics in 20-step windows and their held-out accuracy, as the JSON that
   notebook 08 loads (``notebooks/data/grpo_runs.json``).

    PYTHONPATH=. python scripts/grpo_experiment.py sft --out runs/grpo-exp --steps 200 --every 25 --keep 100
    PYTHONPATH=. python scripts/grpo_experiment.py rl --out runs/grpo-exp --steps 150 --lr 3e-4 --seeds 0,1
    PYTHONPATH=. python scripts/grpo_experiment.py sanity --steps 30 --lr 1e-3 --gamma 0
    PYTHONPATH=. python scripts/grpo_experiment.py plot --out runs/grpo-exp
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from deepseek_mini.config import load_config
from deepseek_mini.data import Document, tokenize_documents, train_val_split, verifiable_problems
from deepseek_mini.grpo import EVAL_SEED, GRPOConfig, evaluate_accuracy, grpo_step, load_policy, train_grpo
from deepseek_mini.runs import save_checkpoint
from deepseek_mini.train import TrainConfig, train

SFT_SEED = 0
VARIANTS = {   # name -> GRPOConfig overrides; equal samples: same steps, P and G for every variant
    "grpo": dict(algorithm="grpo", beta=0.04),
    "grpo-beta0": dict(algorithm="grpo", beta=0.0),
    "reinforce": dict(algorithm="reinforce", beta=0.0),
}


def problem_corpus(n_docs: int, seed: int, domains: tuple[str, ...], lines: int = 10) -> list[Document]:
    """Documents of ``lines`` solved problems each (``prompt + answer`` per line, as in the synthetic corpus)."""
    problems = verifiable_problems(n_docs * lines, seed=seed, domains=domains)
    return [Document("\n".join(p.prompt + p.answer for p in problems[i:i + lines]), problems[i].domain)
            for i in range(0, len(problems), lines)]


def sft(args: argparse.Namespace) -> None:
    docs = problem_corpus(args.n_docs, SFT_SEED, args.domains)
    train_docs, val_docs = train_val_split(docs, 0.1, seed=SFT_SEED)
    names = tuple(dict.fromkeys(d.domain for d in docs))
    data = (tokenize_documents(train_docs, domain_names=names), tokenize_documents(val_docs, domain_names=names))
    model_config = load_config("toy", num_hidden_layers=2, hidden_size=64)
    cfg = TrainConfig(steps=args.steps, batch_size=16, seq_len=64, lr=3e-3, warmup_steps=20, eval_every=50,
                      eval_batches=4, seed=SFT_SEED, device="cpu", checkpoint_every=args.every,
                      out_dir=str(args.out / "sft"), progress=False)
    result = train(model_config, cfg, data=data, overwrite=True)
    print(f"sft: {args.steps} steps in {result.elapsed_s:.0f} s, val loss {result.history['val_loss']}")
    held_out = verifiable_problems(args.eval, EVAL_SEED, args.domains)
    for path in sorted((args.out / "sft").glob("checkpoint-*.pt")):
        print(path.name, json.dumps(evaluate_accuracy(load_policy(path)[0], held_out, args.max_new_tokens)),
              flush=True)
    if args.keep:   # the chosen step's weights and config only (no optimizer): small enough to commit
        model, config = load_policy(args.out / "sft" / f"checkpoint-{args.keep:06d}.pt")
        print("kept", save_checkpoint(args.keep_path, model, step=args.keep, model_config=config))


def rl(args: argparse.Namespace) -> None:
    held_out = verifiable_problems(args.eval, EVAL_SEED, args.domains)
    before = evaluate_accuracy(load_policy(args.init)[0], held_out, args.max_new_tokens)
    print(f"before: {json.dumps(before)}", flush=True)
    for seed in args.seeds:
        for name in args.variants:
            cfg = GRPOConfig(init=str(args.init), steps=args.steps, prompts_per_step=args.prompts,
                             group_size=args.group_size, lr=args.lr, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, domains=args.domains, seed=seed,
                             out_dir=str(args.out / f"{name}-s{seed}"), progress=False, **VARIANTS[name])
            result = train_grpo(cfg, overwrite=True)
            after = evaluate_accuracy(result.model, held_out, args.max_new_tokens)
            h = result.history
            first, last = h[: max(1, len(h) // 5)], h[-max(1, len(h) // 5):]
            mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)   # noqa: E731
            summary = {"run": f"{name}-s{seed}", "before": before["accuracy"], "after": after["accuracy"],
                       "reward_first_fifth": mean(first, "reward"), "reward_last_fifth": mean(last, "reward"),
                       "kl_last": h[-1]["kl"], "length_last": mean(last, "completion_length"),
                       "maxvio_max": max(r["maxvio"] for r in h), "wall_s": round(result.elapsed_s, 1)}
            print(json.dumps(summary), flush=True)
            with open(args.out / "summary.jsonl", "a") as f:
                f.write(json.dumps(summary) + "\n")


def sanity(args: argparse.Namespace) -> None:
    """GRPO on one fixed batch of P problems, every step: the loop must raise their reward within tens of steps.

    This separates "the loop is wrong" from "the task is too hard / too few samples": the same batch
    is resampled each step (fresh completions), so success here shows the update direction is right.
    """
    from deepseek_mini.hooks import MoEBalancing

    fixed = verifiable_problems(args.prompts, seed=5, domains=args.domains)
    policy, _ = load_policy(args.init)
    print("problems:", [p.prompt + p.answer for p in fixed])
    print("greedy before:", json.dumps(evaluate_accuracy(policy, fixed, args.max_new_tokens)), flush=True)
    cfg = GRPOConfig(init=str(args.init), prompts_per_step=args.prompts, group_size=args.group_size, beta=0.0,
                     lr=args.lr, max_new_tokens=args.max_new_tokens, domains=args.domains,
                     bias_update_speed=args.gamma)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    balancing = MoEBalancing(args.gamma, "none", 0.0)
    for step in range(1, args.steps + 1):
        record = grpo_step(policy, None, optimizer, balancing, cfg, step, problems=fixed)
        if step % 5 == 0:
            print(json.dumps({k: round(v, 3) for k, v in record.items()}), flush=True)
    print("greedy after:", json.dumps(evaluate_accuracy(policy, fixed, args.max_new_tokens)))


def plot(args: argparse.Namespace) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("reward", "accuracy", "kl", "completion_length")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for run in sorted(p for p in args.out.iterdir() if (p / "metrics.jsonl").exists() and p.name != "sft"):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        variant = run.name.rsplit("-s", 1)[0]
        color = {"grpo": "C0", "grpo-beta0": "C1", "reinforce": "C2"}.get(variant, "C3")
        for ax, key in zip(axes, keys):
            if key == "kl" and variant != "grpo":
                continue                    # no reference model when beta = 0: KL is not measured
            values = [r[key] for r in records]
            smooth = [sum(values[max(0, i - 24):i + 1]) / len(values[max(0, i - 24):i + 1]) for i in range(len(values))]
            ax.plot([r["step"] for r in records], smooth, color=color, lw=1, label=run.name)
    for ax, key in zip(axes, keys):
        ax.set(xlabel="step", title=f"{key} (25-step mean)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "grpo_curves.png", dpi=110)
    print(args.out / "grpo_curves.png")


CURVE_KEYS = ("reward", "accuracy", "kl", "completion_length", "zero_std_fraction", "maxvio")


def _summary_of(run_dir: Path, window: int) -> dict:
    """A run's metrics.jsonl as means over ``window``-step windows, with its first/last-fifth reward."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fifth = max(1, len(records) // 5)
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)   # noqa: E731
    chunks = [records[i:i + window] for i in range(0, len(records), window)]
    curves = {"step": [c[-1]["step"] for c in chunks]}
    curves |= {k: [round(mean(c, k), 4) for c in chunks] for k in CURVE_KEYS}
    return {"steps": len(records), "reward_first_fifth": round(mean(records[:fifth], "reward"), 4),
            "reward_last_fifth": round(mean(records[-fifth:], "reward"), 4), "curves": curves}


def summarize(args: argparse.Namespace) -> None:
    """Write the notebook's stored results: every ``--runs NAME=DIR`` run's windowed metrics and its held-out
    greedy accuracy before/after (from DIR/../summary.jsonl, or ``--accuracy NAME=BEFORE,AFTER``)."""
    given = dict(item.split("=", 1) for item in args.accuracy)
    out = {"window": args.window, "runs": {}}
    for item in args.runs:
        name, run_dir = item.split("=", 1)
        run_dir = Path(run_dir)
        entry = _summary_of(run_dir, args.window)
        if name in given:
            entry["before"], entry["after"] = (float(x) for x in given[name].split(","))
        else:
            rows = [json.loads(line) for line in (run_dir.parent / "summary.jsonl").read_text().splitlines()]
            row = [r for r in rows if r["run"] == run_dir.name][-1]
            entry["before"], entry["after"] = row["before"], row["after"]
        out["runs"][name] = entry
    args.json.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(args.json, f"{args.json.stat().st_size / 1024:.0f} KiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("sft", "rl", "sanity", "plot", "summarize"))
    parser.add_argument("--out", type=Path, default=Path("runs/grpo-exp"))
    parser.add_argument("--domains", default="addition", help="comma-separated problem domains")
    parser.add_argument("--n-docs", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=25, help="sft: keep a checkpoint every N steps")
    parser.add_argument("--keep", type=int, default=100, help="sft: the step whose weights --keep-path gets (0 = none)")
    parser.add_argument("--keep-path", type=Path, default=Path("notebooks/data/toy_moe_addition_sft.pt"))
    parser.add_argument("--init", type=Path, default=Path("notebooks/data/toy_moe_addition_sft.pt"),
                        help="rl: the SFT checkpoint to start from")
    parser.add_argument("--variants", default="grpo,grpo-beta0,reinforce")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--eval", type=int, default=200, help="held-out problems")
    parser.add_argument("--gamma", type=float, default=0.001, help="sanity: MoE bias update speed")
    parser.add_argument("--runs", nargs="*", default=[], metavar="NAME=DIR", help="summarize: the runs to store")
    parser.add_argument("--accuracy", nargs="*", default=[], metavar="NAME=BEFORE,AFTER",
                        help="summarize: held-out accuracy of runs without a summary.jsonl line")
    parser.add_argument("--window", type=int, default=20, help="summarize: steps per curve point")
    parser.add_argument("--json", type=Path, default=Path("notebooks/data/grpo_runs.json"))
    args = parser.parse_args(argv)
    args.domains = tuple(args.domains.split(","))
    args.variants = args.variants.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    {"sft": sft, "rl": rl, "sanity": sanity, "plot": plot, "summarize": summarize}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
