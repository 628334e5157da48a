"""One thin task per message kind: validate -> engine -> sink.

The embedded default and the fleet run exactly these tasks; only the broker differs. An inline
call that the worker refuses (bad input, an option the model cannot honour) is answered with the
error's code in the result, never a pickled exception; a shard is parked only on errors that mean
its data is bad (``producer.errors``: ``permanent``), and given back on everything else.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from celery import shared_task
from celery.exceptions import Reject
from celery.worker import state as worker_state
from pydantic import TypeAdapter, ValidationError

from producer.broker import (INLINE_TASK, SHARD_TASK, broker_kind, max_deliveries, recorded_shard,
                             record_unwritten)
from producer.errors import BadInput, EmbedfleetError, EngineStopped, ModelNotServed, UnsupportedModel, Untrusted
from producer.jobs import (
    MANIFEST,
    InlineJob,
    InlineResult,
    JobKind,
    RerankJob,
    RowError,
    ShardJob,
    ShardReport,
    TokensJob,
    part_name,
)
from producer.outputs import DENSE_ONLY, to_b64
from producer import signing
from producer.sources import read_shard
from producer.storage import exists, locate, read_marker
from worker import sinks
from worker.hosting import isolation, limits, poison, stop
from worker.hosting.images import image_cells
from worker.hosting import registry as runtime
from worker.hosting.registry import Registry
from worker.hosting.stop import StopFlag
from worker.hosting.tokens import run_tokens
from worker.hosting.trust import StorageRoots, check_output, check_shard, roots_of

log = logging.getLogger(__name__)

_inline_adapter: TypeAdapter[InlineJob] = TypeAdapter(InlineJob)

#: An inline call waits at most this long for the engine; past it the caller gets an error.
INLINE_TIMEOUT_S = 300.0


def encode_f32(values: np.ndarray) -> str:
    """Base64 of little-endian float32: a quarter of JSON floats' size, and exact. pybase64 (SIMD) because a
    32-text answer cost the stdlib ~91 µs of the worker's GIL against ~9 µs (2-core Zen 4, stop 27)."""
    return to_b64(values, "<f4")


def inline_job(payload: dict[str, Any]) -> InlineJob:
    """The inline message's job, validated (``ValidationError`` for a malformed one)."""
    return _inline_adapter.validate_python(payload)


def start_inline(job: InlineJob, deadline: float | None = None,
                 withdrawn: Callable[[], bool] | None = None, *, engines: Registry,
                 tokenize_here: bool = False) -> tuple["Future[Any]", int]:
    """Hand an embed / rerank / classify job to its engine among ``engines`` (the worker's):
    the engine's future and the input count. Past ``deadline`` (``time.monotonic()``: when the
    caller stops waiting) the engine drops what of it has not run yet, and so once
    ``withdrawn()`` says the caller withdrew it. ``tokenize_here``: ``Engine.submit``'s."""
    engine = engines.engine_for(job.model, JobKind(job.kind))
    if isinstance(job, RerankJob):
        inputs: list[Any] = [(job.query, doc) for doc in job.documents]
    else:
        inputs = list(job.inputs)
    return engine.submit(inputs, job.options, urgent=True, deadline=deadline, withdrawn=withdrawn,
                         tokenize_here=tokenize_here), len(inputs)


def inline_answer(job: InlineJob, count: int, result: Any) -> dict[str, Any]:
    """The engine's result as the ``InlineResult`` JSON the caller decodes.

    A dense-only answer is written straight into a copy of ``InlineResult``'s JSON shape: the
    fields are plain lists and strings already, and validating them again through the model took
    ~80 us of the worker's answer path for 32 texts (2-core AMD, loaded), against ~10 us this way
    (a test holds the two equal)."""
    values = result.values.reshape(count, -1)
    if tuple(result.outputs) == DENSE_ONLY:
        answer = {key: [] if value == [] else value for key, value in _EMPTY_ANSWER.items()}  # fresh lists
        answer.update(kind=JobKind(job.kind).value, model=job.model, n_items=count, dims=int(values.shape[1]),
                      data_b64=encode_f32(values), n_tokens=[int(n) for n in result.n_tokens],
                      truncated=[bool(t) for t in result.truncated], labels=[str(x) for x in result.labels],
                      errors={str(int(i)): str(why) for i, why in result.errors.items()})
        return answer
    return InlineResult(
        kind=JobKind(job.kind),
        model=job.model,
        n_items=count,
        dims=int(values.shape[1]),
        data_b64=encode_f32(values),
        n_tokens=result.n_tokens,
        truncated=result.truncated,
        labels=list(result.labels),
        errors=result.errors,
        **_other_outputs(result),
    ).model_dump(mode="json")


