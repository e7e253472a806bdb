"""DeepSeekMoE (chapter 03): group-limited routing against hand-computed examples, gates from
the unbiased affinities, the balancing bias as an FP32 buffer, the auxiliary-loss-free bias
update (per step, summed over micro-batches and data-parallel ranks), sorted dispatch against
the naive one and a per-token loop, float64 gradients, the balance losses of eqs. 17-20
written out with loops, MaxVio, clear errors and the MoE model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from deepseek_mini import build_model, count_parameters, load_config
from deepseek_mini.layers import MLP
from deepseek_mini.mla import MLA
from deepseek_mini.moe import (Gate, GroupedExperts, LocalDispatcher, MoE, balance_loss, batch_balance_loss,
                               expert_load, group_limited_topk, grouped_linear, grouped_mm_supported, max_violation,
                               moe_dispatch, moe_layers, moe_naive, moe_staged, routing_weights, sequence_balance_loss,
                               update_bias, update_biases)

# A tiny MLA + MoE model: 2 layers (layer 0 dense, layer 1 MoE), 8 routed experts in 4 groups.
TINY_MOE = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=64, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                moe_intermediate_size=16)


# ----------------------------------------------------------------------------- helpers
def make_moe(dim=8, inter=6, n_experts=8, n_shared=1, topk=2, n_group=1, topk_group=1, route_scale=1.0,
             dispatch="sorted", seed=0) -> MoE:
    """An MoE whose every weight (gate centroids included) is ~ N(0, 1/fan_in), so affinities
    spread over (0, 1) and every expert visibly changes the output."""
    torch.manual_seed(seed)
    moe = MoE(dim, moe_inter_dim=inter, n_routed_experts=n_experts, n_shared_experts=n_shared, topk=topk,
              n_group=n_group, topk_group=topk_group, route_scale=route_scale, dispatch=dispatch)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))   # (E, out, in): fan-in last
    return moe


def one_hot_moe(n_experts=4) -> MoE:
    """Top-1 routing with centroids 5 * I: token 5 * e_j has affinity sigmoid(5) = 0.993 for
    expert j and 0.5 for the others, so it goes to expert j whatever small bias is applied."""
    moe = make_moe(dim=n_experts, inter=3, n_experts=n_experts, n_shared=0, topk=1)
    with torch.no_grad():
        moe.gate.weight.copy_(5 * torch.eye(n_experts))
    return moe


def tokens_for(experts: list[int], n_experts=4) -> torch.Tensor:
    """One token per entry, routed by ``one_hot_moe`` to that expert; shape (1, T, n_experts)."""
    return torch.eye(n_experts)[experts].unsqueeze(0)


def swiglu_by_hand(expert: MLP, x: torch.Tensor) -> torch.Tensor:
    """w2 (silu(w1 x) * w3 x) for one token x (d,), from the weight matrices."""
    a, b = expert.w1.weight @ x, expert.w3.weight @ x
    return expert.w2.weight @ (a * torch.sigmoid(a) * b)


def unstacked(experts: GroupedExperts) -> torch.nn.ModuleList:
    """The stacked experts as N_r separate ``MLP`` modules (copies), chapter 03's reference layout."""
    modules = torch.nn.ModuleList(MLP(experts.w1.shape[2], experts.w1.shape[1]) for _ in range(len(experts)))
    with torch.no_grad():
        for e, mlp in enumerate(modules):
            for name in ("w1", "w2", "w3"):
                getattr(mlp, name).weight.copy_(getattr(experts, name)[e])
    return modules.to(experts.w1.dtype)


def moe_by_hand(x, weights, indices, experts) -> torch.Tensor:
    """y_t = sum_k w_tk * expert_{i_tk}(x_t), token by token."""
    if isinstance(experts, GroupedExperts):
        experts = unstacked(experts)
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros_like(x[t])
        for k in range(indices.shape[1]):
            y = y + weights[t, k] * swiglu_by_hand(experts[int(indices[t, k])], x[t])
        rows.append(y)
    return torch.stack(rows)


def sorted_rows(indices: torch.Tensor) -> list[list[int]]:
    return [sorted(row) for row in indices.tolist()]


def tiny_moe_model(seed=0, **overrides):
    return build_model(load_config("toy", **{**TINY_MOE, **overrides}), seed=seed)


# ----------------------------------------------------------------------------- 1. routing by hand
# 8 experts in 4 groups of 2 (G0 = {0, 1}, G1 = {2, 3}, G2 = {4, 5}, G3 = {6, 7}); keep 2 groups, top-3.
# Row 0: group score = sum of the top-2 biased scores: G1 1.22, G2 1.10, G3 1.00, G0 0.95 -> keep G1, G2
#        -> top-3 of {.62, .60, .56, .54} = {2, 3, 4}. The best expert overall (0, 0.95) is excluded
#        because its group is dropped. Max-of-group would keep G0 (.95), G3 (.90) -> {0, 6, 7}.
# Row 1: G2 1.70, G1 1.40 kept -> top-3 of {1.0, .4, .9, .8} = {2, 4, 5}.
BIASED = torch.tensor([[0.95, 0.00, 0.62, 0.60, 0.56, 0.54, 0.90, 0.10],
                       [0.10, 0.18, 1.00, 0.40, 0.90, 0.80, 0.40, 0.05]])
EXPECTED = [[2, 3, 4], [2, 4, 5]]


def test_group_limited_topk_hand_example():
    indices = group_limited_topk(BIASED, topk=3, n_group=4, topk_group=2)
    assert indices.shape == (2, 3)
    assert sorted_rows(indices) == EXPECTED
    assert 0 not in indices[0].tolist()      # the best expert overall lost with its group


def test_group_score_is_the_sum_of_the_top_two_not_the_max_nor_the_whole_group():
    # 2 groups of 4, keep 1, top-2.  G0 = (.9, .15, .14, .13): max .9, top-2 1.05, sum 1.32.
    # G1 = (.6, .55, 0, 0): max .6, top-2 1.15, sum 1.15.  Top-2 sum keeps G1 -> {4, 5};
    # max or whole-group sum would keep G0 -> {0, 1}.
    scores = torch.tensor([[0.90, 0.15, 0.14, 0.13, 0.60, 0.55, 0.00, 0.00]])
    assert sorted_rows(group_limited_topk(scores, topk=2, n_group=2, topk_group=1)) == [[4, 5]]


def test_group_of_one_expert_scores_that_expert():
    scores = torch.tensor([[0.3, 0.9, 0.5, 0.8]])
    assert sorted_rows(group_limited_topk(scores, topk=2, n_group=4, topk_group=3)) == [[1, 3]]
    assert sorted_rows(group_limited_topk(scores, topk=2)) == [[1, 3]]          # n_group=1: plain top-k


