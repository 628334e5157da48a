"""From a validated request to a worker's answer: admission, coalescing, send, wait, errors.

``Dispatcher.call`` refuses work the fleet cannot take (429: too many requests in flight, or
the model's queue too deep), hands the job to the ``Coalescer`` (which sends it alone or merged
with concurrent requests of the same model and options), and maps whatever comes back to an
OpenAI-shaped error: 504 when no answer came in time, 503 when no worker (or no broker) could
take it, 400 when the worker rejected the input, 502 when the worker failed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from celery import Celery

from producer.broker import INLINE_TASK
from producer.http.coalesce import Answer, Coalescer, InlineJob
from producer.http.errors import ApiError, bad, overloaded, timed_out, unavailable
from producer.jobs import InlineResult
from producer.http.metrics import FacadeMetrics
from producer.http.publish import Publisher, publisher_for
from producer.http.replies import Replies, replies_for

log = logging.getLogger(__name__)

_CLIENT_ERRORS = {"ValueError", "ValidationError", "TypeError", "InputError"}
_UNAVAILABLE = {"ModelNotServed", "EngineStopped", "NotRegistered", "WorkerLostError"}
_EXPIRED = {"TaskRevokedError"}


class Dispatcher:
    """Send inline jobs for one facade and wait for them, bounded and timed."""

    def __init__(self, app: Celery, timeout_s: float, max_inflight: int, max_queue_depth: int,
                 jobs_per_worker: int, depth: Callable[[str], int | None], metrics: FacadeMetrics) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.max_inflight = max_inflight
        self.max_queue_depth = max_queue_depth
        self.jobs_per_worker = jobs_per_worker
        self.depth = depth
        self.metrics = metrics
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

    async def _run(self, job: InlineJob, queue: str, deadline: float) -> Answer:
        """One message to ``queue``; the worker drops it unanswered once ``deadline`` has passed."""
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise timed_out(job.model, self.timeout_s)
        payload = job.model_dump(mode="json")
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
        except (asyncio.TimeoutError, TimeoutError):
            raise timed_out(job.model, self.timeout_s) from None
        except ApiError:
            raise
        except Exception as exc:
            raise remote_error(exc, job.model) from None
        return Answer.of(InlineResult.model_validate(value))


def _retry_alone(exc: BaseException) -> bool:
    """A merged job's rejection or worker failure may be one request's fault; a timeout is not."""
    return isinstance(exc, ApiError) and exc.status in (400, 502)


def remote_error(exc: Exception, model: str) -> ApiError:
    """The worker's exception (rebuilt by Celery from the result backend) as an HTTP error."""
    name = type(exc).__name__
    if name in _CLIENT_ERRORS:
        return bad(str(exc))
    if name in _EXPIRED:
        return ApiError(504, f"the job for model {model!r} expired before a worker took it", "timeout_error", None,
                        "timeout")
    if name in _UNAVAILABLE:
        return unavailable(f"the worker for model {model!r} could not take the job: {exc}", "no_worker")
    log.error("worker failed on model %s: %s: %s", model, name, exc)
    return ApiError(502, f"the worker failed: {name}: {exc}", "server_error", None, "worker_error")
