"""The training loop's seams (issue #10): hooks, checkpoints without a Batcher, the CLI built from TrainConfig.

Every MoE behaviour of the loop comes from the ``MoEBalancing`` hook: a test runs the step
written out by hand and requires ``train`` to match it bit for bit.
"""

from __future__ import annotations

import json
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from deepseek_mini import load_config
from deepseek_mini.data import Batcher
from deepseek_mini.model import build_model
from deepseek_mini.moe import balance_loss, max_violation, moe_layers, update_biases
from deepseek_mini.runs import save_checkpoint
from deepseek_mini.train import (RESUME_FIXED, MoEBalancing, MultiTokenPrediction, TrainConfig, TrainHook,
                                 _make_optimizer, default_hooks, load_checkpoint, lr_schedule, train)

from tiny import TINY, TINY_MOE, run

GATE_BIAS = "layers.1.ffn.gate.bias"


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


# ----------------------------------------------------------------------------- MoE balancing is a hook

def hand_written_moe_run(config, cfg: TrainConfig, data) -> tuple[nn.Module, dict[str, list[float]]]:
    """DeepSeek-V3's MoE training step spelled out (§2.1.2): forward, LM loss + balance loss,
    backward, clip, AdamW step, then the bias update from the step's load."""
    torch.manual_seed(cfg.seed)
    model = build_model(config, seed=cfg.seed).train()
    optimizer = _make_optimizer(model, cfg)
    batcher = Batcher(data[0], cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    history = {"train_loss": [], "maxvio": [], "balance_loss": []}
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_schedule(step, cfg)
        x, y, _ = batcher.next_batch()
        logits, aux = model(x, return_aux=True)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        bal = balance_loss(aux["routing"], cfg.balance_loss, cfg.balance_loss_alpha)
        optimizer.zero_grad(set_to_none=True)
        (loss if bal is None else loss + bal).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        loads = update_biases(model, cfg.bias_update_speed)
        history["train_loss"].append(loss.item())
        history["maxvio"].append(sum(max_violation(load) for load in loads) / len(loads))
        history["balance_loss"].append(0.0 if bal is None else bal.item())
    return model, history


@pytest.mark.parametrize("recipe", [dict(bias_update_speed=0.01, balance_loss_alpha=0.01),
                                    dict(bias_update_speed=0.0, balance_loss="batch", balance_loss_alpha=0.1),
                                    dict(bias_update_speed=0.003, balance_loss="none")],
                         ids=["sequence", "batch", "none"])
def test_train_equals_the_hand_written_moe_step_bit_for_bit(data, recipe):
    config, cfg = load_config("toy", **TINY_MOE), run(**recipe)
    model, history = hand_written_moe_run(config, cfg, data)
    result = train(config, cfg, data=data)
    assert_same_weights(model.state_dict(), result.model.state_dict())
    for key, values in history.items():
        assert result.history[key] == values, key
    assert [type(h) for h in result.hooks] == [MultiTokenPrediction, MoEBalancing]   # MTP: nothing here (D = 0)


def test_without_hooks_the_loop_does_nothing_moe_specific(data):
    result = train(load_config("toy", **TINY_MOE), run(bias_update_speed=0.5), data=data, hooks=[])
    assert "maxvio" not in result.history and "balance_loss" not in result.history
    assert torch.equal(result.model.state_dict()[GATE_BIAS], torch.zeros(8))   # nothing moved the bias


def test_default_hooks_carry_the_train_configs_recipe():
    mtp, hook = default_hooks(TrainConfig(bias_update_speed=0.25, balance_loss="batch", balance_loss_alpha=0.5,
                                          steps=7, mtp_lambda=0.6, mtp_lambda_late=0.2, mtp_lambda_switch=0.5))
    assert isinstance(hook, MoEBalancing) and (hook.gamma, hook.kind, hook.alpha) == (0.25, "batch", 0.5)
    assert hook.process_group is None
    assert isinstance(mtp, MultiTokenPrediction)
    assert (mtp.total_steps, mtp.lambda_early, mtp.lambda_late, mtp.lambda_switch) == (7, 0.6, 0.2, 0.5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(bias_update_speed=-1.0), "bias_update_speed"), (dict(alpha=float("nan")), "alpha"),
    (dict(balance_loss="aux"), "balance_loss"),
])
def test_moe_balancing_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoEBalancing(**kwargs)