#: ``InlineResult``'s JSON with every field at its default (``inline_answer`` fills a copy)
_EMPTY_ANSWER = InlineResult(kind=JobKind.embed, model="").model_dump(mode="json")


def monotonic_deadline(expires: Any) -> float | None:
    """A message's ``expires`` (ISO wall-clock time: the caller's deadline) as ``time.monotonic()``."""
    if not expires:
        return None
    try:
        moment = dt.datetime.fromisoformat(str(expires))
    except ValueError:
        return None
    now = dt.datetime.now(moment.tzinfo) if moment.tzinfo else dt.datetime.now()
    return time.monotonic() + (moment - now).total_seconds()


def run_inline(payload: dict[str, Any], deadline: float | None = None,
               withdrawn: Callable[[], bool] | None = None, *, engines: Registry) -> dict[str, Any]:
    """Run a small embed / rerank / classify call on ``engines`` and return an ``InlineResult`` as
    JSON; past ``deadline`` (``time.monotonic()``) the engine drops what has not run (``TimedOut``)."""
    job = inline_job(payload)
    if isinstance(job, TokensJob):
        return run_tokens(job, engines)
    future, count = start_inline(job, deadline, withdrawn, engines=engines)
    return inline_answer(job, count, future.result(INLINE_TIMEOUT_S))


def inline_failure(payload: dict[str, Any], exc: BaseException, *, stopping: bool) -> dict[str, Any] | None:
    """How an inline call that raised ``exc`` is answered: a refusal's result (its code), or
    ``None`` when the worker's stop caught it (``stopping``: its worker's flag; it must be sent
    again for another worker); any other error is raised again (a task failure: the caller gets a 502)."""
    if isinstance(exc, (EngineStopped, ModelNotServed)):
        if isinstance(exc, EngineStopped) or stopping:
            return None
        return refused(payload, exc)  # sent to a queue this worker does not serve: a routing mistake
    if isinstance(exc, ValidationError):
        return refused(payload, BadInput(f"the job message is not valid: {exc.errors()[0].get('msg')}"))
    if isinstance(exc, EmbedfleetError):
        return refused(payload, exc)
    raise exc


def _other_outputs(result: Any) -> dict[str, Any]:
    """The wire fields of sparse rows and multi-vectors (``producer.outputs``), when computed."""
    if tuple(result.outputs) == DENSE_ONLY:
        return {}
    fields: dict[str, Any] = {"outputs": list(result.outputs)}
    for rows in (result.sparse, result.multivector):
        if rows is not None:
            fields.update(rows.to_wire())
    return fields


def refused(payload: dict[str, Any], error: EmbedfleetError) -> dict[str, Any]:
    """The answer to an inline call the worker refused: the error's code and message."""
    kind = payload.get("kind") if payload.get("kind") in {k.value for k in JobKind} else JobKind.embed.value
    return InlineResult(kind=JobKind(kind), model=str(payload.get("model", "")),
                        error=error.to_wire()).model_dump(mode="json")


