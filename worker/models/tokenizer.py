"""Batch tokenization with the model's fast tokenizer (HF ``tokenizers`` releases the GIL).

Inputs are encoded in batches, never one by one, and without padding: the scheduler pads per
batch (or not at all for unpadded backends), so a long text never inflates a short one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

from producer.errors import UnsupportedModel


@dataclass(frozen=True)
class Encoded:
    """One tokenized input: ids and segment ids (int32), and whether truncation cut it."""

    ids: np.ndarray
    type_ids: np.ndarray
    truncated: bool

    @property
    def n_tokens(self) -> int:
        return int(self.ids.shape[0])


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
