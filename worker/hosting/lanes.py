"""The worker's Celery consumer with two lanes: bulk shards, and inline calls beside them.

Celery gives a worker one task consumer on one channel, and one pool. With shards and inline
calls in that one lane, an HTTP request waits whenever every slot runs a shard, for as long as
a shard takes: the channel stops reading (its prefetch window is full of unacknowledged
shards) and no pool thread is free. ``LaneConsumer`` keeps the two apart:

- shards are read on Celery's own task channel, whose prefetch window counts only the shard
  slots (``--concurrency``);
- inline queues are read on a second channel of the same connection (``InlineLane``), with
  ``no_ack`` and so outside any prefetch window;
- the thread pool holds the shard slots plus ``inline slots`` threads that shards never fill.

The consumer also hands a finished task's acknowledgement on without waiting: Celery queues it
for the consumer's loop (``call_soon``), and before Celery/kombu 5.7 nothing woke that loop, so
the freed prefetch slot was refilled only when its poll timed out (Redis, SQS: up to 1 s; the
in-memory transport of ``embedfleet run``: up to 2 s). On an H200 that idled the device after
every round of shards (bench/RESULTS.md, issue 13). ``LaneConsumer.call_soon`` wakes the event
loop through a pipe it watches, and without an event loop runs acknowledgements at once, as
Celery 5.7 does (``call_soon_ack``).

Inline items then also jump the engine's line (``Scheduler``'s urgent lane), so a call waits
neither for a pool thread nor behind a shard's pending texts. On a Redis fleet the inline lane
skips the pool altogether (``worker.hosting.inline``): its messages go straight to the engine.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import bootsteps
from celery.worker.consumer import Consumer
from vine import ppartial

from worker.hosting.inline import fast_lane_for

log = logging.getLogger(__name__)

#: ``app.conf`` keys the worker sets before starting its consumer.
SHARD_SLOTS = "embedfleet_shard_slots"
INLINE_QUEUES = "embedfleet_inline_queues"


class InlineLane(bootsteps.StartStopStep):
    """Consume the inline queues on their own channel, feeding Celery's usual task handler."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        c.inline_consumer = None
        super().__init__(c, **kwargs)

    def start(self, c: Any) -> None:
        names = list(c.app.conf.get(INLINE_QUEUES) or [])
        if not names:
            return
        queues = [c.app.amqp.queues[name] for name in names]  # declared no_ack by the worker
        handler = fast_lane_for(c.app, c.create_task_handler())
        c.inline_consumer = c.app.amqp.TaskConsumer(c.connection.channel(), queues=queues, on_message=handler)
        c.inline_consumer.consume()

    def stop(self, c: Any) -> None:
        """Stop reading and drop the channel (a reconnect starts a new one on the new connection)."""
        inline, c.inline_consumer = c.inline_consumer, None
        if inline is None:
            return
        close = getattr(inline.on_message, "close", None)  # the fast lane's answer writer: store what waits
        for step in (inline.cancel, inline.channel.close, *([close] if close else [])):
            try:
                step()
            except Exception as exc:  # the connection is already gone: nothing to release
                log.debug("closing the inline lane: %s", exc)

    def shutdown(self, c: Any) -> None:
        self.stop(c)


class LaneConsumer(Consumer):
    """Celery's consumer, plus the inline lane; its prefetch window is the shard slots only."""

    class Blueprint(Consumer.Blueprint):
        default_steps = [*Consumer.Blueprint.default_steps, "worker.hosting.lanes:InlineLane"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.initial_prefetch_count:  # 0 would mean "no limit"; keep Celery's choice then
            self.initial_prefetch_count = self.max_prefetch_count

    def call_soon(self, p: Any, *args: Any, **kwargs: Any) -> Any:
        """Celery's ``call_soon`` (how a pool thread hands an acknowledgement to the consumer),
        plus a prompt hand-over: the event loop is woken (``_Waker``); without one (the in-memory
        transport's blocking loop) an acknowledgement or rejection runs now, on the calling
        thread, instead of when the loop's 2 s drain ends."""
        if self.hub is None and getattr(p, "__name__", None) in _ACKS:
            try:
                ppartial(p, *args, **kwargs)()
            except Exception:  # as Celery's pending operations do: logged, the loop goes on
                log.exception("acknowledging a message failed")
            return p
        handle = super().call_soon(p, *args, **kwargs)
        waker = getattr(self, "_waker", None)
        if waker is not None:
            waker.wake()
        return handle

    def register_with_event_loop(self, hub: Any) -> None:
        super().register_with_event_loop(hub)
        waker = getattr(self, "_waker", None)
        if waker is None or waker.hub is not hub:
            if waker is not None:
                waker.close()
            self._waker = _Waker(hub)

    def shutdown(self) -> None:
        try:
            super().shutdown()
        finally:
            waker, self._waker = getattr(self, "_waker", None), None
            if waker is not None:
                waker.close()

    @property
    def max_prefetch_count(self) -> int:
        """Celery sizes the window by the pool; here the pool is larger than the shard slots."""
        slots = int(self.app.conf.get(SHARD_SLOTS) or self.pool.num_processes)
        return max(1, slots) * self.prefetch_multiplier

    def cancel_task_queue(self, queue: str) -> None:
        """Remote control's ``cancel_consumer``: an inline queue is cancelled on its own lane."""
        inline = getattr(self, "inline_consumer", None)
        if inline is not None and inline.consuming_from(queue):
            log.info("no longer consuming from %s", queue)
            inline.cancel_by_queue(queue)
            return
        super().cancel_task_queue(queue)


#: kombu ``Message`` methods Celery hands to ``call_soon`` when a task is done with its message.
_ACKS = frozenset({"ack_log_error", "reject_log_error"})


class _Waker:
    """A pipe the event loop watches: a byte written from any thread ends its ``poll`` at once."""

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self._lock = threading.Lock()
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        hub.add_reader(self._read, self._drain)

    def wake(self) -> None:
        with self._lock:
            if self._write < 0:
                return
            try:
                os.write(self._write, b"\0")
            except BlockingIOError:  # the pipe is full: a wake-up is already pending
                pass

    def _drain(self) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        with self._lock:
            read, write, self._read, self._write = self._read, self._write, -1, -1
        if read < 0:
            return
        try:
            self.hub.remove_reader(read)
        except Exception as exc:  # the loop is gone already
            log.debug("removing the wake-up pipe: %s", exc)
        for fd in (read, write):
            try:
                os.close(fd)
            except OSError:
                pass


__all__ = ["LaneConsumer", "InlineLane", "SHARD_SLOTS", "INLINE_QUEUES"]
