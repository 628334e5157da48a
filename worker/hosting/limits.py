"""Shard time limits derived from the shard's size: soft, then hard.

Why: a source that blocks (a hung network filesystem or S3 read) held its shard slot forever; the
worker's heartbeat kept claiming the message, so no other worker got it, and the job never ended.
Celery's ``soft_time_limit`` / ``time_limit`` need its prefork pool; embedfleet runs shards on
threads (they feed one engine per process), so this module keeps its own watchdog thread:

* soft limit = ``EMBEDFLEET_SHARD_TIME_BASE`` + ``EMBEDFLEET_SHARD_TIME_PER_ROW`` x the shard's
  rows: ``producer.errors.ShardTimeLimit`` is raised in the shard's thread (Python's asynchronous
  exception, delivered when that thread next runs Python code: a slow loop, a wait that wakes).
  The task counts it as a failed delivery: given back, or parked on the last one.
* hard limit = soft + ``EMBEDFLEET_SHARD_TIME_GRACE``: a thread still inside (blocked in a C call
  no exception reaches) cannot be freed, so the failure is recorded against the shard and the
  worker stops itself as on SIGTERM: the other shards go back uncounted, the stuck one's delivery
  counts, and the process exits non-zero for its supervisor or orchestrator to start a fresh one.
  Without signal handling (``embedfleet run``'s worker thread) the hard limit is only logged.

One watchdog thread serves the process, but what a hard limit does belongs to the shard's own
worker (``HardLimit``, kept on its Celery app): with a fleet worker and an ``embedfleet run``
in one process, a stuck shard of the run was noted on the fleet worker's broker and stopped it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from producer.errors import ShardTimeLimit
from producer.settings import settings
from worker.hosting.per_app import attached

log = logging.getLogger(__name__)

#: The exit code of a worker that stopped itself at a shard's hard limit.
EXIT_TIME_LIMIT = 3
POLL_S = 0.25


def limits_for(rows: int) -> tuple[float, float]:
    """(soft, hard) seconds for a shard of ``rows`` rows, from the settings."""
    config = settings()
    soft = config.shard_time_base + config.shard_time_per_row * rows
    return soft, soft + config.shard_time_grace


@dataclass
class HardLimit:
    """What one worker does when a shard of its own is past its hard limit: ``action`` (``None``:
    log only; ``stop_at_hard_limit`` for the worker that handles signals), and the last reason."""

    action: Callable[[str, str], None] | None = None
    tripped: str | None = None

    def __call__(self, task_id: str, reason: str) -> None:
        self.tripped = reason
        if self.action is not None:
            self.action(task_id, reason)


def hard_limit_of(app: Any) -> HardLimit:
    """The hard-limit action of the worker running ``app`` (``worker.hosting.per_app``)."""
    return attached(app, "embedfleet_hard_limit", HardLimit)


@dataclass
class _Watch:
    task_id: str
    what: str
    thread_id: int
    soft: float
    hard: float
    on_hard: HardLimit
    started: float = field(default_factory=time.monotonic)
    soft_sent: bool = False
    hard_done: bool = False


def _raise_in(thread_id: int, exc_type: type[BaseException] | None) -> None:
    """Make ``thread_id`` raise ``exc_type`` at its next Python instruction (``None``: cancel that)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(exc_type) if exc_type else None)


class Watchdog:
    """Watches the shards running in this process against their limits (one daemon thread)."""

    def __init__(self) -> None:
        self._watches: dict[int, _Watch] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(self, task_id: str, what: str, rows: int, on_hard: HardLimit) -> Iterator[None]:
        """Run the body under the limits of a shard of ``rows`` rows (``what`` names it in logs);
        past the hard one, ``on_hard`` (its worker's) acts."""
        soft, hard = limits_for(rows)
        entry = _Watch(task_id, what, threading.get_ident(), soft, hard, on_hard)
        with self._lock:
            self._watches[entry.thread_id] = entry
            self._ensure_thread()
        try:
            yield
        except ShardTimeLimit:
            raise ShardTimeLimit(self._soft_reason(entry)) from None
        finally:
            with self._lock:
                self._watches.pop(entry.thread_id, None)
            if entry.soft_sent:
                _raise_in(entry.thread_id, None)  # not delivered yet: it must not land outside the shard

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="ef-shard-limits", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            time.sleep(POLL_S)
            try:
                self.check()
            except Exception as exc:  # the watchdog must outlive any one check
                log.warning("shard time-limit check failed: %s", exc)

    def check(self, now: float | None = None) -> None:
        """Act on every shard past a limit (the loop calls it; tests may too)."""
        now = time.monotonic() if now is None else now
        hard: list[_Watch] = []
        with self._lock:
            for entry in self._watches.values():
                ran = now - entry.started
                if ran >= entry.hard and not entry.hard_done:
                    entry.hard_done = True
                    hard.append(entry)
                elif ran >= entry.soft and not entry.soft_sent:
                    entry.soft_sent = True
                    log.warning("%s", self._soft_reason(entry))
                    _raise_in(entry.thread_id, ShardTimeLimit)
        for entry in hard:
            self._hard(entry)

    def _soft_reason(self, entry: _Watch) -> str:
        return f"{entry.what} ran past its soft time limit of {entry.soft:.0f} s"

    def _hard(self, entry: _Watch) -> None:
        reason = (f"{entry.what} ran past its hard time limit of {entry.hard:.0f} s and did not come back "
                  f"(a blocking source?)")
        log.error("%s", reason)
        entry.on_hard(entry.task_id, reason)


watchdog = Watchdog()


def stop_at_hard_limit(note_failure: Callable[[str, str], None]) -> Callable[[str, str], None]:
    """The hard-limit action of a worker that handles signals: record why against the shard, then
    SIGTERM this process (the worker's own stop: the rest goes back, the process exits)."""

    def act(task_id: str, reason: str) -> None:
        try:
            note_failure(task_id, reason)
        except Exception as exc:  # the broker is away: the delivery still counts, without the reason
            log.warning("could not record the time limit of %s: %s", task_id, exc)
        log.error("stopping this worker: a shard thread is stuck past its hard time limit")
        os.kill(os.getpid(), signal.SIGTERM)

    return act
