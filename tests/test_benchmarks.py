"""Smoke tests for the scripts in benchmarks/: they run at the smallest sizes and print their table.

No timing is asserted (benchmarks/README.md holds measured numbers); these only catch a script
that no longer runs against the package, or whose paths stopped agreeing.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name: str):
    """Import benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


TINY_MOE = ["--tokens", "8", "32", "--experts", "4:2", "8:3", "--dim", "16", "--inter-dim", "8",
            "--repeats", "1", "--warmup", "0", "--threads", "1"]


@pytest.fixture
def keep_torch_threads():
    """--threads calls torch.set_num_threads, which lasts for the process: restore it afterwards."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_moe_dispatch_runs_and_prints_its_table(backward, capsys, tmp_path, keep_torch_threads):
    moe = load_script("moe_dispatch")
    out_json = tmp_path / "moe.json"
    rows = moe.main(TINY_MOE + ["--json", str(out_json)] + (["--backward"] if backward else []))
    printed = capsys.readouterr().out
    assert [(r["tokens"], r["n_experts"], r["topk"]) for r in rows] == [(8, 4, 2), (32, 4, 2), (8, 8, 3), (32, 8, 3)]
    for r in rows:
        assert min(r["naive_ms"], r["official_ms"], r["efficient_ms"]) > 0
        assert r["max_abs_diff"] < 1e-4             # the three dispatches agree (also asserted inside)
    assert "naive/efficient" in printed and "official/efficient" in printed
    assert "at the largest size (T=32, N_r=8, K_r=3" in printed and "naive/efficient = " in printed
    saved = json.loads(out_json.read_text())
    assert saved["rows"] == rows and saved["settings"]["backward"] is backward


def test_moe_official_style_matches_the_package_dispatch():
    import torch
    from torch import nn

    from deepseek_mini.layers import MLP
    from deepseek_mini.moe import moe_dispatch

    moe = load_script("moe_dispatch")
    torch.manual_seed(0)
    experts = nn.ModuleList(MLP(16, 8) for _ in range(6))
    x = torch.randn(20, 16)
    indices = torch.rand(20, 5).argsort(dim=-1)[:, :2]   # 2 distinct experts of 0..4: expert 5 gets no token
    weights = torch.rand(20, 2)
    torch.testing.assert_close(moe.moe_official_style(x, weights, indices, experts),
                               moe_dispatch(x, weights, indices, experts))


def test_moe_dispatch_rejects_a_bad_expert_configuration(capsys):
    moe = load_script("moe_dispatch")
    with pytest.raises(SystemExit):
        moe.parse_args(["--experts", "8:9"])
    assert "K_r <= N_r" in capsys.readouterr().err


def test_mla_decode_runs_and_both_paths_agree(capsys, keep_torch_threads):
    mla = load_script("mla_decode")
    rows = mla.main(["--contexts", "8", "24", "--min-run-time", "0.02", "--rounds", "2", "--threads", "1",
                     "--device", "cpu"])
    printed = capsys.readouterr().out
    assert [r["context"] for r in rows] == [8, 24]
    for r in rows:
        assert min(r["naive_ms"], r["absorb_ms"]) > 0
        assert r["rel_diff"] < 1e-4                     # same past in both cache layouts: same attention
        assert r["naive_bytes"] == (r["context"] + 1) * 16 * (64 + 32 + 64) * 4       # mini dims, fp32
        assert r["absorb_bytes"] == (r["context"] + 1) * (256 + 32) * 4
    assert "torch.utils.benchmark" in printed and "naive/absorbed" in printed


def test_mla_decode_rejects_bad_settings(capsys):
    mla = load_script("mla_decode")
    with pytest.raises(SystemExit):
        mla.parse_args(["--device", "cpu", "--min-run-time", "0"])
    assert "--min-run-time > 0" in capsys.readouterr().err
