"""Self-speculative decoding with the MTP module (DeepSeek-V3 §5.4.3).

``speculative_generate`` against plain ``generate`` (greedy: token for token), the accept/reject
rule (Leviathan et al. 2023) against its target distribution, the sampled loop against the main
model's exact marginal, and the MTP's cached drafts against an uncached MTP chain.

Besides untrained toys (whose greedy drafts are mostly rejected), rigged models fix what the
drafts do: ``_constant_head`` (every argmax is one token, main model and MTP alike: every draft
accepted) and ``_counting`` (every block the identity, the main model counts t -> t + 1, and the
MTP drafts the token after next right always, never, or at chosen tokens), whose every step
``counting_oracle`` predicts.
"""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch
from torch import nn

import deepseek_mini.generate as generate_module
from deepseek_mini import build_model, load_config
from deepseek_mini.generate import (SpeculativeStats, generate, speculative_accept, speculative_generate,
                                    token_distribution)
from deepseek_mini.moe import moe_layers
from deepseek_mini.mtp import mtp_logits

# Two layers, d = 32, 64 positions: small enough that the whole file runs in seconds.
TRUNK = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, max_position_embeddings=64,
             num_nextn_predict_layers=1)
MLA = dict(num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
           qk_rope_head_dim=8, v_head_dim=8)
MOE = dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, moe_intermediate_size=16)
NO_SPECIAL_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)   # for a small vocabulary
CONFIGS = {
    "toy": ("toy", {**TRUNK, **MLA, **MOE}),          # MLA + MoE trunk (layer 0 dense), MoE MTP block
    "toy-mla": ("toy-mla", {**TRUNK, **MLA}),         # MLA + dense everywhere, MTP block included
    "toy-dense": ("toy-dense", {**TRUNK, "num_attention_heads": 4}),   # chapter 01's MHA + dense
}
RIG_VOCAB = 16          # the counting rig embeds token t as the unit vector e_t: vocab <= hidden_size


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these tensors are tiny, and on a shared CPU handing each op to a second
    thread costs more than it saves (measured: 30x slower under load). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@cache
def untrained(name: str) -> nn.Module:
    preset, overrides = CONFIGS[name]
    return build_model(load_config(preset, **overrides), seed=0).eval()


class _AddBias(nn.Module):
    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


@cache
def _constant_head(token: int) -> nn.Module:
    """The MoE toy with a zero head plus a bias on ``token``: every argmax is ``token``, the main
    model's and the MTP's alike (the MTP reads the main model's head), so every draft is accepted."""
    m = build_model(load_config("toy", **TRUNK, **MLA, **MOE), seed=0).eval()
    with torch.no_grad():
        m.head.weight.zero_()
    bias = torch.zeros(m.config.vocab_size)
    bias[token] = 1.0
    m.head = nn.Sequential(m.head, _AddBias(bias))
    return m


def successor(t: int) -> int:
    return (t + 1) % RIG_VOCAB


# How the counting rig's MTP misreads token t (a permutation of the vocabulary): it drafts
# successor(DRAFT_MAPS[...][t]) for the token after next, right exactly where the map fixes t.
DRAFT_MAPS = {
    "all": list(range(RIG_VOCAB)),                                   # every draft accepted
    "none": [successor(t) for t in range(RIG_VOCAB)],                # no fixed point: every draft rejected
    "thirds": [0, 2, 1, 3, 5, 4, 6, 8, 7, 9, 11, 10, 12, 14, 13, 15],   # right after 0, 3, 6, ...: mixed
}


@cache
def _counting(drafts: str) -> nn.Module:
    """The MoE toy (vocab 16) made to count: every block (trunk and MTP) has zero weights, so it is
    the identity; the embedding of t is e_t and the head maps e_t to t + 1 (mod 16). The main model
    predicts t_{i+1} = t_i + 1 whatever came before. The MTP at position i gets [Emb(t_{i+1}); h_i]
    (embedding first); its ``eh_proj`` = [P 0] reads the embedding, permuted by P = DRAFT_MAPS[drafts],
    so it drafts P(t_{i+1}) + 1 for t_{i+2} = t_{i+1} + 1: accepted exactly where P fixes t_{i+1}."""
    m = build_model(load_config("toy", **TRUNK, **MLA, **MOE, vocab_size=RIG_VOCAB, **NO_SPECIAL_TOKENS), seed=0)
    d = m.config.hidden_size
    with torch.no_grad():
        for block in [*m.layers.values(), m.mtp[0].block]:
            for p in block.parameters():
                p.zero_()
        m.embed.weight.copy_(torch.eye(RIG_VOCAB, d))
        m.head.weight.zero_()
        for t in range(RIG_VOCAB):
            m.head.weight[successor(t), t] = 1.0
        permute = torch.eye(d)
        permute[:RIG_VOCAB, :RIG_VOCAB] = torch.eye(RIG_VOCAB)[DRAFT_MAPS[drafts]].T    # column t = e_{P(t)}
        m.mtp[0].eh_proj.weight.copy_(torch.cat([permute, torch.zeros(d, d)], dim=1))
    return m.eval()


