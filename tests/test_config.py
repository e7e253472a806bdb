"""ModelConfig: the DeepSeek-V3 preset carries the official values, JSON files (ours, HF's,
the official inference repo's) load, and every invalid value fails with a message that
names the field and the value."""

from __future__ import annotations

import json
import re

import pytest

from deepseek_mini.config import PRESETS, ModelConfig, load_config, preset_names

# Fields that decide the architecture (what an HF or official config must agree on).
ARCH_FIELDS = [
    "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "rms_norm_eps",
    "hidden_act", "tie_word_embeddings", "max_position_embeddings", "num_attention_heads",
    "num_key_value_heads", "attention_bias", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim", "rope_theta", "n_routed_experts", "n_shared_experts",
    "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor",
    "moe_intermediate_size", "first_k_dense_replace", "norm_topk_prob", "scoring_func",
    "num_nextn_predict_layers",
]


def test_deepseek_v3_preset_carries_every_official_value():
    c = load_config("deepseek-v3")
    expected = dict(
        num_hidden_layers=61, hidden_size=7168, num_attention_heads=128, num_key_value_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
        n_group=8, topk_group=4, routed_scaling_factor=2.5, moe_intermediate_size=2048,
        intermediate_size=18432, first_k_dense_replace=3, vocab_size=129280,
        num_nextn_predict_layers=1, rms_norm_eps=1e-6, max_position_embeddings=163840,
        scoring_func="sigmoid", tie_word_embeddings=False, rope_theta=10000.0,
        norm_topk_prob=True, topk_method="noaux_tc", hidden_act="silu",
    )
    got = {k: getattr(c, k) for k in expected}
    assert got == expected
    rs = c.rope_scaling
    assert rs.get("type", rs.get("rope_type")) == "yarn"
    assert rs["factor"] == 40
    assert rs["original_max_position_embeddings"] == 4096
    assert rs["beta_fast"] == 32 and rs["beta_slow"] == 1 and rs["mscale"] == 1.0
    # Derived facts (book/facts.md, from config_671B.json): 40 x 4096 positions, 192-wide q/k heads, MLA + MoE on.
    assert rs["factor"] * rs["original_max_position_embeddings"] == c.max_position_embeddings
    assert c.qk_head_dim == 192
    assert c.uses_mla and c.uses_moe
    assert [c.is_moe_layer(i) for i in range(5)] == [False, False, False, True, True]
    assert c.is_moe_layer(60)


@pytest.mark.parametrize("name", preset_names())
def test_json_round_trip_for_every_preset(name, tmp_path):
    original = load_config(name)
    path = tmp_path / f"{name}.json"
    text = original.to_json(path)
    assert json.loads(path.read_text()) == json.loads(text)
    loaded = load_config(path)
    assert loaded == original
    assert load_config(str(path)) == original
    assert loaded is not original


def test_presets_are_fresh_objects():
    a, b = load_config("toy-dense"), load_config("toy-dense")
    assert a == b and a is not b
    assert set(preset_names()) == set(PRESETS) >= {"toy", "mini", "deepseek-v3"}


