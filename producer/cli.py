"""The producer half of the ``embedfleet`` command: ``submit`` and ``status``.

These need no model and no worker code; ``worker.cli`` adds ``run``, ``worker`` and ``serve`` to
the same Typer app (the dependency arrow points from worker to producer, never back).
"""

from __future__ import annotations

import time
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from producer.client import DEFAULT_MODEL, DEFAULT_SHARD_ROWS, Client, JobHandle
from producer.client import Progress as JobProgress
from producer.jobs import JobKind, JobManifest, Options

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Queue-driven batch embedding: embed, rerank, classify.")
console = Console(stderr=True)


def fail(message: str, code: int = 2) -> "typer.Exit":
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


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
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} texts/s"), TimeElapsedColumn())
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
    broker: str = typer.Option(..., "--broker", envvar="EMBEDFLEET_BROKER", help="redis://... or sqs://..."),
    result_backend: Optional[str] = typer.Option(None, "--result-backend", envvar="EMBEDFLEET_RESULT_BACKEND"),
    model: str = typer.Option(DEFAULT_MODEL, "--model"),
    kind: JobKind = typer.Option(JobKind.embed, "--kind"),
    text_column: str = typer.Option("text", "--text-column"),
    id_column: Optional[str] = typer.Option(None, "--id-column"),
    query_column: str = typer.Option("query", "--query-column"),
    document_column: str = typer.Option("document", "--document-column"),
    shard_rows: int = typer.Option(DEFAULT_SHARD_ROWS, "--shard-rows", min=1),
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
            raise LookupError(f"job {job} is not known to the result backend of {broker.split('@')[-1]}")
        job = out.decode() if isinstance(out, bytes) else str(out)
    try:
        return JobHandle.open(job)
    except FileNotFoundError:
        raise LookupError(f"no embedfleet job at {job!r}: it holds no _job.json") from None


@app.command()
def status(
    job: str = typer.Argument(..., help="The job id printed by submit, or the job's output folder/URI"),
    broker: Optional[str] = typer.Option(None, "--broker", envvar="EMBEDFLEET_BROKER", help="Needed to look up a job id"),
    result_backend: Optional[str] = typer.Option(None, "--result-backend", envvar="EMBEDFLEET_RESULT_BACKEND"),
    wait: bool = typer.Option(False, "--wait", help="Follow the job with a progress bar until it finishes"),
) -> None:
    """Show a job's progress; exit 0 when complete, 1 when it failed, 3 while it runs."""
    try:
        handle = find_job(job, broker, result_backend)
    except (LookupError, FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from None
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

