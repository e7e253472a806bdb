"""GRPO's loss pieces (chapter 08 draft; DeepSeekMath §4.1, DeepSeek-V3 §5.2.2 eqs. 26-28): group advantages
against hand values (Bessel's std, exact zeros for constant groups), the k3 KL, the clipped loss of each
loss_type against a hand-computed two-completion batch (values, gradients, clip and KL metrics), masks,
float64 gradcheck, input errors, and parity with TRL 1.16.0's ``GRPOTrainer._compute_loss`` run on the
same tensors (skipped when trl is not installed; an independent re-computation of its formulas always runs)."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from deepseek_mini.grpo import LOSS_TYPES, STD_EPS, group_advantages, grpo_loss, k3_kl


# ----------------------------------------------------------------------------- advantages
def test_group_advantages_hand_values_two_groups():
    # group 1: mean 1, Bessel std sqrt((1 + 1 + 0) / 2) = 1 (the biased std would be sqrt(2/3));
    # group 2: constant -> exactly zero.
    rewards = torch.tensor([2.0, 0.0, 1.0, 0.5, 0.5, 0.5], dtype=torch.float64)
    got = group_advantages(rewards, group_size=3)
    a = 1 / (1 + STD_EPS)
    torch.testing.assert_close(got, torch.tensor([a, -a, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64),
                               rtol=0, atol=1e-15)
    torch.testing.assert_close(group_advantages(rewards, 3, scale=False),
                               torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64))


def test_group_advantages_groups_are_contiguous_and_independent():
    rewards = torch.tensor([1.0, 0.0, 0.0, 3.0])       # groups [1, 0] and [0, 3]
    got = group_advantages(rewards, group_size=2)
    s1, s2 = math.sqrt(0.5), math.sqrt(4.5)             # Bessel std of each pair
    expected = torch.tensor([0.5 / (s1 + STD_EPS), -0.5 / (s1 + STD_EPS), -1.5 / (s2 + STD_EPS), 1.5 / (s2 + STD_EPS)])
    torch.testing.assert_close(got, expected)


def test_constant_group_is_exactly_zero_despite_rounding():
    # In float32 the mean of eight 0.7s is off by 6e-8; divided by STD_EPS that would be a 6e-4 advantage.
    rewards = torch.full((8,), 0.7)
    assert (rewards - rewards.mean()).abs().max() > 0          # the rounding the function must not amplify
    assert torch.equal(group_advantages(rewards, 8), torch.zeros(8))


@pytest.mark.parametrize("bad, match", [
    (dict(rewards=torch.ones(2, 3)), "1-D float"),
    (dict(rewards=torch.ones(6, dtype=torch.long)), "1-D float"),
    (dict(group_size=1), ">= 2"),
    (dict(group_size=4), "multiple of group_size"),
    (dict(group_size=True), ">= 2"),
])
def test_group_advantages_errors(bad, match):
    args = dict(rewards=torch.ones(6), group_size=3) | bad
    with pytest.raises(ValueError, match=match):
        group_advantages(**args)


# ----------------------------------------------------------------------------- k3 KL
def test_k3_kl_values():
    logp = torch.log(torch.tensor([0.5, 0.25, 0.1], dtype=torch.float64))
    ref = torch.log(torch.tensor([0.5, 0.5, 0.01], dtype=torch.float64))
    # pi_ref / pi_theta - log(pi_ref / pi_theta) - 1: ratios 1, 2, 0.1
    expected = torch.tensor([0.0, 2 - math.log(2) - 1, 0.1 - math.log(0.1) - 1], dtype=torch.float64)
    torch.testing.assert_close(k3_kl(logp, ref), expected)
    assert (k3_kl(torch.randn(50), torch.randn(50)) >= 0).all()
    with pytest.raises(ValueError, match="must equal logp shape"):
        k3_kl(torch.zeros(3), torch.zeros(4))


# ----------------------------------------------------------------------------- the loss by hand
def hand_batch(dtype=torch.float64):
    """Two completions of three tokens; the second has one padding token (masked) full of garbage.

    rho = exp(logp - old): completion 1 (A = +1): 1.5 (clipped high at 1.2), 0.9, 1.0;
    completion 2 (A = -1): 0.5 (clipped low at 0.8), 1.1, [padding: rho = e^5].
    ref - logp: ln 2 at completion 1's first token (k3 = 1 - ln 2), ln 10 on the padding, else 0.
    """
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]], dtype=dtype)
    log_rho = torch.log(torch.tensor([[1.5, 0.9, 1.0], [0.5, 1.1, math.exp(5)]], dtype=dtype))
    logp = (old + log_rho).requires_grad_(True)
    ref = logp.detach() + torch.log(torch.tensor([[2.0, 1.0, 1.0], [1.0, 1.0, 10.0]], dtype=dtype))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    advantages = torch.tensor([1.0, -1.0], dtype=dtype)
    return logp, old, ref, advantages, mask


# per-token losses -min(rho A, clip(rho) A): completion 1: -1.2, -0.9, -1.0; completion 2: 0.8, 1.1
HAND_LOSS = {"grpo": (-3.1 / 3 + 1.9 / 2) / 2, "bnpo": (-3.1 + 1.9) / 5, "dr_grpo": (-3.1 + 1.9) / (2 * 4)}
K3 = 1 - math.log(2)
HAND_KL_LOSS = {"grpo": K3 / 3 / 2, "bnpo": K3 / 5, "dr_grpo": K3 / 8}   # beta = 1 part of the loss
# d loss / d logp: clipped tokens have zero gradient; the others d(-rho A)/dlogp = -rho A, then the average
HAND_GRAD = {"grpo": [[0, -0.9 / 6, -1 / 6], [0, 1.1 / 4, 0]],
             "bnpo": [[0, -0.9 / 5, -1 / 5], [0, 1.1 / 5, 0]],
             "dr_grpo": [[0, -0.9 / 8, -1 / 8], [0, 1.1 / 8, 0]]}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_value_and_gradient_by_hand(loss_type):
    logp, old, ref, adv, mask = hand_batch()
    loss, metrics = grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.0, loss_type=loss_type,
                              max_completion_length=4)
    assert loss.item() == pytest.approx(HAND_LOSS[loss_type], abs=1e-12)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor(HAND_GRAD[loss_type], dtype=torch.float64))
    assert metrics["clip_fraction"] == pytest.approx(2 / 5)       # the padding's huge rho is not counted
    assert metrics["clip_low_fraction"] == pytest.approx(1 / 5)
    assert metrics["clip_high_fraction"] == pytest.approx(1 / 5)
    assert metrics["kl"] == pytest.approx(K3 / 5)                 # the padding's ln 10 is not counted


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_kl_penalty_adds_beta_times_masked_k3(loss_type):
    logp, old, ref, adv, mask = hand_batch()
    loss, _ = grpo_loss(logp, old, ref, adv, mask, beta=0.04, loss_type=loss_type, max_completion_length=4)
    assert loss.item() == pytest.approx(HAND_LOSS[loss_type] + 0.04 * HAND_KL_LOSS[loss_type], abs=1e-12)


def test_dr_grpo_defaults_to_the_padded_length():
    logp, old, ref, adv, mask = hand_batch()
    loss, _ = grpo_loss(logp, old, ref, adv, mask, beta=0.0, loss_type="dr_grpo")
    assert loss.item() == pytest.approx((-3.1 + 1.9) / (2 * 3))


def test_first_update_is_the_policy_gradient():
    """On the first of mu updates old_logp is logp itself: rho = 1, and old_logp must act as a constant,
    so the gradient is -A grad(logp) / |o_i| (REINFORCE with the group baseline), not zero."""
    torch.manual_seed(0)
    logp = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    loss, metrics = grpo_loss(logp, logp, None, adv, mask, beta=0.0)
    loss.backward()
    expected = -adv[:, None] * mask / mask.sum(1, keepdim=True) / 3
    torch.testing.assert_close(logp.grad, expected)
    assert metrics["clip_fraction"] == 0.0 and "kl" not in metrics


def test_masked_positions_change_nothing():
    logp, old, ref, adv, mask = hand_batch()
    for loss_type in LOSS_TYPES:
        base, base_metrics = grpo_loss(logp, old, ref, adv, mask, loss_type=loss_type)
        (grad,) = torch.autograd.grad(base, logp)
        junk = ~mask
        logp2 = torch.where(junk, torch.tensor(-50.0, dtype=logp.dtype), logp.detach()).requires_grad_(True)
        loss2, metrics2 = grpo_loss(logp2, torch.where(junk, 7.0, old), torch.where(junk, 30.0, ref), adv,
                                    mask.double(), loss_type=loss_type)         # a float mask works the same
        (grad2,) = torch.autograd.grad(loss2, logp2)
        assert loss2.item() == pytest.approx(base.item(), abs=1e-12)
        torch.testing.assert_close(grad2, grad)
        assert metrics2 == pytest.approx(base_metrics)


def test_fully_masked_completion_counts_as_zero():
    logp, old, ref, adv, _ = hand_batch()
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    loss, _ = grpo_loss(logp, old, ref, adv, mask, beta=0.0, loss_type="grpo")
    assert loss.item() == pytest.approx(-3.1 / 3 / 2)      # TRL's clamp(min=1): no NaN, still in the mean


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck_float64(loss_type):
    torch.manual_seed(1)
    old = torch.randn(3, 5, dtype=torch.float64)
    # rho in [0.6, 1.5]: some tokens clipped, none within 0.05 of a clip edge (the loss has kinks there)
    log_rho = torch.log(torch.tensor([[0.6, 0.9, 1.1, 1.5, 1.0], [1.3, 0.7, 1.0, 0.95, 1.05],
                                      [1.4, 0.65, 1.1, 0.9, 1.0]], dtype=torch.float64))
    logp = (old + log_rho).requires_grad_(True)
    ref = (old + 0.3 * torch.randn(3, 5, dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([0.8, -1.2, 0.4], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(
        lambda lp, rf: grpo_loss(lp, old, rf, adv, mask, beta=0.04, loss_type=loss_type, max_completion_length=6)[0],
        (logp, ref))


@pytest.mark.parametrize("bad, match", [
    (dict(loss_type="dapo"), "unknown loss_type"),
    (dict(logp=torch.zeros(2, 3, dtype=torch.long)), "float tensor"),
    (dict(logp=torch.zeros(2, 3, 1)), r"\(batch, completion_length\)"),
    (dict(old_logp=torch.zeros(2, 4)), "old_logp must have logp's shape"),
    (dict(old_logp=torch.zeros(2, 3, dtype=torch.float64)), "old_logp dtype"),
    (dict(mask=torch.ones(3, 3)), "mask must have logp's shape"),
    (dict(mask=torch.ones(2, 3, dtype=torch.long)), "bool or float"),
    (dict(advantages=torch.zeros(2, 3)), r"advantages must be \(2,\)"),
    (dict(advantages=torch.zeros(2, dtype=torch.long)), "advantages must be a float tensor"),
    (dict(clip_eps=1.5), "clip_eps"),
    (dict(beta=-0.1), "beta"),
    (dict(ref_logp=None), "needs ref_logp"),
    (dict(loss_type="dr_grpo", max_completion_length=2), "max_completion_length"),
])
def test_loss_errors(bad, match):
    args = dict(logp=torch.zeros(2, 3), old_logp=torch.zeros(2, 3), ref_logp=torch.zeros(2, 3),
                advantages=torch.zeros(2), mask=torch.ones(2, 3, dtype=torch.bool)) | bad
    with pytest.raises(ValueError, match=match):
        grpo_loss(**args)


# ----------------------------------------------------------------------------- TRL parity
def random_batch(seed: int, B: int = 6, T: int = 7, group_size: int = 3):
    """Ratios spread past both clip edges, varied lengths, rewards with one constant group."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = old + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])[:B]
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.tensor([1.0, 0.0, 1.2, 0.2, 0.2, 0.2])[:B]
    return logp, old, ref, mask, group_advantages(rewards.double(), group_size)