def _hf_config() -> dict:
    """The Hugging Face deepseek-ai/DeepSeek-V3 config.json, bookkeeping keys included."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_deepseek.DeepseekV3Config",
            "AutoModel": "modeling_deepseek.DeepseekV3Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
        },
        "aux_loss_alpha": 0.001,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "ep_size": 1,
        "first_k_dense_replace": 3,
        "hidden_act": "silu",
        "hidden_size": 7168,
        "initializer_range": 0.02,
        "intermediate_size": 18432,
        "kv_lora_rank": 512,
        "max_position_embeddings": 163840,
        "model_type": "deepseek_v3",
        "moe_intermediate_size": 2048,
        "moe_layer_freq": 1,
        "n_group": 8,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 61,
        "num_key_value_heads": 128,
        "num_nextn_predict_layers": 1,
        "pretraining_tp": 1,
        "q_lora_rank": 1536,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        },
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn",
        },
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 4,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1",
        "use_cache": True,
        "v_head_dim": 128,
        "vocab_size": 129280,
    }


def _arch(c: ModelConfig) -> dict:
    return {k: getattr(c, k) for k in ARCH_FIELDS}


def test_hf_config_json_loads_and_matches_the_preset(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_hf_config(), indent=2))
    c = load_config(path)
    preset = load_config("deepseek-v3")
    assert _arch(c) == _arch(preset)
    assert c.rope_scaling["factor"] == 40 and c.rope_scaling["original_max_position_embeddings"] == 4096
    assert (c.bos_token_id, c.eos_token_id) == (0, 1)
    assert c.initializer_range == 0.02  # the HF file's value, not the preset's 0.006
    assert c.topk_method == "noaux_tc"


def test_hf_config_with_an_unknown_key_still_fails(tmp_path):
    data = _hf_config() | {"num_hiden_layers": 61}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"num_hiden_layers.*did you mean 'num_hidden_layers'"):
        load_config(path)


OFFICIAL_671B = {
    "vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048, "n_layers": 61,
    "n_dense_layers": 3, "n_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
    "n_activated_experts": 8, "n_expert_groups": 8, "n_limited_groups": 4, "route_scale": 2.5,
    "score_func": "sigmoid", "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "dtype": "fp8",
}


def test_official_config_671B_json_loads_and_matches_the_preset(tmp_path):
    path = tmp_path / "config_671B.json"
    path.write_text(json.dumps(OFFICIAL_671B, indent=4))
    c = load_config(path)
    preset = load_config("deepseek-v3")
    # The official ModelArgs has no MTP field (its inference code skips layer 61), so the depth
    # is 0 unless the caller says otherwise; it is never guessed from the model's size.
    assert c.num_nextn_predict_layers == 0
    assert _arch(load_config(path, num_nextn_predict_layers=1)) == _arch(preset)
    rs = c.rope_scaling
    assert rs.get("type", rs.get("rope_type")) == "yarn"
    assert rs["factor"] == 40 and rs["original_max_position_embeddings"] == 4096
    assert rs["beta_fast"] == 32 and rs["beta_slow"] == 1 and rs["mscale"] == 1.0
    assert c.max_position_embeddings == 163840


def test_official_config_with_q_lora_rank_0_means_no_query_compression(tmp_path):
    # config_16B.json style: q_lora_rank 0 in the official ModelArgs = direct query projection.
    data = OFFICIAL_671B | {"q_lora_rank": 0}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    assert load_config(path).q_lora_rank is None


# ----------------------------------------------------------------------------- validation
MOE = dict(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2, moe_intermediate_size=32)
MLA = dict(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
YARN = dict(type="yarn", factor=4, original_max_position_embeddings=128, beta_fast=32, beta_slow=1)


def _esc(*parts: str) -> str:
    """A regex matching the parts in order, each literally."""
    return ".*".join(re.escape(p) for p in parts)


INVALID = {
    "hidden_size_zero": (dict(hidden_size=0), _esc("hidden_size", "0")),
    "hidden_size_negative": (dict(hidden_size=-128), _esc("hidden_size", "-128")),
    "kv_heads_not_dividing": (dict(num_key_value_heads=3), _esc("num_key_value_heads", "3")),
    "kv_heads_above_heads": (dict(num_key_value_heads=8), _esc("num_key_value_heads", "8")),
    "hidden_not_divisible_by_heads": (dict(hidden_size=130), _esc("hidden_size", "130", "num_attention_heads")),
    "odd_head_dim": (dict(hidden_size=36), _esc("head_dim", "9")),
    "kv_lora_rank_too_big": (dict(MLA, kv_lora_rank=128), _esc("kv_lora_rank", "128", "hidden_size")),
    "q_lora_rank_too_big": (dict(MLA, q_lora_rank=200), _esc("q_lora_rank", "200", "hidden_size")),
    "odd_qk_rope_head_dim": (dict(MLA, qk_rope_head_dim=7), _esc("qk_rope_head_dim", "7")),
    "mla_with_gqa": (dict(MLA, num_key_value_heads=2), _esc("num_key_value_heads", "2")),
    "experts_not_divisible_by_groups": (dict(MOE, n_routed_experts=6, n_group=4),
                                        _esc("n_routed_experts", "6", "n_group", "4")),
    "topk_group_above_n_group": (dict(MOE, topk_group=3), _esc("topk_group", "3", "n_group")),
    "too_many_experts_per_token": (dict(MOE, n_group=4, num_experts_per_tok=3),
                                   _esc("num_experts_per_tok", "3", "2")),
    "first_k_dense_beyond_layers": (dict(MOE, first_k_dense_replace=5), _esc("first_k_dense_replace", "5")),
    "bad_scoring_func": (dict(MOE, scoring_func="relu"), _esc("scoring_func", "relu")),
    "bad_hidden_act": (dict(hidden_act="gelu"), _esc("hidden_act", "gelu")),
    "bad_attn_impl": (dict(attn_impl="flash"), _esc("attn_impl", "flash")),
    "rope_scaling_not_a_dict": (dict(rope_scaling="yarn"), _esc("rope_scaling", "yarn")),
    "rope_scaling_wrong_type": (dict(rope_scaling=dict(YARN, type="dynamic")), _esc("rope_scaling", "dynamic")),
    "rope_scaling_linear_without_factor": (dict(rope_scaling={"type": "linear"}), _esc("factor", "None")),
    "rope_scaling_factor_below_1": (dict(rope_scaling=dict(YARN, factor=0.5)), _esc("factor", "0.5")),
    "rope_scaling_bad_original": (dict(rope_scaling=dict(YARN, original_max_position_embeddings=0)),
                                  _esc("original_max_position_embeddings", "0")),
    "rope_scaling_missing_original": (dict(rope_scaling={"type": "yarn", "factor": 4}),
                                      _esc("original_max_position_embeddings", "None")),
    "rope_scaling_beta_fast_below_slow": (dict(rope_scaling=dict(YARN, beta_fast=1, beta_slow=32)),
                                          _esc("beta_fast", "1", "beta_slow", "32")),
    # Wrong types inside rope_scaling: '"32" > 1' used to escape as a TypeError.
    "rope_scaling_beta_fast_string": (dict(rope_scaling=dict(YARN, beta_fast="32")),
                                      _esc("rope_scaling['beta_fast'] ('32') must be a number")),
    "rope_scaling_beta_slow_null": (dict(rope_scaling=dict(YARN, beta_slow=None)),
                                    _esc("rope_scaling['beta_slow'] (None) must be a number")),
    "rope_scaling_mscale_string": (dict(rope_scaling=dict(YARN, mscale="1.0")),
                                   _esc("rope_scaling['mscale'] ('1.0') must be a number")),
    "rope_scaling_mscale_all_dim_list": (dict(rope_scaling=dict(YARN, mscale_all_dim=[1])),
                                         _esc("rope_scaling['mscale_all_dim'] ([1]) must be a number")),
    "rope_scaling_factor_bool": (dict(rope_scaling=dict(YARN, factor=True)), _esc("factor", "True", "number >= 1")),
    "rope_scaling_original_bool": (dict(rope_scaling=dict(YARN, original_max_position_embeddings=True)),
                                   _esc("original_max_position_embeddings", "True", "positive integer")),
    "negative_mtp_depth": (dict(num_nextn_predict_layers=-1), _esc("num_nextn_predict_layers", "-1")),
    "bad_topk_method_without_moe": (dict(topk_method="top2"), _esc("topk_method", "'top2'")),
    "bad_scoring_func_without_moe": (dict(scoring_func="relu"), _esc("scoring_func", "'relu'")),
    "bool_token_id": (dict(bos_token_id=True), _esc("bos_token_id", "True")),
    "eos_outside_vocab": (dict(eos_token_id=260), _esc("eos_token_id", "260", "vocab_size")),
    "bos_negative": (dict(bos_token_id=-1), _esc("bos_token_id", "-1")),
    "tie_word_embeddings_not_bool": (dict(tie_word_embeddings="yes"), _esc("tie_word_embeddings", "yes")),
    "tie_word_embeddings_int": (dict(tie_word_embeddings=1), _esc("tie_word_embeddings", "1")),
    "float_layers": (dict(num_hidden_layers=2.0), _esc("num_hidden_layers", "2.0")),
    "non_positive_eps": (dict(rms_norm_eps=0.0), _esc("rms_norm_eps", "0.0")),
}


@pytest.mark.parametrize("overrides,pattern", list(INVALID.values()), ids=list(INVALID))
def test_invalid_values_raise_naming_field_and_value(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config("toy-dense", **overrides)


@pytest.mark.parametrize("overrides,pattern", list(INVALID.values()), ids=list(INVALID))
def test_invalid_values_raise_from_the_constructor_too(overrides, pattern):
    base = load_config("toy-dense").to_dict()
    with pytest.raises(ValueError, match=pattern):
        ModelConfig(**(base | overrides))


@pytest.mark.parametrize("overrides", [MOE, MLA, dict(rope_scaling=YARN), dict(num_key_value_heads=2),
                                       dict(num_key_value_heads=1), dict(MOE, first_k_dense_replace=4)],
                         ids=["moe", "mla", "yarn", "gqa", "mqa", "all_dense_moe"])
def test_the_valid_neighbours_of_those_errors_pass(overrides):
    c = load_config("toy-dense", **overrides)
    for key, value in overrides.items():
        assert getattr(c, key) == value


def test_validation_lists_valid_choices():
    with pytest.raises(ValueError, match=re.escape("valid values: [1, 2, 4]")):
        load_config("toy-dense", num_key_value_heads=3)
    with pytest.raises(ValueError, match=re.escape("valid n_group values: [1, 2, 3, 6]")):
        load_config("toy-dense", **(MOE | dict(n_routed_experts=6, n_group=4)))


@pytest.mark.parametrize("name,suggestion", [("deepseek-v2", "deepseek-v3"), ("toyy", "toy")])
def test_unknown_preset_lists_known_ones_and_suggests(name, suggestion):
    with pytest.raises(ValueError) as info:
        load_config(name)
    msg = str(info.value)
    assert repr(name) in msg
    assert f"did you mean {suggestion!r}" in msg
    for known in preset_names():
        assert known in msg


def test_unknown_preset_without_close_match_has_no_suggestion():
    with pytest.raises(ValueError, match="unknown preset 'qwerty'") as info:
        load_config("qwerty")
    assert "did you mean" not in str(info.value)


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "no_such_config.json"
    with pytest.raises(ValueError, match=_esc(str(path), "does not exist")):
        load_config(path)
    with pytest.raises(ValueError, match=re.escape("no_such_config.json")):
        load_config(str(path))


def test_malformed_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"hidden_size": 128,,}')
    with pytest.raises(ValueError, match=_esc(str(path), "JSON")):
        load_config(path)


def test_json_that_is_not_an_object_is_rejected(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match=_esc("list.json", "list")):
        load_config(path)


def test_unknown_field_in_json_suggests_the_close_match(tmp_path):
    data = load_config("toy-dense").to_dict()
    data["hidden_sise"] = data.pop("hidden_size")
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=_esc("typo.json", "'hidden_sise'", "did you mean 'hidden_size'")):
        load_config(path)


def test_invalid_value_in_json_is_reported(tmp_path):
    data = load_config("toy-dense").to_dict() | {"hidden_size": -4}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=_esc("hidden_size", "-4")):
        load_config(path)


def test_replace_changes_fields_revalidates_and_rejects_unknown():
    base = load_config("toy-dense")
    changed = base.replace(num_hidden_layers=2)
    assert changed.num_hidden_layers == 2 and base.num_hidden_layers == 4
    assert load_config("toy-dense", num_hidden_layers=2) == changed
    with pytest.raises(ValueError, match=_esc("'hidden_sise'", "did you mean 'hidden_size'")):
        base.replace(hidden_sise=64)
    with pytest.raises(ValueError, match=_esc("unknown config field", "bogus_field")):
        load_config("toy-dense", bogus_field=1)
    with pytest.raises(ValueError, match=_esc("hidden_size", "-1")):
        base.replace(hidden_size=-1)


def test_num_key_value_heads_defaults_to_heads():
    c = ModelConfig(hidden_size=64, num_attention_heads=8)
    assert c.num_key_value_heads == 8 and c.head_dim == 8
    assert not c.uses_mla and not c.uses_moe


# ------------------------------------------------------- required sizes and JSON types (issue #9)
def _write(tmp_path, data: dict, name: str = "config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _without(data: dict, *names: str) -> dict:
    return {k: v for k, v in data.items() if k not in names}


@pytest.mark.parametrize("preset,name", [
    ("toy-dense", "vocab_size"), ("toy-dense", "hidden_size"), ("toy-dense", "num_hidden_layers"),
    ("toy-dense", "num_attention_heads"), ("toy-dense", "intermediate_size"),
    ("toy-dense", "max_position_embeddings"),
    ("toy-mla", "qk_nope_head_dim"), ("toy-mla", "qk_rope_head_dim"), ("toy-mla", "v_head_dim"),
    ("toy", "moe_intermediate_size"), ("toy", "num_experts_per_tok"),
])
def test_config_file_lacking_a_size_is_an_error_not_the_toys_default(tmp_path, preset, name):
    path = _write(tmp_path, _without(load_config(preset).to_dict(), name))
    with pytest.raises(ValueError) as info:
        load_config(path)
    assert str(info.value).startswith(f"config file {str(path)!r} lacks required field {name!r}; ")


def test_empty_config_file_names_every_missing_size(tmp_path):
    with pytest.raises(ValueError, match=_esc("lacks required fields 'vocab_size', 'hidden_size', "
                                              "'num_hidden_layers', 'num_attention_heads', "
                                              "'intermediate_size', 'max_position_embeddings'")):
        load_config(_write(tmp_path, {}))


def test_sizes_of_features_that_are_off_may_be_left_out(tmp_path):
    # Neutral switches (no MLA, no MoE, no query compression, no groups ...) need not be written.
    minimal = dict(vocab_size=260, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=128, max_position_embeddings=64)
    c = load_config(_write(tmp_path, minimal))
    assert not c.uses_mla and not c.uses_moe and c.num_key_value_heads == 4
    # With every layer MoE there is no dense FFN, so intermediate_size may be left out too.
    all_moe = _without(load_config("toy", first_k_dense_replace=0).to_dict(), "intermediate_size")
    assert load_config(_write(tmp_path, all_moe, "all_moe.json")).first_k_dense_replace == 0


def test_hf_config_lacking_a_size_is_an_error(tmp_path):
    path = _write(tmp_path, _without(_hf_config(), "moe_intermediate_size"))
    with pytest.raises(ValueError, match=_esc("lacks required field 'moe_intermediate_size'")):
        load_config(path)


def test_presets_and_the_constructor_keep_their_defaults():
    assert ModelConfig().hidden_size == 128 and load_config("toy").hidden_size == 128


@pytest.mark.parametrize("name,ours", [("n_heads", "num_attention_heads"), ("kv_lora_rank", "kv_lora_rank"),
                                       ("inter_dim", "intermediate_size"), ("n_shared_experts", "n_shared_experts"),
                                       ("n_dense_layers", "first_k_dense_replace")])
def test_official_config_lacking_a_size_is_an_error(tmp_path, name, ours):
    # ModelArgs would fill these with a 16B-like model's values, and our defaults are the toy's.
    path = _write(tmp_path, _without(OFFICIAL_671B, name))
    with pytest.raises(ValueError, match=_esc(f"lacks required field {name!r} ({ours})")):
        load_config(path)


def test_official_config_without_yarn_or_score_func_gets_the_official_defaults(tmp_path):
    data = _without(OFFICIAL_671B, "score_func") | {"rope_factor": 1, "max_seq_len": 8192}
    c = load_config(_write(tmp_path, data))
    assert c.rope_scaling is None and c.max_position_embeddings == 8192    # ModelArgs.max_seq_len
    assert c.scoring_func == "softmax"                                     # ModelArgs.score_func
    assert load_config(_write(tmp_path, _without(data, "max_seq_len"), "d.json")).max_position_embeddings == 16384


WRONG_TYPES = {
    "int_as_string": ("hidden_size", "512", "hidden_size must be an int, got str '512'"),
    "int_as_float": ("hidden_size", 512.0, "hidden_size must be an int, got float 512.0"),
    "int_as_bool": ("num_hidden_layers", True, "num_hidden_layers must be an int, got bool True"),
    "int_as_null": ("vocab_size", None, "vocab_size must be an int, got null"),
    "optional_int_as_string": ("kv_lora_rank", "32", "kv_lora_rank must be an int or null, got str '32'"),
    "bool_as_string": ("tie_word_embeddings", "false",
                       "tie_word_embeddings must be a bool (true or false), got str 'false'"),
    "bool_as_int": ("attention_bias", 0, "attention_bias must be a bool (true or false), got int 0"),
    "float_as_string": ("rope_theta", "1e4", "rope_theta must be a number, got str '1e4'"),
    "float_as_bool": ("rms_norm_eps", True, "rms_norm_eps must be a number, got bool True"),
    "str_as_int": ("attn_impl", 1, "attn_impl must be a string, got int 1"),
    "dict_as_list": ("rope_scaling", ["yarn", 40], "rope_scaling must be a dict or null, got list ['yarn', 40]"),
    "token_id_as_list": ("eos_token_id", [1, 2], "eos_token_id must be an int or null, got list [1, 2]"),
}


@pytest.mark.parametrize("name,value,message", list(WRONG_TYPES.values()), ids=list(WRONG_TYPES))
def test_wrong_json_type_is_a_clear_error_naming_the_file(tmp_path, name, value, message):
    path = _write(tmp_path, load_config("toy-dense").to_dict() | {name: value})
    with pytest.raises(ValueError) as info:
        load_config(path)
    assert str(info.value) == f"config file {str(path)!r}: {message}"


@pytest.mark.parametrize("name,value,message", list(WRONG_TYPES.values()), ids=list(WRONG_TYPES))
def test_wrong_type_is_the_same_clear_error_from_the_constructor(name, value, message):
    with pytest.raises(ValueError) as info:
        ModelConfig(**(load_config("toy-dense").to_dict() | {name: value}))
    assert str(info.value) == message


def test_wrong_type_of_a_moe_number_is_a_value_error_not_a_type_error():
    # Before the type check, '"2.5" > 0' escaped as a TypeError from deep in validate().
    with pytest.raises(ValueError, match=_esc("routed_scaling_factor must be a number, got str '2.5'")):
        load_config("toy", routed_scaling_factor="2.5")


def test_ints_in_float_fields_load_as_floats(tmp_path):
    data = load_config("toy").to_dict() | {"rope_theta": 10000, "routed_scaling_factor": 2, "rms_norm_eps": 1}
    c = load_config(_write(tmp_path, data))
    assert (c.rope_theta, c.routed_scaling_factor, c.rms_norm_eps) == (10000.0, 2.0, 1.0)
    assert all(isinstance(v, float) for v in (c.rope_theta, c.routed_scaling_factor, c.rms_norm_eps))
    assert load_config("toy", rope_theta=500).rope_theta == 500     # the constructor accepts ints too


OFFICIAL_WRONG_TYPES = {
    # '"40" > 1' used to escape as a TypeError before the fields were checked.
    "rope_factor_string": ("rope_factor", "40", "rope_factor must be a number, got str '40'"),
    "rope_factor_bool": ("rope_factor", True, "rope_factor must be a number, got bool True"),
    "beta_fast_string": ("beta_fast", "32", "beta_fast must be a number, got str '32'"),
    "mscale_null": ("mscale", None, "mscale must be a number, got null"),
    "original_seq_len_float": ("original_seq_len", 4096.0, "original_seq_len must be an int, got float 4096.0"),
    "max_seq_len_string": ("max_seq_len", "16384", "max_seq_len must be an int, got str '16384'"),
    # Mapped fields are named as the file names them, not by their HF name.
    "n_layers_string": ("n_layers", "61", "n_layers must be an int, got str '61'"),
    "route_scale_bool": ("route_scale", True, "route_scale must be a number, got bool True"),
    "q_lora_rank_string": ("q_lora_rank", "0", "q_lora_rank must be an int or null, got str '0'"),
}


@pytest.mark.parametrize("name,value,message", list(OFFICIAL_WRONG_TYPES.values()), ids=list(OFFICIAL_WRONG_TYPES))
def test_wrong_type_in_an_official_config_is_a_value_error_naming_its_key(tmp_path, name, value, message):
    path = _write(tmp_path, OFFICIAL_671B | {name: value})
    with pytest.raises(ValueError) as info:
        load_config(path)
    assert str(info.value) == f"config file {str(path)!r}: {message}"
