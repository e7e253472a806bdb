"""The assembled Transformer: shapes, parameter accounting, causality, cached decoding,
seeded initialisation and input validation."""

from __future__ import annotations

import json
from dataclasses import fields
from functools import cache

import pytest
import torch

from deepseek_mini import build_model, count_parameters, load_config
from deepseek_mini.config import METADATA_FIELDS, ModelConfig
from deepseek_mini.attention import Attention
from deepseek_mini.layers import MLP, RMSNorm
from deepseek_mini.model import Transformer, check_tokens

TINY = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)


@pytest.fixture(scope="module")
def model():
    return build_model(load_config("toy-dense", **TINY), seed=0).eval()


def dense_param_formula(V: int, d: int, L: int, d_ff: int, n_heads: int, n_kv: int) -> int:
    hd = d // n_heads
    attn = 2 * d * d + 2 * d * (n_kv * hd)         # wq, wo + wk, wv
    per_layer = attn + 3 * d * d_ff + 2 * d        # + w1, w2, w3 + two RMSNorm gains
    return L * per_layer + 2 * V * d + d           # + embedding, head, final norm


def test_logits_shape_and_dtype(model):
    tokens = torch.randint(0, 260, (3, 10))
    logits = model(tokens)
    assert logits.shape == (3, 10, 260) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, model.head(model.hidden_states(tokens)))


def test_structure_follows_the_config(model):
    assert len(model.layers) == 2
    assert list(model.layers) == ["0", "1"]                        # keyed by layer id
    assert all(isinstance(b.attn, Attention) and isinstance(b.ffn, MLP) for b in model.layers.values())
    assert isinstance(model.norm, RMSNorm)
    assert model.embed.weight.shape == (260, 32) and model.head.weight.shape == (260, 32)
    assert model.rope_cos.shape == model.rope_sin.shape == (64, 4)   # head_dim 8 -> 4 pairs
    assert "rope_cos" not in model.state_dict()                      # derived, not saved


def test_head_is_untied(model):
    assert model.head.weight is not model.embed.weight
    assert not torch.equal(model.head.weight, model.embed.weight)


def test_tied_head_shares_the_embedding_and_counts_once():
    config = load_config("toy-dense", **TINY, tie_word_embeddings=True)
    m = build_model(config, seed=0)
    assert m.head.weight is m.embed.weight
    untied = dense_param_formula(260, 32, 2, 64, 4, 4)
    assert count_parameters(m).total == untied - 260 * 32


