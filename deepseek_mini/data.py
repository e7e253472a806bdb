"""Data for every chapter: a byte-level tokenizer and a seeded, multi-domain synthetic corpus.

Why bytes. DeepSeek-V3 uses a byte-level BPE tokenizer with a 128K vocabulary (arXiv
2412.19437 §4.1). Training one would tie every chapter to a particular corpus; raw bytes
(256 ids) plus four special tokens give a 260-token vocabulary that needs no training, so
each chapter stands alone. The price is longer sequences, which a toy model can afford.

Why synthetic. The course machines reach package registries only, so nothing is downloaded
at run time; the corpus is generated from a seed, identically everywhere. It mixes four
domains of clearly different structure, and every document (and every token) carries its
domain label, so later chapters can measure per-domain behaviour: which experts a domain
uses (chapter 03), where predicting two tokens ahead helps (chapter 04), which answers are
verifiably right (chapter 08).

* ``arithmetic``: ``37+48=85`` lines, always correct;
* ``grammar``: sentences from a small English-like grammar;
* ``code``: Python-like functions whose names encode what they compute;
* ``sort``: ``sort: 5 3 9 1 -> 1 3 5 9`` list tasks, always correct.

A user's own text file works too (``load_text_file``): documents are split at blank lines.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

__all__ = ["PAD_ID", "BOS_ID", "EOS_ID", "SEP_ID", "VOCAB_SIZE", "SPECIAL_TOKENS", "DOMAINS",
           "ByteTokenizer", "Document", "generate_document", "synthetic_corpus", "load_text_file",
           "TokenStream", "tokenize_documents", "train_val_split", "Batcher", "eval_batches",
           "unigram_entropy", "make_datasets"]

N_BYTES = 256
PAD_ID, BOS_ID, EOS_ID, SEP_ID = 256, 257, 258, 259
VOCAB_SIZE = 260
SPECIAL_TOKENS = {"<|pad|>": PAD_ID, "<|bos|>": BOS_ID, "<|eos|>": EOS_ID, "<|sep|>": SEP_ID}
DOMAINS = ("arithmetic", "grammar", "code", "sort")
LINES_PER_DOC = (4, 10)        # each document has this many lines (inclusive range)


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; ids 256..259 are <|pad|>, <|bos|>, <|eos|>, <|sep|>."""

    vocab_size = VOCAB_SIZE
    special_tokens = SPECIAL_TOKENS

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special: bool = True) -> str:
        """Bytes back to text (invalid UTF-8 becomes U+FFFD); specials are dropped or named."""
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        names = {v: k for k, v in SPECIAL_TOKENS.items()}
        out, buffer = [], bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < VOCAB_SIZE:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {VOCAB_SIZE})")
            if i < N_BYTES:
                buffer.append(i)
                continue
            out.append(buffer.decode("utf-8", errors="replace"))
            buffer.clear()
            if not skip_special:
                out.append(names[i])
        out.append(buffer.decode("utf-8", errors="replace"))
        return "".join(out)


@dataclass(frozen=True)
class Document:
    text: str
    domain: str


# ---------------------------------------------------------------- the four domains

def _arithmetic_line(rng: random.Random) -> str:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 19), rng.randint(2, 12)
        return f"{a}*{b}={a * b}"
    a, b = rng.randint(0, 199), rng.randint(0, 99)
    if op == "-":
        a, b = max(a, b), min(a, b)       # keep results non-negative
        return f"{a}-{b}={a - b}"
    return f"{a}+{b}={a + b}"


_DET = ("the", "a", "every", "one")
_ADJ = ("small", "red", "old", "quiet", "happy", "green", "tall", "busy")
_NOUN = ("cat", "dog", "bird", "child", "farmer", "river", "tree", "ball", "house", "teacher", "fox", "boat")
_VERB_T = ("sees", "finds", "likes", "follows", "paints", "carries", "watches", "builds")
_VERB_I = ("sleeps", "runs", "sings", "waits", "laughs", "falls")
_PREP = ("on", "near", "under", "behind", "over")
_PLACE = ("hill", "road", "bridge", "garden", "table", "wall")


def _noun_phrase(rng: random.Random) -> str:
    words = [rng.choice(_DET)]
    if rng.random() < 0.6:
        words.append(rng.choice(_ADJ))
    words.append(rng.choice(_NOUN))
    return " ".join(words)


