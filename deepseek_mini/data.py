"""Data: a byte tokenizer, a synthetic four-domain corpus, token streams and batchers.

Why bytes. DeepSeek-V3 uses a byte-level BPE tokenizer with a 128K vocabulary
(arXiv 2412.19437 §4.1). A trained BPE vocabulary would tie every chapter to a
downloaded artefact and to its merge rules; raw UTF-8 bytes need nothing. The 256
byte values plus four special tokens give ``VOCAB_SIZE = 260``: any text encodes,
nothing is ever out of vocabulary, and the embedding table stays tiny, so the
parameters go where the chapters look (attention, experts, MTP heads).

Why synthetic data. Nothing is downloaded at run time, every run is reproducible
from a seed, and the corpus mixes four domains of clearly different structure:

* ``arithmetic`` -- ``37+48=85``: the answer is a function of the question, so a
  model that learns to add is rewarded, and GRPO (chapter 08) can *check* answers;
* ``grammar`` -- sentences of a small probabilistic grammar with number agreement
  (``these dogs see`` / ``a dog sees``): local, word-level statistics;
* ``code`` -- Python-like functions whose name encodes their constant
  (``def add_3(x):`` ... ``x + 3``): indentation and long-range copying;
* ``sort`` -- ``sort: 5 3 9 1 -> 1 3 5 9``: the answer is a permutation of the input.

The arithmetic and sort lines double as *verifiable problems* for reinforcement learning
(chapter 08, GRPO): :func:`verifiable_problems` cuts a line at its answer, and
:func:`reward` scores a sampled completion by rules (no learned reward model).

Because every token carries its domain, later chapters measure per-domain
behaviour: which MoE experts specialise in which domain (chapter 03), where
multi-token prediction helps most (chapter 04). The loss to beat is the unigram
entropy (:func:`unigram_entropy`): the best any model can do that ignores context.
A trained model falls well below it, because answers here are predictable from context.

Documents are stored as ``BOS + bytes + EOS`` concatenated into one long stream;
training windows are cut from it at random positions (no padding needed).

Passkey retrieval (chapter 07, context extension). :func:`passkey_document` hides a
random number ("The pass key=40913.") at a chosen fractional depth of grammar-sentence
filler and asks for it at the very end ("What is the pass key? The pass key=40913"),
so a document of exactly ``n_tokens`` byte tokens ends with the answer digits. The
YaRN paper measures context extension this way (arXiv 2309.00071 §4.3.2), the
"needle in a haystack" DeepSeek-V3 reports up to 128K (arXiv 2412.19437 §4.3, Fig. 8).
:func:`passkey_batch` tokenises a batch of them and :func:`passkey_correct` scores it
from the model's logits.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "PAD_ID", "BOS_ID", "EOS_ID", "SEP_ID", "VOCAB_SIZE", "SPECIAL_TOKENS", "DOMAINS",
    "ByteTokenizer", "Document", "generate_document", "synthetic_corpus", "load_text_file",
    "TokenStream", "tokenize_documents", "train_val_split", "Batcher", "eval_batches",
    "unigram_entropy", "make_datasets", "PasskeyDocument", "passkey_document", "passkey_batch",
    "passkey_correct",
    # verifiable problems and rule-based rewards (chapter 08, GRPO)
    "TASK_DOMAINS", "ACCURACY_WEIGHT", "FORMAT_WEIGHT", "END_OF_ANSWER", "Problem", "arithmetic_problem",
    "sort_problem", "addition_problem", "verifiable_problems", "parse_answer", "accuracy_reward", "format_reward",
    "reward", "batch_rewards",
]

N_BYTES = 256  # byte values 0..255 are their own token ids
PAD_ID, BOS_ID, EOS_ID, SEP_ID = N_BYTES, N_BYTES + 1, N_BYTES + 2, N_BYTES + 3
VOCAB_SIZE = N_BYTES + 4
SPECIAL_TOKENS = {"<|pad|>": PAD_ID, "<|bos|>": BOS_ID, "<|eos|>": EOS_ID, "<|sep|>": SEP_ID}
_SPECIAL_NAMES = {i: name for name, i in SPECIAL_TOKENS.items()}
DOMAINS = ("arithmetic", "grammar", "code", "sort")

# Lines per document, per domain (arithmetic lines are short, so it gets more of them).
LINES_PER_DOC = {"arithmetic": (8, 10), "grammar": (4, 8), "code": (7, 10), "sort": (4, 8)}
MAX_OPERAND_DIGITS = 3   # + and - operands have 1..3 digits
MAX_MUL_LEFT, MAX_MUL_RIGHT = 99, 12   # a*b with a <= 99, b <= 12
SORT_LEN, SORT_MAX_VALUE = (4, 8), 99
SORT_OPS, SORT_OP_WEIGHTS = ("sort", "max", "reverse"), (0.6, 0.2, 0.2)
CODE_CONSTANTS, MIN_FUNCTION_LINES = (2, 9), 2

# --- the grammar's vocabulary (56 lemmas): number agreement is the structure to learn ---
DETS_SING, DETS_PLUR, DETS_ANY = ("a", "every", "this", "one"), ("some", "these", "many", "two"), ("the", "my")
ADJECTIVES = ("small", "big", "red", "blue", "old", "young", "happy", "quiet", "green", "tall")
NOUNS = ("cat", "dog", "bird", "ball", "tree", "hill", "house", "river", "teacher", "book",
         "car", "garden", "apple", "friend")  # plural = noun + "s"
VERBS_T = (("sees", "see"), ("likes", "like"), ("finds", "find"), ("chases", "chase"),
           ("holds", "hold"), ("watches", "watch"), ("follows", "follow"))
VERBS_I = (("sleeps", "sleep"), ("runs", "run"), ("sings", "sing"), ("waits", "wait"), ("jumps", "jump"))
PREPOSITIONS = ("on", "under", "near", "behind", "in", "with")
ADVERBS = ("today", "again", "slowly", "quickly")
P_ADJ, P_TRANSITIVE, P_PP, P_ADVERB, P_PLURAL = 0.5, 0.6, 0.4, 0.2, 0.4


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} ({value!r}) must be a positive int")
    return value


def _check_domain(domain: object) -> str:
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; valid domains are {DOMAINS}")
    return domain  # type: ignore[return-value]


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus the special tokens 256..259."""

    vocab_size: int = VOCAB_SIZE

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``'s UTF-8 bytes, optionally framed by BOS/EOS."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return [BOS_ID] * bos + list(text.encode("utf-8")) + [EOS_ID] * eos

    def decode(self, ids: Sequence[int] | Tensor, skip_special: bool = True) -> str:
        """Text of ``ids``; invalid UTF-8 (e.g. a cut multi-byte char) becomes U+FFFD.

        Specials are dropped, or rendered as their names (``<|bos|>``) when
        ``skip_special=False`` -- handy when inspecting raw training windows.
        """
        if isinstance(ids, Tensor):
            if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
                raise ValueError(f"ids must be a 1-D integer tensor, got shape {tuple(ids.shape)} "
                                 f"and dtype {ids.dtype}")
            ids = ids.tolist()
        pieces, buf = [], bytearray()
        for pos, i in enumerate(ids):
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < VOCAB_SIZE:
                raise ValueError(f"token id {i!r} at position {pos} is outside [0, {VOCAB_SIZE})")
            if i < N_BYTES:
                buf.append(i)
            elif not skip_special:
                pieces += [buf.decode("utf-8", errors="replace"), _SPECIAL_NAMES[i]]
                buf = bytearray()
        return "".join(pieces) + buf.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Document:
    """One training document and the domain it belongs to."""

    text: str
    domain: str


