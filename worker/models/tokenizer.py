"""Batch tokenization with the model's fast tokenizer (HF ``tokenizers`` releases the GIL).

Inputs are encoded in batches, never one by one, and without padding: the scheduler pads per
batch (or not at all for unpadded backends), so a long text never inflates a short one.

The engine's path is columnar (``encode_tokens``, ``encode_ids_tokens`` -> ``Tokens``): one call
to the Rust tokenizer's batch API for a whole chunk of a request or shard (it spreads the texts
over the cores itself, outside the GIL), and the result kept as flat numpy arrays (ids, offsets,
lengths, truncation flags), so no Python object per text travels further. ``encode`` and
``encode_ids`` give one ``Encoded`` per input: the reference the columnar path is tested
against, and what the token-level calls (``/tokenize``, ``/embed_all``) use.

On the columnar path, ASCII texts of BERT WordPiece tokenizers skip the Rust tokenizer
altogether (``worker.models.wordpiece.AsciiWordPiece``: a whole chunk in a few C string calls and
one dict lookup a word, then ``Tokens.framed`` puts the special tokens and truncation on with
numpy; measured 3.9 against 35.5 µs a short text, ``bench/tokenize_stages.py``). ASCII texts of
other BERT-style tokenizers skip only the Rust normalizer (``AsciiShortcut``): Python's C string
methods give the same normalized text in a fraction of the time, and the Rust side then only splits
and looks up words (normalizing was about a third of the tokenizer's time on short texts).
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

from producer.errors import UnsupportedModel
from worker.models.wordpiece import AsciiBertNormalizer, AsciiWordPiece


@dataclass(frozen=True)
class Encoded:
    """One tokenized input: ids and segment ids (int32), and whether truncation cut it."""

    ids: np.ndarray
    type_ids: np.ndarray
    truncated: bool

    @property
    def n_tokens(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True)
class Tokens:
    """Many tokenized inputs as flat arrays: input ``i`` is ``ids[offsets[i]:offsets[i + 1]]``.

    ``type_ids`` is ``None`` when every token has the segment id ``type_id`` (single texts: no
    need to carry a second array of the same constant). ``truncated[i]`` says whether the model's
    maximum length cut input ``i``.
    """

    ids: np.ndarray  # int32 [total]
    offsets: np.ndarray  # int64 [n + 1]
    truncated: np.ndarray  # bool [n]
    type_ids: np.ndarray | None = None  # int32 [total], or None: all ``type_id``
    type_id: int = 0

    def __len__(self) -> int:
        return int(self.truncated.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per input (int64)."""
        return np.diff(self.offsets)

    def token_types(self) -> np.ndarray:
        """``type_ids`` as an array, filled with the constant where none is carried."""
        if self.type_ids is not None:
            return self.type_ids
        return np.full(self.ids.shape[0], self.type_id, dtype=np.int32)

    @classmethod
    def from_lists(cls, ids: list[list[int]], truncated: np.ndarray, type_ids: list[list[int]] | None = None,
                   type_id: int = 0) -> "Tokens":
        """Flatten per-input id lists (one pass in C over the chained lists)."""
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=total)
        types = None
        if type_ids is not None:
            types = np.fromiter(itertools.chain.from_iterable(type_ids), dtype=np.int32, count=total)
        return cls(flat, offsets, np.asarray(truncated, dtype=bool), types, type_id)

    @classmethod
    def framed(cls, content: np.ndarray, lengths: np.ndarray, prefix: Sequence[int], suffix: Sequence[int],
               room: int, type_id: int = 0) -> "Tokens":
        """Inputs whose content ids are ``content`` (flat, ``lengths`` each), each cut to its first
        ``room`` tokens (``truncated`` where that cut something) and put between ``prefix`` and
        ``suffix``: the Rust tokenizer's truncation and special tokens for single texts, in numpy."""
        kept = np.minimum(lengths, room)
        truncated = lengths > room
        offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
        np.cumsum(kept + (len(prefix) + len(suffix)), out=offsets[1:])
        ids = np.empty(int(offsets[-1]), dtype=np.int32)
        body = np.ones(ids.shape[0], dtype=bool)
        for k, token in enumerate(prefix):
            ids[offsets[:-1] + k] = token
            body[offsets[:-1] + k] = False
        for k, token in enumerate(suffix):
            ids[offsets[1:] - len(suffix) + k] = token
            body[offsets[1:] - len(suffix) + k] = False
        if truncated.any():
            starts = np.zeros(lengths.shape[0], dtype=np.int64)
            np.cumsum(lengths[:-1], out=starts[1:])
            kept_starts = np.cumsum(kept) - kept
            content = content[np.arange(int(kept.sum()), dtype=np.int64) + np.repeat(starts - kept_starts, kept)]
        ids[body] = content
        return cls(ids, offsets, truncated, None, type_id)

    @classmethod
    def merge(cls, n: int, parts: Sequence[tuple[np.ndarray, "Tokens"]]) -> "Tokens":
        """One ``Tokens`` of ``n`` inputs from parts that each hold the inputs at their positions."""
        lengths = np.zeros(n, dtype=np.int64)
        truncated = np.zeros(n, dtype=bool)
        for positions, tokens in parts:
            lengths[positions] = tokens.lengths
            truncated[positions] = tokens.truncated
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.empty(int(offsets[-1]), dtype=np.int32)
        constant = {tokens.type_id for _, tokens in parts if len(tokens)}
        shared = len(constant) <= 1 and all(tokens.type_ids is None for _, tokens in parts)
        types = None if shared else np.empty(ids.shape[0], dtype=np.int32)
        for positions, tokens in parts:
            where = np.arange(tokens.ids.shape[0], dtype=np.int64) + np.repeat(
                offsets[positions] - tokens.offsets[:-1], tokens.lengths)
            ids[where] = tokens.ids
            if types is not None:
                types[where] = tokens.token_types()
        return cls(ids, offsets, truncated, types, next(iter(constant), 0) if shared else 0)


