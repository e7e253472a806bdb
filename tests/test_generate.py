"""Sampling filters on hand examples, and generate() against an independent cache-free loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepseek_mini import build_model, load_config
from deepseek_mini.generate import generate, sample_next_token, top_k_filter, top_p_filter
from deepseek_mini.moe import moe_layers

TINY = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)
NEG_INF = float("-inf")


@pytest.fixture(scope="module")
def model():
    return build_model(load_config("toy-dense", **TINY), seed=0).eval()


def kept(filtered: torch.Tensor) -> list[int]:
    return torch.isfinite(filtered).nonzero().flatten().tolist()


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.0, 0.5])
    out = top_k_filter(logits, 2)
    assert kept(out) == [1, 3]
    assert out[1] == 3.0 and out[3] == 2.0                      # kept values unchanged
    assert kept(top_k_filter(logits, 1)) == [1]
    assert kept(top_k_filter(logits, 5)) == [0, 1, 2, 3, 4]
    assert kept(top_k_filter(logits, 50)) == [0, 1, 2, 3, 4]    # k > V keeps everything


def test_top_k_keeps_ties_and_works_per_row():
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0], [4.0, 3.0, 2.0, 1.0]])
    out = top_k_filter(logits, 1)
    assert torch.equal(torch.isfinite(out), torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool))


@pytest.mark.parametrize("p,n_kept", [(0.7, 2), (0.5, 1), (1.0, 4), (0.8, 2), (0.81, 3), (0.3, 1), (0.96, 4)])
def test_top_p_on_hand_example(p, n_kept):
    # Probabilities 0.5, 0.3, 0.15, 0.05 in shuffled order: smallest set whose mass reaches p.
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    order_by_prob = [1, 3, 0, 2]
    out = top_p_filter(probs.log(), p)
    assert sorted(kept(out)) == sorted(order_by_prob[:n_kept])
    torch.testing.assert_close(out[torch.isfinite(out)], probs.log()[torch.isfinite(out)])


def test_top_p_keeps_ties_and_works_per_row():
    logits = torch.tensor([[0.4, 0.4, 0.2], [0.2, 0.2, 0.6]]).log()
    out = top_p_filter(logits, 0.5)
    assert torch.equal(torch.isfinite(out), torch.tensor([[1, 1, 0], [0, 0, 1]], dtype=torch.bool))


@pytest.mark.parametrize("k", [0, -1])
def test_bad_top_k_raises(k):
    with pytest.raises(ValueError, match=rf"top_k \({k}\)"):
        top_k_filter(torch.zeros(4), k)


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5])
def test_bad_top_p_raises(p):
    with pytest.raises(ValueError, match=rf"top_p \({p}\)"):
        top_p_filter(torch.zeros(4), p)


def test_temperature_zero_is_argmax_and_negative_raises():
    torch.manual_seed(0)
    logits = torch.randn(5, 30)
    assert torch.equal(sample_next_token(logits, temperature=0.0), logits.argmax(-1))
    # top_k=1 sampling at any temperature is also the argmax.
    assert torch.equal(sample_next_token(logits, 1.3, top_k=1), logits.argmax(-1))
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(logits, temperature=-1.0)


def test_sampling_only_draws_kept_tokens_with_the_right_frequencies():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits, 1.0, top_p=0.7, generator=gen)
    assert set(draws.tolist()) == {0, 1}
    assert (draws == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)
    draws = sample_next_token(logits, 1.0, generator=gen)
    assert (draws == 3).float().mean().item() == pytest.approx(0.05, abs=0.015)


def greedy_reference(model: nn.Module, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """n full forwards without a cache, argmax of the last position each time."""
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq


@pytest.mark.parametrize("prompt_len", [1, 5])
def test_greedy_generate_equals_cache_free_loop(model, prompt_len):
    prompt = torch.randint(0, 260, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    out = generate(model, prompt, max_new_tokens=12, temperature=0.0)
    assert out.shape == (2, prompt_len + 12)
    assert torch.equal(out[:, :prompt_len], prompt)
    assert torch.equal(out, greedy_reference(model, prompt, 12))


def test_seeded_sampling_is_reproducible(model):
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    a = generate(model, prompt, 15, temperature=1.5, seed=0)
    b = generate(model, prompt, 15, temperature=1.5, seed=0)
    c = generate(model, prompt, 15, temperature=1.5, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(generate(model, prompt, 15, top_k=5, top_p=0.9, seed=2),
                       generate(model, prompt, 15, top_k=5, top_p=0.9, seed=2))


class Scripted(nn.Module):
    """A stand-in model: row b emits script[b][i] as its i-th new token (one-hot logits)."""

    def __init__(self, script: list[list[int]], vocab: int = 10) -> None:
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, 0
        self.config = load_config("toy-dense", **TINY)

    def new_cache(self, batch_size, max_len=None):
        return None

    def forward(self, tokens, start_pos=0, cache=None):
        step = self.calls
        self.calls += 1
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], self.vocab)
        for b, row in enumerate(self.script):
            logits[b, -1, row[min(step, len(row) - 1)]] = 10.0
        return logits


def test_stop_token_pads_finished_rows_and_others_continue():
    STOP = 9
    script = [[3, 4, STOP, 5, 6, 7], [1, 2, 3, 4, 5, 6]]
    prompt = torch.tensor([[7, 7], [8, 8]])
    out = generate(Scripted(script), prompt, max_new_tokens=6, temperature=0.0, stop_token=STOP)
    assert out.tolist() == [[7, 7, 3, 4, STOP, STOP, STOP, STOP], [8, 8, 1, 2, 3, 4, 5, 6]]


def test_generation_ends_when_every_row_has_stopped():
    STOP = 9
    script = [[3, STOP, 1, 1], [STOP, 2, 2, 2]]
    model = Scripted(script)
    out = generate(model, torch.tensor([[0], [0]]), max_new_tokens=10, temperature=0.0, stop_token=STOP)
    assert out.tolist() == [[0, 3, STOP], [0, STOP, STOP]]
    assert model.calls == 2                    # prefill + one decode step, then it stopped


def test_several_stop_tokens_end_each_row_at_its_first_one():
    # An answer ends with a newline or with EOS: either finishes the row, padding uses the first id.
    NL, EOS = 8, 9
    script = [[3, EOS, 1, 1], [2, NL, 1, 1], [1, 2, 3, 4]]
    model = Scripted(script)
    out = generate(model, torch.tensor([[0], [0], [0]]), 4, temperature=0.0, stop_token=(NL, EOS))
    assert out.tolist() == [[0, 3, EOS, NL, NL], [0, 2, NL, NL, NL], [0, 1, 2, 3, 4]]
    seqs = generate(_always_says(258), [torch.tensor([1, 2, 3]), torch.tensor([4])], 5, temperature=0.0,
                    stop_token=[ord("\n"), 258])                       # a ragged batch ends at EOS too
    assert [s.tolist() for s in seqs] == [[1, 2, 3, 258], [4, 258]]


@pytest.mark.parametrize("bad", [-1, 260, (), [8, 260], 2.5, ("a",)])
def test_bad_stop_token_is_one_line(bad):
    with pytest.raises(ValueError, match=r"stop_token must be a token id in \[0, 260\)"):
        generate(Scripted([[1]]), torch.tensor([[0]]), 2, temperature=0.0, stop_token=bad)


def _always_says(token: int) -> nn.Module:
    """A real toy model whose head is rigged: zero weights plus a bias on ``token``, so every
    position's argmax is ``token``."""
    m = build_model(load_config("toy-dense", **TINY), seed=0).eval()
    with torch.no_grad():
        m.head.weight.zero_()
    bias = torch.zeros(260)
    bias[token] = 1.0
    m.head = nn.Sequential(m.head, _AddBias(bias))
    return m