@pytest.mark.parametrize("n_kv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_count_parameters_equals_hand_formula(n_kv):
    config = load_config("toy-dense", **TINY, num_key_value_heads=n_kv)
    expected = dense_param_formula(260, 32, 2, 64, 4, n_kv)
    built = build_model(config, seed=0)
    assert sum(p.numel() for p in built.parameters()) == expected
    count = count_parameters(built)
    assert count.total == count.activated == expected          # dense: every weight is used
    assert count.embedding == count.head == 260 * 32
    assert count_parameters(config) == count


def test_count_parameters_of_full_toy_preset():
    # 4 layers, d=128, d_ff=384, 4 heads, V=260 (the docstring's "~0.9M").
    expected = dense_param_formula(260, 128, 4, 384, 4, 4)
    assert count_parameters("toy-dense").total == expected == 4 * (4 * 128**2 + 3 * 128 * 384 + 256) + 2 * 260 * 128 + 128


@pytest.mark.parametrize("name", ["toy-dense", "mini"])
def test_build_on_meta_device(name):
    config = load_config(name)
    m = build_model(name, device="meta")
    assert all(p.device.type == "meta" for p in m.parameters())
    expected = dense_param_formula(config.vocab_size, config.hidden_size, config.num_hidden_layers,
                                   config.intermediate_size, config.num_attention_heads,
                                   config.num_key_value_heads)
    assert count_parameters(m).total == count_parameters(name).total == expected
    logits = m(torch.zeros(2, 5, dtype=torch.long, device="meta"))
    assert logits.shape == (2, 5, config.vocab_size) and logits.device.type == "meta"


def test_deepseek_v3_on_meta_builds_with_reference_counts():
    # book/facts.md: 671.03B total (main model, MTP excluded), 37.55B activated per token
    # including embedding and head (8 of 256 routed experts + the shared one). The preset keeps
    # V3's YaRN and MTP, which build_model refuses; count_parameters builds the main model.
    count = count_parameters("deepseek-v3")
    assert round(count.total / 1e9, 2) == 671.03
    assert round(count.activated / 1e9, 2) == 37.55
    assert round((count.activated - count.embedding - count.head) / 1e9, 2) == 35.70
    assert count.embedding == count.head == 129280 * 7168


def test_moe_layers_from_first_k_dense_replace():
    from deepseek_mini.layers import MLP
    from deepseek_mini.moe import MoE
    config = load_config("toy-dense", **TINY, n_routed_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=16, first_k_dense_replace=1)
    m = build_model(config, device="meta")
    assert [type(layer.ffn) for layer in m.layers.values()] == [MLP, MoE]
    count = count_parameters(m)    # 2 of 4 routed experts (3 * 32 * 16 weights each) idle per token
    assert count.total - count.activated == 2 * 3 * 32 * 16


def test_build_model_accepts_dtype():
    m = build_model(load_config("toy-dense", **TINY), seed=0, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert m(torch.randint(0, 260, (1, 4))).dtype == torch.bfloat16
    assert m.new_cache(1, 8)["0"].k.dtype == torch.bfloat16


def test_whole_model_is_causal(model):
    torch.manual_seed(1)
    tokens = torch.randint(0, 260, (2, 12))
    changed = tokens.clone()
    j = 5
    changed[:, j] = (tokens[:, j] + 1) % 260
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-6)
    assert torch.all((a[:, j:] - b[:, j:]).abs().amax(dim=-1) > 1e-5)


@pytest.mark.parametrize("prefill", [1, 6])
def test_cached_decode_equals_full_forward(model, prefill):
    torch.manual_seed(2)
    tokens = torch.randint(0, 260, (2, 14))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2, 14)
        steps = [model(tokens[:, :prefill], 0, cache)]
        for t in range(prefill, 14):
            steps.append(model(tokens[:, t:t + 1], t, cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


def test_new_cache_shape_and_limits(model):
    cache = model.new_cache(3, 20)
    assert list(cache) == ["0", "1"] and cache["0"].k.shape == (3, 4, 20, 8)
    assert model.new_cache(1)["0"].max_len == 64
    for bad in (0, 65):
        with pytest.raises(ValueError, match=rf"max_len \({bad}\).*max_position_embeddings=64"):
            model.new_cache(1, bad)


def test_seeded_build_is_deterministic_and_seeds_differ():
    config = load_config("toy-dense", **TINY)
    a, b, c = build_model(config, seed=0), build_model(config, seed=0), build_model(config, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["embed.weight"], sc["embed.weight"])
    assert not torch.equal(sa["layers.0.attn.wq.weight"], sc["layers.0.attn.wq.weight"])


def test_seeded_build_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    build_model(load_config("toy-dense", **TINY), seed=3)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("std", [0.02, 0.006])
def test_init_weights_std_follows_initializer_range(std):
    config = load_config("toy-dense", num_hidden_layers=1, hidden_size=256, intermediate_size=768,
                         initializer_range=std)
    m = build_model(config, seed=0)
    for name, p in m.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert p.numel() >= 256 * 256 // 4
            assert p.std().item() == pytest.approx(std, rel=0.03), name
            assert abs(p.mean().item()) < std * 0.05, name


def test_init_weights_resets_norm_gains():
    m = build_model(load_config("toy-dense", **TINY), seed=0)
    with torch.no_grad():
        m.norm.weight.fill_(5.0)
    m.init_weights(torch.Generator().manual_seed(0))
    assert torch.equal(m.norm.weight, torch.ones(32))


@pytest.mark.parametrize("make_tokens,pattern", [
    (lambda: torch.zeros(1, 4), r"int64.*float32"),
    (lambda: torch.zeros(4, dtype=torch.long), r"\(batch, seq_len\).*\(4,\)"),
    (lambda: torch.zeros(1, 2, 3, dtype=torch.long), r"\(batch, seq_len\)"),
    (lambda: torch.zeros(1, 4, dtype=torch.int32), r"int64.*int32"),
    (lambda: [[1, 2, 3]], r"\(batch, seq_len\).*list"),
    (lambda: torch.zeros(1, 65, dtype=torch.long), r"max_position_embeddings \(64\)"),
], ids=["float", "1d", "3d", "int32", "list", "too_long"])
def test_invalid_tokens_raise_helpfully(model, make_tokens, pattern):
    with pytest.raises(ValueError, match=pattern):
        model(make_tokens())


def test_positions_beyond_max_position_embeddings_raise(model):
    cache = model.new_cache(1, 64)
    model(torch.zeros(1, 60, dtype=torch.long), 0, cache)
    with pytest.raises(ValueError, match=r"positions 60\.\.64 .*max_position_embeddings \(64\)"):
        model(torch.zeros(1, 5, dtype=torch.long), 60, cache)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 1, dtype=torch.long), -1)


