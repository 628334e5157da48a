"""What a worker hosts, answered over the broker (the facade's /v1/models and /health use it)."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from producer.broker import INFO_TASK
from worker import runtime


def hosted_models() -> list[dict[str, Any]]:
    """One description per hosted model: name, kind, dimensions, max length, backend, device, dtype."""
    return [
        {
            "id": engine.info.name,
            "ref": engine.info.ref,
            "kind": engine.info.kind.value,
            "dimensions": engine.info.dims,
            "max_length": engine.info.max_length,
            "labels": list(engine.info.labels),
            "backend": engine.backend.name,
            "device": engine.backend.device,
            "dtype": engine.backend.dtype,
            "max_batch_tokens": engine.max_batch_tokens,
            "revision": engine.info.revision,
        }
        for engine in runtime.hosted()
    ]


@shared_task(name=INFO_TASK)
def info_task() -> list[dict[str, Any]]:
    return hosted_models()