# ----------------------------------------------------------------------------- 2. -inf mask
def test_dropped_groups_are_masked_with_minus_inf_not_zero():
    # Every biased score is negative (bias -10): a 0 in the dropped groups G0, G3 would beat all of them.
    indices = group_limited_topk(BIASED - 10.0, topk=3, n_group=4, topk_group=2)
    assert sorted_rows(indices) == EXPECTED
    group = indices // 2
    assert set(group[0].tolist()) <= {1, 2} and set(group[1].tolist()) <= {1, 2}


def test_gate_with_large_negative_bias_never_picks_a_dropped_group():
    gate = Gate(8, 8, topk=3, n_group=4, topk_group=2)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(8, 8, generator=torch.Generator().manual_seed(3)))
        gate.bias.fill_(-50.0)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(4))
    _, indices, scores = gate(x)
    biased = scores + gate.bias
    group_scores = biased.view(64, 4, 2).sum(-1)              # 2 experts per group: top-2 = both
    kept = group_scores.topk(2, dim=-1).indices
    for t in range(64):
        assert set((indices[t] // 2).tolist()) <= set(kept[t].tolist())


# ----------------------------------------------------------------------------- 3. gates from unbiased s
# Unbiased affinities s and a bias b with s + b = BIASED; W = I and x = logit(s) make the gate's s exact.
S = torch.tensor([[0.95, 0.02, 0.52, 0.50, 0.46, 0.44, 0.90, 0.10],
                  [0.10, 0.20, 0.90, 0.30, 0.80, 0.70, 0.40, 0.05]])
B = torch.tensor([0.0, -0.02, 0.1, 0.1, 0.1, 0.1, 0.0, 0.0])


def hand_gate(route_scale=2.5) -> Gate:
    gate = Gate(8, 8, topk=3, n_group=4, topk_group=2, route_scale=route_scale)
    with torch.no_grad():
        gate.weight.copy_(torch.eye(8))
        gate.bias.copy_(B)
    return gate


def test_gate_selects_with_the_bias_and_gates_with_the_unbiased_scores():
    with torch.no_grad():
        weights, indices, scores = hand_gate()(torch.logit(S.double()).float())
    torch.testing.assert_close(scores, S, rtol=0, atol=1e-6)
    assert sorted_rows(indices) == EXPECTED
    # Hand values: row 0 picks 2, 3, 4 with s = .52, .50, .46 (sum 1.48); row 1 picks 2, 4, 5
    # with s = .9, .8, .7 (sum 2.4); normalised and times route_scale 2.5.  The biased scores
    # would give (.62, .60, .56) / 1.78 * 2.5 = (.871, .843, .787) instead.
    expected = {0: {2: 2.5 * 0.52 / 1.48, 3: 2.5 * 0.50 / 1.48, 4: 2.5 * 0.46 / 1.48},
                1: {2: 2.5 * 0.9 / 2.4, 4: 2.5 * 0.8 / 2.4, 5: 2.5 * 0.7 / 2.4}}
    for t in range(2):
        got = {int(i): float(w) for i, w in zip(indices[t], weights[t].detach())}
        assert got == pytest.approx(expected[t], abs=1e-6)
    assert weights.sum(-1).tolist() == pytest.approx([2.5, 2.5], abs=1e-6)


def test_bias_changes_the_selection_but_not_the_gate_formula():
    gate = hand_gate()
    x = torch.logit(S[:1].double()).float()
    with torch.no_grad():
        gate.bias.zero_()
    w0, i0, _ = gate(x)
    # Unbiased: G1 1.02, G3 1.00, G0 .97, G2 .90 -> keep G1, G3 -> {2, 3, 6}.
    assert sorted_rows(i0) == [[2, 3, 6]]
    got = {int(i): float(w) for i, w in zip(i0[0], w0[0].detach())}
    assert got == pytest.approx({2: 2.5 * .52 / 1.92, 3: 2.5 * .50 / 1.92, 6: 2.5 * .90 / 1.92}, abs=1e-6)
    with torch.no_grad():
        gate.bias.copy_(B)
    w1, i1, _ = gate(x)
    assert sorted_rows(i1) == [[2, 3, 4]]
    got = {int(i): float(w) for i, w in zip(i1[0], w1[0].detach())}
    assert got == pytest.approx({2: 2.5 * .52 / 1.48, 3: 2.5 * .50 / 1.48, 4: 2.5 * .46 / 1.48}, abs=1e-6)


def test_routing_weights_hand_values():
    scores = torch.tensor([[0.2, 0.6, 0.1, 0.3], [0.5, 0.5, 0.25, 0.75]])
    indices = torch.tensor([[1, 3], [3, 2]])
    torch.testing.assert_close(routing_weights(scores, indices, 2.5),
                               torch.tensor([[2.5 * 0.6 / 0.9, 2.5 * 0.3 / 0.9], [2.5 * 0.75, 2.5 * 0.25]]))
    torch.testing.assert_close(routing_weights(scores, indices, 2.0, normalize=False),
                               torch.tensor([[1.2, 0.6], [1.5, 0.5]]))


@pytest.mark.parametrize("shift", [0.25, -3.0])
def test_adding_a_constant_to_every_bias_changes_nothing(shift):
    gate = Gate(8, 16, topk=4, n_group=4, topk_group=2, route_scale=2.5)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(16, 8, generator=g))
        gate.bias.copy_(0.2 * torch.randn(16, generator=g))
    x = torch.randn(32, 8, generator=g)
    w0, i0, s0 = gate(x)
    with torch.no_grad():
        gate.bias += shift
    w1, i1, s1 = gate(x)
    assert torch.equal(s0, s1)
    assert sorted_rows(i0) == sorted_rows(i1)
    order0, order1 = i0.argsort(-1), i1.argsort(-1)
    torch.testing.assert_close(w0.gather(1, order0), w1.gather(1, order1), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- 4. the bias is a buffer
def test_bias_is_an_fp32_buffer_without_gradient():
    model = tiny_moe_model().train()
    layer = moe_layers(model)[0]
    names = {name for name, _ in model.named_parameters()}
    assert "layers.1.ffn.gate.weight" in names and "layers.1.ffn.gate.bias" not in names
    assert all(p is not layer.gate.bias for p in model.parameters())
    assert not layer.gate.bias.requires_grad
    assert "layers.1.ffn.gate.bias" in model.state_dict()           # saved in checkpoints
    assert torch.equal(layer.gate.bias, torch.zeros(8)) and layer.gate.bias.dtype == torch.float32
    model(torch.randint(0, 260, (2, 8))).square().mean().backward()
    assert layer.gate.bias.grad is None
    assert layer.gate.weight.grad is not None and layer.gate.weight.grad.abs().sum() > 0   # the router learns


def test_bias_stays_fp32_in_a_bfloat16_model():
    model = build_model(load_config("toy", **TINY_MOE), seed=0, dtype=torch.bfloat16)
    layer = moe_layers(model)[0]
    assert layer.gate.weight.dtype == torch.bfloat16
    assert layer.gate.bias.dtype == torch.float32
    assert torch.equal(layer.gate.bias, torch.zeros(8))
    update_bias(layer.gate.bias, torch.tensor([0.0, 1, 1, 1, 1, 1, 1, 1]), 0.001)
    assert layer.gate.bias[0].item() == pytest.approx(0.001, rel=1e-6)   # bf16 would give 0.000999451


def test_token_counter_is_exact_in_a_bfloat16_model():
    model = build_model(load_config("toy", **TINY_MOE), seed=0, dtype=torch.bfloat16).train()
    layer = moe_layers(model)[0]
    tokens = torch.randint(0, 260, (8, 64), generator=torch.Generator().manual_seed(0))
    counted = torch.zeros(8, dtype=torch.float64)
    for _ in range(3):
        _, aux = model(tokens, return_aux=True)
        counted += torch.bincount(aux["routing"][0].indices.flatten(), minlength=8).double()
    assert counted.sum() == 3 * 8 * 64 * 2
    assert layer.tokens_per_expert.double().tolist() == counted.tolist()


def test_build_model_zeroes_bias_and_token_counter():
    model = tiny_moe_model()
    layer = moe_layers(model)[0]
    assert torch.equal(layer.tokens_per_expert, torch.zeros(8))
    assert torch.equal(layer.gate.bias, torch.zeros(8))
    with torch.no_grad():               # what to_empty() may leave behind: init_weights must clear it
        layer.tokens_per_expert.fill_(123.0)
        layer.gate.bias.fill_(7.0)
    model.init_weights(torch.Generator().manual_seed(0))
    assert torch.equal(layer.tokens_per_expert, torch.zeros(8))
    assert torch.equal(layer.gate.bias, torch.zeros(8))
    assert layer.gate.weight.std().item() == pytest.approx(0.02, rel=0.2)


def test_moe_and_gate_initialise_themselves():
    moe = make_moe(dim=32, inter=16, n_experts=8, n_shared=1)
    with torch.no_grad():
        moe.tokens_per_expert.fill_(5.0)
        moe.gate.bias.fill_(0.3)
    moe.init_weights(0.02, torch.Generator().manual_seed(0))
    assert torch.equal(moe.tokens_per_expert, torch.zeros(8)) and torch.equal(moe.gate.bias, torch.zeros(8))
    for name, p in moe.named_parameters():                # router, routed and shared experts
        assert p.std().item() == pytest.approx(0.02, rel=0.25) and abs(p.mean().item()) < 0.005, name


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.bfloat16(),
                                  lambda m: m.double(), lambda m: m.to("cpu", torch.float16)],
                         ids=["to_bf16", "half", "bfloat16", "double", "to_device_and_dtype"])
