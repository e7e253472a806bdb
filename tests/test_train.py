"""The training loop: it learns, it resumes bit-identically, and its CLI works end to end."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from deepseek_mini import load_config
from deepseek_mini.data import unigram_entropy
from deepseek_mini.train import (TrainConfig, evaluate_by_domain, load_checkpoint, lr_schedule, main,
                                 select_device, train)

from tiny import TINY


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


def test_resume_in_place_from_an_older_checkpoint_needs_overwrite(data, tmp_path):
    config = load_config("toy-dense", **TINY)
    train(config, tiny_run(steps=8, checkpoint_every=4, out_dir=str(tmp_path)), data=data)
    older = tmp_path / "checkpoint-000004.pt"
    with pytest.raises(ValueError, match=r"newer work \(checkpoint.pt at step 8\).*overwrite=True"):
        train(config, tiny_run(steps=8, out_dir=str(tmp_path)), data=data, resume=older)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 8            # refused: nothing touched
    train(config, tiny_run(steps=8, out_dir=str(tmp_path)), data=data, resume=older, overwrite=True)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))                                            # never duplicated
    assert not (tmp_path / "checkpoint-000008.pt").exists()                      # the discarded run's


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
    for expected in ("--config", "--steps", "--resume", "--overwrite", "--data", "examples:", "130"):
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


# ----------------------------------------------------------------------------- reproducibility (issue #9)
# The default preset, `toy` (MLA + MoE), shrunk in batch and length only.

@pytest.fixture
def two_threads():
    """Two intra-op threads: the backward of x[token] (index_put_ with accumulate) used to race."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def toy_run(**overrides) -> TrainConfig:
    """8 steps of 4 x 32 tokens: with the old dispatch two runs already differed after 4 steps."""
    return tiny_run(**{**dict(steps=8, batch_size=4, seq_len=32, eval_every=4, warmup_steps=2), **overrides})


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def test_toy_training_is_bit_reproducible_with_two_threads(data, two_threads):
    first = train("toy", toy_run(), data=data)
    second = train("toy", toy_run(), data=data)
    assert "maxvio" in first.history                                   # the MoE path ran
    assert first.history["train_loss"] == second.history["train_loss"]
    assert_same_weights(first.model.state_dict(), second.model.state_dict())


class Interrupt:
    """Replaces Batcher.next_batch: on call ``at`` it draws the batch, then raises ``error``
    (after the draw, so an unrestored sampler state would show up on resume), or sends
    this process a real SIGINT (``error=None``) and returns the batch, as Ctrl-C would."""

    def __init__(self, at: int, error: BaseException | None = KeyboardInterrupt(), signum: int = 2) -> None:
        from deepseek_mini.data import Batcher

        self.at, self.error, self.calls, self.original = at, error, 0, Batcher.next_batch
        self.signum = signum                           # 2 SIGINT (Ctrl-C), 15 SIGTERM

    def __get__(self, batcher, owner):                 # bind like a method: batcher.next_batch()
        return lambda: self(batcher)

    def __call__(self, batcher):
        import signal

        self.calls += 1
        batch = self.original(batcher)
        if self.calls == self.at:
            if self.error is None:
                signal.raise_signal(self.signum)
            else:
                raise self.error
        return batch


def test_sigterm_stops_after_the_step_and_saves_like_ctrl_c(data, tmp_path, monkeypatch, capsys):
    # A cluster scheduler sends SIGTERM before it kills a job: the run saves its last whole step.
    import signal

    from deepseek_mini.train import TrainingInterrupted

    monkeypatch.setattr("deepseek_mini.data.Batcher.next_batch", Interrupt(at=3, error=None, signum=signal.SIGTERM))
    with pytest.raises(TrainingInterrupted) as stopped:
        train(load_config("toy-dense", **TINY), tiny_run(steps=6, out_dir=str(tmp_path)), data=data)
    assert stopped.value.step == 3 and stopped.value.signum == signal.SIGTERM
    assert load_checkpoint(tmp_path)["step"] == 3 and not (tmp_path / ".lock").exists()
    assert "SIGTERM: stopping after this step" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL       # the handler is removed afterwards


