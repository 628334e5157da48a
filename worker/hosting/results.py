"""The worker's Redis result backend: Celery's, minus one read on the answer path of inline calls.

Before it writes a result, Celery's key-value backends read the stored one and keep a success
already there (so a task re-run after a lost worker cannot overwrite it). For an inline call that
read is a full Redis round trip between the end of the computation and the caller's answer, and
it protects nothing: an inline result is read once, as soon as it is published, and a re-run
computes the same vectors. So successful inline results are written at once; every other result
(shards, info, failures) goes through Celery's own path unchanged.

Celery loads it from the result backend URL ``worker.hosting.results:InlineResultBackend+redis://...``
(its ``class+url`` form, as in ``db+postgresql://``); ``backend_url`` builds that URL.
"""

from __future__ import annotations

import datetime as dt
import threading
from functools import cached_property
from typing import Any

import orjson
from celery import states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str

from producer.broker import INLINE_TASK
from producer.resp import Address, SyncConnection, pack, plain_url

BACKEND_CLASS = "worker.hosting.results:InlineResultBackend"


class InlineResultBackend(RedisBackend):
    """``RedisBackend`` that writes successful inline results without reading first."""

    def _store_result(self, task_id: str, result: Any, state: str, traceback: Any = None, request: Any = None,
                      **kwargs: Any) -> Any:
        if state != states.SUCCESS or getattr(request, "task", None) != INLINE_TASK:
            return super()._store_result(task_id, result, state, traceback, request, **kwargs)
        self.store_inline(task_id, result, request)
        return result

    def store_inlines(self, answers: list[tuple[str, Any]]) -> None:
        """Write (and publish) several successful inline results in one Redis round trip."""
        items = [(self.get_key_for_task(task_id), self._inline_payload(task_id, result)) for task_id, result in answers]
        self.ensure(self._set_many, (items,))

    def _set_many(self, items: list[tuple[Any, Any]]) -> None:
        """``RedisBackend._set`` for many keys in one transaction: Celery has no batched store, so
        this repeats its commands (``set_commands``) and ``set``'s size check. On a plain
        ``redis://`` backend they are written straight to a socket of the answer writer's
        (``producer.resp``: redis-py's pipeline cost 630-710 us against 240-280 us a round trip,
        2-core Zen 5, cold, most of it before the write); else through redis-py's pipeline."""
        for _, value in items:
            if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
                raise BackendStoreError("value too large for Redis backend")
        commands = self.set_commands(items)
        if self._direct is None:
            with self.client.pipeline() as pipe:
                for name, *args in commands:
                    getattr(pipe, name)(*args)
                pipe.execute()
            return
        packed = [pack(("MULTI",)), *(pack((name.upper(), *map(_wire, args))) for name, *args in commands),
                  pack(("EXEC",))]
        with self._direct_lock:
            replies = self._direct.execute(packed)
        executed = replies[-1]  # EXEC: every command's reply, or the error that aborted them
        for reply in (*replies, *(executed if isinstance(executed, list) else ())):
            if isinstance(reply, Exception):
                raise reply

    def set_commands(self, items: list[tuple[Any, Any]]) -> list[tuple[Any, ...]]:
        """The commands Celery's ``RedisBackend._set`` sends for each item, as (method, *args): SETEX
        with the results' expiry (else SET), then PUBLISH on the key's channel, which the facade's
        reader subscribes to. They must change together: tests/hosting/test_results.py compares these
        with the commands Celery's own ``_set`` sends and fails when Celery's change."""
        commands: list[tuple[Any, ...]] = []
        for key, value in items:
            commands.append(("setex", key, self.expires, value) if self.expires else ("set", key, value))
            commands.append(("publish", key, value))
        return commands

    @cached_property
    def _direct(self) -> SyncConnection | None:
        """The answer writer's own connection, where the backend is a plain ``redis://`` one
        (redis-py's connection options this does not reproduce keep its pipeline)."""
        address = self._plain_address()
        if address is None:
            return None
        timeout = self.connparams.get("socket_timeout") or 120.0
        return SyncConnection(address, self.connparams.get("socket_connect_timeout") or 5.0, timeout)

    def _plain_address(self) -> Address | None:
        params = self.connparams
        if not isinstance(self.url, str) or params.get("connection_class") is not None or params.get("client_name") \
                or "path" in params or any(key.startswith("ssl") for key in params):
            return None
        return plain_url(self.url)

    @cached_property
    def _direct_lock(self) -> threading.Lock:
        return threading.Lock()

    def store_inline(self, task_id: str, result: Any, request: Any = None) -> None:
        """Write (and publish) a successful inline result: one SET and one PUBLISH, no read.

        The meta is Celery's own (``_get_result_meta``: status, result, traceback, children,
        date_done, task_id), written by orjson when the results are plain JSON: Celery's encoder
        (the standard library's, with kombu's type hooks) took 147-324 us for a 10-vector answer on
        the worker's answer path (2-core AMD, idle vs loaded), orjson 50 us loaded, and any JSON
        reader decodes the same object."""
        self._set_with_state(self.get_key_for_task(task_id), self._inline_payload(task_id, result, request),
                             states.SUCCESS)

    @cached_property
    def _plain_meta(self) -> bool:
        """Whether a result's meta is Celery's plain one in JSON (no extended fields): read once,
        since both are fixed when the app starts and a look-up in Celery's config cost ~8 us an answer."""
        return self.serializer == "json" and not self.app.conf.find_value_for_key("extended", "result")

    def _inline_payload(self, task_id: str, result: Any, request: Any = None) -> Any:
        """The stored bytes of a successful inline result (see ``store_inline``).

        ``date_done`` is ``app.now()``'s value, the time now in the app's timezone, without its
        detour through a conversion to UTC and back (11 us against 2.4 us, 2-core Zen 4, loaded).
        With no request (the answer writer's thread, which runs no task) there are no children."""
        if self._plain_meta:
            meta = {"status": states.SUCCESS, "result": result, "traceback": None,
                    "children": self.current_task_children(request) if request is not None else None,
                    "date_done": dt.datetime.now(self.app.timezone).isoformat(), "task_id": bytes_to_str(task_id)}
            try:
                return orjson.dumps(meta)
            except TypeError:  # a value orjson does not know: Celery's encoder has kombu's hooks
                pass
        meta = self._get_result_meta(result=result, state=states.SUCCESS, traceback=None, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        return self.encode(meta)


def _wire(value: Any) -> Any:
    """A command argument as redis-py sends it (numbers as their decimal text)."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def backend_url(url: str) -> str:
    """``url`` with this backend class in front of a Redis URL; any other backend is kept as is."""
    if url.startswith(("redis://", "rediss://")):
        return f"{BACKEND_CLASS}+{url}"
    return url
