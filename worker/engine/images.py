"""The image lane of an image-text model's engine: preprocessed images in batches to the image tower.

Images do not fit the token scheduler (their cost is a fixed number of patches, their inputs
pixels, not ids), so they travel apart: each is decoded and preprocessed on the engine's host
pool (``worker.models.vision.Preprocessor``, off the device), then queued here; one thread takes
whatever is queued, up to ``max_images``, and runs it through ``Backend.image_features``. Out of
memory splits a batch in halves (a single image that still does not fit fails alone); any other
failure of a batch fails its images with the reason, and nothing else.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable

import numpy as np

from worker.backends.base import Backend

log = logging.getLogger(__name__)

#: Images per batch: a ViT-B batch of 64 images is ~3k patches, far below any text budget.
MAX_IMAGES = 64

Deliver = Callable[[Any, list[int], np.ndarray], None]
"""Put image rows into a request: (request, its input indices, their vectors)."""
Fail = Callable[[Any, list[int], str], None]
"""Fail a request's inputs with a reason."""


class ImageLane:
    """One thread feeding preprocessed images to the backend's image tower, in batches."""

    def __init__(self, backend: Backend, deliver: Deliver, fail: Fail, max_images: int = MAX_IMAGES) -> None:
        self.backend = backend
        self.deliver = deliver
        self.fail = fail
        self.max_images = max(1, max_images)
        self._queue: queue.Queue[tuple[Any, int, np.ndarray]] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ef-images", daemon=True)

    def start(self) -> "ImageLane":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def add(self, request: Any, index: int, pixels: np.ndarray) -> None:
        self._queue.put((request, index, pixels))

    def _take(self) -> list[tuple[Any, int, np.ndarray]]:
        try:
            batch = [self._queue.get(timeout=0.2)]
        except queue.Empty:
            return []
        while len(batch) < self.max_images:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._take()
            if batch:
                self._run(batch)

    def _run(self, batch: list[tuple[Any, int, np.ndarray]]) -> None:
        shapes = {item[2].shape for item in batch}
        if len(shapes) > 1:  # a processor that keeps aspect ratios: one batch per shape
            for shape in shapes:
                self._run([item for item in batch if item[2].shape == shape])
            return
        try:
            vectors = self.backend.image_features(np.stack([item[2] for item in batch]))()
        except Exception as exc:
            if self.backend.is_out_of_memory(exc) and len(batch) > 1:
                half = len(batch) // 2
                self._run(batch[:half])
                self._run(batch[half:])
                return
            reason = ("this image does not fit in device memory on its own" if self.backend.is_out_of_memory(exc)
                      else f"the image tower failed: {type(exc).__name__}: {exc}")
            log.warning("a batch of %d images failed: %s", len(batch), exc)
            for request, index, _ in batch:
                self.fail(request, [index], reason)
            return
        by_request: dict[Any, list[int]] = {}
        for position, (request, _, _) in enumerate(batch):
            by_request.setdefault(request, []).append(position)
        for request, positions in by_request.items():
            self.deliver(request, [batch[p][1] for p in positions], vectors[positions])
