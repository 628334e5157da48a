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
from rich.table import Table

from producer import capacity, sources, storage
from producer.broker import find_job_out
from producer.broker import remember_job as broker_remember_job
from producer.client import DEFAULT_SHARD_ROWS, Client, JobHandle, plan_corpus
from producer.client import Progress as JobProgress
from producer.errors import BadInput, EmbedfleetError, JobFailed, JobNotFound, StorageError
from producer.jobs import DEFAULT_MODEL, JOB_FILE, JobKind, JobManifest, JobSpec, Options
from producer.options import (
    Broker,
    Dimensions,
    DocumentColumn,
    IdColumn,
    ImageColumn,
    Kind,
    Model,
    Normalize,
    OptionalBroker,
    OutputDtype,
    Outputs,
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
    prompt: Optional[str], output_dtype: str, outputs: Optional[str] = None,
) -> Options:
    """Options from CLI flags; a bad combination is reported as a CLI error by the caller."""
    return Options(normalize=normalize, truncate=truncate, dimensions=dimensions, prompt_name=prompt_name,
                   prompt=prompt, output_dtype=output_dtype, outputs=outputs or None)  # type: ignore[arg-type]


def follow(handle: JobHandle, poll: float = 0.25, started: float | None = None,
           timeout: float | None = None) -> tuple[JobManifest, float]:
    """Show a progress bar until the job's manifest is written; returns it and the wall time.

    The bar counts rows (each once, rejected or not), the rows a rerun skips included; the rate
    is the rows this run processed over the time since ``started`` (the submission, when the
    caller says so)."""
    started = time.monotonic() if started is None else started
    if handle.skipped_rows:
        console.print(f"{handle.skipped_rows:,} of {handle.n_rows:,} rows skipped: their parts were done by an "
                      "earlier run")
    columns = (TextField("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextField("{task.fields[rate]} texts/s"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(f"job {handle.job_id}", total=handle.n_rows, rate="-",
                            completed=handle.skipped_rows)

        def update(progress: JobProgress) -> None:
            elapsed = max(time.monotonic() - started, 1e-6)
            now = max(progress.rows_finished - handle.skipped_rows, 0)
            bar.update(task, completed=min(progress.rows_finished, handle.n_rows), rate=f"{now / elapsed:,.0f}")

        manifest = handle.wait(timeout=timeout, poll=poll, on_progress=update, raise_on_failure=False)
    return manifest, time.monotonic() - started


def summarize(manifest: JobManifest, seconds: float | None, handle: JobHandle | None = None) -> None:
    """The completion line; with the run's handle and wall time, the rate of the rows (and tokens)
    this run processed over that time (rows an earlier run finished are not counted)."""
    rate = ""
    if seconds and handle is not None:
        rows = manifest.n_rows - handle.skipped_rows
        tokens = max(manifest.n_tokens - handle.skipped_tokens, 0)
        if rows > 0:
            digits = 1 if seconds >= 10 else 3  # a job's exact time (run), not a poll's
            rate = (f" in {seconds:,.{digits}f} s: {rows / seconds:,.0f} texts/s, {tokens / seconds:,.0f} tokens/s"
                    + (f" over the {rows:,} rows this run did" if handle.skipped_rows else ""))
        else:
            rate = " (nothing left to do: every part was done by an earlier run)"
    console.print(f"[green]{manifest.status}[/]: {manifest.rows_written:,} of {manifest.n_rows:,} rows written to "
                  f"{manifest.out} in {len(manifest.parts)} part(s){rate}")
    if manifest.errors:
        console.print(f"[yellow]{len(manifest.errors)} row(s) rejected[/] (reasons in {manifest.out}/_manifest.json; "
                      "rows are counted from 0):")
        for error in manifest.errors[:5]:
            console.print(f"  row {error.row} (id={error.id!r}): {error.reason}")
    for shard in manifest.failed_shards:
        console.print(f"[red]shard {shard.index} failed[/]: {shard.failure}")


def say_id_column(input: str, id_column: str | None) -> str | None:
    """The id column a job uses (the input's ``id`` when none is named), said on the console."""
    if id_column is not None:
        return id_column
    chosen = sources.default_id_column(input, sources.detect_format(input))
    if chosen:
        console.print(f"ids: the input's {chosen!r} column (--id-column NAME to use another)")
    else:
        console.print("ids: row numbers, counted from 0 (the input has no 'id' column; --id-column NAME to use one)")
    return chosen


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
    outputs: Outputs = None,
    image_column: ImageColumn = None,
) -> None:
    """Submit a corpus as a bulk job to a fleet; prints the job id last."""
    try:
        id_column = say_id_column(input, id_column)
        options = Options(outputs=outputs or None)  # type: ignore[arg-type]
    except (EmbedfleetError, ValidationError) as exc:
        raise fail(exc) from None
    try:
        client = Client(broker=broker, result_backend=result_backend)
        handle = client.submit_corpus(input, out, model=model, kind=kind, text_column=text_column,
                                      id_column=id_column, query_column=query_column, document_column=document_column,
                                      shard_rows=shard_rows, options=options, image_column=image_column)
        remember_job(client, handle)
    except (EmbedfleetError, ValidationError) as exc:  # one line, exit 2: never a traceback for a bad argument
        raise fail(exc) from None
    except OSError as exc:  # the output cannot be written (permissions, a full disk)
        raise fail(StorageError(f"cannot write the job to {out}: {exc}"), code=2) from None
    console.print(f"job {handle.job_id}: {handle.n_rows:,} rows in {handle.n_shards} shard(s), "
                  f"{handle.enqueued} enqueued, output in {out}")
    typer.echo(handle.job_id)


