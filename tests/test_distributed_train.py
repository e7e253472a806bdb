"""Parallel training under torchrun (deepseek_mini.train's ``_run_parallel``, chapter 06).

Each step's ``metrics.jsonl`` record of a gloo run equals the single-process run's on the same
global batch (train loss, balance loss, MaxVio, validation loss, within 1e-4 relative): pp 2 on
2 processes, and the issue's pp 2 x ep 2 DualPipeV on 4. A sharded checkpoint written at one
layout resumes at another with the single process's continuation, in both directions across
expert parallelism: whole expert stacks load into EP slices (pp 2 -> pp 1 x ep 2) and EP slices
into whole stacks (pp 2 x ep 2 -> pp 2 x dp 1). Every launch has a time limit
(``run_torchrun`` kills the whole group).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepseek_mini.parallel.launch import run_torchrun
from deepseek_mini.train import TrainConfig, main, train

SMALL = dict(batch_size=8, seq_len=16, n_docs=200, eval_every=2, eval_batches=2, warmup_steps=1, progress=False,
             balance_loss_alpha=0.01)
FLAGS = ["--config", "toy", "--batch-size", "8", "--seq-len", "16", "--n-docs", "200", "--eval-every", "2",
         "--eval-batches", "2", "--warmup-steps", "1", "--balance-alpha", "0.01", "--no-progress", "--samples", "0"]
COMPARED = ("train_loss", "balance_loss", "maxvio", "val_loss", "lr")


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _same(got: list[dict], want: list[dict], what: str) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want], what
    for mine, ref in zip(got, want):
        assert set(mine) == set(ref), f"{what}: step {ref['step']} logs {sorted(mine)}, one process {sorted(ref)}"
        for key in COMPARED:
            if key in ref:
                assert abs(mine[key] - ref[key]) <= 1e-4 * abs(ref[key]), \
                    f"{what}: step {ref['step']} {key} {mine[key]} vs one process {ref[key]}"


def _torchrun(nprocs: int, *args: str) -> None:
    done = run_torchrun(["-m", "deepseek_mini.train", *FLAGS, *args], nprocs, timeout=150)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> list[dict]:
    """The single-process run: 3 steps, then resumed to 5."""
    out = tmp_path_factory.mktemp("single")
    train("toy", TrainConfig(steps=3, out_dir=str(out), **SMALL))
    train(None, TrainConfig(steps=5, out_dir=str(out), **SMALL), resume=out)
    return _metrics(out)


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory) -> Path:
    """2 gloo processes, pp 2 with DualPipeV (4 stages in a V), 3 steps, a sharded checkpoint."""
    out = tmp_path_factory.mktemp("pp2")
    _torchrun(2, "--steps", "3", "--pp", "2", "--schedule", "dualpipev", "--out", str(out))
    return out


def test_pipeline_run_equals_one_process(single, pipeline_run):
    _same(_metrics(pipeline_run), single[:3], "pp 2 dualpipev")
    assert (pipeline_run / "checkpoint.dcp" / "run.pt").is_file()
    assert not (pipeline_run / "checkpoint.pt").exists()


def test_resume_at_another_layout_into_expert_slices(single, pipeline_run):
    """Saved at pp 2 x dp 1 (DualPipeV, whole expert stacks), resumed at pp 1 x dp 2 as one EP group
    of 2 (1F1B, each rank loads its half of every stack): steps 4-5 equal the single process's
    continuation."""
    _torchrun(2, "--resume", str(pipeline_run), "--steps", "5", "--pp", "1", "--ep", "2", "--schedule", "1f1b")
    _same(_metrics(pipeline_run), single, "pp 2 -> pp 1 x ep 2 resume")


@pytest.fixture(scope="module")
def expert_parallel_run(tmp_path_factory) -> Path:
    """The issue's layout: 4 gloo processes, DualPipeV over pp 2, each stage's 2 dp ranks one EP group."""
    out = tmp_path_factory.mktemp("pp2ep2")
    _torchrun(4, "--steps", "3", "--pp", "2", "--ep", "2", "--schedule", "dualpipev", "--out", str(out))
    return out


def test_four_processes_pp2_ep2_dualpipev_equals_one_process(single, expert_parallel_run):
    metrics = _metrics(expert_parallel_run)
    _same(metrics, single[:3], "pp 2 x ep 2 dualpipev")
    assert all(key in record for record in metrics for key in ("maxvio", "balance_loss"))
    assert any("val_loss" in record for record in metrics)


def test_resume_from_expert_slices_at_another_layout(single, expert_parallel_run):
    """Saved at pp 2 x ep 2 (each rank holding half of every expert stack), resumed at pp 2 x dp 1
    (whole stacks, 1F1B): the slices reshard; steps 4-5 equal the single process's continuation."""
    _torchrun(2, "--resume", str(expert_parallel_run), "--steps", "5", "--pp", "2", "--ep", "1", "--schedule", "1f1b")
    _same(_metrics(expert_parallel_run), single, "pp 2 x ep 2 -> pp 2 x dp 1 resume")