# The load all-reduce over the process group the trainer passes in (chapter 06's data parallelism).
RANK_LOADS = {0: [3.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], 1: [0.0, 0.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0]}


def _balancing_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results = {}
        for label, group in (("group", dist.group.WORLD), ("local", None)):
            model = build_model(load_config("toy", **TINY_MOE), seed=0)
            (layer,) = moe_layers(model)
            layer.tokens_per_expert.copy_(torch.tensor(RANK_LOADS[rank]))
            hook = MoEBalancing(bias_update_speed=0.5, process_group=group)
            hook.after_optimizer_step(model, 1)
            results[label] = {"bias": layer.gate.bias.clone(), "counter": layer.tokens_per_expert.clone(),
                              "maxvio": torch.tensor(hook.metrics(model, 1)["maxvio"])}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_moe_balancing_sums_the_load_over_its_process_group_only(tmp_path):
    workers = mp.start_processes(_balancing_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                                 join=False, start_method="fork")
    deadline = time.monotonic() + 60
    while not workers.join(timeout=1):
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("the two gloo workers did not finish within 60 s")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    summed = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0])     # mean 1
    for rank, r in enumerate(results):
        assert torch.equal(r["group"]["bias"], 0.5 * torch.sign(summed.mean() - summed))   # the same on both ranks
        assert r["group"]["maxvio"].item() == pytest.approx(max_violation(summed))
        local = torch.tensor(RANK_LOADS[rank])                        # process_group=None: this rank's load
        assert torch.equal(r["local"]["bias"], 0.5 * torch.sign(local.mean() - local))
        assert torch.equal(r["group"]["counter"], torch.zeros(8)) and torch.equal(r["local"]["counter"], torch.zeros(8))


# ----------------------------------------------------------------------------- a hook of your own