def _grammar_line(rng: random.Random) -> str:
    subject = _noun_phrase(rng)
    if rng.random() < 0.65:
        clause = f"{subject} {rng.choice(_VERB_T)} {_noun_phrase(rng)}"
    else:
        clause = f"{subject} {rng.choice(_VERB_I)}"
    if rng.random() < 0.4:
        clause += f" {rng.choice(_PREP)} the {rng.choice(_PLACE)}"
    return clause + " ."


_CODE_OPS = {"add": "+", "sub": "-", "mul": "*"}


def _code_lines(rng: random.Random) -> list[str]:
    """One small function: its name says what it computes (add_3 adds 3)."""
    kind, k = rng.choice(list(_CODE_OPS)), rng.randint(1, 9)
    var = rng.choice("xyzn")
    name = f"{kind}_{k}"
    if rng.random() < 0.5:
        return [f"def {name}({var}):", f"    r = {var} {_CODE_OPS[kind]} {k}", "    return r"]
    limit = rng.randint(2, 9)
    return [f"def {name}_upto({var}):", "    out = []", f"    for i in range({limit}):",
            f"        out.append(i {_CODE_OPS[kind]} {k})", "    return out"]


def _sort_line(rng: random.Random) -> str:
    values = [rng.randint(0, 99) for _ in range(rng.randint(3, 8))]
    task = rng.choice(("sort", "sort", "max", "reverse"))
    answer = {"sort": sorted(values), "max": [max(values)], "reverse": values[::-1]}[task]
    return f"{task}: {' '.join(map(str, values))} -> {' '.join(map(str, answer))}"


def generate_document(domain: str, rng: random.Random) -> Document:
    """One document of 4 to 10 lines (code: 2 to 4 functions) from ``domain``."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose from {DOMAINS}")
    n = rng.randint(*LINES_PER_DOC)
    if domain == "code":
        lines = [line for _ in range(max(2, n // 3)) for line in _code_lines(rng) + [""]][:-1]
    else:
        make = {"arithmetic": _arithmetic_line, "grammar": _grammar_line, "sort": _sort_line}[domain]
        lines = [make(rng) for _ in range(n)]
    return Document("\n".join(lines) + "\n", domain)


def _require_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} ({value!r}) must be a positive integer")


def synthetic_corpus(n_docs: int = 4000, seed: int = 0, domains: Sequence[str] = DOMAINS) -> list[Document]:
    """``n_docs`` documents, balanced over ``domains`` and shuffled; identical for a given seed."""
    _require_positive("n_docs", n_docs)
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown or not domains:
        raise ValueError(f"unknown domain(s) {unknown or list(domains)}; choose from {DOMAINS}")
    rng = random.Random(seed)
    docs = [generate_document(domains[i % len(domains)], rng) for i in range(n_docs)]
    rng.shuffle(docs)
    return docs


def load_text_file(path: str | Path, domain: str = "text") -> list[Document]:
    """A UTF-8 text file as documents, split at blank lines."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"text file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"text file {str(path)!r} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    docs = [Document(block.strip("\n") + "\n", domain) for block in text.split("\n\n") if block.strip()]
    if not docs:
        raise ValueError(f"text file {str(path)!r} is empty")
    return docs


# ---------------------------------------------------------------- streams and batches

@dataclass
class TokenStream:
    """Documents as one token sequence: <|bos|> + bytes + <|eos|> each, with a domain per token."""

    tokens: torch.Tensor          # (N,) int64
    domains: torch.Tensor         # (N,) int64, index into domain_names
    domain_names: tuple[str, ...]

    def __len__(self) -> int:
        return self.tokens.numel()


def tokenize_documents(docs: Sequence[Document], tokenizer: ByteTokenizer | None = None,
                       domain_names: Sequence[str] | None = None) -> TokenStream:
    if not docs:
        raise ValueError("tokenize_documents needs at least one document")
    tokenizer = tokenizer or ByteTokenizer()
    names = tuple(domain_names) if domain_names is not None else tuple(dict.fromkeys(d.domain for d in docs))
    index = {name: i for i, name in enumerate(names)}
    tokens, domains = [], []
    for doc in docs:
        if doc.domain not in index:
            raise ValueError(f"document domain {doc.domain!r} is not in domain_names {names}")
        ids = tokenizer.encode(doc.text, bos=True, eos=True)
        tokens.extend(ids)
        domains.extend([index[doc.domain]] * len(ids))
    return TokenStream(torch.tensor(tokens, dtype=torch.long), torch.tensor(domains, dtype=torch.long), names)


