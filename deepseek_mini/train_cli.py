"""The training command line: ``python -m deepseek_mini.train`` (also ``deepseek-mini-train``).

It turns flags into a model config and ``TrainConfig``, runs ``deepseek_mini.train``'s loop
in a locked run folder, then reports: a summary, the loss plot, the metrics and checkpoint
paths, and greedy samples from the trained model. The defaults train the toy DeepSeek (MLA
and DeepSeekMoE) with DeepSeek-V3's optimiser settings (arXiv 2412.19437 §4.2) and its
load-balancing recipe (§2.1.2). ``deepseek_mini.train.main`` calls ``main`` here, so the
command keeps its module's name.

The options that are training settings are generated from ``TrainConfig``'s field
declarations (help text, flag, group, and whether a resume must keep the setting), so each
is declared once. Every option defaults to None, so that a flag the user typed is told apart
from a default:
on ``--resume`` the checkpoint's model and settings are restored, and a typed flag that
would change them (``RESUME_FIXED`` in ``deepseek_mini.train``) is an error naming the flag,
both values and why the setting is fixed.

Exit status: 0 done; 2 something to change (flags, config, folder, device, a sample prompt
longer than the model's context: all checked before training); 1 a failure while running;
130 Ctrl-C / 143 SIGTERM (128 + the signal, the shell's convention), after saving the last
whole step and printing the command that resumes.
Every error is one ``error: ...`` line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from dataclasses import fields
from pathlib import Path

import torch

from deepseek_mini.config import ModelConfig, load_config, preset_names
from deepseek_mini.data import EOS_ID, ByteTokenizer
from deepseek_mini.generate import generate
from deepseek_mini.model import count_parameters
from deepseek_mini.runs import (CHECKPOINT_NAME, METRICS_NAME, PLOT_NAME, config_differences, find_checkpoint,
                                peek_checkpoint, same_setting)
from deepseek_mini.train import (DEFAULT_OUT, RESUME_FIXED, TrainConfig, TrainingInterrupted, TrainResult, _flag, _lock,
                                 _plan, _run, _saved_train_config, plot_losses)

__all__ = ["main"]

SAMPLE_PROMPTS = ("37+25=", "sort: 9 4 7 1 -> ", "def add_4(x):\n", "the small ")
SAMPLE_TOKENS = 48
EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130   # 130 = 128 + SIGINT, the shell's convention (SIGTERM: 143)


_GROUPS = {   # TrainConfig declarations' groups -> titles, in --help order ("model" holds --config only)
    "model": "model",
    "run": "run",   # titled with the flags a resume may change, below
    "optimizer": "optimizer (AdamW, DeepSeek-V3 §4.2; on --resume: the checkpoint's)",
    "balancing": "load balancing (MoE models only; DeepSeek-V3 §2.1.2)",
    "mtp": "multi-token prediction (DeepSeek-V3 §2.2, §4.2; the lambdas act only when D > 0)",
    "data": "data",
    "output": "output",
    "parallel": "parallel (under torchrun: one process per GPU, or gloo processes on a CPU; chapter 06)",
}
_ARG_TYPES = {"int": int, "float": float}   # TrainConfig annotations (strings: `from __future__ import annotations`)


def _help(f: dataclasses.Field) -> str:
    """A field's help text with its default: at ``{default}``, else appended; bool flags show none."""
    text, shown = f.metadata["help"], f.metadata["shown"]
    if isinstance(f.default, bool):
        return text
    default = shown if shown is not None else f.default
    return text.format(default=default) if "{default}" in text else f"{text} (default: {default})"


