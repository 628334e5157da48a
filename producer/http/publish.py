"""Sending inline task messages from the facade's event loop.

Celery's ``send_task`` is blocking, so the facade ran it on a worker thread: a thread hop and
about 1,400 Python calls per request (routing, option merging, a Redis client object built per
publish inside kombu), most of the time the facade itself added to a single-text call. Two
senders share one interface:

* ``RedisPublisher`` (a ``redis://`` / ``rediss://`` broker): Celery builds the task message
  once per task name (``app.amqp.create_task_message``: protocol 2 headers, body, properties) and
  each message fills in its id, deadline and arguments (``Envelopes``), wrapped
  exactly as kombu's Redis transport does for a message to the default exchange (JSON with the
  base64 body, ``delivery_info``, ``delivery_tag``, priority 0 -> the list named after the queue),
  and an LPUSH writes it without blocking the loop (on a plain ``redis://`` URL straight to the
  connection, ``producer.resp``: redis-py's per-command machinery ran before the write, on the
  path a single-text call waits on; else redis-py's asyncio client). Workers consume it through
  Celery unchanged; ``tests/facade/test_publish.py`` holds the envelope to kombu's own, field for
  field, so a kombu upgrade that changes the format fails the tests instead of the fleet.
* ``ThreadPublisher`` (SQS, anything else): ``send_task`` on a thread; ``InProcessPublisher``
  (the embedded facade's in-memory transport): ``send_task`` on the loop, which never waits there.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import time
from typing import Any

import anyio
import orjson
from celery import Celery

from producer.broker import broker_kind, declare_queue
from producer.resp import CONNECTION_ERRORS, AsyncConnection, pack, plain_url

#: Redis transport options whose effect ``envelope`` does not reproduce: with any of them set,
#: the facade sends through kombu itself.
_UNREPRODUCED_OPTIONS = {"global_keyprefix", "priority_steps", "sep"}


class Publisher:
    """Send one task message to a named queue."""

    async def start(self) -> None:
        """Called on the event loop before the first send."""

    async def stop(self) -> None:
        """Called on the event loop after the last send."""

    async def send(self, task: str, args: list[Any], queue: str, task_id: str, expires: float, shown: str) -> None:
        """Publish ``task(*args)`` to ``queue``; the worker drops it unrun after ``expires`` s."""
        raise NotImplementedError


class ThreadPublisher(Publisher):
    """Celery's ``send_task`` on a worker thread (any broker)."""

    def __init__(self, sender: Celery) -> None:
        self.sender = sender

    def publish(self, task: str, args: list[Any], queue: str, task_id: str, expires: float, shown: str) -> None:
        declare_queue(self.sender, queue)  # SQS: resolve (or create) the queue; a no-op elsewhere
        self.sender.send_task(task, args=args, queue=queue, expires=expires, task_id=task_id,
                              argsrepr=shown, kwargsrepr="{}")

    async def send(self, task: str, args: list[Any], queue: str, task_id: str, expires: float, shown: str) -> None:
        await anyio.to_thread.run_sync(self.publish, task, args, queue, task_id, expires, shown)


class InProcessPublisher(ThreadPublisher):
    """``send_task`` on the loop itself: the in-memory transport only appends to a queue in this
    process, so there is no I/O to wait for and no reason to pay a thread hop."""

    async def send(self, task: str, args: list[Any], queue: str, task_id: str, expires: float, shown: str) -> None:
        self.publish(task, args, queue, task_id, expires, shown)


class Envelopes:
    """The bytes kombu's Redis transport pushes for a Celery task message (default exchange),
    from a template made once per task name by Celery itself (``app.amqp.create_task_message``):
    each message then costs a few dict updates and two JSON dumps instead of Celery's message
    building, which re-reads its routing and header defaults on every call."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._templates: dict[str, Any] = {}

    def _template(self, task: str) -> Any:
        template = self._templates.get(task)
        if template is None:
            template = self.app.amqp.create_task_message("-", task, [], {}, expires=1.0, reply_to=self.app.thread_oid,
                                                         ignore_result=None, argsrepr="", kwargsrepr="{}")
            self._templates[task] = template
        return template

    def __call__(self, task: str, args: list[Any], queue: str, task_id: str, expires: float, shown: str) -> bytes:
        template = self._template(task)
        deadline = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=expires)).isoformat()
        headers = {**template.headers, "id": task_id, "root_id": task_id, "expires": deadline, "argsrepr": shown}
        body = orjson.dumps([args, {}, template.body[2]])
        properties = {
            **template.properties,
            "correlation_id": task_id,
            "argsrepr": shown,
            "kwargsrepr": "{}",
            "delivery_mode": 2,  # Celery's default: persistent
            "expiration": str(int(expires * 1000)),
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": task_id,  # unique per message, as the uuid kombu draws is
        }
        return orjson.dumps({
            "body": base64.b64encode(body).decode("ascii"),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": properties,
        })


def envelope(app: Celery, task: str, args: list[Any], queue: str, task_id: str, expires: float,
             shown: str) -> bytes:
    """One message's bytes (``Envelopes``; a publisher keeps one ``Envelopes`` for all of its messages)."""
    return Envelopes(app)(task, args, queue, task_id, expires, shown)


