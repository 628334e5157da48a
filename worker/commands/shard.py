"""``embedfleet shard``: array-job mode with no broker (``embedfleet plan`` once, then this K times).

AWS Batch array jobs give every child the same command and a different
``AWS_BATCH_JOB_ARRAY_INDEX``; the job manifest (``{out}/_job.json``, written by ``plan``) says
what shard N is. Each child processes exactly its shard through the same ``run_shard`` a queue
worker runs, so outputs, done-markers and the final ``_manifest.json`` are identical to a fleet's:

* outputs are published atomically under deterministic names, so a Spot-reclaimed child that is
  retried writes the same part again, and a child whose shard already has a done-marker loads no
  model and rewrites nothing;
* whichever child finds every marker present writes the job manifest; a re-run child also
  writes it if an earlier child died between its marker and the manifest;
* a failure no retry can fix parks the shard at once (its marker names the reason); any other
  fails the attempt: exit 75 for AWS Batch to retry it, or, on the last attempt
  (``EMBEDFLEET_SHARD_ATTEMPTS``, the job definition's), the shard's marker records the failure,
  so the job ends without it instead of waiting for a marker no child will write.
"""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType
from typing import Annotated, Any, Optional

import typer

from producer import storage
from producer.cli import app, console, fail
from producer.errors import BadInput, EmbedfleetError, JobNotFound
from producer.jobs import JOB_FILE, JobSpec, ShardJob, ShardReport
from producer.logs import setup_logging
from producer.options import Verbose, envvar
from producer.settings import env
from worker.commands.options import (
    DEFAULT_BACKEND,
    DEFAULT_DTYPE,
    DEFAULT_TRUST_REMOTE_CODE,
    Backend,
    Device,
    Dtype,
    MaxBatchTokens,
    MemoryFraction,
    TrustRemoteCode,
)

ARRAY_INDEX_ENV = "AWS_BATCH_JOB_ARRAY_INDEX"
ATTEMPT_ENV = "AWS_BATCH_JOB_ATTEMPT"
#: The conventional exit status of a process stopped by SIGTERM (128 + 15).
EXIT_SIGTERM = 143
#: A transient failure with attempts left (sysexits' EX_TEMPFAIL): the job definitions retry it.
EXIT_RETRY = 75

log = logging.getLogger(__name__)


class ShardStopped(SystemExit):
    """SIGTERM arrived (a Spot reclaim, ``docker stop``): stop now; nothing partial is published."""


def job_folder(job_manifest: str) -> str:
    """The job's output folder from a manifest URI: ``s3://b/p/_job.json`` or ``s3://b/p`` -> ``s3://b/p``."""
    uri = job_manifest.rstrip("/")
    if uri.endswith("/" + JOB_FILE):
        uri = uri[: -len(JOB_FILE) - 1]
    elif uri == JOB_FILE:
        uri = "."
    return uri


def load_spec(job_manifest: str) -> JobSpec:
    """Read and check the job manifest; a manifest that points elsewhere is refused.

    Children write parts next to ``spec.out`` and finalize from ``{spec.out}/_job.json``; if the
    manifest was copied away from its folder, writing anyway would scatter a job over two places.
    """
    folder = job_folder(job_manifest)
    if not storage.exists(storage.locate(folder).child(JOB_FILE)):
        raise JobNotFound(
            f"--job-manifest: no {JOB_FILE} at {folder}; create one with `embedfleet plan INPUT --out {folder}`"
        )
    spec = storage.read_job(folder)
    if storage.locate(spec.out).uri != storage.locate(folder).uri:
        raise BadInput(
            f"--job-manifest: {folder}/{JOB_FILE} belongs to output folder {spec.out}; "
            "pass the manifest inside that folder"
        )
    return spec