def test_stop_token_with_a_real_model_whose_head_is_rigged():
    # Zero head + a bias on token 258 (eos): every position's argmax is 258, so greedy
    # decoding stops after one token even though 5 were allowed.
    m = _always_says(258)
    out = generate(m, torch.tensor([[1, 2, 3], [4, 5, 6]]), max_new_tokens=5, temperature=0.0, stop_token=258)
    assert out.tolist() == [[1, 2, 3, 258], [4, 5, 6, 258]]
    # Without a stop token the same model fills all 5 positions.
    assert generate(m, torch.tensor([[1, 2, 3]]), 5, temperature=0.0).tolist() == [[1, 2, 3] + [258] * 5]


class _AddBias(nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.register_buffer("bias", bias)

    def forward(self, x):
        return x + self.bias


def test_max_new_tokens_zero_returns_the_prompt(model):
    prompt = torch.tensor([[5, 6, 7]])
    assert torch.equal(generate(model, prompt, 0), prompt)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, -1)


@pytest.mark.parametrize("prompt,pattern", [
    (torch.tensor([[1.0, 2.0]]), r"int64.*float32"),
    (torch.tensor([1, 2, 3]), r"\(batch, length\).*\(3,\)"),
    (torch.zeros(1, 2, 3, dtype=torch.long), r"\(batch, length\)"),
    ([], r"list of non-empty 1-D int64 tensors; the list is empty"),
    ([torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)], r"item 1 is not"),
    ([torch.tensor([1, 2]), torch.tensor([[3]])], r"item 1 is not"),
    ([torch.tensor([1.0])], r"item 0 is not"),
    (torch.tensor([[1, 260]]), r"vocab_size=260\), got min 1, max 260"),
    ([torch.tensor([5]), torch.tensor([-1, 2])], r"vocab_size=260\), got min -1"),
], ids=["float", "1d", "3d", "empty_list", "empty_prompt", "2d_item", "float_item", "id_too_big", "negative_id"])
def test_bad_prompt_raises(model, prompt, pattern):
    with pytest.raises(ValueError, match=pattern):
        generate(model, prompt, 3)