# ----------------------------------------------------------------- synthetic domains
def _operand(rng: random.Random) -> int:
    """A number with 1..MAX_OPERAND_DIGITS digits, each digit count equally likely."""
    digits = rng.randint(1, MAX_OPERAND_DIGITS)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _arithmetic_line(rng: random.Random) -> str:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(0, MAX_MUL_LEFT), rng.randint(0, MAX_MUL_RIGHT)
        return f"{a}*{b}={a * b}"
    a, b = _operand(rng), _operand(rng)
    if op == "-":
        a, b = max(a, b), min(a, b)  # keep results non-negative
        return f"{a}-{b}={a - b}"
    return f"{a}+{b}={a + b}"


def _noun_phrase(rng: random.Random, plural: bool) -> str:
    det = rng.choice((DETS_PLUR if plural else DETS_SING) + DETS_ANY)
    adj = [rng.choice(ADJECTIVES)] if rng.random() < P_ADJ else []
    noun = rng.choice(NOUNS) + ("s" if plural else "")
    return " ".join([det, *adj, noun])


def _grammar_line(rng: random.Random) -> str:
    """S -> NP VP [PP] [ADV] '.'; the verb agrees in number with the subject NP."""
    plural = rng.random() < P_PLURAL
    words = [_noun_phrase(rng, plural)]
    if rng.random() < P_TRANSITIVE:
        words += [rng.choice(VERBS_T)[plural], _noun_phrase(rng, rng.random() < P_PLURAL)]
    else:
        words.append(rng.choice(VERBS_I)[plural])
    if rng.random() < P_PP:
        words += [rng.choice(PREPOSITIONS), _noun_phrase(rng, rng.random() < P_PLURAL)]
    if rng.random() < P_ADVERB:
        words.append(rng.choice(ADVERBS))
    return " ".join(words) + " ."


