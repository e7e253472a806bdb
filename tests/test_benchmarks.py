"""Smoke tests for the scripts in benchmarks/: they run at the smallest sizes and print their table.

No timing is asserted (benchmarks/README.md holds measured numbers); these only catch a script
that no longer runs against the package, or whose paths stopped agreeing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():   # before triton is imported: fp8_gemm's smoke run uses Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name: str):
    """Import benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


TINY_MOE = ["--tokens", "8", "32", "--experts", "4:2", "8:3", "--dim", "16", "--inter-dim", "8",
            "--min-run-time", "0.01", "--rounds", "2", "--threads", "1", "--device", "cpu"]
MOE_METHODS = ["naive", "official", "sorted", "stacked-loop", "stacked"]


@pytest.fixture
def keep_torch_threads():
    """--threads calls torch.set_num_threads, which lasts for the process: restore it afterwards."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def expected_stacked_path(dim: int, inter_dim: int, dtype) -> str:
    """What the package's own rule says the stacked experts run at these widths."""
    import torch

    from deepseek_mini.moe import grouped_mm_supported

    x, w = torch.ones(1, dim, dtype=dtype), torch.ones(2, inter_dim, dim, dtype=dtype)
    return "grouped_mm" if grouped_mm_supported(x, w) else "loop"


@pytest.mark.parametrize("backward, dtype", [(False, "float32"), (True, "float32"), (True, "bfloat16")],
                         ids=["forward", "backward", "backward-bf16"])
def test_moe_dispatch_runs_and_prints_its_table(backward, dtype, capsys, tmp_path, keep_torch_threads):
    import torch

    moe = load_script("moe_dispatch")
    out_json = tmp_path / "moe.json"
    rows = moe.main(TINY_MOE + ["--dtype", dtype, "--json", str(out_json)] + (["--backward"] if backward else []))
    printed = capsys.readouterr().out
    assert [(r["tokens"], r["n_experts"], r["topk"]) for r in rows] == [(8, 4, 2), (32, 4, 2), (8, 8, 3), (32, 8, 3)]
    path = expected_stacked_path(16, 8, getattr(torch, dtype))
    tolerance = 1e-4 if dtype == "float32" else 5e-2
    for r in rows:
        assert list(r["ms"]) == MOE_METHODS and min(r["ms"].values()) > 0
        assert r["speedup_vs_sorted"]["sorted"] == 1.0                      # ratios are against the old layer
        assert r["speedup_vs_sorted"]["stacked"] == pytest.approx(r["ms"]["sorted"] / r["ms"]["stacked"])
        assert max(r["max_abs_diff"].values()) < tolerance   # every method agrees with naive (also asserted inside)
        assert r["stacked_path"] == path
    assert printed.count(f"| stacked ({path})") == 4 and "stacked-loop" in printed and "torch.utils.benchmark" in printed
    assert "at the largest size (T=32, N_r=8, K_r=3" in printed and "the speed of the old layer" in printed
    saved = json.loads(out_json.read_text())
    assert saved["rows"] == rows and saved["settings"]["backward"] is backward


def test_moe_dispatch_reports_the_loop_where_grouped_mm_cannot_run(capsys, keep_torch_threads):
    moe = load_script("moe_dispatch")
    # An expert width of 6 float32 values is a 24-byte row: not 16-byte aligned, so no grouped_mm.
    rows = moe.main(["--tokens", "8", "--experts", "4:2", "--dim", "16", "--inter-dim", "6", "--min-run-time",
                     "0.01", "--rounds", "1", "--threads", "1", "--device", "cpu", "--backward"])
    assert rows[0]["stacked_path"] == "loop" and "stacked (loop)" in capsys.readouterr().out


def tiny_moe_calls(moe, backward: bool, n_experts: int = 6):
    """The five methods' calls on 24 tokens routed to 2 of ``n_experts`` experts (d=16, width 8)."""
    import torch

    args = moe.parse_args(["--dim", "16", "--inter-dim", "8", "--device", "cpu"])
    gate, module_list, stacked = moe.build(n_experts, 2, args, torch.device("cpu"), torch.float32)
    x = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        weights, indices, _ = gate(x)
    if backward:
        x.requires_grad_(True)
        weights.requires_grad_(True)
    calls = {name: moe.make_call(name, x, weights, indices, stacked if name in moe.STACKED else module_list, backward)
             for name in moe.METHODS}
    return calls, module_list, stacked


