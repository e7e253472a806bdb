"""Training with Multi-Token Prediction (issue #11): windows of T + D + 1 tokens, the MTP loss as a hook
(eq. 25, lambda's schedule of §4.2), exact resume, evaluation and inference without the MTP modules, the CLI.

The reference is V3's training step written out by hand, drawing its windows by hand too, so that
``train`` must match it bit for bit at D = 1 and 2, and at D = 0 match the step and windows of the
trainer before MTP existed.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepseek_mini import load_config
from deepseek_mini.data import Batcher, TokenStream, eval_batches
from deepseek_mini.generate import generate
from deepseek_mini.model import build_model
from deepseek_mini.moe import balance_loss, max_violation, moe_layers, update_biases
from deepseek_mini.mtp import mtp_lambda, mtp_logits, mtp_losses
from deepseek_mini.train import (MoEBalancing, MultiTokenPrediction, TrainConfig, _make_optimizer, default_hooks,
                                 evaluate, load_checkpoint, lr_schedule, main, train)

from tiny import RUN, TINY, TINY_MOE     # tiny MoE: layer 0 dense, layer 1 and every MTP block MoE


def mtp_config(depth: int, preset: str = "toy"):
    return load_config(preset, **(TINY_MOE if preset == "toy" else TINY), num_nextn_predict_layers=depth)


def run(**overrides) -> TrainConfig:
    base = dict(RUN, bias_update_speed=0.01, balance_loss_alpha=0.01, mtp_lambda_switch=0.5)
    return TrainConfig(**{**base, **overrides})


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


# ----------------------------------------------------------------------------- the windows

def hand_windows(stream, cfg: TrainConfig, depth: int):
    """The windows spelled out: B random starts in [0, N - T - D), then T + D + 1 tokens from each.
    At D = 0 this is how the trainer drew its batches before MTP existed."""
    generator = torch.Generator().manual_seed(cfg.seed)
    while True:
        starts = torch.randint(0, len(stream) - cfg.seq_len - depth, (cfg.batch_size,), generator=generator)
        window = stream.tokens[starts[:, None] + torch.arange(cfg.seq_len + depth + 1)]
        yield window[:, :cfg.seq_len], window[:, 1:]


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_batcher_windows_carry_d_more_targets(data, depth):
    cfg = run(batch_size=3, seq_len=8)
    batcher = Batcher(data[0], cfg.batch_size, cfg.seq_len, seed=cfg.seed, extra_targets=depth)
    by_hand = hand_windows(data[0], cfg, depth)
    for _ in range(3):
        x, y, dom = batcher.next_batch()
        hx, hy = next(by_hand)
        assert x.shape == (3, 8) and y.shape == dom.shape == (3, 8 + depth)
        assert torch.equal(x, hx) and torch.equal(y, hy)
        assert torch.equal(y[:, :7], x[:, 1:])                                  # y[:, :T] is x shifted by one


def test_a_sampler_state_from_before_mtp_is_a_d0_state(data):
    old = Batcher(data[0], 2, 8, seed=3)
    state = old.state_dict()
    del state["extra_targets"]                                                  # saved before issue #11
    fresh = Batcher(data[0], 2, 8)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.next_batch(), old.next_batch()))
    with pytest.raises(ValueError, match=r"state\['extra_targets'\] \(0\) must equal this Batcher's extra_targets"):
        Batcher(data[0], 2, 8, extra_targets=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"extra_targets \(-1\) must be an integer >= 0"):
        Batcher(data[0], 2, 8, extra_targets=-1)
    with pytest.raises(ValueError, match=r"seq_len \(8\) is too large \(with extra_targets 3\): .* must be < 8"):
        Batcher(TokenStream(data[0].tokens[:11], data[0].domains[:11], data[0].domain_names), 2, 8, extra_targets=3)


# ----------------------------------------------------------------------------- the step, by hand

def hand_written_mtp_run(config, cfg: TrainConfig, data) -> tuple[nn.Module, dict[str, list[float]]]:
    """DeepSeek-V3's step with MTP (§2.2, eq. 25) and MoE balancing (§2.1.2) spelled out: forward,
    L_main on the T next tokens + lambda/D * sum_k L^k_MTP + the balance loss over every MoE layer
    (the MTP blocks' too), backward, clip, AdamW step, then the bias update from the step's load."""
    depth = config.num_nextn_predict_layers
    torch.manual_seed(cfg.seed)
    model = build_model(config, seed=cfg.seed).train()
    optimizer = _make_optimizer(model, cfg)
    windows = hand_windows(data[0], cfg, depth)
    history: dict[str, list[float]] = {"train_loss": [], "maxvio": [], "balance_loss": []}
    for step in range(1, cfg.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_schedule(step - 1, cfg)
        x, y = next(windows)
        logits, aux = model(x, return_aux=True)
        loss = F.cross_entropy(logits.flatten(0, 1), y[:, :cfg.seq_len].flatten())
        total = loss
        if depth:
            losses = mtp_losses(mtp_logits(model, aux["hidden"], y, routing=aux["routing"]), y)
            lam = mtp_lambda(step, cfg.steps, cfg.mtp_lambda, cfg.mtp_lambda_late, cfg.mtp_lambda_switch)
            mtp = lam / depth * sum(losses)
            total = total + mtp
            history.setdefault("mtp_loss", []).append(mtp.item())
            history.setdefault("mtp_lambda", []).append(lam)
            for k, depth_loss in enumerate(losses, start=1):
                history.setdefault(f"mtp_loss_{k}", []).append(depth_loss.item())
        bal = balance_loss(aux["routing"], cfg.balance_loss, cfg.balance_loss_alpha)
        optimizer.zero_grad(set_to_none=True)
        (total + bal).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        loads = update_biases(model, cfg.bias_update_speed)
        history["train_loss"].append(loss.item())
        history["maxvio"].append(sum(max_violation(load) for load in loads) / len(loads))
        history["balance_loss"].append(bal.item())
    return model, history


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_train_equals_the_hand_written_mtp_step_bit_for_bit(data, depth):
    config, cfg = mtp_config(depth), run()
    model, history = hand_written_mtp_run(config, cfg, data)
    result = train(config, cfg, data=data)
    assert_same_weights(model.state_dict(), result.model.state_dict())
    for key, values in history.items():
        assert result.history[key] == values, key
    mtp_keys = {key for key in result.history if key.startswith("mtp")}
    assert mtp_keys == ({"mtp_loss", "mtp_lambda", *(f"mtp_loss_{k}" for k in range(1, depth + 1))} if depth else set())
    assert len(moe_layers(result.model)) == 1 + depth                          # every MTP block is MoE here


def test_the_logged_mtp_loss_is_lambda_over_d_times_the_depth_losses(data):
    result = train(mtp_config(2), run(mtp_lambda=0.5, mtp_lambda_late=0.25, mtp_lambda_switch=0.25), data=data)
    h = result.history
    assert h["mtp_lambda"] == [0.5, 0.25, 0.25, 0.25]                          # round(0.25 * 4) = 1 step early
    for step in range(4):
        expected = h["mtp_lambda"][step] / 2 * (h["mtp_loss_1"][step] + h["mtp_loss_2"][step])
        assert h["mtp_loss"][step] == pytest.approx(expected, rel=1e-6)
    assert all(4.0 < h[f"mtp_loss_{k}"][0] < 7.0 for k in (1, 2))             # ~ln(260) = 5.56 at initialisation


def test_lambda_switches_after_ten_of_fourteen_point_eight_parts_of_the_run():
    hook = MultiTokenPrediction(total_steps=148)                              # V3: 0.3 for 10T of 14.8T tokens
    assert [hook.weight(step) for step in (1, 100, 101, 148)] == [0.3, 0.3, 0.1, 0.1]
    (mtp, balancing) = default_hooks(TrainConfig(steps=10, mtp_lambda=0.7, mtp_lambda_late=0.2, mtp_lambda_switch=0.3))
    assert isinstance(mtp, MultiTokenPrediction) and isinstance(balancing, MoEBalancing)
    assert [mtp.weight(step) for step in range(1, 11)] == [0.7] * 3 + [0.2] * 7


# ----------------------------------------------------------------------------- gradients

def test_mtp_gradients_reach_the_trunk_and_the_shared_embedding_and_head(data):
    config = mtp_config(2)
    model = build_model(config, seed=0).train()
    x, y, _ = Batcher(data[0], 2, 16, extra_targets=2).next_batch()
    output = model(x, return_aux=True)
    loss = MultiTokenPrediction(total_steps=4).extra_loss(model, (x, y), output, step=1)["mtp_loss"]
    loss.backward()                                                           # the MTP loss alone

    def reached(module: nn.Module) -> bool:
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    for name in ("embed", "head", "norm", "layers.0.attn", "layers.0.ffn", "layers.1.attn", "layers.1.ffn",
                 "mtp.0", "mtp.1"):
        assert reached(model.get_submodule(name)), name
    assert model.mtp[0].block.ffn.gate.weight.grad.abs().sum() > 0            # the MTP router learns too


# ----------------------------------------------------------------------------- resume, evaluation, inference

def test_an_mtp_run_resumed_midway_equals_the_uninterrupted_run(data, tmp_path):
    config = mtp_config(1)
    straight = train(config, run(steps=4, checkpoint_every=2, out_dir=str(tmp_path / "a")), data=data)
    midway = load_checkpoint(tmp_path / "a" / "checkpoint-000002.pt")
    assert midway["hooks"] == {"mtp": {}, "moe_balancing": {}}
    assert any(name.startswith("mtp.0.") for name in midway["model"])
    resumed = train(None, run(steps=4, out_dir=str(tmp_path / "b")), data=data,
                    resume=tmp_path / "a" / "checkpoint-000002.pt")
    assert_same_weights(straight.model.state_dict(), resumed.model.state_dict())
    for key in ("train_loss", "val_loss", "mtp_loss", "mtp_loss_1", "mtp_lambda", "maxvio", "balance_loss"):
        assert resumed.history[key] == straight.history[key], key
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["mtp_loss_1"] for r in records] == straight.history["mtp_loss_1"][2:]


def test_a_checkpoint_may_lack_the_mtp_hook_only_when_the_model_has_no_mtp(data, tmp_path):
    """Checkpoints written between issues #10 and #11 hold the balancing hook alone."""
    for depth in (0, 1):
        cfg = run(steps=4, checkpoint_every=2, out_dir=str(tmp_path / f"a{depth}"))
        straight = train(mtp_config(depth), cfg, data=data)
        old = torch.load(tmp_path / f"a{depth}" / "checkpoint-000002.pt", weights_only=True)
        del old["hooks"]["mtp"]
        torch.save(old, tmp_path / f"old{depth}.pt")
        again = run(steps=4, out_dir=str(tmp_path / f"b{depth}"))
        if depth == 0:
            resumed = train(None, again, data=data, resume=tmp_path / "old0.pt")
            assert_same_weights(straight.model.state_dict(), resumed.model.state_dict())
        else:
            with pytest.raises(ValueError, match=r"trained with hooks \['moe_balancing'\], this run has "
                                                 r"\['moe_balancing', 'mtp'\]"):
                train(None, again, data=data, resume=tmp_path / "old1.pt")


def test_validation_is_the_main_models_next_token_loss_and_inference_drops_the_mtp_modules(data):
    cfg = run(steps=2, eval_every=2)
    result = train(mtp_config(1, "toy-dense"), cfg, data=data)
    model = result.model
    batches = eval_batches(data[1], cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    assert all(y.shape == x.shape for x, y, _ in batches)                     # T + 1 windows, as without MTP
    assert result.history["val_loss"] == [evaluate(model, batches)]
    prompt = torch.tensor([[257, 51, 55, 43]])
    with_mtp = generate(model, prompt, max_new_tokens=6, temperature=0)
    main_only = build_model(mtp_config(0, "toy-dense"), seed=1)               # no MTP modules at all
    missing, unexpected = main_only.load_state_dict(model.state_dict(), strict=False)
    assert not missing and unexpected and all(name.startswith("mtp.") for name in unexpected)
    assert torch.equal(generate(main_only, prompt, max_new_tokens=6, temperature=0), with_mtp)
    assert evaluate(main_only, batches) == result.history["val_loss"][-1]


def test_a_model_without_mtp_gets_no_mtp_keys(data):
    result = train(mtp_config(0, "toy-dense"), run(steps=2), data=data)
    assert not [key for key in result.history if key.startswith("mtp")]
    hook = MultiTokenPrediction(total_steps=2)
    model = result.model
    x, y, _ = Batcher(data[0], 2, 16).next_batch()
    assert hook.extra_loss(model, (x, y), model(x, return_aux=True), 1) == {} and hook.metrics(model, 1) == {}
    assert not hook.applies_to(model.config) and hook.applies_to(mtp_config(1))


# ----------------------------------------------------------------------------- errors

def test_targets_without_the_d_extra_tokens_are_a_one_line_error(data):
    model = build_model(mtp_config(2, "toy-dense"), seed=0)
    x, y, _ = Batcher(data[0], 2, 16).next_batch()                            # T + 1 windows
    with pytest.raises(ValueError, match=r"MTP needs targets \(batch, seq_len \+ D\) = \(2, 18\) .* got \(2, 16\): "
                                         r"draw the windows with Batcher\(\.\.\., extra_targets=2\)"):
        MultiTokenPrediction(4).extra_loss(model, (x, y), model(x, return_aux=True), 1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(total_steps=0), "total_steps"), (dict(total_steps=4, lambda_early=-0.1), "lambda_early"),
    (dict(total_steps=4, lambda_late=float("nan")), "lambda_late"),
    (dict(total_steps=4, lambda_switch=1.5), "lambda_switch"),
])
def test_the_hook_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiTokenPrediction(**kwargs)