def shard_job(spec: JobSpec, index: int) -> ShardJob:
    """The message a queue worker would get for shard ``index`` of ``spec``."""
    n_shards = len(spec.shards)
    if not 0 <= index < n_shards:
        raise BadInput(
            f"--index / {ARRAY_INDEX_ENV}: {index} is out of range; job {spec.job_id} has {n_shards} "
            f"shard(s), so the index must be 0..{n_shards - 1} (submit an array of size {n_shards})"
        )
    shard = next(s for s in spec.shards if s.index == index)
    return ShardJob(kind=spec.kind, job_id=spec.job_id, model=spec.model, out=spec.out, columns=spec.columns,
                    options=spec.options, shard=shard, n_shards=n_shards)


def finalize_if_needed(spec: JobSpec) -> None:
    """Write the job manifest if every shard is done and nobody wrote it yet (cheap: no weights)."""
    if storage.read_manifest(spec.out) is not None:
        return
    from worker.models.resolve import describe
    from worker.sinks import finalize_if_complete


    finalize_if_complete(spec.out, describe(spec.model).revision)


def run_one_shard(job: ShardJob, backend: str, device: str, dtype: str, max_batch_tokens: int | None,
                  memory_fraction: float | None, deliveries: int, trust_remote_code: bool = False,
                  attempts: int = 1) -> ShardReport:
    """Load the model, run the shard through the queue workers' own task, stop the engine.

    A failure no retry can fix (bad data, a model that cannot be served faithfully) parks the
    shard with the reason, as a queue worker does (``worker.hosting.tasks.is_permanent``): its
    marker lets the job end without it. Any other error is raised for the array's retry while
    ``deliveries`` (this attempt) is below ``attempts``; on the last attempt it parks the shard
    too, as a queue worker does after its last delivery."""
    from worker.hosting.host import WorkerSpec, load_engine
    from worker.hosting.registry import Registry
    from worker.hosting.tasks import run_shard

    spec = WorkerSpec(models=[job.model], device=device, backend=backend, dtype=dtype, concurrency=1,
                      max_batch_tokens=max_batch_tokens, memory_fraction=memory_fraction,
                      trust_remote_code=trust_remote_code)
    engines = Registry()  # this command's own: it hosts the one engine for the one shard
    try:
        engine, _ = load_engine(job.model, spec)
    except Exception as exc:  # UnsupportedModel: refused, never half-loaded: no retry can help
        return _failed(job, exc, deliveries, attempts, engines)
    engines.register(engine, job.model)
    try:
        console.print(f"embedding shard {job.shard.index} of {job.n_shards} ({job.shard.n_rows:,} rows) with "
                      f"{engine.info.name} on {engine.backend.device} in {engine.backend.dtype}")
        # no storage roots: the shard comes from this command's own arguments, not from a broker
        return ShardReport.model_validate(run_shard(job.model_dump(mode="json"), deliveries=deliveries,
                                                    engines=engines, roots=None))
    except Exception as exc:
        return _failed(job, exc, deliveries, attempts, engines)
    finally:
        engine.stop()


def _failed(job: ShardJob, exc: Exception, attempt: int, attempts: int, engines: Any) -> ShardReport:
    """The shard parked with the reason when no retry can fix ``exc`` or none follows this attempt;
    else ``exc`` raised again, for AWS Batch's retry (``shard_command`` exits ``EXIT_RETRY``)."""
    from worker.hosting.tasks import is_permanent, park

    reason = f"{type(exc).__name__}: {exc}"
    if not is_permanent(exc):
        if attempt < attempts:
            raise exc
        reason = f"failed on attempt {attempt} of {attempts} (the last); last: {reason}"
    return ShardReport.model_validate(park(job, reason, attempt, engines))


def _attempt() -> int:
    """Which attempt this is (AWS Batch counts from 1); recorded as the shard's deliveries."""
    raw = env(ATTEMPT_ENV) or "1"
    return int(raw) if raw.isdigit() and int(raw) > 0 else 1


def _on_sigterm(signum: int, frame: Optional[FrameType]) -> None:
    raise ShardStopped(EXIT_SIGTERM)


