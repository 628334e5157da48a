"""The interface every backend implements, the batch it receives, and the one dtype table.

Everything the engine asks of a backend is declared here, with defaults, so the engine never
probes for optional methods: run a batch (``forward``, or ``launch`` for backends that run
asynchronously to the host), say how batches should be shaped (``unpadded``, the budget it
prefers), copy a batch ahead (``stage``), and, for backends on a device with its own memory, let
``worker.engine.memory`` measure what a batch costs (``memory_device``). Pooling and heads stay
outside, in ``worker.models.heads``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from producer.errors import BadInput, Unavailable
from producer.outputs import DENSE_ONLY
from producer.settings import omp_threads


class BackendUnavailable(Unavailable):
    """The backend exists but cannot run here (its package or hardware is missing)."""

    code = "backend_unavailable"


#: Every spelling of a dtype that ``--dtype`` accepts, to its canonical name. Backends map the
#: canonical names they run to their own types and refuse the others by name.
DTYPES = {
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16",
    "int8": "int8", "qint8": "int8",
}


def canonical_dtype(dtype: str, accepted: tuple[str, ...] = ("float32", "bfloat16", "float16", "int8"),
                    backend: str = "") -> str:
    """``dtype``'s canonical name (``auto`` stays ``auto``); one outside ``accepted`` is an error."""
    if dtype == "auto":
        return "auto"
    name = DTYPES.get(dtype.lower())
    if name is None or name not in accepted:
        where = f" by the {backend} backend" if backend else ""
        raise BadInput(f"dtype {dtype!r} is not supported{where}; choose auto or one of {', '.join(accepted)}",
                       param="dtype")
    return name