def recomputed_trl_loss(logp, old, ref, adv, mask, eps, beta, loss_type, max_len):
    """TRL 1.16.0's ``_compute_loss`` formulas (token-level importance sampling, no vLLM, no entropy
    terms), re-typed from its source as an independent check that runs without trl installed."""
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps)
    a = adv.unsqueeze(1)
    per_token_loss = -torch.min(coef_1 * a, coef_2 * a)
    per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    m = mask.double()
    if loss_type == "grpo":
        loss = ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * m).sum() / m.sum().clamp(min=1.0)
    else:
        loss = (per_token_loss * m).sum() / (per_token_loss.size(0) * max_len)
    region = ((coef_1 < 1 - eps) & (a < 0)) | ((coef_1 > 1 + eps) & (a > 0))
    return loss, {"kl": ((per_token_kl * m).sum() / m.sum()).item(),
                  "clip_ratio/region_mean": ((region.double() * m).sum() / m.sum()).item()}


class TRLStub:
    """The attributes ``GRPOTrainer._compute_loss`` reads, for one process, no gradient accumulation,
    token-level ratios, no vLLM, no entropy bonus or mask; the model's forward pass returns ``logp``."""

    def __init__(self, logp, loss_type, beta, eps, max_len):
        self.loss_type, self.beta, self.epsilon_low, self.epsilon_high = loss_type, beta, eps, eps
        self.max_completion_length, self.importance_sampling_level = max_len, "token"
        self.top_entropy_quantile, self.off_policy_mask_threshold, self.use_vllm = 1.0, None, False
        self.aux_loss_enabled, self._entropy_bonus_enabled = False, False
        self.args = SimpleNamespace(delta=None, use_bias_correction_kl=False)
        self.model = SimpleNamespace(training=True)
        self.current_gradient_accumulation_steps = 1
        self.accelerator = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x,
                                           reduce=lambda x, reduction="sum": x, num_processes=1)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._logp = logp

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **_):
        return self._logp, torch.zeros_like(self._logp), None


