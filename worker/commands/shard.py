"""Array-job mode with no broker: ``embedfleet plan`` once, then ``embedfleet shard`` K times.

AWS Batch array jobs give every child the same command and a different
``AWS_BATCH_JOB_ARRAY_INDEX``; the job manifest (``{out}/_job.json``, written by ``plan``) says
what shard N is. Each child processes exactly its shard through the same ``run_shard`` a queue
worker runs, so outputs, done-markers and the final ``_manifest.json`` are identical to a fleet's:

* outputs are published atomically under deterministic names, so a Spot-reclaimed child that is
  retried writes the same part again, and a child whose shard already has a done-marker loads no
  model and rewrites nothing;
* whichever child finds every marker present writes the job manifest; a re-run child also
  writes it if an earlier child died between its marker and the manifest.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from types import FrameType
from typing import Optional

import typer

from producer import storage
from producer.cli import app, build_options, console, fail
from producer.client import DEFAULT_MODEL, DEFAULT_SHARD_ROWS, plan_corpus
from producer.jobs import JOB_FILE, JobKind, JobSpec, ShardJob, ShardReport
from producer.sources import SourceError

#: AWS Batch caps an array job at this many children (and needs at least 2).
BATCH_MAX_ARRAY_SIZE = 10_000
ARRAY_INDEX_ENV = "AWS_BATCH_JOB_ARRAY_INDEX"
ATTEMPT_ENV = "AWS_BATCH_JOB_ATTEMPT"
#: The conventional exit status of a process stopped by SIGTERM (128 + 15).
EXIT_SIGTERM = 143

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
        raise FileNotFoundError(
            f"--job-manifest: no {JOB_FILE} at {folder}; create one with `embedfleet plan INPUT --out {folder}`"
        )
    spec = storage.read_job(folder)
    if storage.locate(spec.out).uri != storage.locate(folder).uri:
        raise ValueError(
            f"--job-manifest: {folder}/{JOB_FILE} belongs to output folder {spec.out}; "
            "pass the manifest inside that folder"
        )
    return spec


def shard_job(spec: JobSpec, index: int) -> ShardJob:
    """The message a queue worker would get for shard ``index`` of ``spec``."""
    n_shards = len(spec.shards)
    if not 0 <= index < n_shards:
        raise ValueError(
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
                  deliveries: int) -> ShardReport:
    """Load the model, run the shard through the queue workers' own task, stop the engine."""
    from worker.hosting import registry as runtime
    from worker.hosting.host import WorkerSpec, load_engine
    from worker.hosting.tasks import run_shard

    spec = WorkerSpec(models=[job.model], device=device, backend=backend, dtype=dtype, concurrency=1,
                      max_batch_tokens=max_batch_tokens)
    engine = load_engine(job.model, spec)
    try:
        console.print(f"embedding shard {job.shard.index} of {job.n_shards} ({job.shard.n_rows:,} rows) with "
                      f"{engine.info.name} on {engine.backend.device} in {engine.backend.dtype}")
        return ShardReport.model_validate(run_shard(job.model_dump(mode="json"), deliveries=deliveries))
    finally:
        for hosted in runtime.unregister_all():
            hosted.stop()


def _attempt() -> int:
    """Which attempt this is (AWS Batch counts from 1); recorded as the shard's deliveries."""
    raw = os.environ.get(ATTEMPT_ENV, "1")
    return int(raw) if raw.isdigit() and int(raw) > 0 else 1


def _on_sigterm(signum: int, frame: Optional[FrameType]) -> None:
    raise ShardStopped(EXIT_SIGTERM)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