def test_interrupted_and_resumed_toy_run_equals_uninterrupted(data, two_threads, tmp_path, monkeypatch):
    from deepseek_mini.train import TrainingInterrupted

    straight = train("toy", toy_run(checkpoint_every=4, out_dir=str(tmp_path / "a")), data=data)
    with monkeypatch.context() as patch:
        patch.setattr("deepseek_mini.data.Batcher.next_batch", Interrupt(at=6))   # inside step 6
        with pytest.raises(TrainingInterrupted) as stopped:
            train("toy", toy_run(checkpoint_every=4, out_dir=str(tmp_path / "b")), data=data)
    assert stopped.value.step == 5 and stopped.value.checkpoint == tmp_path / "b" / "checkpoint.pt"
    assert "resume=" in str(stopped.value) and not (tmp_path / "b" / ".lock").exists()
    assert load_checkpoint(tmp_path / "b")["step"] == 5                 # newer than checkpoint-000004.pt
    resumed = train(None, resume=tmp_path / "b", data=data)             # the checkpoint's settings and folder
    assert resumed.start_step == 5 and resumed.train_config.steps == 8
    assert_same_weights(straight.model.state_dict(), resumed.model.state_dict())
    for key in ("train_loss", "val_loss", "maxvio", "balance_loss"):
        assert resumed.history[key] == straight.history[key], key
    metrics = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == list(range(1, 9))
    assert [r["train_loss"] for r in metrics] == straight.history["train_loss"]