def _parser() -> argparse.ArgumentParser:
    """The options: one per ``TrainConfig`` field, generated from its declaration, plus the five
    that are not training settings (--config and --mtp-depth, which pick the model config,
    --overwrite, --resume, --samples).

    Every option defaults to None, so that ``main`` can tell a flag the user typed from a default.
    """
    parser = argparse.ArgumentParser(
        prog="python -m deepseek_mini.train",
        description="Train a deepseek_mini model on the built-in synthetic corpus (or your own text "
                    "file), write metrics, a checkpoint and a loss plot, and print samples.",
        epilog="examples:\n"
               "  python -m deepseek_mini.train                        # toy DeepSeek (MLA + MoE) on CPU, ~4 min on 2 cores\n"
               "  python -m deepseek_mini.train --steps 200 --out runs/quick\n"
               "  python -m deepseek_mini.train --data my_text.txt --out runs/mine\n"
               "  python -m deepseek_mini.train --resume runs/toy      # continue a stopped run (Ctrl-C saves one)\n"
               "  python -m deepseek_mini.train --resume runs/toy --steps 1600   # train a finished run further\n"
               "  python -m deepseek_mini.train --mtp-depth 1 --out runs/mtp   # the toy + one MTP module (chapter 04)\n"
               "  python -m deepseek_mini.train --config mini --device cuda --steps 5000 --out runs/mini\n"
               "  torchrun --nproc-per-node 4 -m deepseek_mini.train --pp 2 --ep 2 --schedule dualpipev --out runs/pp\n"
               "  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\\n"
               "      -m deepseek_mini.train --pp 4 --out /shared/runs/big   # on every node\n"
               "\n"
               "Under torchrun the run is parallel: --pp stages (pipeline), the other processes / pp ranks\n"
               "data parallel (FSDP2), groups of --ep of them splitting the routed experts (all-to-all);\n"
               "NCCL with one GPU per process when CUDA is available, else gloo on the CPU. Each step's\n"
               "loss equals one process's on the same --batch-size; checkpoints are sharded\n"
               "(checkpoint.dcp/) and resume under any layout (another --pp or --ep, more processes).\n"
               "\n"
               "A folder that holds a run is never silently replaced: pass --overwrite, --resume it or\n"
               "choose another --out. --resume restores the checkpoint's model and settings; a flag that\n"
               "would change them (--config, --seed, --lr, ...) is an error. Ctrl-C (or SIGTERM) finishes\n"
               "the step, saves a checkpoint and prints the command that resumes (exit status 130, 143).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    settings = fields(TrainConfig)
    changeable = [_flag(f) for f in settings if f.metadata["group"] == "run" and f.name not in RESUME_FIXED]
    titles = dict(_GROUPS, run=f"run (on --resume: the checkpoint's, except {', '.join(changeable)})")
    groups = {key: parser.add_argument_group(title) for key, title in titles.items()}
    groups["model"].add_argument(
        "--config", metavar="NAME_OR_PATH",
        help=f"preset ({', '.join(preset_names())}) or path to a config.json (default: toy; on --resume, "
             "the checkpoint's)")
    groups["mtp"].add_argument(
        "--mtp-depth", type=int, metavar="D",
        help="MTP depth D, the model config's num_nextn_predict_layers: each position also learns to predict "
             "the D tokens after the next (default: the config's, 0 in every preset but deepseek-v3, which has "
             "V3's 1; on --resume, the checkpoint's)")
    for f in sorted(settings, key=lambda f: list(_GROUPS).index(f.metadata["group"])):   # usage in --help order
        meta, group = f.metadata, groups[f.metadata["group"]]
        if isinstance(f.default, bool):   # the flag turns the setting to the other value
            group.add_argument(_flag(f), dest=f.name, action="store_const", const=not f.default, help=_help(f))
        else:
            group.add_argument(_flag(f), dest=f.name, type=_ARG_TYPES.get(f.type), metavar=meta["metavar"],
                               choices=meta["choices"], help=_help(f))
    out = groups["output"]
    out.add_argument("--overwrite", action="store_true",
                     help="replace the run already in --out (its checkpoints, metrics and plot are deleted)")
    out.add_argument("--resume", metavar="PATH",
                     help="continue a run: a checkpoint file, or a run folder (its newest checkpoint)")
    out.add_argument("--samples", type=int, metavar="N",
                     help=f"prompts to complete at the end, 0 to {len(SAMPLE_PROMPTS)} (default: {len(SAMPLE_PROMPTS)})")
    return parser


def _cli_configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig, Path | None]:
    """Model config, training settings and checkpoint from the flags the user typed.

    Fresh run: typed flags over ``TrainConfig`` defaults (``--out`` defaults to ``runs/toy``).
    Resume: the checkpoint's config and settings; a typed flag that would change one of
    ``RESUME_FIXED`` is an error naming the flag. The others (``--steps``, ``--device``,
    ``--out``, ...) apply; the progress bar shows unless ``--no-progress``.
    """
    flags = {f.name: _flag(f) for f in fields(TrainConfig)}
    given = {name: getattr(args, name) for name in flags if getattr(args, name) is not None}
    depth = {} if args.mtp_depth is None else {"num_nextn_predict_layers": args.mtp_depth}
    if args.mtp_depth is not None and args.mtp_depth < 0:
        raise ValueError(f"--mtp-depth ({args.mtp_depth}) must be >= 0 (0: no MTP modules)")
    if args.resume is None:
        cfg = TrainConfig(**{"out_dir": DEFAULT_OUT, **given})
        return load_config(args.config or "toy", **depth), cfg, None
    checkpoint = find_checkpoint(args.resume)
    meta = peek_checkpoint(checkpoint)
    saved = _saved_train_config(meta, checkpoint)
    saved_model = ModelConfig.from_dict(meta["model_config"], source=f"checkpoint {str(checkpoint)!r}")
    typed = {flag: value for flag, value in (("--config", args.config), ("--mtp-depth", args.mtp_depth))
             if value is not None}
    asked = load_config(args.config or saved_model, **depth) if typed else saved_model
    if asked != saved_model:
        diff = config_differences(asked, saved_model)
        raise ValueError(f"{' '.join(f'{flag} {value}' for flag, value in typed.items())} differs from the "
                         f"checkpoint's model ({'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''}); --resume "
                         f"restores the checkpoint's model: drop {' and '.join(typed)}")
    for name, value in given.items():
        if name in RESUME_FIXED and not same_setting(name, value, getattr(saved, name)):
            raise ValueError(f"{flags[name]} {value} differs from the checkpoint's {getattr(saved, name)}; "
                             f"{RESUME_FIXED[name][1]} (drop the flag to continue the run, or start a new run "
                             "without --resume)")
    steps = given.get("steps", saved.steps)
    if steps <= meta["step"]:
        raise ValueError(f"--steps {steps} must be greater than the checkpoint's step ({meta['step']}): "
                         f"{'the run in ' + repr(str(checkpoint)) + ' is finished; ' if 'steps' not in given else ''}"
                         f"pass --steps N with N > {meta['step']} to train further")
    changeable = {name: value for name, value in given.items() if name not in RESUME_FIXED}
    cfg = dataclasses.replace(saved, **{"out_dir": str(checkpoint.parent), "progress": True, **changeable})
    return saved_model, cfg, checkpoint


