"""Tests for deepseek_mini.data: tokenizer, synthetic corpus, streams, batchers, baseline."""

from __future__ import annotations

import math
import random
import re
from collections import Counter

import pytest
import torch

from deepseek_mini.data import (BOS_ID, DOMAINS, EOS_ID, PAD_ID, SEP_ID, SPECIAL_TOKENS, VOCAB_SIZE, Batcher,
                                ByteTokenizer, Document, TokenStream, eval_batches, generate_document,
                                load_text_file, make_datasets, synthetic_corpus, tokenize_documents,
                                train_val_split, unigram_entropy)


@pytest.fixture(scope="module")
def corpus() -> list[Document]:
    return synthetic_corpus(200, seed=0)


@pytest.fixture(scope="module")
def stream(corpus) -> TokenStream:
    return tokenize_documents(corpus)


def lines_of(corpus, domain):
    return [line for d in corpus if d.domain == domain for line in d.text.split("\n")]


# ----------------------------------------------------------------- tokenizer
def test_specials_and_vocab_size():
    assert (PAD_ID, BOS_ID, EOS_ID, SEP_ID, VOCAB_SIZE) == (256, 257, 258, 259, 260)
    assert ByteTokenizer().vocab_size == VOCAB_SIZE
    assert sorted(SPECIAL_TOKENS.values()) == [256, 257, 258, 259]


