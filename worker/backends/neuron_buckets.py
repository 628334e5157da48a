"""Neuron's static shapes: the (batch, sequence) buckets a model is compiled for, and padding a
batch up to one. Neuron graphs are compiled ahead of time for fixed shapes, so every batch runs
in the smallest bucket that holds it, and batches larger than the largest bucket are split.
Plain numpy, tested without hardware.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from producer.errors import BadInput
from producer.settings import Settings, settings
from worker.backends.base import Batch

DEFAULT_BATCH_SIZES = (1, 4, 8, 16, 32)
DEFAULT_SEQ_LENS = (64, 128, 256, 512)
BATCH_SIZES_ENV = Settings.env_name("neuron_batch_sizes")
SEQ_LENS_ENV = Settings.env_name("neuron_seq_lens")


@dataclass(frozen=True, order=True)
class Bucket:
    """One compiled static shape: ``batch`` rows of ``seq`` tokens."""

    batch: int
    seq: int


@dataclass(frozen=True)
class BucketGrid:
    """The shapes compiled for a model; a batch runs in the smallest bucket that holds it."""

    batch_sizes: tuple[int, ...]
    seq_lens: tuple[int, ...]

    def __post_init__(self) -> None:
        for name, values in (("batch sizes", self.batch_sizes), ("sequence lengths", self.seq_lens)):
            if not values or any(v < 1 for v in values):
                raise BadInput(f"neuron bucket {name} must be positive integers, got {list(values)}")
        object.__setattr__(self, "batch_sizes", tuple(sorted(set(self.batch_sizes))))
        object.__setattr__(self, "seq_lens", tuple(sorted(set(self.seq_lens))))

    @classmethod
    def for_model(cls, max_length: int, batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
                  seq_lens: tuple[int, ...] = DEFAULT_SEQ_LENS) -> "BucketGrid":
        """Sequence buckets up to the model's maximum length, which is always a bucket itself.

        Inputs are truncated to ``max_length`` before they get here, so the grid must reach it,
        and compiling buckets longer than the model accepts would waste compile time.
        """
        lens = tuple(s for s in seq_lens if s < max_length) + (max_length,)
        return cls(tuple(batch_sizes), lens)

    @classmethod
    def from_env(cls, max_length: int, environ: Mapping[str, str] | None = None) -> "BucketGrid":
        """The grid from the settings ``EMBEDFLEET_NEURON_BATCH_SIZES`` / ``_SEQ_LENS`` (or the
        mapping given, for tests), else the defaults."""
        if environ is None:
            batch_raw, seq_raw = settings().neuron_batch_sizes, settings().neuron_seq_lens
        else:
            batch_raw, seq_raw = environ.get(BATCH_SIZES_ENV), environ.get(SEQ_LENS_ENV)
        batches = _int_list(batch_raw, BATCH_SIZES_ENV) or DEFAULT_BATCH_SIZES
        lens = _int_list(seq_raw, SEQ_LENS_ENV) or DEFAULT_SEQ_LENS
        return cls.for_model(max_length, batches, lens)

    @property
    def largest(self) -> Bucket:
        return Bucket(self.batch_sizes[-1], self.seq_lens[-1])

    def choose(self, n_rows: int, longest: int) -> Bucket:
        """The smallest bucket for ``n_rows`` inputs of at most ``longest`` tokens.

        More rows than the largest batch bucket get the largest one; ``plan`` splits them.
        """
        if n_rows < 1:
            raise ValueError(f"a batch needs at least one row, got {n_rows}")
        seq = next((s for s in self.seq_lens if s >= longest), None)
        if seq is None:
            raise BadInput(
                f"an input of {longest} tokens is longer than the largest compiled sequence bucket "
                f"({self.seq_lens[-1]}); add a larger one to {SEQ_LENS_ENV}"
            )
        batch = next((b for b in self.batch_sizes if b >= n_rows), self.batch_sizes[-1])
        return Bucket(batch, seq)

    def plan(self, lengths: np.ndarray) -> list[tuple[slice, Bucket]]:
        """Split a batch into row ranges that each fit one bucket (sequence bucket chosen per range)."""
        out = []
        step = self.batch_sizes[-1]
        for start in range(0, len(lengths), step):
            rows = slice(start, min(start + step, len(lengths)))
            chunk = lengths[rows]
            out.append((rows, self.choose(len(chunk), int(chunk.max()))))
        return out


def _int_list(raw: str | None, name: str) -> tuple[int, ...]:
    if raw is None or not raw.strip():
        return ()
    try:
        values = tuple(int(part) for part in raw.replace(" ", "").split(",") if part)
    except ValueError:
        raise BadInput(f"{name}={raw!r}: give comma-separated positive integers, e.g. 1,8,32") from None
    if not values or any(v < 1 for v in values):
        raise BadInput(f"{name}={raw!r}: give comma-separated positive integers, e.g. 1,8,32")
    return values


def pad_to_bucket(batch: Batch, rows: slice, bucket: Bucket, pad_id: int = 0) -> dict[str, np.ndarray]:
    """The inputs of ``batch[rows]`` padded to exactly ``bucket``'s shape (int64, as traced).

    Filler rows get one unmasked pad token rather than none: a fully masked row makes the
    attention softmax divide by zero on some compilers, and their outputs are dropped anyway.
    """
    # The batch is padded to its longest row; a chunk of it needs only its own longest.
    width = int(batch.lengths[rows].max())
    ids = batch.input_ids[rows, :width]
    n = ids.shape[0]
    if n > bucket.batch or width > bucket.seq:
        raise ValueError(f"a batch of {n}x{width} does not fit bucket {bucket.batch}x{bucket.seq}")
    shape = (bucket.batch, bucket.seq)
    out = {
        "input_ids": np.full(shape, pad_id, dtype=np.int64),
        "attention_mask": np.zeros(shape, dtype=np.int64),
        "token_type_ids": np.zeros(shape, dtype=np.int64),
    }
    out["input_ids"][:n, :width] = ids
    out["attention_mask"][:n, :width] = batch.attention_mask[rows, :width]
    out["token_type_ids"][:n, :width] = batch.token_type_ids[rows, :width]
    out["attention_mask"][n:, 0] = 1
    return out
