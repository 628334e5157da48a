"""Host engines and run a Celery worker for them: in a thread (embedded) or in the foreground.

The embedded default uses the in-memory transport, so ``embedfleet run`` goes through the very
same producer -> queue -> task -> engine -> sink path as a fleet, with nothing else installed.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from producer.broker import MEMORY_BROKER
from producer.jobs import queue_name
from worker import runtime
from worker.app import create_app
from worker.backends import load_backend
from worker.engine.pipeline import Engine
from worker.models import describe

log = logging.getLogger(__name__)


@dataclass
class WorkerSpec:
    """What a worker hosts and how it runs it."""

    models: list[str | None] = field(default_factory=lambda: [None])
    device: str = "auto"
    backend: str = "torch"
    dtype: str = "auto"
    concurrency: int = 4
    max_batch_tokens: int | None = None


def load_engine(model: str | None, spec: WorkerSpec) -> Engine:
    """Resolve and load one model into a started engine, registered for the tasks."""
    info = describe(model)
    backend = load_backend(spec.backend, info, spec.device, spec.dtype)
    engine = Engine(info, backend, max_batch_tokens=spec.max_batch_tokens).start()
    runtime.register(engine)
    return engine


def queues_for(engines: list[Engine], refs: list[str | None]) -> list[str]:
    """The queues a worker consumes: one per hosted model, under the names producers use."""
    names = []
    for engine, ref in zip(engines, refs):
        names.append(queue_name(engine.info.kind, ref or engine.info.name))
    return sorted(set(names))


class InProcessWorker:
    """Engines plus a Celery worker consuming their queues on a background thread."""

    def __init__(self, spec: WorkerSpec, broker: str = MEMORY_BROKER, backend: str | None = None) -> None:
        self.spec = spec
        self.app: Celery = create_app(broker, backend, prefetch=spec.concurrency)
        self.engines: list[Engine] = []
        self._controller: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> "InProcessWorker":
        self.engines = [load_engine(model, self.spec) for model in self.spec.models]
        queues = queues_for(self.engines, self.spec.models)
        ready = threading.Event()
        self._controller = self.app.WorkController(
            app=self.app,
            pool_cls="threads",
            concurrency=self.spec.concurrency,
            queues=queues,
            hostname=f"embedded@{socket.gethostname()}",
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            loglevel="WARNING",
            ready_callback=lambda *_: ready.set(),
        )
        self._thread = threading.Thread(target=self._controller.start, name="ef-celery", daemon=True)
        self._thread.start()
        if not ready.wait(60):
            raise RuntimeError("the in-process worker did not start within 60 s")
        log.info("in-process worker consuming %s", ", ".join(queues))
        return self

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop(in_sighandler=False, exitcode=0)
        if self._thread is not None:
            self._thread.join(10)
        for engine in runtime.unregister_all():
            engine.stop()

    def __enter__(self) -> "InProcessWorker":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
