"""One thin task per message kind: validate -> engine -> sink.

The embedded default and the fleet run exactly these tasks; only the broker differs.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import numpy as np
from celery import shared_task
from pydantic import TypeAdapter

from producer.broker import INLINE_TASK, SHARD_TASK
from producer.jobs import (
    ClassifyJob,
    EmbedJob,
    InlineJob,
    InlineResult,
    JobKind,
    RerankJob,
    RowError,
    ShardJob,
    ShardReport,
    part_name,
)
from producer.sources import read_shard
from producer.storage import read_marker
from worker import runtime, sinks

log = logging.getLogger(__name__)

_inline_adapter: TypeAdapter[InlineJob] = TypeAdapter(InlineJob)

#: An inline call waits at most this long for the engine; past it the caller gets an error.
INLINE_TIMEOUT_S = 300.0


def encode_f32(values: np.ndarray) -> str:
    """Base64 of little-endian float32: a quarter of JSON floats' size, and exact."""
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f4").tobytes()).decode("ascii")


def run_inline(payload: dict[str, Any]) -> dict[str, Any]:
    """Run a small embed / rerank / classify call and return an ``InlineResult`` as JSON."""
    job = _inline_adapter.validate_python(payload)
    kind = JobKind(job.kind)
    engine = runtime.engine_for(job.model, kind)
    if isinstance(job, RerankJob):
        inputs: list[Any] = [(job.query, doc) for doc in job.documents]
    else:
        inputs = list(job.inputs)
    result = engine.run(inputs, job.options, timeout=INLINE_TIMEOUT_S)
    values = result.values.reshape(len(inputs), -1)
    return InlineResult(
        kind=kind,
        model=job.model,
        n_items=len(inputs),
        dims=int(values.shape[1]),
        data_b64=encode_f32(values),
        n_tokens=result.n_tokens,
        truncated=result.truncated,
        labels=list(result.labels),
        errors=result.errors,
    ).model_dump(mode="json")


def run_shard(payload: dict[str, Any], deliveries: int = 1) -> dict[str, Any]:
    """Embed one shard of a bulk job into ``part-NNNNN.parquet``, unless it is already done."""
    job = ShardJob.model_validate(payload)
    done = read_marker(job.out, job.shard.index)
    if done is not None:
        log.info("shard %d of job %s is already done; skipping", job.shard.index, job.job_id)
        return done.model_dump(mode="json")
    engine = runtime.engine_for(job.model, job.kind)
    rows = read_shard(job.shard, job.kind, job.columns)
    result = engine.run(rows.values, job.options)
    errors = _row_errors(job, rows, result.errors)
    failed = {e.row - job.shard.row_start for e in errors}
    keep = [i for i in range(len(rows.values)) if i not in failed]
    table = sinks.result_table(engine.info, result, rows.ids, keep, job.options.output_dtype, engine.backend.dtype)
    sinks.write_part(job.out, job.shard.index, table)
    report = ShardReport(
        index=job.shard.index,
        path=part_name(job.shard.index),
        rows_in=len(rows.values),
        rows_written=len(keep),
        n_tokens=int(sum(result.n_tokens[i] for i in keep)),
        errors=errors,
        deliveries=deliveries,
    )
    sinks.write_marker(job.out, report)
    sinks.finalize_if_complete(job.out, engine.info.revision)
    return report.model_dump(mode="json")


def _row_errors(job: ShardJob, rows: Any, engine_errors: dict[int, str]) -> list[RowError]:
    """Engine errors, re-worded with the row number, id and the source column they concern."""
    field = f"{job.columns.query}/{job.columns.document}" if job.kind == JobKind.rerank else job.columns.text
    ids = rows.ids.to_pylist()
    out = []
    for offset, message in sorted(engine_errors.items()):
        row = job.shard.row_start + offset
        reason = rows.parse_errors.get(row) or message.replace(f"input {offset}", f"row {row}")
        out.append(RowError(row=row, id=ids[offset], field=field, reason=reason))
    return out


@shared_task(name=INLINE_TASK)
def inline_task(payload: dict[str, Any]) -> dict[str, Any]:
    return run_inline(payload)


@shared_task(name=SHARD_TASK, bind=True)
def shard_task(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
    return run_shard(payload)


__all__ = ["inline_task", "shard_task", "run_inline", "run_shard", "EmbedJob", "ClassifyJob"]