@app.command()
def resume(
    out: str = typer.Argument(..., help="The job's output folder or s3:// prefix (it holds _job.json)"),
    broker: Broker = ...,  # type: ignore[assignment]
    result_backend: ResultBackend = None,
) -> None:
    """Send again a job's shards that have no done-marker (after a broker lost its messages)."""
    try:
        client = Client(broker=broker, result_backend=result_backend)
        handle = client.resume(out)
        remember_job(client, handle)
    except (EmbedfleetError, ValidationError) as exc:
        raise fail(exc) from None
    console.print(f"job {handle.job_id}: {handle.n_shards - handle.enqueued} of {handle.n_shards} shard(s) done, "
                  f"{handle.enqueued} sent again; `embedfleet status {handle.out} --wait` follows it")
    typer.echo(handle.job_id)


def remember_job(client: Client, handle: JobHandle) -> None:
    """Map the job id to its output folder in the result backend, so `status JOB` can find it."""
    broker_remember_job(client.app, handle.job_id, handle.out)


def find_job(job: str, broker: Optional[str], result_backend: Optional[str]) -> JobHandle:
    """A handle from an output folder/URI, or from a job id looked up in the result backend."""
    looks_like_id = len(job) == 16 and all(c in "0123456789abcdef" for c in job)
    if looks_like_id and broker:
        client = Client(broker=broker, result_backend=result_backend)
        out = find_job_out(client.app, job)
        if out is None:
            raise JobNotFound(f"job {job} is not known to the result backend of {broker.split('@')[-1]} "
                              "(job records expire after EMBEDFLEET_JOB_TTL; give the output folder instead)")
        job = out
    try:
        return JobHandle.open(job, broker=broker)
    except FileNotFoundError:
        raise JobNotFound(f"no embedfleet job at {job!r}: it holds no _job.json") from None


@app.command()
def status(
    job: str = typer.Argument(..., help="The job id printed by submit, or the job's output folder/URI"),
    broker: OptionalBroker = None,
    result_backend: ResultBackend = None,
    wait: bool = typer.Option(False, "--wait", help="Follow the job with a progress bar until it finishes"),
    timeout: Optional[float] = typer.Option(None, "--timeout", min=0.0,
                                            help="With --wait: give up after this many seconds (exit 3)"),
) -> None:
    """Show a job's progress; exit 0 when complete, 1 when it failed, 3 while it runs."""
    try:
        handle = find_job(job, broker, result_backend)
    except EmbedfleetError as exc:
        raise fail(exc) from None
    if wait:
        try:
            manifest, _ = follow(handle, timeout=timeout)
        except EmbedfleetError as exc:  # e.g. an unwritable output: the storage error, in one line
            raise fail(exc) from None
        except TimeoutError:
            p = handle.progress()
            raise fail(f"job {handle.job_id} not finished after {timeout:g} s: {p.shards_done}/{p.n_shards} shards "
                       f"done; `embedfleet status {handle.out} --wait` follows it again", code=3) from None
    else:
        manifest = handle.manifest()
        if manifest is None:
            p = handle.progress()
            if p.finished:
                try:
                    handle.wait(timeout=0)
                except EmbedfleetError as exc:  # the output is unwritable: the storage error, once
                    raise fail(exc) from None
            console.print(f"job {handle.job_id}: {p.shards_done}/{p.n_shards} shards done, {p.rows_done:,} rows")
            raise typer.Exit(3)
    summarize(manifest, None)
    raise typer.Exit(0 if manifest.status == "complete" else 1)


#: rows of the first shard read to estimate the corpus's tokens per row
SAMPLE_ROWS = 2000


