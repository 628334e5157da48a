"""Worker liveness on Redis: a heartbeat key per worker naming the broker messages it holds.

Why: kombu's Redis transport gives an unacknowledged message back only after the visibility
timeout (an hour by default, longer than any shard), so the shards a SIGKILLed worker held
would wait that hour, and a long shard on a live worker would be delivered twice once it ran
past the timeout. With a heartbeat both are decided by evidence instead of a clock:

* every worker writes ``embedfleet:alive:<hostname>`` every few seconds, with a short TTL
  (``EMBEDFLEET_LIVENESS_TTL``), holding the time and the delivery tags of the messages it holds
  (reserved or running, and those that finished moments ago and may still be acknowledging);
* in the same beat it refreshes those messages' time in kombu's ``unacked_index``, so kombu's own
  visibility-timeout restore never takes a message from a live worker;
* ``orphans`` names the unacknowledged messages no live worker claims, delivered before every
  live worker's latest beat (so each of them has had a chance to claim it); the sweeper
  (``worker.hosting.sweeper``) gives those back to their queue through kombu's own restore.

This module only reads and writes Redis keys; it imports nothing from the rest of the worker.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

ALIVE_KEY = "embedfleet:alive:{}"
ALIVE_PATTERN = "embedfleet:alive:*"
#: kombu's Redis transport: delivery tag -> [message, exchange, routing key], and tag -> delivery time.
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
#: A message delivered this close to a live worker's beat may not be in that beat yet (clock skew too).
CLAIM_MARGIN_S = 5.0
#: A request that left Celery's registry is claimed this long more: it may still be acknowledging.
FINISHING_S = 60.0


@dataclass(frozen=True)
class Beat:
    """One worker's latest heartbeat."""

    hostname: str
    at: float
    held: frozenset[str]


def beat_interval(ttl: int) -> float:
    """A worker beats six times per TTL, so a few late beats under load do not make it dead."""
    return max(0.5, ttl / 6)


class HeldMessages:
    """The delivery tags this process holds: Celery's reserved and active requests, plus those
    that left them within ``FINISHING_S`` (Celery marks a request ready before it acks it)."""

    def __init__(self, source: Callable[[], Iterable[str]] | None = None) -> None:
        self._source = source or celery_held_tags
        self._finishing: dict[str, float] = {}
        self._last: set[str] = set()

    def __call__(self) -> list[str]:
        now = time.monotonic()
        current = set(self._source())
        for tag in self._last - current:
            self._finishing[tag] = now
        self._finishing = {t: at for t, at in self._finishing.items() if now - at < FINISHING_S and t not in current}
        self._last = current
        return sorted(current | set(self._finishing))


def celery_held_tags() -> list[str]:
    """Delivery tags of the requests Celery's worker state holds in this process."""
    from celery.worker import state

    tags = []
    for request in list(state.reserved_requests) + list(state.active_requests):
        message = getattr(request, "message", None)
        tag = getattr(message, "delivery_tag", None)
        if tag is not None:
            tags.append(str(tag))
    return tags


class Heartbeat:
    """A daemon thread publishing this worker's liveness and claims until stopped."""

    def __init__(self, client: Any, hostname: str, ttl: int, held: Callable[[], list[str]] | None = None) -> None:
        self.client = client
        self.hostname = hostname
        self.ttl = ttl
        self.held = held or HeldMessages()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ef-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self.beat()  # alive before the first message can arrive
        self._thread.start()
        return self

    def beat(self) -> None:
        """Publish liveness and claims, and refresh the claimed messages' delivery time."""
        tags = self.held()
        now = time.time()
        pipe = self.client.pipeline()
        pipe.set(ALIVE_KEY.format(self.hostname), json.dumps({"at": now, "held": tags}), ex=self.ttl)
        if tags:
            pipe.zadd(UNACKED_INDEX_KEY, {tag: now for tag in tags}, xx=True)
        pipe.execute()

    def _loop(self) -> None:
        while not self._stop.wait(beat_interval(self.ttl)):
            try:
                self.beat()
            except Exception as exc:  # Redis is away: the next beat tries again (the TTL decides)
                log.warning("heartbeat failed: %s", exc)

    def stop(self) -> None:
        """Stop beating and withdraw the key: called after the consumer stopped and gave its
        messages back, so nothing this worker held is left to claim."""
        self._stop.set()
        self._thread.join(5)
        try:
            self.client.delete(ALIVE_KEY.format(self.hostname))
        except Exception as exc:  # the key expires on its own
            log.debug("could not withdraw the heartbeat: %s", exc)


def live_beats(client: Any) -> list[Beat]:
    """The heartbeats present now (an expired key is a dead worker)."""
    keys = list(client.scan_iter(match=ALIVE_PATTERN, count=500))
    beats = []
    for key, raw in zip(keys, client.mget(keys) if keys else []):
        if raw is None:
            continue
        try:
            value = json.loads(raw)
            beats.append(Beat(key.decode().split(":", 2)[2], float(value["at"]), frozenset(map(str, value["held"]))))
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable heartbeat %r", key)
    return beats


def orphans(client: Any, now: float | None = None, margin: float = CLAIM_MARGIN_S) -> list[str]:
    """Delivery tags of unacknowledged messages that no live worker holds.

    Only messages delivered before every live worker's latest beat, less ``margin``, count: a
    message just taken is not in its worker's beat yet.
    """
    beats = live_beats(client)
    claimed = frozenset().union(*(b.held for b in beats)) if beats else frozenset()
    horizon = min([b.at for b in beats] + [now if now is not None else time.time()]) - margin
    delivered = client.zrangebyscore(UNACKED_INDEX_KEY, "-inf", horizon)
    return [tag for tag in (t.decode() for t in delivered) if tag not in claimed]