def _code_function(rng: random.Random, max_lines: int) -> list[str]:
    """One small function (2..6 lines, at most ``max_lines``) named after the constant it uses."""
    k = rng.randint(*CODE_CONSTANTS)
    a, y = rng.choice(("x", "n", "a", "v")), rng.choice(("y", "r", "out", "t"))
    xs, v, acc = rng.choice(("xs", "items", "vals")), rng.choice(("x", "v", "item")), rng.choice(("total", "s", "acc"))
    templates = [
        [f"def add_{k}({a}):", f"    {y} = {a} + {k}", f"    return {y}"],
        [f"def sub_{k}({a}):", f"    {y} = {a} - {k}", f"    return {y}"],
        [f"def mul_{k}({a}):", f"    return {a} * {k}"],
        [f"def clip_{k}({a}):", f"    if {a} > {k}:", f"        return {k}", f"    return {a}"],
        [f"def sum_mul_{k}({xs}):", f"    {acc} = 0", f"    for {v} in {xs}:",
         f"        {acc} = {acc} + {v} * {k}", f"    return {acc}"],
        [f"def count_above_{k}({xs}):", f"    {acc} = 0", f"    for {v} in {xs}:",
         f"        if {v} > {k}:", f"            {acc} = {acc} + 1", f"    return {acc}"],
    ]
    return rng.choice([t for t in templates if len(t) <= max_lines])


def _sort_line(rng: random.Random) -> str:
    values = [rng.randint(0, SORT_MAX_VALUE) for _ in range(rng.randint(*SORT_LEN))]
    op = rng.choices(SORT_OPS, weights=SORT_OP_WEIGHTS)[0]
    answer = {"sort": sorted(values), "max": [max(values)], "reverse": values[::-1]}[op]
    return f"{op}: {' '.join(map(str, values))} -> {' '.join(map(str, answer))}"


def generate_document(domain: str, rng: random.Random) -> Document:
    """One document of ``domain``: several lines, no blank line, ASCII only."""
    _check_domain(domain)
    if not isinstance(rng, random.Random):
        raise ValueError(f"rng must be a random.Random, got {type(rng).__name__}")
    lo, hi = LINES_PER_DOC[domain]
    target = rng.randint(lo, hi)
    if domain == "code":  # whole functions, until target lines or no room for the shortest
        lines: list[str] = []
        while len(lines) < target and hi - len(lines) >= MIN_FUNCTION_LINES:
            lines += _code_function(rng, hi - len(lines))
    else:
        make_line = {"arithmetic": _arithmetic_line, "grammar": _grammar_line, "sort": _sort_line}[domain]
        lines = [make_line(rng) for _ in range(target)]
    return Document("\n".join(lines), domain)


def synthetic_corpus(n_docs: int = 4000, seed: int = 0, domains: Sequence[str] = DOMAINS) -> list[Document]:
    """``n_docs`` documents, domains balanced (cycled) and shuffled; same seed -> same corpus."""
    _check_positive_int("n_docs", n_docs)
    if isinstance(domains, str) or len(domains) == 0 or len(set(domains)) != len(domains):
        raise ValueError(f"domains ({domains!r}) must be a non-empty sequence of distinct names from {DOMAINS}")
    for d in domains:
        _check_domain(d)
    rng = random.Random(seed)
    order = [domains[i % len(domains)] for i in range(n_docs)]
    rng.shuffle(order)
    return [generate_document(d, rng) for d in order]


def load_text_file(path: str | Path, domain: str = "text") -> list[Document]:
    """Your own UTF-8 text as documents: paragraphs separated by blank lines."""
    if not isinstance(domain, str) or not domain:
        raise ValueError(f"domain ({domain!r}) must be a non-empty str")
    path = Path(path)
    if not path.exists():
        raise ValueError(f"text file '{path}' does not exist")
    if not path.is_file():
        raise ValueError(f"text file '{path}' is not a regular file (a directory?)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"text file '{path}' is not valid UTF-8 (byte {err.start}: {err.reason})") from None
    paragraphs = re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))
    docs = [Document(p.strip("\n").rstrip(), domain) for p in paragraphs if p.strip()]
    if not docs:
        raise ValueError(f"text file '{path}' is empty (no non-blank text)")
    return docs


