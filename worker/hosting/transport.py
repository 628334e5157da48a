"""kombu's Redis transport for workers, minus what an undecodable message does to them.

kombu decodes a message right after BRPOP took it off the queue; an entry that is not JSON, or
JSON that is not a kombu envelope, raises out of the consumer's event loop, and Celery stops the
consumer. Six such entries pushed onto a queue by anyone who can reach Redis stopped a worker
(``MAX_CONSUMER_RESTARTS``), and N workers x 6 a fleet. Here such an entry, already off the
queue, is discarded: counted (``embedfleet_discarded_messages``, in the worker's default
Prometheus registry) and logged at most once a minute, and consumption goes on. Well-formed
envelopes with a bad task inside are Celery's to reject, as before.

The SQS counterpart is ``worker.hosting.sqs_transport``, a module of its own so that a worker on
Redis never imports botocore (kombu's SQS transport needs it at import time).

Only the worker's app uses these transports (``worker.hosting.app``); producers publish with kombu's.
"""

from __future__ import annotations

import logging
import threading
import time
from queue import Empty
from typing import Any

import orjson
from kombu.transport import redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from prometheus_client import Counter

log = logging.getLogger(__name__)

#: Where ``worker.hosting.app`` points Celery's ``broker_transport`` for Redis brokers.
TRANSPORT = "worker.hosting.transport:Transport"
#: The same for SQS brokers (imported by Celery only when the broker is SQS).
SQS_TRANSPORT = "worker.hosting.sqs_transport:SqsTransport"
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
    """kombu's Redis channel; a popped entry that cannot be decoded is discarded, not raised, and
    one in plain JSON is decoded by orjson."""

    def _brpop_read(self, **options: Any) -> bool:
        try:
            return self._brpop_take(**options)
        except UNDECODABLE as exc:
            throttle.discarded(self._last_queue(), exc)
            return True  # the entry is off the queue; the next read goes on

    def _brpop_take(self, **options: Any) -> bool:
        """kombu's own ``Channel._brpop_read`` (kombu 5.7), but for the decoding of the entry
        (``decode_entry``): kombu's JSON reader calls a Python hook for every object in it, 55-65
        us an inline message when the worker's core comes to it cold (2-core Zen 5), orjson 6-9.
        tests/hosting/test_transport.py holds kombu's method to the one this mirrors, so a kombu
        upgrade that changes it fails there first."""
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # a ConnectionError: disconnect, so the next iteration reconnects
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            self.connection._deliver(decode_entry(item), dest)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()  # the BRPOP connection is idle now: kombu's moment to re-authenticate

    def _last_queue(self) -> str:
        """The queue the entry came from (kombu rotates its cycle to it before decoding)."""
        try:
            return str(self._queue_cycle.items[-1])
        except (AttributeError, IndexError):
            return "?"


def decode_entry(item: bytes) -> Any:
    """A queue entry as kombu's ``loads(bytes_to_str(item))`` reads it: by orjson when no object in
    it can be one of kombu's typed values (``__type__``) and orjson reads it, else by kombu itself,
    which raises a ``ValueError`` for an entry that is not UTF-8 JSON."""
    if isinstance(item, bytes) and b'"__type__"' not in item:
        try:
            return orjson.loads(item)
        except orjson.JSONDecodeError:  # what only Python's reader takes (NaN, integers past 64 bits), or garbage
            pass
    return loads(bytes_to_str(item))


class Transport(redis.Transport):
    Channel = Channel