def test_plain_casts_keep_the_router_bias_and_load_count_fp32_and_exact(cast):
    # The dtype policy (deepseek_mini.precision): no fix-up after .to(); the values are never
    # rounded through the low precision either (0.001 * 3 and 257 are not representable in bf16).
    model = tiny_moe_model()
    layer = moe_layers(model)[0]
    with torch.no_grad():
        layer.gate.bias.copy_(torch.arange(8) * 0.001 * 3 + 0.5)
        layer.tokens_per_expert.fill_(257.0)
    bias, count = layer.gate.bias.clone(), layer.tokens_per_expert.clone()
    model = cast(model)
    layer = moe_layers(model)[0]
    assert layer.gate.weight.dtype != torch.float32                      # the parameters were cast
    assert layer.gate.bias.dtype == layer.tokens_per_expert.dtype == torch.float32
    assert torch.equal(layer.gate.bias, bias) and torch.equal(layer.tokens_per_expert, count)
    assert model.rope_cos.dtype == model.rope_sin.dtype == torch.float32   # RoPE angles too
    model.train()(torch.randint(0, 260, (1, 4)))                        # and the model still runs


def test_moe_sizes_are_keyword_arguments():
    with pytest.raises(TypeError):
        MoE(8, 6, 8, 1, 3)
    with pytest.raises(TypeError):
        Gate(8, 8, 2, 4, 2)                               # n_group and topk_group by name


# ----------------------------------------------------------------------------- 5. the bias update
def test_update_bias_hand_values():
    bias = torch.tensor([0.5, -0.25, 1.0, 0.0, 0.0])
    load = torch.tensor([5.0, 3.0, 4.0, 0.0, 3.0])        # mean 3: over, at, over, under, at
    out = update_bias(bias, load, 0.125)
    assert out is bias                                    # in place
    assert bias.tolist() == [0.375, -0.25, 0.875, 0.125, 0.0]


def test_max_violation_hand_values():
    assert max_violation(torch.tensor([4.0, 2.0, 2.0, 0.0])) == pytest.approx(1.0)
    assert max_violation(torch.tensor([3.0, 3.0, 3.0])) == 0.0
    assert max_violation(torch.tensor([3, 1])) == pytest.approx(0.5)        # integer counts too
    assert max_violation(torch.tensor([8.0, 0.0, 0.0, 0.0])) == pytest.approx(3.0)


def test_expert_load_counts_every_choice():
    indices = torch.tensor([[0, 3], [3, 1], [3, 0]])
    assert expert_load(indices, 5).tolist() == [2.0, 1.0, 0.0, 3.0, 0.0]


def test_eval_forward_counts_nothing_and_never_moves_the_bias():
    moe = one_hot_moe().eval()
    for _ in range(3):
        moe(tokens_for([0, 0, 0, 1]))
    assert torch.equal(moe.tokens_per_expert, torch.zeros(4))
    load = moe.update_bias(0.125)
    assert torch.equal(load, torch.zeros(4))
    assert torch.equal(moe.gate.bias, torch.zeros(4))


def test_bias_update_uses_the_whole_step_not_each_micro_batch():
    gamma = 0.125
    step = one_hot_moe().train()
    step(tokens_for([0, 0, 0, 1]))        # micro-batch 1: load [3, 1, 0, 0]
    step(tokens_for([2, 2, 3, 3]))        # micro-batch 2: load [0, 0, 2, 2]
    assert step.tokens_per_expert.tolist() == [3.0, 1.0, 2.0, 2.0]
    assert torch.equal(step.gate.bias, torch.zeros(4))        # nothing moves before the update
    load = step.update_bias(gamma)
    assert load.tolist() == [3.0, 1.0, 2.0, 2.0]
    # Summed load [3, 1, 2, 2], mean 2: expert 0 over, 1 under, 2 and 3 at the mean.
    assert step.gate.bias.tolist() == [-gamma, gamma, 0.0, 0.0]
    assert torch.equal(step.tokens_per_expert, torch.zeros(4))   # the counter resets

    per_micro = one_hot_moe().train()   # the wrong way: an update after each micro-batch
    per_micro(tokens_for([0, 0, 0, 1]))
    per_micro.update_bias(gamma)        # [-1, 0, +1, +1]
    per_micro(tokens_for([2, 2, 3, 3]))
    per_micro.update_bias(gamma)        # [+1, +1, -1, -1]
    assert per_micro.gate.bias.tolist() == [0.0, gamma, 0.0, 0.0]
    assert not torch.equal(per_micro.gate.bias, step.gate.bias)

    before = step.gate.bias.clone()     # a second update with nothing counted changes nothing
    assert torch.equal(step.update_bias(gamma), torch.zeros(4))
    assert torch.equal(step.gate.bias, before)


