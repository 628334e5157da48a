"""The facade's event-loop publisher writes the message kombu itself would write, and a real
worker runs it; the worker's result backend answers inline calls without the read Celery adds."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from datetime import datetime
from typing import Any

import pytest

from producer.broker import INLINE_TASK, MEMORY_BROKER, make_app
from producer.http.publish import InProcessPublisher, RedisPublisher, ThreadPublisher, envelope, publisher_for
from producer.http.replies import publish_only
from tests.conftest import RedisServer


def _decoded(raw: bytes) -> dict[str, Any]:
    message = json.loads(raw)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    return message


def test_envelope_matches_what_kombu_pushes(redis_server: RedisServer) -> None:
    sender = publish_only(make_app(redis_server.url))
    sender.send_task(INLINE_TASK, args=[{"inputs": ["x"]}], queue="embed.m", expires=30, task_id="t-1",
                     argsrepr="[1 input]", kwargsrepr="{}")
    theirs = _decoded(redis_server.client().rpop("embed.m"))
    ours = _decoded(envelope(sender, INLINE_TASK, [{"inputs": ["x"]}], "embed.m", "t-1", 30, "[1 input]"))
    for message in (theirs, ours):
        message["properties"].pop("delivery_tag")  # a fresh uuid per message
        expires = message["headers"].pop("expires")
        message["headers"]["expires"] = datetime.fromisoformat(expires).timestamp()
    assert abs(theirs["headers"].pop("expires") - ours["headers"].pop("expires")) < 5
    assert ours == theirs


def test_a_worker_runs_what_the_publisher_sends(redis_server: RedisServer, tiny_embed_model: Any,
                                                tmp_path: Any) -> None:
    """The pushed message goes through a real ``embedfleet worker``; its result comes back through
    the worker's result backend class, written without Celery's read-before-write."""
    from producer.jobs import EmbedJob, InlineResult, queue_name
    from tests.http.servers import WorkerProcess
    from worker.hosting.app import create_app
    from worker.hosting.results import InlineResultBackend

    assert isinstance(create_app(redis_server.url).backend, InlineResultBackend)
    app = make_app(redis_server.url)
    # a stale success under the same id: Celery's own backend would read and keep it; the
    # inline path writes without reading, so the fresh answer replaces it
    app.backend.store_result("pub-1", {"stale": True}, "SUCCESS")
    job = EmbedJob(model="tiny-bert", inputs=["one text", "another"]).model_dump(mode="json")

    async def send() -> None:
        publisher = RedisPublisher(app)
        await publisher.start()
        try:
            await publisher.send(INLINE_TASK, [job], queue_name("embed", "tiny-bert"), "pub-1", 120, "[2 inputs]")
        finally:
            await publisher.stop()

    worker = WorkerProcess(redis_server.url, [str(tiny_embed_model)], tmp_path / "worker.log").start()
    try:
        asyncio.run(send())
        deadline = time.monotonic() + 120
        while app.backend.get_task_meta("pub-1", cache=False)["result"] == {"stale": True}:
            assert worker.proc.poll() is None, (tmp_path / "worker.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "no answer from the worker"
            time.sleep(0.1)
    finally:
        worker.stop()
    meta = app.backend.get_task_meta("pub-1", cache=False)
    assert meta["status"] == "SUCCESS" and meta["task_id"] == "pub-1"
    result = InlineResult.model_validate(meta["result"])
    assert result.n_items == 2 and not result.errors


@pytest.mark.parametrize("broker, expected", [
    ("redis://127.0.0.1:6379/0", RedisPublisher),
    (MEMORY_BROKER, InProcessPublisher),
])
def test_publisher_choice(broker: str, expected: type) -> None:
    app = make_app(broker)
    assert type(publisher_for(app, app)) is expected


def test_a_key_prefix_falls_back_to_kombu() -> None:
    """A transport option the envelope does not reproduce sends through kombu itself."""
    app = make_app("redis://127.0.0.1:6379/0")
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, "global_keyprefix": "tenant1:"}
    assert type(publisher_for(app, app)) is ThreadPublisher


def test_the_publisher_pushes_again_after_a_redis_restart_and_gives_up_without_redis(tmp_path: Any) -> None:
    """Its own connection (a plain redis:// URL): a restarted Redis is connected to again and the
    push retried; with Redis gone the push fails after its retries (the dispatcher's 503)."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    server = RedisServer(tmp_path)
    server.start()
    app = make_app(server.url)

    async def scenario() -> float:
        publisher = RedisPublisher(app)
        await publisher.start()
        try:
            await publisher.send(INLINE_TASK, [{"inputs": ["x"]}], "embed.m", "t-1", 30, "[1 input]")
            server.stop()
            server.start()  # same port: the publisher's connection is gone
            await publisher.send(INLINE_TASK, [{"inputs": ["y"]}], "embed.m", "t-2", 30, "[1 input]")
            assert server.client().llen("embed.m") == 1
            server.stop()
            started = time.monotonic()
            with pytest.raises(RedisConnectionError):
                await publisher.send(INLINE_TASK, [{"inputs": ["z"]}], "embed.m", "t-3", 30, "[1 input]")
            return time.monotonic() - started
        finally:
            await publisher.stop()

    try:
        assert publisher_for(app, app).address is not None  # the direct way is the one tested
        assert asyncio.run(scenario()) < 5  # three retries, backing off 0.1, 0.2 and 0.4 s
    finally:
        server.stop()


def test_the_reply_reader_subscribes_again_after_a_redis_restart(tmp_path: Any) -> None:
    """A result published (not stored: only the subscription can bring it) after Redis restarted
    reaches its waiting request."""
    from producer.http.replies import RedisReplies
    from worker.hosting.app import create_app

    server = RedisServer(tmp_path)
    server.start()
    app = make_app(server.url)
    answer = {"kind": "embed", "model": "m", "n_items": 0, "dims": 0, "data_b64": ""}

    async def scenario() -> None:
        replies = RedisReplies(app)
        await replies.start()
        backend = create_app(server.url).backend
        try:
            task_id = replies.new_task_id()

            async def stored() -> None:
                backend.store_inlines([(task_id, answer)])

            assert (await replies.call(stored, task_id, 10))["model"] == "m"
            server.stop()
            server.start()
            deadline = time.monotonic() + 10
            while server.client().execute_command("PUBSUB", "NUMPAT") != 1:
                assert time.monotonic() < deadline, "the reader did not subscribe again"
                await asyncio.sleep(0.05)
            task_id = replies.new_task_id()

            async def published() -> None:
                payload = backend._inline_payload(task_id, answer)
                server.client().publish(backend.get_key_for_task(task_id), payload)

            assert (await replies.call(published, task_id, 10))["model"] == "m"
        finally:
            await replies.stop()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
