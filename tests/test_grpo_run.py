"""The GRPO loop (chapter 08; deepseek_mini.grpo.step and .run): one tiny end-to-end run, exact resume, the reference's refresh,
the MoE bias update under RL, the REINFORCE baseline, bad settings and the command line."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from deepseek_mini.config import load_config
from deepseek_mini.data import verifiable_problems
from deepseek_mini.grpo import (GRPOConfig, evaluate_accuracy, grpo_step, load_policy, main, sample_groups,
                                train_grpo)
from deepseek_mini.model import build_model
from deepseek_mini.moe import moe_layers
from deepseek_mini.runs import load_checkpoint, save_checkpoint
from tests.tiny import TINY_MOE


@pytest.fixture(scope="module")
def init(tmp_path_factory) -> str:
    """A tiny MoE policy checkpoint (untrained: the loop's mechanics, not its learning, are tested here)."""
    config = load_config("toy", **TINY_MOE)
    path = tmp_path_factory.mktemp("init") / "checkpoint.pt"
    save_checkpoint(path, build_model(config, seed=0), model_config=config)
    return str(path)


def _cfg(path: str, **overrides) -> GRPOConfig:
    base = dict(init=path, steps=2, prompts_per_step=2, group_size=3, max_new_tokens=4, domains=("addition",),
                lr=1e-2, progress=False)
    return GRPOConfig(**{**base, **overrides})


def test_one_step_end_to_end(init, tmp_path):
    start, _ = load_policy(init)
    result = train_grpo(_cfg(init, steps=1, mu=2, out_dir=str(tmp_path)))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == result.history and len(records) == 1
    assert {"reward", "accuracy", "format", "kl", "clip_fraction", "completion_length", "zero_std_fraction",
            "maxvio", "step_time_s", "loss"} <= set(records[0])
    assert 1 <= records[0]["completion_length"] <= 4
    changed = [k for k, v in result.model.state_dict().items() if not torch.equal(v, start.state_dict()[k])]
    assert any("experts" in k for k in changed)                        # the policy was updated
    assert any(k.endswith("gate.bias") for k in changed)               # the MoE bias update ran (V3 §2.1.2)
    assert all(layer.tokens_per_expert.sum() == 0 for layer in moe_layers(result.model))   # load consumed
    saved = load_checkpoint(tmp_path)
    assert saved["step"] == 1 and saved["optimizer"] is not None
    for key, value in start.state_dict().items():                      # the reference is the frozen start
        assert torch.equal(saved["hooks"]["reference"][key], value)


def test_resume_equals_uninterrupted_run(init, tmp_path):
    straight = train_grpo(_cfg(init, steps=3, out_dir=str(tmp_path / "a"), ref_refresh=2))
    train_grpo(_cfg(init, steps=2, out_dir=str(tmp_path / "b"), ref_refresh=2))
    resumed = train_grpo(_cfg(init, steps=3, ref_refresh=2), resume=tmp_path / "b")
    for key, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    for key, value in a["hooks"]["reference"].items():
        assert torch.equal(b["hooks"]["reference"][key], value), key
    drop = lambda rs: [{k: v for k, v in r.items() if k != "step_time_s"} for r in rs]   # noqa: E731
    assert drop(resumed.history) == drop(straight.history)


def test_resume_refuses_a_changed_setting(init, tmp_path):
    train_grpo(_cfg(init, steps=1, out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="group_size .* differs"):
        train_grpo(_cfg(init, steps=2, group_size=4), resume=tmp_path)
    with pytest.raises(ValueError, match="must exceed the checkpoint's step"):
        train_grpo(_cfg(init, steps=1), resume=tmp_path)


def test_reference_refresh(init, tmp_path):
    result = train_grpo(_cfg(init, steps=2, ref_refresh=2, out_dir=str(tmp_path)))
    reference = load_checkpoint(tmp_path)["hooks"]["reference"]
    for key, value in result.model.state_dict().items():
        assert torch.equal(reference[key], value), key                 # copied from the policy at step 2


def test_no_reference_without_kl(init, tmp_path):
    result = train_grpo(_cfg(init, steps=1, beta=0.0, out_dir=str(tmp_path)))
    assert load_checkpoint(tmp_path)["hooks"] == {} and result.history[0]["kl"] == 0.0


def test_first_update_ratio_is_one_then_clipping(init, monkeypatch):
    import deepseek_mini.grpo.step as loop
    from deepseek_mini.hooks import MoEBalancing

    def mixed(problems, texts, group_size):      # rewards 0, 1, 2, ... in every group: advantages never 0
        r = torch.arange(group_size, dtype=torch.float32).repeat(len(problems))
        return {"reward": r, "accuracy": r * 0, "format": r * 0}
    monkeypatch.setattr(loop, "batch_rewards", mixed)
    policy, _ = load_policy(init)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.05)        # a big step: ratios move far
    cfg = dict(beta=0.0, clip_eps=0.01, group_size=4, prompts_per_step=2)
    assert grpo_step(policy, None, optimizer, MoEBalancing(), _cfg(init, mu=1, **cfg), 1)["clip_fraction"] == 0.0
    assert grpo_step(policy, None, optimizer, MoEBalancing(), _cfg(init, mu=3, **cfg), 2)["clip_fraction"] > 0.0


def test_sample_groups_layout_and_cut(init):
    policy, _ = load_policy(init)
    problems = verifiable_problems(2, seed=0, domains=("addition",))
    prompts, completions, texts = sample_groups(policy, problems, 3, 6, 1.0, seed=0)
    assert len(prompts) == len(completions) == len(texts) == 6
    assert torch.equal(prompts[0], prompts[2]) and not torch.equal(prompts[0], prompts[3])
    for c in completions:                     # each stops at its first "\n" or EOS, inclusive, or runs to 6
        stops = [i for i, t in enumerate(c.tolist()) if t in (10, 258)]
        assert stops == [len(c) - 1] or (not stops and len(c) == 6)
    assert sample_groups(policy, problems, 3, 6, 1.0, seed=0)[2] == texts        # seeded


def test_evaluate_accuracy_counts_exact_answers(init):
    policy, _ = load_policy(init)
    scores = evaluate_accuracy(policy, verifiable_problems(4, seed=0, domains=("addition",)), 4)
    assert set(scores) == {"accuracy", "accuracy_addition"} and 0.0 <= scores["accuracy"] <= 1.0


@pytest.mark.parametrize("overrides, match", [
    (dict(group_size=1), "group_size"),
    (dict(steps=0), "steps"),
    (dict(mu=1.5), "mu"),
    (dict(clip_eps=1.0), "clip_eps"),
    (dict(beta=-0.1), "beta"),
    (dict(lr=0.0), "lr"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(loss_type="ppo"), "loss_type"),
    (dict(algorithm="ppo"), "algorithm"),
    (dict(algorithm="reinforce"), "needs beta 0 and mu 1"),
    (dict(domains=("poetry",)), "domains"),
    (dict(domains="addition"), "domains"),
    (dict(ref_refresh=-1), "ref_refresh"),
    (dict(init=None), "init is None"),
])
def test_bad_configs_raise(init, overrides, match):
    with pytest.raises(ValueError, match=match):
        train_grpo(_cfg(init, **overrides))


def test_cli_help_and_errors(init, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--group-size", "--mu", "--beta", "--clip-eps", "--ref-refresh", "--algorithm", "--resume"):
        assert flag in text
    assert main(["--init", init, "--group-size", "1", "--eval", "0"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0            # one line
    assert main(["--init", init, "--steps", "1", "--prompts-per-step", "2", "--group-size", "2",
                 "--max-new-tokens", "3", "--domains", "addition", "--eval", "2", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    assert "held-out greedy accuracy after" in capsys.readouterr().out
    # --resume keeps the checkpoint's settings (G 2, not the default 8) and changes only the flags given
    assert main(["--resume", str(tmp_path), "--steps", "2", "--eval", "0", "--no-progress"]) == 0
    assert load_checkpoint(tmp_path)["train_config"]["group_size"] == 2
    assert main(["--resume", str(tmp_path), "--steps", "3", "--group-size", "4", "--eval", "0"]) == 2
    assert "group_size (4) differs" in capsys.readouterr().err


def test_python_m_deepseek_mini_grpo_runs_the_command_line():
    """``python -m deepseek_mini.grpo`` goes through the package's ``__main__`` to ``run.main``."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "deepseek_mini.grpo", "--steps", "0"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == "error: steps (0) must be a positive integer"


# ----------------------------------------------------------------------------- the run keeps train's guarantees

class Rewards:
    """Replaces ``grpo.step.batch_rewards``. ``noise``: adds a draw from the global RNG to every reward
    (as dropout or a noisy reward would), so an unrestored RNG state shows up on resume. On call ``at``
    (step ``at``), after scoring, it raises ``error``, or sends this process a real SIGINT
    (``error=None``) and returns the scores, as Ctrl-C would."""

    def __init__(self, at: int = 0, error: BaseException | None = KeyboardInterrupt(), noise: bool = False,
                 signum: int = signal.SIGINT) -> None:
        from deepseek_mini.data import batch_rewards

        self.at, self.error, self.noise, self.calls, self.original = at, error, noise, 0, batch_rewards
        self.signum = signum

    def __call__(self, problems, texts, group_size):
        self.calls += 1
        scores = self.original(problems, texts, group_size)
        if self.noise:
            scores["reward"] = scores["reward"] + torch.rand(scores["reward"].shape)
        if self.calls == self.at:
            if self.error is None:
                signal.raise_signal(self.signum)
            else:
                raise self.error
        return scores


def _records(folder) -> list[dict]:
    """metrics.jsonl without the wall-clock field."""
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "step_time_s"} for line in lines]


def _assert_same_run(a, b) -> None:
    """Bit-identical weights, reference and metrics in two run folders."""
    first, second = load_checkpoint(a), load_checkpoint(b)
    assert first["step"] == second["step"]
    for part in ("model", "reference"):
        mine = first["model"] if part == "model" else first["hooks"]["reference"]
        theirs = second["model"] if part == "model" else second["hooks"]["reference"]
        for key, value in mine.items():
            assert torch.equal(theirs[key], value), (part, key)
    assert _records(a) == _records(b)


def test_ctrl_c_finishes_the_step_saves_and_resume_equals_uninterrupted(init, tmp_path, monkeypatch):
    from deepseek_mini.train import TrainingInterrupted

    train_grpo(_cfg(init, steps=4, ref_refresh=3, out_dir=str(tmp_path / "a")))
    with monkeypatch.context() as patch:
        patch.setattr("deepseek_mini.grpo.step.batch_rewards", Rewards(at=2, error=None))   # Ctrl-C in step 2
        with pytest.raises(TrainingInterrupted, match="after step 2 of 4.*resume=") as stopped:
            train_grpo(_cfg(init, steps=4, ref_refresh=3, out_dir=str(tmp_path / "b")))
    assert stopped.value.step == 2 and stopped.value.checkpoint == tmp_path / "b" / "checkpoint.pt"
    assert load_checkpoint(tmp_path / "b")["step"] == 2 and not (tmp_path / "b" / ".lock").exists()
    assert [r["step"] for r in _records(tmp_path / "b")] == [1, 2]      # step 2 finished first
    train_grpo(_cfg(init, steps=4, ref_refresh=3), resume=tmp_path / "b")
    _assert_same_run(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_cli_ctrl_c_or_sigterm_exits_128_plus_signal_with_the_resume_command(signum, status, init, tmp_path,
                                                                             monkeypatch, capsys):
    args = ["--init", init, "--steps", "3", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "3",
            "--domains", "addition", "--eval", "0", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    out = tmp_path / "b"
    with monkeypatch.context() as patch:
        patch.setattr("deepseek_mini.grpo.step.batch_rewards", Rewards(at=2, error=None, signum=signum))
        capsys.readouterr()
        assert main([*args, "--out", str(out)]) == status
    err = capsys.readouterr().err
    assert ("Ctrl-C" if signum == signal.SIGINT else "SIGTERM") + ": stopping after this step" in err
    assert "Traceback" not in err and f"resume with: python -m deepseek_mini.grpo --resume {out}" in err
    assert main(["--resume", str(out), "--eval", "0", "--no-progress"]) == 0
    _assert_same_run(tmp_path / "a", out)


def test_an_error_mid_step_saves_the_last_whole_step_with_its_rng_state(init, tmp_path, monkeypatch):
    # the global RNG is drawn in every step: a resume restores it, and the failed step's draw is undone
    monkeypatch.setattr("deepseek_mini.grpo.step.batch_rewards", Rewards(noise=True))
    train_grpo(_cfg(init, steps=3, out_dir=str(tmp_path / "a")))
    monkeypatch.setattr("deepseek_mini.grpo.step.batch_rewards",
                        Rewards(at=3, error=RuntimeError("out of memory"), noise=True))
    with pytest.raises(RuntimeError, match="out of memory") as failed:
        train_grpo(_cfg(init, steps=3, out_dir=str(tmp_path / "b")))
    assert "state after step 2 was saved" in " ".join(getattr(failed.value, "__notes__", ["(python < 3.11)"])) \
        or not hasattr(failed.value, "add_note")
    assert load_checkpoint(tmp_path / "b")["step"] == 2 and not (tmp_path / "b" / ".lock").exists()
    monkeypatch.setattr("deepseek_mini.grpo.step.batch_rewards", Rewards(noise=True))
    train_grpo(_cfg(init, steps=3), resume=tmp_path / "b")
    _assert_same_run(tmp_path / "a", tmp_path / "b")


def test_a_stop_after_the_optimizer_stepped_saves_nothing(init, tmp_path, monkeypatch):
    from deepseek_mini.hooks import MoEBalancing
    from deepseek_mini.train import TrainingInterrupted

    update = MoEBalancing.after_optimizer_step

    def interrupted_in_step_2(self, model, step):   # after optimizer.step(): step 2 is half applied
        if step == 2:
            raise KeyboardInterrupt
        return update(self, model, step)
    monkeypatch.setattr(MoEBalancing, "after_optimizer_step", interrupted_in_step_2)
    with pytest.raises(TrainingInterrupted, match="in the middle of step 2") as stopped:
        train_grpo(_cfg(init, steps=3, checkpoint_every=1, out_dir=str(tmp_path)))
    assert stopped.value.checkpoint is None and not (tmp_path / "checkpoint.pt").exists()
    assert load_checkpoint(tmp_path)["step"] == 1                        # checkpoint-000001.pt, intact


def test_an_occupied_folder_is_refused_unless_overwrite(init, tmp_path, capsys):
    train_grpo(_cfg(init, steps=1, out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="already holds a run .*overwrite=True"):
        train_grpo(_cfg(init, steps=1, seed=1, out_dir=str(tmp_path)))
    assert main(["--init", init, "--out", str(tmp_path), "--eval", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and f"--resume {tmp_path}" in err
    train_grpo(_cfg(init, steps=1, seed=1, out_dir=str(tmp_path)), overwrite=True)
    assert load_checkpoint(tmp_path)["train_config"]["seed"] == 1 and len(_records(tmp_path)) == 1


def test_resume_drops_the_metrics_a_killed_run_wrote_after_its_checkpoint(init, tmp_path):
    train_grpo(_cfg(init, steps=3, out_dir=str(tmp_path / "a")))
    train_grpo(_cfg(init, steps=2, out_dir=str(tmp_path / "b")))
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:     # a hard kill during step 4: one whole record
        f.write(json.dumps({"step": 3, "reward": -1.0}) + "\n" + '{"step": 4, "rew')   # and a cut-off line
    train_grpo(_cfg(init, steps=3), resume=tmp_path / "b")
    assert _records(tmp_path / "b") == _records(tmp_path / "a")


def test_the_last_step_keeps_its_periodic_checkpoint_too(init, tmp_path):
    train_grpo(_cfg(init, steps=2, checkpoint_every=2, out_dir=str(tmp_path)))
    assert load_checkpoint(tmp_path / "checkpoint-000002.pt")["step"] == 2
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2


def test_cli_a_failure_mid_run_is_one_line_exit_1_after_saving(init, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("deepseek_mini.grpo.step.batch_rewards", Rewards(at=2, error=RuntimeError("out of memory")))
    assert main(["--init", init, "--steps", "3", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens",
                 "3", "--domains", "addition", "--eval", "0", "--no-progress", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: out of memory") and "Traceback" not in err
    assert load_checkpoint(tmp_path)["step"] == 1 and not (tmp_path / ".lock").exists()