def test_gamma_zero_keeps_the_bias_but_returns_the_load_and_resets():
    moe = one_hot_moe().train()
    moe(tokens_for([1, 1, 2]))
    load = moe.update_bias(0.0)
    assert load.tolist() == [0.0, 2.0, 1.0, 0.0]
    assert torch.equal(moe.gate.bias, torch.zeros(4))
    assert torch.equal(moe.tokens_per_expert, torch.zeros(4))


def test_update_biases_updates_every_moe_layer_from_its_own_load():
    model = tiny_moe_model(num_hidden_layers=3).train()
    layers = moe_layers(model)
    assert len(layers) == 2
    _, aux = model(torch.randint(0, 260, (2, 16), generator=torch.Generator().manual_seed(0)), return_aux=True)
    counted = [torch.bincount(r.indices.flatten(), minlength=8).float() for r in aux["routing"]]
    loads = update_biases(model, 0.5)
    for layer, load, count in zip(layers, loads, counted):
        assert torch.equal(load, count)
        assert layer.gate.bias.tolist() == [0.5 * (c < count.mean()) - 0.5 * (c > count.mean())
                                            for c in count.tolist()]


# ----------------------------------------------------------------------------- 6. no distributed code
def test_moe_module_imports_no_torch_distributed():
    # Summing the load over data-parallel ranks is the trainer's job (MoEBalancing, tested with
    # two gloo ranks in tests/test_train_hooks.py): an all-reduce inside the layer would sum
    # different layers across pipeline stages.
    import deepseek_mini.moe as moe_module
    source = Path(moe_module.__file__).read_text()
    assert "torch.distributed" not in source and "all_reduce" not in source
    assert not hasattr(MoE, "last_scores") and "last_indices" not in source


# ----------------------------------------------------------------------------- 7. dispatch
DISPATCH_CASES = {
    # (T, n_experts, topk, experts that may receive tokens)
    "one_token_top1": (1, 4, 1, None),
    "idle_experts_1_and_4": (6, 5, 2, [0, 2, 3]),
    "t16_e8_k3_two_idle": (16, 8, 3, list(range(6))),
    "topk_equals_n": (5, 4, 4, None),
    "everything_to_expert_2": (7, 4, 1, [2]),
}


@pytest.mark.parametrize("case", DISPATCH_CASES.values(), ids=list(DISPATCH_CASES))
def test_sorted_dispatch_equals_naive_and_a_token_loop(case):
    T, n, k, pool = case
    dim = 6
    g = torch.Generator().manual_seed(T * 100 + n * 10 + k)
    torch.manual_seed(0)
    experts = torch.nn.ModuleList(MLP(dim, 5) for _ in range(n))
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))   # (E, out, in): fan-in last
    pool = list(range(n)) if pool is None else pool
    indices = torch.tensor([[pool[j] for j in torch.randperm(len(pool), generator=g)[:k].tolist()]
                            for _ in range(T)])
    x0 = torch.randn(T, dim, generator=g)
    w0 = torch.rand(T, k, generator=g) + 0.1
    probe = torch.randn(T, dim, generator=g)
    params = list(experts.parameters())

    def run(fn):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = fn(x, w, indices, experts)
        grads = torch.autograd.grad((y * probe).sum(), [x, w, *params], allow_unused=True)
        return y.detach(), [torch.zeros_like(p) if gr is None else gr for gr, p in zip(grads, [x, w, *params])]

    y_ref, g_ref = run(moe_by_hand)
    for fn in (moe_naive, moe_dispatch, moe_staged):
        y, grads = run(fn)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, g_ref):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the staged path (permute -> exchange -> experts -> combine) is moe_dispatch's arithmetic, exactly
    (y_fast, g_fast), (y_staged, g_staged) = run(moe_dispatch), run(moe_staged)
    assert torch.equal(y_staged, y_fast) and all(torch.equal(a, b) for a, b in zip(g_staged, g_fast))
    idle = sorted(set(range(n)) - set(indices.flatten().tolist()))
    for e in idle:                                  # experts with no token: zero gradient
        assert all(gr.abs().sum() == 0 for gr in g_ref[2 + 3 * e: 5 + 3 * e])
    assert y_ref.abs().sum() > 0


class _ReversingDispatcher(LocalDispatcher):
    """A stand-in for chapter 06's all-to-all: moves the rows (reversed experts' order, as if
    sent to another rank) and brings the outputs back; records that it was called."""

    def __init__(self):
        self.calls = []

    def dispatch(self, rows, counts):
        self.calls.append("dispatch")
        chunks = rows.split(counts)
        return torch.cat(chunks[::-1]), counts[::-1]

    def combine(self, rows, counts):
        self.calls.append("combine")
        return torch.cat(rows.split([c for c in counts[::-1] if c > 0])[::-1])


def test_the_exchange_is_injectable_into_the_moe_layer():
    # The reversing exchange runs expert e's rows under the name of expert n-1-e; combined back, the
    # output is right only if the layer calls the dispatcher and uses what it returns.
    moe = make_moe(dim=8, inter=6, n_experts=4, n_shared=0, topk=2, seed=3)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    want = moe(x)
    reversing = _ReversingDispatcher()
    with torch.no_grad():
        for p in moe.experts.parameters():                          # expert e now sits at n-1-e
            p.copy_(p.flip(0))
    moe.dispatcher = reversing
    torch.testing.assert_close(moe(x), want, rtol=1e-6, atol=1e-7)
    assert reversing.calls == ["dispatch", "combine"]
    moe.dispatcher = LocalDispatcher()                              # the local exchange now runs the wrong experts
    assert not torch.allclose(moe(x), want, atol=1e-3)


class _Dispatch(torch.nn.Module):
    def __init__(self, experts, indices):
        super().__init__()
        self.experts, self.indices = experts, indices

    def forward(self, x, w):
        return moe_dispatch(x, w, self.indices, self.experts)


def test_gradcheck_dispatch_float64():
    # d y / d (input, gates, one expert's weight) in float64, with an idle expert (3)
    torch.manual_seed(7)
    g = torch.Generator().manual_seed(7)
    module = _Dispatch(torch.nn.ModuleList(MLP(3, 2) for _ in range(4)).double(),
                       torch.tensor([[0, 2], [2, 1], [2, 0]]))
    x = torch.randn(3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    w1 = module.experts[2].w1.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, w1: functional_call(module, {"experts.2.w1.weight": w1}, (x, w)),
                                    (x, w, w1))


