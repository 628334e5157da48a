"""Coalescing concurrent HTTP requests into fewer inline jobs.

Every queued message costs the same fixed work however many texts it carries: a publish, a
receive, a task on a worker thread, a result stored and read back. At one request at a time
that cost is the latency the facade adds; at 64 concurrent single-text requests it is most of
the CPU. So, per model queue, a request is sent at once while fewer than ``limit`` jobs are in
flight (an idle server adds no wait), and otherwise waits for the next free slot, when all
requests waiting with the same options leave together as one job. The worker's engine batches
across jobs anyway; coalescing only stops paying the per-message cost once per request.

A merged job that fails as a whole (a worker error, or a rejection) is sent again per request,
so one request can never cost another its answer; a timeout is not retried.

Deadlines stay per request: a merged job runs until the latest deadline of its requests, and
each request stops waiting (``TimeoutError``: a 504) at its own, so a request merged into an
older one never inherits the older one's deadline. Once every request of a sent job has stopped
waiting (timed out, or its client went away: the handler's cancellation cancels its wait), the
job's run is cancelled, which cancels it in an in-process engine (``worker.hosting.direct``);
a message already on a queue carries its deadline to the worker's engine instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import numpy as np

from producer.client import decode_f32, decode_outputs
from producer.errors import from_wire
from producer.jobs import ClassifyJob, EmbedJob, InlineJob, InlineResult, RerankJob
from producer.outputs import MultiVectors, SparseRows
from producer.rules import MAX_INLINE_INPUTS

log = logging.getLogger(__name__)

MergeKey = tuple[str, str, str, bool]


@dataclass
class Answer:
    """One job's outputs, decoded once: rows in input order, per-input tokens and errors."""

    values: np.ndarray
    n_tokens: list[int]
    labels: list[str]
    errors: dict[int, str]
    tokens: list[list[dict[str, Any]]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    sparse: SparseRows | None = None
    multivector: MultiVectors | None = None

    @classmethod
    def from_wire(cls, value: Any) -> "Answer":
        """A worker's stored answer (``InlineResult``'s JSON) decoded; raises its error (``from_wire``).

        A dense-only answer (every embedding call that names no other output) is read straight
        from its fields: validating the model and decoding through it cost 9 us of the facade's
        CPU (167 us when the core comes to it cold; 2-core Zen 4), most of a single-text reply's
        decoding. Anything else, or a field of an unexpected type, goes through ``InlineResult``."""
        if type(value) is dict and _plain_dense(value):
            try:
                return cls(decode_f32(value["data_b64"], value["n_items"], value["dims"]),
                           [int(n) for n in value.get("n_tokens", ())], [str(x) for x in value.get("labels", ())],
                           {int(index): str(why) for index, why in value.get("errors", {}).items()})
            except (TypeError, ValueError):  # let the model say what is wrong
                pass
        result = InlineResult.model_validate(value)
        if result.error is not None:
            raise from_wire(result.error)
        return cls.of(result)

    @classmethod
    def of(cls, result: InlineResult) -> "Answer":
        decoded = decode_outputs(result)
        values = decoded.dense if decoded.dense is not None else np.zeros((result.n_items, 0), np.float32)
        return cls(values, list(result.n_tokens), list(result.labels), dict(result.errors), list(result.tokens),
                   list(result.texts), decoded.sparse, decoded.multivector)


#: ``InlineResult`` fields a dense-only answer may carry besides its vectors, n_tokens, labels and errors
_DENSE_ANSWER = frozenset({"kind", "model", "n_items", "dims", "data_b64", "n_tokens", "truncated", "labels", "errors",
                           "error", "tokens", "texts", "outputs", "sparse_counts", "sparse_indices_b64",
                           "sparse_values_b64", "vocab_size", "multivector_counts", "multivector_dims", "multivector_b64"})


def _plain_dense(value: dict[str, Any]) -> bool:
    """Dense vectors only, no error, no token-level answer, the vector fields of the expected types."""
    return (value.get("error") is None and not value.get("outputs") and not value.get("tokens")
            and not value.get("texts") and type(value.get("n_items")) is int and type(value.get("dims")) is int
            and type(value.get("data_b64")) is str and type(value.get("errors", {})) is dict
            and value.keys() <= _DENSE_ANSWER)


def merge_key(job: InlineJob) -> MergeKey | None:
    """Jobs with equal keys can travel as one; ``None``: this job always travels alone.

    Rerank jobs carry one query each, so they never merge, nor do token-level jobs (their answers
    are not rows). Texts and token ids do not mix.
    """
    if not isinstance(job, (EmbedJob, ClassifyJob)):
        return None
    token_ids = bool(job.inputs) and not isinstance(job.inputs[0], str)
    return (job.kind, job.model, job.options.model_dump_json(), token_ids)


def size(job: InlineJob) -> tuple[int, int]:
    """Inputs and characters (token ids count one character each) a job carries."""
    items = job.documents if isinstance(job, RerankJob) else job.inputs
    return len(items), sum(len(item) for item in items)


def merge(jobs: Sequence[EmbedJob | ClassifyJob]) -> EmbedJob | ClassifyJob:
    """One job with every input of ``jobs`` (which share a merge key), in order."""
    first = jobs[0]
    if len(jobs) == 1:
        return first
    inputs = [item for job in jobs for item in job.inputs]
    return first.model_copy(update={"inputs": inputs})


def split(answer: Answer, sizes: Sequence[int]) -> list[Answer]:
    """The merged answer cut back into one answer per job, errors renumbered per job."""
    parts = []
    start = 0
    for n in sizes:
        errors = {index - start: message for index, message in answer.errors.items() if start <= index < start + n}
        rows = range(start, start + n)
        parts.append(Answer(answer.values[start:start + n], answer.n_tokens[start:start + n], answer.labels, errors,
                            sparse=answer.sparse.take(rows) if answer.sparse is not None else None,
                            multivector=answer.multivector.take(rows) if answer.multivector is not None else None))
        start += n
    return parts


Run = Callable[[InlineJob, str, float], Awaitable[Answer]]
"""Send one job to a queue and wait for its answer until a monotonic deadline."""
Retryable = Callable[[BaseException], bool]
"""Whether a merged job's failure may be the fault of one of its requests (then each goes alone)."""


@dataclass
class _Entry:
    job: InlineJob
    deadline: float
    future: asyncio.Future[Answer]
    key: MergeKey | None
    inputs: int
    chars: int


@dataclass
class _Lane:
    """One model queue: its jobs in flight and the requests waiting for a slot."""

    limit: int = 1
    inflight: int = 0
    pending: deque[_Entry] = field(default_factory=deque)


class Coalescer:
    """Per queue: send at once below ``limit`` jobs in flight, else merge the waiting requests."""

    def __init__(self, run: Run, retryable: Retryable, max_inputs: int = 256, max_chars: int = 200_000) -> None:
        self.run = run
        self.retryable = retryable
        self.max_inputs = min(max_inputs, MAX_INLINE_INPUTS)
        self.max_chars = max_chars
        self.lanes: dict[str, _Lane] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: How many requests each sent job carried (for the metrics).
        self.on_sent: Callable[[int], None] = lambda n: None

    async def submit(self, job: InlineJob, queue: str, limit: int, deadline: float) -> Answer:
        """The answer to ``job``; waits at most until ``deadline`` (``TimeoutError`` after)."""
        lane = self.lanes.setdefault(queue, _Lane())
        lane.limit = max(1, limit)
        if not lane.pending and lane.inflight < lane.limit:
            return await self._alone(job, queue, lane, deadline)
        loop = asyncio.get_running_loop()
        inputs, chars = size(job)
        entry = _Entry(job, deadline, loop.create_future(), merge_key(job), inputs, chars)
        lane.pending.append(entry)
        self._pump(queue, lane)
        # the lane's run applies the deadline to sent jobs; this covers a wait for a slot
        return await asyncio.wait_for(entry.future, max(0.0, deadline - loop.time()))

    async def _alone(self, job: InlineJob, queue: str, lane: _Lane, deadline: float) -> Answer:
        """A request that finds a free slot and nobody waiting runs in its own task: no task of
        the lane's, no future to hand the answer over, no extra turns of the event loop (~50 us
        of the facade's CPU a request, ~140 us when the core comes to it cold: 2-core Zen 4).
        Its client hanging up cancels this task and so the run; at ``deadline`` the run is
        cancelled too (``TimeoutError``), as a request waiting for its job stops waiting then."""
        lane.inflight += 1
        try:
            self.on_sent(1)
            return await _until(self.run(job, queue, deadline), deadline)
        finally:
            lane.inflight -= 1
            self._pump(queue, lane)

    def waiting(self, queue: str) -> int:
        lane = self.lanes.get(queue)
        return len(lane.pending) if lane else 0

    def _pump(self, queue: str, lane: _Lane) -> None:
        while lane.pending and lane.inflight < lane.limit:
            batch = self._take(lane)
            if not batch:
                continue
            lane.inflight += 1
            task = asyncio.create_task(self._send(queue, lane, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self, lane: _Lane) -> list[_Entry]:
        """The oldest waiting request and every later one that can share its job."""
        first = lane.pending.popleft()
        if first.future.done():  # its client gave up while it waited
            return []
        batch = [first]
        if first.key is None:
            return batch
        inputs, chars = first.inputs, first.chars
        kept: deque[_Entry] = deque()
        for entry in lane.pending:
            if entry.future.done():
                continue
            fits = inputs + entry.inputs <= self.max_inputs and chars + entry.chars <= self.max_chars
            if entry.key == first.key and fits:
                batch.append(entry)
                inputs += entry.inputs
                chars += entry.chars
            else:
                kept.append(entry)
        lane.pending = kept
        return batch

    async def _send(self, queue: str, lane: _Lane, batch: list[_Entry]) -> None:
        try:
            self.on_sent(len(batch))
            if len(batch) == 1:
                work = asyncio.ensure_future(self._answer(batch[0], self.run(batch[0].job, queue, batch[0].deadline)))
            else:
                work = asyncio.ensure_future(self._send_merged(queue, batch))
            abandon = _abandon_when_unwanted(work, batch)
            for entry in batch:
                entry.future.add_done_callback(abandon)
            await asyncio.wait([work])
            if not work.cancelled() and work.exception() is not None:
                log.error("sending a job failed: %s", work.exception())
        finally:
            lane.inflight -= 1
            self._pump(queue, lane)

    async def _send_merged(self, queue: str, batch: list[_Entry]) -> None:
        jobs = [entry.job for entry in batch]
        try:
            # until the latest deadline: each request stops waiting at its own (``submit``)
            answer = await self.run(merge(jobs), queue, max(entry.deadline for entry in batch))  # type: ignore[arg-type]
        except Exception as exc:
            if not self.retryable(exc):
                for entry in batch:
                    _settle(entry.future, exc=exc)
                return
            log.warning("a job of %d merged requests failed (%s); sending each alone", len(batch), exc)
            await asyncio.gather(*(self._answer(entry, self.run(entry.job, queue, entry.deadline))
                                   for entry in batch))
            return
        for entry, part in zip(batch, split(answer, [entry.inputs for entry in batch])):
            _settle(entry.future, part)

    @staticmethod
    async def _answer(entry: _Entry, pending: Awaitable[Answer]) -> None:
        try:
            _settle(entry.future, await pending)
        except Exception as exc:
            _settle(entry.future, exc=exc)


async def _until(work: Awaitable[Answer], deadline: float) -> Answer:
    """``await work``, cancelled at ``deadline`` (the loop's clock) with ``TimeoutError``."""
    if _timeout_at is None:  # Python 3.10: wait_for (a task of its own)
        return await asyncio.wait_for(work, max(0.0, deadline - asyncio.get_running_loop().time()))
    async with _timeout_at(deadline):
        return await work


#: ``asyncio.timeout_at`` (Python 3.11): a deadline on the running task, without wrapping it in another
_timeout_at = getattr(asyncio, "timeout_at", None)


def _abandon_when_unwanted(work: asyncio.Future[None], batch: list[_Entry]) -> Callable[[Any], None]:
    """A callback for each request's future: once none of ``batch`` waits any more, ``work`` (the
    job's run) is cancelled. After a normal answer every future is done too, and so is the work."""
    def check(_: Any) -> None:
        if not work.done() and all(entry.future.done() for entry in batch):
            work.cancel()
    return check


def _settle(future: asyncio.Future[Answer], answer: Answer | None = None, exc: BaseException | None = None) -> None:
    if future.done():  # the request already timed out or its client went away
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(answer)  # type: ignore[arg-type]
