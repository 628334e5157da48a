"""Shard time limits: derived from the size; the soft one raises in the shard's thread, the hard
one acts on a thread no exception reaches. The limits are crossed by moving the clock, not by waiting."""

from __future__ import annotations

import threading
import time

import pytest

from producer.errors import ShardTimeLimit
from worker.hosting.limits import HardLimit, Watchdog, hard_limit_of, limits_for


@pytest.fixture(autouse=True)
def small_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDFLEET_SHARD_TIME_BASE", "5")
    monkeypatch.setenv("EMBEDFLEET_SHARD_TIME_PER_ROW", "0.01")
    monkeypatch.setenv("EMBEDFLEET_SHARD_TIME_GRACE", "4")


def test_limits_grow_with_the_shard() -> None:
    assert limits_for(0) == (5.0, 9.0)
    assert limits_for(1000) == (15.0, 19.0)


def test_the_soft_limit_interrupts_a_shard_in_python_code() -> None:
    dog, hard = Watchdog(), HardLimit()
    caught: list[BaseException] = []
    inside = threading.Event()

    def shard() -> None:
        try:
            with dog.watch("t1", "shard 3 of job j (100 rows)", 100, hard):
                inside.set()
                while True:
                    time.sleep(0.01)
        except ShardTimeLimit as exc:
            caught.append(exc)

    thread = threading.Thread(target=shard)
    thread.start()
    inside.wait(10)
    dog.check(now=time.monotonic() + 5.0)  # soft (6 s) not reached yet
    assert thread.is_alive()
    dog.check(now=time.monotonic() + 7.0)
    thread.join(10)
    assert not thread.is_alive()
    assert [str(e) for e in caught] == ["shard 3 of job j (100 rows) ran past its soft time limit of 6 s"]
    assert hard.tripped is None


def test_the_hard_limit_acts_on_a_thread_no_exception_reaches() -> None:
    dog = Watchdog()
    acted: list[tuple[str, str]] = []
    hard = HardLimit(lambda task_id, reason: acted.append((task_id, reason)))
    inside, release = threading.Event(), threading.Event()

    def shard() -> None:
        try:
            with dog.watch("t2", "shard 0 of job j (0 rows)", 0, hard):
                inside.set()
                release.wait()  # a C-level wait: the soft limit's exception waits for it to end
        except ShardTimeLimit:
            pass

    thread = threading.Thread(target=shard)
    thread.start()
    inside.wait(10)
    dog.check(now=time.monotonic() + 6.0)  # soft: sent, not delivered
    assert thread.is_alive() and not acted
    dog.check(now=time.monotonic() + 10.0)
    dog.check(now=time.monotonic() + 11.0)  # acts once
    assert acted == [("t2", "shard 0 of job j (0 rows) ran past its hard time limit of 9 s and did not come back "
                            "(a blocking source?)")]
    assert hard.tripped == acted[0][1]
    release.set()
    thread.join(10)
    assert not thread.is_alive()


def test_a_hard_limit_acts_for_the_shards_own_worker_only() -> None:
    """Two workers in one process (a fleet worker that handles signals, an ``embedfleet run`` that
    does not): a stuck shard of the run is only logged, under the run's app. Before, the one
    process-wide action (the fleet worker's) noted it on the fleet's broker and stopped that worker."""
    from celery import Celery

    fleet, run = Celery("fleet", set_as_current=False), Celery("run", set_as_current=False)
    acted: list[str] = []
    hard_limit_of(fleet).action = lambda task_id, reason: acted.append(task_id)
    dog = Watchdog()
    inside, release = threading.Event(), threading.Event()

    def shard() -> None:
        try:
            with dog.watch("run-shard", "shard 0 of job r (0 rows)", 0, hard_limit_of(run)):
                inside.set()
                release.wait()
        except ShardTimeLimit:
            pass

    thread = threading.Thread(target=shard)
    thread.start()
    inside.wait(10)
    dog.check(now=time.monotonic() + 10.0)
    release.set()
    thread.join(10)
    assert acted == [] and hard_limit_of(fleet).tripped is None
    assert (hard_limit_of(run).tripped or "").startswith("shard 0 of job r (0 rows) ran past its hard time limit")
    assert hard_limit_of(run) is hard_limit_of(run)  # one per worker, kept on its app