def sample_tokens(spec: JobSpec) -> float:
    """Mean estimated tokens per row, from the first rows of the first shard (a pair counts both texts)."""
    first = spec.shards[0]
    sample = first.model_copy(update={"row_stop": min(first.row_stop, first.row_start + SAMPLE_ROWS)})
    rows = sources.read_shard(sample, spec.kind, spec.columns)
    texts = [" ".join(v) if isinstance(v, (list, tuple)) else str(v) for v in rows.values]
    return capacity.estimate_tokens(texts)


def print_capacity(spec: JobSpec, deadline_hours: float, override: float | None, prices: dict[str, float]) -> None:
    """The capacity table: per instance type, what finishing within the deadline takes and costs."""
    if not spec.shards:
        return
    per_row = sample_tokens(spec)
    total = per_row * spec.n_rows
    cls = capacity.model_class(spec.model, DEFAULT_MODEL)
    rows = capacity.plan(total, len(spec.shards), deadline_hours, cls, override, prices)
    table = Table(title=f"capacity plan: ~{total:,.0f} tokens (~{per_row:,.0f} per row, estimated from a sample), "
                  f"done within {deadline_hours:g} h", title_justify="left")
    for column in ("instance type", "devices", "tokens/s per device", "instances", "wall h", "instance-hours",
                   "USD", "shard msg/s", "s per shard"):
        table.add_column(column, justify="left" if column == "instance type" else "right")
    for row in rows:
        table.add_row(row.instance.name, f"{row.instance.devices} x {row.instance.device}",
                      f"{row.device_tokens_per_s:,.0f}", str(row.instances), f"{row.wall_hours:.3g}",
                      f"{row.instance_hours:.3g}", f"{row.dollars:,.2f}", f"{row.shards_per_s:.2f}",
                      f"{row.shard_seconds:.1f}")
    console.print(table)
    for row in rows:
        if row.how != "measured":
            console.print(f"  {row.instance.name}: {row.how}")
    console.print(f"  rates: {capacity.H200_MEASURED[cls].source}; model class '{cls}' for {spec.model!r} "
                  "(an unknown model plans at the BERT-large rate); USD = instance-hours x on-demand price")
    busiest = max(rows, key=lambda r: r.shards_per_s)
    console.print(f"  broker: at most {busiest.shards_per_s:.1f} shard messages/s ({busiest.instance.name}), against "
                  f"a ceiling of {capacity.REDIS_CEILING_MSG_S:,} msg/s for Redis and "
                  f"{capacity.SQS_CEILING_MSG_S:,} for one SQS client (moto), the lower of publish and drain "
                  "measured by bench/broker_ceiling.py (bench/RESULTS.md, \"Every device of a host\")")
    short = [r for r in rows if r.shard_seconds < capacity.MIN_SHARD_SECONDS]
    if short:
        worst = max(short, key=lambda r: r.device_tokens_per_s)
        console.print(f"  [yellow]note[/]: shards of {worst.shard_seconds:.1f} s on a {worst.instance.device}; "
                      f"--shard-rows {capacity.min_shard_rows(worst.device_tokens_per_s, per_row):,} keeps each "
                      f">= {capacity.MIN_SHARD_SECONDS:g} s, so per-shard costs and the broker stay negligible")


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
    outputs: Outputs = None,
    image_column: ImageColumn = None,
    deadline_hours: float = typer.Option(1.0, "--deadline-hours", min=0.01,
                                         help="Capacity plan: the wall-clock hours the job should take"),
    device_tokens_per_s: Optional[float] = typer.Option(
        None, "--device-tokens-per-s", min=1.0,
        help="Capacity plan: your own measured tokens/s per device (embedfleet run prints it), instead of the "
        "H200 figure and its scaled estimates"),
    price: list[str] = typer.Option([], "--price", help="Capacity plan: TYPE=USD per hour, e.g. g6.xlarge=0.70 "
                                    "(repeatable; default: recorded on-demand prices)"),
) -> None:
    """Check a corpus, split it into shards and write {out}/_job.json, with no broker.

    Prints a capacity plan (instances, hours and dollars per instance type, and the broker load),
    then one JSON line: the job manifest URI and the array size to submit to AWS Batch
    (``embedfleet shard`` then runs each child).
    """
    try:
        options = build_options(normalize, truncate, dimensions, prompt_name, prompt, output_dtype, outputs)
        spec = plan_corpus(input, out, model=model, kind=kind, text_column=text_column, id_column=id_column,
                           query_column=query_column, document_column=document_column, shard_rows=shard_rows,
                           options=options, image_column=image_column)
    except (EmbedfleetError, ValidationError) as exc:
        raise fail(exc) from None
    try:
        prices = capacity.parse_prices(price)
        print_capacity(spec, deadline_hours, device_tokens_per_s, prices)
    except EmbedfleetError as exc:
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