def run_shard(payload: dict[str, Any], deliveries: int = 1, *, engines: Registry,
              roots: StorageRoots | None) -> dict[str, Any]:
    """Embed one shard of a bulk job into ``part-NNNNN.parquet`` on ``engines``, unless it is already
    done; its image files are read only inside ``roots`` (the worker's; ``None`` checks nothing)."""
    job = ShardJob.model_validate(payload)
    done = read_marker(job.out, job.shard.index)
    if done is not None:
        log.info("shard %d of job %s is already done; skipping", job.shard.index, job.job_id)
        return done.model_dump(mode="json")
    engine = engines.engine_for(job.model, job.kind)
    started_at = time.time()
    clock = _Stages()
    rows = read_shard(job.shard, job.kind, job.columns)
    values = image_cells(rows.values, job.shard.uri, roots) if job.columns.image else rows.values
    clock.lap("read")
    result = engine.run(values, job.options)
    clock.lap("engine")
    errors = _row_errors(job, rows, result.errors)
    written = np.ones(len(rows.values), dtype=bool)
    written[[e.row - job.shard.row_start for e in errors]] = False
    keep = np.flatnonzero(written)
    normalized = engine.normalizes(job.options) if engine.info.kind == JobKind.embed else None
    table = sinks.result_table(engine.info, result, rows.ids, keep, job.options.output_dtype, engine.backend.dtype,
                               normalize=normalized)
    clock.lap("table")
    sinks.write_part(job.out, job.shard.index, table)
    clock.lap("write")
    finished_at = time.time()
    report = ShardReport(
        index=job.shard.index,
        path=part_name(job.shard.index),
        rows_in=len(rows.values),
        rows_written=len(keep),
        n_tokens=int(np.asarray(result.n_tokens, dtype=np.int64)[keep].sum()),
        errors=errors,
        deliveries=deliveries,
        device=engines.device_of(engine),
        seconds=dict(clock.seconds),
        started_at=started_at,
        finished_at=finished_at,
    )
    sinks.write_marker(job.out, report)
    clock.lap("marker")
    sinks.finalize_if_complete(job.out, engine.info.revision)
    clock.lap("finalize")
    log.info("shard %d of job %s: %s", job.shard.index, job.job_id,
             ", ".join(f"{name} {value * 1000:.0f} ms" for name, value in clock.seconds.items()))
    return report.model_dump(mode="json")


class _Stages:
    """Wall seconds per stage of a shard task, lap after lap."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 6)
        self._last = now


def _row_errors(job: ShardJob, rows: Any, engine_errors: dict[int, str]) -> list[RowError]:
    """Engine errors with the row number (counted from 0), id and the source column they concern."""
    field = f"{job.columns.query}/{job.columns.document}" if job.kind == JobKind.rerank else \
        job.columns.image or job.columns.text
    out = []
    for offset, reason in sorted(engine_errors.items()):  # the failed rows only: no list of every id
        row = job.shard.row_start + offset
        text = rows.parse_errors.get(row) or f"row {row} (counted from 0): {reason}"
        out.append(RowError(row=row, id=rows.ids[offset].as_py(), field=field, reason=text))
    return out


@shared_task(name=INLINE_TASK, bind=True, max_retries=3)
def inline_task(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """An inline call caught by a worker's stop is sent again at once, under the same id, so
    another worker answers it before its deadline (its queue keeps no unacknowledged copy to
    fall back on: ``producer.jobs.inline_queue_name``). Refusals are answered with their code."""
    try:
        task_id = self.request.id
        return run_inline(payload, monotonic_deadline(getattr(self.request, "expires", None)),
                          withdrawn=lambda: task_id in worker_state.revoked, engines=runtime.of(self.app))
    except Exception as exc:
        answer = inline_failure(payload, exc, stopping=stop.of(self.app).is_set())
        if answer is None:
            log.warning("inline call %s was caught by the worker's stop: sending it again for another worker",
                        self.request.id)
            raise self.retry(exc=exc, countdown=0)
        return answer


@dataclass(frozen=True)
class WorkerContext:
    """What a shard task takes from the worker it runs on, all found through that worker's Celery
    app: two in-process workers each run their tasks under their own app, so nothing here may be
    the process's (a process-wide broker once counted a Redis worker's deliveries in memory)."""

    #: the worker's engines (``worker.hosting.registry``)
    engines: Registry
    #: where its messages may read and write (``worker.hosting.trust``); ``None`` checks nothing
    roots: StorageRoots | None
    #: its "stopping" flag (``worker.hosting.stop``)
    stopping: StopFlag
    #: the broker it consumes: deliveries are counted, shards isolated and unwritable outputs recorded there
    broker: str
    #: what it does when one of its shards is stuck past its hard time limit (``worker.hosting.limits``)
    hard_limit: limits.HardLimit

    @classmethod
    def of(cls, app: Any) -> "WorkerContext":
        return cls(runtime.of(app), roots_of(app), stop.of(app), str(app.conf.broker_url), limits.hard_limit_of(app))


@shared_task(name=SHARD_TASK, bind=True)
def shard_task(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Count the delivery, park the shard after too many, else run it; never lose it on a stop.

    A shard that died with other shards in its worker runs alone from then on, and such a loss
    is not counted against it (``worker.hosting.isolation``)."""
    job = ShardJob.model_validate(payload)
    context = WorkerContext.of(self.app)
    if context.stopping.is_set():
        raise Reject("the worker is stopping", requeue=True)
    task_id = str(self.request.id or f"{job.job_id}-{job.shard.index:05d}")
    refusal = untrusted(job, payload, context.roots)
    if refusal is not None:
        return refuse(job, payload, task_id, refusal, context)
    counter = poison.deliveries_for(context.broker)
    solo = isolation.for_broker(context.broker)
    try:
        alone = solo.isolated(task_id)
    except Exception as exc:  # the broker's Redis is unreachable: the message stays unacked
        raise Reject(f"cannot read the shard's marks: {exc}", requeue=True) from exc
    try:
        with solo.slot(alone, context.stopping.is_set):
            try:
                deliveries = counter.begin(task_id, self.request)
                solo.began(task_id)
                forgiven = solo.forgiven(task_id)
            except Exception as exc:  # the broker's Redis is unreachable: the message stays unacked
                raise Reject(f"cannot count deliveries: {exc}", requeue=True) from exc
            try:
                answer = _deliver(job, payload, counter, task_id, deliveries, forgiven, context)
            finally:
                solo.ended(task_id)
            solo.done(task_id)
            return answer
    except isolation.StoppingWhileWaiting as exc:
        raise Reject("the worker is stopping", requeue=True) from exc