def counting_oracle(drafts: str, first: int, max_new_tokens: int, stop_token: int | None = None):
    """What ``speculative_generate`` must do on ``_counting(drafts)``, in plain Python: each step
    verifies the last token t and its draft, accepted iff the draft map fixes t."""
    if max_new_tokens == 0:
        return [], SpeculativeStats(0, 0, 0)
    out, forwards, accepted = [first], 0, 0
    while len(out) < max_new_tokens and stop_token not in out:
        last, forwards = out[-1], forwards + 1
        if DRAFT_MAPS[drafts][last] == last:
            accepted += 1
            out += [successor(last), successor(successor(last))]
        else:
            out.append(successor(last))
    out = out[:max_new_tokens]
    if stop_token in out:
        out = out[:out.index(stop_token) + 1]
    return out, SpeculativeStats(forwards, accepted, forwards)


def random_prompts(n: int, vocab: int, seed: int, max_len: int = 20) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(1, max_len + 1, (1,), generator=g)),), generator=g)
            for _ in range(n)]


def check_counts(stats: SpeculativeStats, n_new: int, max_new_tokens: int, stopped: bool = False) -> None:
    """What the loop's counts must satisfy: one draft per main-model forward; the prefill emits one
    token and each forward one more, two when its draft is accepted (the bonus), so the loop emits
    E = 1 + forwards + accepted tokens. Without a stop token it runs until E >= max_new_tokens, the
    last step's bonus overshooting by at most one (cut off); a stop token ends it at the step that
    emitted it, whose bonus (if the stop was the accepted draft) is cut off too."""
    emitted = 1 + stats.forwards + stats.accepted
    assert stats.drafted == stats.forwards and 0 <= stats.accepted <= stats.drafted
    if max_new_tokens == 0:
        assert n_new == 0 and stats == (0, 0, 0)
    elif stopped:
        assert n_new <= max_new_tokens and emitted - n_new in (0, 1)
    else:
        assert n_new == max_new_tokens and emitted - max_new_tokens in (0, 1)


# ------------------------------------------------------------------ greedy: identical to generate
def test_greedy_equals_generate_on_an_untrained_model():
    # Untrained, the MTP rarely agrees with the main model: nearly every step takes the reject path.
    m = untrained("toy")
    prompts = random_prompts(20, m.config.vocab_size, seed=1)
    expected = generate(m, prompts, 20, temperature=0)         # one ragged batch: each prompt alone
    total = SpeculativeStats(0, 0, 0)
    for prompt, ref in zip(prompts, expected):
        out, stats = speculative_generate(m, prompt, 20, temperature=0, return_stats=True)
        assert torch.equal(out, ref)
        check_counts(stats, len(out) - len(prompt), 20)
        total = SpeculativeStats(*(a + b for a, b in zip(total, stats)))
    assert total.drafted - total.accepted > 100                  # the reject path ran, many times
    assert total.acceptance_rate == total.accepted / total.drafted < 0.5


def test_greedy_equals_generate_when_every_draft_is_accepted():
    # The constant head: main model and MTP both always say 7. ceil(29 / 2) = 15 forwards for 30 tokens.
    m = _constant_head(7)
    prompts = random_prompts(6, m.config.vocab_size, seed=2)
    for prompt, ref in zip(prompts, generate(m, prompts, 30, temperature=0)):
        out, stats = speculative_generate(m, prompt, 30, temperature=0, return_stats=True)
        assert torch.equal(out, ref) and out[len(prompt):].tolist() == [7] * 30
        assert stats == SpeculativeStats(drafted=15, accepted=15, forwards=15) and stats.acceptance_rate == 1.0
        check_counts(stats, 30, 30)


