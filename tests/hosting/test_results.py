"""Inline answers written without Celery's encoder (worker.hosting.results) and read without its
decoder (producer.http.replies): the same meta Celery writes, read alike by Celery and the facade."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from producer.broker import make_app
from producer.http.replies import RedisReplies
from tests.conftest import RedisServer
from worker.hosting.app import create_app

ANSWER: dict[str, Any] = {"kind": "embed", "model": "m", "n_items": 2, "dims": 3, "data_b64": "AAAA" * 6,
                          "n_tokens": [4, 5], "truncated": [False, True], "labels": [], "errors": {"1": "too long"}}


def test_a_stored_inline_answer_is_celerys_meta_and_every_reader_gets_it(redis_server: RedisServer) -> None:
    worker = create_app(redis_server.url)
    backend = worker.backend
    backend.store_inline("t-1", ANSWER)
    stored = redis_server.client().get(backend.get_key_for_task("t-1"))
    celery_way = backend._get_result_meta(result=ANSWER, state="SUCCESS", traceback=None, request=None)
    celery_way["task_id"] = "t-1"
    ours, theirs = json.loads(stored), json.loads(backend.encode(celery_way))
    assert ours.keys() == theirs.keys()
    assert {k: v for k, v in ours.items() if k != "date_done"} == {k: v for k, v in theirs.items() if k != "date_done"}
    moment = dt.datetime.fromisoformat(ours["date_done"])
    assert moment.tzinfo is not None and abs((moment - dt.datetime.now(dt.timezone.utc)).total_seconds()) < 60
    reader = make_app(redis_server.url)
    assert reader.AsyncResult("t-1").get(timeout=5, disable_sync_subtasks=False) == ANSWER  # Celery's own reader (Client, other producers)
    replies = RedisReplies(reader)
    assert replies._decode(stored) == reader.backend.decode_result(stored)


def test_an_inline_answers_date_done_is_in_the_apps_timezone_as_celerys(redis_server: RedisServer) -> None:
    """``date_done`` is written as ``app.now()`` gives it: the time in the app's timezone."""
    worker = create_app(redis_server.url)
    worker.conf.timezone = "Asia/Kolkata"  # +05:30, no summer time
    worker.backend.store_inline("t-tz", ANSWER)
    ours = dt.datetime.fromisoformat(json.loads(redis_server.client().get(worker.backend.get_key_for_task("t-tz")))["date_done"])
    celerys = worker.now()
    assert ours.utcoffset() == celerys.utcoffset() == dt.timedelta(hours=5, minutes=30)
    assert abs((ours - celerys).total_seconds()) < 60


def test_a_stored_failure_reads_back_as_the_workers_exception(redis_server: RedisServer) -> None:
    worker = create_app(redis_server.url)
    worker.backend.mark_as_failure("t-2", ValueError("broken"))
    stored = redis_server.client().get(worker.backend.get_key_for_task("t-2"))
    reader = make_app(redis_server.url)
    meta = RedisReplies(reader)._decode(stored)
    assert meta["status"] == "FAILURE" and isinstance(meta["result"], Exception) and "broken" in str(meta["result"])


def test_the_answer_writer_stores_every_answer_and_what_waits_in_one_round_trip(redis_server: RedisServer) -> None:
    import threading

    from worker.hosting.inline import AnswerWriter

    backend = create_app(redis_server.url).backend
    calls: list[int] = []
    first_taken, release = threading.Event(), threading.Event()
    real = backend.store_inlines

    def gated(answers: list[tuple[str, Any]]) -> None:
        calls.append(len(answers))
        if len(calls) == 1:
            first_taken.set()
            release.wait(10)  # the first write is slow: the next answers queue behind it
        real(answers)

    backend.store_inlines = gated  # type: ignore[method-assign]
    writer = AnswerWriter(backend)
    writer.put("w-0", ANSWER)
    assert first_taken.wait(10)
    for i in range(1, 6):
        writer.put(f"w-{i}", {**ANSWER, "n_tokens": [i, i]})
    release.set()
    assert writer.flush(10)
    assert calls == [1, 5]
    reader = make_app(redis_server.url)
    for i in range(6):
        got = reader.AsyncResult(f"w-{i}").get(timeout=5, disable_sync_subtasks=False)
        assert got["n_tokens"] == ([4, 5] if i == 0 else [i, i])