def _deliver(job: ShardJob, payload: dict[str, Any], counter: Any, task_id: str, deliveries: int,
             forgiven: int, context: WorkerContext) -> dict[str, Any]:
    """One counted delivery: skip a done shard, park one over the limit, else run it.

    ``deliveries - forgiven`` is what counts: losses shared with other shards are not evidence."""
    limit = max_deliveries()
    charged = deliveries - forgiven
    try:
        done = read_marker(job.out, job.shard.index)
        if done is not None:
            log.info("shard %d of job %s is already done; skipping", job.shard.index, job.job_id)
            _finish_job(job, context.engines, final=charged >= limit)
            return done.model_dump(mode="json")
        if charged > limit:
            reason = counter.last_failure(task_id) or "the worker died or was lost during every delivery"
            shared = f" ({forgiven} more lost together with other shards, not counted)" if forgiven else ""
            return park(job, f"parked after {charged - 1} deliveries{shared}: {reason}", deliveries - 1,
                        context.engines, context.broker)
        what = f"shard {job.shard.index} of job {job.job_id} ({job.shard.n_rows} rows)"
        with limits.watchdog.watch(task_id, what, job.shard.n_rows, context.hard_limit):
            return run_shard(payload, deliveries=deliveries, engines=context.engines, roots=context.roots)
    except Reject:
        raise
    except Exception as exc:
        return _after_failure(job, counter, task_id, charged, limit, exc, context)


def _finish_job(job: ShardJob, engines: Registry, *, final: bool) -> None:
    """Write the job's manifest if every shard has its marker and none is written yet: an earlier
    delivery wrote this shard's marker, then failed to write the manifest (``park``). Its failure
    must not reach ``_after_failure``, which would park a shard that is over; it is delivered again
    (counted) while deliveries are left, else logged: its marker stands."""
    try:
        if not exists(locate(job.out).child(MANIFEST)):
            sinks.finalize_if_complete(job.out, _revision(job.model, engines))
    except Exception as exc:
        if not final:
            raise Reject(f"cannot write the manifest: {type(exc).__name__}: {exc}", requeue=True) from exc
        log.error("shard %d of job %s is over, but the job's manifest could not be written on any delivery: "
                  "%s: %s", job.shard.index, job.job_id, type(exc).__name__, exc)


def untrusted(job: ShardJob, payload: dict[str, Any], roots: StorageRoots | None) -> str | None:
    """Why a worker with storage ``roots`` must not run the message (``producer.signing``,
    ``worker.hosting.trust``), or ``None``."""
    unsigned = signing.refusal(payload)
    if unsigned:
        return unsigned
    if roots is None:
        return None
    try:
        check_shard(job, roots)
    except Untrusted as exc:
        return str(exc)
    return None


