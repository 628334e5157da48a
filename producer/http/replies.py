"""Waiting for inline results without a thread per request.

The facade sends a Celery task and waits for its result in the result backend. Celery's own
``AsyncResult.get`` blocks a thread per request and keeps a result consumer per thread; at
64 concurrent requests that is 64 blocked threads and 64 pub/sub connections. Here one
asyncio reader serves every request:

* ``RedisReplies`` (the fleet): the worker's Redis result backend publishes each result on the
  channel named after its key (``celery-task-meta-<id>``); this facade's task ids share a prefix,
  so one pattern subscription, made before the first request, receives all of its results on one
  pub/sub connection. On a plain ``redis://`` URL that connection is ``producer.resp``'s: each
  message is handed to its request from the protocol's data callback, with no reader task and no
  ``get_message`` poll in between (redis-py's pub/sub otherwise). A slow poll (MGET of the keys
  still awaited) covers a pub/sub connection that was dropped and re-made while a result was
  published. Delivered keys are deleted in batches.
* ``LocalReplies`` (embedded): the worker runs in this process; its ``task_postrun`` signal
  wakes the request, which reads the in-memory result backend.
* ``ThreadReplies``: any other result backend (a database, say), through ``AsyncResult.get`` on a
  worker thread, as Celery intends.

All three hand back the task's return value, or raise the worker's exception (rebuilt by Celery
from the stored result), or ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import threading
import time
import uuid
from typing import Any, Awaitable, Callable

import anyio
import orjson
from celery import Celery
from celery import states
from celery.backends.cache import CacheBackend
from celery.backends.redis import RedisBackend
from celery.signals import task_postrun

from producer.resp import AsyncConnection, pack, plain_url, within

log = logging.getLogger(__name__)

Send = Callable[[], Awaitable[None]]
"""Publishes the task whose outcome ``Replies.call`` waits for."""

#: A result not seen on pub/sub after this long is looked up directly (then every this often).
SAFETY_POLL_S = 0.5
#: Delivered results are deleted every ``SAFETY_POLL_S``, or as soon as this many wait: an UNLINK
#: after every answer was one more Redis round trip (and a facade wake-up) beside each client's
#: next request.
RELEASE_BATCH = 64


def publish_only(app: Celery) -> Celery:
    """An app that sends with ``app``'s broker settings but subscribes to nothing.

    With a Redis result backend, ``send_task`` would also subscribe the sending thread's own
    result consumer to the task's channel, which nobody here drains; the facade's reader does
    that instead. The transport options dict is shared, so a queue declared on either app (SQS
    URLs) is known to both. So is the transport class (``broker_transport``): a worker's private
    in-memory broker is one only its transport opens, not its URL alone.
    """
    sender = Celery("embedfleet-facade", broker=app.conf.broker_url, backend="disabled://", set_as_current=False)
    sender.conf.update({key: app.conf[key] for key in (
        "task_serializer", "result_serializer", "accept_content", "result_accept_content",
        "task_default_queue", "broker_connection_retry", "broker_connection_max_retries", "broker_transport")})
    sender.conf.broker_transport_options = app.conf.broker_transport_options
    return sender


class Replies:
    """Send a task and wait for its outcome; subclasses differ in how they wait."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.sender = app

    async def start(self) -> None:
        """Called on the event loop before the first request."""

    async def stop(self) -> None:
        """Called on the event loop after the last request."""

    def new_task_id(self) -> str:
        return str(uuid.uuid4())

    async def call(self, send: Send, task_id: str, timeout: float) -> Any:
        """Await ``send()`` (which publishes task ``task_id``), then wait up to ``timeout`` s for
        the outcome."""
        raise NotImplementedError


def outcome(meta: dict[str, Any]) -> Any:
    """A task's return value, or raise the exception the worker stored (rebuilt by Celery)."""
    status = meta.get("status")
    if status == states.SUCCESS:
        return meta.get("result")
    result = meta.get("result")
    if isinstance(result, BaseException):
        raise result
    raise RuntimeError(f"the task ended in state {status}: {result!r}")


