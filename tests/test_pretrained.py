"""Checkpoints in and out (deepseek_mini.pretrained, and the HF config import in config.py).

The parity tests build a tiny random transformers ``DeepseekV3ForCausalLM`` (MLA with a
compressed query, MoE with group-limited routing and a non-zero router bias, 3 layers, the
first dense) and hold our logits equal to its logits on both attention paths; they skip when
transformers (a test-only dependency) is missing. The rest writes checkpoints by hand with
safetensors: both expert layouts, shards, FP8 blocks, the MTP layers (DeepSeek-V3 §2.2: a
hand-written layer, round trips, the stored copies of embedding and head) and every error.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import deepseek_mini.pretrained as pretrained
from deepseek_mini import build_model, from_pretrained, load_config, save_pretrained
from deepseek_mini.config import ModelConfig
from deepseek_mini.fp8.quant import dequantize_weight
from deepseek_mini.model import cut
from deepseek_mini.mtp import mtp_logits
from deepseek_mini.pretrained import (
    INDEX_FILE, WEIGHTS_FILE, hf_config_dict,
)

E4M3_MAX = 448.0          # largest finite float8_e4m3fn value
E4M3_REL_STEP = 2.0**-4   # 3 mantissa bits: rounding error <= half of 2^-3 relative
E4M3_MIN_STEP = 2.0**-9   # subnormal spacing, relative to the block scale
TOKENS = torch.tensor([[3, 17, 42, 5, 63, 0, 12, 29, 33, 7, 50, 1],
                       [60, 2, 2, 9, 41, 38, 15, 4, 22, 56, 11, 30]])

# A tiny DeepSeek-V3 in transformers' names: 3 layers (0 dense), 8 experts in 4 groups, top-2
# from the best 2 groups, one shared expert, MLA with q_lora_rank.
HF_TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
    num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=16,
    q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=64,
    routed_scaling_factor=2.5,
)


# --------------------------------------------------------------------- helpers
def _hf_model(**changes):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**{**HF_TINY, **changes})).eval()
    with torch.no_grad():      # every weight random, norm gains included; the router bias too
        for p in model.parameters():
            p.normal_(0.0, 0.2 if p.dim() > 1 else 1.0)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.1)
    return model


def _hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


def _our_model(preset: str = "toy", dtype: torch.dtype | None = None, **changes):
    """A small model of ours with random norm gains and router biases (what init leaves at 1 and 0)."""
    model = build_model(load_config(preset, num_hidden_layers=3, **changes), seed=0, dtype=dtype)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.dim() == 1:
                tensor.normal_(0.0, 1.0)
    return model.eval()


def _same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def _rewrite(directory, edit) -> None:
    """Apply edit(tensors) to the single model.safetensors of a checkpoint directory."""
    tensors = load_file(directory / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})


def _edit_config(directory, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture(scope="module")
def hf_model():
    return _hf_model()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    """transformers' own save_pretrained: the released per-expert layout."""
    directory = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def fused_dir(hf_model, hf_dir, tmp_path_factory):
    """transformers 5.x in-memory names on disk: experts as (E, 2I, d) and (E, d, I) tensors."""
    directory = tmp_path_factory.mktemp("fused")
    shutil.copy(hf_dir / "config.json", directory / "config.json")
    save_file({k: v.contiguous() for k, v in hf_model.state_dict().items()}, directory / WEIGHTS_FILE,
              metadata={"format": "pt"})
    return directory


# --------------------------------------------------------------- parity with HF
@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_logits_match_transformers(hf_model, hf_dir, fused_dir, attn_impl, layout):
    with safe_open(str(fused_dir / WEIGHTS_FILE), "pt") as f:   # the two layouts really differ
        assert "model.layers.1.mlp.experts.gate_up_proj" in f.keys()
    model = from_pretrained(hf_dir if layout == "per_expert" else fused_dir, attn_impl=attn_impl)
    assert model.config.attn_impl == attn_impl and not model.training
    assert model.layers["1"].ffn.gate.bias.abs().min() > 0       # e_score_correction_bias arrived
    torch.testing.assert_close(_logits(model), _hf_logits(hf_model), rtol=0, atol=1e-4)