def test_wrong_cache_raises(model):
    cache = model.new_cache(1, 8)
    del cache["1"]
    with pytest.raises(ValueError, match=r"cache holds layers \['0'\], the model \['0', '1'\].*new_cache"):
        model(torch.zeros(1, 2, dtype=torch.long), 0, cache)
    with pytest.raises(ValueError, match=r"cache holds layers list.*new_cache"):
        model(torch.zeros(1, 2, dtype=torch.long), 0, list(model.new_cache(1, 8).values()))


@pytest.mark.parametrize("tokens,pattern", [
    (torch.tensor([[1, 260]]), r"vocab_size=260\), got min 1, max 260"),
    (torch.tensor([[-1, 3]]), r"vocab_size=260\), got min -1, max 3"),
    (torch.tensor([[1.0, 2.0]]), r"integer tensor, got torch.float32"),
], ids=["id_too_big", "negative_id", "float"])
def test_check_tokens_raises_one_line_errors(tokens, pattern):
    with pytest.raises(ValueError, match=pattern):
        check_tokens(tokens, 260)
    check_tokens(torch.tensor([[0, 259]]), 260)               # the whole range is fine
    check_tokens(torch.zeros(2, 3, dtype=torch.long, device="meta"), 260)   # meta: shapes only


def test_forward_never_reads_token_values(model):
    # Reading ids back (min/max, .item(), int()) waits for the GPU on every decoded token: the
    # forward must issue no such read (aten._local_scalar_dense), prefill or decode, and leave
    # range checks to check_tokens at the entry points.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    cache = model.new_cache(1, 8)
    with torch.no_grad(), Reads() as reads:
        model(torch.tensor([[3, 4, 5]]), 0, cache)
        model(torch.tensor([[6]]), 3, cache)
    assert reads.ops and not [op for op in reads.ops if "_local_scalar_dense" in op or op.startswith("aten.min")
                              or op.startswith("aten.max")]


def test_build_model_from_preset_name_and_transformer_class():
    m = build_model("toy", device="meta")
    assert isinstance(m, Transformer) and m.config == load_config("toy")


# ------------------------------------------------------------- no field silently ignored (issue #9)
YARN = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1}
TINY_TOY = dict(TINY, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                moe_intermediate_size=16, first_k_dense_replace=1, routed_scaling_factor=2.5)
BASES = {"dense": load_config("toy-dense", **TINY), "toy": load_config("toy", **TINY_TOY)}

# Field -> (base, another valid value): building with the other value must change the model.
CONSUMED = {
    "vocab_size": ("dense", 300), "hidden_size": ("dense", 64), "num_hidden_layers": ("dense", 3),
    "intermediate_size": ("dense", 96), "rms_norm_eps": ("dense", 0.5), "initializer_range": ("dense", 0.05),
    "tie_word_embeddings": ("dense", True), "max_position_embeddings": ("dense", 48),
    "num_attention_heads": ("dense", 8), "num_key_value_heads": ("dense", 2), "attention_bias": ("dense", True),
    "rope_theta": ("dense", 500.0),
    "q_lora_rank": ("toy", 16), "kv_lora_rank": ("toy", 8), "qk_nope_head_dim": ("toy", 16),
    "qk_rope_head_dim": ("toy", 8), "v_head_dim": ("toy", 16), "attn_impl": ("toy", "naive"), "num_nextn_predict_layers": ("toy", 1),
    "n_routed_experts": ("toy", 16), "n_shared_experts": ("toy", 2), "num_experts_per_tok": ("toy", 3),
    "n_group": ("toy", 2), "topk_group": ("toy", 1), "routed_scaling_factor": ("toy", 1.0),
    "moe_intermediate_size": ("toy", 32), "first_k_dense_replace": ("toy", 0), "norm_topk_prob": ("toy", False),
    "scoring_func": ("toy", "softmax"), "topk_method": ("toy", "greedy"),
    "rope_scaling": ("toy", YARN), "rope_interleave": ("toy", False),        # chapter 07
}
# Field -> (value a later chapter builds, what the error names): build_model refuses the value.


