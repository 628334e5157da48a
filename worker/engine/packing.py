"""A scheduled batch's tokens -> the backend's ``Batch``, with one gather per source block.

The scheduler hands out rows of tokenized blocks (``worker.models.tokenizer.Tokens``, flat ids
plus offsets); this module copies exactly those tokens, in batch order, into the layout the
backend runs: packed (ids, segment ids, positions and ``cu_seqlens`` in one int32 host buffer
that the backend provides, pinned on CUDA, so the host-to-device copy is a single transfer from
it) or padded (``[n, longest]`` matrices, filled by one scatter). No Python loop per input.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np

from worker.backends.base import Batch
from worker.engine.scheduler import Picked
from worker.models.tokenizer import Tokens


class TokenBlock(Protocol):
    """What the scheduler's owners are to this module: a block of tokenized inputs."""

    tokens: Tokens


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """``[n + 1]`` starts of each input in the concatenation (int64)."""
    out = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def gather(picked: Picked, ids_out: np.ndarray, types_out: np.ndarray) -> np.ndarray:
    """Copy the picked inputs' ids and segment ids, concatenated in batch order, into the given
    arrays (``[total]`` each); returns the batch's offsets."""
    cu = offsets_of(picked.lengths)
    for block, part, rows in picked.groups():
        tokens: Tokens = block.tokens
        lo, hi = int(cu[part.start]), int(cu[part.stop])
        shift = np.repeat(tokens.offsets[rows] - cu[part.start:part.stop], picked.lengths[part])
        source = np.arange(lo, hi, dtype=np.int64) + shift
        np.take(tokens.ids, source, out=ids_out[lo:hi])
        if tokens.type_ids is None:
            types_out[lo:hi] = tokens.type_id
        else:
            np.take(tokens.type_ids, source, out=types_out[lo:hi])
    return cu


def pack(picked: Picked, host_buffer: Callable[[int], Any]) -> Batch:
    """A packed batch whose ids, segment ids, positions and ``cu_seqlens`` sit in one int32
    buffer from ``host_buffer(size)`` (``Batch.host``: the backend copies it in one transfer)."""
    n, total = len(picked), int(picked.lengths.sum())
    buffer = host_buffer(3 * total + n + 1)
    flat = np.asarray(buffer)
    ids, types, positions, cu32 = flat[:total], flat[total:2 * total], flat[2 * total:3 * total], flat[3 * total:]
    cu = gather(picked, ids, types)
    cu32[:] = cu
    positions[:] = np.arange(total, dtype=np.int32) - np.repeat(cu[:-1], picked.lengths).astype(np.int32)
    return Batch(input_ids=ids, attention_mask=np.zeros(0, dtype=np.int32), token_type_ids=types,
                 lengths=picked.lengths.astype(np.int32), packed=True, host=buffer)


def pad(picked: Picked, pad_id: int) -> Batch:
    """A padded batch: ``[n, longest]`` ids, segment ids and attention mask."""
    n, total = len(picked), int(picked.lengths.sum())
    flat_ids = np.empty(total, dtype=np.int32)
    flat_types = np.empty(total, dtype=np.int32)
    cu = gather(picked, flat_ids, flat_types)
    longest = int(picked.lengths.max()) if n else 0
    row = np.repeat(np.arange(n), picked.lengths)
    col = np.arange(total) - np.repeat(cu[:-1], picked.lengths)
    ids = np.full((n, longest), pad_id, dtype=np.int32)
    types = np.zeros((n, longest), dtype=np.int32)
    mask = np.zeros((n, longest), dtype=np.int32)
    ids[row, col] = flat_ids
    types[row, col] = flat_types
    mask[row, col] = 1
    return Batch(ids, mask, types, picked.lengths.astype(np.int32))