# ----------------------------------------------------------------- token streams
@dataclass
class TokenStream:
    """All documents as one token sequence, with the domain index of every token."""

    tokens: Tensor   # (N,) int64: BOS + bytes + EOS per document, concatenated
    domains: Tensor  # (N,) int64: index into domain_names
    domain_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.tokens.dim() != 1 or self.tokens.shape != self.domains.shape:
            raise ValueError(f"tokens {tuple(self.tokens.shape)} and domains {tuple(self.domains.shape)} "
                             "must be 1-D tensors of the same length")

    def __len__(self) -> int:
        return self.tokens.numel()


def _default_domain_names(docs: Sequence[Document]) -> tuple[str, ...]:
    """Known domains in DOMAINS order, then any others in order of first appearance."""
    present = dict.fromkeys(d.domain for d in docs)
    return tuple(d for d in DOMAINS if d in present) + tuple(d for d in present if d not in DOMAINS)


def tokenize_documents(docs: Sequence[Document], tokenizer: ByteTokenizer | None = None,
                       domain_names: Sequence[str] | None = None) -> TokenStream:
    """Encode documents as ``BOS + bytes + EOS`` and concatenate them into a TokenStream."""
    if len(docs) == 0:
        raise ValueError("docs is empty: need at least one document to tokenize")
    tokenizer = tokenizer or ByteTokenizer()
    names = tuple(domain_names) if domain_names is not None else _default_domain_names(docs)
    if len(set(names)) != len(names):
        raise ValueError(f"domain_names ({names!r}) must not repeat a name")
    index = {name: i for i, name in enumerate(names)}
    ids: list[int] = []
    doc_domains, doc_lengths = [], []
    for doc in docs:
        if doc.domain not in index:
            raise ValueError(f"document domain {doc.domain!r} is not in domain_names {names}")
        encoded = tokenizer.encode(doc.text, bos=True, eos=True)
        ids += encoded
        doc_domains.append(index[doc.domain])
        doc_lengths.append(len(encoded))
    domains = torch.repeat_interleave(torch.tensor(doc_domains), torch.tensor(doc_lengths))  # (N,)
    return TokenStream(torch.tensor(ids, dtype=torch.long), domains.long(), names)


def train_val_split(docs: Sequence[Document], val_fraction: float = 0.1,
                    seed: int = 0) -> tuple[list[Document], list[Document]]:
    """Split by document, per domain, so validation sees every domain (>= 1 doc when it has >= 2)."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction ({val_fraction!r}) must be in (0, 1)")
    if len(docs) == 0:
        raise ValueError("docs is empty: need at least one document to split")
    by_domain: dict[str, list[int]] = {}
    for i, doc in enumerate(docs):
        by_domain.setdefault(doc.domain, []).append(i)
    rng = random.Random(seed)
    val_idx: set[int] = set()
    for idx in by_domain.values():
        n_val = min(max(round(len(idx) * val_fraction), 1), len(idx) - 1)  # 0 when a domain has 1 doc
        val_idx.update(rng.sample(idx, n_val))
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def _check_window(stream: TokenStream, batch_size: int, seq_len: int, extra_targets: int = 0) -> None:
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("seq_len", seq_len)
    if isinstance(extra_targets, bool) or not isinstance(extra_targets, int) or extra_targets < 0:
        raise ValueError(f"extra_targets ({extra_targets!r}) must be an integer >= 0")
    if seq_len + extra_targets >= len(stream):   # a window is seq_len + extra_targets + 1 tokens
        extra = f" (with extra_targets {extra_targets})" if extra_targets else ""
        raise ValueError(f"seq_len ({seq_len}) is too large{extra}: the stream has {len(stream)} tokens "
                         f"and seq_len must be < {len(stream) - extra_targets}")


def _windows(stream: TokenStream, starts: Tensor, seq_len: int,
             extra_targets: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, T), y (B, T + D): the targets, x shifted by one and D tokens beyond, and the domain of
    each target, from start offsets (B,); D = ``extra_targets``."""
    idx = starts[:, None] + torch.arange(seq_len + extra_targets + 1)  # (B, T+D+1)
    window = stream.tokens[idx]                                         # (B, T+D+1)
    return window[:, :seq_len], window[:, 1:], stream.domains[idx[:, 1:]]


