"""Undecodable queue entries, pushed with redis-py, are discarded and counted; the consumer goes
on and still gets the good message behind them (kombu's own transport raises out of its loop)."""

from __future__ import annotations

import json

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from tests.conftest import RedisServer
from worker.hosting.transport import DISCARDED, TRANSPORT, UNDECODABLE

HOSTILE = [b"not json", b"\xff\xfe", b"[]", b"42", b'{"body": "x"}', b'{"properties": 1}', b'"text"',
           json.dumps({"body": "%%%", "properties": {"body_encoding": "base64", "delivery_tag": "t"},
                       "headers": {}, "content-type": "application/json", "content-encoding": "utf-8"}).encode()]


def _push_and_drain(redis_server: RedisServer, transport: str | None) -> list[object]:
    queue = Queue("embed.tiny", Exchange("embed.tiny"), routing_key="embed.tiny")
    received: list[object] = []
    with Connection(redis_server.url, transport=transport) as connection:
        Producer(connection.default_channel).publish({"n": 1}, exchange=queue.exchange, routing_key="embed.tiny",
                                                     declare=[queue], serializer="json")
        client = redis_server.client()
        client.rpush("embed.tiny", *HOSTILE)  # BRPOP takes from the right: the garbage comes first
        with Consumer(connection, [queue], callbacks=[lambda body, message: (received.append(body), message.ack())]):
            for _ in range(len(HOSTILE) + 1):
                if received:
                    break
                connection.drain_events(timeout=5)
    return received


def test_undecodable_entries_are_discarded_and_the_good_one_is_delivered(redis_server: RedisServer) -> None:
    before = DISCARDED.labels(queue="embed.tiny")._value.get()
    assert _push_and_drain(redis_server, TRANSPORT) == [{"n": 1}]
    assert DISCARDED.labels(queue="embed.tiny")._value.get() - before == len(HOSTILE)
    assert redis_server.client().llen("embed.tiny") == 0


def test_kombus_own_transport_raises_out_of_the_consumer(redis_server: RedisServer) -> None:
    """What the worker did before: the first entry ends the consumer's loop."""
    with pytest.raises(UNDECODABLE):
        _push_and_drain(redis_server, None)


def test_the_workers_app_consumes_redis_with_it() -> None:
    from worker.hosting.app import create_app
    from worker.hosting.transport import Transport

    for url in ("redis://127.0.0.1:1/0", "rediss://127.0.0.1:1/0"):
        connection = create_app(url).connection_for_read()
        assert type(connection.transport) is Transport
        assert bool(connection.ssl) == url.startswith("rediss")


# ---------------------------------------------------------------------------- SQS (moto over HTTP)
SQS_HOSTILE = ["not json", "[]", "42", '{"body": "x"}', '{"properties": 1}', '"text"', "bm90IGpzb24="]


@pytest.fixture
def moto_sqs(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    moto_server = pytest.importorskip("moto.server")
    from tests.conftest import free_port

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    yield
    server.stop()


def test_undecodable_sqs_messages_are_deleted_and_counted(moto_sqs: None) -> None:
    import boto3

    from producer.broker import ensure_sqs_queue, sqs_transport_options
    from worker.hosting.transport import SQS_TRANSPORT

    name = "embed.tiny"
    url = ensure_sqs_queue(name)  # with its dead-letter queue: the garbage must not land there either
    queue = Queue(name, Exchange(name), routing_key=name)
    received: list[object] = []
    before = DISCARDED.labels(queue=name)._value.get()
    sqs = boto3.client("sqs")
    for body in SQS_HOSTILE:
        sqs.send_message(QueueUrl=url, MessageBody=body)
    options = {**sqs_transport_options([name]), "wait_time_seconds": 1}
    with Connection("sqs://", transport=SQS_TRANSPORT, transport_options=options) as connection:
        Producer(connection.default_channel).publish({"n": 1}, exchange=queue.exchange, routing_key=name,
                                                     serializer="json", declare=[queue])
        with Consumer(connection, [queue], callbacks=[lambda body, message: (received.append(body), message.ack())]):
            for _ in range(len(SQS_HOSTILE) + 5):
                if received:
                    break
                try:
                    connection.drain_events(timeout=2)
                except TimeoutError:
                    continue
    assert received == [{"n": 1}]
    assert DISCARDED.labels(queue=name)._value.get() - before == len(SQS_HOSTILE)
    left = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert left["ApproximateNumberOfMessages"] == left["ApproximateNumberOfMessagesNotVisible"] == "0"
    dlq = sqs.get_queue_url(QueueName="embed-tiny-dlq")["QueueUrl"]
    assert sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["ApproximateNumberOfMessages"])[
        "Attributes"]["ApproximateNumberOfMessages"] == "0"


def test_the_workers_app_consumes_sqs_with_it(moto_sqs: None) -> None:
    from worker.hosting.app import create_app
    from worker.hosting.sqs_transport import SqsTransport

    assert type(create_app("sqs://", backend="redis://127.0.0.1:1/0").connection_for_read().transport) is SqsTransport


def test_kombus_brpop_read_is_the_one_the_channel_mirrors() -> None:
    """``Channel._brpop_take`` repeats kombu 5.7's ``_brpop_read`` but for the entry's decoding; a
    kombu whose method differs fails here, so the two move together (compare, then update the hash)."""
    import hashlib
    import inspect

    from kombu.transport import redis

    source = inspect.getsource(redis.Channel._brpop_read)
    assert hashlib.sha256(source.encode()).hexdigest() == \
        "c42518699709f2df90f55a048fe6346612ae5527e5c4a6819f2c0920dc62088f", source


@pytest.mark.parametrize("entry", [
    json.dumps({"body": "eyJhIjogMX0=", "headers": {"id": "x", "retries": 0}, "properties": {"delivery_tag": "t"},
                "content-type": "application/json"}).encode(),
    b'{"headers": {"eta": {"__type__": "datetime", "__value__": "2026-12-07T00:00:00"}}}',  # kombu's typed value
    b'{"n": NaN, "big": 123456789012345678901234567890}',  # only Python's reader takes these
])
def test_an_entry_is_read_as_kombu_reads_it(entry: bytes) -> None:
    from kombu.utils.json import loads

    from worker.hosting.transport import decode_entry

    assert repr(decode_entry(entry)) == repr(loads(entry.decode()))  # repr: NaN equals itself there


@pytest.mark.parametrize("entry", HOSTILE[:2])
def test_an_entry_that_is_not_json_raises_what_the_channel_discards(entry: bytes) -> None:
    from worker.hosting.transport import decode_entry

    with pytest.raises(UNDECODABLE):
        decode_entry(entry)