@pytest.mark.parametrize("field, value", [("mtp_lambda", -1.0), ("mtp_lambda_late", "0.1"), ("mtp_lambda_switch", 2.0)])
def test_bad_mtp_settings_raise(data, field, value):
    with pytest.raises(ValueError, match=field):
        train(mtp_config(1), run(**{field: value}), data=data)


def test_mtp_must_come_before_balancing(data):
    with pytest.raises(ValueError, match="put the MultiTokenPrediction hook before MoEBalancing"):
        train(mtp_config(1), run(steps=1), data=data, hooks=[MoEBalancing(), MultiTokenPrediction(1)])


# ----------------------------------------------------------------------------- the CLI

def test_cli_sets_the_mtp_depth_and_lambdas(capsys):
    from deepseek_mini.train_cli import _cli_configs, _parser

    model_config, cfg, _ = _cli_configs(_parser().parse_args(
        ["--mtp-depth", "2", "--mtp-lambda", "0.5", "--mtp-lambda-late", "0.05", "--mtp-lambda-switch", "0.8"]))
    assert model_config == load_config("toy", num_nextn_predict_layers=2)
    assert (cfg.mtp_lambda, cfg.mtp_lambda_late, cfg.mtp_lambda_switch) == (0.5, 0.05, 0.8)
    assert _cli_configs(_parser().parse_args([]))[0].num_nextn_predict_layers == 0
    with pytest.raises(ValueError, match=r"--mtp-depth \(-1\) must be >= 0"):
        _cli_configs(_parser().parse_args(["--mtp-depth", "-1"]))
    with pytest.raises(SystemExit):
        _parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    group = text[text.index("multi-token prediction (DeepSeek-V3 §2.2, §4.2"):text.index("data:")]
    for flag in ("--mtp-depth D", "--mtp-lambda LAMBDA", "--mtp-lambda-late LAMBDA", "--mtp-lambda-switch FRACTION"):
        assert flag in group
    assert "(default: 10/14.8, V3's 10T of 14.8T tokens)" in group


def test_cli_trains_with_mtp_and_resume_keeps_the_depth(tmp_path, capsys):
    config_path, out = tmp_path / "tiny.json", tmp_path / "run"
    load_config("toy-dense", **TINY).to_json(config_path)
    common = ["--config", str(config_path), "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
              "--device", "cpu", "--no-progress", "--samples", "0"]
    assert main([*common, "--mtp-depth", "1", "--steps", "2", "--out", str(out)]) == 0
    assert "multi-token prediction: loss per depth k = 1..1: " in capsys.readouterr().out
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"mtp_loss", "mtp_loss_1", "mtp_lambda"} <= record.keys()
    assert load_checkpoint(out)["model_config"]["num_nextn_predict_layers"] == 1
    assert main(["--resume", str(out), "--steps", "3", "--mtp-depth", "2", "--no-progress", "--samples", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --mtp-depth 2 differs from the checkpoint's model (num_nextn_predict_layers 2 vs 1")
    assert err.endswith("drop --mtp-depth") and "\n" not in err
    assert main(["--resume", str(out), "--steps", "3", "--mtp-depth", "1", "--no-progress", "--samples", "0"]) == 0