@pytest.mark.parametrize("drafts", ["all", "none", "thirds"])
def test_greedy_on_the_counting_rig_equals_generate_and_the_oracle(drafts):
    # Drafts always, never, or sometimes right (after 0, 3, 6, ...: accept and reject interleave).
    m = _counting(drafts)
    prompts = random_prompts(4, RIG_VOCAB, seed=3)
    for prompt, ref in zip(prompts, generate(m, prompts, 30, temperature=0)):
        out, stats = speculative_generate(m, prompt, 30, temperature=0, return_stats=True)
        assert torch.equal(out, ref)
        expected, expected_stats = counting_oracle(drafts, successor(int(prompt[-1])), 30)
        assert out[len(prompt):].tolist() == expected and stats == expected_stats
        check_counts(stats, 30, 30)
    assert {"all": stats.acceptance_rate == 1.0, "none": stats.acceptance_rate == 0.0,
            "thirds": 0.0 < stats.acceptance_rate < 1.0}[drafts]


@pytest.mark.parametrize("name", ["toy-mla", "toy-dense"])
def test_greedy_equals_generate_for_a_dense_mtp_block_and_for_mha(name):
    # toy-mla: MLA with a dense MTP block; toy-dense: chapter 01's multi-head attention.
    m = untrained(name)
    assert not moe_layers(m) and (name == "toy-mla") == m.config.uses_mla
    prompts = random_prompts(4, m.config.vocab_size, seed=4)
    for prompt, ref in zip(prompts, generate(m, prompts, 30, temperature=0)):
        out, stats = speculative_generate(m, prompt, 30, temperature=0, return_stats=True)
        assert torch.equal(out, ref)
        check_counts(stats, 30, 30)


# ------------------------------------------------------------------ lengths and stop tokens
@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 7, 8])
@pytest.mark.parametrize("rig", ["all", "none", "thirds", "untrained"])
def test_exactly_max_new_tokens(n, rig):
    # Every draft accepted: the last bonus overshoots an even n by one and must be cut off.
    m = untrained("toy") if rig == "untrained" else _counting(rig)
    prompt = torch.tensor([3, 1, 4, 1, 5])
    out, stats = speculative_generate(m, prompt, n, temperature=0, return_stats=True)
    assert len(out) == len(prompt) + n and torch.equal(out[:len(prompt)], prompt)
    assert torch.equal(out, generate(m, prompt[None], n, temperature=0)[0])
    check_counts(stats, n, n)
    if rig != "untrained":
        assert (out[len(prompt):].tolist(), stats) == counting_oracle(rig, 6, n)
    if rig == "all":
        assert stats.forwards == math.ceil(max(n - 1, 0) / 2) == stats.accepted
    if rig == "none":
        assert stats.forwards == max(n - 1, 0) and stats.accepted == 0
    sampled = speculative_generate(m, prompt, n, temperature=1.0, seed=0)
    assert len(sampled) == len(prompt) + n


@pytest.mark.parametrize("stop_after,forwards", [(1, 0), (2, 1), (3, 1), (4, 2), (5, 2)])
def test_stop_token_with_every_draft_accepted(stop_after, forwards):
    # The counting rig continues 5 -> 6, 7, 8, ...: the first token comes from the prefill, then
    # each forward accepts one draft and adds a bonus. stop_after = 2 or 4: the stop token is an
    # accepted draft, and the bonus drawn with it must not be emitted.
    m = _counting("all")
    prompt = torch.tensor([2, 9, 5])
    stop = 5 + stop_after
    out, stats = speculative_generate(m, prompt, 12, temperature=0, stop_token=stop, return_stats=True)
    assert out.tolist() == [2, 9, 5] + list(range(6, stop + 1))
    assert torch.equal(out, generate(m, [prompt], 12, temperature=0, stop_token=stop)[0])
    assert stats == SpeculativeStats(drafted=forwards, accepted=forwards, forwards=forwards)
    check_counts(stats, stop_after, 12, stopped=True)


@pytest.mark.parametrize("stop", range(RIG_VOCAB))
def test_stop_token_on_the_mixed_rig(stop):
    m, prompt = _counting("thirds"), torch.tensor([4, 15])       # continues 0, 1, 2, ..., 15, 0, 1
    out, stats = speculative_generate(m, prompt, 18, temperature=0, stop_token=stop, return_stats=True)
    assert (out[2:].tolist(), stats) == counting_oracle("thirds", 0, 18, stop)
    assert out[2:].tolist() == list(range(stop + 1))
    assert torch.equal(out, generate(m, [prompt], 18, temperature=0, stop_token=stop)[0])
    check_counts(stats, stop + 1, 18, stopped=True)