def test_generation_beyond_the_context_raises(model):
    with pytest.raises(ValueError, match=r"prompt length \(60\) \+ max_new_tokens \(10\) exceeds max_position_embeddings \(64\)"):
        generate(model, torch.zeros(1, 60, dtype=torch.long), 10)
    with pytest.raises(ValueError, match=r"prompt length \(60\)"):
        generate(model, [torch.zeros(3, dtype=torch.long), torch.zeros(60, dtype=torch.long)], 10)


# ------------------------------------------------------------------ ragged batches, log-probs, mode
@pytest.fixture(scope="module")
def toy():
    """The toy preset (MLA + DeepSeekMoE) with fewer positions: what GRPO will sample from."""
    return build_model(load_config("toy", max_position_embeddings=64), seed=0).eval()


RAGGED = [[257, 49, 50, 43], [257, 115, 111, 114, 116, 58, 32, 57, 32, 52], [257], [257, 116, 104, 101, 32]]


@pytest.mark.parametrize("name", ["toy", "dense"])
def test_greedy_ragged_batch_equals_each_prompt_alone(name, toy, model):
    # Right-padded into one batch, each row at its own positions and cache slots: greedy output
    # and log-probs equal each prompt generated alone. MoE layers see other rows' tokens in the
    # same dispatch call, which changes no row's math.
    m = toy if name == "toy" else model
    prompts = [torch.tensor(p) for p in RAGGED]
    batched, logps = generate(m, prompts, 8, temperature=0, return_logprobs=True)
    assert isinstance(batched, list) and [len(s) for s in batched] == [len(p) + 8 for p in prompts]
    for prompt, seq, lp in zip(prompts, batched, logps):
        alone, alone_lp = generate(m, [prompt], 8, temperature=0, return_logprobs=True)
        assert torch.equal(seq, alone[0]) and torch.equal(seq[:len(prompt)], prompt)
        torch.testing.assert_close(lp, alone_lp[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(seq, generate(m, prompt[None], 8, temperature=0)[0])   # the (B, T) path agrees


@pytest.mark.parametrize("temperature", [0.0, 1.3])
def test_returned_logprobs_equal_a_full_forward(toy, temperature):
    prompts = [torch.tensor(p) for p in RAGGED]
    seqs, logps = generate(toy, prompts, 6, temperature=temperature, top_k=20, seed=0, return_logprobs=True)
    for prompt, seq, lp in zip(prompts, seqs, logps):
        with torch.no_grad():
            full = toy(seq[None])[0].float().log_softmax(-1)           # the model's own distribution
        n = len(prompt)
        expected = full[n - 1:-1].gather(1, seq[n:, None])[:, 0]
        assert lp.shape == (len(seq) - n,)
        torch.testing.assert_close(lp, expected, rtol=1e-4, atol=1e-4)


def test_logprobs_of_the_tensor_path_and_after_a_stop():
    STOP = 9
    script = [[3, STOP, 1, 1], [1, 2, 3, 4]]
    out, logps = generate(Scripted(script), torch.tensor([[0], [0]]), 4, temperature=0, stop_token=STOP,
                          return_logprobs=True)
    assert out.tolist() == [[0, 3, STOP, STOP, STOP], [0, 1, 2, 3, 4]]
    assert logps.shape == (2, 4) and torch.all(logps[0, 2:] == 0.0)      # padding after a stop is certain
    expected = torch.tensor([10.0] + [0.0] * 9).log_softmax(-1)[0]         # one-hot logits of 10
    torch.testing.assert_close(logps[1], expected.expand(4))


def test_ragged_rows_end_at_their_own_stop_token():
    m = _always_says(258)
    seqs = generate(m, [torch.tensor([1, 2, 3]), torch.tensor([4])], 5, temperature=0, stop_token=258)
    assert [s.tolist() for s in seqs] == [[1, 2, 3, 258], [4, 258]]


def test_generate_restores_training_mode_so_moe_keeps_counting():
    m = build_model(load_config("toy", max_position_embeddings=64), seed=0).train()
    generate(m, torch.tensor([[257, 1, 2]]), 3, temperature=0)
    assert m.training and all(layer.training for layer in m.modules())
    assert all(layer.tokens_per_expert.sum() == 0 for layer in moe_layers(m))    # generation counted nothing
    m(torch.tensor([[257, 1, 2]]))
    assert all(layer.tokens_per_expert.sum() == 3 * 4 for layer in moe_layers(m))  # training counts again
    m.eval()
    generate(m, [torch.tensor([257, 1])], 2, temperature=0)
    assert not m.training


def test_generate_restores_training_mode_on_error():
    class Broken(Scripted):
        def forward(self, tokens, start_pos=0, cache=None):
            assert not self.training
            raise RuntimeError("boom")

    m = Broken([[1]]).train()
    with pytest.raises(RuntimeError, match="boom"):
        generate(m, torch.tensor([[0]]), 3)
    assert m.training
