"""Liveness on a real Redis with kombu's own unacked bookkeeping: a dead worker's messages go
back to their queue, a live worker's never do (not even past the visibility timeout)."""

from __future__ import annotations

import time

from kombu import Connection

from producer.broker import SHARD_TASK, make_app
from tests.conftest import RedisServer
from worker.hosting.liveness import ALIVE_KEY, UNACKED_INDEX_KEY, UNACKED_KEY, Heartbeat, HeldMessages, orphans
from worker.hosting.sweeper import Sweeper

QUEUE = "embed.tiny"


def _take(redis_server: RedisServer, n: int, **options: object) -> tuple[Connection, list[str]]:
    """Send ``n`` shard messages and take them unacknowledged, as a worker's consumer does."""
    app = make_app(redis_server.url)
    for i in range(n):
        app.send_task(SHARD_TASK, args=[{"i": i}], queue=QUEUE, task_id=f"task-{i}")
    connection = Connection(redis_server.url, transport_options=options)
    channel = connection.default_channel
    tags = [channel.basic_get(QUEUE, no_ack=False).delivery_tag for _ in range(n)]
    return connection, tags


def test_a_dead_workers_message_goes_back_and_a_live_ones_stays(redis_server: RedisServer) -> None:
    connection, (live_tag, dead_tag) = _take(redis_server, 2)
    client = redis_server.client()
    dead = Heartbeat(client, "dead@host", ttl=30, held=lambda: [dead_tag])
    dead.beat()
    client.delete(ALIVE_KEY.format("dead@host"))  # its TTL ran out: SIGKILL leaves no other trace
    time.sleep(0.3)
    live = Heartbeat(client, "live@host", ttl=30, held=lambda: [live_tag])
    live.beat()
    sweeper = Sweeper(make_app(redis_server.url), redis_server.url, [QUEUE])
    sweeper.claim_margin = 0.1
    assert orphans(client, margin=0.1) == [dead_tag]
    assert sweeper.restore_dead() == 1
    assert set(client.hkeys(UNACKED_KEY)) == {live_tag.encode()}
    again = connection.default_channel.basic_get(QUEUE, no_ack=False)  # the restored message, whole
    assert again.headers["id"] == "task-1" and again.headers["task"] == SHARD_TASK
    assert sweeper.restore_dead() == 0  # the message is held again (by this test), and claimed by nobody...
    assert orphans(client, margin=0.1) == []  # ...but it was just delivered: too early to tell
    connection.release()


def test_a_message_claimed_by_a_heartbeat_is_not_restored_past_the_visibility_timeout(
        redis_server: RedisServer) -> None:
    """kombu restores any unacked message older than the visibility timeout; the heartbeat keeps
    a held message's time fresh. Without it this message would be delivered twice."""
    connection, (tag,) = _take(redis_server, 1, visibility_timeout=1)
    client = redis_server.client()
    beat = Heartbeat(client, "live@host", ttl=2, held=lambda: [tag]).start()  # beats every 0.5 s
    try:
        time.sleep(2.5)
        connection.default_channel.qos.restore_visible(interval=1)
        assert client.llen(QUEUE) == 0 and client.hexists(UNACKED_KEY, tag)
        assert orphans(client, margin=0.1) == []
    finally:
        beat.stop()
    assert not client.exists(ALIVE_KEY.format("live@host"))  # a stop withdraws the key
    time.sleep(1.2)
    connection.default_channel.qos.restore_visible(interval=1)  # unclaimed: kombu's timeout applies
    assert client.llen(QUEUE) == 1 and not client.zscore(UNACKED_INDEX_KEY, tag)
    connection.release()


def test_a_finished_request_is_claimed_while_it_may_still_be_acknowledging() -> None:
    current = [["a", "b"]]
    held = HeldMessages(lambda: current[0])
    assert held() == ["a", "b"]
    current[0] = ["b"]  # "a" left Celery's registry: ready, maybe not acknowledged yet
    assert held() == ["a", "b"]
    current[0] = []
    assert held() == ["a", "b"]