def test_stop_token_equals_generate_with_rejections_and_the_constant_head():
    m = untrained("toy")
    prompts = random_prompts(6, m.config.vocab_size, seed=5)
    continuations = generate(m, prompts, 16, temperature=0)
    for k, (prompt, full) in enumerate(zip(prompts, continuations)):
        stop = int(full[len(prompt) + 2 * k])               # its first occurrence may come earlier
        expected = generate(m, [prompt], 16, temperature=0, stop_token=stop)[0]
        out, stats = speculative_generate(m, prompt, 16, temperature=0, stop_token=stop, return_stats=True)
        assert torch.equal(out, expected) and int(out[-1]) == stop and (out[len(prompt):] == stop).sum() == 1
        check_counts(stats, len(out) - len(prompt), 16, stopped=True)
    # A stop token that never comes: the full length.
    prompt = prompts[0]
    absent = next(t for t in range(m.config.vocab_size) if t not in continuations[0][len(prompt):].tolist())
    assert torch.equal(speculative_generate(m, prompt, 16, temperature=0, stop_token=absent), continuations[0])
    # The constant head says its token at once: one token, no forward after the prefill.
    out, stats = speculative_generate(_constant_head(7), torch.tensor([1, 2]), 10, temperature=0, stop_token=7,
                                      return_stats=True)
    assert out.tolist() == [1, 2, 7] and stats == (0, 0, 0)


# ------------------------------------------------------------------ sampling: the rule
def _tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


