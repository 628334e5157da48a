"""Inline answers written without Celery's encoder (worker.hosting.results) and read without its
decoder (producer.http.replies): the same meta Celery writes, read alike by Celery and the facade."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

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
    assert reader.AsyncResult("t-1").get(timeout=5) == ANSWER  # Celery's own reader (Client, other producers)
    replies = RedisReplies(reader)
    assert replies._decode(stored) == reader.backend.decode_result(stored)


def test_a_stored_failure_reads_back_as_the_workers_exception(redis_server: RedisServer) -> None:
    worker = create_app(redis_server.url)
    worker.backend.mark_as_failure("t-2", ValueError("broken"))
    stored = redis_server.client().get(worker.backend.get_key_for_task("t-2"))
    reader = make_app(redis_server.url)
    meta = RedisReplies(reader)._decode(stored)
    assert meta["status"] == "FAILURE" and isinstance(meta["result"], Exception) and "broken" in str(meta["result"])
