"""The engines this worker process hosts, found by the model reference a job names.

Tasks are thin and stateless; the engines (one model copy per device) live here for the life
of the process, shared by every concurrent task so their texts share batches.
"""

from __future__ import annotations

import threading

from producer.errors import BadInput, ModelNotServed, UnsupportedModel
from producer.jobs import JobKind, model_slug
from worker.engine.pipeline import Engine
from worker.models.resolve import ModelInfo

_engines: dict[str, Engine] = {}
#: models this worker was asked to host but refused (``worker.models.loading``): their jobs fail
#: at once with the reason instead of waiting for a worker that will never serve them
_refused: dict[str, tuple[ModelInfo, UnsupportedModel]] = {}
_lock = threading.Lock()
#: how the host names the device this process's engines run on (``worker.hosting.devices``)
_device_label: list[str] = []


def register(engine: Engine, *aliases: str | None) -> None:
    """Host ``engine`` under its model's name and every reference it was asked for by.

    Producers route and name jobs by the reference they were given (a hub id, a directory);
    the bundled model's directory is called ``model``, its name ``all-MiniLM-L6-v2``: both work.
    """
    with _lock:
        for key in (engine.info.name, engine.info.ref, *aliases):
            if key:
                _engines[model_slug(key)] = engine


def refuse(info: ModelInfo, error: UnsupportedModel, *aliases: str | None) -> None:
    """Record that this worker refuses ``info``'s model: ``engine_for`` raises ``error`` for it."""
    with _lock:
        for key in (info.name, info.ref, *aliases):
            if key:
                _refused[model_slug(key)] = (info, error)


def refused() -> list[tuple[ModelInfo, UnsupportedModel]]:
    with _lock:
        return list({id(entry[1]): entry for entry in _refused.values()}.values())


def unregister_all() -> list[Engine]:
    with _lock:
        engines = list({id(e): e for e in _engines.values()}.values())
        _engines.clear()
        _refused.clear()
        return engines


def set_device_label(label: str) -> None:
    """Name this process's device as its host does (``cpu:1``, ``cuda:3``): an engine process of a
    multi-device worker reports it in /v1/models, /health, metrics and done-markers."""
    with _lock:
        _device_label[:] = [label]


def device_of(engine: Engine) -> str:
    """The device ``engine`` runs on, named as the host names it when that was set."""
    with _lock:
        return _device_label[0] if _device_label else str(engine.backend.device)


def engine_for(model: str, kind: JobKind | None = None) -> Engine:
    """The engine hosting ``model``; a kind mismatch is an error naming both kinds."""
    with _lock:
        engine = _engines.get(model_slug(model))
        refusal = _refused.get(model_slug(model))
        hosted = ", ".join(sorted(_engines)) or "none"
    if engine is None and refusal is not None:  # a fresh error each time: tasks raise it concurrently
        raise UnsupportedModel(refusal[1].message, param=refusal[1].param)
    if engine is None:
        raise ModelNotServed(f"model {model!r} is not hosted by this worker (it hosts: {hosted})")
    if kind is not None and engine.info.kind != kind:
        raise BadInput(
            f"model {model!r} is {engine.info.kind.a_model}; it cannot run a {kind.value} job"
        )
    return engine


def hosted() -> list[Engine]:
    with _lock:
        return list({id(e): e for e in _engines.values()}.values())
