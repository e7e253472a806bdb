"""Chapter 07: the RoPE extension chain (PI, NTK-aware, NTK-by-parts, YaRN) against hand values
(YaRN paper arXiv 2309.00071; DeepSeek-V3 §4.3), and the model's ``rope_scaling`` against transformers
on the 671B config and on tiny checkpoints (logits within 1e-4 past the original length)."""

import math

import pytest
import torch

from deepseek_mini.config import load_config
from deepseek_mini.rope import apply_rope, rope_cos_sin, rope_frequencies
from deepseek_mini.rope import (ntk_aware_inv_freq, ntk_by_parts_inv_freq, pi_inv_freq, rope_dim, rope_parameters,
                                softmax_scale, yarn_correction_dim, yarn_correction_range, yarn_mscale, yarn_ramp)

V3 = dict(dim=64, base=10000.0, s=40, beta_fast=32, beta_slow=1, original_max=4096)


@pytest.fixture(scope="module")
def v3():
    return load_config("deepseek-v3")


# --------------------------------------------------------------- hand-computed values
def test_correction_range_v3_by_hand():
    # i = 64 ln(4096 / (2 pi n)) / (2 ln 10000): n = 32 -> 10.47, n = 1 -> 22.51
    assert yarn_correction_dim(32, 64, 10000.0, 4096) == pytest.approx(10.4722, abs=1e-4)
    assert yarn_correction_dim(1, 64, 10000.0, 4096) == pytest.approx(22.5134, abs=1e-4)
    assert yarn_correction_range(32, 1, 64, 10000.0, 4096) == (10, 23)
    low, high = yarn_correction_range(32, 1, 64, 10000.0, 4096, truncate=False)
    assert (low, high) == (pytest.approx(10.4722, abs=1e-4), pytest.approx(22.5134, abs=1e-4))


def test_correction_range_is_clipped_to_the_channels():
    # a tiny L: the slow end falls below pair 0; a huge L: the fast end passes dim - 1
    assert yarn_correction_range(32, 1, 8, 10000.0, 16)[0] == 0
    assert yarn_correction_range(32, 1, 8, 10000.0, 10 ** 12)[1] == 7


def test_mscale_and_softmax_scale_v3(v3):
    assert yarn_mscale(40) == pytest.approx(1.36889, abs=1e-5)
    assert yarn_mscale(40) ** 2 == pytest.approx(1.87385, abs=1e-5)
    assert yarn_mscale(1) == 1.0 and yarn_mscale(0.5) == 1.0
    assert yarn_mscale(40, mscale=0.5) == pytest.approx(0.05 * math.log(40) + 1)
    assert softmax_scale(v3) == pytest.approx(0.135234, abs=1e-6)
    assert softmax_scale(v3.replace(rope_scaling=None)) == pytest.approx(192 ** -0.5)


def test_v3_attention_factor_is_one(v3):
    # mscale = mscale_all_dim = 1: the temperature goes into the softmax scale, not cos/sin
    assert rope_parameters(v3)[1] == 1.0


# --------------------------------------------------------------- the ramp
def test_ramp_endpoints_and_monotonic():
    gamma = yarn_ramp(10, 23, 32)
    assert torch.all(gamma[:11] == 1) and torch.all(gamma[23:] == 0)
    assert gamma[16].item() == pytest.approx(1 - 6 / 13)
    assert torch.all(gamma[1:] <= gamma[:-1]) and torch.all(gamma[10:24].diff() < 0)


def test_ntk_by_parts_v3_by_hand_float64():
    inv = ntk_by_parts_inv_freq(**V3)
    for i in range(32):
        theta = 10000.0 ** (-2 * i / 64)
        gamma = min(max((23 - i) / 13, 0.0), 1.0)     # 1 up to pair 10, 0 from pair 23
        want = (1 - gamma) * theta / 40 + gamma * theta
        assert inv[i].item() == pytest.approx(want, rel=1e-6), i


def test_ntk_by_parts_keeps_fast_and_interpolates_slow_pairs():
    theta, inv = 1 / 10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64), ntk_by_parts_inv_freq(**V3)
    torch.testing.assert_close(inv[:11], theta[:11], rtol=0, atol=0)
    torch.testing.assert_close(inv[23:], theta[23:] / 40, rtol=1e-6, atol=0)
    assert torch.all(inv.diff() < 0)            # still a strictly decreasing spectrum


# --------------------------------------------------------------- PI / NTK limits
@pytest.mark.parametrize("method", [pi_inv_freq, ntk_aware_inv_freq, ntk_by_parts_inv_freq])
def test_scale_one_is_plain_rope(method):
    torch.testing.assert_close(method(64, 10000.0, 1.0), rope_frequencies(64, 10000.0), rtol=1e-6, atol=0)


def test_pi_divides_every_frequency():
    torch.testing.assert_close(pi_inv_freq(64, 10000.0, 4.0), rope_frequencies(64) / 4, rtol=1e-6, atol=0)