class RedisReplies(Replies):
    """One pattern subscription for all of this facade's results; see the module docstring.

    Task ids start with a prefix unique to this facade, so one ``PSUBSCRIBE`` made at start
    (and renewed by redis-py after a reconnect) receives exactly this facade's results: no
    subscribe or unsubscribe per request, and no other producer's results on the wire.
    """

    def __init__(self, app: Celery) -> None:
        super().__init__(app)
        self.backend: RedisBackend = app.backend
        self.sender = publish_only(app)
        self.url = str(app.conf.result_backend)
        self.prefix = f"ef{uuid.uuid4().hex[:12]}"
        self._ids = itertools.count(1)
        self._waiting: dict[bytes, tuple[asyncio.Future[Any], float]] = {}
        self._done: list[bytes] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._redis: Any = None
        self._pubsub: Any = None
        self._subscription: AsyncConnection | None = None
        self._running = False

    def new_task_id(self) -> str:
        """This facade's prefix and a counter: unique as long as the prefix is (random, per facade
        process and start), without a random draw per request."""
        return f"{self.prefix}-{next(self._ids)}"

    async def start(self) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(self.url, socket_connect_timeout=5)
        pattern = _glob_escape(self._key(f"{self.prefix}-")) + b"*"
        address = plain_url(self.url)
        if address is None:
            self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            await self._pubsub.psubscribe(pattern)
            reader = self._read()
        else:
            self._subscription = await self._subscribe(address, pattern)  # before the first request
            reader = self._stay_subscribed(address, pattern)
        self._running = True
        self._tasks = [asyncio.create_task(reader, name="ef-replies-read"),
                       asyncio.create_task(self._tidy(), name="ef-replies-tidy")]

    async def stop(self) -> None:
        """End both loops. They watch ``_running`` and end within ``SAFETY_POLL_S``: a cancel
        alone is not enough, since Python 3.11's ``asyncio.wait_for`` can swallow a cancel that
        arrives as the awaited event fires."""
        self._running = False
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=4 * SAFETY_POLL_S)
        try:
            await asyncio.wait_for(self._release(), SAFETY_POLL_S)
        except Exception:  # they expire anyway (result_expires)
            pass
        for future, _ in self._waiting.values():
            future.cancel()
        if self._subscription is not None:
            self._subscription.close()
        if self._pubsub is not None:
            await self._pubsub.aclose()
        if self._redis is not None:
            await self._redis.aclose()

    async def call(self, send: Send, task_id: str, timeout: float) -> Any:
        key = self._key(task_id)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[key] = (future, time.monotonic())
        try:
            await send()
            meta = await within(future, timeout)
        finally:
            if self._waiting.pop(key, None) is not None:
                self._done.append(key)
                if len(self._done) >= RELEASE_BATCH:
                    self._wake.set()
        return outcome(meta)

    def _key(self, task_id: str) -> bytes:
        key = self.backend.get_key_for_task(task_id)
        return key if isinstance(key, bytes) else str(key).encode()

    def _deliver(self, key: bytes, payload: Any) -> None:
        """Hand a final state to its waiter; a RETRY (the call was sent again) is answered later."""
        entry = self._waiting.get(key)
        if entry is None or entry[0].done():
            return
        meta = self._decode(payload)
        if meta.get("status") in states.READY_STATES:
            entry[0].set_result(meta)

    def _decode(self, payload: Any) -> dict[str, Any]:
        """A stored result's meta: orjson for plain JSON (an inline answer's base64 vectors parse
        several times faster than through kombu's hooks), Celery's decoder for anything that
        needs its type hooks (``__type__`` objects) or another serializer."""
        if self.backend.serializer == "json" and isinstance(payload, bytes) and b'"__type__"' not in payload:
            try:
                return self.backend.meta_from_decoded(orjson.loads(payload))
            except orjson.JSONDecodeError:
                pass
        return self.backend.decode_result(payload)

    async def _read(self) -> None:
        """Deliver published results; after a dropped connection the next read reconnects and
        redis-py subscribes again (results published meanwhile are found by ``_poll_overdue``)."""
        while self._running:
            try:
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=SAFETY_POLL_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("result pub/sub connection failed (%s); reconnecting", exc)
                await asyncio.sleep(0.1)
                continue
            if message is not None and message.get("type") == "pmessage":
                self._deliver(bytes(message["channel"]), message["data"])

    async def _subscribe(self, address: Any, pattern: bytes) -> AsyncConnection:
        """A connection of its own, subscribed to ``pattern``; its messages go to ``_pushed``."""
        connection = await AsyncConnection.open(address, 5.0, on_push=self._pushed)
        try:
            await connection.request(pack(("PSUBSCRIBE", pattern)), 5.0)
        except BaseException:
            connection.close()
            raise
        return connection

    async def _stay_subscribed(self, address: Any, pattern: bytes) -> None:
        """Subscribe again whenever the connection is lost (results published meanwhile are found
        by ``_poll_overdue``)."""
        while self._running:
            subscription = self._subscription
            if subscription is not None and subscription.is_open:
                await asyncio.shield(subscription.lost)
                continue
            log.warning("result pub/sub connection lost; reconnecting")
            try:
                self._subscription = await self._subscribe(address, pattern)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("result pub/sub connection failed (%s); reconnecting", exc)
                await asyncio.sleep(0.1)

    def _pushed(self, message: list[Any]) -> None:
        """A ``pmessage`` (pattern, channel, data), from the protocol's data callback."""
        try:
            if len(message) == 4:
                self._deliver(bytes(message[2]), message[3])
        except Exception:  # one bad result must not stop the others'
            log.exception("cannot deliver a result")

    async def _tidy(self) -> None:
        """Delete delivered results in batches; look up results that pub/sub did not bring."""
        while self._running:
            self._wake.clear()
            if len(self._done) < RELEASE_BATCH:
                try:
                    await asyncio.wait_for(self._wake.wait(), SAFETY_POLL_S)
                except asyncio.TimeoutError:
                    pass
            try:
                await self._release()
                await self._poll_overdue()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis is unreachable: try again on the next round
                log.warning("result housekeeping failed: %s", exc)
                await asyncio.sleep(SAFETY_POLL_S)

    async def _release(self) -> None:
        done, self._done = self._done, []
        if done:
            await self._redis.unlink(*done)

    async def _poll_overdue(self) -> None:
        now = time.monotonic()
        overdue = [key for key, (future, since) in list(self._waiting.items())
                   if not future.done() and now - since > SAFETY_POLL_S]
        if not overdue:
            return
        for key, payload in zip(overdue, await self._redis.mget(overdue)):
            if payload is not None:
                self._deliver(key, payload)