class Recorder(TrainHook):
    """Adds a small L2 penalty as an extra loss, logs a metric and records what each seam saw."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.grad_norms: list[float] = []
        self.changed: list[bool] = []

    def extra_loss(self, model, batch, output, step):
        self.calls.append(("extra_loss", step))
        x, y = batch
        logits, aux = output
        assert logits.shape == (*x.shape, model.config.vocab_size) and y.shape == x.shape
        assert aux["routing"] == []                                   # a dense model: no MoE routing
        assert aux["hidden"].shape == (*x.shape, model.config.hidden_size)   # where an MTP chain starts
        self.before = model.head.weight.detach().clone()
        return {"l2": 1e-3 * sum(p.pow(2).sum() for p in model.parameters())}

    def after_backward(self, model, step):
        self.calls.append(("after_backward", step))
        self.grad_norms.append(torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item())
        self.changed.append(not torch.equal(model.head.weight, self.before))

    def after_optimizer_step(self, model, step):
        self.calls.append(("after_optimizer_step", step))
        self.changed.append(not torch.equal(model.head.weight, self.before))

    def metrics(self, model, step):
        self.calls.append(("metrics", step))
        return {"recorded": float(step)}


def test_a_hooks_loss_is_added_and_logged_and_each_seam_runs_in_order(data, tmp_path):
    config = load_config("toy-dense", **TINY)
    recorder = Recorder()
    cfg = run(steps=3, grad_clip=1e-3, out_dir=str(tmp_path))
    result = train(config, cfg, data=data, hooks=[*default_hooks(cfg), recorder])
    seams = ["extra_loss", "after_backward", "after_optimizer_step", "metrics"]
    assert recorder.calls == [(seam, step) for step in (1, 2, 3) for seam in seams]
    assert recorder.changed == [False, True] * 3                  # after_backward: before the optimizer step
    assert min(recorder.grad_norms) > 1e-3                         # ... and before clipping to 1e-3
    assert result.history["recorded"] == [1.0, 2.0, 3.0]
    assert len(result.history["l2"]) == 3 and all(v > 0 for v in result.history["l2"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["recorded"] for r in records] == [1.0, 2.0, 3.0] and [r["l2"] for r in records] == result.history["l2"]
    without = train(config, run(steps=3, grad_clip=1e-3), data=data)            # the penalty changed the weights
    assert not torch.equal(without.model.head.weight, result.model.head.weight)


class StepCounter(TrainHook):
    """A hook with state that must survive a resume."""

    name = "counter"

    def __init__(self) -> None:
        self.seen = 0

    def after_optimizer_step(self, model, step):
        self.seen += 1

    def metrics(self, model, step):
        return {"seen": float(self.seen)}

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def test_hook_state_is_checkpointed_and_a_resume_needs_the_same_hooks(data, tmp_path):
    config = load_config("toy", **TINY_MOE)
    cfg = run(steps=4, checkpoint_every=2, out_dir=str(tmp_path / "a"))
    train(config, cfg, data=data, hooks=[*default_hooks(cfg), StepCounter()])
    midway = tmp_path / "a" / "checkpoint-000002.pt"
    assert load_checkpoint(midway)["hooks"] == {"mtp": {}, "moe_balancing": {}, "counter": {"seen": 2}}
    counter = StepCounter()
    resumed = train(None, run(steps=4, out_dir=str(tmp_path / "b")), data=data, resume=midway,
                    hooks=[*default_hooks(cfg), counter])
    assert counter.seen == 4 and resumed.history["seen"] == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match=r"trained with hooks \['counter', 'moe_balancing', 'mtp'\], this run has "
                                         r"\['moe_balancing', 'mtp'\]; the hooks are part of the run"):
        train(None, run(steps=4, out_dir=str(tmp_path / "c")), data=data, resume=midway)


class Clash(TrainHook):
    name = "clash"

    def __init__(self, key: str) -> None:
        self.key = key

    def metrics(self, model, step):
        return {self.key: 1.0}


@pytest.mark.parametrize("hooks, message", [
    (lambda: [Clash("train_loss")], "hook 'clash' logs the metric 'train_loss', which another hook or the loop"),
    (lambda: [*default_hooks(run()), Clash("maxvio")], "hook 'clash' logs the metric 'maxvio'"),
    (lambda: [Clash("a"), Clash("b")], r"hook names must be unique .*\['clash', 'clash'\]"),
    (lambda: [object()], "hooks must be a list of TrainHook instances"),
    (lambda: MoEBalancing(), "hooks must be a list of TrainHook instances"),
])
def test_bad_hooks_are_one_line_errors(data, hooks, message):
    with pytest.raises(ValueError, match=message):
        train(load_config("toy", **TINY_MOE), run(steps=1), data=data, hooks=hooks())


def test_a_stateless_hook_refuses_state_it_does_not_keep():
    with pytest.raises(ValueError, match="hook 'moe_balancing' keeps no state"):
        MoEBalancing().load_state_dict({"x": 1})


# ----------------------------------------------------------------------------- checkpoints without a Batcher

class PromptSampler:
    """Any object with state_dict/load_state_dict is a sampler to a checkpoint (GRPO's prompts, ch. 08)."""

    def __init__(self, position: int) -> None:
        self.position = position

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def test_checkpoints_save_and_restore_without_a_batcher(tmp_path):
    config = load_config("toy-dense", **TINY)
    model = build_model(config, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 256, (2, 8))).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path / "grpo.pt", model, optimizer, PromptSampler(5), step=3)
    expected_draw = torch.rand(3)                       # the global RNG was saved before this draw
    other, other_opt, sampler = build_model(config, seed=1), None, PromptSampler(0)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
    state = load_checkpoint(path, other, other_opt, sampler, rng=True)
    assert state["step"] == 3 and sampler.position == 5 and state["train_config"] is None
    assert torch.equal(torch.rand(3), expected_draw)
    assert_same_weights(model.state_dict(), other.state_dict())
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])

    weights_only = save_checkpoint(tmp_path / "weights.pt", model)          # the model alone
    assert load_checkpoint(weights_only, build_model(config, seed=2))["step"] == 0
    with pytest.raises(ValueError, match="holds no optimizer state to restore"):
        load_checkpoint(weights_only, other, other_opt)
    with pytest.raises(ValueError, match="holds no sampler state to restore"):
        load_checkpoint(weights_only, sampler=sampler)
    with pytest.raises(ValueError, match="cannot be resumed"):
        train(None, resume=weights_only)
    with pytest.raises(ValueError, match="sampler .* has no state_dict"):
        save_checkpoint(tmp_path / "x.pt", model, sampler=object())