def test_ntk_aware_keeps_fastest_and_pi_on_slowest():
    inv, theta = ntk_aware_inv_freq(64, 10000.0, 8.0), rope_frequencies(64)
    assert inv[0].item() == 1.0
    assert inv[-1].item() == pytest.approx(theta[-1].item() / 8, rel=1e-5)
    ratio = theta / inv                         # interpolation grows geometrically with i
    assert torch.all(ratio.diff() > 0)


def test_v3_float64_reference_within_1e6(v3):
    """float32 inv_freq against the same formula in float64 (math module)."""
    inv, _ = rope_parameters(v3)
    for i in range(32):
        theta = 1 / 10000.0 ** (2 * i / 64)
        gamma = min(max((23 - i) / 13, 0.0), 1.0)
        assert inv[i].item() == pytest.approx(theta / 40 * (1 - gamma) + theta * gamma, rel=1e-6)


def test_bad_inputs_raise_one_line_errors():
    for call, match in [(lambda: pi_inv_freq(63), "even"), (lambda: pi_inv_freq(64, 10000.0, 0.5), ">= 1"),
                        (lambda: ntk_aware_inv_freq(64, 1.0, 2.0), "base"),
                        (lambda: yarn_correction_range(1, 32, 64, 10000.0, 4096), "beta_fast"),
                        (lambda: yarn_correction_range(32, 1, 64, 10000.0, 0), "original_max"),
                        (lambda: yarn_ramp(5, 2, 8), "low"), (lambda: yarn_mscale(-1), "positive"),
                        (lambda: softmax_scale({"factor": 40}), "ModelConfig")]:
        with pytest.raises(ValueError, match=match) as info:
            call()
        assert "\n" not in str(info.value)


# --------------------------------------------------------------- transformers parity
@pytest.fixture
def hf_lib():
    """transformers, a test-only dependency: the parity tests skip without it, the rest still run."""
    return pytest.importorskip("transformers")


def _hf(config):
    from transformers import DeepseekV3Config

    from deepseek_mini.pretrained import hf_config_dict
    return DeepseekV3Config(**hf_config_dict(config))


def test_v3_matches_transformers(v3, hf_lib):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding, yarn_apply_mscale

    hf = _hf(v3)
    hf_inv, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    inv, factor = rope_parameters(v3)
    assert rope_dim(v3) == 64 and inv.shape == hf_inv.shape == (32,)
    assert torch.equal(inv, hf_inv)             # bit-equal: the same float32 operations
    assert factor == hf_factor == 1.0
    assert softmax_scale(v3) == pytest.approx(yarn_apply_mscale(hf.rope_parameters, hf.qk_head_dim ** -0.5),
                                                   rel=1e-12)
    # the cos/sin tables transformers feeds the interleaved rotation: (freqs, freqs) x attention_scaling
    positions = torch.tensor([[0, 1, 17, 4095, 4096, 8191]])
    hf_cos, hf_sin = DeepseekV3RotaryEmbedding(hf)(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = rope_cos_sin(inv, 8192)
    torch.testing.assert_close(cos[positions[0]] * factor, hf_cos[0, :, :32], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[positions[0]] * factor, hf_sin[0, :, :32], rtol=0, atol=1e-6)
    assert torch.equal(hf_cos[..., :32], hf_cos[..., 32:])   # HF repeats the table; pair i uses column i


@pytest.mark.parametrize("extra", [{}, {"mscale": 0.707, "mscale_all_dim": 1.0}, {"attention_factor": 1.25},
                                   {"beta_fast": 16, "beta_slow": 2, "truncate": False}])
def test_toy_yarn_variants_match_transformers(extra, hf_lib):
    """Without mscale_all_dim the temperature goes onto cos/sin (mscale(s)) and the softmax is plain."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    config = load_config("toy-mla", max_position_embeddings=256, rope_scaling={
        "type": "yarn", "factor": 4, "original_max_position_embeddings": 64, **extra})
    hf = _hf(config)
    hf_inv, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    inv, factor = rope_parameters(config)
    assert torch.equal(inv, hf_inv)
    assert factor == pytest.approx(hf_factor, rel=1e-12)
    assert softmax_scale(config) == pytest.approx(yarn_apply_mscale(hf.rope_parameters, hf.qk_head_dim ** -0.5),
                                                       rel=1e-12)


def test_plain_and_linear_inv_freq_equal_transformers_bit_for_bit(hf_lib):
    """Chapter 01's frequencies are built as 1 / b^(2i/d), the float32 form of transformers and DeepSeek."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    config = load_config("toy-mla", max_position_embeddings=256)
    hf_inv = DeepseekV3RotaryEmbedding(_hf(config)).inv_freq
    assert torch.equal(rope_parameters(config)[0], hf_inv)
    linear = config.replace(rope_scaling={"type": "linear", "factor": 4})
    hf_inv, hf_factor = ROPE_INIT_FUNCTIONS["linear"](_hf(linear))
    inv, factor = rope_parameters(linear)
    assert torch.equal(inv, hf_inv) and factor == hf_factor == 1.0


# --------------------------------------------------------------- the model applies rope_scaling
YARN_TINY = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
             "beta_slow": 1, "rope_theta": 10000.0}
