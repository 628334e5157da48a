"""The output types an embedding model can give, and their shapes in memory and on the wire.

* ``dense``: one vector per input (``[n, dims]`` float32), what every embedding model gives.
* ``sparse``: per input, token ids with a weight each (a lexical or SPLADE vector over the
  vocabulary): indices ``int32`` sorted ascending, values ``float32``, zero weights dropped.
  ``SparseRows`` holds a batch of them in CSR form (one offsets array, one indices array, one
  values array), the layout scipy, Arrow's list arrays and the wire all use, so no per-row
  Python object is needed to move them.
* ``multivector``: per input, one vector per token (ColBERT): ``[n_vectors_i, d]`` float32.
  ``MultiVectors`` holds a batch as one ``[sum n_vectors_i, d]`` array plus offsets.

A job asks for outputs by name (``Options.outputs``); the model says which it offers and which it
gives when none are named (``worker.models.resolve.ModelInfo``). On the wire (``InlineResult``)
each array travels as base64 of its little-endian bytes, so nothing is rounded on the way.
This module is shared by both sides and imports nothing from the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import pybase64

OutputName = Literal["dense", "sparse", "multivector"]
#: Every output type, in the order columns and answers list them.
OUTPUTS: tuple[str, ...] = ("dense", "sparse", "multivector")
DENSE_ONLY: tuple[str, ...] = ("dense",)


def canonical_outputs(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` without repeats, in ``OUTPUTS`` order; an unknown or empty choice is an error."""
    chosen = [str(name).strip().lower() for name in names if str(name).strip()]
    unknown = [name for name in chosen if name not in OUTPUTS]
    if unknown:
        raise ValueError(f"outputs: unknown output {unknown[0]!r}; choose from {', '.join(OUTPUTS)}")
    if not chosen:
        raise ValueError(f"outputs: name at least one of {', '.join(OUTPUTS)}")
    return tuple(name for name in OUTPUTS if name in chosen)


def parse_outputs(text: str | None) -> tuple[str, ...] | None:
    """``"dense,sparse"`` (a CLI flag) as canonical names; ``None`` or ``""``: the model's default."""
    if text is None or not text.strip():
        return None
    return canonical_outputs(text.split(","))


def to_b64(array: np.ndarray, dtype: str) -> str:
    """Base64 of ``array``'s bytes as ``dtype`` (little-endian on the wire): exact, a quarter of JSON floats."""
    return pybase64.b64encode_as_string(np.ascontiguousarray(array, dtype=dtype).tobytes())


def from_b64(data: str, dtype: str) -> np.ndarray:
    """``to_b64`` undone: a read-only view of the decoded bytes as ``dtype``."""
    return np.frombuffer(pybase64.b64decode(data), dtype=dtype)


def _offsets(counts: Sequence[int]) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(np.asarray(counts, dtype=np.int64), out=out[1:])
    return out


def _gather(offsets: np.ndarray, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """For CSR ``offsets``: the flat positions of ``rows``' entries, in row order, and the new offsets."""
    rows = np.asarray(list(rows), dtype=np.int64)
    starts, counts = offsets[rows], offsets[rows + 1] - offsets[rows]
    new_offsets = _offsets(counts)
    within = np.arange(int(new_offsets[-1]), dtype=np.int64) - np.repeat(new_offsets[:-1], counts)
    return np.repeat(starts, counts) + within, new_offsets


@dataclass(frozen=True)
class SparseVector:
    """One input's sparse vector: ``indices`` (int32, ascending) and their ``values`` (float32).

    It unpacks as the pair ``indices, values = vector``."""

    indices: np.ndarray
    values: np.ndarray

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.indices, self.values))

    def as_dict(self) -> dict[int, float]:
        """``{token id: weight}``, as FlagEmbedding's lexical weights (with int keys)."""
        return {int(i): float(v) for i, v in zip(self.indices, self.values)}