def refuse(job: ShardJob, payload: dict[str, Any], task_id: str, refusal: str,
           context: WorkerContext) -> dict[str, Any]:
    """Acknowledge a refused message; when it is its job's own shard, end that shard failed.

    Only what the producer recorded may fail a shard, never the message alone (anyone who can
    write to the broker can send one; a forged copy of a pending shard must not end it):

    * the output folder lies inside the roots and its ``_job.json`` plans this very shard, signed
      when a key is held (only its source is refused): its failure marker is written there, so the
      other shards go on and the manifest names it with the reason (on every broker);
    * else, on Redis, the message is the one ``producer.broker.record_job`` recorded for the
      shard: the failure is recorded beside the queue (``record_unwritten``; nothing is written
      where the message points), the sweeper stops re-sending it and the job ends failed;
    * else (altered, not the job's, or a broker that records nothing) it is dropped: the job's
      own shard is unaffected. Before, every refusal was dropped, and on Redis the sweeper re-sent
      a job's own refused shard every sweep: its job never ended."""
    if signing.refusal(payload) is None and context.roots is not None and _output_trusted(job, context.roots):
        done = read_marker(job.out, job.shard.index)
        if done is not None:  # over already (a worker with other roots ran it, or this refusal's park)
            log.error("refusing shard message %s (its source is not read; the shard is over): %s", task_id, refusal)
            _finish_job(job, context.engines, final=True)  # a refusal is not counted: one more try at most
            return done.model_dump(mode="json")
        log.error("refusing shard message %s (its source is not read): %s; recorded as failed in %s",
                  task_id, refusal, job.out)
        return park(job, f"refused: {refusal}", 1, context.engines, context.broker, last=True)
    try:
        own = recorded_shard(context.broker, job.job_id, job.shard.index) == payload
        if own:
            record_unwritten(context.broker, job.job_id, job.shard.index,
                             f"refused: {refusal} (its failure marker was not written: the message may not "
                             f"touch its output folder)")
    except Exception as exc:  # the broker's Redis is unreachable: the message stays unacked
        raise Reject(f"cannot read or record the job's shard: {exc}", requeue=True) from exc
    what = "its job's own recorded message: recorded as failed beside the queue" if own else \
        "not the message its job recorded: dropped"
    log.error("refusing shard message %s (nothing read or written; %s): %s", task_id, what, refusal)
    return {"refused": refusal}


def _output_trusted(job: ShardJob, roots: StorageRoots) -> bool:
    """Whether the shard's output folder is inside ``roots`` and plans this shard (``trust.check_output``)."""
    try:
        check_output(job, roots)
    except Untrusted:
        return False
    return True


def is_permanent(exc: BaseException) -> bool:
    """Whether no retry can fix this failure, so the shard is parked at once with the reason.

    Bad data (``producer.errors``'s permanent errors, a message that does not validate) is; so is
    running out of host memory, since a shard is never retried whole after it (the engine splits
    batches itself). A bug (a ``KeyError`` or ``TypeError`` of ours) is not: it is retried, and
    parked only after every delivery failed, with the reason.
    """
    if isinstance(exc, EmbedfleetError):
        return exc.permanent
    return isinstance(exc, (ValidationError, MemoryError))


def _after_failure(job: ShardJob, counter: Any, task_id: str, deliveries: int, limit: int,
                   exc: Exception, context: WorkerContext) -> dict[str, Any]:
    """Give the shard back (its worker's stop, a transient error) or park it (permanent error, last delivery)."""
    if context.stopping.is_set() or isinstance(exc, EngineStopped):
        _best_effort(counter.give_back, task_id)  # not given back: this delivery counts, no more
        raise Reject("the worker is stopping", requeue=True) from exc
    reason = f"{type(exc).__name__}: {exc}"
    if is_permanent(exc):
        log.warning("shard %d of job %s cannot succeed: %s", job.shard.index, job.job_id, reason)
        return park(job, reason, deliveries, context.engines, context.broker)
    log.warning("shard %d of job %s failed on delivery %d of %d: %s", job.shard.index, job.job_id,
                deliveries, limit, reason, exc_info=True)
    if deliveries >= limit:
        return park(job, f"failed on all {deliveries} deliveries; last: {reason}", deliveries, context.engines,
                    context.broker)
    _best_effort(counter.note_failure, task_id, reason)  # not noted: a parked shard names a vaguer reason
    time.sleep(min(10.0, 2.0 * deliveries))  # a transient failure gets a moment before the retry
    raise Reject(reason, requeue=True) from exc


