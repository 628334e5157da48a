"""The interface every backend implements, and the batch it receives.

The engine needs little from a backend: run a batch, and say how batches should be shaped
(padded or packed, the budget it prefers). Pooling and heads stay outside, in ``worker.models.heads``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass
class Batch:
    """Token ids of several inputs (host memory).

    Padded (the default): ``input_ids``/``token_type_ids``/``attention_mask`` are ``[n, longest]``.
    Packed (``packed=True``, for backends with ``unpadded = True``): ``input_ids`` and
    ``token_type_ids`` are the ``[total]`` concatenation of every input's tokens,
    ``attention_mask`` is empty, and ``lengths`` delimits the inputs. ``staged`` holds what a
    backend already copied to its device ahead of time (see ``Backend.stage``).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    lengths: np.ndarray
    packed: bool = False
    staged: Any = None

    @property
    def n_real_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def cu_seqlens(self) -> np.ndarray:
        """``[n + 1]`` int32 offsets of each input in the packed layout."""
        out = np.zeros(len(self.lengths) + 1, dtype=np.int32)
        np.cumsum(self.lengths, out=out[1:])
        return out

    @classmethod
    def pack(cls, ids: list[np.ndarray], type_ids: list[np.ndarray]) -> "Batch":
        """A packed batch from per-input token arrays: no padding at all."""
        lengths = np.array([len(x) for x in ids], dtype=np.int32)
        return cls(
            input_ids=np.concatenate(ids).astype(np.int32, copy=False),
            attention_mask=np.zeros(0, dtype=np.int32),
            token_type_ids=np.concatenate(type_ids).astype(np.int32, copy=False),
            lengths=lengths,
            packed=True,
        )


class Backend(Protocol):
    """Run batches of one model on one device."""

    name: str
    device: str
    dtype: str
    unpadded: bool
    preferred_batch_tokens: int

    # Optional: ``stage(batch) -> Any`` copies a batch's tensors to the device on a side stream
    # (called from the engine's preparer thread, so the copy overlaps the running batch).
    # Optional: ``asynchronous: bool``, true when batches run asynchronously to the host (CUDA):
    # the engine then forms batches ahead of the device; otherwise only when it is free.

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


def cpu_threads() -> int:
    """Cores this process may use (cgroup/affinity aware); ``OMP_NUM_THREADS`` overrides."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)