def test_moe_module_naive_and_sorted_agree_with_shared_experts():
    sorted_moe = make_moe(dim=8, inter=6, n_experts=8, n_shared=1, topk=3, n_group=4, topk_group=2,
                          route_scale=2.5, seed=1)
    naive_moe = MoE(8, moe_inter_dim=6, n_routed_experts=8, n_shared_experts=1, topk=3, n_group=4, topk_group=2,
                    route_scale=2.5, dispatch="naive")
    naive_moe.load_state_dict(sorted_moe.state_dict())
    x0 = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    outs = []
    for moe in (sorted_moe, naive_moe):
        x = x0.clone().requires_grad_()
        y = moe(x)
        y.square().sum().backward()
        outs.append((y.detach(), x.grad, {n: p.grad for n, p in moe.named_parameters()}))
    (ya, xa, pa), (yb, xb, pb) = outs
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xa, xb, rtol=1e-5, atol=1e-6)
    for name in pa:
        if pa[name] is None or pb[name] is None:     # an idle expert: sorted never ran it
            assert all(t is None or t.abs().sum() == 0 for t in (pa[name], pb[name])), name
        else:
            torch.testing.assert_close(pa[name], pb[name], rtol=1e-5, atol=1e-6, msg=name)
    # and the module equals the hand computation: shared expert + gated routed experts
    with torch.no_grad():
        h = x0.reshape(-1, 8)
        weights, indices, _ = sorted_moe.gate(h)
        by_hand = moe_by_hand(h, weights, indices, sorted_moe.experts) + \
            torch.stack([swiglu_by_hand(sorted_moe.shared_experts, t) for t in h])
    torch.testing.assert_close(ya, by_hand.view(2, 5, 8), rtol=1e-5, atol=1e-6)
    assert pa["shared_experts.w1.weight"].abs().sum() > 0


# ----------------------------------------------------------------------------- 7b. stacked experts
def _experts_and_rows(n_experts=6, dim=16, inter=8, counts=(5, 0, 3, 1, 0, 7), dtype=torch.float32, seed=0):
    """N_r reference MLP experts, their stacked copy, and rows sorted by expert (two experts idle)."""
    g = torch.Generator().manual_seed(seed)
    modules = torch.nn.ModuleList(MLP(dim, inter) for _ in range(n_experts)).to(dtype)
    with torch.no_grad():
        for p in modules.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    rows = torch.randn(sum(counts), dim, generator=g, dtype=dtype)
    return modules, GroupedExperts.from_modules(modules), rows, list(counts)


@pytest.mark.parametrize("grouped_mm", [True, False], ids=["grouped_mm", "loop"])
def test_stacked_experts_equal_the_module_list_forward_and_gradients(grouped_mm, monkeypatch):
    # The chapter 03 reference (one MLP per expert, run slice by slice) and the stacked weights
    # give the same rows and the same gradients, expert by expert, through both code paths.
    if not grouped_mm:
        monkeypatch.setattr("deepseek_mini.moe.grouped_mm_supported", lambda x, w: False)
    elif not grouped_mm_supported(torch.ones(1, 16), torch.ones(2, 8, 16)):
        pytest.skip("this torch has no F.grouped_mm for float32 on CPU")
    modules, stacked, rows, counts = _experts_and_rows()
    grad_out = torch.randn(rows.shape, generator=torch.Generator().manual_seed(1))
    x_ref, x_new = rows.clone().requires_grad_(), rows.clone().requires_grad_()
    y_ref = torch.cat([modules[e](chunk) for e, chunk in enumerate(x_ref.split(counts)) if counts[e]])
    y_new = stacked(x_new, counts)
    y_ref.backward(grad_out)
    y_new.backward(grad_out)
    torch.testing.assert_close(y_new, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_new.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    for e, mlp in enumerate(modules):
        for name in ("w1", "w2", "w3"):
            want = getattr(mlp, name).weight.grad
            got = getattr(stacked, name).grad[e]
            if counts[e] == 0:
                assert want is None and got.abs().sum() == 0, (e, name)   # an idle expert learns nothing
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"expert {e} {name}")


def test_stacked_experts_in_the_staged_dispatch_equal_the_module_list():
    modules, stacked, _, _ = _experts_and_rows()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 16, generator=g)
    weights, indices = torch.rand(20, 2, generator=g), torch.randint(0, 6, (20, 2), generator=g)
    torch.testing.assert_close(moe_staged(x, weights, indices, stacked), moe_dispatch(x, weights, indices, modules),
                               rtol=1e-6, atol=1e-6)


def test_gradcheck_stacked_experts_float64():
    # float64 takes the loop (grouped_mm has no float64): d rows and d every stacked weight
    modules, stacked, rows, counts = _experts_and_rows(n_experts=3, dim=4, inter=3, counts=(2, 0, 3),
                                                       dtype=torch.float64)
    rows.requires_grad_()
    params = dict(stacked.named_parameters())
    assert torch.autograd.gradcheck(
        lambda x, w1, w2, w3: functional_call(stacked, {"w1": w1, "w2": w2, "w3": w3}, (x, counts)),
        (rows, *(params[n].detach().clone().requires_grad_() for n in ("w1", "w2", "w3"))))


def test_grouped_linear_takes_the_loop_where_grouped_mm_cannot_run():
    assert not grouped_mm_supported(torch.ones(3, 4, dtype=torch.float64), torch.ones(2, 8, 4, dtype=torch.float64))
    assert not grouped_mm_supported(torch.ones(3, 6), torch.ones(2, 8, 6))      # 24-byte rows: not 16-aligned
    assert not grouped_mm_supported(torch.ones(3, 4, device="meta"), torch.ones(2, 8, 4, device="meta"))
    w = torch.randn(3, 5, 6, dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64)
    want = torch.cat([x[:1] @ w[0].T, x[1:4] @ w[2].T])
    assert torch.equal(grouped_linear(x, w, [1, 0, 3]), want)


def test_stacked_init_draws_what_separate_mlps_draw():
    modules = torch.nn.ModuleList(MLP(16, 8) for _ in range(4))
    stacked = GroupedExperts(4, 16, 8)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for module in modules:
        module.init_weights(0.02, g1)
    stacked.init_weights(0.02, g2)
    assert torch.equal(GroupedExperts.from_modules(modules).w2, stacked.w2)
    assert all(torch.equal(getattr(stacked, n)[e], getattr(modules[e], n).weight)
               for e in range(4) for n in ("w1", "w2", "w3"))


