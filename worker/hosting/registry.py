"""The engines one worker hosts, found by the model reference a job names.

Tasks are thin and stateless; the engines (one model copy per device) live in their worker's
``Registry`` for the worker's life, shared by every concurrent task of that worker so their texts
share batches. The registry belongs to the worker, not to the process: ``embedfleet run`` beside
an embedded ``serve`` (or two ``InProcessWorker`` in a test) are two workers in one process, and
the stop of one must leave the other's engines alone (stop 26: it cleared them all).

A task finds its worker's registry through the Celery app it runs under (``of``): every worker
has its own app, and its pool threads trace tasks with it (``worker.hosting.host``).
"""

from __future__ import annotations

import threading
from typing import Any

from producer.errors import BadInput, ModelNotServed, UnsupportedModel
from producer.jobs import JobKind, model_slug
from worker.engine.pipeline import Engine
from worker.hosting.per_app import attached
from worker.models.resolve import ModelInfo

#: the attribute of a Celery app that holds its worker's registry
_APP_ATTRIBUTE = "embedfleet_registry"


class Registry:
    """One worker's engines by model reference, the models it refused, and its device's name."""

    def __init__(self) -> None:
        self._engines: dict[str, Engine] = {}
        #: models this worker was asked to host but refused (``worker.models.loading``): their jobs
        #: fail at once with the reason instead of waiting for a worker that will never serve them
        self._refused: dict[str, tuple[ModelInfo, UnsupportedModel]] = {}
        self._lock = threading.Lock()
        #: how the host names this worker's device (``worker.hosting.devices``), once set
        self._device_label: str | None = None

    def register(self, engine: Engine, *aliases: str | None) -> None:
        """Host ``engine`` under its model's name and every reference it was asked for by.

        Producers route and name jobs by the reference they were given (a hub id, a directory);
        the bundled model's directory is called ``model``, its name ``all-MiniLM-L6-v2``: both work.
        """
        with self._lock:
            for key in (engine.info.name, engine.info.ref, *aliases):
                if key:
                    self._engines[model_slug(key)] = engine

    def refuse(self, info: ModelInfo, error: UnsupportedModel, *aliases: str | None) -> None:
        """Record that this worker refuses ``info``'s model: ``engine_for`` raises ``error`` for it."""
        with self._lock:
            for key in (info.name, info.ref, *aliases):
                if key:
                    self._refused[model_slug(key)] = (info, error)

    def refused(self) -> list[tuple[ModelInfo, UnsupportedModel]]:
        with self._lock:
            return list({id(entry[1]): entry for entry in self._refused.values()}.values())

    def unregister_all(self) -> list[Engine]:
        """Forget every engine and refusal of this worker (its stop); returns the engines to stop."""
        with self._lock:
            engines = list({id(e): e for e in self._engines.values()}.values())
            self._engines.clear()
            self._refused.clear()
            return engines

    def set_device_label(self, label: str) -> None:
        """Name this worker's device as its host does (``cpu:1``, ``cuda:3``): an engine process of
        a multi-device worker reports it in /v1/models, /health, metrics and done-markers."""
        with self._lock:
            self._device_label = label

    def device_of(self, engine: Engine) -> str:
        """The device ``engine`` runs on, named as the host names it when that was set."""
        with self._lock:
            return self._device_label or str(engine.backend.device)

    def engine_for(self, model: str, kind: JobKind | None = None) -> Engine:
        """The engine hosting ``model``; a kind mismatch is an error naming both kinds."""
        with self._lock:
            engine = self._engines.get(model_slug(model))
            refusal = self._refused.get(model_slug(model))
            hosted = ", ".join(sorted(self._engines)) or "none"
        if engine is None and refusal is not None:  # a fresh error each time: tasks raise it concurrently
            raise UnsupportedModel(refusal[1].message, param=refusal[1].param)
        if engine is None:
            raise ModelNotServed(f"model {model!r} is not hosted by this worker (it hosts: {hosted})")
        if kind is not None and engine.info.kind != kind:
            raise BadInput(
                f"model {model!r} is {engine.info.kind.a_model}; it cannot run a {kind.value} job"
            )
        return engine

    def hosted(self) -> list[Engine]:
        with self._lock:
            return list({id(e): e for e in self._engines.values()}.values())


def of(app: Any) -> Registry:
    """The registry of the worker running ``app`` (a Celery app), made on first use.

    One worker, one app: ``InProcessWorker`` takes its registry from here, and its tasks, its
    inline lane and its remote-control answers find the same one from the app they run under.
    An app no worker hosts on has an empty registry (its jobs: "it hosts: none")."""
    return attached(app, _APP_ATTRIBUTE, Registry)