def trl_loss(logp, old, ref, adv, mask, eps, beta, loss_type, max_len):
    """Run TRL's own ``GRPOTrainer._compute_loss`` on these tensors; returns (loss, its logged metrics)."""
    from trl.trainer.grpo_trainer import GRPOTrainer
    stub = TRLStub(logp, loss_type, beta, eps, max_len)
    B, T = logp.shape
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref}
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, {key: values[-1] for key, values in stub._metrics["train"].items()}


CASES = [(loss_type, beta, eps) for loss_type in LOSS_TYPES for beta, eps in ((0.0, 0.2), (0.04, 0.2), (0.1, 0.1))]


def check_parity(reference, loss_type, beta, eps, seed=0):
    logp, old, ref, mask, adv = random_batch(seed)
    mine_logp, their_logp = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    loss, metrics = grpo_loss(mine_logp, old, ref, adv, mask, clip_eps=eps, beta=beta, loss_type=loss_type,
                              max_completion_length=9)
    their_loss, their_metrics = reference(their_logp, old, ref, adv, mask, eps, beta, loss_type, 9)
    loss.backward()
    their_loss.backward()
    torch.testing.assert_close(loss, their_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(mine_logp.grad, their_logp.grad, rtol=0, atol=1e-12)
    # TRL averages its metrics in float32: compare to 1e-6
    assert metrics["clip_fraction"] == pytest.approx(their_metrics["clip_ratio/region_mean"], abs=1e-6)
    assert 0 < metrics["clip_fraction"] < 1                    # the batch does exercise clipping
    if beta != 0.0:
        assert metrics["kl"] == pytest.approx(their_metrics["kl"], abs=1e-6)


@pytest.mark.parametrize("loss_type, beta, eps", CASES)
def test_parity_with_recomputed_trl_formulas(loss_type, beta, eps):
    check_parity(recomputed_trl_loss, loss_type, beta, eps)


@pytest.mark.parametrize("loss_type, beta, eps", CASES)
def test_parity_with_trl_grpo_trainer(loss_type, beta, eps):
    trl = pytest.importorskip("trl")
    if tuple(int(p) for p in trl.__version__.split(".")[:2]) < (1, 16):
        pytest.skip(f"parity is pinned to trl 1.16's _compute_loss, found {trl.__version__}")
    check_parity(trl_loss, loss_type, beta, eps)


def test_advantages_match_trl_nanstd():
    pytest.importorskip("trl")
    from trl.trainer.utils import nanstd
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0, 0.3, 0.9, 0.1], dtype=torch.float64)
    grouped = rewards.view(-1, 3)
    # TRL's _generate_and_score_completions with scale_rewards="group"
    theirs = (grouped - grouped.mean(1, keepdim=True)) / (nanstd(grouped, dim=1).unsqueeze(1) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 3), theirs.view(-1), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- log-probs of sampled completions
