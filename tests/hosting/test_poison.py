"""Delivery counting where it survives the worker: Redis keys, SQS's receive count, or this process."""

from __future__ import annotations

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