def test_half_split_rope_checkpoint_is_interleaved_on_load(tmp_path):
    """rope_interleave=False pairs channel j with j + d/2; the loader reorders the rope rows."""
    hf = _hf_model(rope_interleave=False)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    assert model.config.rope_interleave is True
    torch.testing.assert_close(_logits(model), _hf_logits(hf), rtol=0, atol=1e-4)


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_transformers_loads_what_we_save(hf_model, hf_dir, tmp_path, layout):
    transformers = pytest.importorskip("transformers")
    save_pretrained(from_pretrained(hf_dir), tmp_path, expert_layout=layout)
    with safe_open(str(tmp_path / WEIGHTS_FILE), "pt") as f:
        assert ("model.layers.1.mlp.experts.gate_up_proj" in f.keys()) == (layout == "fused")
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert (config.model_type, config.n_group, config.topk_group) == ("deepseek_v3", 4, 2)
    reloaded, info = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(_hf_logits(reloaded.eval()), _hf_logits(hf_model), rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")   # torch, on N_s = 0
def test_no_shared_expert_and_unnormalised_gates(tmp_path):
    """N_s = 0 (transformers keeps zero-width shared experts) and norm_topk_prob = False both match."""
    transformers = pytest.importorskip("transformers")
    hf = _hf_model(n_shared_experts=0, norm_topk_prob=False)
    hf.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf")
    assert model.layers["1"].ffn.shared_experts is None and not model.config.norm_topk_prob
    torch.testing.assert_close(_logits(model), _hf_logits(hf), rtol=0, atol=1e-4)
    save_pretrained(model, tmp_path / "ours")
    reloaded, info = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(_hf_logits(reloaded.eval()), _hf_logits(hf), rtol=0, atol=1e-5)


def test_transformers_loads_our_toy_model(tmp_path):
    """Our own preset (vocabulary 260, 16 experts, no query compression) runs the same in transformers."""
    transformers = pytest.importorskip("transformers")
    model = _our_model()
    save_pretrained(model, tmp_path)
    reloaded = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_hf_logits(reloaded), _logits(model), rtol=0, atol=1e-4)


def test_transformers_config_json_loads_unchanged(hf_dir):
    raw = json.loads((hf_dir / "config.json").read_text())
    assert {"rope_parameters", "qk_head_dim", "output_router_logits"} <= raw.keys()
    config = load_config(hf_dir / "config.json")
    assert config.rope_theta == raw["rope_parameters"]["rope_theta"] and config.rope_scaling is None
    assert (config.n_group, config.topk_group, config.kv_lora_rank) == (4, 2, 16)


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_gives_identical_tensors(tmp_path, layout, dtype):
    model = _our_model(dtype=dtype)
    save_pretrained(model, tmp_path, expert_layout=layout)
    loaded = from_pretrained(tmp_path)
    assert loaded.embed.weight.dtype == dtype                          # config.json records the dtype
    assert loaded.layers["1"].ffn.gate.bias.dtype == torch.float32       # the router bias stays FP32
    _same_state(model, loaded)
    assert loaded.config == model.config