@dataclass
class Batch:
    """Token ids of several inputs (host memory).

    Padded (the default): ``input_ids``/``token_type_ids``/``attention_mask`` are ``[n, longest]``.
    Packed (``packed=True``, for backends with ``unpadded = True``): ``input_ids`` and
    ``token_type_ids`` are the ``[total]`` concatenation of every input's tokens,
    ``attention_mask`` is empty, and ``lengths`` delimits the inputs. ``host`` is set
    when the engine packed the batch into a buffer of the backend's (``Backend.host_buffer``):
    int32 ``[ids | type ids | positions | cu_seqlens]``, which the views above point into.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    lengths: np.ndarray
    packed: bool = False
    host: Any = None

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

    @classmethod
    def synthetic(cls, tokens: int, seq_len: int, packed: bool, seed: int = 0) -> "Batch":
        """Random ids filling ``tokens`` in sequences of ``seq_len`` (the worst case for memory)."""
        seq_len = max(1, min(seq_len, tokens))
        n = max(1, tokens // seq_len)
        rng = np.random.default_rng(seed)
        ids = [rng.integers(1000, 21000, size=seq_len, dtype=np.int32) for _ in range(n)]
        types = [np.zeros(seq_len, dtype=np.int32) for _ in range(n)]
        if packed:
            return cls.pack(ids, types)
        stacked = np.stack(ids)
        return cls(stacked, np.ones_like(stacked), np.stack(types), np.full(n, seq_len, dtype=np.int32))


@dataclass
class BatchOutputs:
    """What a batch gives when more than dense vectors are asked for (``Backend.launch_outputs``):
    per output, one entry per input of the batch, in its order; ``None`` for outputs not asked for.

    ``dense``: pooled vectors ``[n, hidden]`` as ``forward`` gives them (normalization and
    Matryoshka follow in the engine); ``sparse``: per input an ``(indices int32 ascending, values
    float32)`` pair, zeros dropped; ``multivector``: per input ``[n_vectors, d]`` float32.
    """

    dense: np.ndarray | None = None
    sparse: list[tuple[np.ndarray, np.ndarray]] | None = None
    multivector: list[np.ndarray] | None = None

    def finite_rows(self) -> np.ndarray:
        """Per input, whether every value it got is finite (a NaN never leaves the worker)."""
        n = len(self.dense) if self.dense is not None else len(self.sparse or self.multivector or [])
        ok = np.ones(n, dtype=bool)
        if self.dense is not None:
            ok &= np.isfinite(self.dense).all(axis=1)
        for rows in (self.multivector, [values for _, values in self.sparse] if self.sparse is not None else None):
            if rows is not None:
                ok &= np.array([bool(np.isfinite(r).all()) for r in rows], dtype=bool)
        return ok


class MemoryDevice(Protocol):
    """A device whose memory a batch budget is sized to (``worker.engine.memory`` drives it)."""

    name: str

    def free_bytes(self) -> int:
        """Free memory now, after releasing cached blocks."""
        ...

    def reset_peak(self) -> int:
        """Wait for the device, start a new peak count; returns the bytes allocated now."""
        ...

    def peak_bytes(self) -> int:
        """Wait for the device; the most bytes allocated since ``reset_peak``."""
        ...

    def is_out_of_memory(self, error: BaseException) -> bool:
        ...

    def release(self) -> None:
        """Give cached blocks back, so the profile leaves no idle memory behind."""
        ...


@dataclass(frozen=True)
class Recipe:
    """How a backend was built (name, model, device, dtype, options): enough to build it again in
    another process, which is how the memory profile runs without leaving memory behind."""

    backend: str
    info: Any
    device: str
    dtype: str
    options: tuple[tuple[str, Any], ...] = ()


class Backend:
    """Run batches of one model on one device. Subclasses set the attributes and ``forward``."""

    name: str = "backend"
    device: str = "cpu"
    dtype: str = "float32"
    #: Packed batches (``Batch.pack``) instead of padded ones.
    unpadded: bool = False
    #: Batches run asynchronously to the host (CUDA): the engine forms the next ones ahead.
    asynchronous: bool = False
    #: The batch budget (tokens) when no profile says otherwise.
    preferred_batch_tokens: int = 2048
    #: How to build this backend again (set by ``worker.backends.select``).
    recipe: Recipe | None = None
    #: The variant this backend runs (part of the memory profile's cache key).
    mode: str = "default"

    def forward(self, batch: Batch, precise: bool = False) -> np.ndarray:
        """Pooled float32 vectors ``[n, hidden]`` (embed) or logits ``[n, labels]``.

        ``precise`` recomputes in a wider type; the engine asks for it when outputs were not
        finite (fp16 overflow), so a NaN never leaves the worker.
        """
        raise NotImplementedError

    def launch(self, batch: Batch, precise: bool = False) -> Callable[[], np.ndarray]:
        """Queue the batch and return a function that waits for its outputs (default: run now)."""
        output = self.forward(batch, precise)
        return lambda: output

    @property
    def outputs(self) -> tuple[str, ...]:
        """The outputs this backend computes for its model (``producer.outputs``). Default: dense."""
        return DENSE_ONLY

    def launch_outputs(self, batch: Batch, outputs: tuple[str, ...],
                       precise: bool = False) -> Callable[[], BatchOutputs]:
        """Like ``launch``, for the ``outputs`` asked (a subset of ``self.outputs``), all from one
        forward pass. Default: dense only, through ``launch``."""
        if tuple(outputs) != DENSE_ONLY:
            raise BadInput(f"the {self.name} backend computes dense vectors only, not {', '.join(outputs)}; "
                           "serve the model with --backend torch", param="outputs")
        wait = self.launch(batch, precise)
        return lambda: BatchOutputs(dense=wait())

    def image_features(self, pixels: np.ndarray) -> Callable[[], np.ndarray]:
        """Image embeddings ``[n, dims]`` float32 of preprocessed ``[n, 3, H, W]`` pixel values
        (image-text models). Default: not offered, and said so."""
        raise BadInput(f"the {self.name} backend does not embed images; serve the model with --backend torch",
                       param="input")

    def token_states(self, batch: Batch) -> list[np.ndarray]:
        """Every token's final hidden state, ``[length, hidden]`` float32 per input of a padded
        batch, without pooling (TEI's ``/embed_all``). Default: not offered, and said so."""
        raise BadInput(f"the {self.name} backend does not return token embeddings (/embed_all); serve the model "
                       "with --backend torch", param="model")

    def host_buffer(self, size: int) -> Any:
        """An int32 host buffer of ``size`` for the engine to pack a batch into (anything
        ``np.asarray`` views without a copy). Default: plain memory; CUDA gives pinned memory, so
        the batch goes to the device in one transfer with no staging copy."""
        return np.empty(size, dtype=np.int32)

    def is_out_of_memory(self, error: BaseException) -> bool:
        """Whether ``error`` means the batch did not fit, so the engine splits it."""
        return isinstance(error, MemoryError)

    def memory_device(self) -> MemoryDevice | None:
        """The device memory a batch budget is sized to; ``None``: host memory, use the preferred budget."""
        return None

    def synthetic_batch(self, tokens: int, seq_len: int) -> Batch:
        """A batch of ``tokens`` random ids in this backend's layout, for memory profiling."""
        return Batch.synthetic(tokens, seq_len, packed=self.unpadded)

    def close(self) -> None:
        """Release the model and the device memory it holds."""


def cpu_threads() -> int:
    """Cores this process may use (cgroup/affinity aware); ``OMP_NUM_THREADS`` overrides."""
    configured = omp_threads()
    if configured:
        return configured
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def sorted_batches(info: Any, inputs: list[Any], budget: int) -> tuple[list[np.ndarray], list[Batch], int]:
    """Length-sorted padded batches within ``budget`` tokens; returns (row indices, batches, real tokens).

    Here, beside ``Batch``, because the auto selection (``select``) and the int8 calibration
    (``openvino``) both build their sample batches this way, and select already imports openvino."""
    from worker.models.tokenizer import BatchTokenizer

    tokenizer = BatchTokenizer(info.path, info.max_length)
    encoded = tokenizer.encode(inputs)
    lengths = np.array([e.n_tokens for e in encoded])
    order = np.argsort(lengths, kind="stable")
    groups: list[list[int]] = [[]]
    for index in order:
        if groups[-1] and lengths[index] * (len(groups[-1]) + 1) > budget:
            groups.append([])
        groups[-1].append(int(index))
    batches = []
    for group in groups:
        longest = int(lengths[group].max())
        ids = np.full((len(group), longest), tokenizer.pad_id, dtype=np.int32)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)
        for row, index in enumerate(group):
            n = encoded[index].n_tokens
            ids[row, :n], types[row, :n], mask[row, :n] = encoded[index].ids, encoded[index].type_ids, 1
        batches.append(Batch(ids, mask, types, lengths[group].astype(np.int32)))
    return [np.array(g) for g in groups], batches, int(lengths.sum())