def test_per_expert_checkpoint_names_load_into_stacked_experts():
    # A state dict from the ModuleList layout (experts.{e}.w1.weight) loads into the MoE layer.
    moe = make_moe(dim=16, inter=8, n_experts=4, n_shared=1, topk=2, seed=4)
    old_layout = {k: v for k, v in moe.state_dict().items() if not k.startswith("experts.")}
    for e, mlp in enumerate(unstacked(moe.experts)):
        old_layout.update({f"experts.{e}.{k}": v for k, v in mlp.state_dict().items()})
    fresh = MoE(16, moe_inter_dim=8, n_routed_experts=4, n_shared_experts=1, topk=2)
    fresh.load_state_dict(old_layout)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), moe.state_dict().values()))
    del old_layout["experts.2.w3.weight"]                       # one expert short: nothing is stacked, and strict says so
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"experts\.w3\""):
        fresh.load_state_dict(old_layout)


def test_stacked_experts_reject_counts_that_do_not_fit():
    _, stacked, rows, counts = _experts_and_rows()
    with pytest.raises(ValueError, match=r"counts must give the rows of each of the 6 experts and sum to 16"):
        stacked(rows, counts[:-1])
    with pytest.raises(ValueError, match=r"sum to 16, got 6 counts summing to 17"):
        stacked(rows, [*counts[:-1], counts[-1] + 1])


def test_671b_layout_is_three_stacked_weights_per_moe_layer():
    # The build-time goal of stacked experts: per MoE layer, one module for all 256 routed experts.
    model = build_model(load_config("deepseek-v3").replace(rope_scaling=None, num_nextn_predict_layers=0),
                        device="meta")
    layer = model.layers["3"].ffn
    assert isinstance(layer.experts, GroupedExperts) and tuple(layer.experts.w1.shape) == (256, 2048, 7168)
    assert tuple(layer.experts.w2.shape) == (256, 7168, 2048)
    assert sum(1 for _ in model.modules()) < 2000                # 60,486 with 256 MLP modules per layer
    assert round(count_parameters(model).total / 1e9, 2) == 671.03


# ----------------------------------------------------------------------------- 8. float64 gradients
def _selection_margin(moe: MoE, x: torch.Tensor) -> float:
    """Smallest gap at a routing decision, token by token (written for groups of 2 experts):
    between the last kept and the first dropped group, and between the K-th and (K+1)-th
    expert of the kept groups. Float64 gradcheck perturbs by 1e-6, so it must be far larger."""
    biased = torch.sigmoid(x @ moe.gate.weight.T) + moe.gate.bias
    n_group, topk_group, k = moe.gate.n_group, moe.gate.topk_group, moe.topk
    margin = math.inf
    for row in biased.tolist():
        groups = [row[i:i + 2] for i in range(0, len(row), 2)]
        ranked = sorted(range(n_group), key=lambda j: -sum(groups[j]))
        margin = min(margin, sum(groups[ranked[topk_group - 1]]) - sum(groups[ranked[topk_group]]))
        eligible = sorted((v for j in ranked[:topk_group] for v in groups[j]), reverse=True)
        margin = min(margin, eligible[k - 1] - eligible[k])
    return margin


def test_gradcheck_moe_layer_float64_input_and_gate_weight():
    # The whole layer (router, sorted dispatch, shared expert) in float64: the router must not
    # drop to float32 for a float64 input, or the numerical Jacobian is off by ~1e-7 / 1e-6.
    moe = make_moe(dim=4, inter=3, n_experts=6, n_shared=1, topk=2, n_group=3, topk_group=2,
                   route_scale=2.5, seed=2).double()
    with torch.no_grad():
        moe.gate.weight.mul_(3.0)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    assert _selection_margin(moe, x.detach()) > 1e-3           # away from ties: selection is locally constant
    w = moe.gate.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: functional_call(moe, {"gate.weight": w}, (x,)), (x, w))
    (grad_w,) = torch.autograd.grad(moe(x).sum(), moe.gate.weight)
    assert grad_w.abs().sum() > 0          # the gates really depend on the centroids (K = 2, not 1)


def test_gradcheck_routing_weights_and_balance_loss_float64():
    g = torch.Generator().manual_seed(9)
    scores = (torch.rand(2, 3, 5, dtype=torch.float64, generator=g) + 0.05).requires_grad_()
    indices = torch.tensor([[[0, 3], [1, 3], [4, 2]], [[2, 0], [0, 1], [3, 4]]])
    assert torch.autograd.gradcheck(lambda s: routing_weights(s.flatten(0, 1), indices.flatten(0, 1), 2.5),
                                    (scores,))
    assert torch.autograd.gradcheck(lambda s: sequence_balance_loss(s, indices, 0.3), (scores,))
    assert torch.autograd.gradcheck(lambda s: batch_balance_loss(s, indices, 0.3), (scores,))


# ----------------------------------------------------------------------------- 9. balance losses
def balance_loss_by_hand(scores, indices, alpha) -> torch.Tensor:
    """Eqs. 17-20 with loops: per sequence f_i = N_r/(K_r T) sum_t 1[i chosen at t],
    P_i = (1/T) sum_t s_{i,t} / sum_j s_{j,t}, L = alpha sum_i f_i P_i; mean over sequences."""
    n_seq, T, n = scores.shape
    k = indices.shape[-1]
    total = 0.0
    for b in range(n_seq):
        loss = 0.0
        for i in range(n):
            count = sum(1 for t in range(T) if i in indices[b, t].tolist())
            f_i = n / (k * T) * count
            p_i = sum(scores[b, t, i] / sum(scores[b, t, j] for j in range(n)) for t in range(T)) / T
            loss = loss + f_i * p_i
        total = total + alpha * loss
    return total / n_seq


