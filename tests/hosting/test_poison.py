"""Delivery counting where it survives the worker: Redis keys, SQS's receive count, or this process."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import RedisServer
from worker.hosting.poison import COUNTER_TTL_S, LocalDeliveries, RedisDeliveries, SqsDeliveries, deliveries_for


def test_redis_counts_survive_the_counter_object(redis_server: RedisServer) -> None:
    first = RedisDeliveries(redis_server.url)
    assert [first.begin("job-00001-a", None) for _ in range(3)] == [1, 2, 3]
    again = RedisDeliveries(redis_server.url)  # a new worker process sees the same count
    assert again.begin("job-00001-a", None) == 4 and again.begin("job-00002-a", None) == 1
    again.give_back("job-00001-a")  # a stop does not count
    assert first.begin("job-00001-a", None) == 4
    assert 0 < redis_server.client().ttl("embedfleet:deliveries:job-00001-a") <= COUNTER_TTL_S
    first.note_failure("job-00001-a", "OSError: disk " + "x" * 5000)
    reason = again.last_failure("job-00001-a")
    assert reason is not None and reason.startswith("OSError: disk") and len(reason) == 2000
    assert again.last_failure("job-00002-a") is None


def test_sqs_reads_the_receive_count_sqs_keeps() -> None:
    counter = SqsDeliveries()
    request = SimpleNamespace(properties={"delivery_info": {"sqs_message": {"Attributes": {"ApproximateReceiveCount": "3"}}}})
    assert counter.begin("t", request) == 3
    with pytest.raises(RuntimeError, match="ApproximateReceiveCount"):
        counter.begin("t", SimpleNamespace(properties={}))
    counter.note_failure("t", "why")
    assert counter.last_failure("t") == "why"


def test_local_counts_and_one_counter_per_broker() -> None:
    counter = LocalDeliveries()
    assert [counter.begin("t", None) for _ in range(2)] == [1, 2]
    counter.give_back("t")
    assert counter.begin("t", None) == 2
    assert deliveries_for("memory://localhost/") is deliveries_for("memory://localhost/")
    assert isinstance(deliveries_for("memory://other/"), LocalDeliveries)


def test_a_private_brokers_counter_goes_with_its_worker(tiny_embed_model: Path, tmp_path: Path) -> None:
    """Each in-process worker on the in-memory broker has a URL of its own; its counts (and its
    isolation) are dropped at its stop. Before, a process that ran many jobs (``embedfleet run``
    called from code, or a test session) kept every one's for good."""
    from producer.client import Client
    from worker.hosting import isolation, poison
    from worker.hosting.host import InProcessWorker, WorkerSpec

    corpus = tmp_path / "in.jsonl"
    corpus.write_text("".join(f'{{"text": "text number {i}"}}\n' for i in range(4)))
    spec = WorkerSpec(models=[str(tiny_embed_model)], device="cpu", backend="torch", dtype="float32", concurrency=1)
    with InProcessWorker(spec) as worker:
        handle = Client(app=worker.app).submit_corpus(str(corpus), str(tmp_path / "out"), model=str(tiny_embed_model))
        assert handle.wait(timeout=30, poll=0.1).status == "complete"
        assert worker.broker in poison._counters and worker.broker in isolation._instances
    assert worker.broker not in poison._counters and worker.broker not in isolation._instances
