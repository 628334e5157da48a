"""Each in-process worker's own in-memory broker: one per virtual host, reached through its transport."""

from __future__ import annotations

from typing import Any

from celery import Celery

from producer.broker import make_app
from producer.http.replies import publish_only
from worker.hosting import memory_broker


def _app(url: str) -> Celery:
    """A producer app on ``url`` with the transport a worker on it uses."""
    app = make_app(url)
    app.conf.broker_transport = memory_broker.TRANSPORT
    return app


def _waiting(app: Celery, queue: str) -> int:
    with app.connection_for_read() as conn:
        channel: Any = conn.default_channel
        return int(channel._size(queue))


def test_each_virtual_host_is_a_broker_of_its_own() -> None:
    """kombu's own memory transport keeps one broker per process whatever the URL: a message sent
    for one worker was taken by any other consuming the same queue name."""
    first, also_first = _app("memory://localhost/mb-first"), _app("memory://localhost/mb-first")
    second = _app("memory://localhost/mb-second")
    try:
        first.send_task("some.task", queue="embed.shared-name")
        assert _waiting(also_first, "embed.shared-name") == 1  # the same name: the same broker
        assert _waiting(second, "embed.shared-name") == 0
    finally:
        memory_broker.drop("memory://localhost/mb-first")
        memory_broker.drop("memory://localhost/mb-second")
    assert _waiting(first, "embed.shared-name") == 0  # dropped: what it held went with it


def test_the_facades_sender_reaches_the_workers_broker() -> None:
    """``publish_only`` keeps the app's transport: built from the URL alone it would send to
    kombu's process-wide broker, which no worker reads."""
    app = _app("memory://localhost/mb-sender")
    try:
        publish_only(app).send_task("some.task", queue="embed.m")
        assert _waiting(app, "embed.m") == 1
    finally:
        memory_broker.drop("memory://localhost/mb-sender")


def test_a_url_names_a_broker_or_none() -> None:
    assert not memory_broker.names_one("memory://localhost/")
    assert not memory_broker.names_one("memory://")
    assert memory_broker.names_one(memory_broker.private_url("embedfleet-1-2"))
