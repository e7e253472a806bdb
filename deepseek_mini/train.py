"""Train a deepseek_mini model: the loop the notebooks call and ``python -m deepseek_mini.train`` runs.

One flat loop, in the spirit of nanoGPT/nanochat: sample a batch, forward, cross-entropy,
backward, clip, AdamW step, learning-rate schedule, periodic evaluation, checkpoints.
Optimiser settings follow DeepSeek-V3's pre-training (arXiv 2412.19437 §4.2): AdamW with
beta1 = 0.9, beta2 = 0.95, weight decay 0.1, gradient clipping at norm 1.0, linear warmup.
The paper holds the peak rate for most of training and then decays with a cosine; with a
few hundred steps we warm up and decay straight away (``lr_schedule``).

Honest simplifications for a CPU course: one process (chapter 06 adds pipeline and expert
parallelism), a fixed batch size (the paper ramps 3072 -> 15360 sequences), no FP8
(chapter 05). On CUDA the forward runs under bf16 autocast with float32 master weights.

Resume is exact: the checkpoint stores the model, the optimiser, the data sampler's RNG
state and the global RNG states, so ``steps=N`` straight and ``N/2 + resume + N/2`` give
bit-identical weights on the same machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from deepseek_mini.config import ModelConfig, load_config, preset_names
from deepseek_mini.data import (EOS_ID, Batcher, ByteTokenizer, TokenStream, eval_batches, make_datasets,
                                unigram_entropy)
from deepseek_mini.generate import generate
from deepseek_mini.model import build_model, count_parameters
from deepseek_mini.moe import balance_loss, max_violation, moe_layers, update_biases

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "evaluate_by_domain", "lr_schedule",
           "select_device", "save_checkpoint", "load_checkpoint", "main"]

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
SAMPLE_PROMPTS = ("37+25=", "sort: 9 4 7 1 -> ", "def add_4(x):\n", "the small ")
SAMPLE_TOKENS = 48


@dataclass
class TrainConfig:
    """Everything about a training run that is not the model's architecture."""

    steps: int = 800
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1          # final LR = lr * min_lr_ratio (the paper decays 2.2e-4 -> 2.2e-5)
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 16
    seed: int = 0
    device: str = "auto"
    data: str = "synthetic"            # "synthetic" or a path to a UTF-8 text file
    n_docs: int = 4000
    out_dir: str | None = None         # where checkpoints, metrics.jsonl and loss.png go
    checkpoint_every: int = 0          # also keep checkpoint-NNNNNN.pt every N steps (0: only the final one)
    progress: bool = True
    # DeepSeekMoE load balancing (§2.1.2; ignored by dense models). The defaults are V3's recipe:
    # the auxiliary-loss-free bias update plus a tiny sequence-wise balance loss.
    bias_update_speed: float = 0.001   # gamma; 0 turns the bias update off
    balance_loss: str = "sequence"     # "sequence" (eqs. 17-20), "batch" (conventional aux loss) or "none"
    balance_loss_alpha: float = 1e-4   # alpha (V3: 0.0001)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "n_docs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        for name in ("warmup_steps", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} ({getattr(self, name)!r}) must be an integer >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr ({self.lr}) must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio ({self.min_lr_ratio}) must be in [0, 1]")
        if not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1:
            raise ValueError(f"beta1 ({self.beta1}) and beta2 ({self.beta2}) must be in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError(f"weight_decay ({self.weight_decay}) must be >= 0 and grad_clip ({self.grad_clip}) > 0")
        if not self.bias_update_speed >= 0 or not self.balance_loss_alpha >= 0:
            raise ValueError(f"bias_update_speed ({self.bias_update_speed}) and balance_loss_alpha "
                             f"({self.balance_loss_alpha}) must be >= 0")
        if self.balance_loss not in ("sequence", "batch", "none"):
            raise ValueError(f"balance_loss ({self.balance_loss!r}) must be 'sequence', 'batch' or 'none'")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith("cuda:"):
            raise ValueError(f"device ({self.device!r}) must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")


@dataclass
class TrainResult:
    model: nn.Module
    history: dict[str, list[float]]
    model_config: ModelConfig
    train_config: TrainConfig
    unigram_entropy: float
    device: str
    out_dir: Path | None = None
    elapsed_s: float = 0.0


def select_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda, then Apple's mps, then cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def lr_schedule(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (weights stay float32); full float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norm gains, biases) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(model: nn.Module, batches: list, device: torch.device | str = "cpu") -> float:
    """Mean next-token cross-entropy (nats per token) over fixed evaluation batches."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y, _ in batches:
        with _autocast(device):
            total += _loss(model, x.to(device), y.to(device)).item()
    model.train(was_training)
    return total / len(batches)


@torch.no_grad()
def evaluate_by_domain(model: nn.Module, stream: TokenStream, batch_size: int = 16, seq_len: int = 128,
                       max_batches: int | None = None) -> dict[str, float]:
    """Validation loss per corpus domain (each target token counts for its document's domain)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = len(stream.domain_names)
    sums, counts = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for x, y, dom in eval_batches(stream, batch_size, seq_len, max_batches):
        with _autocast(device):
            logits = model(x.to(device))
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="none")
        sums.index_add_(0, dom.flatten(), losses.double().cpu())
        counts.index_add_(0, dom.flatten(), torch.ones_like(losses, dtype=torch.float64).cpu())
    model.train(was_training)
    return {name: (sums[i] / counts[i]).item() for i, name in enumerate(stream.domain_names) if counts[i] > 0}


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, batcher: Batcher,
                    step: int, model_config: ModelConfig, train_config: TrainConfig,
                    history: dict[str, list[float]]) -> Path:
    """Everything needed to continue bit-identically; written atomically (tmp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "batcher": batcher.state_dict(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "model_config": model_config.to_dict(), "train_config": asdict(train_config), "history": history,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``, with a clear error if it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file: say which and why
        raise ValueError(f"checkpoint {str(path)!r} could not be read: {exc}") from None
    missing = {"step", "model", "optimizer", "batcher", "model_config", "train_config"} - set(state)
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks {sorted(missing)}: not written by deepseek_mini.train")
    return state


def _truncate_metrics(out_dir: Path, keep_through_step: int) -> None:
    """Drop metrics records after the step a run (re)starts from, so a resume never duplicates."""
    path = out_dir / METRICS_NAME
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= keep_through_step]
    path.write_text("".join(line + "\n" for line in kept))


def _append_metrics(out_dir: Path | None, record: dict[str, Any]) -> None:
    if out_dir is not None:
        with open(out_dir / METRICS_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")


def train(model_config: ModelConfig | str, train_config: TrainConfig | None = None, *,
          data: tuple[TokenStream, TokenStream] | None = None, resume: str | Path | None = None) -> TrainResult:
    """Train a model from scratch, or continue the run saved at ``resume`` (a checkpoint or its folder).

    ``data`` = (train_stream, val_stream) skips building the corpus (the notebooks pass
    streams they already made). Returns the trained model and its loss history.
    """
    cfg = train_config or TrainConfig()
    cfg.validate()
    state = load_checkpoint(resume) if resume is not None else None
    model_config = load_config(model_config) if not isinstance(model_config, ModelConfig) else model_config
    if state is not None:
        model_config = ModelConfig.from_dict(state["model_config"], source=f"checkpoint {resume}")
    if cfg.seq_len > model_config.max_position_embeddings:
        raise ValueError(f"seq_len ({cfg.seq_len}) must be <= max_position_embeddings "
                         f"({model_config.max_position_embeddings}) of the model config")
    device = select_device(cfg.device)
    torch.manual_seed(cfg.seed)
    train_stream, val_stream = data if data is not None else make_datasets(cfg.data, cfg.n_docs, cfg.seed)
    model = build_model(model_config, device=device, seed=cfg.seed)
    optimizer = _make_optimizer(model, cfg)
    batcher = Batcher(train_stream, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    val_batches = eval_batches(val_stream, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    history: dict[str, list[float]] = {"step": [], "train_loss": [], "lr": [], "eval_step": [], "val_loss": []}
    is_moe = bool(moe_layers(model))
    if is_moe:   # per step: MaxVio of the batch (mean over MoE layers) and the balance loss added
        history |= {"maxvio": [], "balance_loss": []}
    start_step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        batcher.load_state_dict(state["batcher"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        history, start_step = state["history"], state["step"]
    out_dir = Path(cfg.out_dir) if cfg.out_dir else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(out_dir, start_step)
    baseline = unigram_entropy(train_stream)
    model.train()
    started = time.perf_counter()
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, disable=not cfg.progress,
               desc=f"train {model_config.num_hidden_layers}L d{model_config.hidden_size} on {device.type}",
               unit="step", dynamic_ncols=True)
    for step in bar:
        lr = lr_schedule(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y, _ = batcher.next_batch()
        with _autocast(device):
            loss = _loss(model, x.to(device), y.to(device))
            bal = balance_loss(model, cfg.balance_loss, cfg.balance_loss_alpha) if is_moe else None
        optimizer.zero_grad(set_to_none=True)
        (loss if bal is None else loss + bal).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        loss_value = loss.item()
        history["step"].append(step + 1)
        history["train_loss"].append(loss_value)
        history["lr"].append(lr)
        record: dict[str, Any] = {"step": step + 1, "train_loss": loss_value, "lr": lr,
                                  "tokens": (step + 1) * cfg.batch_size * cfg.seq_len}
        if is_moe:   # once per optimizer step, from the whole step's load (§2.1.2)
            loads = update_biases(model, cfg.bias_update_speed)
            record["maxvio"] = sum(max_violation(load) for load in loads) / len(loads)
            record["balance_loss"] = 0.0 if bal is None else bal.item()
            history["maxvio"].append(record["maxvio"])
            history["balance_loss"].append(record["balance_loss"])
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            val = evaluate(model, val_batches, device)
            history["eval_step"].append(step + 1)
            history["val_loss"].append(val)
            record["val_loss"] = val
            bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{val:.3f}",
                            **({"maxvio": f"{record['maxvio']:.2f}"} if is_moe else {}))
        _append_metrics(out_dir, record)
        if out_dir is not None:
            periodic = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0
            names = ([f"checkpoint-{step + 1:06d}.pt"] if periodic else []) + \
                ([CHECKPOINT_NAME] if step + 1 == cfg.steps else [])
            for name in names:
                save_checkpoint(out_dir / name, model, optimizer, batcher, step + 1, model_config, cfg, history)
    bar.close()
    return TrainResult(model=model, history=history, model_config=model_config, train_config=cfg,
                       unigram_entropy=baseline, device=str(device), out_dir=out_dir,
                       elapsed_s=time.perf_counter() - started)


def plot_losses(result: TrainResult, path: str | Path) -> Path:
    """Write the training and validation loss curves with the unigram baseline to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = result.history
    if "maxvio" in h:   # MoE: loss and expert balance side by side
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        ax2.plot(h["step"], h["maxvio"], lw=1)
        ax2.set(xlabel="step", ylabel="MaxVio (max load / mean load - 1)", title="expert load balance (lower is better)")
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(h["step"], h["train_loss"], lw=1, alpha=0.7, label="train")
    ax.plot(h["eval_step"], h["val_loss"], "o-", label="validation")
    ax.axhline(result.unigram_entropy, color="gray", ls="--", label="unigram entropy (no context)")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)",
           title=f"deepseek_mini: {result.model_config.num_hidden_layers}-layer model, d={result.model_config.hidden_size}")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m deepseek_mini.train",
        description="Train a deepseek_mini model on the built-in synthetic corpus (or your own text "
                    "file), print samples, and write metrics, a checkpoint and a loss plot.",
        epilog="examples:\n"
               "  python -m deepseek_mini.train                        # toy DeepSeek (MLA + MoE) on CPU, ~4 min on 2 cores\n"
               "  python -m deepseek_mini.train --steps 200 --out runs/quick\n"
               "  python -m deepseek_mini.train --data my_text.txt --config toy\n"
               "  python -m deepseek_mini.train --resume runs/toy      # continue a saved run\n"
               "  python -m deepseek_mini.train --config mini --device cuda --steps 5000",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--config", default="toy",
                       help=f"preset ({', '.join(preset_names())}) or path to a config.json (default: toy)")
    run = parser.add_argument_group("run")
    run.add_argument("--steps", type=int, default=defaults.steps, help=f"optimizer steps (default: {defaults.steps})")
    run.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"sequences per step (default: {defaults.batch_size})")
    run.add_argument("--seq-len", type=int, default=defaults.seq_len, help=f"tokens per sequence (default: {defaults.seq_len})")
    run.add_argument("--lr", type=float, default=defaults.lr, help=f"peak learning rate (default: {defaults.lr})")
    run.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help=f"linear warmup steps (default: {defaults.warmup_steps})")
    run.add_argument("--eval-every", type=int, default=defaults.eval_every, help=f"evaluate every N steps (default: {defaults.eval_every})")
    run.add_argument("--seed", type=int, default=defaults.seed, help="seed for data, initialisation and sampling (default: 0)")
    run.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps (default: auto)")
    moe = parser.add_argument_group("load balancing (MoE models only; DeepSeek-V3 §2.1.2)")
    moe.add_argument("--bias-update-speed", type=float, default=defaults.bias_update_speed, metavar="GAMMA",
                     help=f"aux-loss-free bias update speed gamma, 0 = off (default: {defaults.bias_update_speed})")
    moe.add_argument("--balance-loss", choices=("sequence", "batch", "none"), default=defaults.balance_loss,
                     help="balance loss: sequence-wise (eqs. 17-20), batch (conventional auxiliary loss) "
                          f"or none (default: {defaults.balance_loss})")
    moe.add_argument("--balance-alpha", type=float, default=defaults.balance_loss_alpha, metavar="ALPHA",
                     help=f"balance loss weight alpha (default: {defaults.balance_loss_alpha})")
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="synthetic", help="'synthetic' (built-in 4-domain corpus) or a UTF-8 text file")
    data.add_argument("--n-docs", type=int, default=defaults.n_docs, help=f"synthetic documents to generate (default: {defaults.n_docs})")
    out = parser.add_argument_group("output")
    out.add_argument("--out", default="runs/toy", help="folder for checkpoint.pt, metrics.jsonl and loss.png (default: runs/toy)")
    out.add_argument("--checkpoint-every", type=int, default=0,
                     help="also keep checkpoint-NNNNNN.pt every N steps (default: only checkpoint.pt at the end)")
    out.add_argument("--resume", metavar="PATH", help="continue from a checkpoint file or run folder")
    out.add_argument("--samples", type=int, default=len(SAMPLE_PROMPTS), help="prompts to complete at the end (default: 4)")
    out.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                      warmup_steps=args.warmup_steps, eval_every=args.eval_every, seed=args.seed,
                      device=args.device, data=args.data, n_docs=args.n_docs, out_dir=args.out,
                      checkpoint_every=args.checkpoint_every, progress=not args.no_progress,
                      bias_update_speed=args.bias_update_speed, balance_loss=args.balance_loss,
                      balance_loss_alpha=args.balance_alpha)
    try:
        model_config = load_config(args.config)
        result = train(model_config, cfg, resume=args.resume)
    except (ValueError, NotImplementedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = count_parameters(result.model)
    val = result.history["val_loss"][-1]
    print(f"\nmodel: {counts}")
    print(f"trained {cfg.steps} steps in {result.elapsed_s:.0f} s on {result.device}")
    print(f"validation loss {val:.3f} nats/token vs unigram entropy {result.unigram_entropy:.3f} "
          f"(a model that ignores context); {result.unigram_entropy - val:.3f} below it")
    if "maxvio" in result.history:
        last = result.history["maxvio"][-50:]
        print(f"expert load balance: MaxVio {sum(last) / len(last):.3f} over the last {len(last)} steps "
              f"(max/mean tokens per expert - 1; 0 = perfectly balanced)")
    tok = ByteTokenizer()
    device = next(result.model.parameters()).device
    print("\nsamples (greedy):")
    for prompt_text in SAMPLE_PROMPTS[:args.samples]:
        prompt = torch.tensor([tok.encode(prompt_text, bos=True)], device=device)
        room = result.model_config.max_position_embeddings - prompt.shape[1]
        out = generate(result.model, prompt, max_new_tokens=min(SAMPLE_TOKENS, room), temperature=0,
                       stop_token=EOS_ID)
        print(f"  {tok.decode(out[0])!r}")
    plot = plot_losses(result, Path(args.out) / "loss.png")
    print(f"\nloss plot:  {plot}")
    print(f"metrics:    {Path(args.out) / METRICS_NAME}")
    print(f"checkpoint: {Path(args.out) / CHECKPOINT_NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