def test_completion_logprobs_match_sampling_and_carry_gradients():
    """The loop samples with ``generate`` (KV cache, ragged prompts, stop at the end of the line) and
    scores with one teacher-forced pass: both must give the same log-probs, or rho != 1 at the first update."""
    from deepseek_mini.data import ByteTokenizer
    from deepseek_mini.generate import generate
    from deepseek_mini.grpo import completion_logprobs
    from deepseek_mini.model import build_model
    from deepseek_mini.data import verifiable_problems

    model = build_model("toy", seed=0)
    tok = ByteTokenizer()
    prompts = [torch.tensor(tok.encode(t.prompt, bos=True)) for t in verifiable_problems(3, seed=0) for _ in range(2)]
    seqs, sampled = generate(model, prompts, 10, stop_token=ord("\n"), seed=0, return_logprobs=True)
    completions = [s[len(p):] for s, p in zip(seqs, prompts)]
    assert len({len(c) for c in completions}) > 1                 # ragged: the mask matters
    logp, mask = completion_logprobs(model, prompts, completions)
    assert mask.sum(1).tolist() == [len(c) for c in completions]
    expected = torch.nn.utils.rnn.pad_sequence(list(sampled), batch_first=True)
    torch.testing.assert_close(logp.detach(), expected, rtol=0, atol=1e-5)
    logp.sum().backward()
    assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0
    from deepseek_mini.moe import moe_layers
    layers = moe_layers(model)
    assert layers
    for layer in layers:
        layer.tokens_per_expert.zero_()
    model.train()
    completion_logprobs(model, prompts, completions)              # train mode: MoE layers count load
    n_real = sum(len(p) + len(c) for p, c in zip(prompts, completions))
    for layer in layers:                                          # the padding loads no expert
        assert layer.tokens_per_expert.sum().item() == n_real * model.config.num_experts_per_tok
    hot, _ = completion_logprobs(model, prompts, completions, temperature=2.0)
    assert not torch.allclose(hot, logp)                          # the temperature does divide the logits
    with pytest.raises(ValueError, match="completion 1 must be a non-empty"):
        completion_logprobs(model, prompts[:2], [completions[0], torch.tensor([], dtype=torch.long)])
