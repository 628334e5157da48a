"""Batch tokenization with the model's fast tokenizer (HF ``tokenizers`` releases the GIL).

Inputs are encoded in batches, never one by one, and without padding: the scheduler pads per
batch (or not at all for unpadded backends), so a long text never inflates a short one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer


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
    """The model's fast tokenizer, truncating at the model's maximum length."""

    def __init__(self, path: Path, max_length: int) -> None:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path), use_fast=True)
        if not getattr(hf, "is_fast", False):
            raise ValueError(f"model at {path}: only fast (Rust) tokenizers are supported")
        self.pad_id = int(hf.pad_token_id if hf.pad_token_id is not None else 0)
        self.max_length = max_length
        backend: Tokenizer = hf.backend_tokenizer
        self._tokenizer = Tokenizer.from_str(backend.to_str())
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length, strategy="longest_first")

    def encode(self, inputs: Sequence[str] | Sequence[tuple[str, str]]) -> list[Encoded]:
        """Encode a batch of texts or (query, document) pairs."""
        encodings = self._tokenizer.encode_batch(list(inputs), add_special_tokens=True)
        return [
            Encoded(
                ids=np.asarray(enc.ids, dtype=np.int32),
                type_ids=np.asarray(enc.type_ids, dtype=np.int32),
                truncated=bool(enc.overflowing),
            )
            for enc in encodings
        ]
