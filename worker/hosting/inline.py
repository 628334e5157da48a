"""Inline calls straight from the inline lane into the engine: no pool thread, no task trace.

Celery runs a message as a task: a ``Request`` object, a hop to a pool thread, the task's trace
(signals, state bookkeeping), then the result store; for a single-text call that is ~2 ms of the
~4 ms the fleet adds over the engine, and a pool thread per call waiting on the engine's future.
Here the consumer's callback decodes the message, hands the inputs to the engine (which never
blocks: ``Engine.submit`` returns a future) and the answer is stored when it is ready. The
answer is the very ``InlineResult`` the task would store (``tasks.inline_answer``).

Only the common case takes this way; everything else goes to Celery's own handler, unchanged:
a message of another task, one sent again (``retries``), one with an ETA, one already expired or
revoked (Celery records it revoked), a token-level job, and any call the worker cannot start (a model it
does not host or refused, bad options: the task answers those with their code). A call that fails
inside the engine is answered as the task would answer it (``tasks.inline_failure``): sent again
for another worker when this one is stopping, else the error's code, or a task failure.

The message's deadline (its ``expires`` header, the facade's per-request deadline) goes into the
engine with the job: past it the engine drops whatever of the call has not run yet, so a call
the facade already answered with a 504 stops costing the device; so does a call the facade
revoked (its client hung up: Celery's revoke puts its id in ``worker_state.revoked``).

Answers are stored by one writer thread (``AnswerWriter``), every answer waiting at that moment in
one Redis round trip: the engine's post-processing thread, which delivers a batch's results to
every call in it, no longer waits for a SET and a PUBLISH per call before it can take the next
batch off the device. A call alone in the lane (no other call in flight, nothing waiting to be
written) is stored by the thread its answer came on instead: with nobody else to batch with, the
writer's wake-up (a thread woken on an idle core: 70-150 us here, 2-core Zen 5) would only delay it.
For the same reason a call alone is tokenized by the lane's own thread (``Engine.submit``'s
``tokenize_here``), which has nothing else to do until the next message, not by a woken pool thread.

It needs the Redis result backend (``InlineResultBackend``); the embedded worker's in-memory
backend wakes its facade through Celery's ``task_postrun`` signal, so it keeps Celery's path.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Annotated, Any, Callable, Union

import orjson
from celery import Celery
from celery.worker import state as worker_state
from pydantic import Discriminator, Tag, TypeAdapter, ValidationError

from producer.broker import INLINE_TASK
from producer.jobs import ClassifyJob, EmbedJob, RerankJob, TokensJob
from worker.hosting import stop
from worker.hosting.registry import of as registry_of
from worker.hosting.results import InlineResultBackend
from worker.hosting.tasks import inline_answer, inline_failure, inline_job, monotonic_deadline, start_inline

log = logging.getLogger(__name__)

Handler = Callable[[Any], None]


def fast_lane_for(app: Celery, celery_handler: Handler) -> Handler:
    """The inline lane's message handler: the fast way where the result backend allows it."""
    if isinstance(app.backend, InlineResultBackend):
        return FastInline(app, celery_handler)
    return celery_handler


class FastInline:
    """The inline lane's ``on_message``: start the call in the engine, or let Celery run it."""

    def __init__(self, app: Celery, celery_handler: Handler) -> None:
        self.app = app
        self.backend: InlineResultBackend = app.backend
        self.celery_handler = celery_handler
        self.writer = AnswerWriter.of(self.backend)
        #: the engines of the worker whose lane this is (``worker.hosting.registry.of``)
        self.engines = registry_of(app)
        #: that worker's "stopping" flag (``worker.hosting.stop``): a failure during its stop is sent again
        self.stopping = stop.of(app)
        #: calls started here and not yet answered (one alone is stored on its engine's thread)
        self._open = 0
        self._open_lock = threading.Lock()

    def close(self, timeout: float = 5.0) -> None:
        """The lane is stopping: wait until the answers already made are stored."""
        self.writer.flush(timeout)

    def __call__(self, message: Any) -> None:
        headers = message.headers or {}
        deadline = monotonic_deadline(headers.get("expires"))
        if headers.get("task") != INLINE_TASK or headers.get("retries") or headers.get("eta") \
                or _expired(headers.get("expires"), deadline) or headers.get("id") in worker_state.revoked:
            self.celery_handler(message)
            return
        alone = self._opened(1) == 0
        try:
            payload = _arguments(message)[0]
            job = job_of(payload)
            if isinstance(job, TokensJob):
                raise LookupError("token-level jobs run as tasks")
            task_id = str(headers["id"])
            future, count = start_inline(job, deadline, withdrawn=lambda: task_id in worker_state.revoked,
                                         engines=self.engines, tokenize_here=alone)
        except Exception:  # the task's own handling answers it (refusal codes, bad messages)
            self._opened(-1)
            self.celery_handler(message)
            return
        queue = (message.delivery_info or {}).get("routing_key")
        future.add_done_callback(lambda done: self._finish(done, task_id, job, payload, count, headers, queue))

    def _opened(self, change: int) -> int:
        """Count a call in (1) or out (-1); how many were open before."""
        with self._open_lock:
            before = self._open
            self._open += change
            return before

    def _finish(self, done: Future, task_id: str, job: Any, payload: dict[str, Any], count: int,
                headers: dict[str, Any], queue: str | None) -> None:
        """On the engine's thread: store the answer, or what the task would have made of the failure."""
        alone = self._opened(-1) == 1
        try:
            answer = inline_answer(job, count, done.result())
        except Exception as exc:
            self._failed(task_id, payload, exc, headers, queue)
            return
        self.writer.put(task_id, answer, alone=alone)

    def _failed(self, task_id: str, payload: dict[str, Any], exc: Exception, headers: dict[str, Any],
                queue: str | None) -> None:
        """A refusal's code, a send for another worker (this one is stopping), or a task failure (502)."""
        try:
            answer = inline_failure(payload, exc, stopping=self.stopping.is_set())
        except Exception as unexpected:
            log.error("inline call %s failed: %s: %s", task_id, type(unexpected).__name__, unexpected)
            _guarded(task_id, self.backend.mark_as_failure, task_id, unexpected)
            return
        if answer is None:
            log.warning("inline call %s was caught by the worker's stop: sending it again for another worker",
                        task_id)
            _guarded(task_id, self._send_again, task_id, payload, headers, queue)
            return
        _guarded(task_id, self.backend.store_inline, task_id, answer)

    def _send_again(self, task_id: str, payload: dict[str, Any], headers: dict[str, Any], queue: str | None) -> None:
        """The message again, under the same id and deadline; ``retries`` sends it Celery's way."""
        expires = headers.get("expires")
        self.app.send_task(INLINE_TASK, args=[payload], task_id=task_id, queue=queue, retries=1,
                           expires=dt.datetime.fromisoformat(expires) if expires else None,
                           argsrepr=headers.get("argsrepr"), kwargsrepr="{}")


