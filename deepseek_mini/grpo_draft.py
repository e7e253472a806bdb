"""GRPO's loss pieces (draft for chapter 08): group-relative advantages, the k3 KL, the clipped loss.

Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300 §4.1; DeepSeek-V3, arXiv 2412.19437
§5.2.2, eqs. 26-28) is PPO without a critic. For each prompt q the old policy samples a *group* of G
completions o_1..o_G; each gets a scalar reward r_i, and the group itself is the baseline (eq. 28):

    A_i = (r_i - mean(r_1..r_G)) / std(r_1..r_G)

so no value model the size of the policy has to be trained or kept in memory. The policy then
maximises the clipped surrogate with a KL penalty towards a frozen reference policy (eq. 26):

    J = E[ (1/G) sum_i min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i) - beta D_KL(pi_theta || pi_ref) ]
    rho_i = pi_theta(o_i | q) / pi_old(o_i | q)
    D_KL  = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1          (eq. 27, the "k3" estimator)

DeepSeekMath applies both per token and averages over each completion's tokens, (1/|o_i|) sum_t;
that is ``loss_type="grpo"``. The k3 estimator is unbiased for KL(pi_theta || pi_ref) when tokens are
sampled from pi_theta, and, unlike log(pi_theta / pi_ref), it is never negative.

Conventions follow TRL 1.16.0's ``GRPOTrainer`` (``_compute_loss``) so values can be checked against
it token for token: the std uses Bessel's correction plus ``STD_EPS = 1e-4``; the loss is the negated
objective; ``loss_type`` picks how masked per-token losses are averaged:

* ``"grpo"``: a token mean per completion, then a mean over completions (DeepSeekMath). Long and short
  completions weigh the same, so each token of a long wrong answer is penalised less (the length bias
  that Dr. GRPO, arXiv 2503.20783, points out);
* ``"bnpo"``: one token mean over the whole batch;
* ``"dr_grpo"``: the token sum divided by batch size x max completion length, a constant.

DeepSeek-V3 does not disclose eps, beta or G; the defaults here (eps 0.2, beta 0.04) are DeepSeekMath's
and TRL's older ones (TRL 1.16.0 defaults to beta 0.0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from deepseek_mini.data import PAD_ID

__all__ = ["STD_EPS", "LOSS_TYPES", "group_advantages", "k3_kl", "grpo_loss", "completion_logprobs"]

STD_EPS = 1e-4                                  # added to the group std (TRL's value): no division by ~0
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")
LossType = Literal["grpo", "bnpo", "dr_grpo"]


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True) -> Tensor:
    """Group-relative advantages (DeepSeek-V3 eq. 28): each reward minus its group's mean, over its std.

    ``rewards`` is 1-D, ``(n_prompts * group_size,)``, with each prompt's G completions contiguous
    (the layout of ``repeat_interleave``-ed prompts). The std uses Bessel's correction (as TRL does)
    and ``STD_EPS`` is added to it. A group whose rewards are all equal carries no signal about which
    completion is better: its advantages are exactly zero, not rounding noise divided by 1e-4.
    ``scale=False`` keeps only the mean baseline (Dr. GRPO's unscaled advantage).
    """
    if not isinstance(rewards, Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a 1-D float tensor, got {_describe(rewards)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size ({group_size!r}) must be an int >= 2: a group of one has no baseline")
    if rewards.numel() == 0 or rewards.numel() % group_size:
        raise ValueError(f"rewards ({rewards.numel()}) must be a non-zero multiple of group_size ({group_size})")
    grouped = rewards.view(-1, group_size)                      # (n_prompts, G)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(dim=1, correction=1, keepdim=True) + STD_EPS)
    constant = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    return advantages.masked_fill(constant, 0.0).view(-1)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref) (DeepSeek-V3 eq. 27): exp(d) - d - 1, d = ref - logp.

    Both are log-probabilities of the sampled tokens, same shape; the result has that shape, is >= 0,
    and is 0 exactly where the two policies agree. Its gradient flows through ``logp`` only in practice
    (the reference is frozen), but it is not detached here.
    """
    _check_float("logp", logp)
    _check_float("ref_logp", ref_logp)
    if ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp shape {tuple(ref_logp.shape)} must equal logp shape {tuple(logp.shape)}")
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def grpo_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, advantages: Tensor, mask: Tensor,
              clip_eps: float = 0.2, beta: float = 0.04, loss_type: LossType = "grpo",
              max_completion_length: int | None = None) -> tuple[Tensor, dict[str, float]]:
    """The GRPO loss (negated eq. 26) of a batch of completions, and its metrics.

    Shapes: ``logp``, ``old_logp``, ``ref_logp`` and ``mask`` are ``(B, T)`` (per-token log-probs of
    the sampled completion tokens under the current, the sampling-time and the reference policy;
    ``mask`` is 1 on real completion tokens, 0 on padding after the end of the answer); ``advantages``
    is ``(B,)``, one per completion, broadcast over its tokens. ``old_logp`` is treated as a constant
    (detached): on the first of the mu updates it equals ``logp`` and the ratio is 1 with gradient
    grad(logp). ``ref_logp`` may be None when ``beta == 0``. ``max_completion_length`` is the
    ``dr_grpo`` denominator's length (default: ``T``).

    Returns ``(loss, metrics)``; metrics are floats over masked tokens: ``kl`` (mean k3 KL, computed
    whenever ``ref_logp`` is given), ``clip_fraction`` (tokens whose clipped term is the one taken:
    rho < 1 - eps with A < 0, or rho > 1 + eps with A > 0), ``clip_low_fraction``, ``clip_high_fraction``.
    """
    _check_inputs(logp, old_logp, ref_logp, advantages, mask, clip_eps, beta, loss_type, max_completion_length)
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(1)                     # (B, 1): one advantage per completion
    ratio = torch.exp(logp - old_logp.detach())                      # rho, (B, T)
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    per_token = -torch.min(ratio * adv, clipped * adv)               # negated: we minimise
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else None
    if beta != 0.0:
        per_token = per_token + beta * kl

    if loss_type == "grpo":     # (1/|o_i|) sum_t, then the mean over completions (DeepSeekMath §4.1)
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    else:                       # "dr_grpo": a constant denominator, no length bias
        length = logp.shape[1] if max_completion_length is None else max_completion_length
        loss = (per_token * mask).sum() / (logp.shape[0] * length)

    with torch.no_grad():
        n_tokens = mask.sum().clamp(min=1.0)
        low = ((ratio < 1 - clip_eps) & (adv < 0)).to(logp.dtype)
        high = ((ratio > 1 + clip_eps) & (adv > 0)).to(logp.dtype)
        metrics = {
            "clip_fraction": float(((low + high) * mask).sum() / n_tokens),
            "clip_low_fraction": float((low * mask).sum() / n_tokens),
            "clip_high_fraction": float((high * mask).sum() / n_tokens),
        }
        if kl is not None:
            metrics["kl"] = float((kl * mask).sum() / n_tokens)
    return loss, metrics