def test_an_error_mid_step_saves_the_last_whole_step(data, tmp_path, monkeypatch):
    monkeypatch.setattr("deepseek_mini.data.Batcher.next_batch", Interrupt(at=3, error=RuntimeError("out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        train(load_config("toy-dense", **TINY), tiny_run(steps=6, out_dir=str(tmp_path)), data=data)
    assert load_checkpoint(tmp_path)["step"] == 2 and not (tmp_path / ".lock").exists()


# ----------------------------------------------------------------------------- checkpoints are data

class WritesAFile:
    """A pickle payload: unpickling it calls Path.write_text (any callable would do, os.system too)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        from pathlib import Path

        return Path.write_text, (Path(self.path), "code ran")


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "checkpoint.pt"
    torch.save({"step": 1, "model": WritesAFile(marker)}, crafted)
    with pytest.raises(ValueError, match=r"refers to Python code \(.+\).*could run code"):
        load_checkpoint(crafted)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a torch checkpoint"):
        load_checkpoint(tmp_path / "garbage.pt")
    assert main(["--resume", str(crafted), "--no-progress"]) == 2
    assert "could run code" in one_line_error(capsys)
    assert not marker.exists()


def test_a_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(data, tmp_path, monkeypatch):
    from deepseek_mini.data import Batcher
    from deepseek_mini.train import _make_optimizer, save_checkpoint

    config = load_config("toy-dense", **TINY)
    result = train(config, tiny_run(steps=2, out_dir=str(tmp_path)), data=data)
    before = (tmp_path / "checkpoint.pt").read_bytes()

    def torch_save_dies_half_way(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", torch_save_dies_half_way)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(tmp_path / "checkpoint.pt", result.model, _make_optimizer(result.model, result.train_config),
                        Batcher(data[0], 4, 32), 3, config, result.train_config, result.history)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]


def test_find_checkpoint_takes_the_newest_by_step(data, tmp_path):
    from deepseek_mini.train import find_checkpoint

    train(load_config("toy-dense", **TINY), tiny_run(steps=2, out_dir=str(tmp_path)), data=data)
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint.pt"
    for step in (1, 999999, 1000000):         # a number, not the name's order, decides
        (tmp_path / f"checkpoint-{step:06d}.pt").write_bytes((tmp_path / "checkpoint.pt").read_bytes())
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint-1000000.pt"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no checkpoint"):
        find_checkpoint(tmp_path / "empty")


# ----------------------------------------------------------------------------- the CLI never loses or mixes work
# A tiny dense model through main(): each run takes about a second.

def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def cli(tmp_path):
    """main() with a tiny model and tiny settings; extra flags come last."""
    config_path = tmp_path / "tiny.json"
    load_config("toy-dense", **TINY).to_json(config_path)

    def run(*flags: str, small: bool = True) -> int:
        base = ["--config", str(config_path), "--steps", "4", "--batch-size", "2", "--seq-len", "16",
                "--eval-every", "2", "--n-docs", "40", "--samples", "0", "--warmup-steps", "1"] if small else []
        return main([*base, "--no-progress", *flags])
    run.config_path = config_path
    return run


def files_of(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_cli_refuses_an_occupied_out_unless_overwrite(cli, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("--out", str(out), "--checkpoint-every", "1") == 0
    before = files_of(out)
    assert cli("--out", str(out), "--seed", "1") == 2
    message = one_line_error(capsys)
    assert "already holds a run" in message and "--overwrite" in message and "--resume" in message
    assert files_of(out) == before
    assert cli("--out", str(out), "--seed", "1", "--steps", "2", "--overwrite") == 0
    assert sorted(files_of(out)) == ["checkpoint.pt", "loss.png", "metrics.jsonl"]   # the old run's are gone
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and load_checkpoint(out)["train_config"]["seed"] == 1


def test_cli_resume_writes_into_the_checkpoints_folder_and_restores_its_settings(cli, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                          # so the default --out, runs/toy, is inside tmp_path
    assert cli() == 0
    assert cli("--out", "runs/quick", "--lr", "0.002", "--bias-update-speed", "0.01") == 0
    toy_before = files_of(tmp_path / "runs" / "toy")
    capsys.readouterr()
    assert cli("--resume", "runs/quick", "--steps", "6", small=False) == 0
    assert "trained steps 5-6" in capsys.readouterr().out
    assert files_of(tmp_path / "runs" / "toy") == toy_before     # the default folder is untouched
    quick = tmp_path / "runs" / "quick"
    state = load_checkpoint(quick)
    assert state["step"] == 6 and state["train_config"]["lr"] == 0.002          # not the default 3e-3
    assert state["train_config"]["bias_update_speed"] == 0.01 and state["train_config"]["seq_len"] == 16
    steps = [json.loads(line)["step"] for line in (quick / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


@pytest.mark.parametrize("flag, value, saved, why", [
    ("--seed", "7", "0", "the corpus and the data order depend on it"),
    ("--lr", "0.01", "0.003", "learning-rate schedule"),
    ("--warmup-steps", "3", "1", "learning-rate schedule"),
    ("--batch-size", "4", "2", "data sampler"),
    ("--n-docs", "50", "40", "corpus"),
    ("--balance-loss", "batch", "sequence", "load-balancing"),
    ("--bias-update-speed", "0.5", "0.001", "load-balancing"),
])
def test_cli_resume_refuses_a_flag_that_differs_from_the_checkpoint(cli, tmp_path, capsys, flag, value, saved, why):
    out = tmp_path / "run"
    assert cli("--out", str(out)) == 0
    before = files_of(out)
    capsys.readouterr()
    assert main(["--resume", str(out), "--steps", "8", flag, value, "--no-progress"]) == 2
    message = one_line_error(capsys)
    assert f"{flag} {value} differs from the checkpoint's {saved}" in message and why in message
    assert files_of(out) == before


def test_cli_resume_checks_config_and_steps(cli, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("--out", str(out)) == 0
    capsys.readouterr()
    assert main(["--resume", str(out), "--steps", "8", "--config", "toy-dense", "--no-progress"]) == 2
    assert "--config toy-dense differs from the checkpoint's model (hidden_size 128 vs 32" in one_line_error(capsys)
    assert main(["--resume", str(out), "--no-progress"]) == 2
    assert "is finished; pass --steps N with N > 4" in one_line_error(capsys)
    assert main(["--resume", str(out), "--steps", "4", "--no-progress"]) == 2
    assert "--steps 4 must be greater than the checkpoint's step (4)" in one_line_error(capsys)
    # the same values typed again (what scripts/demo.sh does) are not a conflict
    assert cli("--resume", str(out), "--steps", "5", "--out", str(out)) == 0


def test_train_api_resume_refuses_other_settings(data, tmp_path):
    config = load_config("toy-dense", **TINY)
    train(config, tiny_run(steps=4, out_dir=str(tmp_path)), data=data)
    with pytest.raises(ValueError, match=r"train_config.lr \(0.01\) differs from the checkpoint's \(0.003\)"):
        train(config, tiny_run(steps=8, lr=0.01), data=data, resume=tmp_path)
    with pytest.raises(ValueError, match="model config differs from the checkpoint's.*num_hidden_layers 3 vs 2"):
        train(load_config("toy-dense", **{**TINY, "num_hidden_layers": 3}), tiny_run(steps=8), data=data,
              resume=tmp_path)
    with pytest.raises(ValueError, match=r"steps \(4\) must be greater than the checkpoint's step \(4\)"):
        train(config, tiny_run(steps=4), data=data, resume=tmp_path)


def test_cli_ctrl_c_saves_and_resuming_equals_an_uninterrupted_run(cli, tmp_path, monkeypatch, capsys):
    assert cli("--out", str(tmp_path / "straight"), "--steps", "6") == 0
    out = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        patch.setattr("deepseek_mini.data.Batcher.next_batch", Interrupt(at=4, error=None))   # Ctrl-C in step 4
        capsys.readouterr()
        assert cli("--out", str(out), "--steps", "6") == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"resume with: python -m deepseek_mini.train --resume {out}" in err
    assert load_checkpoint(out)["step"] == 4 and not (out / ".lock").exists()           # step 4 finished first
    assert main(["--resume", str(out), "--no-progress", "--samples", "0"]) == 0
    assert_same_weights(load_checkpoint(tmp_path / "straight")["model"], load_checkpoint(out)["model"])
    assert (out / "metrics.jsonl").read_text() == (tmp_path / "straight" / "metrics.jsonl").read_text()


def test_cli_a_second_run_on_a_folder_in_use_refuses(cli, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(f"{os.getppid()}\n")      # a live process: pytest's parent
    assert cli("--out", str(out)) == 2
    message = one_line_error(capsys)
    assert f"in use by another run (pid {os.getppid()})" in message
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_cli_takes_over_a_stale_lock_and_removes_its_own(cli, tmp_path, capsys):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(f"{dead.pid}\n")
    assert cli("--out", str(out)) == 0
    assert "taking over the stale lock" in capsys.readouterr().err
    assert not (out / ".lock").exists() and (out / "checkpoint.pt").is_file()


def test_the_lock_appears_with_its_pid_in_it(tmp_path, monkeypatch):
    # A lock created empty and filled afterwards can be read as stale by a second run in
    # between, which would then delete a live run's lock: the pid must be there from the start.
    from deepseek_mini.runs import RunLock

    seen = []
    real_link = os.link

    def link(source, target):
        seen.append(Path(source).read_text())
        real_link(source, target)

    monkeypatch.setattr(os, "link", link)
    with RunLock(tmp_path) as lock:
        assert lock.path.read_text() == f"{os.getpid()}\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]          # no private file left
    assert seen == [f"{os.getpid()}\n"] and not any(tmp_path.iterdir())


def test_cli_interrupt_before_any_checkpoint_prints_no_resume_command(cli, tmp_path, monkeypatch, capsys):
    def evaluate_interrupted(*args, **kwargs):           # Ctrl-C in the middle of step 3, which is
        raise KeyboardInterrupt                          # half applied: no checkpoint is written

    monkeypatch.setattr("deepseek_mini.train.evaluate", evaluate_interrupted)
    out = tmp_path / "run"
    assert cli("--out", str(out), "--eval-every", "3") == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "resume with" not in err
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]      # steps 1-2 logged, nothing to resume


def test_data_with_ids_beyond_the_vocabulary_is_one_line(tmp_path, capsys):
    # The forward no longer checks token ids (a GPU sync per step); the trainer checks the data once.
    small_vocab = load_config("toy-dense", **{**TINY, "vocab_size": 200, "bos_token_id": None,
                                                "eos_token_id": None, "pad_token_id": None})   # bytes reach 255
    small_vocab.to_json(tmp_path / "small.json")
    assert main(["--config", str(tmp_path / "small.json"), "--out", str(tmp_path / "run"), "--steps", "2", "--seq-len", "16",
                 "--n-docs", "40", "--no-progress", "--samples", "0"]) == 2
    message = one_line_error(capsys)
    assert "the training data does not fit the model: token ids must be in [0, vocab_size=200)" in message
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_cli_device_that_this_torch_lacks_is_one_line(cli, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli("--out", str(tmp_path / "run"), "--device", "cuda") == 2
    assert "device 'cuda' is not available" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_cli_out_that_is_a_file_is_one_line(cli, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert cli("--out", str(tmp_path / "notes.txt")) == 2
    assert "is a file, not a folder" in one_line_error(capsys)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("field", ["hidden_size", "routed_scaling_factor", "rms_norm_eps"])
def test_cli_string_where_a_config_number_belongs_is_one_line(tmp_path, capsys, field):
    values = load_config("toy", **TINY_MOE).to_dict()
    values[field] = str(values[field])
    (tmp_path / "bad.json").write_text(json.dumps(values))
    assert main(["--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert f"{field} must be" in one_line_error(capsys)


def test_cli_corrupt_metrics_line_is_one_line_and_loses_nothing(cli, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("--out", str(out), "--steps", "3") == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    before = files_of(out)
    capsys.readouterr()
    assert main(["--resume", str(out), "--steps", "5", "--no-progress"]) == 2
    message = one_line_error(capsys)
    assert "metrics.jsonl' line 2 is not a metrics record" in message and "delete that line" in message
    assert files_of(out) == before


def test_resume_drops_a_record_cut_off_by_a_kill(cli, tmp_path):
    out = tmp_path / "run"
    assert cli("--out", str(out), "--steps", "3") == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "train_lo')                  # the process died mid-write
    assert main(["--resume", str(out), "--steps", "4", "--no-progress", "--samples", "0"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_cli_context_too_short_for_the_samples_fails_before_training(tmp_path, capsys):
    config_path = tmp_path / "short.json"
    load_config("toy-dense", **{**TINY, "max_position_embeddings": 16}).to_json(config_path)
    argv = ["--config", str(config_path), "--steps", "2", "--batch-size", "2", "--seq-len", "8",
            "--n-docs", "40", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2                                # 4 samples; prompt 2 needs 18 of the 16 positions
    assert "sample prompt 2" in (message := one_line_error(capsys)) and "--samples 1" in message
    assert not (tmp_path / "run").exists()
    assert main([*argv, "--samples", "1"]) == 0           # "37+25=" fits: its sample is shortened
    assert (tmp_path / "run" / "loss.png").is_file()


def test_cli_failing_samples_lose_nothing(cli, tmp_path, monkeypatch, capsys):
    def broken_generate(*args, **kwargs):
        raise RuntimeError("sampling broke")

    monkeypatch.setattr("deepseek_mini.train_cli.generate", broken_generate)   # the CLI prints the samples
    out = tmp_path / "run"
    assert cli("--out", str(out), "--samples", "1") == 1
    assert "sampling broke" in one_line_error(capsys)
    assert {"checkpoint.pt", "metrics.jsonl", "loss.png"} <= set(files_of(out)) and not (out / ".lock").exists()


def test_cli_error_during_training_saves_the_last_whole_step(cli, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("deepseek_mini.data.Batcher.next_batch", Interrupt(at=3, error=RuntimeError("out of memory")))
    out = tmp_path / "run"
    assert cli("--out", str(out)) == 1
    message = one_line_error(capsys)
    assert "out of memory" in message
    assert load_checkpoint(out)["step"] == 2 and not (out / ".lock").exists()


def test_cli_overwrite_that_fails_to_start_leaves_the_old_run(cli, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("--out", str(out)) == 0
    before = files_of(out)
    assert cli("--out", str(out), "--overwrite", "--data", str(tmp_path / "missing.txt")) == 2
    assert "missing.txt" in one_line_error(capsys)
    assert files_of(out) == before                       # deleted only once data and model are built


def test_interrupt_in_the_middle_of_committing_a_step_saves_nothing(data, tmp_path, monkeypatch):
    from deepseek_mini.train import TrainingInterrupted

    def evaluate_interrupted(*args, **kwargs):           # after optimizer.step(): the step is half applied
        raise KeyboardInterrupt

    monkeypatch.setattr("deepseek_mini.train.evaluate", evaluate_interrupted)
    with pytest.raises(TrainingInterrupted, match="in the middle of step 3") as stopped:
        train(load_config("toy-dense", **TINY), tiny_run(steps=4, eval_every=3, checkpoint_every=2,
                                                          out_dir=str(tmp_path)), data=data)
    assert stopped.value.checkpoint is None and stopped.value.step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000002.pt", "metrics.jsonl"]


def test_interrupt_without_out_dir_raises_and_saves_nothing(data, monkeypatch):
    from deepseek_mini.train import TrainingInterrupted

    monkeypatch.setattr("deepseek_mini.data.Batcher.next_batch", Interrupt(at=2))
    with pytest.raises(TrainingInterrupted, match="after step 1 of 4; nothing to save") as stopped:
        train(load_config("toy-dense", **TINY), tiny_run(steps=4), data=data)
    assert isinstance(stopped.value, KeyboardInterrupt) and stopped.value.checkpoint is None
