"""The training loop: it learns, it resumes bit-identically, and its CLI works end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deepseek_mini import load_config
from deepseek_mini.data import make_datasets, unigram_entropy
from deepseek_mini.train import (TrainConfig, evaluate_by_domain, load_checkpoint, lr_schedule, main,
                                 select_device, train)

TINY = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)


@pytest.fixture(scope="module")
def data():
    return make_datasets("synthetic", n_docs=200, seed=0)


def tiny_run(**overrides) -> TrainConfig:
    base = dict(steps=12, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=3, eval_every=6,
                eval_batches=2, seed=0, device="cpu", progress=False)
    return TrainConfig(**{**base, **overrides})


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_schedule(0, cfg) == pytest.approx(0.1)          # (0 + 1) / 10
    assert lr_schedule(9, cfg) == pytest.approx(1.0)
    assert lr_schedule(10, cfg) == pytest.approx(1.0)         # cosine starts at the peak
    assert lr_schedule(55, cfg) == pytest.approx(0.55)        # halfway: 0.1 + 0.9 * 0.5
    assert lr_schedule(100, cfg) == pytest.approx(0.1)
    values = [lr_schedule(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_training_lowers_the_loss_below_the_unigram_baseline(data):
    config = load_config("toy-dense", **TINY)
    result = train(config, tiny_run(steps=150, eval_every=50, batch_size=8, seq_len=48), data=data)
    losses = result.history["train_loss"]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 1.0
    assert result.history["val_loss"][-1] < unigram_entropy(data[0]) - 0.3
    assert result.history["eval_step"] == [50, 100, 150]


def test_resume_gives_bit_identical_next_steps(data, tmp_path):
    config = load_config("toy-dense", **TINY)
    straight = train(config, tiny_run(steps=12, checkpoint_every=6, out_dir=str(tmp_path / "a")), data=data)
    midway = tmp_path / "a" / "checkpoint-000006.pt"
    assert load_checkpoint(midway)["step"] == 6
    resumed = train(config, tiny_run(steps=12, out_dir=str(tmp_path / "b")), data=data, resume=midway)
    assert resumed.history["train_loss"] == straight.history["train_loss"]
    assert resumed.history["val_loss"] == straight.history["val_loss"]
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after resume"
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(7, 13))


def test_resume_in_place_does_not_duplicate_metrics(data, tmp_path):
    config = load_config("toy-dense", **TINY)
    train(config, tiny_run(steps=8, checkpoint_every=4, out_dir=str(tmp_path)), data=data)
    train(config, tiny_run(steps=8, out_dir=str(tmp_path)), data=data, resume=tmp_path / "checkpoint-000004.pt")
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_metrics_jsonl_and_checkpoint(data, tmp_path):
    config = load_config("toy-dense", **TINY)
    train(config, tiny_run(steps=6, eval_every=3, out_dir=str(tmp_path)), data=data)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert ["val_loss" in r for r in records] == [False, False, True, False, False, True]
    assert all(math.isfinite(r["train_loss"]) and r["lr"] > 0 for r in records)
    state = load_checkpoint(tmp_path)
    assert state["step"] == 6 and state["model_config"]["hidden_size"] == 32


def test_same_seed_same_run_and_different_seed_differs(data):
    config = load_config("toy-dense", **TINY)
    a = train(config, tiny_run(steps=4), data=data).history["train_loss"]
    b = train(config, tiny_run(steps=4), data=data).history["train_loss"]
    c = train(config, tiny_run(steps=4, seed=1), data=data).history["train_loss"]
    assert a == b and a != c


def test_evaluate_by_domain_covers_every_domain(data):
    config = load_config("toy-dense", **TINY)
    result = train(config, tiny_run(steps=2), data=data)
    losses = evaluate_by_domain(result.model, data[1], batch_size=4, seq_len=32)
    assert set(losses) == set(data[1].domain_names)
    assert all(0 < v < 10 for v in losses.values())


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "steps"), ("batch_size", -1, "batch_size"), ("lr", 0.0, "lr"),
    ("min_lr_ratio", 2.0, "min_lr_ratio"), ("beta2", 1.0, "beta2"), ("grad_clip", 0.0, "grad_clip"),
    ("device", "tpu", "device"), ("warmup_steps", -1, "warmup_steps"),
])
def test_bad_train_config_raises(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value}).validate()


def test_seq_len_longer_than_the_model_raises(data):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        train(load_config("toy-dense", **TINY), tiny_run(seq_len=128), data=data)


def test_resume_from_missing_checkpoint_raises(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        train("toy-dense", tiny_run(), resume=tmp_path / "nothing")


def test_select_device_auto_on_cpu_machine():
    device = select_device("auto")
    if not torch.cuda.is_available():
        assert device.type in ("cpu", "mps")
    assert select_device("cpu").type == "cpu"


def test_cli_end_to_end(tmp_path, capsys):
    config_path = tmp_path / "tiny.json"
    load_config("toy-dense", **TINY).to_json(config_path)
    out = tmp_path / "run"
    code = main(["--config", str(config_path), "--steps", "8", "--batch-size", "4", "--seq-len", "32",
                 "--eval-every", "4", "--n-docs", "100", "--out", str(out), "--no-progress", "--samples", "2"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "validation loss" in printed and "unigram entropy" in printed
    assert printed.count("'") >= 4                       # two quoted samples
    for name in ("loss.png", "metrics.jsonl", "checkpoint.pt"):
        assert (out / name).is_file() and str(out / name) in printed


def test_cli_bad_preset_is_a_clear_error(capsys):
    assert main(["--config", "toyy", "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'toyy'" in err and "did you mean 'toy'" in err


def test_cli_help_reads_well(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for expected in ("--config", "--steps", "--resume", "--data", "examples:"):
        assert expected in text
    from deepseek_mini.config import preset_names

    flat = " ".join(text.split())                        # argparse wraps long help lines
    assert ", ".join(preset_names()) in flat


def test_capped_evaluation_windows_span_the_whole_stream(data):
    from deepseek_mini.data import eval_batches

    val = data[1]
    batches = eval_batches(val, batch_size=4, seq_len=32, max_batches=2)
    starts = [int((val.tokens.unfold(0, 32, 1) == x[i]).all(1).nonzero()[0]) for x, _, _ in batches for i in range(4)]
    assert starts == sorted(starts) and starts[-1] > len(val) // 2
    assert all(b - a >= 32 for a, b in zip(starts, starts[1:]))      # no overlap



# ----------------------------------------------------------------------------- DeepSeekMoE training
# The toy preset (MLA + MoE) at tiny size: layer 0 dense, layer 1 MoE with 8 routed experts in 4 groups.
TINY_MOE = dict(TINY, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, moe_intermediate_size=16)
GATE_BIAS = "layers.1.ffn.gate.bias"


def moe_run(**overrides) -> TrainConfig:
    return tiny_run(**{**dict(steps=2, batch_size=2, seq_len=16, eval_every=100), **overrides})


def test_moe_run_records_maxvio_and_balance_loss_and_moves_the_bias(data):
    result = train(load_config("toy", **TINY_MOE), moe_run(steps=4, bias_update_speed=0.01), data=data)
    h = result.history
    assert len(h["maxvio"]) == len(h["balance_loss"]) == 4
    assert all(0 <= v <= 3 for v in h["maxvio"]) and max(h["maxvio"]) > 0   # top-2 of 8: MaxVio <= 8/2 - 1
    assert all(0 < v <= 1e-4 * 8 / 2 for v in h["balance_loss"])   # default: sequence-wise, alpha 1e-4
    bias = result.model.state_dict()[GATE_BIAS]
    assert bias.dtype == torch.float32 and bias.abs().max() > 0
    steps = bias / 0.01               # each step moves each bias by -gamma, 0 or +gamma
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
    assert steps.abs().max() <= 4


def test_moe_run_with_gamma_zero_keeps_the_bias_exactly_zero(data):
    result = train(load_config("toy", **TINY_MOE), moe_run(bias_update_speed=0.0), data=data)
    assert torch.equal(result.model.state_dict()[GATE_BIAS], torch.zeros(8))
    assert len(result.history["maxvio"]) == 2


def test_evaluate_neither_moves_nor_counts_for_the_bias(data):
    from deepseek_mini.data import eval_batches
    from deepseek_mini.moe import moe_layers, update_biases
    from deepseek_mini.train import evaluate

    model = train(load_config("toy", **TINY_MOE), moe_run(bias_update_speed=0.01), data=data).model
    layers = moe_layers(model)
    before = [layer.gate.bias.clone() for layer in layers]
    assert before[0].abs().max() > 0
    evaluate(model, eval_batches(data[1], 2, 16, 2))
    assert model.training                                 # evaluate restores train mode
    assert all(torch.equal(layer.tokens_per_expert, torch.zeros(8)) for layer in layers)
    update_biases(model, 0.5)                             # nothing was counted: nothing moves
    assert all(torch.equal(layer.gate.bias, b) for layer, b in zip(layers, before))


def test_moe_checkpoint_holds_the_biases_and_resume_is_bit_identical(data, tmp_path):
    config = load_config("toy", **TINY_MOE)
    run = dict(steps=6, eval_every=3, bias_update_speed=0.01, balance_loss_alpha=0.01)
    straight = train(config, moe_run(checkpoint_every=3, out_dir=str(tmp_path / "a"), **run), data=data)
    midway = load_checkpoint(tmp_path / "a" / "checkpoint-000003.pt")
    assert midway["model"][GATE_BIAS].abs().max() > 0
    assert torch.equal(load_checkpoint(tmp_path / "a")["model"][GATE_BIAS], straight.model.state_dict()[GATE_BIAS])
    resumed = train(config, moe_run(out_dir=str(tmp_path / "b"), **run), data=data,
                    resume=tmp_path / "a" / "checkpoint-000003.pt")
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and GATE_BIAS in a
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    for key in ("train_loss", "val_loss", "maxvio", "balance_loss"):
        assert resumed.history[key] == straight.history[key], key


@pytest.mark.parametrize("kind", ["batch", "sequence"])
def test_balance_loss_kinds_are_recorded(data, kind):
    history = train(load_config("toy", **TINY_MOE), moe_run(balance_loss=kind, balance_loss_alpha=0.1),
                    data=data).history
    # alpha * sum_i f_i P_i: sum_i f_i = N_r and P_i near 1/N_r give about alpha; at most alpha N_r / K_r
    assert all(0.05 < v <= 0.4 for v in history["balance_loss"])


def test_balance_loss_none_records_zero(data):
    history = train(load_config("toy", **TINY_MOE), moe_run(balance_loss="none", balance_loss_alpha=0.1),
                    data=data).history
    assert history["balance_loss"] == [0.0, 0.0]


def test_dense_run_records_no_moe_metrics(data):
    history = train(load_config("toy-dense", **TINY), moe_run(), data=data).history
    assert "maxvio" not in history and "balance_loss" not in history


@pytest.mark.parametrize("field, value", [
    ("bias_update_speed", -0.001), ("bias_update_speed", float("nan")), ("balance_loss_alpha", -1.0),
    ("balance_loss", "aux"),
])
def test_bad_moe_train_config_raises(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value}).validate()


def test_cli_accepts_the_load_balancing_flags(tmp_path, capsys):
    config_path = tmp_path / "tiny_moe.json"
    load_config("toy", **TINY_MOE).to_json(config_path)
    out = tmp_path / "run"
    code = main(["--config", str(config_path), "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                 "--eval-every", "2", "--n-docs", "60", "--out", str(out), "--no-progress", "--samples", "0",
                 "--bias-update-speed", "0", "--balance-loss", "batch", "--balance-alpha", "0.5"])
    printed = capsys.readouterr().out
    assert code == 0 and "MaxVio" in printed
    state = load_checkpoint(out)
    assert state["train_config"]["bias_update_speed"] == 0.0
    assert state["train_config"]["balance_loss"] == "batch" and state["train_config"]["balance_loss_alpha"] == 0.5
    assert torch.equal(state["model"][GATE_BIAS], torch.zeros(8))          # gamma 0 from the flag
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["balance_loss"] > 0.2 and "maxvio" in r for r in records)  # alpha 0.5
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config_path), "--balance-loss", "aux"])
    assert exit_info.value.code == 2 and "invalid choice: 'aux'" in capsys.readouterr().err