def test_moe_dispatch_agreement_check_catches_a_wrong_stacked_output():
    import torch

    moe = load_script("moe_dispatch")
    calls, _, stacked = tiny_moe_calls(moe, backward=False)
    assert max(moe.check_agreement(calls, 6, torch.float32).values()) < 1e-5
    with torch.no_grad():
        stacked.w2[3] *= 1.5                       # one expert's down projection no longer the ModuleList's
    with pytest.raises(AssertionError, match="stacked-loop output differs from naive's"):
        moe.check_agreement(calls, 6, torch.float32)


def test_moe_dispatch_agreement_check_compares_stacked_gradients_expert_by_expert():
    import torch

    moe = load_script("moe_dispatch")
    calls, module_list, stacked = tiny_moe_calls(moe, backward=True)
    moe.check_agreement(calls, 6, torch.float32)
    # The stacked gradient of expert e's projection is the ModuleList expert e's weight gradient.
    named = moe.named_gradients("stacked", calls["stacked"]()[1], 6)
    grads = calls["sorted"]()[1]
    for e in range(6):
        for p, proj in enumerate(moe.PROJECTIONS):
            want = grads[2 + 3 * e + p]
            want = torch.zeros_like(getattr(module_list[e], proj).weight) if want is None else want
            torch.testing.assert_close(named[f"expert {e} {proj}"], want)
    # A gradient that is wrong for one expert only, with the output untouched, is caught.
    stacked.w3.register_hook(lambda g: g.index_fill(0, torch.tensor([2]), 1.0))    # expert 2's w3 gradient: all ones
    with pytest.raises(AssertionError, match="stacked-loop expert 2 w3 gradient differs from naive's"):
        moe.check_agreement(calls, 6, torch.float32)


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


def test_moe_dispatch_rejects_bad_settings(capsys):
    moe = load_script("moe_dispatch")
    with pytest.raises(SystemExit):
        moe.parse_args(["--experts", "8:9"])
    assert "K_r <= N_r" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        moe.parse_args(["--device", "cpu", "--min-run-time", "0"])
    assert "--min-run-time > 0" in capsys.readouterr().err


def test_moe_build_warms_up_untimed_and_counts_modules(capsys, monkeypatch):
    build = load_script("moe_build")
    calls = []
    real_build = build.build_model
    monkeypatch.setattr(build, "build_model", lambda *a, **kw: calls.append(1) or real_build(*a, **kw))
    times, n_modules = build.main(["--repeats", "1"])
    printed = capsys.readouterr().out
    assert len(calls) == 2 and len(times) == 1        # one warm-up build, then the one timed
    # Stacked experts: a handful of modules per layer, none per routed expert (58 layers x 256 of them).
    assert 61 < n_modules < 58 * 256
    assert f"{n_modules} modules" in printed and "untimed warm-up" in printed


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


TINY_MTP = ["--config", "toy", "--device", "cpu", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
            "--n-docs", "40", "--prompts", "1", "--prompt-len", "6", "--new-tokens", "6", "--repeats", "1",
            "--threads", "1"]


def test_mtp_speculative_runs_and_prints_its_table(capsys, tmp_path, keep_torch_threads):
    mtp = load_script("mtp_speculative")
    out_json = tmp_path / "mtp.json"
    result = mtp.main(TINY_MTP + ["--cost-time", "0.01", "--json", str(out_json)])
    printed = capsys.readouterr().out
    rows = result["rows"]
    assert [r["domain"] for r in rows] == ["arithmetic", "grammar", "code", "sort"]
    for r in rows:
        assert r["identical"] == r["prompts"] == 1 and r["mismatches"] == []      # outputs compared, all equal
        assert r["drafted"] == r["forwards"] >= 1 and 0 <= r["accepted"] <= r["drafted"]   # one draft per pass
        assert r["acceptance"] == r["accepted"] / r["drafted"]
        assert r["tokens_per_pass"] == pytest.approx(5 / r["forwards"])       # 6 new tokens, the first from the prefill
        assert r["ratio"] == pytest.approx(r["spec_tok_s"] / r["plain_tok_s"])
    overall = result["overall"]
    assert overall["drafted"] == sum(r["drafted"] for r in rows) and overall["identical"] == 4
    assert result["training"]["steps"] == 2 and result["training"]["tokens"] == 2 * 2 * 16
    assert set(result["pass_costs_ms"]) >= {"one", "two", "draft", "predicted_ratio"}
    for column in ("acceptance", "tok/pass", "plain tok/s", "spec tok/s", "ratio", "identical"):
        assert column in printed
    assert printed.count("|    1/1") == 4 and "|    4/4" in printed and "cost model at" in printed
    assert json.loads(out_json.read_text())["rows"] == rows


