"""Tests for the passkey retrieval data (deepseek_mini.data) and scripts/yarn_passkey.py (chapter 07)."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch

from deepseek_mini.data import (PASSKEY_QUESTION, PASSKEY_SENTENCE, VOCAB_SIZE, passkey_batch, passkey_correct,
                                passkey_document)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "yarn_passkey.py"
OVERHEAD_5 = len(PASSKEY_SENTENCE.format(key="00000")) + len(PASSKEY_QUESTION) + 5


def load_script():
    spec = importlib.util.spec_from_file_location("yarn_passkey", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["yarn_passkey"] = module   # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------- the document
@pytest.mark.parametrize("n_tokens", [OVERHEAD_5, OVERHEAD_5 + 1, 128, 300, 512])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_document_has_exactly_n_tokens_and_ends_with_the_answer(n_tokens, depth):
    doc = passkey_document(random.Random(1), n_tokens, depth)
    assert len(doc.text) == len(doc.text.encode("utf-8")) == n_tokens   # ASCII: one byte token per character
    assert len(doc.answer) == 5 and doc.answer.isdigit()
    assert doc.text.endswith(PASSKEY_QUESTION + doc.answer)
    assert doc.prompt + doc.answer == doc.text
    assert doc.text.count(doc.answer) == 2   # hidden once, answered once: the filler has no digits
    assert sum(c.isdigit() for c in doc.text) == 10


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_key_sits_at_its_depth_in_the_filler(depth):
    n_tokens = 400
    doc = passkey_document(random.Random(2), n_tokens, depth)
    sentence = PASSKEY_SENTENCE.format(key=doc.answer)
    n_filler = n_tokens - OVERHEAD_5
    assert doc.key_start == round(depth * n_filler)
    assert doc.text[doc.key_start:doc.key_start + len(sentence)] == sentence
    before, after = doc.key_start, n_filler - doc.key_start   # filler characters on each side
    assert before + after == n_filler and abs(before / n_filler - depth) <= 1 / n_filler


def test_depth_zero_is_first_and_one_is_right_before_the_question():
    first = passkey_document(random.Random(0), 200, 0.0)
    last = passkey_document(random.Random(0), 200, 1.0)
    assert first.text.startswith(PASSKEY_SENTENCE.format(key=first.answer))
    assert last.text.endswith(PASSKEY_SENTENCE.format(key=last.answer) + PASSKEY_QUESTION + last.answer)


def test_digits_and_leading_zeros():
    docs = [passkey_document(random.Random(seed), 100, 0.5, digits=3) for seed in range(300)]
    assert all(len(d.answer) == 3 and d.text.endswith(d.answer) for d in docs)
    assert any(d.answer.startswith("0") for d in docs)   # zero-padded, not a 3-digit number >= 100
    assert len({d.answer for d in docs}) > 200


def test_same_seed_same_document_other_seed_other_document():
    assert passkey_document(random.Random(5), 256, 0.5) == passkey_document(random.Random(5), 256, 0.5)
    assert passkey_document(random.Random(5), 256, 0.5) != passkey_document(random.Random(6), 256, 0.5)
    a, pa = passkey_batch(random.Random(3), 4, 128)
    b, pb = passkey_batch(random.Random(3), 4, 128)
    assert torch.equal(a, b) and torch.equal(pa, pb)


@pytest.mark.parametrize("call, match", [
    (lambda: passkey_document(random.Random(0), 128, 1.5), r"depth \(1.5\) must be a number in \[0, 1\]"),
    (lambda: passkey_document(random.Random(0), 128, -0.1), r"depth \(-0.1\) must be a number in \[0, 1\]"),
    (lambda: passkey_document(random.Random(0), 128, True), r"depth \(True\)"),
    (lambda: passkey_document(random.Random(0), OVERHEAD_5 - 1, 0.5),
     rf"n_tokens \({OVERHEAD_5 - 1}\) is too small: a passkey document with 5 digits needs at least {OVERHEAD_5}"),
    (lambda: passkey_document(random.Random(0), 128, 0.5, digits=0), r"digits \(0\) must be a positive int"),
    (lambda: passkey_document(0, 128, 0.5), "rng must be a random.Random, got int"),
    (lambda: passkey_batch(random.Random(0), 0, 128), r"batch_size \(0\) must be a positive int"),
    (lambda: passkey_batch(random.Random(0), 2, 128, depth=2.0), r"depth \(2.0\) must be a number in \[0, 1\]"),
    (lambda: passkey_batch(random.Random(0), 2, 20), r"n_tokens \(20\) is too small"),
])
def test_bad_arguments_raise_one_line_errors(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------- the batch
def test_batch_tokens_are_the_documents_bytes_and_positions_the_answer():
    tokens, positions = passkey_batch(random.Random(4), 3, 150, depth=0.25, digits=4)
    assert tokens.shape == (3, 150) and tokens.dtype == torch.long
    assert positions.tolist() == [146, 147, 148, 149]
    rng = random.Random(4)
    for row in tokens:   # the same draws, one document at a time
        doc = passkey_document(rng, 150, 0.25, digits=4)
        assert bytes(row.tolist()).decode("ascii") == doc.text
        assert bytes(row[positions].tolist()).decode("ascii") == doc.answer


def test_batch_with_random_depths_spreads_the_key():
    tokens, _ = passkey_batch(random.Random(0), 32, 300)
    key_starts = [bytes(row.tolist()).decode("ascii").index("The pass key=") for row in tokens]
    assert min(key_starts) < 60 and max(key_starts) > 150


# ----------------------------------------------------------------- scoring
def one_hot_logits(tokens: torch.Tensor) -> torch.Tensor:
    """Logits of a perfect next-token model: position p puts its max on token p + 1."""
    logits = torch.zeros(*tokens.shape, VOCAB_SIZE)
    logits[:, :-1].scatter_(-1, tokens[:, 1:, None], 1.0)
    return logits


def test_correct_needs_every_digit_right():
    tokens, positions = passkey_batch(random.Random(0), 4, 100)
    logits = one_hot_logits(tokens)
    assert passkey_correct(logits, tokens, positions).tolist() == [True] * 4
    wrong = logits.clone()
    wrong[1, positions[2] - 1] = 0.0      # row 1: the third digit's prediction now prefers another digit
    wrong[1, positions[2] - 1, (tokens[1, positions[2]] - 48 + 1) % 10 + 48] = 5.0
    wrong[3, positions[-1] - 1] = 0.0     # row 3: the last digit's prediction now prefers another digit
    wrong[3, positions[-1] - 1, (tokens[3, positions[-1]] - 48 + 1) % 10 + 48] = 5.0
    assert passkey_correct(wrong, tokens, positions).tolist() == [True, False, True, False]


def test_correct_reads_the_logits_one_position_before_each_answer_token():
    tokens, positions = passkey_batch(random.Random(0), 2, 100)
    aligned = torch.zeros(*tokens.shape, VOCAB_SIZE)   # max AT the answer positions: off by one
    aligned.scatter_(-1, tokens[..., None], 1.0)
    assert passkey_correct(aligned, tokens, positions).tolist() == [False, False]


def test_correct_equals_greedy_decoding_with_a_hand_made_model():
    """A model that copies the token 2 places back: teacher-forced scoring and greedy decoding agree."""
    tokens = torch.tensor([[5, 5, 1, 2, 1, 2, 1, 2], [5, 5, 1, 2, 1, 2, 1, 3]])
    positions = torch.tensor([6, 7])

    def model(x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*x.shape, VOCAB_SIZE)
        logits[:, 1:].scatter_(-1, x[:, :-1, None], 1.0)   # position p predicts x[p - 1] as x[p + 1]
        return logits

    scored = passkey_correct(model(tokens), tokens, positions)
    greedy = []
    for row in tokens:
        seq = row[:6].clone()
        for _ in range(2):
            seq = torch.cat([seq, model(seq[None])[0, -1].argmax()[None]])
        greedy.append(torch.equal(seq[6:], row[6:]))
    assert scored.tolist() == greedy == [True, False]


@pytest.mark.parametrize("logits, tokens, positions, match", [
    (torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.long), [3], r"logits \(2, 5\) must be \(B, T, V\)"),
    (torch.zeros(2, 5, 9), torch.zeros(2, 4, dtype=torch.long), [3], r"for tokens \(B, T\) \(2, 4\)"),
    (torch.zeros(2, 5, 9), torch.zeros(2, 5, dtype=torch.long), [0, 1], r"positions in \[1, 5\), got \[0, 1\]"),
    (torch.zeros(2, 5, 9), torch.zeros(2, 5, dtype=torch.long), [5], r"got \[5\]"),
    (torch.zeros(2, 5, 9), torch.zeros(2, 5, dtype=torch.long), [], r"got \[\]"),
])
def test_correct_rejects_bad_shapes(logits, tokens, positions, match):
    with pytest.raises(ValueError, match=match):
        passkey_correct(logits, tokens, torch.tensor(positions, dtype=torch.long))


# ----------------------------------------------------------------- the script, end to end
def test_script_pipeline_end_to_end_at_a_tiny_size(tmp_path, capsys):
    """Every method, fine-tune, grid, loss curves, JSON and checkpoint, in seconds: the script cannot rot."""
    yp = load_script()
    out, ckpt, pre = tmp_path / "r.json", tmp_path / "toy.pt", tmp_path / "pre.pt"
    argv = ["--seeds", "0", "1", "--context", "72", "--factor", "2", "--digits", "1", "--pretrain-steps", "2",
            "--finetune-steps", "1", "--samples", "2", "--lengths", "1", "3", "--out", str(out),
            "--checkpoint", str(ckpt), "--pretrained-checkpoint", str(pre), "--threads", "1"]
    tiny = dict(n_docs=80, pretrain_batch=2, finetune_batch=2, ppl_windows=2, eval_batch=2, depths=(0.0, 1.0))
    assert yp.main(argv, **tiny) == 0
    results = json.loads(out.read_text())
    assert results["settings"]["eval_lengths"] == [72, 216]
    assert results["rope_scaling"]["yarn"]["original_max_position_embeddings"] == 72
    assert set(results["finetuned"]) == set(results["no_finetune"]) == set(yp.METHODS)
    for method in yp.METHODS:
        runs = results["finetuned"][method]["per_seed"]
        assert len(runs) == 2 and len(runs[0]["grid"]) == 2 and len(runs[0]["grid"][0]) == 2
        assert all(0 <= a <= 1 for row in runs[0]["grid"] for a in row)
        summary = results["finetuned"][method]["summary"]
        assert len(summary["grid"]) == 2 and set(summary["ppl"][0]) == {"mean", "std", "min", "max"}
        assert len(results["finetuned"][method]["finetune_losses"][0]) == 1
    assert results["environment"]["torch"] == torch.__version__ and results["wall_s"] > 0
    model = yp.load_checkpoint(ckpt, max_len=216)
    assert model.config.rope_scaling["type"] == "yarn" and model.config.max_position_embeddings == 216
    tokens, positions = passkey_batch(random.Random(0), 2, 216, 0.5, digits=1)
    assert passkey_correct(model(tokens), tokens, positions).shape == (2,)
    assert "wall time" in capsys.readouterr().out
    # fine-tuning the saved pretrained toy gives the same fine-tunes as the run that pretrained it
    again = tmp_path / "again.json"
    assert yp.main([*argv[:-8], "--out", str(again), "--checkpoint", "none", "--pretrained-checkpoint", "none",
                    "--pretrained", str(pre), "--threads", "1"], **tiny) == 0
    assert json.loads(again.read_text())["finetuned"] == results["finetuned"]
    # seed 0 from scratch + seed 1 from its pretrained checkpoint, merged == the seeds 0 1 run
    first, second = tmp_path / "s0.json", tmp_path / "s1.json"
    one_seed = ["--context", "72", "--factor", "2", "--digits", "1", "--pretrain-steps", "2", "--finetune-steps", "1",
                "--samples", "2", "--lengths", "1", "3", "--threads", "1", "--checkpoint", "none"]
    assert yp.main(["--seeds", "0", "--out", str(first), "--pretrained-checkpoint", str(pre), *one_seed], **tiny) == 0
    assert yp.main(["--seeds", "1", "--out", str(second), "--pretrained-checkpoint", "none", "--pretrained", str(pre),
                    *one_seed], **tiny) == 0
    assert yp.main(["--out", str(first), "--merge", str(second)], **tiny) == 0
    merged = json.loads(first.read_text())
    assert merged["settings"]["seeds"] == [0, 1] and merged["seeds_done"] == 2
    assert merged["finetuned"] == results["finetuned"]
    assert merged["pretrain"]["accuracy_curve"] == results["pretrain"]["accuracy_curve"]
    with pytest.raises(ValueError, match=r"share seeds \[1\]"):
        yp.merge_results(merged, json.loads(second.read_text()))
    assert yp.main(["--out", str(tmp_path / "missing.json"), "--merge", str(second)]) == 2


def test_script_help_and_bad_settings():
    yp = load_script()
    with pytest.raises(SystemExit) as info:
        yp.parse_args(["--help"])
    assert info.value.code == 0
    settings, _ = yp.parse_args(["--factor", "1"])
    with pytest.raises(ValueError, match=r"factor \(1\) must be >= 2"):
        yp.check_settings(settings)
    with pytest.raises(ValueError, match="unknown method 'rope'"):
        yp.rope_scaling_for("rope", settings)
    settings, _ = yp.parse_args(["--pretrain-lr", "0.01"])
    assert settings.pretrain_lr == 0.01
    settings, _ = yp.parse_args(["--pretrain-lr", "0"])
    with pytest.raises(ValueError, match=r"pretrain_lr \(0.0\) must be a learning rate"):
        yp.check_settings(settings)


# ----------------------------------------------------------------- the committed results
COMMITTED = SCRIPT.parent.parent / "notebooks" / "data" / "yarn_passkey.json"


@pytest.mark.skipif(not COMMITTED.is_file(), reason="no committed results")
def test_committed_results_come_from_the_defaults_and_learnt_retrieval():
    """The notebook plots this file: it must be what the script's defaults make, and the pretrained
    toy must retrieve the key at L (else the needle-in-a-haystack grid is chance everywhere)."""
    yp = load_script()
    results = json.loads(COMMITTED.read_text())
    defaults, _ = yp.parse_args([])
    saved = {k: v for k, v in results["settings"].items() if k not in ("eval_lengths", "seeds")}
    expected = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(defaults).items() if k != "seeds"}
    assert saved == expected
    assert results["pretrain"]["accuracy_curve"][-1]["accuracy_at_L"] >= 0.9
    assert results["no_finetune"]["none"]["accuracy_by_length"][0] >= 0.9   # plain RoPE at L: learnt
    for method in yp.METHODS:
        assert {"grid", "accuracy_by_length", "ppl"} <= set(results["finetuned"][method]["summary"])