def test_an_answer_alone_is_stored_on_its_own_thread_and_one_with_others_waiting_is_queued(
        redis_server: RedisServer) -> None:
    import threading

    from worker.hosting.inline import AnswerWriter

    backend = create_app(redis_server.url).backend
    threads: list[str] = []
    first_taken, release = threading.Event(), threading.Event()
    real = backend.store_inlines

    def recorded(answers: list[tuple[str, Any]]) -> None:
        threads.append(threading.current_thread().name)
        if answers[0][0] == "queued-0":
            first_taken.set()
            release.wait(10)
        real(answers)

    backend.store_inlines = recorded  # type: ignore[method-assign]
    writer = AnswerWriter(backend)
    writer.put("alone", ANSWER, alone=True)  # stored before put returns, on this thread
    assert threads == [threading.current_thread().name]
    assert redis_server.client().get(backend.get_key_for_task("alone")) is not None
    writer.put("queued-0", ANSWER)
    assert first_taken.wait(10)
    writer.put("alone-but-late", ANSWER, alone=True)  # another answer is still being written: queued
    release.set()
    assert writer.flush(10)
    assert threads[1:] == ["ef-inline-answers", "ef-inline-answers"]
    reader = make_app(redis_server.url)
    for task_id in ("alone", "queued-0", "alone-but-late"):
        assert reader.AsyncResult(task_id).get(timeout=5, disable_sync_subtasks=False) == ANSWER


def test_an_answer_the_writer_cannot_store_does_not_stop_it(redis_server: RedisServer) -> None:
    from worker.hosting.inline import AnswerWriter

    backend = create_app(redis_server.url).backend
    real = backend.store_inlines
    failures = iter([ConnectionError("down")])

    def flaky(answers: list[tuple[str, Any]]) -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        real(answers)

    backend.store_inlines = flaky  # type: ignore[method-assign]
    writer = AnswerWriter(backend)
    writer.put("lost", ANSWER)
    assert writer.flush(10)  # failed: its caller times out (504), as before
    writer.put("kept", ANSWER)
    assert writer.flush(10)
    client = redis_server.client()
    assert client.get(backend.get_key_for_task("lost")) is None
    assert make_app(redis_server.url).AsyncResult("kept").get(timeout=5, disable_sync_subtasks=False) == ANSWER


class _Recorder:
    """A pipeline that logs the commands it is given (and sends them: the keys are real)."""

    def __init__(self, pipe: Any, log: list[tuple[str, tuple]]) -> None:
        self._pipe, self._log = pipe, log

    def __enter__(self) -> "_Recorder":
        self._pipe.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._pipe.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._pipe, name)

        def logged(*args: Any, **kwargs: Any) -> Any:
            self._log.append((name, args, tuple(sorted(kwargs.items()))))
            return method(*args, **kwargs)

        return logged


@pytest.mark.parametrize("expires", [None, 60])
def test_the_batched_store_sends_celerys_own_commands(redis_server: RedisServer, expires: int | None) -> None:
    """``InlineResultBackend.set_commands`` repeats ``RedisBackend._set``'s pipeline; if Celery's
    changes (other commands, order, expiry handling), this fails, so the two move together. Both
    ways of sending them (a plain socket here, redis-py's pipeline where the URL needs redis-py)
    store the answer and publish it."""
    from celery.backends.redis import RedisBackend

    backend = create_app(redis_server.url).backend
    backend.expires = expires
    client = backend.client
    real = client.pipeline
    logs: list[tuple[str, tuple]] = []

    def recording(*args: Any, **kwargs: Any) -> _Recorder:
        return _Recorder(real(*args, **kwargs), logs)

    client.pipeline = recording  # type: ignore[method-assign]
    try:
        RedisBackend._set(backend, "celery-task-meta-x", b'{"a": 1}')
    finally:
        del client.pipeline
    ours = backend.set_commands([("celery-task-meta-x", b'{"a": 1}')])
    assert [(name, args) for name, args, _ in logs] == [(name, tuple(args)) for name, *args in ours] + [("execute", ())]
    assert all(not kwargs for _, _, kwargs in logs)
    for direct in (True, False):
        if not direct:
            backend.__dict__["_direct"] = None  # the redis-py pipeline
        listener = redis_server.client().pubsub()
        listener.subscribe("celery-task-meta-y")
        assert listener.get_message(timeout=5)["type"] == "subscribe"
        redis_server.client().delete("celery-task-meta-y")
        backend._set_many([("celery-task-meta-y", b'{"b": 2}')])
        message = listener.get_message(timeout=5)
        listener.close()
        assert message is not None and message["data"] == b'{"b": 2}'
        assert redis_server.client().get("celery-task-meta-y") == b'{"b": 2}'
        assert (redis_server.client().ttl("celery-task-meta-y") > 0) == bool(expires)


def test_the_direct_store_survives_a_redis_restart_and_reports_error_replies(tmp_path: Any) -> None:
    """The answer writer's own connection: a restarted Redis is reconnected to (Celery's retry
    policy), and an error reply is raised, not taken for a stored answer."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        backend = create_app(server.url).backend
        assert backend._direct is not None
        backend.store_inlines([("a", ANSWER)])
        server.stop()
        server.start()
        backend.store_inlines([("b", ANSWER)])
        assert server.client().get(backend.get_key_for_task("b")) is not None
        server.client().config_set("maxmemory", "1")
        server.client().config_set("maxmemory-policy", "noeviction")
        with pytest.raises(Exception, match="OOM|EXECABORT"):
            backend.store_inlines([("c", ANSWER)])
    finally:
        server.stop()
