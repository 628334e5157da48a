"""Parking on evidence: after a worker loss, the shards it held run one at a time before a loss
counts against any of them.

Why: a worker runs several shards at once (``--concurrency``). When one of them kills the
process (a row that crashes a native library, a memory blow-up), every shard it was running dies
with it, and each was charged a delivery (``worker.hosting.poison``): an innocent neighbour of a
poison shard reached the limit and was parked beside it. The loss is evidence only against a
shard that was running alone. So, on the broker's Redis:

* when a shard's delivery begins, this process records it in ``embedfleet:running:<process>``
  (and ``embedfleet:ran-on:<task id>`` names the process); it leaves the set when the delivery
  ends, however it ends, unless the process dies;
* when the sweeper gives a dead worker's message back (``worker.hosting.sweeper``), it first
  asks ``after_loss``: the first look at a dead process fixes how many shards it was running
  (``embedfleet:company:<process>``); if more than one, the loss is forgiven
  (``embedfleet:forgiven:<task id>``, subtracted from the delivery count) and the shard is marked
  to run alone (``embedfleet:isolate:<task id>``);
* a worker runs a marked shard only when no other shard runs in its process, and starts no other
  shard while it runs (``SoloLock``). A death then is evidence against that shard alone, and
  counts; the innocent ones complete.

Without the sweeper's verdict (SQS, the in-memory transport, kombu's own visibility-timeout
restore) every loss counts, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from typing import Any, Callable, Iterator

from worker.hosting import poison

log = logging.getLogger(__name__)

RUNNING_KEY = "embedfleet:running:{}"
RAN_ON_KEY = "embedfleet:ran-on:{}"
COMPANY_KEY = "embedfleet:company:{}"
FORGIVEN_KEY = "embedfleet:forgiven:{}"
ISOLATE_KEY = "embedfleet:isolate:{}"
#: Like the delivery counters (``worker.hosting.poison.COUNTER_TTL_S``): outlives any job, then goes.
KEY_TTL_S = 7 * 86400
#: How often a shard waiting for its turn to run alone looks whether the worker is stopping.
WAIT_POLL_S = 0.5

_process: dict[int, str] = {}


def process_id() -> str:
    """This process's name in the running sets: host, pid and a random part (a pid is reused)."""
    pid = os.getpid()
    if pid not in _process:  # per pid: a forked child is another process
        _process[pid] = f"{socket.gethostname()}-{pid}-{uuid.uuid4().hex[:8]}"
    return _process[pid]


class SoloLock:
    """Shards share the process; an isolated shard waits until it is alone and keeps it so.

    A readers-writer lock with the writer first: once an isolated shard waits, no new shard
    starts, so it is not starved by a steady stream of ordinary ones.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._solo = False
        self._solo_waiting = 0

    @contextlib.contextmanager
    def hold(self, alone: bool, stopping: Callable[[], bool]) -> Iterator[None]:
        """Run the body beside other shards, or (``alone``) with none; raises ``StoppingWhileWaiting``
        when the shard's worker begins to stop (``stopping()``: its flag) while the shard waits for its turn."""
        with self._cond:
            if alone:
                self._solo_waiting += 1
                try:
                    self._wait(lambda: not self._solo and self._shared == 0, stopping)
                finally:
                    self._solo_waiting -= 1
                self._solo = True
            else:
                self._wait(lambda: not self._solo and self._solo_waiting == 0, stopping)
                self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                if alone:
                    self._solo = False
                else:
                    self._shared -= 1
                self._cond.notify_all()

    def _wait(self, ready: Any, stopping: Callable[[], bool]) -> None:
        while not ready():
            if stopping():
                raise StoppingWhileWaiting("the worker is stopping")
            self._cond.wait(WAIT_POLL_S)


class StoppingWhileWaiting(Exception):
    """The worker began to stop while a shard waited for its turn: give the message back."""


_lock = SoloLock()