@pytest.mark.parametrize("flags, message", [
    (["--schedule", "dualpipe"], "use 'dualpipev'"),
    (["--ep", "2"], "pp 1 x ep 2 needs 2 or more processes: launch with torchrun"),
    (["--pp", "2"], "launch with torchrun"),
])
def test_refusals(flags, message, tmp_path, capsys):
    assert main([*FLAGS, "--steps", "1", "--out", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err


def test_sharded_checkpoint_needs_torchrun(pipeline_run, capsys):
    assert main(["--resume", str(pipeline_run), "--steps", "9", "--no-progress"]) == 2
    assert "is sharded (written by a parallel run): resume it under torchrun" in capsys.readouterr().err


def test_refusals_of_a_parallel_run(monkeypatch, tmp_path):
    """Under torchrun (2 processes): MTP with pp > 1, the batch-wise balance loss, compile, an ep that
    does not divide the stage's ranks or the experts, and ep on a dense model are refused before training."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    from deepseek_mini.config import load_config
    from deepseek_mini.train import _plan
    with pytest.raises(ValueError, match="MTP .* not supported with pp > 1"):
        _plan(load_config("toy", num_nextn_predict_layers=1), TrainConfig(pp=2, **SMALL), None, False)
    with pytest.raises(ValueError, match="balance_loss 'batch' is not supported"):
        _plan("toy", TrainConfig(balance_loss="batch", **SMALL), None, False)
    with pytest.raises(ValueError, match="compile is not supported"):
        _plan("toy", TrainConfig(compile=True, **SMALL), None, False)
    with pytest.raises(ValueError, match=r"ep \(2\) must divide the data-parallel ranks of a stage \(processes 2 / "
                                         r"pp 2 = 1\)"):
        _plan("toy", TrainConfig(pp=2, ep=2, **SMALL), None, False)
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ValueError, match=r"n_routed_experts \(16\) must be divisible by ep \(3\)"):
        _plan("toy", TrainConfig(ep=3, **SMALL), None, False)
    with pytest.raises(ValueError, match="this model has none"):
        _plan("toy-dense", TrainConfig(ep=2, **SMALL), None, False)


def _running(command: str) -> list[int]:
    """Live (not zombie) processes whose command line is ``command`` (Linux /proc)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "cmdline").read_bytes().replace(b"\0", b" ").strip() == command.encode() \
                    and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(proc.name))
        except (OSError, IndexError):
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from Linux's /proc")
def test_run_torchrun_kills_a_hung_launch():
    """A launch past its time limit is killed whole, torchrun and its ranks (which torchrun starts in
    sessions of their own), with a message."""
    with pytest.raises(TimeoutError, match="did not finish within 3 s and was killed"):
        run_torchrun(["--no-python", "sleep", "61.25"], 1, timeout=3)
    assert _running("sleep 61.25") == []