@pytest.mark.parametrize("text", ["hello world", "37+48=85\n", "héllo — 日本語 🙂", ""])
def test_encode_decode_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID and len(ids) == len(text.encode("utf-8")) + 2
    assert all(0 <= i < VOCAB_SIZE for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text


def test_decode_specials_and_invalid_utf8():
    tok = ByteTokenizer()
    assert tok.decode([BOS_ID, 104, 105, EOS_ID], skip_special=False) == "<|bos|>hi<|eos|>"
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"  # a cut multi-byte char is replaced


def test_decode_out_of_range_raises():
    with pytest.raises(ValueError, match=r"token id 300 at position 1 is outside \[0, 260\)"):
        ByteTokenizer().decode([65, 300])
    with pytest.raises(ValueError, match="token id -1"):
        ByteTokenizer().decode(torch.tensor([-1]))


# ----------------------------------------------------------------- synthetic corpus
def test_corpus_is_deterministic_per_seed():
    assert synthetic_corpus(40, seed=3) == synthetic_corpus(40, seed=3)
    assert synthetic_corpus(40, seed=3) != synthetic_corpus(40, seed=4)


def test_every_domain_present_and_balanced(corpus):
    counts = Counter(d.domain for d in corpus)
    assert set(counts) == set(DOMAINS)
    assert all(counts[d] == len(corpus) // len(DOMAINS) for d in DOMAINS)
    assert [d.domain for d in corpus[:8]] != list(DOMAINS) * 2  # shuffled, not cycled in order


def test_documents_are_ascii_multiline_without_blank_lines(corpus):
    for doc in corpus:
        assert doc.text.isascii()
        assert 4 <= len(doc.text.split("\n")) <= 10
        assert "\n\n" not in doc.text


def test_arithmetic_lines_are_correct(corpus):
    lines = lines_of(corpus, "arithmetic")
    assert len(lines) > 100
    for line in lines:
        a, op, b, c = re.fullmatch(r"(\d+)([+\-*])(\d+)=(\d+)", line).groups()
        assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c), line


def test_sort_lines_are_correct(corpus):
    for line in lines_of(corpus, "sort"):
        op, args, answer = re.fullmatch(r"(sort|max|reverse): ([\d ]+) -> ([\d ]+)", line).groups()
        xs, ys = [int(v) for v in args.split()], [int(v) for v in answer.split()]
        assert ys == {"sort": sorted(xs), "max": [max(xs)], "reverse": xs[::-1]}[op], line


def test_code_function_names_encode_their_constant(corpus):
    for doc in (d for d in corpus if d.domain == "code"):
        for fn in re.split(r"\n(?=def )", doc.text):
            k = re.match(r"def [a-z_]+_(\d+)\(", fn).group(1)
            assert re.search(rf"[ *>+-] {k}\b|return {k}$", fn, re.M), fn
            compile(fn, "<code>", "exec")  # valid Python


def test_unknown_domain_raises():
    with pytest.raises(ValueError, match=r"unknown domain 'poetry'; valid domains are \('arithmetic'"):
        generate_document("poetry", random.Random(0))
    with pytest.raises(ValueError, match="unknown domain"):
        synthetic_corpus(10, domains=("sort", "poetry"))
    with pytest.raises(ValueError, match=r"n_docs \(0\) must be a positive int"):
        synthetic_corpus(0)


# ----------------------------------------------------------------- streams and splits
def test_stream_tokens_and_domains_aligned(corpus, stream):
    assert stream.tokens.dtype == stream.domains.dtype == torch.int64
    assert stream.tokens.shape == stream.domains.shape and len(stream) == stream.tokens.numel()
    assert stream.domain_names == DOMAINS
    pos = 0
    for doc in corpus:
        n = len(doc.text.encode("utf-8")) + 2
        assert stream.tokens[pos] == BOS_ID and stream.tokens[pos + n - 1] == EOS_ID
        assert (stream.domains[pos:pos + n] == DOMAINS.index(doc.domain)).all()
        pos += n
    assert pos == len(stream)


def test_train_val_split_disjoint_complete_stratified(corpus):
    train, val = train_val_split(corpus, val_fraction=0.1, seed=0)
    assert Counter(train) + Counter(val) == Counter(corpus)
    assert not set(train) & set(val)
    assert {d.domain for d in val} == set(DOMAINS)
    assert len(val) == 20
    few = [Document("x", "a"), Document("y", "a"), Document("z", "b")]
    assert [d.domain for d in train_val_split(few, 0.1)[1]] == ["a"]  # >= 1 per domain with >= 2 docs


@pytest.mark.parametrize("bad", [1.5, 0, 1.0, -0.1, True])
def test_bad_val_fraction_raises(corpus, bad):
    with pytest.raises(ValueError, match=r"val_fraction \(.*\) must be in \(0, 1\)"):
        train_val_split(corpus, val_fraction=bad)


# ----------------------------------------------------------------- batching
def test_batcher_shapes_shift_and_domains(stream):
    x, y, dom = Batcher(stream, batch_size=4, seq_len=32, seed=0).next_batch()
    assert x.shape == y.shape == dom.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y, row_d in zip(x, y, dom):  # y is the stream continuation of x
        starts = [s for s in range(len(stream) - 32) if torch.equal(stream.tokens[s:s + 32], row_x)]
        assert any(torch.equal(stream.tokens[s + 1:s + 33], row_y)
                   and torch.equal(stream.domains[s + 1:s + 33], row_d) for s in starts)


def test_batcher_determinism_and_exact_resume(stream):
    a, b = Batcher(stream, 4, 16, seed=7), Batcher(stream, 4, 16, seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.next_batch(), b.next_batch()))
    other = Batcher(stream, 4, 16, seed=8)
    assert not torch.equal(other.next_batch()[0], Batcher(stream, 4, 16, seed=7).next_batch()[0])

    batcher = Batcher(stream, 4, 16, seed=1)
    for _ in range(3):
        batcher.next_batch()
    state = batcher.state_dict()
    expected = [batcher.next_batch() for _ in range(2)]
    fresh = Batcher(stream, 4, 16, seed=123)
    fresh.load_state_dict(state)
    for want, got in zip(expected, [fresh.next_batch() for _ in range(2)]):
        assert all(torch.equal(p, q) for p, q in zip(want, got))


