"""BERT's WordPiece for ASCII texts: a whole chunk in a few C string calls and one dict lookup a word.

Why: on a GPU, short texts are bound by the tokenizer (issue 13). The Rust tokenizer spends about
25-30 µs of one core on a short text (MiniLM, 8-32 words, ``python -m bench.tokenize_stages``),
most of it building what the engine never reads: per text an ``Encoding`` with token strings,
offsets, alignment maps, word ids and masks, then a Python object and a list of ids. For ASCII
texts of a BERT tokenizer (``BertNormalizer`` with ``clean_text``, ``BertPreTokenizer``,
``WordPiece``) the same content ids come from: the chunk's texts joined with a separator,
lower-cased once, split into words and punctuation marks (``str.split``, each mark the chunk holds
spaced first), each piece looked up in a dict that starts as the vocabulary and keeps
every word it has split since (greedy longest match first, as ``WordPiece`` does; a word too long
or with no match is ``[UNK]``). Text boundaries are where the separator's code lands. Special
tokens and truncation are the caller's (``worker.models.tokenizer``, with numpy).

What it does not cover goes back to the caller for the Rust tokenizer: non-ASCII texts, texts
holding any added token's content (matched before normalization there), and a chunk with control
characters is checked text by text (``AsciiBertNormalizer.prepare`` cleans them as BertNormalizer
does; ``worker.models.tokenizer.AsciiShortcut`` prepares its texts with it too).
The tests hold the result to the Rust tokenizer's, id for id.

This module imports no other part of the worker.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any, Sequence

import numpy as np
from tokenizers import Tokenizer

#: Between two texts of the joined chunk: not whitespace to ``str.split``, a control character
#: that BertNormalizer removes, so no prepared text holds it (and a raw text holding it is counted).
_SEP = "\x01"
_JOIN = f" {_SEP} "
#: The separator's code in the looked-up pieces; codes below it name a word of several tokens.
_SEP_CODE = -1
#: ASCII punctuation, each mark a piece of its own to BertPreTokenizer; everything else (deleted
#: from a chunk's bytes, what is left is the marks it holds).
_PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
_NOT_PUNCT_BYTES = bytes(c for c in range(256) if chr(c) not in _PUNCT)
#: Every ASCII control character, the separator included: ``ASCII_CLEAN``'s keys.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: Every ASCII control character, the separator included (a chunk's count of them is checked in C).
_CONTROL_BYTES = bytes([*range(0x20), 0x7f])
#: ASCII characters BertNormalizer's ``clean_text`` removes (controls other than tab, newline and
#: carriage return) or turns into a space (those three).
ASCII_CLEAN = {**{c: None for c in [*range(0x00, 0x09), 0x0b, 0x0c, *range(0x0e, 0x20), 0x7f]},
               0x09: " ", 0x0a: " ", 0x0d: " "}
#: Words remembered beyond the vocabulary (per process): bounds the memory that unique strings
#: (ids, hashes, numbers) take (measured: 20 MB for 65,536 new words of several tokens each, in
#: each of up to 14 tokenizer processes); past it the next chunk starts again from the vocabulary.
MAX_REMEMBERED = 65_536


class AsciiBertNormalizer:
    """BertNormalizer on ASCII texts in C string calls, for both shortcuts past the Rust one: this
    module's ``AsciiWordPiece`` and ``worker.models.tokenizer.AsciiShortcut`` (one copy, so the two
    cannot come to clean or fold a text differently).

    For an ASCII text BertNormalizer's steps reduce to: drop control characters and map tab,
    newline and carriage return to spaces (``clean_text``), then ASCII lower-casing
    (``lowercase``); CJK padding and accent stripping change no ASCII character. A text that holds
    an added token's content (either case) is left to the Rust tokenizer, which matches added
    tokens before (or after) normalization."""

    def __init__(self, clean: bool, lower: bool, added: Sequence[str]) -> None:
        self.clean = clean
        self.lower = lower
        self.added = [token.lower() for token in added if token]
        #: the added tokens' first characters: a text holding none of them holds no added token
        self._added_starts = sorted({token[0] for token in self.added})

    def prepare(self, text: object) -> str | None:
        """``text`` as BertNormalizer leaves it, or None where this does not apply (not an ASCII
        str, or it holds an added token)."""
        if not isinstance(text, str) or not text.isascii():
            return None
        if self.clean and _CONTROL.search(text):
            text = text.translate(ASCII_CLEAN)
        folded = text.lower()
        if self.holds_added(folded):
            return None
        return folded if self.lower else text

    def holds_added(self, folded: str) -> bool:
        """Whether the (lower-cased) text holds an added token's content; one scan a first character."""
        return any(start in folded for start in self._added_starts) and any(token in folded for token in self.added)