def train_val_split(docs: Sequence[Document], val_fraction: float = 0.1,
                    seed: int = 0) -> tuple[list[Document], list[Document]]:
    """Split by document, per domain, so every domain with 2+ documents appears in validation."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction ({val_fraction}) must be in (0, 1)")
    rng = random.Random(seed)
    by_domain: dict[str, list[Document]] = {}
    for doc in docs:
        by_domain.setdefault(doc.domain, []).append(doc)
    train, val = [], []
    for domain_docs in by_domain.values():
        order = list(range(len(domain_docs)))
        rng.shuffle(order)
        n_val = max(1, round(val_fraction * len(order))) if len(order) >= 2 else 0
        chosen = set(order[:n_val])
        for i, doc in enumerate(domain_docs):
            (val if i in chosen else train).append(doc)
    return train, val


def _check_window(stream: TokenStream, batch_size: int, seq_len: int) -> None:
    _require_positive("batch_size", batch_size)
    _require_positive("seq_len", seq_len)
    if seq_len >= len(stream):
        raise ValueError(f"seq_len ({seq_len}) must be < the stream's {len(stream)} tokens")


def _window(stream: TokenStream, starts: torch.Tensor, seq_len: int):
    offsets = starts[:, None] + torch.arange(seq_len + 1)
    chunk = stream.tokens[offsets]
    return chunk[:, :-1], chunk[:, 1:], stream.domains[offsets[:, 1:]]


class Batcher:
    """Random training windows from a TokenStream, with its own torch.Generator so a
    checkpoint can store and restore its state (exact resume)."""

    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, seed: int = 0) -> None:
        _check_window(stream, batch_size, seq_len)
        self.stream, self.batch_size, self.seq_len = stream, batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T), y (B, T) = x shifted by one, dom (B, T): domain of each target token."""
        starts = torch.randint(0, len(self.stream) - self.seq_len, (self.batch_size,), generator=self.generator)
        return _window(self.stream, starts, self.seq_len)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def eval_batches(stream: TokenStream, batch_size: int, seq_len: int,
                 max_batches: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Deterministic, non-overlapping windows from the start of the stream."""
    _check_window(stream, batch_size, seq_len)
    n_windows = (len(stream) - 1) // seq_len
    n_batches = n_windows // batch_size
    if n_batches == 0:
        raise ValueError(f"the stream's {len(stream)} tokens hold fewer than batch_size ({batch_size}) "
                         f"windows of seq_len ({seq_len}); use a smaller batch or sequence")
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    starts = torch.arange(n_batches * batch_size) * seq_len
    return [_window(stream, s, seq_len) for s in starts.split(batch_size)]


def unigram_entropy(stream_or_tokens: TokenStream | torch.Tensor | Sequence[int],
                    vocab_size: int = VOCAB_SIZE) -> float:
    """Entropy (nats) of the token frequencies: the loss of the best model that ignores context."""
    tokens = stream_or_tokens.tokens if isinstance(stream_or_tokens, TokenStream) else torch.as_tensor(stream_or_tokens)
    if tokens.numel() == 0:
        raise ValueError("unigram_entropy needs at least one token")
    counts = torch.bincount(tokens.flatten(), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def make_datasets(source: str | Path = "synthetic", n_docs: int = 4000, seed: int = 0,
                  val_fraction: float = 0.1) -> tuple[TokenStream, TokenStream]:
    """Train and validation streams from the synthetic corpus or a text file."""
    if str(source) == "synthetic":
        docs, names = synthetic_corpus(n_docs, seed), DOMAINS
    else:
        docs = load_text_file(source)
        names = tuple(dict.fromkeys(d.domain for d in docs))
    train, val = train_val_split(docs, val_fraction, seed)
    if not val:
        raise ValueError(f"{source}: too few documents ({len(docs)}) to hold some out for validation")
    return tokenize_documents(train, domain_names=names), tokenize_documents(val, domain_names=names)