def test_batcher_rejects_mismatched_state(stream):
    state = Batcher(stream, 4, 16).state_dict()
    with pytest.raises(ValueError, match=r"state\['seq_len'\] \(16\) must equal"):
        Batcher(stream, 4, 8).load_state_dict(state)


def test_seq_len_too_large_and_bad_sizes_raise():
    tiny = tokenize_documents([Document("abc", "sort")])  # 5 tokens
    with pytest.raises(ValueError, match="stream has 5 tokens and seq_len must be < 5"):
        Batcher(tiny, 2, 5)
    with pytest.raises(ValueError, match="stream has 5 tokens and seq_len must be < 5"):
        eval_batches(tiny, 2, 8)
    with pytest.raises(ValueError, match=r"batch_size \(0\) must be a positive int"):
        Batcher(tiny, 0, 2)
    with pytest.raises(ValueError, match=r"seq_len \(2.5\) must be a positive int"):
        eval_batches(tiny, 1, 2.5)


def test_eval_batches_deterministic_and_non_overlapping(stream):
    first, second = eval_batches(stream, 8, 64), eval_batches(stream, 8, 64)
    assert len(first) == len(second) and all(
        torch.equal(p, q) for bf, bs in zip(first, second) for p, q in zip(bf, bs))
    ys = torch.cat([y for _, y, _ in first]).flatten()
    n_windows = (len(stream) - 1) // 64
    assert ys.numel() == n_windows * 64
    assert torch.equal(ys, stream.tokens[1:1 + ys.numel()])  # consecutive targets, each once
    assert all(x.shape[0] == 8 for x, _, _ in first[:-1])

    capped = eval_batches(stream, 8, 64, max_batches=2)  # 16 windows spread over the stream
    starts = [s for x, _, _ in capped for row in x
              for s in range(0, len(stream) - 64, 64) if torch.equal(stream.tokens[s:s + 64], row)]
    assert len(capped) == 2 and len(starts) == 16 == len(set(starts))
    assert starts == sorted(starts) and starts[0] == 0 and starts[-1] == (n_windows - 1) * 64


# ----------------------------------------------------------------- baseline and files
def test_unigram_entropy_by_hand(stream):
    assert unigram_entropy(torch.tensor([0, 0, 1, 1])) == pytest.approx(math.log(2))
    assert unigram_entropy([5, 6, 7, 5]) == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert unigram_entropy(torch.full((10,), 3)) == 0.0
    assert 0 < unigram_entropy(stream) < math.log(VOCAB_SIZE)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 260\)"):
        unigram_entropy([0, 260])


def test_load_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first paragraph\nline two\n\n  \n\nsecond — ünïcode\n\n\n    indented\n", encoding="utf-8")
    docs = load_text_file(path, domain="notes")
    assert docs == [Document("first paragraph\nline two", "notes"), Document("second — ünïcode", "notes"),
                    Document("    indented", "notes")]
    train, val = make_datasets(path, val_fraction=0.3)
    assert train.domain_names == val.domain_names == ("text",) and len(train) > len(val) > 0


def test_load_text_file_errors(tmp_path):
    with pytest.raises(ValueError, match="missing.txt' does not exist"):
        load_text_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="empty.txt' is empty"):
        load_text_file(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt' is not valid UTF-8"):
        load_text_file(tmp_path / "latin1.txt")
    with pytest.raises(ValueError, match="is not a regular file"):
        load_text_file(tmp_path)


def test_synthetic_corpus_round_trips_through_a_text_file(tmp_path, corpus):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(d.text for d in corpus))
    assert [d.text for d in load_text_file(path)] == [d.text for d in corpus]


def test_make_datasets_small():
    train, val = make_datasets(n_docs=80, seed=1)
    assert train.domain_names == val.domain_names == DOMAINS
    assert set(val.domains.unique().tolist()) == set(range(len(DOMAINS)))
    assert len(train) > len(val) > 0
    assert torch.equal(make_datasets(n_docs=80, seed=1)[0].tokens, train.tokens)
