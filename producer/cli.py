"""The producer half of the ``embedfleet`` command: ``submit``, ``status`` and ``plan``.

These need no model and no worker code; ``worker.cli`` adds ``run``, ``worker``, ``serve`` and
``shard`` to the same Typer app (the dependency arrow points from worker to producer, never
back). Every command turns errors into one line and an exit code in one place (``fail``).
"""

from __future__ import annotations

import json
import time
from typing import Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.progress import TextColumn as TextField

from producer import storage
from producer.client import DEFAULT_SHARD_ROWS, Client, JobHandle, plan_corpus
from producer.client import Progress as JobProgress
from producer.errors import BadInput, EmbedfleetError, JobFailed, JobNotFound
from producer.jobs import DEFAULT_MODEL, JOB_FILE, JobKind, JobManifest, Options
from producer.options import (
    Broker,
    Dimensions,
    DocumentColumn,
    IdColumn,
    Kind,
    Model,
    Normalize,
    OptionalBroker,
    OutputDtype,
    Prompt,
    PromptName,
    QueryColumn,
    ResultBackend,
    ShardRows,
    TextColumn,
    Truncate,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Queue-driven batch embedding: embed, rerank, classify.")
console = Console(stderr=True)

#: AWS Batch caps an array job at this many children (and needs at least 2).
BATCH_MAX_ARRAY_SIZE = 10_000

#: Exit codes by error class, most specific first: a finished job with failed shards is 1,
#: anything refused before work started (bad input, nothing found, nothing available) is 2.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = ((JobFailed, 1), (EmbedfleetError, 2))


def exit_code(error: BaseException) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(error, cls):
            return code
    return 1


def fail(error: BaseException | str, code: int | None = None) -> "typer.Exit":
    """Print one line for ``error`` and return the ``typer.Exit`` to raise (its code by class)."""
    if isinstance(error, ValidationError):
        error = BadInput(validation_message(error))
    message = str(error)
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code if code is not None else (exit_code(error) if isinstance(error, BaseException) else 2))


