"""Re-send shard messages that Redis lost, so a SIGKILL can never lose a shard.

kombu's Redis transport pops a message with BRPOP and only then records it in its ``unacked``
hash; a worker killed between the two loses that message (no visibility timeout can bring it
back). Producers therefore record every shard message of a job in Redis
(``producer.broker.record_job``), and every worker runs this sweeper: when a job's queue is
empty, a shard with no marker in storage that is neither queued nor unacked anywhere is sent
again under the same task id (so its delivery count goes on). A duplicate is harmless: outputs
are deterministic and the done-marker is checked before work.
"""

from __future__ import annotations

import json
import logging
import threading

from celery import Celery

from producer.broker import JOB_SHARDS_KEY, JOBS_KEY, SHARD_TASK
from producer.settings import settings
from producer.jobs import MANIFEST, PARTS_DIR, marker_name
from producer.storage import exists, list_names, locate

log = logging.getLogger(__name__)

UNACKED_KEY = "unacked"


class Sweeper:
    """A daemon thread that re-sends lost shard messages of unfinished jobs on its queues."""

    def __init__(self, app: Celery, broker: str, queues: list[str]) -> None:
        import redis

        self.app = app
        self.queues = set(queues)
        self.redis = redis.Redis.from_url(broker, socket_connect_timeout=5, socket_timeout=10)
        self.interval = settings().sweep_interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ef-sweeper", daemon=True)

    def start(self) -> "Sweeper":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sweep()
            except Exception as exc:  # a sweep is best effort; the next one tries again
                log.warning("sweep failed: %s", exc)

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
        missing = {i: s for i, s in shards.items() if marker_name(i) not in done}
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
        ids = set()
        for raw in self.redis.hvals(UNACKED_KEY):
            try:
                message = json.loads(raw)[0]
                ids.add(str(message["headers"]["id"]))
            except (ValueError, KeyError, IndexError, TypeError):
                continue
        return ids
