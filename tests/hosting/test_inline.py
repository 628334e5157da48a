"""The inline lane's fast way on a Redis fleet: calls go straight into the engine and are answered
exactly as the inline task answers them; what it does not take (expired, sent again, refused,
token-level) is answered Celery's way."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from celery.exceptions import TaskRevokedError

from producer.broker import INLINE_TASK, make_app
from producer.client import decode_f32
from producer.jobs import EmbedJob, InlineResult, Options, TokensJob, inline_queue_name
from tests.conftest import RedisServer
from worker.hosting.host import InProcessWorker, WorkerSpec
from worker.hosting.inline import FastInline


@pytest.fixture
def fleet(redis_server: RedisServer, tiny_embed_model: Path) -> Iterator[tuple[InProcessWorker, Any]]:
    spec = WorkerSpec(models=[str(tiny_embed_model)], device="cpu", backend="torch", dtype="float32",
                      concurrency=1, inline_slots=1)
    with InProcessWorker(spec, broker=redis_server.url, handle_signals=False) as worker:
        yield worker, make_app(redis_server.url)


def call(app: Any, payload: dict[str, Any], model: str = "tiny-bert", **options: Any) -> dict[str, Any]:
    pending = app.send_task(INLINE_TASK, args=[payload], queue=inline_queue_name("embed", model), **options)
    try:
        return pending.get(timeout=60, disable_sync_subtasks=False)
    finally:
        pending.forget()


def test_the_fast_way_is_taken_and_answers_as_the_task_does(fleet: tuple[InProcessWorker, Any]) -> None:
    worker, app = fleet
    assert isinstance(worker._controller.consumer.inline_consumer.on_message, FastInline)
    engine = worker.engines[0]
    texts = ["a first text", "and a somewhat longer second one", "word " * 600]
    for options in (Options(), Options(dimensions=8), Options(normalize=False)):
        payload = EmbedJob(model="tiny-bert", inputs=texts, options=options).model_dump(mode="json")
        result = InlineResult.model_validate(call(app, payload))
        want = engine.run(texts, options, timeout=60)
        assert result.n_items == 3 and result.dims == want.values.shape[1] and not result.errors
        np.testing.assert_allclose(decode_f32(result.data_b64, 3, result.dims), want.values, rtol=1e-5, atol=1e-6)
        assert result.n_tokens == want.n_tokens and result.truncated == want.truncated == [False, False, True]
    # a rejected input is an error for that input only, the others are answered
    payload = EmbedJob(model="tiny-bert", inputs=["fine", "also fine"], options=Options(truncate=False))
    payload_json = payload.model_dump(mode="json")
    payload_json["inputs"][1] = "word " * 5000
    result = InlineResult.model_validate(call(app, payload_json))
    assert set(result.errors) == {1} and result.n_items == 2


def test_what_the_fast_way_does_not_take_is_answered_the_task_s_way(fleet: tuple[InProcessWorker, Any]) -> None:
    worker, app = fleet
    # an option the model cannot honour: the refusal's code, from the task
    payload = EmbedJob(model="tiny-bert", inputs=["x"], options=Options(dimensions=100_000)).model_dump(mode="json")
    result = InlineResult.model_validate(call(app, payload))
    assert result.error is not None and "dimensions" in result.error["message"]
    # a message that does not validate
    result = InlineResult.model_validate(call(app, {"kind": "embed", "model": "tiny-bert", "inputs": "not a list"}))
    assert result.error is not None and "not valid" in result.error["message"]
    # token-level jobs
    tokens = call(app, TokensJob(model="tiny-bert", op="tokenize", inputs=["hello world"]).model_dump(mode="json"))
    assert InlineResult.model_validate(tokens).tokens
    # a call sent again (retries) runs as a task and is answered all the same
    payload = EmbedJob(model="tiny-bert", inputs=["again"]).model_dump(mode="json")
    assert InlineResult.model_validate(call(app, payload, retries=1)).n_items == 1
    # an expired call is not computed: Celery records it revoked
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    with pytest.raises(TaskRevokedError):
        call(app, payload, expires=past)


def test_a_messages_expiry_becomes_the_engines_deadline() -> None:
    """The facade's per-request deadline travels as the message's ``expires``; the worker hands
    the engine the same moment on its own clock (so it drops the call's rest once it passes)."""
    import time

    from worker.hosting.tasks import monotonic_deadline

    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=30)
    deadline = monotonic_deadline(soon.isoformat())
    assert deadline is not None and 29 < deadline - time.monotonic() <= 30
    past = monotonic_deadline((dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)).isoformat())
    assert past is not None and past < time.monotonic()
    assert monotonic_deadline(None) is None and monotonic_deadline("not a time") is None


def test_message_arguments_are_what_kombu_decodes() -> None:
    """The fast way reads plain JSON bodies itself; what it must not read (kombu's typed objects,
    a content type the worker does not accept) is kombu's to decode or refuse, as before."""
    import orjson
    from kombu.exceptions import ContentDisallowed
    from kombu.message import Message
    from kombu.utils.json import dumps as kombu_dumps

    from worker.hosting.inline import _arguments

    def message(body: bytes, content_type: str = "application/json", accept: Any = ("application/json",)) -> Message:
        return Message(body=body, content_type=content_type, content_encoding="utf-8", accept=set(accept))

    plain = [[{"kind": "embed", "model": "m", "inputs": ["é, ü", "b"], "options": {"dimensions": None}}], {}, {}]
    for body in (orjson.dumps(plain), kombu_dumps(plain).encode()):
        assert _arguments(message(body)) == message(body).decode()[0] == plain[0]
    typed = kombu_dumps([[{"when": dt.datetime(2026, 1, 2, 3, 4, 5)}], {}, {}]).encode()
    assert b'"__type__"' in typed
    assert _arguments(message(typed)) == [{"when": dt.datetime(2026, 1, 2, 3, 4, 5)}]
    with pytest.raises(ContentDisallowed):
        _arguments(message(orjson.dumps(plain), accept=("application/x-yaml",)))


def test_jobs_told_apart_by_kind_are_the_unions_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    import worker.hosting.inline as inline

    from producer.jobs import ClassifyJob, RerankJob, wire
    from worker.hosting.inline import job_of
    from worker.hosting.tasks import inline_job

    payloads = [wire(EmbedJob(model="m", inputs=["a", "b"], options=Options(dimensions=8))),
                wire(RerankJob(model="r", query="q", documents=["d1", "d2"])),
                wire(ClassifyJob(model="c", inputs=["x"])),
                wire(TokensJob(model="m", op="tokenize", inputs=["x"])),
                {"model": "m", "inputs": ["no kind named"]}]
    want = [inline_job(payload) for payload in payloads]
    for payload, job in zip(payloads, want):
        assert job_of(payload) == job and type(job_of(payload)) is type(job)
    for bad in ({"kind": "embed", "model": "m", "inputs": "not a list"}, {"kind": "nope", "model": "m"}):
        with pytest.raises(ValidationError):
            job_of(bad)
    monkeypatch.setattr(inline, "inline_job", lambda payload: pytest.fail(f"the union was asked: {payload}"))
    assert [job_of(payload) for payload in payloads[:-1]] == want[:-1]  # a job naming its kind needs only its model
