"""Give back the messages of dead workers, and re-send shard messages that Redis lost.

Dead workers first: a message a worker held when it died stays in kombu's ``unacked`` hash
until the visibility timeout (an hour). Every ``EMBEDFLEET_LIVENESS_TTL`` / 3 seconds the sweeper
asks ``worker.hosting.liveness`` which unacknowledged messages no live worker claims, and gives
them back to their queue with kombu's own restore (a transaction on the hash, so an ack racing
it, or another worker's sweeper, wins cleanly). A long shard on a live worker is claimed by its
heartbeat and never given back. Before a shard goes back, ``worker.hosting.isolation`` judges the
loss: shared with other shards, it is not counted and the shard runs alone next.

kombu's Redis transport pops a message with BRPOP and only then records it in its ``unacked``
hash; a worker killed between the two loses that message (no visibility timeout can bring it
back). Producers therefore record every shard message of a job in Redis
(``producer.broker.record_job``), and every worker runs this sweeper: when a job's queue is
empty, a shard with no marker in storage that is neither queued nor unacked anywhere is sent
again under the same task id (so its delivery count goes on). A duplicate is harmless: outputs
are deterministic and the done-marker is checked before work. A shard recorded as unwritable
(parked, its failure marker impossible to write; or its job's own message refused, which may not
write there: ``worker.hosting.tasks.refuse``) has no marker either, but is not lost: it is left alone.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from celery import Celery

from producer.broker import JOB_SHARDS_KEY, JOB_UNWRITTEN_KEY, JOBS_KEY, SHARD_TASK
from producer.settings import settings
from producer.jobs import MANIFEST, PARTS_DIR, marker_name
from producer.storage import exists, list_names, locate
from worker.hosting.isolation import after_loss
from worker.hosting.liveness import CLAIM_MARGIN_S, UNACKED_KEY, orphans

log = logging.getLogger(__name__)


class Sweeper:
    """A daemon thread that re-sends lost shard messages of unfinished jobs on its queues."""

    def __init__(self, app: Celery, broker: str, queues: list[str]) -> None:
        import redis

        self.app = app
        self.queues = set(queues)
        self.redis = redis.Redis.from_url(broker, socket_connect_timeout=5, socket_timeout=10)
        self.interval = settings().sweep_interval
        self.restore_interval = max(1.0, settings().liveness_ttl / 3)
        self.claim_margin = CLAIM_MARGIN_S
        self._connection: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ef-sweeper", daemon=True)

    def start(self) -> "Sweeper":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        if self._connection is not None:
            self._connection.release()

    def _loop(self) -> None:
        next_sweep = time.monotonic() + self.interval
        while not self._stop.wait(self.restore_interval):
            try:
                self.restore_dead()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self.interval
                    self.sweep()
            except Exception as exc:  # a sweep is best effort; the next one tries again
                log.warning("sweep failed: %s", exc)

    def restore_dead(self) -> int:
        """Give the messages no live worker holds back to their queues; returns how many."""
        tags = orphans(self.redis, margin=self.claim_margin)
        if not tags:
            return 0
        if self._connection is None:
            self._connection = self.app.connection_for_write()
        qos = self._connection.default_channel.qos
        restored = 0
        for tag in tags:
            raw = self.redis.hget(UNACKED_KEY, tag)
            if raw is None:
                continue  # acknowledged meanwhile
            company = _judge(self.redis, raw)  # before the restore: the next delivery must see the mark
            qos.restore_by_tag(tag)
            restored += 1
            shared = f" (it was running with {company - 1} other shard(s): not counted, runs alone next)" \
                if company > 1 else ""
            log.warning("the worker holding %s is gone: delivering it again%s", _describe(raw), shared)
        return restored

    def sweep(self) -> int:
        """One pass over the recorded jobs; returns how many messages were sent again."""
        resent = 0
        for raw_job in self.redis.smembers(JOBS_KEY):
            resent += self._sweep_job(raw_job.decode())
        return resent

    def _sweep_job(self, job_id: str) -> int:
        shards = {int(k): json.loads(v) for k, v in self.redis.hgetall(JOB_SHARDS_KEY.format(job_id)).items()}
        if not shards:
            self.redis.srem(JOBS_KEY, job_id)
            return 0
        first = next(iter(shards.values()))
        queue, out = first["queue"], first["payload"]["out"]
        if queue not in self.queues or self.redis.llen(queue) > 0:
            return 0  # not ours, or work is still queued: nothing can be told yet
        root = locate(out)
        if exists(root.child(MANIFEST)):
            self.redis.delete(JOB_SHARDS_KEY.format(job_id))
            self.redis.srem(JOBS_KEY, job_id)
            return 0
        done = set(list_names(root.child(PARTS_DIR)))
        # a shard parked where not even its failure marker could be written is over, not lost
        # (``producer.broker.record_unwritten``): sent again, it would be parked again every sweep
        unwritable = {int(i) for i in self.redis.hkeys(JOB_UNWRITTEN_KEY.format(job_id))}
        missing = {i: s for i, s in shards.items() if marker_name(i) not in done and i not in unwritable}
        if not missing:
            return 0
        in_flight = self._unacked_task_ids()
        resent = 0
        for index, shard in sorted(missing.items()):
            if shard["task_id"] in in_flight:
                continue
            log.warning("shard %d of job %s is neither queued nor in flight: sending it again", index, job_id)
            self.app.send_task(SHARD_TASK, args=[shard["payload"]], queue=queue, task_id=shard["task_id"],
                               ignore_result=True)
            resent += 1
        return resent

    def _unacked_task_ids(self) -> set[str]:
        """Task ids of the messages in kombu's unacked hash."""
        ids = set()
        for raw in self.redis.hvals(UNACKED_KEY):
            try:
                message = json.loads(raw)[0]
                ids.add(str(message["headers"]["id"]))
            except (ValueError, KeyError, IndexError, TypeError):
                continue
        return ids


def _judge(client: Any, raw: bytes) -> int:
    """How many shards the dead worker was running with this one (``worker.hosting.isolation``)."""
    try:
        headers = json.loads(raw)[0]["headers"]
    except (ValueError, KeyError, IndexError, TypeError):
        return 0
    if headers.get("task") != SHARD_TASK or not headers.get("id"):
        return 0
    return after_loss(client, str(headers["id"]))


def _describe(raw: bytes) -> str:
    """A restored message in a log line: its task name and id."""
    try:
        headers = json.loads(raw)[0]["headers"]
        return f"{headers.get('task')} {headers.get('id')}"
    except (ValueError, KeyError, IndexError, TypeError):
        return "an unreadable message"