def test_a_checkpoint_from_before_the_hooks_still_resumes_bit_identically(data, tmp_path):
    """Checkpoints written before issue #10 name the sampler state 'batcher' and hold no hook states."""
    config = load_config("toy", **TINY_MOE)
    cfg = run(steps=4, checkpoint_every=2, bias_update_speed=0.01, out_dir=str(tmp_path / "a"))
    straight = train(config, cfg, data=data)
    old = torch.load(tmp_path / "a" / "checkpoint-000002.pt", weights_only=True)
    old["batcher"] = old.pop("sampler")
    del old["hooks"]
    torch.save(old, tmp_path / "old.pt")
    resumed = train(None, run(steps=4, bias_update_speed=0.01, out_dir=str(tmp_path / "b")), data=data,
                    resume=tmp_path / "old.pt")
    assert_same_weights(straight.model.state_dict(), resumed.model.state_dict())
    assert resumed.history["maxvio"] == straight.history["maxvio"]


# ----------------------------------------------------------------------------- the CLI is built from TrainConfig

def test_every_train_config_field_is_a_cli_option_with_its_declared_help(capsys):
    from deepseek_mini.train_cli import _parser

    actions = {action.dest: action for action in _parser()._actions}
    for f in fields(TrainConfig):
        action = actions[f.name]
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        assert action.option_strings == [flag] and action.default is None, f.name
        assert action.help.startswith(f.metadata["help"].split("{default}")[0]), f.name
    with pytest.raises(SystemExit):
        _parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "run (on --resume: the checkpoint's, except --steps, --eval-every, --device, --compile):" in text
    assert "--steps N total optimizer steps (default: 800); on --resume, more than" in text
    assert "--out DIR folder for checkpoint.pt, metrics.jsonl and loss.png (default: runs/toy; on --resume" in text
    assert "--grad-clip NORM clip the gradients' global norm to this (default: 1.0)" in text
    assert "--no-progress hide the progress bar" in text and "--compile train through torch.compile" in text


def test_cli_flags_become_train_config_values():
    from deepseek_mini.train_cli import _cli_configs, _parser

    _, cfg, checkpoint = _cli_configs(_parser().parse_args(
        ["--compile", "--beta2", "0.9", "--no-progress", "--out", "runs/x", "--balance-alpha", "0.5"]))
    assert checkpoint is None and cfg.compile is True and cfg.beta2 == 0.9 and cfg.progress is False
    assert cfg.out_dir == "runs/x" and cfg.balance_loss_alpha == 0.5
    _, default, _ = _cli_configs(_parser().parse_args([]))
    assert default == TrainConfig(out_dir="runs/toy")


def changed(value):
    """A different valid value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2
    return {"sequence": "batch", "synthetic": "other.txt"}[value]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("run")
    train(load_config("toy-dense", **TINY), run(steps=2, out_dir=str(out)), data=data)
    return out


@pytest.mark.parametrize("name", sorted(RESUME_FIXED))
def test_every_fixed_setting_is_refused_on_resume_by_the_api_and_the_cli(finished_run, name):
    from deepseek_mini.train_cli import _cli_configs, _parser

    saved = TrainConfig(**load_checkpoint(finished_run)["train_config"])
    value = changed(getattr(saved, name))
    flag, why = RESUME_FIXED[name]
    with pytest.raises(ValueError, match=rf"train_config.{name} .* differs from the checkpoint's .*; {why}"):
        train(None, TrainConfig(**{**load_checkpoint(finished_run)["train_config"], "steps": 4, name: value}),
              resume=finished_run)
    with pytest.raises(ValueError, match=rf"^{flag} {value} differs from the checkpoint's .*; {why}"):
        given = [flag] if isinstance(value, bool) else [flag, str(value)]     # a bool's flag flips it
        _cli_configs(_parser().parse_args(["--resume", str(finished_run), "--steps", "4", *given]))


def test_settings_that_are_not_fixed_may_change_on_resume(finished_run):
    from deepseek_mini.train_cli import _cli_configs, _parser

    free = {f.name for f in fields(TrainConfig)} - set(RESUME_FIXED)
    assert free == {"steps", "device", "compile", "eval_every", "out_dir", "checkpoint_every", "progress",
                    "pp", "ep", "schedule", "n_microbatches"}   # a sharded checkpoint resumes at any layout
    _, cfg, _ = _cli_configs(_parser().parse_args(["--resume", str(finished_run), "--steps", "5", "--compile",
                                                   "--eval-every", "3", "--checkpoint-every", "2", "--device", "cpu",
                                                   "--no-progress"]))
    assert (cfg.steps, cfg.compile, cfg.eval_every, cfg.checkpoint_every, cfg.progress) == (5, True, 3, 2, False)
    assert cfg.out_dir == str(finished_run) and (cfg.lr, cfg.batch_size) == (3e-3, 2)   # the checkpoint's