def test_sequence_balance_loss_equals_eqs_17_to_20():
    g = torch.Generator().manual_seed(11)
    scores = torch.rand(3, 5, 6, generator=g, dtype=torch.float64) + 0.01
    indices = torch.stack([torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(5)]) for _ in range(3)])
    got = sequence_balance_loss(scores, indices, 0.3)
    torch.testing.assert_close(got, balance_loss_by_hand(scores, indices, 0.3), rtol=1e-12, atol=0)
    # the batch loss is the same formula over the whole batch as one sequence
    got = batch_balance_loss(scores, indices, 0.3)
    want = balance_loss_by_hand(scores.reshape(1, 15, 6), indices.reshape(1, 15, 2), 0.3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert not torch.isclose(sequence_balance_loss(scores, indices, 0.3), got)   # they differ here


def test_perfectly_balanced_case_gives_exactly_alpha():
    scores = torch.full((1, 2, 4), 0.5)                    # s' = 1/4 everywhere: P_i = 1/4
    indices = torch.tensor([[[0, 1], [2, 3]]])             # each expert once: f_i = 4 / (2 * 2) * 1 = 1
    assert sequence_balance_loss(scores, indices, 0.5).item() == 0.5
    assert batch_balance_loss(scores, indices, 0.5).item() == 0.5
    # all tokens on experts 0 and 1: f = (2, 2, 0, 0), P = 1/4 -> sum f_i P_i = 1 as well (uniform
    # scores give no signal); with scores peaked on the chosen experts the loss grows
    peaked = torch.tensor([[[0.9, 0.9, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1]]])
    loss = sequence_balance_loss(peaked, torch.tensor([[[0, 1], [0, 1]]]), 0.5)
    assert loss.item() == pytest.approx(0.5 * 2 * (0.9 / 2.0) * 2)     # alpha * sum_i f_i P_i = 0.9


def test_balance_loss_gradient_reaches_the_gate_weight_through_p_only():
    gate = Gate(6, 6, topk=2, n_group=3, topk_group=2)
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(6, 6, generator=g))
    x = torch.randn(2, 4, 6, generator=g)
    _, indices, scores = gate(x.view(-1, 6))
    loss = sequence_balance_loss(scores.view(2, 4, 6), indices.view(2, 4, 2), 0.3)
    (grad,) = torch.autograd.grad(loss, gate.weight)
    # reference: f_i as plain numbers from the chosen indices, P_i from s = sigmoid(x W^T)
    w = gate.weight.detach().double().requires_grad_()
    s = torch.sigmoid(x.double() @ w.T)
    ref = balance_loss_by_hand(s, indices.view(2, 4, 2), 0.3)
    (want,) = torch.autograd.grad(ref, w)
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-7)
    assert grad.abs().sum() > 0


def test_model_balance_loss_sums_over_moe_layers_and_rejects_unknown_kinds():
    model = tiny_moe_model(num_hidden_layers=3).train()
    _, aux = model(torch.randint(0, 260, (2, 6), generator=torch.Generator().manual_seed(0)), return_aux=True)
    routing = aux["routing"]
    assert len(routing) == len(moe_layers(model)) == 2
    assert all(r.scores.shape == (2, 6, 8) and r.indices.shape == (2, 6, 2) and r.mask is None for r in routing)
    want = sum(balance_loss_by_hand(r.scores.double(), r.indices, 0.01) for r in routing)
    torch.testing.assert_close(balance_loss(routing, "sequence", 0.01).double(), want, rtol=1e-5, atol=0)
    want = sum(balance_loss_by_hand(r.scores.double().reshape(1, 12, 8), r.indices.reshape(1, 12, 2), 0.01)
               for r in routing)
    torch.testing.assert_close(balance_loss(routing, "batch", 0.01).double(), want, rtol=1e-5, atol=0)
    assert balance_loss(routing, "none", 0.01) is None
    assert balance_loss(routing, "sequence", 0.0) is None
    assert balance_loss([], "sequence", 0.01) is None                  # a pass without MoE layers
    with pytest.raises(ValueError, match="'aux'"):
        balance_loss(routing, "aux", 0.01)


def test_balance_loss_of_micro_batches_is_each_pass_own():
    # Two forwards before one backward (gradient accumulation): each pass's loss comes from its
    # own output, equal to that micro-batch run alone; the layers keep nothing from either.
    model = tiny_moe_model(num_hidden_layers=3).train()
    g = torch.Generator().manual_seed(0)
    micro = [torch.randint(0, 260, (2, 6), generator=g) for _ in range(2)]
    losses = [balance_loss(model(x, return_aux=True)[1]["routing"], "sequence", 0.01) for x in micro]
    total = sum(losses)
    total.backward()
    for x, loss in zip(micro, losses):
        alone = balance_loss(model(x, return_aux=True)[1]["routing"], "sequence", 0.01)
        torch.testing.assert_close(loss, alone, rtol=0, atol=0)
    assert not torch.equal(losses[0], losses[1])
    assert model.layers["1"].ffn.gate.weight.grad.abs().sum() > 0


def test_padding_loads_no_expert_and_adds_nothing_to_the_balance_loss():
    # Row 0 has 4 real tokens then 2 of padding (garbage ids). Load and loss must equal those of
    # the 4 real tokens alone, as part of a batch with a full row 1.
    model = tiny_moe_model(num_hidden_layers=3).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 260, (2, 6), generator=g)
    padding_mask = torch.ones(2, 6, dtype=torch.bool)
    padding_mask[0, 4:] = False
    _, aux = model(x, padding_mask=padding_mask, return_aux=True)
    padded_load = [layer.tokens_per_expert.clone() for layer in moe_layers(model)]
    assert all(load.sum() == (4 + 6) * 2 for load in padded_load)       # 10 real tokens, top-2
    loss = balance_loss(aux["routing"], "sequence", 0.01)
    batch_loss = balance_loss(aux["routing"], "batch", 0.01)
    # the same loss by hand from the real tokens only: causal attention makes row 0's first 4
    # tokens independent of its padding, so its routing there is that of the row alone
    for layer in moe_layers(model):
        layer.tokens_per_expert.zero_()
    _, alone0 = model(x[:1, :4], return_aux=True)
    _, alone1 = model(x[1:], return_aux=True)
    want = sum((balance_loss_by_hand(r0.scores.double(), r0.indices, 0.01)
                + balance_loss_by_hand(r1.scores.double(), r1.indices, 0.01)) / 2
               for r0, r1 in zip(alone0["routing"], alone1["routing"]))
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)
    want = sum(balance_loss_by_hand(torch.cat([r0.scores.flatten(0, 1), r1.scores.flatten(0, 1)]).double()[None],
                                    torch.cat([r0.indices.flatten(0, 1), r1.indices.flatten(0, 1)])[None], 0.01)
               for r0, r1 in zip(alone0["routing"], alone1["routing"]))
    torch.testing.assert_close(batch_loss.double(), want, rtol=1e-5, atol=0)
    for layer, load in zip(moe_layers(model), padded_load):
        torch.testing.assert_close(layer.tokens_per_expert, load, rtol=0, atol=0)


