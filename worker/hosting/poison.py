"""Counting deliveries of a shard, so one that keeps failing (or killing workers) is parked.

A shard message is delivered again whenever its worker dies or gives it back. Without a count,
a shard that crashes every worker would circulate forever and its job would never finish. So
each delivery is counted where it survives the worker:

* Redis: ``INCR`` on a key named by the message's task id (a fresh id per submission), with an
  expiry, in the broker's own Redis;
* SQS: the message's ``ApproximateReceiveCount``, which SQS keeps (and a redrive policy to a
  dead-letter queue as the last resort, see ``producer.broker.ensure_sqs_queue``);
* the in-memory transport of ``embedfleet run``: a counter in this process, one per in-memory broker.

The counter is the broker's a task was delivered from (``deliveries_for`` its app's broker URL).

After ``EMBEDFLEET_MAX_DELIVERIES`` deliveries the shard is parked: a failed marker names the
reason, the message is acknowledged, and the job's other shards go on.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from producer.broker import broker_kind

#: A delivery counter outlives any plausible job, then cleans itself up.
COUNTER_TTL_S = 7 * 86400
_KEY = "embedfleet:deliveries:{}"
_REASON = "embedfleet:last-failure:{}"


class Deliveries(Protocol):
    def begin(self, task_id: str, request: Any) -> int:
        """Count this delivery; return how many there have been, this one included."""

    def give_back(self, task_id: str) -> None:
        """This delivery was returned unprocessed (the worker is stopping): do not count it."""

    def note_failure(self, task_id: str, reason: str) -> None:
        """Remember why a delivery failed, so the parked shard can say why."""

    def last_failure(self, task_id: str) -> str | None: ...


class RedisDeliveries:
    """Counts in the broker's Redis; survives any worker, and a Redis restart with persistence."""

    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10, retry_on_timeout=True)

    def begin(self, task_id: str, request: Any) -> int:
        key = _KEY.format(task_id)
        pipe = self.client.pipeline()
        pipe.incr(key)
        pipe.expire(key, COUNTER_TTL_S)
        return int(pipe.execute()[0])

    def give_back(self, task_id: str) -> None:
        self.client.decr(_KEY.format(task_id))

    def note_failure(self, task_id: str, reason: str) -> None:
        self.client.set(_REASON.format(task_id), reason[:2000], ex=COUNTER_TTL_S)

    def last_failure(self, task_id: str) -> str | None:
        value = self.client.get(_REASON.format(task_id))
        return value.decode("utf-8", "replace") if value else None


class SqsDeliveries:
    """SQS counts receives itself (``ApproximateReceiveCount``); reasons are kept in memory only."""

    def __init__(self) -> None:
        self._reasons: dict[str, str] = {}

    def begin(self, task_id: str, request: Any) -> int:
        properties = getattr(request, "properties", None) or {}
        sqs_message = (properties.get("delivery_info") or {}).get("sqs_message") or {}
        count = (sqs_message.get("Attributes") or {}).get("ApproximateReceiveCount")
        if count is None:
            raise RuntimeError("the SQS message carries no ApproximateReceiveCount; cannot count deliveries")
        return int(count)

    def give_back(self, task_id: str) -> None:
        """SQS's count cannot be lowered: a stop costs one delivery (keep N above 1 on SQS)."""

    def note_failure(self, task_id: str, reason: str) -> None:
        self._reasons[task_id] = reason

    def last_failure(self, task_id: str) -> str | None:
        return self._reasons.get(task_id)


class LocalDeliveries:
    """The in-memory transport lives and dies with this process, and so does its count."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._reasons: dict[str, str] = {}
        self._lock = threading.Lock()

    def begin(self, task_id: str, request: Any) -> int:
        with self._lock:
            self._counts[task_id] = self._counts.get(task_id, 0) + 1
            return self._counts[task_id]

    def give_back(self, task_id: str) -> None:
        with self._lock:
            self._counts[task_id] = max(0, self._counts.get(task_id, 1) - 1)

    def note_failure(self, task_id: str, reason: str) -> None:
        self._reasons[task_id] = reason

    def last_failure(self, task_id: str) -> str | None:
        return self._reasons.get(task_id)


_counters: dict[str, Deliveries] = {}
_lock = threading.Lock()


def deliveries_for(broker_url: str) -> Deliveries:
    """The counter of the broker at ``broker_url`` (one per URL and process).

    A task passes its own worker's broker (its Celery app's ``broker_url``), never the process's:
    two in-process workers on different brokers (a fleet worker's Redis, an embedded ``serve``'s
    in-memory broker) each count on their own, and each in-memory broker has a count of its own."""
    with _lock:
        counter = _counters.get(broker_url)
        if counter is None:
            kind = broker_kind(broker_url)
            if kind == "redis":
                counter = RedisDeliveries(broker_url)
            elif kind == "sqs":
                counter = SqsDeliveries()
            else:
                counter = LocalDeliveries()
            _counters[broker_url] = counter
        return counter


def forget(broker_url: str) -> None:
    """Drop the counter of a broker that is gone (an in-process worker's private in-memory one, at
    its stop): each such worker has a URL of its own, so a process that starts many kept every
    one's counts for good."""
    with _lock:
        _counters.pop(broker_url, None)