@app.command("shard")
def shard_command(
    job_manifest: Annotated[str, typer.Option(
        "--job-manifest", envvar=envvar("job_manifest"),
        help="The job's _job.json (or its folder), local or s3://, from `embedfleet plan`")],
    index: Annotated[Optional[int], typer.Option(
        "--index", envvar=ARRAY_INDEX_ENV, min=0, show_envvar=True,
        help="Which shard (0-based); default: the AWS Batch array index")] = None,
    index_offset: Annotated[int, typer.Option(
        "--index-offset", envvar=envvar("index_offset"), min=0,
        help="Added to the index: lets several arrays of <= 10,000 cover one job")] = 0,
    backend: Backend = DEFAULT_BACKEND,
    device: Device = "auto",
    dtype: Dtype = DEFAULT_DTYPE,
    max_batch_tokens: MaxBatchTokens = None,
    memory_fraction: MemoryFraction = None,
    attempts: Annotated[int, typer.Option(
        "--attempts", envvar=envvar("shard_attempts"), min=1,
        help="The attempts AWS Batch gives a child (its job definition's; it retries exit 75): a transient "
             "failure on the last one is recorded in the shard's marker")] = 1,
    trust_remote_code: TrustRemoteCode = DEFAULT_TRUST_REMOTE_CODE,
    verbose: Verbose = False,
) -> None:
    """Process exactly one shard of a planned job and publish it atomically (no broker).

    An AWS Batch array job of size K runs this in K children; together they embed a corpus of
    K shards. Exit 0 when the shard is done (now or before), 1 when it failed (bad data, or a model
    that cannot be served faithfully, fails it at once, with the reason in its marker: the job ends
    without it, as in a fleet; so does any failure on the last attempt), 75 when a transient failure
    leaves attempts for a retry (nothing written), 2 on bad arguments, 143 when stopped by SIGTERM
    (nothing partial is left behind).
    """
    setup_logging(verbose)
    if index is None:
        raise fail(f"--index: not given and {ARRAY_INDEX_ENV} is not set; give the shard number (0-based)")
    index += index_offset
    try:
        spec = load_spec(job_manifest)
        job = shard_job(spec, index)
    except EmbedfleetError as exc:
        raise fail(exc) from None
    done = storage.read_marker(spec.out, index)
    if done is not None:
        finalize_if_needed(spec)
        console.print(f"shard {index} of job {spec.job_id} is already done ({done.rows_written:,} rows); nothing rewritten")
        raise typer.Exit(0 if done.status == "done" else 1)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    attempt = _attempt()
    try:
        report = run_one_shard(job, backend, device, dtype, max_batch_tokens, memory_fraction,
                               deliveries=attempt, trust_remote_code=trust_remote_code, attempts=attempts)
        finalize_if_needed(spec)
    except ShardStopped:
        console.print(f"[yellow]stopped by SIGTERM[/]: shard {index} left unpublished; a retry redoes it")
        sys.stdout.flush()
        raise typer.Exit(EXIT_SIGTERM) from None
    except Exception as exc:  # transient, with attempts left (run_one_shard parks the rest)
        log.warning("shard %d: attempt %d of %d failed", index, attempt, attempts,
                    exc_info=not isinstance(exc, EmbedfleetError))  # a bug keeps its traceback
        console.print(f"[yellow]shard {index}: attempt {attempt} of {attempts} failed[/]: {type(exc).__name__}: "
                      f"{exc}; nothing written, exit {EXIT_RETRY} for a retry")
        raise typer.Exit(EXIT_RETRY) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if report.status != "done":
        console.print(f"[bold red]shard {index} failed[/]: {report.failure}")
        raise typer.Exit(1)
    console.print(f"[green]shard {index} done[/]: {report.rows_written:,} of {report.rows_in:,} rows, "
                  f"{len(report.errors)} rejected -> {spec.out}/{report.path}")
    raise typer.Exit(0)


__all__ = ["shard_command", "job_folder", "load_spec", "shard_job", "EXIT_RETRY", "EXIT_SIGTERM"]