class Batcher:
    """Random training windows from a TokenStream, with its own torch.Generator so a checkpoint
    can store and restore its state (exact resume).

    ``extra_targets`` = D makes each window T + D + 1 tokens long: the targets y run D tokens
    past the inputs, so that Multi-Token Prediction (chapter 04, DeepSeek-V3 §2.2) has a
    target for every position at every depth k = 1..D (depth k at position i predicts
    t_{i+k+1}). The main model's targets are ``y[:, :T]``. With D = 0 (the default) the
    windows, and the numbers drawn for them, are what they were before MTP existed.
    """

    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, seed: int = 0,
                 extra_targets: int = 0) -> None:
        _check_window(stream, batch_size, seq_len, extra_targets)
        self.stream, self.batch_size, self.seq_len, self.extra_targets = stream, batch_size, seq_len, extra_targets
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T), y (B, T + D), dom (B, T + D); windows may span document boundaries."""
        n_starts = len(self.stream) - self.seq_len - self.extra_targets  # a window needs T+D+1 tokens
        starts = torch.randint(0, n_starts, (self.batch_size,), generator=self.generator)  # (B,)
        return _windows(self.stream, starts, self.seq_len, self.extra_targets)

    def state_dict(self) -> dict:
        """Generator state plus the shape it was saved for (checked on load)."""
        return {"generator": self.generator.get_state().clone(), "batch_size": self.batch_size,
                "seq_len": self.seq_len, "extra_targets": self.extra_targets, "n_tokens": len(self.stream)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the generator; the next batches equal those the saved Batcher would have drawn.
        A state saved before ``extra_targets`` existed was saved with D = 0."""
        missing = {"generator", "batch_size", "seq_len", "n_tokens"} - set(state)
        if missing:
            raise ValueError(f"state is missing keys {sorted(missing)}")
        mine = {"batch_size": self.batch_size, "seq_len": self.seq_len, "extra_targets": self.extra_targets,
                "n_tokens": len(self.stream)}
        state = {"extra_targets": 0, **state}
        for key, value in mine.items():
            if state[key] != value:
                raise ValueError(f"state[{key!r}] ({state[key]!r}) must equal this Batcher's {key} ({value}) "
                                 "for an exact resume")
        self.generator.set_state(state["generator"])