class Isolation:
    """The running set and the marks of one process on the broker's Redis."""

    def __init__(self, client: Any) -> None:
        self.client = client

    @contextlib.contextmanager
    def slot(self, alone: bool, stopping: Callable[[], bool]) -> Iterator[None]:
        """The body runs beside other shards, or alone when a loss with company marked the shard
        (``stopping``: the worker's flag, which ends the wait for that turn)."""
        with _lock.hold(alone, stopping):
            yield

    def isolated(self, task_id: str) -> bool:
        return bool(self.client.exists(ISOLATE_KEY.format(task_id)))

    def began(self, task_id: str) -> None:
        """This delivery is running here (a death now makes it a loss of this process)."""
        me = process_id()
        pipe = self.client.pipeline()
        pipe.sadd(RUNNING_KEY.format(me), task_id)
        pipe.expire(RUNNING_KEY.format(me), KEY_TTL_S)
        pipe.set(RAN_ON_KEY.format(task_id), me, ex=KEY_TTL_S)
        pipe.execute()

    def ended(self, task_id: str) -> None:
        """The delivery ended in this process (done, parked, given back or failed). Best effort: a
        stale entry only makes a later loss of this process look shared, which forgives, then isolates."""
        pipe = self.client.pipeline()
        pipe.srem(RUNNING_KEY.format(process_id()), task_id)
        pipe.delete(RAN_ON_KEY.format(task_id))
        try:
            pipe.execute()
        except Exception as exc:
            log.warning("could not record the end of %s: %s", task_id, exc)

    def forgiven(self, task_id: str) -> int:
        """Deliveries lost together with other shards: not evidence against this one."""
        return int(self.client.get(FORGIVEN_KEY.format(task_id)) or 0)

    def done(self, task_id: str) -> None:
        """The shard finished (or was parked): its marks are no longer needed (they expire anyway)."""
        try:
            self.client.delete(ISOLATE_KEY.format(task_id), FORGIVEN_KEY.format(task_id))
        except Exception as exc:
            log.warning("could not clear the marks of %s: %s", task_id, exc)


class NoIsolation:
    """Brokers without the sweeper's verdict: every loss counts, nothing is marked."""

    @contextlib.contextmanager
    def slot(self, alone: bool, stopping: Callable[[], bool]) -> Iterator[None]:
        yield

    def isolated(self, task_id: str) -> bool:
        return False

    def began(self, task_id: str) -> None: ...

    def ended(self, task_id: str) -> None: ...

    def forgiven(self, task_id: str) -> int:
        return 0

    def done(self, task_id: str) -> None: ...


def after_loss(client: Any, task_id: str) -> int:
    """Called for a dead worker's message before it is given back: how many shards its process
    was running when it died (0: its delivery never began there). With more than one, the loss
    is forgiven and the shard marked to run alone. Idempotent across sweepers: the first reading
    of a dead process's running set is kept, and a delivery is judged once."""
    process = client.getdel(RAN_ON_KEY.format(task_id))
    if process is None:
        return 0
    process = process.decode()
    company_key = COMPANY_KEY.format(process)
    client.set(company_key, client.scard(RUNNING_KEY.format(process)), nx=True, ex=KEY_TTL_S)
    company = int(client.get(company_key) or 0)
    if company > 1:
        pipe = client.pipeline()
        pipe.incr(FORGIVEN_KEY.format(task_id))
        pipe.expire(FORGIVEN_KEY.format(task_id), KEY_TTL_S)
        pipe.set(ISOLATE_KEY.format(task_id), process, ex=KEY_TTL_S)
        pipe.execute()
    return company


_instances: dict[str, Isolation | NoIsolation] = {}
_instances_lock = threading.Lock()


def for_broker(broker_url: str) -> Isolation | NoIsolation:
    """The isolation of the broker at ``broker_url`` (a task's own worker's: its Celery app's
    ``broker_url``): on Redis, the running sets and marks beside its delivery counters
    (``worker.hosting.poison.deliveries_for``); elsewhere none."""
    with _instances_lock:
        found = _instances.get(broker_url)
        if found is None:
            counter = poison.deliveries_for(broker_url)
            found = Isolation(counter.client) if isinstance(counter, poison.RedisDeliveries) else NoIsolation()
            _instances[broker_url] = found
        return found


def forget(broker_url: str) -> None:
    """Drop what ``for_broker`` keeps for a broker that is gone (see ``worker.hosting.poison.forget``)."""
    with _instances_lock:
        _instances.pop(broker_url, None)