class AsciiShortcut:
    """BertNormalizer done in Python for ASCII texts, and the same tokenizer without its normalizer.

    The normalizing is ``worker.models.wordpiece.AsciiBertNormalizer`` (``str.translate`` and
    ``str.lower`` in C, without the Rust side's per-character alignment bookkeeping); a non-ASCII
    text, or one holding an added token's content, takes the full path instead. The result is the
    full tokenizer's, id for id (tests/models/test_tokenizer.py checks every ASCII character).
    """

    def __init__(self, tokenizer: Tokenizer, clean: bool, lower: bool, added: list[str]) -> None:
        self.tokenizer = tokenizer
        self.normalizer = AsciiBertNormalizer(clean, lower, added)

    @classmethod
    def of(cls, full: Tokenizer) -> "AsciiShortcut | None":
        """The shortcut for ``full`` (truncation and post-processing included), or None when its
        normalizer is not BertNormalizer."""
        config = json.loads(full.to_str())
        normalizer = config.get("normalizer") or {}
        if normalizer.get("type") != "BertNormalizer":
            return None
        config["normalizer"] = None
        added = [token["content"] for token in config.get("added_tokens") or []]
        return cls(Tokenizer.from_str(json.dumps(config)), bool(normalizer.get("clean_text", True)),
                   bool(normalizer.get("lowercase", True)), added)

    def prepare(self, text: object) -> str | None:
        """``text`` as BertNormalizer leaves it, or None where the shortcut does not apply."""
        return self.normalizer.prepare(text)

    def encode(self, full: Tokenizer, inputs: list, add_special_tokens: bool) -> list:
        """``full.encode_batch`` of ``inputs``, the ASCII ones through the shortcut (same ids)."""
        prepared = [self.prepare(text) for text in inputs]
        quick = [i for i, text in enumerate(prepared) if text is not None]
        if len(quick) == len(inputs):
            return _encode_batch(self.tokenizer, prepared, add_special_tokens)
        out = _encode_batch(full, inputs, add_special_tokens) if not quick else [None] * len(inputs)
        if quick:
            rest = [i for i, text in enumerate(prepared) if text is None]
            for i, enc in zip(quick, _encode_batch(self.tokenizer, [prepared[i] for i in quick], add_special_tokens)):
                out[i] = enc
            for i, enc in zip(rest, _encode_batch(full, [inputs[i] for i in rest], add_special_tokens)):
                out[i] = enc
        return out


def _encode_batch(tokenizer: Tokenizer, inputs: list, add_special_tokens: bool) -> list:
    """``encode_batch_fast`` (no character offsets: not needed here) where the library has it."""
    if not inputs:
        return []
    fast = getattr(tokenizer, "encode_batch_fast", None)
    if fast is not None:
        return fast(inputs, add_special_tokens=add_special_tokens)
    return tokenizer.encode_batch(inputs, add_special_tokens=add_special_tokens)