class _Codes(dict):
    """Piece -> code: a token id (>= 0), ``_SEP_CODE``, or ``-2 - k`` for ``multi[k]`` (several
    ids). A missing piece is split by WordPiece's greedy longest match and remembered."""

    def __init__(self, vocab: dict[str, int], unk_id: int, prefix: str, max_chars: int) -> None:
        super().__init__((word, i) for word, i in vocab.items() if len(word) <= max_chars)
        self[_SEP] = _SEP_CODE
        self.vocab = vocab
        self.unk_id = unk_id
        self.prefix = prefix
        self.max_chars = max_chars
        #: the words of several tokens, by the ``k`` of their code (a dict filled under a counter:
        #: the engine's tokenize threads share it, and each new word must keep its own ``k``)
        self.multi: dict[int, tuple[int, ...]] = {}
        self._next = itertools.count()
        self.limit = len(self) + MAX_REMEMBERED

    def full(self) -> bool:
        """Whether it remembers ``MAX_REMEMBERED`` words or more (then a fresh one replaces it)."""
        return len(self) >= self.limit

    def __missing__(self, word: str) -> int:
        ids = self.split(word)
        if len(ids) == 1:
            code = ids[0]
        else:
            k = next(self._next)
            self.multi[k] = ids
            code = -2 - k
        self[word] = code
        return code

    def split(self, word: str) -> tuple[int, ...]:
        """WordPiece on one word: the longest vocabulary entry at each position (``##`` after the
        first); the whole word is ``[UNK]`` if it is too long or some position matches nothing."""
        if len(word) > self.max_chars:
            return (self.unk_id,)
        out, start, vocab = [], 0, self.vocab
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                found = vocab.get(piece)
                if found is not None:
                    break
            else:
                return (self.unk_id,)
            out.append(found)
            start = end
        return tuple(out)

    def __reduce__(self) -> Any:  # a child process gets the vocabulary, not the words remembered here
        return (type(self), (self.vocab, self.unk_id, self.prefix, self.max_chars))