def fingerprint(config: ModelConfig) -> tuple:
    """What a config decides: parameter and buffer shapes, cache layout, and the logits of fixed tokens."""
    return _fingerprint(config.to_json())


@cache
def _fingerprint(config_json: str) -> tuple:
    model = build_model(ModelConfig(**json.loads(config_json)), seed=0).eval()
    tokens = torch.arange(2 * 12).reshape(2, 12) * 7 % 260
    with torch.no_grad():
        logits = model(tokens)
    caches = [(type(c).__name__, [tuple(t.shape) for t in vars(c).values() if isinstance(t, torch.Tensor)])
              for c in model.new_cache(1, 4).values()]
    return ([(n, tuple(p.shape)) for n, p in model.named_parameters()],
            [(n, tuple(b.shape)) for n, b in model.named_buffers()], caches, logits)


def same_model(a: tuple, b: tuple) -> bool:
    return a[:3] == b[:3] and a[3].shape == b[3].shape and torch.equal(a[3], b[3])


def test_fingerprint_is_deterministic_so_a_difference_means_the_field_mattered():
    for base in BASES.values():
        assert same_model(_fingerprint.__wrapped__(base.to_json()), fingerprint(base))


def test_every_config_field_is_consumed_refused_or_listed_as_metadata():
    names = [f.name for f in fields(ModelConfig)]
    for name in names:
        kinds = [kind for kind, table in (("consumed", CONSUMED), ("metadata", METADATA_FIELDS)) if name in table]
        assert len(kinds) == 1, (f"ModelConfig.{name} is {kinds or 'unaccounted for'}: make the model read it "
                                 "(and add a probe to CONSUMED), refuse it in build_model, or list it with a "
                                 "reason in config.METADATA_FIELDS")
    assert set(CONSUMED) | set(METADATA_FIELDS) == set(names)
    assert all(len(reason) > 20 for reason in METADATA_FIELDS.values())


@pytest.mark.parametrize("name", sorted(CONSUMED))
def test_changing_a_consumed_field_changes_the_built_model(name):
    base_name, value = CONSUMED[name]
    base = BASES[base_name]
    assert getattr(base, name) != value
    assert not same_model(fingerprint(base), fingerprint(base.replace(**{name: value}))), \
        f"{name}={value!r} builds the same model as {getattr(base, name)!r}: the field is ignored"


@pytest.mark.parametrize("name", sorted(set(METADATA_FIELDS) - {"hidden_act"}))
def test_metadata_fields_do_not_change_the_model(name):
    # A field that starts to change the model must leave METADATA_FIELDS for CONSUMED.
    base = BASES["dense"]
    assert getattr(base, name) != 5
    assert same_model(fingerprint(base), fingerprint(base.replace(**{name: 5})))


def test_hidden_act_has_one_valid_value():
    with pytest.raises(ValueError, match="hidden_act"):
        load_config("toy-dense", hidden_act="gelu")


@pytest.mark.parametrize("name", ["rope_scaling", "rope_interleave"])
def test_rope_fields_add_no_weight(name):
    config = BASES["toy"].replace(**{name: CONSUMED[name][1]})
    assert count_parameters(config) == count_parameters(BASES["toy"])
    assert build_model(config, device="meta").state_dict().keys() == build_model(BASES["toy"], device="meta").state_dict().keys()


def test_attention_bias_with_mla_is_refused_not_ignored():
    with pytest.raises(NotImplementedError, match=r"attention_bias=True with MLA is not built.*set attention_bias to false"):
        build_model(BASES["toy"].replace(attention_bias=True), device="meta")


def test_deepseek_v3_preset_builds_with_yarn_and_mtp():
    v3 = load_config("deepseek-v3")
    assert v3.rope_scaling["factor"] == 40 and v3.num_nextn_predict_layers == 1
    # A 4-layer V3 (one MoE layer, for speed) on the meta device; the MTP module (chapter 04) is layer
    # index 4, an MoE layer like the main model's from index 3. YaRN (chapter 07) sets the softmax scale.
    small = v3.replace(num_hidden_layers=4)
    model = build_model(small, device="meta")
    assert model.config == small and len(model.mtp) == 1 and type(model.mtp[0].block.ffn).__name__ == "MoE"
    assert all(round(layer.attn.softmax_scale, 6) == 0.135234 for layer in model.layers.values())
    assert model.rope_cos.shape == (163840, 32)