def test_mtp_speculative_catches_an_output_that_differs(monkeypatch, keep_torch_threads, capsys):
    import torch

    mtp = load_script("mtp_speculative")
    real = mtp.gen.speculative_generate

    def wrong_last_token(*args, **kwargs):
        out, stats = real(*args, **kwargs)
        return torch.cat([out[:-1], (out[-1:] + 1) % 256]), stats       # the last new token changed

    monkeypatch.setattr(mtp.gen, "speculative_generate", wrong_last_token)
    args = TINY_MTP + ["--cost-time", "0", "--domains", "sort"]
    with pytest.raises(AssertionError, match="differs from plain greedy output .* new token 5"):
        mtp.main(args)                                     # float32: any difference is a bug
    result = mtp.main(args + ["--dtype", "bfloat16"])      # bfloat16: counted and reported, not fatal
    assert result["rows"][0]["identical"] == 0 and result["rows"][0]["mismatches"][0]["new_token"] == 5
    assert "outputs part at new token 5" in capsys.readouterr().out


def test_mtp_speculative_loads_the_checkpoint_it_saved(tmp_path, keep_torch_threads):
    mtp = load_script("mtp_speculative")
    args = TINY_MTP + ["--cost-time", "0", "--domains", "code"]
    trained = mtp.main(args + ["--out-dir", str(tmp_path / "run")])
    loaded = mtp.main(args + ["--checkpoint", str(tmp_path / "run")])
    assert loaded["training"]["source"].startswith("checkpoint") and loaded["training"]["steps"] == 2
    assert loaded["rows"][0]["accepted"] == trained["rows"][0]["accepted"]     # the same model, greedy
    with pytest.raises(SystemExit):
        mtp.parse_args(["--checkpoint", "a", "--out-dir", "b"])


def test_fp8_training_gap_runs_and_prints_its_table(capsys, tmp_path, keep_torch_threads):
    gap = load_script("fp8_training_gap")
    rows = gap.main(["--steps", "2", "--seeds", "0", "1", "--batch-size", "2", "--seq-len", "16",
                     "--warmup-steps", "1", "--eval-batches", "1", "--threads", "1", "--json", str(tmp_path / "g.json")])
    assert [r["seed"] for r in rows] == [0, 1]
    assert all(abs(r["gap"] - (r["val_fp8"] - r["val_base"]) / r["val_base"]) < 1e-12 for r in rows)
    out = capsys.readouterr().out
    assert "baseline fp32" in out and "loss spread over seeds" in out
    assert json.loads((tmp_path / "g.json").read_text())["rows"] == rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke path (Triton's interpreter)")
def test_fp8_gemm_checks_every_method_and_prints_its_table(capsys, tmp_path, monkeypatch):
    bench = load_script("fp8_gemm")
    rows = bench.main(["--device", "cpu", "--shapes", "64x128x256", "--min-run-time", "0.01",
                       "--json", str(tmp_path / "f.json")])
    (row,) = rows
    assert all(row[f"{m}_tflops"] > 0 and row[f"{m}_err"] < bench.TOLERANCE for m in bench.METHODS)
    out = capsys.readouterr().out
    assert "64x128x256" in out and "triton / bf16" in out and "failed" not in out
    assert json.loads((tmp_path / "f.json").read_text())["rows"] == rows
    from deepseek_mini.fp8 import kernels                  # a kernel that drops the scales is caught, not timed
    monkeypatch.setattr(kernels, "fp8_gemm", lambda aq, a_s, wq, w_s, **kw: (aq.float() @ wq.float().T).to(kw["out_dtype"]))
    (row,) = bench.main(["--device", "cpu", "--shapes", "64x128x256", "--methods", "triton", "--min-run-time", "0.01"])
    assert "triton_tflops" not in row and "differs from its reference" in row["triton_error"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--shapes", "wx"])
    assert "neither a V3 GEMM name" in capsys.readouterr().err