def _glob_escape(text: bytes) -> bytes:
    """``text`` matched literally by a Redis glob pattern."""
    return re.sub(rb"([*?\[\]\\])", rb"\\\1", text)


class LocalReplies(Replies):
    """The worker runs in this process (embedded mode): its ``task_postrun`` wakes the request."""

    def __init__(self, app: Celery) -> None:
        super().__init__(app)
        self._futures: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = {}
        self._mutex = threading.Lock()
        task_postrun.connect(self._finished, weak=False)

    async def stop(self) -> None:
        task_postrun.disconnect(self._finished)

    async def call(self, send: Send, task_id: str, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._mutex:
            self._futures[task_id] = (loop, future)
        try:
            await send()
            await asyncio.wait_for(future, timeout)
            return outcome(self.app.backend.get_task_meta(task_id, cache=False))
        finally:
            with self._mutex:
                self._futures.pop(task_id, None)
            self.app.backend.forget(task_id)

    def _finished(self, sender: Any = None, task_id: str | None = None, state: str | None = None,
                  **_: Any) -> None:
        if state not in states.READY_STATES:  # RETRY: the call was sent again, its answer comes later
            return
        with self._mutex:
            entry = self._futures.get(task_id or "")
        if entry is not None:
            loop, future = entry
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(None))


class ThreadReplies(Replies):
    """Any other result backend: Celery's blocking ``get`` on a worker thread."""

    async def call(self, send: Send, task_id: str, timeout: float) -> Any:
        await send()

        def wait() -> Any:
            result = self.app.AsyncResult(task_id)
            try:
                return result.get(timeout=timeout, propagate=True, disable_sync_subtasks=False)
            finally:
                result.forget()

        from celery.exceptions import TimeoutError as CeleryTimeout

        try:
            return await anyio.to_thread.run_sync(wait)
        except CeleryTimeout:
            raise TimeoutError(f"no result within {timeout:g} s") from None


def replies_for(app: Celery) -> Replies:
    """The cheapest way to wait that ``app``'s result backend allows."""
    backend = app.backend
    if type(backend) is RedisBackend:  # not the Sentinel subclass: its URL is not redis-py's
        return RedisReplies(app)
    if isinstance(backend, CacheBackend) and str(app.conf.result_backend).startswith("cache+memory"):
        return LocalReplies(app)
    return ThreadReplies(app)
