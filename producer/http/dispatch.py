"""From a validated request to a worker's answer: admission, coalescing, send, wait, errors.

``Dispatcher.call`` refuses work the fleet cannot take (429: too many requests in flight, or
the model's queue too deep), hands the job to the ``Coalescer`` (which sends it alone or merged
with concurrent requests of the same model and options), and maps whatever comes back to an
error of ``producer.errors`` (rendered by ``producer.http.errors``): 504 when no answer came in
time, 503 when no worker (or no broker) could take it, 400 when the worker rejected the input,
502 when the worker failed. A worker reports its errors as a code in the inline result; only
Celery's own states (an expired job, a lost worker) arrive as exceptions, matched by class.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Protocol

from celery import Celery
from celery.exceptions import NotRegistered, TaskRevokedError, WorkerLostError

from producer.broker import INLINE_TASK
from producer.errors import BadInput, EmbedfleetError, TimedOut, WorkerFailed
from producer.http.coalesce import Answer, Coalescer, InlineJob
from producer.http.errors import overloaded, timed_out, unavailable
from producer.http.metrics import FacadeMetrics
from producer.http.publish import Publisher, publisher_for
from producer.http.replies import Replies, replies_for
from producer.jobs import wire

log = logging.getLogger(__name__)


class Runner(Protocol):
    """An engine in the facade's own process (embedded mode: ``worker.hosting.direct``), which
    takes jobs without a message: no serialization of the inputs or of the vectors."""

    def takes(self, job: InlineJob) -> bool:
        """Whether ``job`` goes to the engine directly (else it travels as a message)."""

    async def run(self, job: InlineJob, timeout: float) -> Answer:
        """The engine's answer within ``timeout`` s; ``asyncio.TimeoutError`` after."""


class Dispatcher:
    """Send inline jobs for one facade and wait for them, bounded and timed."""

    def __init__(self, app: Celery, timeout_s: float, max_inflight: int, max_queue_depth: int,
                 jobs_per_worker: int, depth: Callable[[str], int | None], metrics: FacadeMetrics,
                 runner: Runner | None = None) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.max_inflight = max_inflight
        self.max_queue_depth = max_queue_depth
        self.jobs_per_worker = jobs_per_worker
        self.depth = depth
        self.metrics = metrics
        self.runner = runner
        self.inflight = 0
        self.replies: Replies = replies_for(app)
        self.publisher: Publisher = publisher_for(app, self.replies.sender)
        self.coalescer = Coalescer(self._run, _retry_alone)
        self.coalescer.on_sent = lambda n: metrics.requests_per_job.observe(n)

    async def start(self) -> None:
        await self.publisher.start()
        await self.replies.start()

    async def stop(self) -> None:
        await self.replies.stop()
        await self.publisher.stop()

    def _admit(self, queue: str) -> None:
        """Refuse instead of queueing without bound."""
        if self.inflight >= self.max_inflight:
            self.metrics.rejected.labels("inflight").inc()
            raise overloaded(f"the server has {self.inflight} requests in flight (limit {self.max_inflight}); "
                             "retry shortly")
        depth = self.depth(queue)
        if depth is not None and depth > self.max_queue_depth:
            self.metrics.rejected.labels("queue_depth").inc()
            raise overloaded(f"queue {queue} holds {depth} messages (limit {self.max_queue_depth}); retry shortly")

    async def call(self, job: InlineJob, queue: str, workers: int) -> Answer:
        """The answer to ``job`` from a worker of ``queue`` (served by ``workers`` workers)."""
        self._admit(queue)
        self.inflight += 1
        self.metrics.inflight.inc()
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        try:
            return await self.coalescer.submit(job, queue, self.jobs_per_worker * max(1, workers), deadline)
        except asyncio.TimeoutError:
            raise timed_out(job.model, self.timeout_s) from None
        finally:
            self.inflight -= 1
            self.metrics.inflight.dec()

    def _withdraw(self, task_id: str) -> None:
        """Revoke a sent call nobody waits for (broadcast: the worker running it drops the rest in
        its engine; otherwise it would run until its deadline). Off the event loop; where the
        broker has no broadcast (SQS) the deadline alone ends it."""
        if not self.app.conf.worker_enable_remote_control:
            return
        asyncio.get_running_loop().run_in_executor(None, _withdraw_in_background, self.app, task_id)

    async def _run(self, job: InlineJob, queue: str, deadline: float) -> Answer:
        """One message to ``queue`` (the worker drops it unanswered once ``deadline`` has passed),
        or the job handed to this process's own engine."""
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise timed_out(job.model, self.timeout_s)
        if self.runner is not None and self.runner.takes(job):
            try:
                return await self.runner.run(job, left)
            except (asyncio.TimeoutError, TimeoutError):
                raise timed_out(job.model, self.timeout_s) from None
            except EmbedfleetError:
                raise
            except Exception as exc:  # as a worker's failure would be answered: 502
                log.error("the engine failed on model %s: %s: %s", job.model, type(exc).__name__, exc)
                raise WorkerFailed(f"the worker failed: {type(exc).__name__}: {exc}", code="worker_error") from None
        payload = wire(job)
        task_id = self.replies.new_task_id()
        # shown in the worker's logs instead of a repr of every input
        shown = f"[{job.kind} job, {len(payload.get('inputs') or payload.get('documents') or ())} inputs]"

        async def send() -> None:
            try:
                await self.publisher.send(INLINE_TASK, [payload], queue, task_id, left, shown)
            except Exception as exc:
                log.warning("cannot send to queue %s: %s: %s", queue, type(exc).__name__, exc)
                raise unavailable(f"the broker cannot take the job right now ({type(exc).__name__}); retry "
                                  "shortly", "broker_unavailable") from None

        try:
            value = await self.replies.call(send, task_id, left)
        except asyncio.CancelledError:  # nobody waits for it any more (its client hung up)
            if asyncio.get_running_loop().time() < deadline:  # past it, the worker drops it anyway
                self._withdraw(task_id)
            raise
        except (asyncio.TimeoutError, TimeoutError):
            raise timed_out(job.model, self.timeout_s) from None
        except EmbedfleetError:
            raise
        except Exception as exc:
            raise celery_error(exc, job.model) from None
        return Answer.from_wire(value)


def _withdraw_in_background(app: Celery, task_id: str) -> None:
    try:
        app.control.revoke(task_id)
    except Exception as exc:  # the worker drops it at its deadline anyway
        log.debug("could not revoke %s: %s", task_id, exc)


def _retry_alone(exc: BaseException) -> bool:
    """A merged job's rejection or worker failure may be one request's fault; a timeout is not."""
    return isinstance(exc, (BadInput, WorkerFailed)) or type(exc) is EmbedfleetError


def celery_error(exc: Exception, model: str) -> EmbedfleetError:
    """What Celery itself reports (rebuilt from the result backend), as one of ours."""
    if isinstance(exc, TaskRevokedError):
        return TimedOut(f"the job for model {model!r} expired before a worker took it", code="timeout")
    if isinstance(exc, (NotRegistered, WorkerLostError)):
        return unavailable(f"the worker for model {model!r} could not take the job: {exc}", "no_worker")
    log.error("worker failed on model %s: %s: %s", model, type(exc).__name__, exc)
    return WorkerFailed(f"the worker failed: {type(exc).__name__}: {exc}", code="worker_error")
