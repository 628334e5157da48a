"""The worker's consumer: a shard lane whose prefetch counts shard slots only, and an inline lane
beside it on its own channel, with its own pool threads, consumed without acks."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from worker.hosting.host import InProcessWorker, WorkerSpec


def test_inline_lane_apart_from_the_shard_lane(tiny_embed_model: Path) -> None:
    spec = WorkerSpec(models=[str(tiny_embed_model)], device="cpu", backend="torch", dtype="float32",
                      concurrency=2, inline_slots=3, lookahead=1)
    with InProcessWorker(spec) as worker:
        consumer = worker._controller.consumer
        assert consumer.max_prefetch_count == 3  # the shard slots (2 + 1 read ahead), not the whole pool
        assert worker._controller.pool.num_processes == 6  # shard slots + inline slots
        (shard_queue,), (inline_queue,) = worker.queues, worker.inline_queues
        assert inline_queue == shard_queue + ".inline"
        assert [(q.name, q.no_ack) for q in consumer.inline_consumer.queues] == [(inline_queue, True)]
        assert consumer.task_consumer.consuming_from(shard_queue)
        assert not consumer.task_consumer.consuming_from(inline_queue)
        assert consumer.inline_consumer.channel is not consumer.task_consumer.channel
        # remote control's cancel_consumer reaches the lane that reads the queue, and only it
        consumer.cancel_task_queue(inline_queue)
        assert not consumer.inline_consumer.consuming_from(inline_queue)
        assert consumer.task_consumer.consuming_from(shard_queue)


def test_a_wake_up_ends_the_event_loops_poll() -> None:
    """A pool thread's wake-up makes the loop's poll return (kombu < 5.7 never woke it: a freed
    prefetch slot then waited for the poll's timeout)."""
    from kombu.asynchronous import Hub

    from worker.hosting.lanes import _Waker

    hub = Hub()
    waker = _Waker(hub)
    try:
        assert not hub.poller.poll(0)  # nothing to read yet
        thread = threading.Thread(target=waker.wake)
        thread.start()
        thread.join()
        events = hub.poller.poll(10)
        assert [fd for fd, _ in events] == [waker._read]
        waker._drain()
        assert not hub.poller.poll(0)  # drained: the next poll waits again
    finally:
        waker.close()
        hub.close()


def test_without_an_event_loop_an_acknowledgement_is_not_deferred(tiny_embed_model: Path) -> None:
    """The in-memory transport's blocking loop runs deferred operations only between drains of up
    to 2 s; acknowledgements run at once, other operations stay deferred (Celery's rule)."""
    spec = WorkerSpec(models=[str(tiny_embed_model)], device="cpu", backend="torch", dtype="float32",
                      concurrency=1)
    with InProcessWorker(spec) as worker:
        consumer = worker._controller.consumer
        assert consumer.hub is None  # the in-memory transport has no event loop
        done: list[str] = []

        class Message:
            def ack_log_error(self, logger: Any, errors: Any) -> None:
                done.append("ack")

            def other(self) -> None:
                done.append("other")

        message = Message()
        consumer.call_soon(message.ack_log_error, None, ())
        assert done == ["ack"]
        consumer.call_soon(message.other)
        assert done == ["ack"]  # deferred to the loop, as Celery does
