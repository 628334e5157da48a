"""kombu's Redis and SQS transports for workers, minus what an undecodable message does to them.

kombu decodes a message right after BRPOP took it off the queue; an entry that is not JSON, or
JSON that is not a kombu envelope, raises out of the consumer's event loop, and Celery stops the
consumer. Six such entries pushed onto a queue by anyone who can reach Redis stopped a worker
(``MAX_CONSUMER_RESTARTS``), and N workers x 6 a fleet. Here such an entry, already off the
queue, is discarded: counted (``embedfleet_discarded_messages``, in the worker's default
Prometheus registry) and logged at most once a minute, and consumption goes on. Well-formed
envelopes with a bad task inside are Celery's to reject, as before.

On SQS, kombu wraps a body that is not its JSON envelope into one with no task, which Celery
rejects as an unknown message; with the redrive policy such a message is received again and again
until SQS moves it to the dead-letter queue, beside the shards that really failed. Here it is
deleted on receipt instead, counted and logged the same way.

Only the worker's app uses these transports (``worker.hosting.app``); producers publish with kombu's.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from queue import Empty

from kombu.transport import SQS, redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from prometheus_client import Counter

log = logging.getLogger(__name__)

#: Where ``worker.hosting.app`` points Celery's ``broker_transport`` for Redis brokers.
TRANSPORT = "worker.hosting.transport:Transport"
#: The same for SQS brokers.
SQS_TRANSPORT = "worker.hosting.transport:SqsTransport"
#: What decoding a queue entry into a kombu message raises on garbage (JSON, base64, UTF-8, shape).
UNDECODABLE = (ValueError, KeyError, TypeError, IndexError)
LOG_EVERY_S = 60.0

DISCARDED = Counter("embedfleet_discarded_messages", "Queue entries discarded as undecodable", ["queue"])


class _Throttle:
    """One log line per ``LOG_EVERY_S``, saying how many were discarded since the last one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = float("-inf")
        self._since = 0

    def discarded(self, queue: str, exc: BaseException) -> None:
        DISCARDED.labels(queue=queue).inc()
        with self._lock:
            self._since += 1
            now = time.monotonic()
            if now - self._last < LOG_EVERY_S:
                return
            count, self._since, self._last = self._since, 0, now
        log.warning("discarded %d undecodable message(s) (latest on %s: %s: %s)", count, queue,
                    type(exc).__name__, str(exc)[:200])


throttle = _Throttle()


class Channel(redis.Channel):
    """kombu's Redis channel; a popped entry that cannot be decoded is discarded, not raised."""

    def _brpop_read(self, **options: Any) -> bool:
        try:
            return bool(super()._brpop_read(**options))
        except UNDECODABLE as exc:
            throttle.discarded(self._last_queue(), exc)
            return True  # the entry is off the queue; the next read goes on

    def _last_queue(self) -> str:
        """The queue the entry came from (kombu rotates its cycle to it before decoding)."""
        try:
            return str(self._queue_cycle.items[-1])
        except (AttributeError, IndexError):
            return "?"


class Transport(redis.Transport):
    Channel = Channel


class SqsChannel(SQS.Channel):
    """kombu's SQS channel; a received body that is not a kombu envelope is deleted and counted."""

    def _get(self, queue: str) -> Any:
        try:
            return super()._get(queue)
        except IndexError:  # the one message received was discarded
            raise Empty() from None

    def _messages_to_python(self, messages: list[dict[str, Any]], queue: str) -> list[Any]:
        kept = [m for m in messages if self._decodable(m, queue, self._new_queue(queue))]
        return super()._messages_to_python(kept, queue)

    def _on_messages_ready(self, queue: str, qname: str, messages: dict[str, Any]) -> int:
        received = messages.get("Messages") or []
        kept = [m for m in received if self._decodable(m, qname, queue)]
        return int(super()._on_messages_ready(queue, qname, {**messages, "Messages": kept}))

    def _decodable(self, message: dict[str, Any], queue: str, queue_url: str) -> bool:
        """Whether the body is a kombu envelope; if not, the message is deleted and counted."""
        try:
            payload = loads(bytes_to_str(self._decode_python_message_body(message["Body"])))
            if not isinstance(payload, dict) or not isinstance(payload.get("properties"), dict) \
                    or "body" not in payload:
                raise ValueError("not a kombu message envelope")
        except (*UNDECODABLE, AttributeError) as exc:
            self._discard(message, queue, queue_url, exc)
            return False
        return True

    def _discard(self, message: dict[str, Any], queue: str, queue_url: str, exc: BaseException) -> None:
        throttle.discarded(queue, exc)
        try:
            self.sqs(queue=queue).delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
        except Exception as error:  # it comes back after the visibility timeout, and is discarded again
            log.warning("could not delete an undecodable message from %s: %s", queue, error)


class SqsTransport(SQS.Transport):
    Channel = SqsChannel
