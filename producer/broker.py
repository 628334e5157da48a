"""The Celery app a producer sends with, and the settings both sides must agree on.

JSON only, in both directions: a broker is not a trusted channel, so pickle is never accepted.
Workers build their app on top of this one (``worker.app``) and add what only consumers need.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

INLINE_TASK = "embedfleet.inline"
SHARD_TASK = "embedfleet.shard"
INFO_TASK = "embedfleet.info"

MEMORY_BROKER = "memory://localhost/"
MEMORY_BACKEND = "cache+memory://"


def default_backend(broker: str) -> str:
    """Where inline results travel: the same Redis as the broker; in-process for memory://."""
    if broker.startswith(("redis://", "rediss://")):
        return broker
    if broker.startswith("memory://"):
        return MEMORY_BACKEND
    backend = os.environ.get("EMBEDFLEET_RESULT_BACKEND")
    if backend:
        return backend
    raise ValueError(
        f"broker {broker.split('://')[0]}:// has no result backend of its own; "
        "set --result-backend / EMBEDFLEET_RESULT_BACKEND (e.g. a redis:// URL)"
    )


def base_settings() -> dict[str, Any]:
    """Settings that producers and workers share."""
    return {
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_default_queue": "embedfleet.default",
        "result_expires": 3600,
        "task_track_started": False,
        "broker_connection_retry_on_startup": True,
    }


def make_app(broker: str = MEMORY_BROKER, backend: str | None = None, name: str = "embedfleet") -> Celery:
    """A Celery app for ``broker`` with JSON-only settings."""
    app = Celery(name, broker=broker, backend=backend or default_backend(broker), set_as_current=False)
    app.conf.update(base_settings())
    return app