LONG = torch.randint(0, 64, (2, 100), generator=torch.Generator().manual_seed(0))   # past the original 32


def _hf_yarn(tmp_path, **rope):
    """A tiny transformers DeepseekV3 with YaRN (4 x 32 = 128 positions), every weight random, saved."""
    from test_pretrained import _hf_model    # the same tiny model the checkpoint tests use

    hf = _hf_model(max_position_embeddings=128, rope_parameters={**YARN_TINY, **rope})
    hf.save_pretrained(tmp_path)
    with torch.no_grad():
        return hf(LONG).logits


@pytest.mark.parametrize("rope", [{"mscale": 1.0, "mscale_all_dim": 1.0},      # V3's: temperature in the softmax
                                  {"mscale": 0.707, "mscale_all_dim": 1.0},    # both: ratio on cos/sin as well
                                  {}])                                         # none: mscale(s) on cos/sin
@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
def test_yarn_checkpoint_logits_match_transformers(tmp_path, rope, attn_impl, hf_lib):
    from deepseek_mini.pretrained import from_pretrained

    hf_logits = _hf_yarn(tmp_path, **rope)
    model = from_pretrained(tmp_path, attn_impl=attn_impl)
    assert model.config.rope_scaling["factor"] == 4.0 and model.rope_cos.shape[0] == 128
    with torch.no_grad():
        logits = model(LONG)
    torch.testing.assert_close(logits, hf_logits, rtol=0, atol=1e-4)
    # and YaRN mattered: the same weights with plain RoPE give other logits past position 32
    plain = from_pretrained(tmp_path, attn_impl=attn_impl, rope_scaling=None)
    with torch.no_grad():
        assert (plain(LONG) - hf_logits).abs().max() > 1e-2


def test_transformers_loads_our_yarn_and_half_split_model(tmp_path, hf_lib):
    """What we save with YaRN and rope_interleave=False, transformers runs the same."""
    from transformers import DeepseekV3ForCausalLM

    from deepseek_mini import build_model
    from deepseek_mini.pretrained import from_pretrained, save_pretrained

    config = load_config("toy", num_hidden_layers=3, max_position_embeddings=128, rope_interleave=False,
                         rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 32,
                                       "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    model = build_model(config, seed=0).eval()
    save_pretrained(model, tmp_path)
    tokens = LONG % config.vocab_size
    with torch.no_grad():
        ours = model(tokens)
        hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()(tokens).logits
    torch.testing.assert_close(ours, hf, rtol=0, atol=1e-4)
    # our loader relabels the half-split rope rows into interleaved pairs: the same function again
    reloaded = from_pretrained(tmp_path)
    assert reloaded.config.rope_interleave is True
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens), ours, rtol=0, atol=1e-5)


def test_ntk_config_is_not_saved_for_transformers(tmp_path):
    from deepseek_mini.pretrained import hf_config_dict

    with pytest.raises(ValueError, match="'ntk'.*no transformers equivalent"):
        hf_config_dict(load_config("toy", rope_scaling={"type": "ntk", "factor": 4}))


@pytest.mark.parametrize("kind", ["linear", "ntk", "yarn"])
def test_cached_decode_equals_full_forward_past_the_original_length(kind):
    """The KV cache (chapter 01/02) reads the extended tables at the right positions."""
    from deepseek_mini import build_model

    scaling = {"type": kind, "factor": 4}
    if kind == "yarn":
        scaling.update(original_max_position_embeddings=16)
    model = build_model(load_config("toy", max_position_embeddings=64, rope_scaling=scaling), seed=0).eval()
    tokens = torch.randint(0, 260, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(1, 40)
        steps = [model(tokens[:, :24], cache=cache)] + [
            model(tokens[:, t:t + 1], start_pos=t, cache=cache) for t in range(24, 40)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_baseline_attention_takes_the_softmax_scale():
    """MHA models get YaRN's temperature too: softmax scale = head_dim^-1/2 x mscale(s)^2."""
    from deepseek_mini import build_model
    from deepseek_mini.attention import Attention, attention_reference, causal_mask

    config = load_config("toy-dense", rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 128,
                                                    "mscale_all_dim": 1.0})
    model = build_model(config, device="meta")
    assert model.layers["0"].attn.softmax_scale == pytest.approx(32 ** -0.5 * (0.1 * math.log(4) + 1) ** 2)
    attn = Attention(16, 2, softmax_scale=0.7)
    attn.init_weights(0.5, torch.Generator().manual_seed(0))
    x = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1))
    cos, sin = rope_cos_sin(rope_frequencies(8), 5)
    q, k, v = (w(x).view(1, 5, 2, 8) for w in (attn.wq, attn.wk, attn.wv))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    want = attention_reference(*(t.transpose(1, 2) for t in (q, k, v)), causal_mask(5, 5), scale=0.7)
    torch.testing.assert_close(attn(x, (cos, sin)), attn.wo(want.transpose(1, 2).reshape(1, 5, 16)))