_WRITERS_LOCK = threading.Lock()


class AnswerWriter:
    """Stores successful inline answers from a thread of its own, all those waiting in one round trip.

    ``put`` never blocks the engine's thread; the writer takes everything queued since its last
    write and stores it with one pipeline (``InlineResultBackend.store_inlines``). If Redis cannot
    take them, the callers time out (504), as with a store that failed before. The thread lives
    as long as the process: calls still running when the lane stops (a reconnect) are stored too."""

    def __init__(self, backend: InlineResultBackend) -> None:
        self.backend = backend
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._unwritten = 0
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="ef-inline-answers", daemon=True)
        self._thread.start()

    @classmethod
    def of(cls, backend: InlineResultBackend) -> "AnswerWriter":
        """The one writer of ``backend`` (a lane restarted after a reconnect keeps it)."""
        with _WRITERS_LOCK:
            writer = getattr(backend, "_answer_writer", None)
            if writer is None:
                writer = backend._answer_writer = cls(backend)  # type: ignore[attr-defined]
            return writer

    def put(self, task_id: str, answer: Any, alone: bool = False) -> None:
        """Store ``answer``: queued for the writer thread; ``alone`` (no other call in flight) and
        with nothing queued, stored now on this thread (one round trip it would wait for anyway)."""
        with self._idle:
            self._unwritten += 1
            now = alone and self._unwritten == 1
        if not now:
            self._queue.put((task_id, answer))
            return
        try:
            self._store([(task_id, answer)])
        finally:
            self._written(1)

    def _store(self, answers: list[tuple[str, Any]]) -> None:
        try:
            self.backend.store_inlines(answers)
        except Exception as exc:
            log.error("cannot store %d inline answers (%s): %s: %s", len(answers),
                      ", ".join(task_id for task_id, _ in answers[:3]), type(exc).__name__, exc)

    def _written(self, count: int) -> None:
        with self._idle:
            self._unwritten -= count
            self._idle.notify_all()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every answer put so far is written (or failed); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._unwritten == 0, timeout)

    def _run(self) -> None:
        while True:
            answers = [self._queue.get()]
            while True:
                try:
                    answers.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._store(answers)
            self._written(len(answers))


def _guarded(task_id: str, step: Callable[..., Any], *args: Any) -> None:
    """Run a step that talks to Redis; if Redis is unreachable the caller times out (504)."""
    try:
        step(*args)
    except Exception as exc:
        log.error("inline call %s: cannot store its outcome: %s: %s", task_id, type(exc).__name__, exc)


def _expired(expires: Any, deadline: float | None) -> bool:
    """Past ``expires``; one that cannot be read (no ``deadline`` from it) is left to Celery to judge."""
    if not expires:
        return False
    return deadline is None or deadline <= time.monotonic()


def _kind(value: Any) -> Any:
    return value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)


#: the inline jobs told apart by their ``kind``: one model validated, where the plain union
#: (``tasks.inline_job``) tries them in turn (3 against 10 us a message, 2-core Zen 4)
_BY_KIND: TypeAdapter[Any] = TypeAdapter(Annotated[Union[
    Annotated[EmbedJob, Tag("embed")], Annotated[RerankJob, Tag("rerank")],
    Annotated[ClassifyJob, Tag("classify")], Annotated[TokensJob, Tag("tokens")]], Discriminator(_kind)])


def job_of(payload: Any) -> Any:
    """The message's job, as ``tasks.inline_job`` validates it: by its ``kind`` when it names one,
    else (or when that fails) the union's own verdict, with its own error."""
    try:
        return _BY_KIND.validate_python(payload)
    except ValidationError:
        return inline_job(payload)


def _arguments(message: Any) -> list[Any]:
    """A task message's positional arguments: plain JSON (what every producer here sends) through
    orjson; anything else (another serializer, kombu's ``__type__`` objects, a content type the
    worker does not accept) through kombu's own decoding, which also refuses what it must."""
    body = message.body
    if message.content_type == "application/json" and message.content_encoding in ("utf-8", "utf8") \
            and isinstance(body, bytes) and b'"__type__"' not in body and not message.errors \
            and (not message.accept or "application/json" in message.accept):
        return orjson.loads(body)[0]
    return message.decode()[0]