def test_sharded_checkpoint_round_trip(tmp_path):
    model = _our_model(num_nextn_predict_layers=1)
    save_pretrained(model, tmp_path, max_shard_size=200_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (tmp_path / WEIGHTS_FILE).exists()
    assert shards == sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    _same_state(model, from_pretrained(tmp_path))
    # Shards read last layer first: the MTP layer's copies of embedding and head come before them.
    index["weight_map"] = dict(reversed(index["weight_map"].items()))
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    _same_state(model, from_pretrained(tmp_path))


def test_transformers_reads_our_shards(hf_model, hf_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_pretrained(from_pretrained(hf_dir), tmp_path, max_shard_size=20_000, expert_layout="fused")
    assert (tmp_path / INDEX_FILE).is_file()
    reloaded = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_hf_logits(reloaded), _hf_logits(hf_model), rtol=0, atol=1e-5)


def test_dense_mla_and_tied_models_round_trip(tmp_path):
    dense = _our_model("toy-mla")
    save_pretrained(dense, tmp_path / "dense")
    loaded = from_pretrained(tmp_path / "dense")
    assert not loaded.config.uses_moe                 # placeholder expert fields build no MoE layer
    _same_state(dense, loaded)
    tied = _our_model(tie_word_embeddings=True)
    save_pretrained(tied, tmp_path / "tied")
    with safe_open(str(tmp_path / "tied" / WEIGHTS_FILE), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    loaded = from_pretrained(tmp_path / "tied")
    assert loaded.head.weight is loaded.embed.weight
    _same_state(tied, loaded)
    # A tied checkpoint that also stores the head (some writers do) loads the same model.
    _rewrite(tmp_path / "tied", lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    _same_state(tied, from_pretrained(tmp_path / "tied"))


def test_save_refuses_an_existing_checkpoint_unless_overwrite(tmp_path):
    model = _our_model()
    save_pretrained(model, tmp_path, max_shard_size=200_000)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pretrained(model, tmp_path)
    save_pretrained(model, tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", WEIGHTS_FILE, "tokenizer.json"]
    _same_state(model, from_pretrained(tmp_path))


@pytest.mark.parametrize("failing_write", [1, 2, 3], ids=["first_shard", "second_shard", "last_shard"])
def test_a_failed_overwrite_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch, failing_write):
    # overwrite=True used to delete the old checkpoint first: a full disk lost both.
    old = _our_model()
    save_pretrained(old, tmp_path, max_shard_size=200_000)
    (tmp_path / "tokenizer.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert INDEX_FILE in before and len(before) >= 5                # a sharded checkpoint
    calls = []

    def disk_fills_up(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == failing_write:
            Path(filename).write_bytes(b"half a shard")
            raise OSError(28, "No space left on device")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(pretrained, "save_file", disk_fills_up)
    new = _our_model(dtype=torch.bfloat16)
    with pytest.raises(OSError, match="No space left on device"):
        save_pretrained(new, tmp_path, max_shard_size=200_000, overwrite=True)
    assert len(calls) == failing_write
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before      # no temporary file left either
    _same_state(old, from_pretrained(tmp_path))

    monkeypatch.setattr(pretrained, "save_file", save_file)
    save_pretrained(new, tmp_path, overwrite=True)                            # now one file: shards go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", WEIGHTS_FILE, "tokenizer.json"]
    _same_state(new, from_pretrained(tmp_path))


def test_save_refuses_what_the_layout_cannot_describe(tmp_path):
    with pytest.raises(ValueError, match="Multi-head Latent Attention"):
        save_pretrained(_our_model("toy-dense"), tmp_path)
    with pytest.raises(ValueError, match="sigmoid"):
        save_pretrained(_our_model(scoring_func="softmax"), tmp_path)
    with pytest.raises(ValueError, match="expert_layout"):
        save_pretrained(_our_model(), tmp_path, expert_layout="stacked")
    with pytest.raises(ValueError, match="meta device"):
        save_pretrained(build_model("toy", device="meta"), tmp_path)
    with pytest.raises(ValueError, match=r"whole model.*stage holding layers \['1', '2'\] without the embedding"):
        save_pretrained(cut(_our_model(), [1, 2], head=True), tmp_path)


def test_a_pipeline_stage_loads_its_part_of_a_checkpoint(tmp_path):
    # Stage keys are the whole model's: the stage takes its tensors from the whole state dict.
    model = _our_model()
    stage = cut(build_model(model.config, device="meta"), [1, 2], head=True).to_empty(device="cpu")
    missing, unexpected = stage.load_state_dict(model.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith(("embed.", "layers.0.")) for k in unexpected)
    assert torch.equal(stage.layers["2"].ffn.gate.bias, model.layers["2"].ffn.gate.bias)


def test_greedy_router_is_written_as_one_group(tmp_path):
    """topk_method 'greedy' (plain top-k of s + b) is noaux_tc with a single group: same model."""
    model = _our_model(topk_method="greedy")
    assert hf_config_dict(model.config)["n_group"] == 1 and hf_config_dict(model.config)["topk_group"] == 1
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


# ---------------------------------------------------------------------- FP8
def _blocks(n: int, k: int, block: int):
    for i in range(0, n, block):
        for j in range(0, k, block):
            yield i // block, j // block, slice(i, i + block), slice(j, j + block)


def _quantise(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block E4M3: scale = amax / 448, like DeepSeek-V3's released weights (loops, as a reference)."""
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    scale = torch.empty(-(-n // block), -(-k // block))
    for bi, bj, rows, cols in _blocks(n, k, block):
        scale[bi, bj] = weight[rows, cols].abs().max().clamp(min=1e-12) / E4M3_MAX
        q[rows, cols] = (weight[rows, cols] / scale[bi, bj]).to(torch.float8_e4m3fn)
    return q, scale


def _dequantise_by_loops(q: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    out = torch.empty(q.shape)
    for bi, bj, rows, cols in _blocks(*q.shape, block):
        out[rows, cols] = q[rows, cols].float() * scale[bi, bj]
    return out


def test_dequantize_weight_ragged_blocks():
    torch.manual_seed(0)
    q = (torch.randn(300, 200) * 8).to(torch.float8_e4m3fn)       # 3 x 2 blocks, the last ones ragged
    scale = 2.0 ** torch.randint(-10, 0, (3, 2)).float()
    exact = _dequantise_by_loops(q, scale, 128)
    assert torch.equal(dequantize_weight(q, scale), exact)
    assert dequantize_weight(q, scale, dtype=torch.bfloat16).dtype == torch.bfloat16
    stacked = dequantize_weight(torch.stack([q, q]), torch.stack([scale, 2 * scale]))  # fused experts
    assert torch.equal(stacked[0], exact) and torch.equal(stacked[1], 2 * exact)
    with pytest.raises(ValueError, match=r"needs scales of shape \(3, 2\), got \(2, 2\)"):
        dequantize_weight(q, scale[:2])


def test_fp8_quantisation_error_is_within_e4m3_precision():
    torch.manual_seed(1)
    weight = torch.randn(300, 200) * torch.logspace(-3, 1, 200)    # columns of very different sizes
    q, scale = _quantise(weight, 128)
    restored = dequantize_weight(q, scale)
    for bi, bj, rows, cols in _blocks(300, 200, 128):
        error = (restored[rows, cols] - weight[rows, cols]).abs()
        assert (error <= E4M3_REL_STEP * weight[rows, cols].abs() + E4M3_MIN_STEP * scale[bi, bj]).all()


def _fp8_copy(src, dst, block: int, exact: bool) -> None:
    """Copy a checkpoint, storing every linear weight (HF '*proj*') in E4M3 with per-block scales.

    With ``exact``, the weights are first replaced by values the blocks represent exactly (and
    ``src`` rewritten with them), so the loaded model must equal the one loaded from ``src``.
    """
    shutil.copytree(src, dst)
    _edit_config(dst, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                           "weight_block_size": [block, block]})
    tensors, fp8 = load_file(src / WEIGHTS_FILE), {}
    for name, weight in tensors.items():
        if "proj" not in name:      # embedding, norms, router and head stay in high precision (§3.3.1)
            fp8[name] = weight
            continue
        experts = weight.reshape(-1, *weight.shape[-2:])        # fused (E, N, K): one block grid per expert
        qs, scales = zip(*(_quantise(w, block) for w in experts))
        if exact:
            tensors[name] = torch.stack([_dequantise_by_loops(q, s, block) for q, s in zip(qs, scales)]
                                        ).reshape(weight.shape)
        fp8[name] = torch.stack(qs).reshape(weight.shape)
        fp8[name + "_scale_inv"] = torch.stack(scales).reshape(*weight.shape[:-2], *scales[0].shape)
    save_file(fp8, dst / WEIGHTS_FILE, metadata={"format": "pt"})
    if exact:
        save_file(tensors, src / WEIGHTS_FILE, metadata={"format": "pt"})


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_fp8_checkpoint_is_dequantised_on_load(tmp_path, layout):
    model = _our_model(num_nextn_predict_layers=1)      # the MTP layer (3) is quantised like any other
    save_pretrained(model, tmp_path / "ref", expert_layout=layout)
    _fp8_copy(tmp_path / "ref", tmp_path / "fp8", block=16, exact=False)
    with safe_open(str(tmp_path / "fp8" / WEIGHTS_FILE), "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.kv_b_proj.weight").get_dtype() == "F8_E4M3"
        assert f.get_slice("model.layers.3.eh_proj.weight").get_dtype() == "F8_E4M3"
    loaded = from_pretrained(tmp_path / "fp8")
    for (key, got), want in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert got.dtype == torch.float32, key
        assert ((got - want).abs() <= E4M3_REL_STEP * want.abs() + 1e-3).all(), key
    # Exactly representable weights come back bit for bit, with 16 x 16 blocks (ragged: 24 = 16 + 8).
    _fp8_copy(tmp_path / "ref", tmp_path / "fp8-exact", block=16, exact=True)
    _same_state(from_pretrained(tmp_path / "ref"), from_pretrained(tmp_path / "fp8-exact"))


def test_fp8_errors_name_the_tensor(tmp_path):
    save_pretrained(_our_model(), tmp_path / "ref")
    _fp8_copy(tmp_path / "ref", tmp_path / "fp8", block=16, exact=False)
    name = "model.layers.2.self_attn.o_proj.weight"
    scale = load_file(tmp_path / "fp8" / WEIGHTS_FILE)[name + "_scale_inv"]
    _rewrite(tmp_path / "fp8", lambda t: t.pop(name + "_scale_inv"))
    with pytest.raises(ValueError, match=f"FP8 tensor {name} in model.safetensors has no {name}_scale_inv"):
        from_pretrained(tmp_path / "fp8")
    _rewrite(tmp_path / "fp8", lambda t: t.update({name + "_scale_inv": torch.ones(3, 3)}))
    with pytest.raises(ValueError, match=rf"{name} in model.safetensors: .*got \(3, 3\)"):
        from_pretrained(tmp_path / "fp8")
    _rewrite(tmp_path / "fp8", lambda t: t.update({name + "_scale_inv": scale,
                                                   "model.norm.weight_scale_inv": torch.ones(1, 1)}))
    with pytest.raises(ValueError, match="unexpected tensor model.norm.weight_scale_inv .* not FP8"):
        from_pretrained(tmp_path / "fp8")


# ------------------------------------------------------------- MTP and YaRN
# MTP module 0 of HF_TINY (3 layers: the checkpoint's layer 3), written by hand: HF suffix -> our key
# under mtp.0. (the experts are listed per expert below). Independent of pretrained.py's own tables.
HF_MTP_NAMES = {
    "enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
    "shared_head.norm.weight": "shared_head.norm.weight",
    "input_layernorm.weight": "block.attn_norm.weight", "post_attention_layernorm.weight": "block.ffn_norm.weight",
    "self_attn.q_a_proj.weight": "block.attn.wq_a.weight", "self_attn.q_a_layernorm.weight": "block.attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "block.attn.wq_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "block.attn.wkv_a.weight",
    "self_attn.kv_a_layernorm.weight": "block.attn.kv_norm.weight",
    "self_attn.kv_b_proj.weight": "block.attn.wkv_b.weight",
    "self_attn.o_proj.weight": "block.attn.wo.weight", "mlp.gate.weight": "block.ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "block.ffn.gate.bias",
    "mlp.shared_experts.gate_proj.weight": "block.ffn.shared_experts.w1.weight",
    "mlp.shared_experts.up_proj.weight": "block.ffn.shared_experts.w3.weight",
    "mlp.shared_experts.down_proj.weight": "block.ffn.shared_experts.w2.weight",
}


@pytest.fixture(scope="module")
def hf_mtp(hf_dir, tmp_path_factory):
    """transformers' checkpoint plus a hand-written MTP layer 3: (directory, {HF name: tensor} of the layer).

    eh_proj's halves differ by +10, so a swap cannot go unseen: columns [:, :d] (the released
    convention) act on the embedding.
    """
    directory = tmp_path_factory.mktemp("hf_mtp")
    shutil.copytree(hf_dir, directory, dirs_exist_ok=True)
    main = load_file(hf_dir / WEIGHTS_FILE)
    shapes = build_model(from_pretrained(hf_dir).config.replace(num_nextn_predict_layers=1), device="meta"
                         ).mtp[0].state_dict()
    generator = torch.Generator().manual_seed(4)
    layer = {f"model.layers.3.{hf}": torch.randn(shapes[ours].shape, generator=generator)
             for hf, ours in HF_MTP_NAMES.items()}
    d = 32
    layer["model.layers.3.eh_proj.weight"][:, d:] += 10.0
    for e in range(8):
        for hf, ours in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            layer[f"model.layers.3.mlp.experts.{e}.{hf}.weight"] = torch.randn(
                shapes[f"block.ffn.experts.{ours}"].shape[1:], generator=generator)
    layer["model.layers.3.embed_tokens.weight"] = main["model.embed_tokens.weight"].clone()   # the released copies
    layer["model.layers.3.shared_head.head.weight"] = main["lm_head.weight"].clone()
    save_file({**main, **layer}, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    assert json.loads((directory / "config.json").read_text())["num_nextn_predict_layers"] == 1
    return directory, layer


def _mtp_expected(layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our mtp.0 state that the hand-written layer 3 describes."""
    want = {f"mtp.0.{ours}": layer[f"model.layers.3.{hf}"] for hf, ours in HF_MTP_NAMES.items()}
    for hf, ours in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
        want[f"mtp.0.block.ffn.experts.{ours}"] = torch.stack(
            [layer[f"model.layers.3.mlp.experts.{e}.{hf}.weight"] for e in range(8)])
    return want


def test_hand_written_mtp_layer_loads_into_the_exact_tensors(hf_model, hf_mtp):
    directory, layer = hf_mtp
    model = from_pretrained(directory)
    assert model.config.num_nextn_predict_layers == 1 and len(model.mtp) == 1
    state = model.state_dict()
    want = _mtp_expected(layer)
    assert {k for k in state if k.startswith("mtp.")} == set(want)
    for key, tensor in want.items():
        assert torch.equal(state[key], tensor), key
    torch.testing.assert_close(_logits(model), _hf_logits(hf_model), rtol=0, atol=1e-4)   # main model intact
    # Embedding first: with h = 0 (hnorm(0) = 0) the block's input is eh_proj[:, :d] @ enorm(emb).
    module, d = model.mtp[0], 32
    emb = torch.randn(2, 5, d)
    seen = []
    module.block.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        module(torch.zeros(2, 5, d), emb, (model.rope_cos[:5], model.rope_sin[:5]))
    eh = layer["model.layers.3.eh_proj.weight"]
    torch.testing.assert_close(seen[0], module.enorm(emb) @ eh[:, :d].T, rtol=0, atol=1e-5)


def test_transformers_checkpoints_claim_one_mtp_layer_without_weights(hf_dir):
    # transformers writes num_nextn_predict_layers: 1 and no layer 3: the main model loads, no MTP module.
    assert json.loads((hf_dir / "config.json").read_text())["num_nextn_predict_layers"] == 1
    model = from_pretrained(hf_dir)
    assert model.config.num_nextn_predict_layers == 0 and model.mtp is None
    # Asking for the module anyway: its tensors are missing.
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.3\.enorm\.weight \(and \d+ more\) in "):
        from_pretrained(hf_dir, num_nextn_predict_layers=1)


def test_mtp_copies_of_embedding_and_head_are_checked_and_optional(hf_mtp, tmp_path):
    directory, layer = hf_mtp
    shutil.copytree(directory, tmp_path, dirs_exist_ok=True)
    want = from_pretrained(directory)
    _rewrite(tmp_path, lambda t: (t.pop("model.layers.3.embed_tokens.weight"),
                                  t.pop("model.layers.3.shared_head.head.weight")))
    _same_state(want, from_pretrained(tmp_path))                        # without the copies: the same model
    for copy, main in (("embed_tokens.weight", "model.embed_tokens.weight"),
                       ("shared_head.head.weight", "lm_head.weight")):
        def differ(t, copy=copy, main=main):
            t[f"model.layers.3.{copy}"] = t[main].clone()
            t[f"model.layers.3.{copy}"][5, 7] += 1e-3
        _rewrite(tmp_path, differ)
        with pytest.raises(ValueError, match=rf"^tensor model\.layers\.3\.{re.escape(copy)} in model\.safetensors "
                                             rf"differs from {re.escape(main)}: .*num_nextn_predict_layers=0"):
            from_pretrained(tmp_path)
        main_only = from_pretrained(tmp_path, num_nextn_predict_layers=0)     # dropped: not even read
        assert main_only.mtp is None
        _rewrite(tmp_path, lambda t, copy=copy: t.pop(f"model.layers.3.{copy}"))
    _rewrite(tmp_path, lambda t: t.update({"model.layers.3.embed_tokens.weight": torch.zeros(64, 16)}))
    with pytest.raises(ValueError, match=r"embed_tokens\.weight in model\.safetensors has shape \(64, 16\), "
                                         r"expected \(64, 32\) \(a copy of model\.embed_tokens\.weight\)"):
        from_pretrained(tmp_path)


def _mtp_model(depth: int, preset: str = "toy", **changes):
    """_our_model with ``depth`` MTP modules whose eh_proj halves differ (random norm gains too)."""
    model = _our_model(preset, num_nextn_predict_layers=depth, **changes)
    with torch.no_grad():
        for module in model.mtp:
            module.eh_proj.weight[:, model.config.hidden_size:] += 1.0
    return model


def _mtp_outputs(model) -> list[torch.Tensor]:
    with torch.no_grad():
        _, aux = model(TOKENS, return_aux=True)
        return mtp_logits(model, aux["hidden"], TOKENS)


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_round_trip(tmp_path, depth, layout):
    model = _mtp_model(depth)
    save_pretrained(model, tmp_path, expert_layout=layout)
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == depth
    with safe_open(str(tmp_path / WEIGHTS_FILE), "pt") as f:
        names = set(f.keys())
        last = f"model.layers.{2 + depth}."                 # MTP module k is layer num_hidden_layers + k
        assert {last + "eh_proj.weight", last + "self_attn.kv_a_proj_with_mqa.weight"} <= names
        assert (last + "mlp.experts.gate_up_proj" in names) == (layout == "fused")
        assert (last + "mlp.experts.0.gate_proj.weight" in names) == (layout == "per_expert")
        assert not any(name.startswith(f"model.layers.{3 + depth}.") for name in names)
        for k in range(depth):                              # the released copies, equal to the main tensors
            assert torch.equal(f.get_tensor(f"model.layers.{3 + k}.embed_tokens.weight"), model.embed.weight)
            assert torch.equal(f.get_tensor(f"model.layers.{3 + k}.shared_head.head.weight"), model.head.weight)
    loaded = from_pretrained(tmp_path)
    assert loaded.config == model.config and len(loaded.mtp) == depth
    _same_state(model, loaded)
    for got, want in zip(_mtp_outputs(loaded), _mtp_outputs(model), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


@pytest.mark.filterwarnings("error")
def test_num_nextn_predict_layers_override_drops_mtp_modules(tmp_path):
    model = _mtp_model(2)
    save_pretrained(model, tmp_path)
    main_only = from_pretrained(tmp_path, num_nextn_predict_layers=0)      # no warning: asked for
    assert main_only.mtp is None and main_only.config.num_nextn_predict_layers == 0
    want = model.state_dict()
    for key, tensor in main_only.state_dict().items():
        assert torch.equal(tensor, want[key]), key
    one = from_pretrained(tmp_path, num_nextn_predict_layers=1)            # the first module only
    assert len(one.mtp) == 1
    for key, tensor in one.state_dict().items():
        assert torch.equal(tensor, want[key]), key
    # The dropped layer is not read: a broken tensor there does not matter.
    _rewrite(tmp_path, lambda t: t.update({"model.layers.4.eh_proj.weight": torch.ones(3, 3)}))
    _same_state(one, from_pretrained(tmp_path, num_nextn_predict_layers=1))
    with pytest.raises(ValueError, match=r"model\.layers\.4\.eh_proj\.weight in model\.safetensors has shape \(3, 3\)"):
        from_pretrained(tmp_path)


def test_missing_mtp_tensor_is_named(tmp_path):
    model = _mtp_model(1)
    for name in ("model.layers.3.eh_proj.weight", "model.layers.3.mlp.experts.5.down_proj.weight",
                 "model.layers.3.shared_head.norm.weight"):
        save_pretrained(model, tmp_path, overwrite=True)
        _rewrite(tmp_path, lambda t, name=name: t.pop(name))
        with pytest.raises(ValueError, match=rf"^missing tensor {re.escape(name)} in "
                                             rf"{re.escape(str(tmp_path / WEIGHTS_FILE))}$"):
            from_pretrained(tmp_path)
    # A layer past the MTP modules the config announces is refused, as any unknown layer.
    save_pretrained(model, tmp_path, overwrite=True)
    _rewrite(tmp_path, lambda t: t.update({"model.layers.4.enorm.weight": torch.ones(64)}))
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.4\.enorm\.weight in model\.safetensors: "
                                         r".* 3 layers and 1 MTP layers \(num_nextn_predict_layers\), so no layer 4"):
        from_pretrained(tmp_path)


def test_dense_and_tied_models_with_mtp_round_trip(tmp_path):
    dense = _mtp_model(1, "toy-mla")
    save_pretrained(dense, tmp_path / "dense")
    raw = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert raw["first_k_dense_replace"] == 3                 # placeholder experts: no layer is MoE
    loaded = from_pretrained(tmp_path / "dense")
    assert not loaded.config.uses_moe and type(loaded.mtp[0].block.ffn) is type(loaded.layers["0"].ffn)
    _same_state(dense, loaded)
    tied = _mtp_model(1, tie_word_embeddings=True)
    save_pretrained(tied, tmp_path / "tied")
    loaded = from_pretrained(tmp_path / "tied")
    assert loaded.head.weight is loaded.embed.weight
    _same_state(tied, loaded)


def test_transformers_ignores_our_mtp_layer(tmp_path):
    """transformers skips the MTP layer only at index 61 (V3's); at a tiny config's index 3 it lists
    the layer's tensors as unexpected, leaves them out and computes the same main model."""
    transformers = pytest.importorskip("transformers")
    model = _mtp_model(1)
    save_pretrained(model, tmp_path, expert_layout="fused")
    reloaded, info = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and info["unexpected_keys"]
    assert all(key.startswith("model.layers.3.") for key in info["unexpected_keys"])
    assert len(reloaded.model.layers) == 3
    torch.testing.assert_close(_hf_logits(reloaded.eval()), _logits(model), rtol=0, atol=1e-4)


def test_yarn_checkpoint_builds_with_yarn_unless_overridden(tmp_path):
    save_pretrained(_our_model(), tmp_path)
    yarn = {"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}
    _edit_config(tmp_path, rope_parameters=yarn)
    model = from_pretrained(tmp_path)
    assert model.config.rope_scaling["factor"] == 40 and model.config.rope_scaling["rope_type"] == "yarn"
    assert from_pretrained(tmp_path, rope_scaling=None).config.rope_scaling is None
    # An override may also name a field the loader sets itself.
    assert from_pretrained(tmp_path, rope_scaling=None, num_nextn_predict_layers=0).config.rope_scaling is None


# DeepSeek-V3's published config.json (older layout: rope_theta + rope_scaling, FP8 quantization_config).
V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                             "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                             "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


def test_deepseek_v3_config_json_reads_as_the_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(V3_CONFIG))
    config, preset = load_config(tmp_path / "config.json"), load_config("deepseek-v3")
    assert config.replace(initializer_range=preset.initializer_range) == preset   # the file says 0.02
    with pytest.raises(ValueError, match="neither model.safetensors"):         # past the config, to the weights
        from_pretrained(tmp_path)


# ------------------------------------------------------------------- errors
@pytest.fixture
def ckpt(tmp_path):
    save_pretrained(_our_model(), tmp_path)
    return tmp_path


def test_missing_tensor_is_named(ckpt):
    _rewrite(ckpt, lambda t: t.pop("model.layers.1.mlp.gate.e_score_correction_bias"))
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.mlp\.gate\.e_score_correction_bias "
                                         rf"in {ckpt / WEIGHTS_FILE}$"):
        from_pretrained(ckpt)


def test_unexpected_tensor_is_named(ckpt):
    _rewrite(ckpt, lambda t: t.update({"model.layers.0.mlp.experts.0.gate_proj.weight": torch.ones(64, 128)}))
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight "
                                         r"in model\.safetensors: .* has no layers\.0\.ffn\.experts\.0\.w1\.weight"):
        from_pretrained(ckpt)
    _rewrite(ckpt, lambda t: (t.pop("model.layers.0.mlp.experts.0.gate_proj.weight"),
                              t.update({"model.rotary_emb.inv_freq": torch.ones(8)})))
    with pytest.raises(ValueError, match=r"unexpected tensor model\.rotary_emb\.inv_freq in model\.safetensors"):
        from_pretrained(ckpt)


def test_misshaped_tensor_names_expected_and_got(ckpt):
    _rewrite(ckpt, lambda t: t.update({"model.layers.2.self_attn.kv_b_proj.weight": torch.ones(256, 30)}))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.2\.self_attn\.kv_b_proj\.weight in model\.safetensors "
                                         r"has shape \(256, 30\), expected \(256, 32\)"):
        from_pretrained(ckpt)


def test_misshaped_fused_experts(hf_dir, fused_dir, tmp_path):
    shutil.copytree(fused_dir, tmp_path, dirs_exist_ok=True)
    _rewrite(tmp_path, lambda t: t.update({"model.layers.2.mlp.experts.gate_up_proj": torch.ones(8, 30, 32)}))
    with pytest.raises(ValueError, match=r"gate_up_proj in model\.safetensors has shape \(8, 30, 32\), "
                                         r"expected \(8, 32, 32\)"):
        from_pretrained(tmp_path)


def test_mixed_layouts_are_refused(hf_dir, fused_dir, tmp_path):
    shutil.copytree(fused_dir, tmp_path, dirs_exist_ok=True)
    per_expert = load_file(hf_dir / WEIGHTS_FILE)
    _rewrite(tmp_path, lambda t: t.update({k: v for k, v in per_expert.items() if ".experts.3." in k}))
    with pytest.raises(ValueError, match="second time: the checkpoint mixes the fused and the per-expert layouts"):
        from_pretrained(tmp_path)


def test_sharded_index_errors(tmp_path):
    save_pretrained(_our_model(), tmp_path, max_shard_size=200_000)
    first = sorted(tmp_path.glob("model-*.safetensors"))[0]
    first.unlink()
    with pytest.raises(ValueError, match=f"lists the shard {first.name}, which is not in"):
        from_pretrained(tmp_path)


def test_directory_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="has no config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(load_config("toy"))))
    with pytest.raises(ValueError, match="neither model.safetensors nor model.safetensors.index.json"):
        from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        from_pretrained(tmp_path, dtype=torch.int8)


def test_checkpoint_configs_we_cannot_build_are_refused(ckpt):
    _edit_config(ckpt, scoring_func="softmax")
    with pytest.raises(ValueError, match="sigmoid affinities with group-limited top-k"):
        from_pretrained(ckpt)
    _edit_config(ckpt, scoring_func="sigmoid", attention_bias=True)
    with pytest.raises(ValueError, match="attention_bias is true"):
        from_pretrained(ckpt)


@pytest.mark.parametrize("quantization_config, message", [
    ("fp8", r" \('fp8'\) must be an object"),
    ([128, 128], r" \(\[128, 128\]\) must be an object"),
    ({"weight_block_size": 128}, r"\.weight_block_size \(128\) must be two positive integers"),
    ({"weight_block_size": [128]}, r"\.weight_block_size \(\[128\]\) must be two positive integers"),
    ({"weight_block_size": [0, 128]}, r"\.weight_block_size \(\[0, 128\]\) must be two"),
    ({"weight_block_size": ["128", "128"]}, r"\.weight_block_size \(\['128', '128'\]\) must be two"),
    ({"weight_block_size": [True, 128]}, r"\.weight_block_size \(\[True, 128\]\) must be two"),
], ids=["string", "list", "int_block", "one_number", "zero", "strings", "bool"])
def test_a_malformed_quantization_config_is_a_value_error_naming_config_json(ckpt, quantization_config, message):
    # A string used to raise AttributeError, and 128 for the block a TypeError.
    _edit_config(ckpt, quantization_config=quantization_config)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(ckpt / 'config.json'))}: quantization_config{message}"):
        from_pretrained(ckpt)


def test_a_quantization_config_without_a_block_size_means_128_x_128(ckpt):
    assert pretrained._fp8_block({"quantization_config": {"quant_method": "fp8"}}, ckpt) == (128, 128)
    assert pretrained._fp8_block({"quantization_config": {"weight_block_size": [16, 32]}}, ckpt) == (16, 32)
    _edit_config(ckpt, quantization_config={"quant_method": "fp8", "fmt": "e4m3"})
    from_pretrained(ckpt)


# ------------------------------------------------------- HF config import (config.py)
HF5 = {"model_type": "deepseek_v3", "hidden_size": 64, "num_attention_heads": 4, "kv_lora_rank": 16,
       "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "qk_head_dim": 24, "head_dim": 8,
       "output_router_logits": False, "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 100,
       "max_position_embeddings": 128}


def test_hf5_rope_parameters_become_rope_theta_and_rope_scaling():
    config = ModelConfig.from_dict({**HF5, "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}})
    assert (config.rope_theta, config.rope_scaling) == (50000.0, None)
    yarn = {"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "rope_theta": 1e4}
    config = ModelConfig.from_dict({**HF5, "rope_parameters": yarn})
    assert config.rope_theta == 1e4
    assert config.rope_scaling == {"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096}


def test_older_rope_layout_still_loads():
    legacy = {k: v for k, v in HF5.items() if k not in ("qk_head_dim", "output_router_logits")}
    scaling = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096}
    config = ModelConfig.from_dict({**legacy, "rope_theta": 20000.0, "rope_scaling": scaling})
    assert (config.rope_theta, config.rope_scaling) == (20000.0, scaling)
    # Both layouts at once load when they agree ('type' and 'rope_type' are synonyms) ...
    both = {**HF5, "rope_theta": 20000.0, "rope_scaling": scaling,
            "rope_parameters": {"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                "rope_theta": 20000.0}}
    assert ModelConfig.from_dict(both).rope_theta == 20000.0
    # ... and fail when they do not.
    with pytest.raises(ValueError, match="disagree with rope_parameters"):
        ModelConfig.from_dict({**both, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="disagree with rope_parameters"):
        ModelConfig.from_dict({**both, "rope_scaling": None})


def test_qk_head_dim_must_be_consistent():
    with pytest.raises(ValueError, match=r"qk_head_dim \(32\) must equal qk_nope_head_dim \+ qk_rope_head_dim "
                                         r"\(16 \+ 8\)"):
        ModelConfig.from_dict({**HF5, "qk_head_dim": 32})


def test_hf5_keys_and_aliases():
    config = ModelConfig.from_dict({**HF5, "num_mtp_layers": 1})
    assert config.num_nextn_predict_layers == 1
    with pytest.raises(ValueError, match="num_mtp_layers .* disagree"):
        ModelConfig.from_dict({**HF5, "num_mtp_layers": 1, "num_nextn_predict_layers": 0})
    with pytest.raises(ValueError, match="rope_parameters .* must be a dict"):
        ModelConfig.from_dict({**HF5, "rope_parameters": 10000.0})
    with pytest.raises(ValueError, match="unknown config field"):   # real typos still fail
        ModelConfig.from_dict({**HF5, "qk_head_dims": 24})