def eval_batches(stream: TokenStream, batch_size: int, seq_len: int,
                 max_batches: int | None = None) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Non-overlapping windows tiling the stream from its start, the same on every call.

    Window i covers targets ``[i*T + 1, (i+1)*T]``; the last batch may hold fewer than
    ``batch_size`` windows so that every full window is evaluated. With ``max_batches``,
    ``max_batches * batch_size`` of those windows are taken evenly spaced over the whole
    stream, not just its first documents, so a capped evaluation still sees every part.
    """
    _check_window(stream, batch_size, seq_len)
    starts = torch.arange(0, len(stream) - seq_len, seq_len)  # (n_windows,)
    if max_batches is not None:
        k = min(_check_positive_int("max_batches", max_batches) * batch_size, len(starts))
        # floor(i * (n-1) / (k-1)) is strictly increasing when k <= n: distinct windows
        pick = torch.arange(k) * (len(starts) - 1) // max(k - 1, 1)  # (k,)
        starts = starts[pick]
    return [_windows(stream, s, seq_len) for s in starts.split(batch_size)]


def unigram_entropy(stream_or_tokens: TokenStream | Tensor | Sequence[int], vocab_size: int = VOCAB_SIZE) -> float:
    """Entropy (nats) of the token frequencies: the loss of the best context-free model.

    A model that predicts every token with the corpus frequencies scores exactly this
    cross-entropy; a trained model must go below it to show it uses context.
    """
    _check_positive_int("vocab_size", vocab_size)
    tokens = stream_or_tokens.tokens if isinstance(stream_or_tokens, TokenStream) else stream_or_tokens
    tokens = torch.as_tensor(tokens).reshape(-1)
    if tokens.numel() == 0 or tokens.is_floating_point():
        raise ValueError(f"tokens must be a non-empty integer sequence, got {tokens.numel()} "
                         f"values of dtype {tokens.dtype}")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}), got range "
                         f"[{int(tokens.min())}, {int(tokens.max())}]")
    p = torch.bincount(tokens.long(), minlength=vocab_size).double() / tokens.numel()  # (V,)
    p = p[p > 0]
    return max(float(-(p * p.log()).sum()), 0.0)  # max() turns -0.0 into 0.0


def make_datasets(source: str | Path = "synthetic", n_docs: int = 4000, seed: int = 0,
                  val_fraction: float = 0.1) -> tuple[TokenStream, TokenStream]:
    """Train and validation streams from the synthetic corpus or from a text file.

    ``source="synthetic"`` builds :func:`synthetic_corpus` (``n_docs`` is used);
    anything else is a path for :func:`load_text_file`. Both streams share
    ``domain_names``, so a domain index means the same thing in each.
    """
    if str(source) == "synthetic":
        docs = synthetic_corpus(n_docs, seed)
    else:
        docs = load_text_file(source)
    if len(docs) < 2:
        raise ValueError(f"source {str(source)!r} gives {len(docs)} document; need at least 2 "
                         "(separate documents with a blank line)")
    names = _default_domain_names(docs)
    train, val = train_val_split(docs, val_fraction, seed)
    return tokenize_documents(train, domain_names=names), tokenize_documents(val, domain_names=names)


# ----------------------------------------------------------------- passkey retrieval
# "key=" before the digits: a marker the grammar filler never holds (it has "this dog", so
# "is " before the digits would be ambiguous to a model that matches a token or two back).
PASSKEY_SENTENCE = " The pass key={key}. "              # hidden at `depth` in the filler
PASSKEY_QUESTION = " What is the pass key? The pass key="  # then the answer digits, last


@dataclass(frozen=True)
class PasskeyDocument:
    """A passkey retrieval document: ``text`` ends with ``answer``, hidden earlier at ``key_start``."""

    text: str        # filler + key sentence + filler + question + answer: len(text) byte tokens
    answer: str      # the key's digits, the last len(answer) characters of text
    key_start: int   # offset of the key sentence in text (characters = byte tokens)

    @property
    def prompt(self) -> str:
        """The text without the answer: what a model reads before it must produce the key."""
        return self.text[: len(self.text) - len(self.answer)]


def _passkey_overhead(digits: int) -> int:
    """Tokens a passkey document needs besides filler: key sentence, question and answer."""
    return len(PASSKEY_SENTENCE.format(key="0" * digits)) + len(PASSKEY_QUESTION) + digits


def _filler(rng: random.Random, n_chars: int) -> str:
    """Exactly ``n_chars`` characters of grammar sentences (no digits, so nothing looks like a key)."""
    pieces, length = [], -1   # the joined length: the pieces plus one space between each two
    while length < n_chars:
        pieces.append(_grammar_line(rng))
        length += len(pieces[-1]) + 1
    return " ".join(pieces)[:n_chars]


def _check_passkey_args(n_tokens: object, digits: object) -> None:
    _check_positive_int("digits", digits)
    _check_positive_int("n_tokens", n_tokens)
    need = _passkey_overhead(digits)  # type: ignore[arg-type]
    if n_tokens < need:  # type: ignore[operator]
        raise ValueError(f"n_tokens ({n_tokens}) is too small: a passkey document with {digits} digits "
                         f"needs at least {need} tokens (key sentence + question + answer)")


def _check_depth(depth: object) -> float:
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 1:
        raise ValueError(f"depth ({depth!r}) must be a number in [0, 1] (0: key first, 1: key just "
                         "before the question)")
    return float(depth)


def passkey_document(rng: random.Random, n_tokens: int, depth: float, digits: int = 5) -> PasskeyDocument:
    """A document of exactly ``n_tokens`` byte tokens: filler, the key at ``depth``, the question, the key.

    ``depth`` is the key sentence's fractional position in the filler: 0 puts it first, 1
    right before the question, 0.5 in the middle (offset ``round(depth * n_filler)``). The key
    is ``digits`` random decimal digits (leading zeros allowed). The same ``rng`` state gives
    the same document.
    """
    if not isinstance(rng, random.Random):
        raise ValueError(f"rng must be a random.Random, got {type(rng).__name__}")
    _check_passkey_args(n_tokens, digits)
    depth = _check_depth(depth)
    answer = f"{rng.randrange(10**digits):0{digits}d}"
    n_filler = n_tokens - _passkey_overhead(digits)
    filler = _filler(rng, n_filler)
    key_start = round(depth * n_filler)
    text = (filler[:key_start] + PASSKEY_SENTENCE.format(key=answer) + filler[key_start:]
            + PASSKEY_QUESTION + answer)
    return PasskeyDocument(text, answer, key_start)


def passkey_batch(rng: random.Random, batch_size: int, n_tokens: int, depth: float | None = None,
                  digits: int = 5) -> tuple[Tensor, Tensor]:
    """``batch_size`` passkey documents as tokens (B, n_tokens) and the answer positions (digits,).

    ``depth=None`` draws each document's depth uniformly from [0, 1] (for training); a number
    puts every key there (for a needle-in-a-haystack grid cell). The answer occupies the same
    last ``digits`` positions in every row, so one positions tensor serves the whole batch. No
    BOS/EOS: every token is a byte of the document.
    """
    _check_positive_int("batch_size", batch_size)
    if depth is not None:
        _check_depth(depth)
    _check_passkey_args(n_tokens, digits)
    docs = [passkey_document(rng, n_tokens, rng.random() if depth is None else depth, digits)
            for _ in range(batch_size)]
    tokens = torch.tensor([list(d.text.encode("ascii")) for d in docs], dtype=torch.long)  # (B, n_tokens)
    return tokens, torch.arange(n_tokens - digits, n_tokens)


def passkey_correct(logits: Tensor, tokens: Tensor, answer_positions: Tensor) -> Tensor:
    """True (B,) where the argmax at every answer position is the right digit (teacher forced).

    ``logits`` (B, T, V) come from running the model on ``tokens`` (B, T); position p - 1
    predicts token p. Requiring every digit right under teacher forcing is the same as
    greedy decoding of the answer: greedy decoding reproduces the teacher's prefix exactly as
    long as each argmax is right, and stops being right at the first argmax that is not.
    """
    if logits.dim() != 3 or tokens.dim() != 2 or logits.shape[:2] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be (B, T, V) for tokens (B, T) "
                         f"{tuple(tokens.shape)}")
    positions = torch.as_tensor(answer_positions, dtype=torch.long)
    if positions.dim() != 1 or positions.numel() == 0 or int(positions.min()) < 1 \
            or int(positions.max()) >= tokens.shape[1]:
        raise ValueError(f"answer_positions must be a non-empty 1-D list of positions in [1, "
                         f"{tokens.shape[1]}), got {positions.tolist()}")
    predicted = logits[:, positions - 1].argmax(dim=-1)  # (B, digits)
    return (predicted == tokens[:, positions]).all(dim=-1)


# ----------------------------------------------------------------- verifiable problems and rule-based rewards
# DeepSeek-V3's RL stage scores questions with deterministic answers (maths, code) by rules, not by a learned
# reward model, which could be gamed (arXiv 2412.19437 §5.2.1, "Rule-Based RM"); DeepSeek-R1 (arXiv 2501.12948
# §2.2.2) combines an *accuracy* reward with a *format* reward. Here the problems are the corpus's own arithmetic
# and sort lines cut at their answer, plus an easy level ("addition", 1-digit sums). A toy trained for CPU minutes
# on the full arithmetic solves almost none of them, so every group is silent (a group whose rewards are all equal
# carries no signal); chapter 08 starts from a toy trained on 1-digit sums, which solves some: mixed groups.
#
# The answer marker is the end of the line. In the corpus every answer is the last thing on its line, followed
# by "\n" (or EOS at the end of a document), so a pretrained toy already closes its answers that way. A tag such
# as <a>...</a> never occurs in the corpus: the toy would almost never emit it, and RL alone could not teach it.

TASK_DOMAINS = ("arithmetic", "sort", "addition")   # "addition": an easy level for a CPU-sized toy
ACCURACY_WEIGHT, FORMAT_WEIGHT = 1.0, 0.2   # ours: R1-Zero's reward weights are not published
END_OF_ANSWER = ("\n", "<|eos|>")          # a newline, or EOS as ``decode(..., skip_special=False)`` writes it
_ANSWER_SEPARATOR = {"arithmetic": "=", "sort": "-> ", "addition": "="}   # the prompt ends with it, the answer follows
_WELL_FORMED = re.compile(r"\d+( \d+)*")


@dataclass(frozen=True)
class Problem:
    """One verifiable problem: the prompt the model continues and the one answer that scores."""

    domain: str      # "arithmetic", "sort" or "addition"
    prompt: str      # e.g. "37+48=" or "sort: 5 3 9 1 -> "
    answer: str      # e.g. "85"     or "1 3 5 9"


def _cut(domain: str, line: str) -> Problem:
    prompt, answer = line.split(_ANSWER_SEPARATOR[domain])
    return Problem(domain, prompt + _ANSWER_SEPARATOR[domain], answer)


def arithmetic_problem(rng: random.Random) -> Problem:
    """A corpus arithmetic line cut at ``=``: ``"597-4="`` -> ``"593"`` (``+``, ``-``, ``*``)."""
    if not isinstance(rng, random.Random):
        raise ValueError(f"rng must be a random.Random, got {type(rng).__name__}")
    return _cut("arithmetic", _arithmetic_line(rng))


def sort_problem(rng: random.Random) -> Problem:
    """A corpus sort-domain line cut at ``-> ``: ``"sort: 5 3 9 -> "`` -> ``"3 5 9"`` (also ``max:``, ``reverse:``)."""
    if not isinstance(rng, random.Random):
        raise ValueError(f"rng must be a random.Random, got {type(rng).__name__}")
    return _cut("sort", _sort_line(rng))


def addition_problem(rng: random.Random) -> Problem:
    """One-digit addition, ``"7+5="`` -> ``"12"``: the easy level, 100 distinct problems.

    The corpus's arithmetic (up to 3-digit operands, ``*``) is beyond a toy trained for a few CPU
    minutes: its greedy accuracy stays near 0, every sampled group scores the same, and GRPO gets no
    signal. One-digit sums are learnable in minutes yet not solved at once, so groups have mixed rewards.
    """
    if not isinstance(rng, random.Random):
        raise ValueError(f"rng must be a random.Random, got {type(rng).__name__}")
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return Problem("addition", f"{a}+{b}=", str(a + b))


def verifiable_problems(n: int, seed: int = 0, domains: Sequence[str] = ("arithmetic", "sort")) -> list[Problem]:
    """``n`` problems, domains cycled in order; the same seed gives the same problems.

    A seed other than the pretraining corpus's draws other lines, but from the same distribution;
    a few may repeat a training line by chance (1-digit sums are few).
    """
    _check_positive_int("n", n)
    if isinstance(domains, str) or len(domains) == 0 or any(d not in TASK_DOMAINS for d in domains):
        raise ValueError(f"domains ({domains!r}) must be a non-empty sequence of names from {TASK_DOMAINS}")
    rng = random.Random(seed)
    make = {"arithmetic": arithmetic_problem, "sort": sort_problem, "addition": addition_problem}
    return [make[domains[i % len(domains)]](rng) for i in range(n)]


def parse_answer(completion: str) -> str | None:
    """The text before the first end-of-answer marker, or None when the completion never closes its answer."""
    if not isinstance(completion, str):
        raise ValueError(f"completion must be a str, got {type(completion).__name__}")
    ends = [i for i in (completion.find(marker) for marker in END_OF_ANSWER) if i >= 0]
    return completion[:min(ends)] if ends else None


def accuracy_reward(problem: Problem, completion: str) -> float:
    """1.0 when the closed answer is exactly the expected one, else 0.0 (an unclosed answer scores 0)."""
    return float(parse_answer(completion) == problem.answer)


def format_reward(completion: str) -> float:
    """1.0 when the answer is closed and is non-negative integers separated by single spaces, else 0.0."""
    answer = parse_answer(completion)
    return float(answer is not None and _WELL_FORMED.fullmatch(answer) is not None)


def reward(problem: Problem, completion: str) -> dict[str, float]:
    """``ACCURACY_WEIGHT * accuracy + FORMAT_WEIGHT * format`` and its parts: ``{"reward", "accuracy", "format"}``.

    Format is a small shaping term: a well-formed wrong answer beats garbage, but no amount of
    formatting outweighs being right, and rambling past the answer (never closing it) scores 0.
    """
    accuracy, fmt = accuracy_reward(problem, completion), format_reward(completion)
    return {"reward": ACCURACY_WEIGHT * accuracy + FORMAT_WEIGHT * fmt, "accuracy": accuracy, "format": fmt}


def batch_rewards(problems: Sequence[Problem], completions: Sequence[str], group_size: int) -> dict[str, Tensor]:
    """Rewards of ``len(problems) * group_size`` completions, each problem's G completions contiguous.

    Returns float32 tensors ``reward``, ``accuracy``, ``format``, each ``(len(problems) * group_size,)``:
    the layout ``group_advantages`` expects.
    """
    _check_positive_int("group_size", group_size)
    if len(completions) != len(problems) * group_size:
        raise ValueError(f"got {len(completions)} completions for {len(problems)} problems x group_size "
                         f"{group_size}; expected {len(problems) * group_size}")
    scores = [reward(problems[i // group_size], c) for i, c in enumerate(completions)]
    return {key: torch.tensor([s[key] for s in scores], dtype=torch.float32)
            for key in ("reward", "accuracy", "format")}