def _through_the_rule(p: torch.Tensor, q: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    drafts = torch.multinomial(q.expand(n, -1), 1, replacement=True, generator=g)[:, 0]
    return speculative_accept(p.expand(n, -1), q.expand(n, -1), drafts, generator=g)


def _random_distribution(seed: int, vocab: int = 6, zeros: tuple[int, ...] = ()) -> torch.Tensor:
    w = torch.rand(vocab, generator=torch.Generator().manual_seed(seed)) ** 3     # uneven
    w[list(zeros)] = 0.0
    return w / w.sum()


@pytest.mark.parametrize("case", ["random", "q_misses_tokens_p_has", "p_misses_tokens_q_has"])
def test_speculative_accept_keeps_the_target_distribution(case):
    # 100,000 drafts from q through the rule: the tokens follow p (total variation < 0.01, about
    # 3.5x the sampling noise), not q, and the acceptance rate is sum(min(p, q)).
    zeros_p, zeros_q = {"random": ((), ()), "q_misses_tokens_p_has": ((), (0, 2)),
                        "p_misses_tokens_q_has": ((1, 5), ())}[case]
    p, q = _random_distribution(10, zeros=zeros_p), _random_distribution(11, zeros=zeros_q)
    assert _tv(p, q) > 0.2                                        # the test can tell p from q
    n = 100_000
    tokens, accepted = _through_the_rule(p, q, n, seed=0)
    empirical = torch.bincount(tokens, minlength=6).float() / n
    assert _tv(empirical, p) < 0.01
    assert float(accepted.float().mean()) == pytest.approx(float(torch.minimum(p, q).sum()), abs=0.01)
    assert torch.all(empirical[p == 0] == 0)                      # never a token p rules out


def test_speculative_accept_on_one_hot_distributions_is_argmax_agreement():
    # Greedy: p and q one-hot. Accept iff the argmaxes agree; either way the token is p's argmax.
    vocab = 5
    a, b = torch.meshgrid(torch.arange(vocab), torch.arange(vocab), indexing="ij")
    a, b = a.flatten(), b.flatten()
    p, q = nn.functional.one_hot(a, vocab).float(), nn.functional.one_hot(b, vocab).float()
    token, accepted = speculative_accept(p, q, b, generator=torch.Generator().manual_seed(0))
    assert torch.equal(token, a) and torch.equal(accepted, a == b)
    # token_distribution at temperature 0 is that one-hot, with the same argmax as sampling's.
    logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(token_distribution(logits, 0.0), nn.functional.one_hot(logits.argmax(-1), 9).float())


def test_speculative_accept_with_equal_distributions_accepts_everything():
    p = _random_distribution(12)
    tokens, accepted = _through_the_rule(p, p.clone(), 1000, seed=0)
    assert bool(accepted.all())


# ------------------------------------------------------------------ sampling: the loop
SMALL_VOCAB = 6


@cache
def _small_vocab_model() -> nn.Module:
    """One MHA layer over 6 tokens, weights wide enough (std 0.3) that the main model's and the
    MTP's distributions are far apart (total variation 0.47 on the second token, below)."""
    config = load_config("toy-dense", vocab_size=SMALL_VOCAB, num_hidden_layers=1, hidden_size=16,
                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=32,
                         max_position_embeddings=16, num_nextn_predict_layers=1, initializer_range=0.3,
                         **NO_SPECIAL_TOKENS)
    return build_model(config, seed=1).eval()


def test_sampled_tokens_follow_the_main_model_not_the_draft():
    # The second new token: drafted by the MTP, then accepted, or replaced from the residual. Its
    # distribution must be the main model's marginal sum_t1 p(t1) p(t2 | t1), from full forwards
    # without a cache, and not the draft's sum_t1 p(t1) q(t2 | t1). 400 seeded runs: the sampling
    # noise in total variation is about 0.04 (0.115 at most in 20,000 simulated repeats); the
    # draft's marginal sits 0.47 away.
    m, prompt, runs = _small_vocab_model(), torch.tensor([1, 4, 2]), 400
    with torch.no_grad():
        p1 = m(prompt[None])[0, -1].softmax(-1)                                      # (V,)
        seqs = torch.cat([prompt.expand(SMALL_VOCAB, -1), torch.arange(SMALL_VOCAB)[:, None]], dim=1)
        logits, aux = m(seqs, return_aux=True)                                        # row t1: prompt + t1
        p2 = logits[:, -1].softmax(-1)                                                # (V, V): p(t2 | t1)
        q2 = mtp_logits(m, aux["hidden"][:, :-1], seqs[:, 1:])[0][:, -1].softmax(-1)  # the MTP's draft
    target, draft = p1 @ p2, p1 @ q2
    assert _tv(target, draft) > 0.4
    seconds, accepted = [], 0
    for seed in range(runs):
        out, stats = speculative_generate(m, prompt, 2, temperature=1.0, seed=seed, return_stats=True)
        seconds.append(int(out[-1]))
        accepted += stats.accepted
        assert stats.drafted == stats.forwards == 1
    empirical = torch.bincount(torch.tensor(seconds), minlength=SMALL_VOCAB).float() / runs
    assert _tv(empirical, target) < 0.12
    # The acceptance rate is E_t1[sum min(p(. | t1), q(. | t1))] (0.455 here; noise about 0.025).
    assert accepted / runs == pytest.approx(float(p1 @ torch.minimum(p2, q2).sum(-1)), abs=0.12)


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    m, prompt = untrained("toy"), torch.tensor([5, 6, 7])
    a = speculative_generate(m, prompt, 12, temperature=1.3, seed=0)
    assert torch.equal(a, speculative_generate(m, prompt, 12, temperature=1.3, seed=0))
    assert not torch.equal(a, speculative_generate(m, prompt, 12, temperature=1.3, seed=1))
    assert torch.equal(speculative_generate(m, prompt, 12, temperature=1.3, top_k=1, seed=2),
                       generate(m, prompt[None], 12, temperature=0)[0])


# ------------------------------------------------------------------ the MTP's KV cache
@pytest.mark.parametrize("name,temperature", [("toy", 0.0), ("toy", 0.1), ("toy-mla", 0.1), ("toy-dense", 0.1)])
def test_cached_drafts_equal_an_uncached_mtp_chain(monkeypatch, name, temperature):
    # Greedy output cannot see a wrong draft (it only costs speed), so check the drafts themselves:
    # each one, made through the MTP's cache from the positions verified so far, equals the MTP
    # run without a cache over the whole verified prefix, at its last position. Sampled, the draft
    # is a full distribution, compared as such (at 0.1: at 1 the untrained model's p and q are so
    # flat that nearly every draft is accepted, and the reject path would go untested).
    m = untrained(name)
    drafts = []

    def spy(model, hidden, next_tokens, start_pos, mtp_cache, dist):
        q = real(model, hidden, next_tokens, start_pos, mtp_cache, dist)
        drafts.append((start_pos + hidden.shape[1], q))           # predicts the token at position end + 1
        return q

    real = generate_module._mtp_draft
    monkeypatch.setattr(generate_module, "_mtp_draft", spy)
    prompt = torch.tensor([3, 14, 15, 92, 65])
    out, stats = speculative_generate(m, prompt, 24, temperature=temperature, seed=3, return_stats=True)
    assert 0 < stats.accepted < stats.drafted                     # both cache-update paths ran
    assert len(drafts) >= stats.drafted and drafts[0][0] == len(prompt)
    assert all(a[0] < b[0] for a, b in zip(drafts, drafts[1:]))
    for end, q in drafts:
        assert end + 1 <= len(out)                                # the token after `end` was verified
        with torch.no_grad():
            hidden = m.hidden_states(out[None, :end])
            logits = mtp_logits(m, hidden, out[None, 1:end + 1])[0][:, -1]
        if temperature == 0:
            assert int(q.argmax()) == int(logits.argmax()) and float(q.max()) == 1.0
        else:
            torch.testing.assert_close(q, token_distribution(logits, temperature), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ mode and errors
def test_training_mode_is_restored_and_moe_counts_nothing():
    m = build_model(load_config("toy", **TRUNK, **MLA, **MOE), seed=0).train()
    speculative_generate(m, torch.tensor([1, 2, 3]), 6, temperature=1.0, seed=0)
    assert m.training and all(module.training for module in m.modules())
    assert len(moe_layers(m)) == 2                                # the trunk's and the MTP block's
    assert all(layer.tokens_per_expert.sum() == 0 for layer in moe_layers(m))    # eval: no load counted
    with pytest.raises(ValueError, match=r"temperature \(-1.0\) must be >= 0"):
        speculative_generate(m, torch.tensor([1, 2, 3]), 6, temperature=-1.0)
    assert m.training and all(module.training for module in m.modules())
    m.eval()
    speculative_generate(m, torch.tensor([1, 2, 3]), 3)
    assert not m.training


def test_training_mode_is_restored_after_an_error_in_the_loop(monkeypatch):
    m = untrained("toy-dense").train()

    def broken(model, *args):
        assert not model.training
        raise RuntimeError("boom")

    monkeypatch.setattr(generate_module, "_speculative_decode", broken)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            speculative_generate(m, torch.tensor([1, 2]), 3)
        assert m.training
    finally:
        m.eval()


def test_a_model_without_mtp_raises():
    m = build_model(load_config("toy-dense", **{**TRUNK, "num_nextn_predict_layers": 0}), seed=0)
    with pytest.raises(ValueError, match="num_nextn_predict_layers >= 1"):
        speculative_generate(m, torch.tensor([1, 2]), 3)


@pytest.mark.parametrize("prompt,pattern", [
    (torch.tensor([[1, 2, 3]]), r"one 1-D tensor of token ids, got \(1, 3\)"),
    ([1, 2, 3], r"one 1-D tensor of token ids, got list"),
    (torch.tensor([1.0, 2.0]), r"int64.*float32"),
    (torch.tensor([1, 260]), r"vocab_size=260\), got min 1, max 260"),
], ids=["2d", "list", "float", "id_too_big"])
def test_bad_prompt_raises(prompt, pattern):
    with pytest.raises(ValueError, match=pattern):
        speculative_generate(untrained("toy-dense"), prompt, 3)


def test_empty_prompt_raises_a_value_error():
    with pytest.raises(ValueError, match="non-empty"):
        speculative_generate(untrained("toy-dense"), torch.tensor([], dtype=torch.long), 3)
    with pytest.raises(ValueError, match="non-empty"):
        generate(untrained("toy-dense"), torch.zeros(1, 0, dtype=torch.long), 3)


def test_bad_lengths_and_temperature_raise():
    m = untrained("toy-dense")                                    # max_position_embeddings 64
    # the last step verifies positions up to prompt + max_new_tokens - 1: the same budget as generate's
    assert len(speculative_generate(m, torch.zeros(61, dtype=torch.long), 3)) == 64    # 61 + 3 = 64 fits
    with pytest.raises(ValueError, match=r"prompt length \(62\) \+ max_new_tokens \(3\) exceeds "
                                         r"max_position_embeddings \(64\)"):
        speculative_generate(m, torch.zeros(62, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"max_new_tokens \(-1\) must be >= 0"):
        speculative_generate(m, torch.tensor([1, 2]), -1)
    with pytest.raises(ValueError, match=r"temperature \(-0.5\) must be >= 0"):
        speculative_generate(m, torch.tensor([1, 2]), 3, temperature=-0.5)
    with pytest.raises(ValueError, match=r"temperature \(-0.5\) must be >= 0"):
        token_distribution(torch.zeros(3), -0.5)