#: the publisher's connection: timeouts (s), a PING before a push after this long idle (as
#: redis-py's ``health_check_interval``), and the retries of a push whose connection failed
CONNECT_TIMEOUT_S, SOCKET_TIMEOUT_S, HEALTH_CHECK_S, PUSH_RETRIES = 5.0, 10.0, 10.0, 3


class RedisPublisher(Publisher):
    """LPUSH of kombu's envelope from the event loop (see the module docstring).

    A dropped connection is re-made and the push tried again (``PUSH_RETRIES`` times, backing off
    0.1, 0.2, 0.4 s); a timeout that leaves the push in doubt may deliver the job twice, which
    costs a second computation, not a wrong answer. An error reply (a full Redis, a wrong
    password) is not retried. Both ways below keep these rules."""

    def __init__(self, app: Celery) -> None:
        from redis.backoff import ExponentialBackoff

        self.app = app
        self.envelopes = Envelopes(app)
        self.url = str(app.conf.broker_url)
        self.address = plain_url(self.url)
        self._backoff = ExponentialBackoff(cap=1.0, base=0.05)
        self._redis: Any = None
        self._connection: AsyncConnection | None = None
        self._connecting: asyncio.Lock | None = None
        self._used = 0.0

    async def start(self) -> None:
        if self.address is not None:
            self._connecting = asyncio.Lock()
            return
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        self._redis = aioredis.Redis.from_url(
            self.url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=SOCKET_TIMEOUT_S,
            health_check_interval=HEALTH_CHECK_S, retry=Retry(self._backoff, PUSH_RETRIES),
            retry_on_error=[RedisConnectionError, RedisTimeoutError])

    async def stop(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
        self._drop(self._connection)

    async def send(self, task: str, args: list[Any], queue: str, task_id: str, expires: float, shown: str) -> None:
        message = self.envelopes(task, args, queue, task_id, expires, shown)
        if self._redis is not None:
            await self._redis.lpush(queue, message)
            return
        await self._push(pack(("LPUSH", queue, message)))

    async def _push(self, command: bytes) -> None:
        failures = 0
        while True:
            connection = None
            try:
                connection = await self._ready()
                await connection.request(command, SOCKET_TIMEOUT_S)
                self._used = time.monotonic()
                return
            except CONNECTION_ERRORS:
                self._drop(connection)
                failures += 1
                if failures > PUSH_RETRIES:
                    raise
                await asyncio.sleep(self._backoff.compute(failures))

    async def _ready(self) -> AsyncConnection:
        """The open connection (a PING first after ``HEALTH_CHECK_S`` idle), else a new one."""
        connection = self._connection
        if connection is not None and connection.is_open:
            if time.monotonic() - self._used > HEALTH_CHECK_S:
                await connection.request(pack(("PING",)), SOCKET_TIMEOUT_S)
            return connection
        assert self.address is not None and self._connecting is not None
        async with self._connecting:  # concurrent sends share one new connection
            if self._connection is None or not self._connection.is_open:
                self._connection = await AsyncConnection.open(self.address, CONNECT_TIMEOUT_S)
                self._used = time.monotonic()
            return self._connection

    def _drop(self, connection: AsyncConnection | None) -> None:
        """Close a failed connection (not one another send has made since)."""
        if connection is not None:
            connection.close()
            if self._connection is connection:
                self._connection = None


def publisher_for(app: Celery, sender: Celery) -> Publisher:
    """The cheapest way to send on ``app``'s broker: from the loop on Redis, else ``send_task``
    on a thread with ``sender`` (an app that sends with ``app``'s settings)."""
    kind = broker_kind(str(app.conf.broker_url))
    options = app.conf.broker_transport_options or {}
    if kind == "redis" and not _UNREPRODUCED_OPTIONS & set(options):
        return RedisPublisher(app)
    if kind == "memory":
        return InProcessPublisher(sender)
    return ThreadPublisher(sender)