def _check_samples(n: int, config: ModelConfig) -> None:
    """Each sample prompt must leave room for a generated token in the model's context."""
    if not 0 <= n <= len(SAMPLE_PROMPTS):
        raise ValueError(f"--samples ({n}) must be between 0 and {len(SAMPLE_PROMPTS)}")
    tok = ByteTokenizer()
    for i, text in enumerate(SAMPLE_PROMPTS[:n]):
        length = len(tok.encode(text, bos=True))
        if length >= config.max_position_embeddings:
            raise ValueError(f"sample prompt {i + 1} ({text!r}, {length} tokens) does not fit the model's context "
                             f"(max_position_embeddings {config.max_position_embeddings}); pass --samples {i}")


def _print_samples(result: TrainResult, n: int) -> None:
    tok = ByteTokenizer()
    device = next(result.model.parameters()).device
    print("\nsamples (greedy):")
    for text in SAMPLE_PROMPTS[:n]:
        prompt = torch.tensor([tok.encode(text, bos=True)], device=device)
        room = result.model_config.max_position_embeddings - prompt.shape[1]
        out = generate(result.model, prompt, max_new_tokens=min(SAMPLE_TOKENS, room), temperature=0,
                       stop_token=EOS_ID)
        print(f"  {tok.decode(out[0])!r}")