# ------------------------------------------------------------------ per-module init, dtype policy
def _old_central_init(model: Transformer, generator: torch.Generator) -> None:
    """The central isinstance switch init_weights replaced: one walk over model.modules()."""
    from deepseek_mini.moe import Gate, GroupedExperts, MoE
    std = model.config.initializer_range
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, GroupedExperts):        # then N_r MLP modules, each drawing w1, w2, w3
                for e in range(len(module)):
                    for weight in (module.w1, module.w2, module.w3):
                        weight[e].normal_(0.0, std, generator=generator)
            elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                torch.nn.init.ones_(module.weight)
            elif isinstance(module, Gate):
                module.weight.normal_(0.0, std, generator=generator)
                module.bias.zero_()
            elif isinstance(module, MoE):
                module.tokens_per_expert.zero_()


@pytest.mark.parametrize("preset", ["toy", "toy-dense", "toy-mla"])
def test_per_module_init_draws_what_the_central_switch_drew(preset):
    # Same numbers, in the same order: seeded models (and the notebooks' trained results) are unchanged.
    config = load_config(preset, num_hidden_layers=2, attention_bias=preset == "toy-dense")
    new = build_model(config, seed=3)
    old = build_model(config, device="meta").to_empty(device="cpu")
    _old_central_init(old, torch.Generator().manual_seed(3))
    new_state, old_state = new.state_dict(), old.state_dict()
    assert all(torch.equal(new_state[k], old_state[k]) for k in new_state)


def test_model_cast_keeps_rope_tables_fp32_without_fix_ups(model):
    m = build_model(load_config("toy-dense", **TINY), seed=0)
    m.to(torch.bfloat16)                                        # plain .to(), not build_model(dtype=)
    assert m.embed.weight.dtype == torch.bfloat16
    assert m.rope_cos.dtype == m.rope_sin.dtype == torch.float32
    assert torch.equal(m.rope_cos, model.rope_cos)


# ------------------------------------------------------------------ ragged batches in the model
def test_left_padded_rows_without_cache_equal_each_row_alone(model):
    # Training-style scoring of a left-padded batch (GRPO's layout): positions restart at each
    # row's first real token, and padding_mask hides the pads.
    torch.manual_seed(3)
    rows = [torch.randint(0, 260, (n,)) for n in (7, 4, 1)]
    width = 7
    tokens = torch.zeros(3, width, dtype=torch.long)
    real = torch.zeros(3, width, dtype=torch.bool)
    for b, row in enumerate(rows):
        tokens[b, width - len(row):], real[b, width - len(row):] = row, True
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(tokens, positions=positions, padding_mask=real)
        for b, row in enumerate(rows):
            torch.testing.assert_close(out[b, width - len(row):], model(row[None])[0], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()


def test_rows_verify_several_tokens_at_their_own_cache_lengths(model):
    # Speculative decoding (chapter 04): after a ragged prefill each row checks 3 drafted tokens
    # from its own length in one forward; every row's logits equal a full forward of that row.
    torch.manual_seed(4)
    lengths, drafts = [5, 9], 3
    rows = [torch.randint(0, 260, (n + drafts,)) for n in lengths]
    cache = model.new_cache(2, 16)
    prefill = torch.zeros(2, max(lengths), dtype=torch.long)
    for b, (row, n) in enumerate(zip(rows, lengths)):
        prefill[b, :n] = row[:n]
    positions = torch.arange(max(lengths)).expand(2, -1)
    with torch.no_grad():
        model(prefill, cache=cache, positions=positions, padding_mask=positions < torch.tensor(lengths)[:, None])
        verify = torch.stack([row[n:] for row, n in zip(rows, lengths)])
        at = torch.tensor(lengths)[:, None] + torch.arange(drafts)
        out = model(verify, cache=cache, positions=at)
        for b, (row, n) in enumerate(zip(rows, lengths)):
            torch.testing.assert_close(out[b], model(row[None])[0, n:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(positions=torch.zeros(2, 3, dtype=torch.long)), r"positions must be a \(1, 4\) torch.int64"),
    (dict(positions=torch.zeros(1, 4)), r"positions must be a \(1, 4\) torch.int64 .*got \(1, 4\) torch.float32"),
    (dict(padding_mask=torch.ones(1, 4)), r"padding_mask must be a \(1, 4\) torch.bool"),
    (dict(start_pos=torch.tensor(2)), r"start_pos must be an int, got Tensor; pass per-row positions"),
], ids=["positions_shape", "positions_dtype", "mask_dtype", "tensor_start_pos"])
def test_ragged_arguments_are_checked(model, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        model(torch.zeros(1, 4, dtype=torch.long), **kwargs)