def validation_message(exc: ValidationError) -> str:
    """pydantic's errors as ``field: why`` lines joined (options, messages)."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ())) or "options"
        parts.append(f"{where}: {error.get('msg')}")
    return "; ".join(parts)


def build_options(
    normalize: Optional[bool], truncate: bool, dimensions: Optional[int], prompt_name: Optional[str],
    prompt: Optional[str], output_dtype: str,
) -> Options:
    """Options from CLI flags; a bad combination is reported as a CLI error by the caller."""
    return Options(normalize=normalize, truncate=truncate, dimensions=dimensions, prompt_name=prompt_name,
                   prompt=prompt, output_dtype=output_dtype)  # type: ignore[arg-type]


def follow(handle: JobHandle, poll: float = 0.25) -> tuple[JobManifest, float]:
    """Show a progress bar (rows and texts/s) until the job's manifest is written."""
    started = time.monotonic()
    columns = (TextField("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextField("{task.fields[rate]} texts/s"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(f"job {handle.job_id}", total=handle.n_rows, rate="-")

        def update(progress: JobProgress) -> None:
            elapsed = max(time.monotonic() - started, 1e-6)
            bar.update(task, completed=progress.rows_done + progress.rows_failed,
                       rate=f"{progress.rows_done / elapsed:,.0f}")

        manifest = handle.wait(poll=poll, on_progress=update, raise_on_failure=False)
    return manifest, time.monotonic() - started


def summarize(manifest: JobManifest, seconds: float | None) -> None:
    rate = f", {manifest.rows_written / seconds:,.0f} texts/s, {manifest.n_tokens / seconds:,.0f} tokens/s" if seconds else ""
    console.print(f"[green]{manifest.status}[/]: {manifest.rows_written:,} of {manifest.n_rows:,} rows written to "
                  f"{manifest.out} in {len(manifest.parts)} part(s){rate}")
    if manifest.errors:
        console.print(f"[yellow]{len(manifest.errors)} row(s) rejected[/] (reasons in {manifest.out}/_manifest.json):")
        for error in manifest.errors[:5]:
            console.print(f"  row {error.row} (id={error.id!r}): {error.reason}")
    for shard in manifest.failed_shards:
        console.print(f"[red]shard {shard.index} failed[/]: {shard.failure}")


@app.command()
def submit(
    input: str = typer.Argument(..., help="Corpus: Parquet, JSONL, CSV or text (one per line); local or s3://"),
    out: str = typer.Option(..., "--out", help="Output folder or s3:// prefix for this job"),
    broker: Broker = ...,  # type: ignore[assignment]
    result_backend: ResultBackend = None,
    model: Model = DEFAULT_MODEL,
    kind: Kind = JobKind.embed,
    text_column: TextColumn = "text",
    id_column: IdColumn = None,
    query_column: QueryColumn = "query",
    document_column: DocumentColumn = "document",
    shard_rows: ShardRows = DEFAULT_SHARD_ROWS,
) -> None:
    """Submit a corpus as a bulk job to a fleet; prints the job id last."""
    client = Client(broker=broker, result_backend=result_backend)
    handle = client.submit_corpus(input, out, model=model, kind=kind, text_column=text_column, id_column=id_column,
                                  query_column=query_column, document_column=document_column, shard_rows=shard_rows)
    remember_job(client, handle)
    console.print(f"job {handle.job_id}: {handle.n_rows:,} rows in {handle.n_shards} shard(s), "
                  f"{handle.enqueued} enqueued, output in {out}")
    typer.echo(handle.job_id)


def _job_key(job_id: str) -> str:
    return f"embedfleet-job-{job_id}"


def remember_job(client: Client, handle: JobHandle) -> None:
    """Map the job id to its output folder in the result backend, so `status JOB` can find it."""
    client.app.backend.set(_job_key(handle.job_id), handle.out)


def find_job(job: str, broker: Optional[str], result_backend: Optional[str]) -> JobHandle:
    """A handle from an output folder/URI, or from a job id looked up in the result backend."""
    looks_like_id = len(job) == 16 and all(c in "0123456789abcdef" for c in job)
    if looks_like_id and broker:
        client = Client(broker=broker, result_backend=result_backend)
        out = client.app.backend.get(_job_key(job))
        if out is None:
            raise JobNotFound(f"job {job} is not known to the result backend of {broker.split('@')[-1]}")
        job = out.decode() if isinstance(out, bytes) else str(out)
    try:
        return JobHandle.open(job)
    except FileNotFoundError:
        raise JobNotFound(f"no embedfleet job at {job!r}: it holds no _job.json") from None


@app.command()
def status(
    job: str = typer.Argument(..., help="The job id printed by submit, or the job's output folder/URI"),
    broker: OptionalBroker = None,
    result_backend: ResultBackend = None,
    wait: bool = typer.Option(False, "--wait", help="Follow the job with a progress bar until it finishes"),
) -> None:
    """Show a job's progress; exit 0 when complete, 1 when it failed, 3 while it runs."""
    try:
        handle = find_job(job, broker, result_backend)
    except EmbedfleetError as exc:
        raise fail(exc) from None
    if wait:
        manifest, _ = follow(handle)
    else:
        manifest = handle.manifest()
        if manifest is None:
            p = handle.progress()
            console.print(f"job {handle.job_id}: {p.shards_done}/{p.n_shards} shards done, {p.rows_done:,} rows")
            raise typer.Exit(3)
    summarize(manifest, None)
    raise typer.Exit(0 if manifest.status == "complete" else 1)


@app.command("plan")
def plan_command(
    input: str = typer.Argument(..., help="Corpus: Parquet, JSONL, CSV or text (one per line); local or s3://"),
    out: str = typer.Option(..., "--out", help="Output folder or s3:// prefix; _job.json is written there"),
    model: Model = DEFAULT_MODEL,
    kind: Kind = JobKind.embed,
    text_column: TextColumn = "text",
    id_column: IdColumn = None,
    query_column: QueryColumn = "query",
    document_column: DocumentColumn = "document",
    shard_rows: ShardRows = DEFAULT_SHARD_ROWS,
    normalize: Normalize = None,
    truncate: Truncate = True,
    dimensions: Dimensions = None,
    prompt_name: PromptName = None,
    prompt: Prompt = None,
    output_dtype: OutputDtype = "float32",
) -> None:
    """Check a corpus, split it into shards and write {out}/_job.json, with no broker.

    Prints one JSON line: the job manifest URI and the array size to submit to AWS Batch
    (``embedfleet shard`` then runs each child).
    """
    try:
        options = build_options(normalize, truncate, dimensions, prompt_name, prompt, output_dtype)
        spec = plan_corpus(input, out, model=model, kind=kind, text_column=text_column, id_column=id_column,
                           query_column=query_column, document_column=document_column, shard_rows=shard_rows,
                           options=options)
    except (EmbedfleetError, ValidationError) as exc:
        raise fail(exc) from None
    k = len(spec.shards)
    manifest = storage.locate(spec.out).child(JOB_FILE).uri
    console.print(f"job {spec.job_id}: {spec.n_rows:,} rows in {k} shard(s) -> {manifest}")
    if k > BATCH_MAX_ARRAY_SIZE:
        console.print(f"[yellow]note[/]: {k} shards exceed AWS Batch's array limit of {BATCH_MAX_ARRAY_SIZE}; "
                      "raise --shard-rows, or submit several arrays with `shard --index-offset`")
    elif k == 1:
        console.print("[yellow]note[/]: one shard; AWS Batch arrays need size >= 2, so submit a plain job with --index 0")
    typer.echo(json.dumps({"job_id": spec.job_id, "job_manifest": manifest, "array_size": k, "n_rows": spec.n_rows}))