class AsciiWordPiece:
    """A BERT WordPiece tokenizer's content ids (no special tokens, no truncation) for the ASCII
    texts of a chunk, in one pass over the joined chunk."""

    def __init__(self, vocab: dict[str, int], unk_id: int, prefix: str, max_chars: int, lower: bool,
                 added: Sequence[str]) -> None:
        self.codes = _Codes(vocab, unk_id, prefix, max_chars)
        #: ``of`` takes only tokenizers that clean text (the separator is a control character it removes)
        self.normalizer = AsciiBertNormalizer(True, lower, added)

    @property
    def lower(self) -> bool:
        """Whether the tokenizer lower-cases."""
        return self.normalizer.lower

    @classmethod
    def of(cls, full: Tokenizer) -> "AsciiWordPiece | None":
        """The shortcut for ``full``, or None unless it is BertNormalizer (cleaning text) +
        BertPreTokenizer + WordPiece."""
        config = json.loads(full.to_str())
        normalizer = config.get("normalizer") or {}
        model = config.get("model") or {}
        if (normalizer.get("type") != "BertNormalizer" or not normalizer.get("clean_text", True)
                or (config.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer"
                or model.get("type") != "WordPiece" or model.get("unk_token") not in model.get("vocab", {})):
            return None
        vocab = model["vocab"]
        added = [token["content"] for token in config.get("added_tokens") or []]
        return cls(vocab, vocab[model["unk_token"]], model.get("continuing_subword_prefix", "##"),
                   int(model.get("max_input_chars_per_word", 100)), bool(normalizer.get("lowercase", True)), added)

    def prepare(self, text: object) -> str | None:
        """``text`` as BertNormalizer leaves it (``AsciiBertNormalizer``; no separator survives it),
        or None where this does not apply."""
        return self.normalizer.prepare(text)

    def content(self, texts: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The texts this covers (their positions, int64), their content ids (int32, flat, in
        order) and content lengths (int64). The rest is the caller's to tokenize."""
        try:
            joined = _JOIN.join(texts)
        except TypeError:  # some input is not a str: text by text
            return self._some(texts)
        if joined.isascii():  # (constant time: Python knows a str's widest character)
            raw = joined.encode("ascii")
            if len(raw) - len(raw.translate(None, _CONTROL_BYTES)) == len(texts) - 1:  # the separators alone
                folded = joined.lower()
                if not self.normalizer.holds_added(folded):
                    return (np.arange(len(texts), dtype=np.int64),
                            *self._ids(folded if self.lower else joined, len(texts), raw))
        return self._some(texts)

    def _some(self, texts: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``content`` text by text: the ones ``prepare`` takes, joined once prepared."""
        prepared = [self.prepare(text) for text in texts]
        taken = [i for i, text in enumerate(prepared) if text is not None]
        ids, lengths = self._ids(_JOIN.join([prepared[i] for i in taken]), len(taken))  # type: ignore[misc]
        return np.asarray(taken, dtype=np.int64), ids, lengths

    def _ids(self, joined: str, n: int, raw: bytes | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Content ids and lengths of the ``n`` prepared texts in ``joined`` (``raw``: its bytes)."""
        if n == 0:
            return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
        raw = joined.encode("ascii") if raw is None else raw
        for mark in set(raw.translate(None, _NOT_PUNCT_BYTES).decode("ascii")):
            joined = joined.replace(mark, f" {mark} ")  # spaced, so that ``split`` isolates it
        pieces = joined.split()
        lookup = self.codes  # this call's own: another thread may replace a full one meanwhile
        if lookup.full():
            self.codes = lookup = _Codes(lookup.vocab, lookup.unk_id, lookup.prefix, lookup.max_chars)
        codes = np.fromiter(map(lookup.__getitem__, pieces), dtype=np.int64, count=len(pieces))
        if (codes < _SEP_CODE).any():
            codes = _expand(codes, lookup.multi)
        seps = np.flatnonzero(codes == _SEP_CODE)
        bounds = np.empty(n + 1, dtype=np.int64)
        bounds[0], bounds[1:-1], bounds[-1] = -1, seps, codes.shape[0]
        lengths = np.diff(bounds) - 1
        ids = np.delete(codes, seps).astype(np.int32) if seps.size else codes.astype(np.int32)
        return ids, lengths


def _expand(codes: np.ndarray, multi: dict[int, tuple[int, ...]]) -> np.ndarray:
    """Codes with each word of several tokens replaced by its ids."""
    where = np.flatnonzero(codes < _SEP_CODE)
    words = [multi[-2 - code] for code in codes[where].tolist()]
    counts = np.ones(codes.shape[0], dtype=np.int64)
    counts[where] = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    out = np.repeat(codes, counts)
    starts = np.zeros(codes.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    sizes = counts[where]
    inside = np.arange(int(sizes.sum()), dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    out[np.repeat(starts[where], sizes) + inside] = np.fromiter(itertools.chain.from_iterable(words),
                                                                dtype=np.int64, count=inside.shape[0])
    return out
