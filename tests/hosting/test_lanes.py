"""The worker's consumer: a shard lane whose prefetch counts shard slots only, and an inline lane
beside it on its own channel, with its own pool threads, consumed without acks."""

from __future__ import annotations

from pathlib import Path

from worker.hosting.host import InProcessWorker, WorkerSpec


def test_inline_lane_apart_from_the_shard_lane(tiny_embed_model: Path) -> None:
    spec = WorkerSpec(models=[str(tiny_embed_model)], device="cpu", backend="torch", dtype="float32",
                      concurrency=2, inline_slots=3)
    with InProcessWorker(spec) as worker:
        consumer = worker._controller.consumer
        assert consumer.max_prefetch_count == 2  # the shard slots, not the whole pool
        assert worker._controller.pool.num_processes == 5  # shard slots + inline slots
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