@app.command("shard")
def shard_command(
    job_manifest: str = typer.Option(..., "--job-manifest", envvar="EMBEDFLEET_JOB_MANIFEST",
                                     help="The job's _job.json (or its folder), local or s3://, from `embedfleet plan`"),
    index: Optional[int] = typer.Option(None, "--index", envvar=ARRAY_INDEX_ENV, min=0, show_envvar=True,
                                        help="Which shard (0-based); default: the AWS Batch array index"),
    index_offset: int = typer.Option(0, "--index-offset", envvar="EMBEDFLEET_INDEX_OFFSET", min=0,
                                     help="Added to the index: lets several arrays of <= 10,000 cover one job"),
    backend: str = typer.Option("auto", "--backend", envvar="EMBEDFLEET_BACKEND", help="auto|torch|onnx|neuron (auto: measured at start on CPU, torch on GPUs)"),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda|neuron[:core]"),
    dtype: str = typer.Option("auto", "--dtype", envvar="EMBEDFLEET_DTYPE", help="auto|float32|bfloat16|float16|int8 (int8: onnx only)"),
    max_batch_tokens: Optional[int] = typer.Option(None, "--max-batch-tokens", min=1),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Process exactly one shard of a planned job and publish it atomically (no broker).

    An AWS Batch array job of size K runs this in K children; together they embed a corpus of
    K shards. Exit 0 when the shard is done (now or before), 1 when it failed, 2 on bad input,
    143 when stopped by SIGTERM (nothing partial is left behind).
    """
    _setup_logging(verbose)
    if index is None:
        raise fail(f"--index: not given and {ARRAY_INDEX_ENV} is not set; give the shard number (0-based)")
    index += index_offset
    try:
        spec = load_spec(job_manifest)
        job = shard_job(spec, index)
    except (FileNotFoundError, ValueError, SourceError) as exc:
        raise fail(str(exc)) from None
    done = storage.read_marker(spec.out, index)
    if done is not None:
        finalize_if_needed(spec)
        console.print(f"shard {index} of job {spec.job_id} is already done ({done.rows_written:,} rows); nothing rewritten")
        raise typer.Exit(0 if done.status == "done" else 1)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        report = run_one_shard(job, backend, device, dtype, max_batch_tokens, deliveries=_attempt())
        finalize_if_needed(spec)
    except ShardStopped:
        console.print(f"[yellow]stopped by SIGTERM[/]: shard {index} left unpublished; a retry redoes it")
        sys.stdout.flush()
        raise typer.Exit(EXIT_SIGTERM) from None
    except Exception as exc:  # noqa: BLE001 - one line for the operator, the traceback with -v
        from worker.backends import BackendUnavailable
        from worker.models.resolve import ModelNotFound

        if isinstance(exc, (BackendUnavailable, ModelNotFound, SourceError, ValueError)):
            raise fail(str(exc)) from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    console.print(f"[green]shard {index} done[/]: {report.rows_written:,} of {report.rows_in:,} rows, "
                  f"{len(report.errors)} rejected -> {spec.out}/{report.path}")
    raise typer.Exit(0 if report.status == "done" else 1)


@app.command("plan")
def plan_command(
    input: str = typer.Argument(..., help="Corpus: Parquet, JSONL, CSV or text (one per line); local or s3://"),
    out: str = typer.Option(..., "--out", help="Output folder or s3:// prefix; _job.json is written there"),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="The model every shard uses (hub id, path, or the default)"),
    kind: JobKind = typer.Option(JobKind.embed, "--kind"),
    text_column: str = typer.Option("text", "--text-column"),
    id_column: Optional[str] = typer.Option(None, "--id-column"),
    query_column: str = typer.Option("query", "--query-column"),
    document_column: str = typer.Option("document", "--document-column"),
    shard_rows: int = typer.Option(DEFAULT_SHARD_ROWS, "--shard-rows", min=1, help="Rows per shard (one array child each)"),
    normalize: Optional[bool] = typer.Option(None, "--normalize/--no-normalize"),
    truncate: bool = typer.Option(True, "--truncate/--no-truncate"),
    dimensions: Optional[int] = typer.Option(None, "--dimensions", min=1),
    prompt_name: Optional[str] = typer.Option(None, "--prompt-name"),
    prompt: Optional[str] = typer.Option(None, "--prompt"),
    output_dtype: str = typer.Option("float32", "--output-dtype"),
) -> None:
    """Check a corpus, split it into shards and write {out}/_job.json, with no broker.

    Prints one JSON line: the job manifest URI and the array size to submit to AWS Batch.
    """
    try:
        options = build_options(normalize, truncate, dimensions, prompt_name, prompt, output_dtype)
        spec = plan_corpus(input, out, model=model, kind=kind, text_column=text_column, id_column=id_column,
                           query_column=query_column, document_column=document_column, shard_rows=shard_rows,
                           options=options)
    except (SourceError, FileExistsError, ValueError) as exc:
        raise fail(str(exc)) from None
    k = len(spec.shards)
    manifest = storage.locate(spec.out).child(JOB_FILE).uri
    console.print(f"job {spec.job_id}: {spec.n_rows:,} rows in {k} shard(s) -> {manifest}")
    if k > BATCH_MAX_ARRAY_SIZE:
        console.print(f"[yellow]note[/]: {k} shards exceed AWS Batch's array limit of {BATCH_MAX_ARRAY_SIZE}; "
                      "raise --shard-rows, or submit several arrays with `shard --index-offset`")
    elif k == 1:
        console.print("[yellow]note[/]: one shard; AWS Batch arrays need size >= 2, so submit a plain job with --index 0")
    typer.echo(json.dumps({"job_id": spec.job_id, "job_manifest": manifest, "array_size": k, "n_rows": spec.n_rows}))


__all__ = ["shard_command", "plan_command", "job_folder", "load_spec", "shard_job", "EXIT_SIGTERM"]