def _best_effort(step: Callable[..., None], task_id: str, *args: Any) -> None:
    """A bookkeeping step on the broker's Redis before a shard is given back. It must not raise:
    an error escaping the task makes Celery acknowledge the message, and the shard is lost."""
    try:
        step(task_id, *args)
    except Exception as exc:
        log.warning("shard %s: %s failed (given back regardless): %s: %s", task_id, step.__name__,
                    type(exc).__name__, exc)


def park(job: ShardJob, reason: str, deliveries: int, engines: Registry | None = None,
         broker: str | None = None, *, last: bool | None = None) -> dict[str, Any]:
    """Record the shard as failed (the job reports it), let the job finish without it, and ack;
    the manifest names the model's revision when ``engines`` (the worker's) host it.

    ``broker``: the one the shard was delivered from (its worker's), where an unwritable output is
    recorded; ``None`` for a shard no broker delivered (``embedfleet shard``), whose storage error
    is raised to its caller: there is no queue to give it back to, nor one to record it beside.
    ``last``: no delivery follows this one, so an unwritable output is recorded now (by default,
    when ``deliveries`` reached the limit; a refusal is never counted, so it says so itself)."""
    report = ShardReport(index=job.shard.index, path=None, rows_in=job.shard.n_rows, rows_written=0,
                         n_tokens=0, status="failed", failure=reason, deliveries=deliveries)
    log.error("parking shard %d of job %s: %s", job.shard.index, job.job_id, reason)
    try:
        sinks.write_marker(job.out, report)
    except Exception as exc:  # any: an S3 refusal is botocore's ClientError, no OSError
        if broker is None:
            raise
        _unparked(job, reason, exc, broker, deliveries >= max_deliveries() if last is None else last)
        return report.model_dump(mode="json")
    try:
        sinks.finalize_if_complete(job.out, _revision(job.model, engines))
    except Exception as exc:  # the marker is written: the shard is over; the next delivery finalizes
        if broker is None:
            raise
        log.error("shard %d of job %s: parked, but the manifest could not be written: %s: %s; delivering it "
                  "again to write it", job.shard.index, job.job_id, type(exc).__name__, exc)
        raise Reject(f"cannot write the manifest: {exc}", requeue=True) from exc
    return report.model_dump(mode="json")


def _unparked(job: ShardJob, reason: str, exc: Exception, broker: str, final: bool) -> None:
    """A failure marker that could not be written: try again on the next delivery (``final``
    false), else record the failure beside the queue. It never lets an error escape the task:
    Celery acknowledges such a message, and off Redis (no sweeper) the shard was lost for good."""
    if not final:  # storage may come back: the next delivery tries again (counted)
        raise Reject(f"cannot park the shard: {type(exc).__name__}: {exc}", requeue=True) from exc
    # The output is unwritable or full on every delivery: record the failure beside the queue
    # (the job's status reads it) and let the message go, instead of requeueing it forever.
    failure = f"{reason}; its failure marker could not be written either: {type(exc).__name__}: {exc}"
    if broker_kind(broker) == "sqs":
        # No record beside an SQS queue: the message is left to the redrive policy, which moves
        # it to the dead-letter queue on its next receive (acknowledged, it would vanish).
        log.error("shard %d of job %s: the output %s is unwritable; leaving the message to the dead-letter "
                  "queue: %s", job.shard.index, job.job_id, job.out, failure)
        raise Reject(failure, requeue=False) from exc
    try:
        record_unwritten(broker, job.job_id, job.shard.index, failure)
    except Exception as record_exc:  # the broker's Redis is away too: keep the message for later
        raise Reject(f"cannot record the unparked shard: {record_exc}", requeue=True) from exc
    log.error("shard %d of job %s: the output %s is unwritable; recorded on the broker: %s", job.shard.index,
              job.job_id, job.out, failure)


def _revision(model: str, engines: Registry | None) -> str | None:
    if engines is None:
        return None
    try:
        return engines.engine_for(model).info.revision
    except (ModelNotServed, UnsupportedModel):  # not hosted, or refused (worker.hosting.registry)
        return None