def _report(result: TrainResult, samples: int) -> None:
    """Summary, then the files (written first), then samples: a failing sample loses nothing.
    A parallel run's model is spread over the ranks, so it reports from rank 0 and samples nothing."""
    cfg, h, out = result.train_config, result.history, result.out_dir
    if result.layout is not None and os.environ.get("RANK", "0") != "0":
        return
    print(f"\nmodel: {count_parameters(result.model_config if result.layout else result.model)}")
    if result.layout is not None:
        print(f"parallel: {result.layout}")
    trained = f"steps {result.start_step + 1}-{cfg.steps}" if result.start_step else f"{cfg.steps} steps"
    print(f"trained {trained} in {result.elapsed_s:.0f} s on {result.device}")
    val = h["val_loss"][-1]
    print(f"validation loss {val:.3f} nats/token vs unigram entropy {result.unigram_entropy:.3f} "
          f"(a model that ignores context); {result.unigram_entropy - val:.3f} below it")
    if "maxvio" in h:
        last = h["maxvio"][-50:]
        print(f"expert load balance: MaxVio {sum(last) / len(last):.3f} over the last {len(last)} steps "
              f"(max/mean tokens per expert - 1; 0 = perfectly balanced)")
    depths = [key for key in h if key.startswith("mtp_loss_")]
    if depths:
        means = ", ".join(f"{sum(h[key][-50:]) / len(h[key][-50:]):.3f}" for key in depths)
        print(f"multi-token prediction: loss per depth k = 1..{len(depths)}: {means} over the last "
              f"{len(h[depths[0]][-50:])} steps (depth k predicts the token k + 1 ahead)")
    plot = plot_losses(result, out / PLOT_NAME)
    print(f"\nloss plot:  {plot}")
    print(f"metrics:    {out / METRICS_NAME}")
    print(f"checkpoint: {out / (CHECKPOINT_NAME if result.layout is None else 'checkpoint.dcp')}")
    if samples and result.layout is not None:
        print("\nsamples: skipped (the model is spread over the ranks)")
    elif samples:
        _print_samples(result, samples)


def _error(message: object, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _has_checkpoint(folder: Path) -> bool:
    """Whether ``--resume folder`` would find a checkpoint (metrics alone cannot be resumed)."""
    try:
        find_checkpoint(folder)
    except (ValueError, OSError):
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    """The CLI. Exit status: 0 done, 2 a flag or input to change, 1 a failure while running, 130 Ctrl-C.

    Every error is one line on stderr that says what to change; whatever was already
    computed (checkpoint, metrics, plot) is on disk before an error is reported.
    """
    args = _parser().parse_args(argv)
    try:
        model_config, cfg, checkpoint = _cli_configs(args)
        samples = len(SAMPLE_PROMPTS) if args.samples is None else args.samples
        _check_samples(samples, model_config)
        plan = _plan(model_config, cfg, checkpoint, args.overwrite, cli=True)
    except (ValueError, NotImplementedError) as exc:
        return _error(exc, EXIT_USAGE)
    except OSError as exc:
        return _error(exc, EXIT_FAILED)
    out = shlex.quote(str(plan.out_dir))
    try:
        with _lock(plan):
            result = _run(plan, data=None)
            _report(result, samples)
    except TrainingInterrupted as exc:
        where = f"checkpoint: {exc.checkpoint}" if exc.checkpoint is not None else str(exc)
        print(f"\ninterrupted after step {exc.step}; {where}", file=sys.stderr)
        if exc.checkpoint is not None or _has_checkpoint(plan.out_dir):
            print(f"resume with: python -m deepseek_mini.train --resume {out}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"\ninterrupted; nothing more to save in {out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, NotImplementedError) as exc:
        return _error(exc, EXIT_USAGE)
    except (OSError, RuntimeError) as exc:
        notes = " ".join(getattr(exc, "__notes__", []))
        return _error(f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0]}"
                      f"{'; ' + notes if notes else ''}", EXIT_FAILED)
    return 0
