"""Helpers and fixtures for the engine, model, sink and CLI tests (issue #2).

Engines are expensive to build (a model load each), so each model's engine is shared per module;
backend wrappers inject the failures a CPU never produces on its own (out-of-memory, NaN) into
the real engine, around a real torch backend.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from worker.backends.base import Backend, Batch
from worker.backends.torch import TorchBackend
from worker.engine.pipeline import Engine
from worker.models.resolve import ModelInfo, describe

REPO = Path(__file__).resolve().parent.parent
SAMPLE_CORPUS = REPO / "data" / "sample-corpus.parquet"


def sample_texts(n: int, step: int = 37) -> list[str]:
    """``n`` varied real texts from the sample corpus (every ``step``-th row, so sources vary)."""
    texts = pq.read_table(SAMPLE_CORPUS, columns=["text"]).column("text").to_pylist()
    return texts[::step][:n]


EDGE_TEXTS = [
    "word",
    "a",
    "Ünïcödé façade — naïve café, 日本語のテキスト, Ελληνικά, русский текст, 😀🚀✨",
    "مرحبا بالعالم",
    "tab\tseparated\nand new lines\r\n",
    " ".join(["truncation"] * 600),  # far past 256 tokens
    ("The quick brown fox jumps over the lazy dog. " * 80).strip(),
]


def make_engine(model: Path | str | None, max_batch_tokens: int | None = None,
                wrap: Callable[[Any], Any] | None = None, **options: Any) -> Engine:
    """A started engine on CPU in fp32, optionally with its backend wrapped (``options``: the
    Engine's other keyword arguments)."""
    info = describe(None if model is None else str(model))
    backend: Any = TorchBackend(info, device="cpu", dtype="float32")
    if wrap is not None:
        backend = wrap(backend)
    return Engine(info, backend, max_batch_tokens=max_batch_tokens, **options).start()


@pytest.fixture(scope="module")
def tiny_embed_engine(tiny_embed_model: Path) -> Iterator[Engine]:
    engine = make_engine(tiny_embed_model, max_batch_tokens=512)
    yield engine
    engine.stop()


class WrappedBackend(Backend):
    """Delegates to a real backend; subclasses change ``forward`` to inject failures.

    It records every forward call (the number of items and the real lengths) so tests can see
    how the engine batched, split and recomputed.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.device = inner.device
        self.dtype = inner.dtype
        self.unpadded = inner.unpadded
        self.preferred_batch_tokens = inner.preferred_batch_tokens
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def record(self, batch: Batch, precise: bool, outcome: str) -> None:
        with self.lock:
            self.calls.append({"n": len(batch.lengths), "lengths": batch.lengths.tolist(),
                               "precise": precise, "outcome": outcome,
                               "first_ids": [row[1] for row in batch.input_ids.tolist()]})

    def forward(self, batch: Batch, precise: bool = False) -> np.ndarray:
        out = self.inner.forward(batch, precise=precise)
        self.record(batch, precise, "ok")
        return out

    def is_out_of_memory(self, error: BaseException) -> bool:
        return self.inner.is_out_of_memory(error)

    def close(self) -> None:
        self.inner.close()


class OomBackend(WrappedBackend):
    """Raises ``torch.OutOfMemoryError`` for batches of more than ``max_items`` items, or for any
    batch holding an input of more than ``max_tokens`` tokens (so it fails even alone)."""

    def __init__(self, inner: Any, max_items: int, max_tokens: int | None = None) -> None:
        super().__init__(inner)
        self.max_items = max_items
        self.max_tokens = max_tokens

    def forward(self, batch: Batch, precise: bool = False) -> np.ndarray:
        too_many = len(batch.lengths) > self.max_items
        too_long = self.max_tokens is not None and int(batch.lengths.max()) > self.max_tokens
        if too_many or too_long:
            self.record(batch, precise, "oom")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return super().forward(batch, precise)


class NanBackend(WrappedBackend):
    """Returns NaN rows for inputs whose first real token is in ``poison_ids``, unless ``precise``
    (or always, for ``always_nan_ids``): what fp16 overflow looks like to the engine."""

    def __init__(self, inner: Any, poison_ids: set[int], always_nan_ids: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        super().__init__(inner)
        self.poison_ids = set(poison_ids) | set(always_nan_ids)
        self.always = set(always_nan_ids)

    def forward(self, batch: Batch, precise: bool = False) -> np.ndarray:
        out = self.inner.forward(batch, precise=precise).copy()
        bad = self.always if precise else self.poison_ids
        rows = [i for i, row in enumerate(batch.input_ids) if int(row[1]) in bad]
        out[rows] = np.nan
        self.record(batch, precise, f"nan:{len(rows)}")
        return out


class GatedBackend(WrappedBackend):
    """Blocks the first forward until ``gate`` is set, so requests pile up behind it;
    ``asynchronous`` (when given) makes it look like a CUDA (asynchronous) or CPU device to the engine."""

    def __init__(self, inner: Any, asynchronous: bool | None = None) -> None:
        super().__init__(inner)
        self.gate = threading.Event()
        self.entered = threading.Event()
        if asynchronous is not None:
            self.asynchronous = asynchronous

    def forward(self, batch: Batch, precise: bool = False) -> np.ndarray:
        self.entered.set()
        if not self.gate.wait(60):
            raise RuntimeError("test gate never opened")
        return super().forward(batch, precise)


def first_token_id(engine: Engine, text: str) -> int:
    """The id of the first real token (after [CLS]) the engine's tokenizer gives ``text``."""
    return int(engine.tokenizer.encode([text])[0].ids[1])


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


def info_of(path: Path | None) -> ModelInfo:
    return describe(None if path is None else str(path))