def test_masked_expert_load_and_losses_ignore_padding_and_empty_rows():
    indices = torch.tensor([[[0, 3], [3, 1], [3, 0]]])
    assert expert_load(indices, 5, torch.tensor([[True, False, True]])).tolist() == [2.0, 0.0, 0.0, 2.0, 0.0]
    scores = torch.rand(2, 3, 5, generator=torch.Generator().manual_seed(0))
    idx = scores.topk(2, dim=-1).indices
    mask = torch.tensor([[True, True, False], [False, False, False]])    # row 1 is all padding
    want = balance_loss_by_hand(scores[:1, :2].double(), idx[:1, :2], 0.3)
    torch.testing.assert_close(sequence_balance_loss(scores, idx, 0.3, mask).double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(batch_balance_loss(scores, idx, 0.3, mask).double(), want, rtol=1e-6, atol=0)
    full = torch.ones(2, 3, dtype=torch.bool)
    torch.testing.assert_close(sequence_balance_loss(scores, idx, 0.3, full), sequence_balance_loss(scores, idx, 0.3))


def test_moe_rejects_a_token_mask_of_the_wrong_shape():
    with pytest.raises(ValueError, match="token_mask has shape"):
        make_moe()(torch.randn(2, 3, 8), token_mask=torch.ones(2, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------- 10. MaxVio falls
def _skewed_router_maxvio(gamma: float, iters: int = 200) -> list[float]:
    """A router whose centroids 0 and 1 align with a feature every token has: they get nearly
    every token.  Route a fixed batch, count the load, update the bias; MaxVio per iteration."""
    g = torch.Generator().manual_seed(0)
    gate = Gate(16, 8, topk=2)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(8, 16, generator=g) / 4)
        gate.weight[:2, 0] = 3.0
    x = torch.randn(256, 16, generator=g)
    x[:, 0] = 1.0 + 0.3 * x[:, 0]
    history = []
    with torch.no_grad():
        for _ in range(iters):
            _, indices, _ = gate(x)
            load = expert_load(indices, 8)
            history.append(max_violation(load))
            update_bias(gate.bias, load, gamma)
    return history


def test_bias_update_drives_maxvio_down_on_a_skewed_router():
    fixed = _skewed_router_maxvio(0.0)
    balanced = _skewed_router_maxvio(0.01)
    assert fixed[0] == balanced[0] > 1.0
    assert min(fixed) > 1.0                         # without the update nothing changes
    late = sum(balanced[-20:]) / 20
    assert late < 0.3 and late < fixed[-1] / 5


# ----------------------------------------------------------------------------- 11. clear errors
@pytest.mark.parametrize("overrides, pattern", [
    (dict(n_routed_experts=6), r"n_routed_experts \(6\).*n_group \(4\)"),
    (dict(topk_group=5), r"topk_group \(5\)"),
    (dict(num_experts_per_tok=9), r"num_experts_per_tok \(9\).*8"),       # 2 kept groups of 4 experts
    (dict(n_routed_experts=8, num_experts_per_tok=5), r"num_experts_per_tok \(5\).*4"),
], ids=["experts_not_divisible", "topk_group_above_n_group", "topk_above_kept", "topk_above_kept_8"])
def test_inconsistent_moe_config_raises_naming_the_field(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config("toy", **overrides)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(n_routed_experts=6, n_group=4), r"n_routed_experts \(6\)"),
    (dict(n_group=4, topk_group=5), r"topk_group \(5\)"),
    (dict(n_group=4, topk_group=0), r"topk_group \(0\)"),
    (dict(n_group=4, topk_group=2, topk=5), r"num_experts_per_tok \(5\).*4"),
    (dict(topk=0), r"num_experts_per_tok \(0\)"),
    (dict(dispatch="scatter"), r"dispatch \('scatter'\)"),
])
def test_moe_constructor_validates(kwargs, pattern):
    args = dict(dim=8, moe_inter_dim=4, n_routed_experts=8, n_shared_experts=0, topk=2) | kwargs
    with pytest.raises(ValueError, match=pattern):
        MoE(**args)


def test_moe_forward_with_wrong_feature_size_raises():
    moe = make_moe(dim=8)
    with pytest.raises(ValueError, match=r"7 features.*expects 8"):
        moe(torch.randn(2, 3, 7))


def test_group_limited_greedy_is_refused_by_build_model():
    config = load_config("toy", topk_method="group_limited_greedy")
    with pytest.raises(ValueError, match="group_limited_greedy"):
        build_model(config, device="meta")


# ----------------------------------------------------------------------------- 12. the model
def test_toy_preset_is_mla_plus_moe_from_first_k_dense_replace():
    config = load_config("toy")
    model = build_model(config, device="meta")
    assert config.first_k_dense_replace == 1
    assert all(isinstance(layer.attn, MLA) for layer in model.layers.values())
    assert [type(layer.ffn) for layer in model.layers.values()] == [MLP, MoE, MoE, MoE]
    moe = model.layers["1"].ffn
    assert len(moe.experts) == 16 and moe.topk == 4 and moe.gate.n_group == 4 and moe.gate.topk_group == 2
    assert moe.gate.route_scale == 2.5 and moe.shared_experts.w1.weight.shape == (64, 128)


def test_toy_parameter_count_hand_formula():
    d, V, inter, moe_inter, N, K, h = 128, 260, 384, 64, 16, 4, 4
    mla = d * h * (32 + 16) + d * (32 + 16) + 32 + 32 * h * (32 + 32) + h * 32 * d   # wq, wkv_a, kv_norm, wkv_b, wo
    expert = 3 * d * moe_inter
    moe = N * d + N * expert + expert                                          # gate + routed + 1 shared
    total = 2 * V * d + d + 4 * (mla + 2 * d) + 3 * d * inter + 3 * moe
    count = count_parameters("toy")
    assert count.total == total == 1_696_000
    assert count.activated == total - (N - K) * expert * 3 == 811_264
    assert count_parameters(build_model("toy", seed=0)) == count


def test_moe_model_is_causal():
    model = tiny_moe_model().eval()
    tokens = torch.randint(0, 260, (2, 12), generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    j = 5
    changed[:, j] = (tokens[:, j] + 1) % 260
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-6)
    assert torch.all((a[:, j:] - b[:, j:]).abs().amax(dim=-1) > 1e-5)


@pytest.mark.parametrize("prefill", [1, 6])
def test_moe_model_cached_decode_equals_full_forward(prefill):
    model = tiny_moe_model().eval()
    tokens = torch.randint(0, 260, (2, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2, 14)
        steps = [model(tokens[:, :prefill], 0, cache)]
        for t in range(prefill, 14):
            steps.append(model(tokens[:, t:t + 1], t, cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)
    assert torch.equal(moe_layers(model)[0].tokens_per_expert, torch.zeros(8))   # eval: nothing counted


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU paths are tested above)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_stacked_experts_on_cuda_equal_the_loop_forward_and_gradients(dtype, monkeypatch):
    # On a GPU the layer takes F.grouped_mm (bf16 from sm80; fp32 too on sm90, measured on an H200);
    # it must agree with the per-expert loop it replaces, outputs and every gradient.
    modules, stacked, rows, counts = _experts_and_rows(dim=64, inter=32)
    stacked, rows = stacked.to("cuda", dtype), rows.to("cuda", dtype)
    if not grouped_mm_supported(rows, stacked.w1):
        pytest.skip(f"F.grouped_mm does not take {dtype} on this GPU")
    grad_out = torch.randn(rows.shape, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)
    results = []
    for use_grouped in (True, False):
        if not use_grouped:
            monkeypatch.setattr("deepseek_mini.moe.grouped_mm_supported", lambda x, w: False)
        stacked.zero_grad()
        x = rows.clone().requires_grad_()
        y = stacked(x, counts)
        y.backward(grad_out)
        results.append((y.float(), x.grad.float(), *(p.grad.float() for p in stacked.parameters())))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **tol)
