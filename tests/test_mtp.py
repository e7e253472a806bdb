"""Multi-Token Prediction (chapter 04, DeepSeek-V3 §2.2, eqs. 21-25): one depth computed by hand
from the weight matrices (embedding first, as the released ``eh_proj``), the sequential chain
(depth k reads h^{k-1} and Emb(t_{i+k})), causality, the embedding and head shared by
reference, ``mtp_shift`` / ``mtp_losses`` / ``mtp_lambda`` against hand values, the main model
unchanged by adding MTP, parameter counts (671B: 11.61B of MTP), pipeline stages, float64
gradients, cached decoding and the MTP block's MoE routing and load."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from deepseek_mini import build_model, count_parameters, load_config
from deepseek_mini.layers import MLP, RMSNorm
from deepseek_mini.model import cut
from deepseek_mini.moe import MoE, expert_load, moe_layers
from deepseek_mini.mtp import (IGNORE_INDEX, MTPModule, SharedHead, mtp_lambda, mtp_logits, mtp_losses, mtp_shift,
                               new_mtp_cache)

V = 260
# A tiny MLA model with dense blocks everywhere (MTP block included): on "toy-mla".
DENSE = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
# The same with DeepSeekMoE from layer 1 on (on "toy", first_k_dense_replace=1): the MTP block is MoE.
MOE = DENSE | dict(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, moe_intermediate_size=16)


# ----------------------------------------------------------------------------- helpers
def mtp_config(moe: bool = False, depth: int = 1, **overrides):
    return load_config("toy" if moe else "toy-mla", **{**(MOE if moe else DENSE),
                                                         "num_nextn_predict_layers": depth, **overrides})


def mtp_model(moe: bool = False, depth: int = 1, seed: int = 0, dtype=torch.float64, **overrides):
    """A tiny model with ``depth`` MTP modules, float64 by default (hand computations to 1e-12)."""
    return build_model(mtp_config(moe, depth, **overrides), seed=seed, dtype=dtype)


@torch.no_grad()
def jitter_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Every RMSNorm gain ~ 1 + 0.5 N(0, 1), so enorm, hnorm and shared_head.norm are told apart."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=g, dtype=module.weight.dtype))


def inputs(model, batch=2, length=6, extra=None, seed=0):
    """Random final hidden states (B, T, d) and labels (B, T + D) (a full window for every depth)."""
    g = torch.Generator().manual_seed(seed)
    depth = model.config.num_nextn_predict_layers if extra is None else extra
    dtype = next(model.parameters()).dtype
    hidden = torch.randn(batch, length, model.config.hidden_size, generator=g, dtype=dtype)
    return hidden, torch.randint(0, V, (batch, length + depth), generator=g)


def rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rope(model, length, start=0):
    return model.rope_cos[start:start + length], model.rope_sin[start:start + length]


def differs(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-9) -> bool:
    return bool((a - b).abs().max() > tol)


def bump(t: torch.Tensor, *index) -> torch.Tensor:
    """A copy of the token ids ``t`` with one id changed."""
    t = t.clone()
    t[index] = (t[index] + 1) % V
    return t


# ----------------------------------------------------------------------------- 1. eqs. 21-23 by hand
def test_one_depth_by_hand_from_the_weight_matrices():
    model = mtp_model()
    jitter_norms(model)
    hidden, labels = inputs(model, length=5)
    m, T = model.mtp[0], 5
    emb = model.embed.weight[labels[:, :T]]                                     # Emb(t_{i+1})
    h_prime = torch.cat([rms(emb) * m.enorm.weight, rms(hidden) * m.hnorm.weight], -1) @ m.eh_proj.weight.T  # eq. 21
    h_k = m.block(h_prime, rope(model, T))                                      # eq. 22
    want = (rms(h_k) * m.shared_head.norm.weight) @ model.head.weight.T         # eq. 23 (logits; softmax in the loss)
    with torch.no_grad():
        (got,) = mtp_logits(model, hidden, labels)
    assert got.shape == (2, T, V)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # The paper's written order [h; emb] with the same matrix is a different function.
    paper = torch.cat([rms(hidden) * m.hnorm.weight, rms(emb) * m.enorm.weight], -1) @ m.eh_proj.weight.T
    assert differs(m.block(paper, rope(model, T)), h_k)


@torch.no_grad()
def test_embedding_comes_first_in_eh_proj():
    model = mtp_model()
    jitter_norms(model)
    m, d = model.mtp[0], model.config.hidden_size
    h, e = inputs(model, length=4, seed=1)[0], inputs(model, length=4, seed=2)[0]
    swapped = copy.deepcopy(m)                  # columns [h-half, e-half] and the two gains exchanged
    w = m.eh_proj.weight
    swapped.eh_proj.weight.copy_(torch.cat([w[:, d:], w[:, :d]], dim=1))
    swapped.enorm.weight.copy_(m.hnorm.weight)
    swapped.hnorm.weight.copy_(m.enorm.weight)
    r = rope(model, 4)
    first, second = copy.deepcopy(m), copy.deepcopy(m)      # columns [:d] read the embedding, [d:] the hidden state
    first.eh_proj.weight[:, d:] = 0
    second.eh_proj.weight[:, :d] = 0
    torch.testing.assert_close(first(h, e, r), first(e, e, r), rtol=0, atol=0)
    torch.testing.assert_close(second(h, e, r), second(h, h, r), rtol=0, atol=0)
    assert differs(first(h, e, r), first(h, h, r)) and differs(second(h, e, r), second(e, e, r))
    assert differs(swapped(h, e, r), m(h, e, r))
    torch.testing.assert_close(swapped(e, h, r), m(h, e, r), rtol=0, atol=1e-12)   # roles exchanged: same
    torch.testing.assert_close(swapped(h, h, r), m(h, h, r), rtol=0, atol=1e-12)   # emb == h: order invisible


def test_module_checks_its_input_shapes():
    model = mtp_model()
    h = torch.zeros(1, 4, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"same shape, got h_prev \(1, 4, 32\) and emb \(1, 3, 32\)"):
        model.mtp[0](h, h[:, :3], rope(model, 4))


# ----------------------------------------------------------------------------- 2. the sequential chain (D = 2)
@torch.no_grad()
def test_depth_two_consumes_depth_one_output_not_the_main_hidden_state():
    model = mtp_model(depth=2)
    jitter_norms(model)
    hidden, labels = inputs(model, length=5)
    T, r = 5, rope(model, 5)
    l1, l2 = mtp_logits(model, hidden, labels)
    h1 = model.mtp[0](hidden, model.embed(labels[:, 0:T]), r)        # Emb(t_{i+1})
    h2 = model.mtp[1](h1, model.embed(labels[:, 1:T + 1]), r)        # Emb(t_{i+2})
    torch.testing.assert_close(l1, model.mtp[0].shared_head(h1, model.head), rtol=0, atol=1e-12)
    torch.testing.assert_close(l2, model.mtp[1].shared_head(h2, model.head), rtol=0, atol=1e-12)
    from_h0 = model.mtp[1].shared_head(model.mtp[1](hidden, model.embed(labels[:, 1:T + 1]), r), model.head)
    assert differs(l2, from_h0)


@torch.no_grad()
def test_perturbing_depth_one_reaches_depth_two_but_not_back():
    model = mtp_model(depth=2)
    hidden, labels = inputs(model, length=5)
    l1, l2 = mtp_logits(model, hidden, labels)

    changed = copy.deepcopy(model)
    changed.mtp[0].block.ffn.w2.weight.mul_(3.0)                     # module 0's block
    c1, c2 = mtp_logits(changed, hidden, labels)
    assert differs(c1, l1) and differs(c2, l2)

    changed = copy.deepcopy(model)
    changed.mtp[0].shared_head.norm.weight.mul_(2.0)                 # h^1 is passed on before the depth's norm
    c1, c2 = mtp_logits(changed, hidden, labels)
    assert differs(c1, l1)
    torch.testing.assert_close(c2, l2, rtol=0, atol=0)

    changed = copy.deepcopy(model)
    changed.mtp[1].eh_proj.weight.mul_(2.0)                          # depth 2 never feeds depth 1
    c1, c2 = mtp_logits(changed, hidden, labels)
    torch.testing.assert_close(c1, l1, rtol=0, atol=0)
    assert differs(c2, l2)


@pytest.mark.parametrize("depth", [1, 2])
@torch.no_grad()
def test_depth_k_reads_the_embedding_of_label_k_minus_1_plus_i(depth):
    # Position i of depth k embeds t_{i+k} = labels[:, k-1+i]: changing it changes depth k at i,
    # never before i; depth 1 sees labels[:, i+1] only from position i+1 on.
    model = mtp_model(depth=2)
    hidden, labels = inputs(model, length=6)
    i = 2
    before = mtp_logits(model, hidden, labels)
    after = mtp_logits(model, hidden, bump(labels, slice(None), depth - 1 + i))
    k = depth - 1
    torch.testing.assert_close(after[k][:, :i], before[k][:, :i], rtol=0, atol=1e-12)
    assert torch.all((after[k][:, i] - before[k][:, i]).abs().amax(-1) > 1e-9)
    if depth == 2:
        torch.testing.assert_close(after[0][:, :i + 1], before[0][:, :i + 1], rtol=0, atol=1e-12)
        assert differs(after[0][:, i + 1], before[0][:, i + 1])


# ----------------------------------------------------------------------------- 3. causality
@pytest.mark.parametrize("mode", ["train", "eval"])
@torch.no_grad()
def test_mtp_logits_are_causal_in_tokens_and_labels(mode):
    # Depth k at position i may read tokens x_0..x_i (through h) and labels[:, :i + k] (eq. 21 at
    # depths 1..k); an MoE model, whose routing is per token.
    model = mtp_model(moe=True, depth=2).train(mode == "train")
    g = torch.Generator().manual_seed(3)
    T = 8
    tokens, labels = torch.randint(0, V, (2, T), generator=g), torch.randint(0, V, (2, T + 2), generator=g)

    def run(x, y):
        logits, aux = model(x, return_aux=True)
        return [logits, *mtp_logits(model, aux["hidden"], y)]

    base = run(tokens, labels)
    j = 4
    moved = run(bump(tokens, slice(None), j), labels)                 # a later input token
    for before, after in zip(base, moved):
        torch.testing.assert_close(after[:, :j], before[:, :j], rtol=0, atol=1e-10)
        assert differs(after[:, j], before[:, j])
    moved = run(tokens, bump(labels, slice(None), j))                 # a later label
    torch.testing.assert_close(moved[0], base[0], rtol=0, atol=0)     # the main model never reads labels
    for k in (1, 2):
        first = j - k + 1                                             # first position whose inputs hold labels[:, j]
        torch.testing.assert_close(moved[k][:, :first], base[k][:, :first], rtol=0, atol=1e-10)
        assert differs(moved[k][:, first], base[k][:, first])


# ----------------------------------------------------------------------------- 4. shared by reference
def test_embedding_and_head_are_shared_by_reference_not_copied():
    model = mtp_model(depth=2)
    shared = {id(model.embed.weight), id(model.head.weight)}
    assert not any(id(p) in shared for p in model.mtp.parameters())
    assert not any(isinstance(m, torch.nn.Embedding) for m in model.mtp.modules())
    assert all(V not in p.shape for p in model.mtp.parameters())       # no vocabulary-sized weight at all
    unique = {id(p): p.numel() for p in model.parameters()}
    count = count_parameters(model)
    assert sum(unique.values()) == count.total + count.mtp


def test_mtp_loss_gradients_reach_embedding_head_and_trunk():
    model = mtp_model(depth=1, dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    tokens, labels = torch.randint(0, V, (2, 6), generator=g), torch.randint(0, V, (2, 7), generator=g)
    logits, aux = model(tokens, return_aux=True)
    torch.testing.assert_close(model.head(aux["hidden"]), logits, rtol=0, atol=0)    # the state the head read
    sum(mtp_losses(mtp_logits(model, aux["hidden"], labels), labels)).backward()     # the MTP loss alone
    main = [(n, p) for n, p in model.named_parameters() if not n.startswith("mtp.")]
    assert main and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in main), \
        [n for n, p in main if p.grad is None or not p.grad.abs().sum() > 0]


def test_mtp_embedding_gradient_lands_on_the_rows_of_its_input_tokens():
    model = mtp_model(depth=1)
    hidden, labels = inputs(model, length=5)
    sum(mtp_losses(mtp_logits(model, hidden, labels), labels)).backward()        # hidden is a leaf: no trunk
    rows = model.embed.weight.grad.abs().sum(-1).nonzero().flatten().tolist()
    assert rows == sorted(set(labels[:, :5].flatten().tolist()))                # t_{i+1} for i < T, not t_{T+1}
    assert model.head.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- 5. mtp_shift
def test_mtp_shift_full_window_by_hand():
    labels = torch.tensor([[10, 11, 12, 13, 14, 15]])                 # T = 4, D = 2: T + D labels
    assert [t.tolist() for t in mtp_shift(labels, 4, 1)] == [[[10, 11, 12, 13]], [[11, 12, 13, 14]]]
    assert [t.tolist() for t in mtp_shift(labels, 4, 2)] == [[[11, 12, 13, 14]], [[12, 13, 14, 15]]]


def test_mtp_shift_short_window_pads_inputs_with_0_and_targets_with_ignore_index():
    labels = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])         # only T labels
    x = IGNORE_INDEX
    assert IGNORE_INDEX == -100                                        # F.cross_entropy's default
    assert [t.tolist() for t in mtp_shift(labels, 4, 1)] == [[[10, 11, 12, 13], [20, 21, 22, 23]],
                                                             [[11, 12, 13, x], [21, 22, 23, x]]]
    assert [t.tolist() for t in mtp_shift(labels, 4, 2)] == [[[11, 12, 13, 0], [21, 22, 23, 0]],
                                                             [[12, 13, x, x], [22, 23, x, x]]]
    assert [t.tolist() for t in mtp_shift(labels[:1], 4, 5)] == [[[0, 0, 0, 0]], [[x, x, x, x]]]
    inputs_, targets = mtp_shift(labels, 3, 1)                         # a longer window than needed
    assert inputs_.tolist() == [[10, 11, 12], [20, 21, 22]] and targets.tolist() == [[11, 12, 13], [21, 22, 23]]


def test_mtp_shift_errors():
    with pytest.raises(ValueError, match=r"depth \(0\) must be >= 1: depth 0 is the main model"):
        mtp_shift(torch.zeros(1, 5, dtype=torch.long), 4, 0)
    with pytest.raises(ValueError, match=r"labels must be \(batch, >= 4\) token ids, got \(1, 3\)"):
        mtp_shift(torch.zeros(1, 3, dtype=torch.long), 4, 1)
    with pytest.raises(ValueError, match=r"labels must be \(batch, >= 4\) token ids, got \(5,\)"):
        mtp_shift(torch.zeros(5, dtype=torch.long), 4, 1)


# ----------------------------------------------------------------------------- 6. mtp_losses
def _cross_entropy_by_hand(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    terms = [-torch.log_softmax(logits[b, i], -1)[targets[b, i]]
             for b in range(targets.shape[0]) for i in range(targets.shape[1]) if targets[b, i] != IGNORE_INDEX]
    return sum(terms) / len(terms)


def test_mtp_losses_by_hand_on_the_valid_positions():
    g = torch.Generator().manual_seed(5)
    logits = [torch.randn(2, 4, 7, generator=g, dtype=torch.float64) for _ in range(2)]
    labels = torch.randint(0, 7, (2, 5), generator=g)                 # T + 1: depth 2 lacks its last target
    l1, l2 = mtp_losses(logits, labels)
    assert l1.dtype == l2.dtype == torch.float32                       # scored in float32, like the main loss
    torch.testing.assert_close(l1, _cross_entropy_by_hand(logits[0], labels[:, 1:5]).float())
    torch.testing.assert_close(l2, _cross_entropy_by_hand(logits[1], torch.cat(
        [labels[:, 2:5], torch.full((2, 1), IGNORE_INDEX)], 1)).float())
    moved = [logits[0], logits[1].clone()]
    moved[1][:, 3] += torch.randn(2, 7, generator=g, dtype=torch.float64)    # the position without a target
    assert torch.equal(mtp_losses(moved, labels)[1], l2)


def test_mtp_losses_with_a_full_window_is_eq_24():
    # L^k = -(1/T) sum_i log P^k_i[t_{i+k+1}], averaged over the batch.
    g = torch.Generator().manual_seed(6)
    B, T, D = 2, 5, 2
    logits = [torch.randn(B, T, 9, generator=g) for _ in range(D)]
    labels = torch.randint(0, 9, (B, T + D), generator=g)
    for k, loss in enumerate(mtp_losses(logits, labels), start=1):
        log_p = torch.log_softmax(logits[k - 1], -1)
        eq24 = sum(-log_p[b, i, labels[b, i + k]] for b in range(B) for i in range(T)) / (B * T)
        torch.testing.assert_close(loss, eq24)
        assert loss.dtype == torch.float32


# ----------------------------------------------------------------------------- 7. mtp_lambda
def test_mtp_lambda_is_0_3_for_the_first_10_of_14_8_then_0_1():
    for total in (148, 1000, 7):
        switch = round(10 / 14.8 * total)                              # 100, 676, 5
        assert mtp_lambda(1, total) == 0.3
        assert mtp_lambda(switch, total) == 0.3
        assert mtp_lambda(switch + 1, total) == 0.1
        assert mtp_lambda(total, total) == 0.1
    assert round(10 / 14.8 * 1000) == 676


def test_mtp_lambda_custom_values_and_errors():
    assert mtp_lambda(5, 10, early=1.0, late=0.5, switch=0.5) == 1.0
    assert mtp_lambda(6, 10, early=1.0, late=0.5, switch=0.5) == 0.5
    assert mtp_lambda(1, 10, switch=0.0) == 0.1                        # late from the first step
    assert mtp_lambda(10, 10, switch=1.0) == 0.3                       # early to the last
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=rf"switch \({bad}\) must be a fraction of the run in \[0, 1\]"):
            mtp_lambda(1, 10, switch=bad)


# ----------------------------------------------------------------------------- 8. main model unchanged
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@torch.no_grad()
def test_adding_mtp_leaves_the_main_model_exactly_unchanged(moe):
    tokens = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(7))
    with_mtp = build_model(mtp_config(moe, depth=1), seed=11)
    without = build_model(mtp_config(moe, depth=0), seed=11)
    assert without.mtp is None and len(with_mtp.mtp) == 1
    assert torch.equal(with_mtp(tokens), without(tokens))
    mine = with_mtp.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in without.state_dict().items())


def test_state_dict_keys_follow_the_checkpoint_names():
    model = mtp_model(moe=True, depth=1)
    keys = [k for k in model.state_dict() if k.startswith("mtp.")]
    assert keys[:3] == ["mtp.0.enorm.weight", "mtp.0.hnorm.weight", "mtp.0.eh_proj.weight"]
    assert keys[-1] == "mtp.0.shared_head.norm.weight"
    block = [k for k in keys if k.startswith("mtp.0.block.")]
    assert len(block) == len(keys) - 4
    # The block is an ordinary MoE decoder layer: the same names and shapes as main layer 1.
    layer = {k[len("layers.1."):]: v.shape for k, v in model.state_dict().items() if k.startswith("layers.1.")}
    assert {k[len("mtp.0.block."):]: model.state_dict()[k].shape for k in block} == layer
    assert isinstance(model.mtp[0], MTPModule) and isinstance(model.mtp[0].shared_head, SharedHead)
    assert isinstance(model.mtp[0].block.ffn, MoE)
    assert model.mtp[0].eh_proj.weight.shape == (32, 64) and model.mtp[0].eh_proj.bias is None


def test_mtp_initialisation_norm_gains_one_and_fresh_weights():
    model = mtp_model(depth=2)
    for m in model.mtp:
        for norm in (m.enorm, m.hnorm, m.shared_head.norm):
            assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    w0, w1 = model.mtp[0].eh_proj.weight, model.mtp[1].eh_proj.weight
    assert not torch.equal(w0, w1) and 0.01 < float(w0.detach().std()) < 0.03       # N(0, 0.02^2), drawn per module


# ----------------------------------------------------------------------------- 9. parameter counts
def _mla_params(d, heads, dn, dr, dv, kv_rank, q_rank=None) -> int:
    query = d * heads * (dn + dr) if q_rank is None else d * q_rank + q_rank + q_rank * heads * (dn + dr)
    return query + d * (kv_rank + dr) + kv_rank + kv_rank * heads * (dn + dv) + heads * dv * d


def test_count_parameters_deepseek_v3_mtp_is_11_61b():
    count = count_parameters("deepseek-v3")
    assert round(count.total / 1e9, 2) == 671.03
    assert round(count.mtp / 1e9, 2) == 11.61
    # By hand: eh_proj 2d*d, three norms, and one MoE decoder layer (MLA + 257 experts of width
    # 2048 + the 256 router centroids; the balancing bias is a buffer, no parameter) + its two norms.
    d = 7168
    layer = (_mla_params(d, 128, 128, 64, 128, 512, 1536) + 257 * 3 * d * 2048 + 256 * d + 2 * d)
    assert _mla_params(d, 128, 128, 64, 128, 512, 1536) == 187_107_328
    assert count.mtp == 2 * d * d + 3 * d + layer == 11_610_067_968      # 11,610,068,224 with the 256 biases


def test_count_parameters_toy_by_hand_formula():
    d, dff = 32, 64
    dense = load_config("toy-dense", num_hidden_layers=2, hidden_size=d, num_attention_heads=4,
                        intermediate_size=dff, max_position_embeddings=64)
    block = 4 * d * d + 3 * d * dff + 2 * d                           # MHA + SwiGLU + two norms
    for depth in (1, 2):
        count = count_parameters(dense.replace(num_nextn_predict_layers=depth))
        assert count.mtp == depth * (2 * d * d + 3 * d + block)
        assert count.total == count_parameters(dense).total          # MTP stays out of the main model's total
        assert count.activated == count_parameters(dense).activated
    mla = count_parameters(mtp_config()).mtp
    assert mla == 2 * d * d + 3 * d + _mla_params(d, 4, 8, 4, 8, 16) + 3 * d * dff + 2 * d
    assert count_parameters(mtp_config(depth=0)).mtp == 0
    assert "MTP" in str(count_parameters(mtp_config())) and "MTP" not in str(count_parameters(mtp_config(depth=0)))


# ----------------------------------------------------------------------------- 10. stages
def test_cut_keeps_mtp_only_with_the_head():
    model = build_model(mtp_config(moe=True, depth=1, num_hidden_layers=3), seed=0)
    first, middle = cut(model, [0], embed=True), cut(model, [1])
    last = cut(model, [2], head=True)
    assert first.mtp is None and middle.mtp is None
    assert last.mtp is not None and last.mtp is not model.mtp             # a copy, equal values
    mine = last.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in model.state_dict().items() if k.startswith("mtp."))
    whole = cut(model, [0, 1, 2], embed=True, head=True)
    hidden, labels = inputs(model, length=5, seed=8)
    with torch.no_grad():
        for a, b in zip(mtp_logits(whole, hidden, labels), mtp_logits(model, hidden, labels)):
            assert torch.equal(a, b)


def test_mtp_logits_without_mtp_modules_raises_an_actionable_error():
    model = mtp_model(depth=0)
    hidden, labels = inputs(model, length=4, extra=1)
    with pytest.raises(ValueError, match=r"the model has no MTP modules: build it with num_nextn_predict_layers >= 1"):
        mtp_logits(model, hidden, labels)
    stage = cut(mtp_model(depth=1), [0], embed=True)                       # a stage without the head
    with pytest.raises(ValueError, match="no MTP modules"):
        mtp_logits(stage, hidden, labels)


def test_mtp_logits_on_a_last_stage_without_the_embedding_raises_an_actionable_error():
    # cut(head=True) keeps the MTP modules but not the embedding they read Emb(t_{i+k}) from:
    # a one-line ValueError naming the embedding, not "'NoneType' object is not callable".
    last = cut(mtp_model(depth=1), [1], head=True)
    hidden, labels = inputs(last, length=4)
    with pytest.raises(ValueError, match="embed"):
        mtp_logits(last, hidden, labels)


# ----------------------------------------------------------------------------- 11. float64 gradients
def test_gradcheck_mtp_logits_wrt_hidden_float64():
    config = load_config("toy-mla", num_hidden_layers=1, hidden_size=16, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=24,
                         max_position_embeddings=16, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4,
                         v_head_dim=4, num_nextn_predict_layers=2)
    model = build_model(config, seed=0, dtype=torch.float64)
    jitter_norms(model)
    assert all(isinstance(m.block.ffn, MLP) for m in model.mtp)          # dense: no piecewise routing
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(1, 3, 16, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (1, 5), generator=g)
    assert torch.autograd.gradcheck(lambda h: tuple(mtp_logits(model, h, labels)), (hidden,), fast_mode=True)


# ----------------------------------------------------------------------------- 12. cached decoding
@pytest.mark.parametrize("depth,attn_impl", [(1, "absorb"), (1, "naive"), (2, "absorb")])
@torch.no_grad()
def test_cached_chunks_equal_the_uncached_chain(depth, attn_impl):
    model = mtp_model(moe=True, depth=depth, attn_impl=attn_impl).eval()
    T, split = 5, 2
    hidden, labels = inputs(model, length=T, seed=10)
    full = mtp_logits(model, hidden, labels)
    caches = new_mtp_cache(model, batch_size=2, max_len=16)
    assert len(caches) == depth
    first = mtp_logits(model, hidden[:, :split], labels, start_pos=0, caches=caches)
    second = mtp_logits(model, hidden[:, split:], labels[:, split:], start_pos=split, caches=caches)
    for k in range(depth):
        torch.testing.assert_close(torch.cat([first[k], second[k]], 1), full[k], rtol=0, atol=1e-12)
    steps = []                                                             # then token by token
    caches = new_mtp_cache(model, batch_size=2, max_len=16)
    for i in range(T):
        steps.append(mtp_logits(model, hidden[:, i:i + 1], labels[:, i:], start_pos=i, caches=caches))
    for k in range(depth):
        torch.testing.assert_close(torch.cat([s[k] for s in steps], 1), full[k], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- 13. the MTP block's MoE
def test_mtp_moe_load_is_counted_in_training_and_routing_appended():
    model = mtp_model(moe=True, depth=1, dtype=torch.float32).train()
    moe = model.mtp[0].block.ffn
    assert moe in moe_layers(model)                                     # update_biases reaches it
    g = torch.Generator().manual_seed(12)
    tokens, labels = torch.randint(0, V, (2, 6), generator=g), torch.randint(0, V, (2, 7), generator=g)
    _, aux = model(tokens, return_aux=True)
    routing = aux["routing"]
    assert len(routing) == 1                                            # main layer 1
    main_load = model.layers["1"].ffn.tokens_per_expert.clone()
    assert torch.equal(moe.tokens_per_expert, torch.zeros(8))
    mtp_logits(model, aux["hidden"], labels, routing=routing)
    assert len(routing) == 2 and routing[0] is aux["routing"][0]
    scores, indices, mask = routing[1]
    assert scores.shape == (2, 6, 8) and indices.shape == (2, 6, 2) and mask is None
    assert torch.equal(moe.tokens_per_expert, expert_load(indices, 8))
    assert moe.tokens_per_expert.sum() == 2 * 6 * 2
    assert torch.equal(model.layers["1"].ffn.tokens_per_expert, main_load)   # the main layer's count untouched

    model.eval()
    moe.tokens_per_expert.zero_()
    routing = []
    with torch.no_grad():
        mtp_logits(model, aux["hidden"].detach(), labels, routing=routing)
    assert len(routing) == 1 and torch.equal(moe.tokens_per_expert, torch.zeros(8))   # eval: nothing counted


def test_dense_mtp_block_appends_no_routing():
    model = mtp_model(depth=1)
    hidden, labels = inputs(model, length=4)
    routing = []
    with torch.no_grad():
        mtp_logits(model, hidden, labels, routing=routing)
    assert routing == []
