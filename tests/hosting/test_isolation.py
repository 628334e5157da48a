"""Parking on evidence: a loss shared with other shards is forgiven and isolates; a lone loss counts.
The solo lock runs an isolated shard with no other beside it, and gives way to a stop."""

from __future__ import annotations

import threading
import time

import pytest

from tests.conftest import RedisServer
from worker.hosting import isolation
from worker.hosting.isolation import ISOLATE_KEY, RAN_ON_KEY, RUNNING_KEY, Isolation, SoloLock, after_loss
from worker.hosting.stop import StopFlag


def _died_running(client, process: str, task_ids: list[str]) -> None:  # type: ignore[no-untyped-def]
    """What a process leaves in Redis when it dies with these deliveries running."""
    for task_id in task_ids:
        client.sadd(RUNNING_KEY.format(process), task_id)
        client.set(RAN_ON_KEY.format(task_id), process)


def test_a_shared_loss_is_forgiven_once_and_isolates(redis_server: RedisServer) -> None:
    client = redis_server.client()
    _died_running(client, "host-1-a", ["poison", "innocent"])
    assert after_loss(client, "innocent") == 2
    assert after_loss(client, "innocent") == 0  # judged once: a second sweeper sees nothing to judge
    assert after_loss(client, "poison") == 2  # the first reading stands for every message of that process
    marks = Isolation(client)
    assert marks.forgiven("innocent") == marks.forgiven("poison") == 1
    assert marks.isolated("innocent") and marks.isolated("poison")
    marks.done("innocent")
    assert not marks.isolated("innocent") and marks.forgiven("innocent") == 0


def test_a_lone_loss_counts(redis_server: RedisServer) -> None:
    client = redis_server.client()
    _died_running(client, "host-2-b", ["alone"])
    assert after_loss(client, "alone") == 1
    marks = Isolation(client)
    assert marks.forgiven("alone") == 0 and not marks.isolated("alone")
    assert after_loss(client, "never-began") == 0  # reserved but not begun: nothing to judge


def test_began_and_ended_keep_the_running_set(redis_server: RedisServer) -> None:
    client = redis_server.client()
    marks = Isolation(client)
    marks.began("a")
    marks.began("b")
    marks.ended("a")
    me = isolation.process_id()
    assert client.smembers(RUNNING_KEY.format(me)) == {b"b"}
    assert client.get(RAN_ON_KEY.format("b")) == me.encode() and not client.exists(RAN_ON_KEY.format("a"))
    assert not client.exists(ISOLATE_KEY.format("b"))


def test_an_isolated_shard_runs_with_no_other_beside_it() -> None:
    lock = SoloLock()
    running: list[str] = []
    seen: list[tuple[str, ...]] = []
    guard = threading.Lock()
    release = threading.Event()

    def shard(name: str, alone: bool, wait: bool) -> None:
        with lock.hold(alone, StopFlag().is_set):
            with guard:
                running.append(name)
                seen.append(tuple(sorted(running)))
            if wait:
                release.wait(10)
            with guard:
                running.remove(name)

    first = threading.Thread(target=shard, args=("ordinary-1", False, True))
    first.start()
    while not running:
        time.sleep(0.001)
    solo = threading.Thread(target=shard, args=("solo", True, False))
    solo.start()
    while lock._solo_waiting == 0:
        time.sleep(0.001)
    later = threading.Thread(target=shard, args=("ordinary-2", False, False))  # must not overtake the solo one
    later.start()
    release.set()
    for thread in (first, solo, later):
        thread.join(10)
    assert seen == [("ordinary-1",), ("solo",), ("ordinary-2",)]


def test_a_stop_ends_the_wait_for_a_solo_turn() -> None:
    lock = SoloLock()
    holding = threading.Event()
    release = threading.Event()

    def ordinary() -> None:
        with lock.hold(False, StopFlag().is_set):
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=ordinary)
    thread.start()
    holding.wait(10)
    stopping = StopFlag()  # the waiting shard's worker's
    stopping.begin()
    try:
        with pytest.raises(isolation.StoppingWhileWaiting):
            with lock.hold(True, stopping.is_set):
                pass
    finally:
        release.set()
        thread.join(10)