class BatchTokenizer:
    """The model's fast tokenizer, truncating at the model's maximum length.

    ``frame`` (a decoder reranker's prompt head and tail, ``worker.models.qwen3_reranker``) is
    tokenized once and put around every input, outside truncation: a long input loses its end,
    never the tail that asks for the answer. Framed inputs get no other special tokens.
    """

    def __init__(self, path: Path, max_length: int, frame: tuple[str, str] = ("", "")) -> None:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path), use_fast=True)
        if not getattr(hf, "is_fast", False):
            raise UnsupportedModel(f"model at {path}: only fast (Rust) tokenizers are supported")
        self.pad_id = int(hf.pad_token_id if hf.pad_token_id is not None else 0)
        self.max_length = max_length
        self.vocab_size = len(hf)
        backend: Tokenizer = hf.backend_tokenizer
        self._tokenizer = Tokenizer.from_str(backend.to_str())
        self._tokenizer.no_padding()
        self._head = self._tokenizer.encode(frame[0], add_special_tokens=False).ids if frame[0] else []
        self._tail = self._tokenizer.encode(frame[1], add_special_tokens=False).ids if frame[1] else []
        room = max_length - len(self._head) - len(self._tail)
        if room < 1:
            raise UnsupportedModel(f"model at {path}: its prompt template alone is {max_length - room} tokens, "
                                   f"more than its maximum of {max_length}")
        self._tokenizer.enable_truncation(room, strategy="longest_first")
        #: ASCII texts skip the Rust normalizer on the columnar path (None: not a BertNormalizer)
        self._ascii = AsciiShortcut.of(self._tokenizer)
        #: ... and skip the Rust tokenizer altogether where it is WordPiece (None: it is not)
        self._wordpiece = AsciiWordPiece.of(self._tokenizer)

    def encode(self, inputs: Sequence[str] | Sequence[tuple[str, str]]) -> list[Encoded]:
        """Encode a batch of texts or (query, document) pairs."""
        framed = bool(self._head or self._tail)
        encodings = self._tokenizer.encode_batch(list(inputs), add_special_tokens=not framed)
        if framed:
            return [self._framed(enc.ids, bool(enc.overflowing)) for enc in encodings]
        return [
            Encoded(
                ids=np.asarray(enc.ids, dtype=np.int32),
                type_ids=np.asarray(enc.type_ids, dtype=np.int32),
                truncated=bool(enc.overflowing),
            )
            for enc in encodings
        ]

    def encode_tokens(self, inputs: Sequence[str] | Sequence[tuple[str, str]]) -> Tokens:
        """Encode a batch of texts or pairs in one call, as flat arrays (the engine's path).

        Same ids, truncation and token counts as ``encode``. Segment ids are read only where they
        vary (pairs); truncation is read only off the inputs that reached the limit (truncation
        always leaves an input exactly at it), so the per-input work is the ids list alone.
        """
        framed = bool(self._head or self._tail)
        pairs = bool(inputs) and not isinstance(inputs[0], str)
        # A single text goes to Rust: its one call costs less than the chunk path's fixed numpy
        # calls (measured 26 against 41 µs a call for a 10-word query; from 4 texts on, 95 against 48).
        if self._wordpiece is not None and len(inputs) > 1 and not pairs and (framed or self._leaves_room):
            return self._wordpiece_tokens(list(inputs), framed)
        return self._rust_tokens(list(inputs), framed, pairs)

    def _wordpiece_tokens(self, texts: list, framed: bool) -> Tokens:
        """``encode_tokens`` of single texts: the ASCII ones by ``AsciiWordPiece`` (the Rust
        tokenizer's truncation and special tokens applied by ``Tokens.framed``), the rest by Rust."""
        assert self._wordpiece is not None
        taken, content, lengths = self._wordpiece.content(texts)
        prefix, suffix, type_id = (self._head, self._tail, 0) if framed else self._special_frame
        room = self.max_length - len(prefix) - len(suffix)  # what truncation leaves the content, either way
        quick = Tokens.framed(content, lengths, prefix, suffix, room, type_id)
        if taken.shape[0] == len(texts):
            return quick
        rest = np.setdiff1d(np.arange(len(texts), dtype=np.int64), taken, assume_unique=True)
        slow = self._rust_tokens([texts[i] for i in rest.tolist()], framed, False)
        return Tokens.merge(len(texts), [(taken, quick), (rest, slow)])

    def _rust_tokens(self, inputs: list, framed: bool, pairs: bool) -> Tokens:
        """``encode_tokens`` by the Rust tokenizer (ASCII single texts through ``AsciiShortcut``)."""
        encodings = self._encode_fast(inputs, add_special_tokens=not framed)
        ids = [enc.ids for enc in encodings]
        room = self._tokenizer.truncation["max_length"] if self._tokenizer.truncation else None
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        truncated = np.zeros(len(ids), dtype=bool)
        if room is not None:
            for i in np.flatnonzero(lengths >= room):
                truncated[i] = bool(encodings[i].overflowing)
        if framed:
            head, tail = self._head, self._tail
            return Tokens.from_lists([head + x + tail for x in ids], truncated)
        if pairs or not self._constant_type:
            return Tokens.from_lists(ids, truncated, [enc.type_ids for enc in encodings])
        return Tokens.from_lists(ids, truncated, type_id=self._special_frame[2])

    def _encode_fast(self, inputs: list, add_special_tokens: bool) -> list:
        """The columnar path's encodings: single ASCII texts through ``AsciiShortcut`` where it
        applies, everything else (pairs, other texts) through the full tokenizer."""
        if self._ascii is not None and inputs and isinstance(inputs[0], str):
            return self._ascii.encode(self._tokenizer, inputs, add_special_tokens)
        return _encode_batch(self._tokenizer, inputs, add_special_tokens)

    @functools.cached_property
    def _leaves_room(self) -> bool:
        """Whether ``_wordpiece_tokens`` may frame single texts: their tokens share one segment id,
        and the maximum length leaves room for content beside the special tokens (below that the
        Rust tokenizer's own rules apply: it does not truncate at all)."""
        try:
            prefix, suffix, _ = self._special_frame
        except UnsupportedModel:
            return False
        return self._constant_type and self.max_length > len(prefix) + len(suffix)

    @functools.cached_property
    def _constant_type(self) -> bool:
        """Whether a single text's tokens all share one segment id (so none need carrying)."""
        return len(set(self._tokenizer.encode("probe", add_special_tokens=True).type_ids)) <= 1

    def _framed(self, ids: list[int], truncated: bool) -> Encoded:
        full = np.asarray(self._head + ids + self._tail, dtype=np.int32)
        return Encoded(ids=full, type_ids=np.zeros(len(full), dtype=np.int32), truncated=truncated)

    @functools.cached_property
    def _special_frame(self) -> tuple[list[int], list[int], int]:
        """The special tokens a single text gets (prefix ids, suffix ids, content type id),
        read off a probe encoding so it holds for any post-processor template."""
        probe = self._tokenizer.encode("probe", add_special_tokens=True)
        content = self._tokenizer.encode("probe", add_special_tokens=False).ids
        ids = probe.ids
        for start in range(len(ids) - len(content) + 1):
            if ids[start : start + len(content)] == content:
                return ids[:start], ids[start + len(content) :], probe.type_ids[start] if content else 0
        raise UnsupportedModel("cannot tell where this tokenizer puts its special tokens")

    def encode_ids(self, inputs: Sequence[Sequence[int]]) -> list[Encoded]:
        """Wrap pre-tokenized ids for the model, as the text they came from would be.

        Ids as a tokenizer gives them already carry the model's special tokens ([CLS] ... [SEP]):
        those are used as they are. Ids without them (as OpenAI clients send tiktoken-style ids)
        get them added; a frame present at one end only is completed at the other. Either way the
        content is cut so that, framed, it fits ``max_length``.
        """
        prefix, suffix, type_id = self._special_frame
        room = self.max_length - len(prefix) - len(suffix)
        out = []
        for ids in inputs:
            content = list(ids)
            if prefix and content[: len(prefix)] == prefix:
                content = content[len(prefix):]
            if suffix and len(content) >= len(suffix) and content[-len(suffix):] == suffix:
                content = content[: -len(suffix)]
            full = prefix + content[:room] + suffix
            out.append(Encoded(ids=np.asarray(full, dtype=np.int32),
                               type_ids=np.full(len(full), type_id, dtype=np.int32),
                               truncated=len(content) > room))
        return out

    def encode_ids_tokens(self, inputs: Sequence[Sequence[int]]) -> Tokens:
        """``encode_ids`` as flat arrays: the same ids, truncation and counts (the engine's path)."""
        prefix, suffix, type_id = self._special_frame
        room = self.max_length - len(prefix) - len(suffix)
        ids: list[list[int]] = []
        truncated = np.zeros(len(inputs), dtype=bool)
        for i, given in enumerate(inputs):
            content = list(given)
            if prefix and content[: len(prefix)] == prefix:
                content = content[len(prefix):]
            if suffix and len(content) >= len(suffix) and content[-len(suffix):] == suffix:
                content = content[: -len(suffix)]
            truncated[i] = len(content) > room
            ids.append(prefix + content[:room] + suffix)
        return Tokens.from_lists(ids, truncated, type_id=type_id)
