"""The interface every backend implements, and the batch it receives.

The engine needs little from a backend: run a batch, and say how batches should be shaped
(padded or packed, the budget it prefers). Pooling and heads stay outside, in ``worker.heads``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class Batch:
    """Token ids of several inputs, already padded to ``[n, longest]`` (host memory)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    lengths: np.ndarray

    @property
    def n_real_tokens(self) -> int:
        return int(self.lengths.sum())


class Backend(Protocol):
    """Run batches of one model on one device."""

    name: str
    device: str
    dtype: str
    unpadded: bool
    preferred_batch_tokens: int

    def forward(self, batch: Batch, precise: bool = False) -> np.ndarray:
        """Pooled float32 vectors ``[n, hidden]`` (embed) or logits ``[n, labels]``.

        ``precise`` recomputes in a wider type; the engine asks for it when outputs were not
        finite (fp16 overflow), so a NaN never leaves the worker.
        """
        ...

    def is_out_of_memory(self, error: BaseException) -> bool:
        """Whether ``error`` means the batch did not fit, so the engine splits it."""
        ...

    def close(self) -> None:
        ...