def completion_logprobs(model: nn.Module, prompts: Sequence[Tensor], completions: Sequence[Tensor],
                        temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Teacher-forced log-probs of each completion's tokens after its prompt, and the completion mask.

    One forward pass over ``prompt + completion`` rows, right-padded with ``PAD_ID`` and masked, so
    that in train mode the padding loads no MoE expert (the bias update of §2.1.2 counts real tokens). Returns ``logp`` (B, T_max), T_max the longest completion,
    float32, with gradient when the model has one, and ``mask`` (B, T_max), True at real completion tokens.
    This gives logp (policy, with gradient), old_logp and ref_logp (under ``torch.no_grad()``) for
    ``grpo_loss``. ``temperature`` divides the logits first, as TRL does, so that the ratio compares the
    distribution the tokens were sampled from.
    """
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"need as many prompts ({len(prompts)}) as completions ({len(completions)}), at least one")
    if not temperature > 0:
        raise ValueError(f"temperature ({temperature}) must be > 0")
    for name, seqs in (("prompt", prompts), ("completion", completions)):
        bad = [i for i, x in enumerate(seqs) if not (isinstance(x, Tensor) and x.dim() == 1
                                                      and x.dtype == torch.long and len(x) > 0)]
        if bad:
            raise ValueError(f"{name} {bad[0]} must be a non-empty 1-D int64 tensor of token ids")
    rows = [torch.cat([p, c]) for p, c in zip(prompts, completions)]
    tokens = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=PAD_ID)        # (B, L)
    lengths = torch.tensor([len(r) for r in rows], device=tokens.device)
    real = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]  # (B, L)
    # padding_mask: in train mode the padding must load no expert (the MoE bias update counts load)
    logits = model(tokens, padding_mask=real).float() / temperature                        # (B, L, V)
    width = max(len(c) for c in completions)
    starts = torch.tensor([len(p) for p in prompts], device=tokens.device)
    # completion token j of row b sits at position starts[b] + j and is predicted at position starts[b] + j - 1
    pos = (starts[:, None] + torch.arange(width, device=tokens.device)).clamp(max=tokens.shape[1] - 1)
    mask = torch.arange(width, device=tokens.device)[None, :] < torch.tensor([len(c) for c in completions],
                                                                             device=tokens.device)[:, None]
    log_probs = logits.log_softmax(-1).gather(1, (pos - 1)[:, :, None].expand(-1, -1, logits.shape[-1]))
    targets = tokens.gather(1, pos)
    logp = log_probs.gather(2, targets[:, :, None])[:, :, 0]
    return logp.masked_fill(~mask, 0.0), mask


# ----------------------------------------------------------------------------- input checks
def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def _check_float(name: str, x: object) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor, got {_describe(x)}")


def _check_inputs(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, advantages: Tensor, mask: Tensor,
                  clip_eps: float, beta: float, loss_type: str, max_completion_length: int | None) -> None:
    _check_float("logp", logp)
    if logp.dim() != 2:
        raise ValueError(f"logp must be (batch, completion_length), got shape {tuple(logp.shape)}")
    named = {"old_logp": old_logp, "mask": mask} | ({} if ref_logp is None else {"ref_logp": ref_logp})
    for name, x in named.items():
        if not isinstance(x, Tensor) or x.shape != logp.shape:
            raise ValueError(f"{name} must have logp's shape {tuple(logp.shape)}, got {_describe(x)}")
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if x is not None and x.dtype != logp.dtype:
            raise ValueError(f"{name} dtype {x.dtype} must equal logp dtype {logp.dtype}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"mask must be bool or float (1 = completion token), got dtype {mask.dtype}")
    _check_float("advantages", advantages)
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be ({logp.shape[0]},), one per completion, "
                         f"got shape {tuple(advantages.shape)}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {LOSS_TYPES}")
    if isinstance(clip_eps, bool) or not isinstance(clip_eps, (int, float)) or not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps ({clip_eps!r}) must be a number in (0, 1)")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 0:
        raise ValueError(f"beta ({beta!r}) must be a number >= 0")
    if beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta ({beta}) > 0 needs ref_logp, the frozen reference policy's log-probs")
    if max_completion_length is not None and (
            isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int)
            or max_completion_length < logp.shape[1]):
        raise ValueError(f"max_completion_length ({max_completion_length!r}) must be an int >= "
                         f"the completion length {logp.shape[1]}")