@dataclass(frozen=True)
class SparseRows:
    """Sparse vectors of ``n`` inputs in CSR form over a vocabulary of ``vocab_size`` ids."""

    offsets: np.ndarray  # [n + 1] int64
    indices: np.ndarray  # [nnz] int32
    values: np.ndarray  # [nnz] float32
    vocab_size: int

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[np.ndarray, np.ndarray]], vocab_size: int) -> "SparseRows":
        """Rows from per-input ``(indices, values)`` pairs (each already sorted, zeros dropped)."""
        indices = [np.asarray(i, dtype=np.int32) for i, _ in pairs]
        values = [np.asarray(v, dtype=np.float32) for _, v in pairs]
        return cls(
            offsets=_offsets([len(i) for i in indices]),
            indices=np.concatenate(indices) if indices else np.zeros(0, np.int32),
            values=np.concatenate(values) if values else np.zeros(0, np.float32),
            vocab_size=int(vocab_size),
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> SparseVector:
        start, stop = int(self.offsets[row]), int(self.offsets[row + 1])
        return SparseVector(self.indices[start:stop], self.values[start:stop])

    def __iter__(self) -> Iterator[SparseVector]:
        return (self[row] for row in range(len(self)))

    @property
    def counts(self) -> list[int]:
        return np.diff(self.offsets).astype(int).tolist()

    def take(self, rows: Sequence[int]) -> "SparseRows":
        """The rows ``rows``, in that order (one gather, no loop per row)."""
        picked, offsets = _gather(self.offsets, rows)
        return SparseRows(offsets, self.indices[picked], self.values[picked], self.vocab_size)

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.csr_matrix`` ``[n, vocab_size]`` (scipy is imported only here)."""
        from scipy.sparse import csr_matrix

        return csr_matrix((self.values, self.indices, self.offsets), shape=(len(self), self.vocab_size))

    def to_wire(self) -> dict[str, Any]:
        return {"sparse_counts": self.counts, "sparse_indices_b64": to_b64(self.indices, "<i4"),
                "sparse_values_b64": to_b64(self.values, "<f4"), "vocab_size": self.vocab_size}

    @classmethod
    def from_wire(cls, counts: Sequence[int], indices_b64: str, values_b64: str, vocab_size: int) -> "SparseRows":
        return cls(_offsets(counts), from_b64(indices_b64, "<i4").astype(np.int32),
                   from_b64(values_b64, "<f4").astype(np.float32), int(vocab_size))


@dataclass(frozen=True)
class MultiVectors:
    """Per-token vectors of ``n`` inputs: ``vectors[offsets[i]:offsets[i + 1]]`` are input ``i``'s."""

    offsets: np.ndarray  # [n + 1] int64
    vectors: np.ndarray  # [total, dims] float32

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray], dims: int) -> "MultiVectors":
        kept = [np.asarray(a, dtype=np.float32).reshape(-1, dims) for a in arrays]
        flat = np.concatenate(kept) if kept else np.zeros((0, dims), np.float32)
        return cls(_offsets([len(a) for a in kept]), np.ascontiguousarray(flat))

    @property
    def dims(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> np.ndarray:
        return self.vectors[int(self.offsets[row]):int(self.offsets[row + 1])]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[row] for row in range(len(self)))

    @property
    def counts(self) -> list[int]:
        return np.diff(self.offsets).astype(int).tolist()

    def take(self, rows: Sequence[int]) -> "MultiVectors":
        """The rows ``rows``, in that order (one gather, no loop per row)."""
        picked, offsets = _gather(self.offsets, rows)
        return MultiVectors(offsets, np.ascontiguousarray(self.vectors[picked]))

    def to_wire(self) -> dict[str, Any]:
        return {"multivector_counts": self.counts, "multivector_dims": self.dims,
                "multivector_b64": to_b64(self.vectors, "<f4")}

    @classmethod
    def from_wire(cls, counts: Sequence[int], dims: int, data_b64: str) -> "MultiVectors":
        flat = from_b64(data_b64, "<f4").astype(np.float32).reshape(-1, max(1, int(dims)))
        return cls(_offsets(counts), flat)


@dataclass(frozen=True)
class Embeddings:
    """What ``Client.embed(..., outputs=...)`` returns: the outputs asked for (others ``None``).

    ``dense`` is ``[n, dims]``; ``sparse[i]`` is an ``(indices, values)`` pair
    (``sparse.to_scipy()`` for a CSR matrix); ``multivector[i]`` is ``[n_vectors_i, d]``."""

    dense: np.ndarray | None = None
    sparse: SparseRows | None = None
    multivector: MultiVectors | None = None
