"""``embedfleet run``: the embedded default, a whole corpus job on this machine with no broker.

On one device a worker runs in this process on the in-memory transport, fed by the same client
and tasks a fleet uses, so a laptop run and a fleet run differ only in where the queue lives. On
several (every visible GPU by default, or ``--devices``) it runs one engine process per device,
the engines of ``embedfleet worker --devices``, on a private host-local Redis
(``worker.hosting.local_fleet``): the job is then a fleet's job on this host.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import ValidationError
from rich.markup import escape

from producer.cli import app, build_options, console, fail, follow, say_id_column, summarize
from producer.client import Client
from producer.errors import BadInput, EmbedfleetError
from producer.jobs import DEFAULT_MODEL, ClassifyJob, Columns, EmbedJob, JobKind, Options, RerankJob
from producer.logs import setup_logging
from producer.options import (
    Dimensions,
    DocumentColumn,
    IdColumn,
    ImageColumn,
    Model,
    Normalize,
    OutputDtype,
    Outputs,
    Prompt,
    PromptName,
    QueryColumn,
    ShardRows,
    TextColumn,
    Truncate,
    Verbose,
)
from producer.sources import check_columns, detect_format
from worker.commands.options import (
    DEFAULT_BACKEND,
    DEFAULT_DTYPE,
    DEFAULT_TRUST_REMOTE_CODE,
    Backend,
    Device,
    Devices,
    Dtype,
    MaxBatchTokens,
    MemoryFraction,
    TrustRemoteCode,
)
from worker.commands.worker import engine_line
from worker.hosting.devices import DeviceSlot, plan_slots
from worker.hosting.host import InProcessWorker, WorkerSpec
from worker.hosting.local_fleet import LocalFleet, engine_work
from worker.hosting.trust import StorageRoots
from worker.models.resolve import ModelInfo, describe


#: ``run``'s default ``--concurrency`` on one device, the same as ``embedfleet worker``'s. With the
#: read-ahead (as many again) the worker holds 8 shards, so a small job such as the sample corpus
#: (6 shards of 2,048 rows) is read and tokenized at once and the device takes it as one stream of
#: batches. With 2 (4 shards held) its last 2 shards were read only once the first ones had finished
#: and been written: a second wave, started with the device idle (issue 13; bench/run_job.py).
RUN_CONCURRENCY = 4
#: The default for each engine process when ``run`` uses several devices: every engine takes
#: shards from one queue, and one holding 8 could take a small job's every shard while the others
#: wait, so each holds 4 (2 computing, 2 read ahead) as before.
SHARED_RUN_CONCURRENCY = 2


def run_concurrency(engines: int) -> int:
    """``--concurrency``'s default for ``engines`` engine processes (see the two constants)."""
    return RUN_CONCURRENCY if engines == 1 else SHARED_RUN_CONCURRENCY


def run_roots(input: str, out: str, image_column: str | None) -> list[str]:
    """What ``run`` may read and write: its input and output, and with ``--image-column`` the
    input's folder too (image paths in the column are relative to the corpus)."""
    roots = [input, out]
    if image_column and "://" not in input:
        roots.append(str(Path(input).expanduser().resolve().parent))
    return roots


@app.command()
def run(
    input: str = typer.Argument(..., help="Corpus: Parquet, JSONL, CSV or a text file (one text a line)"),
    out: str = typer.Option(..., "--out", help="Output folder: part-NNNNN.parquet files and _manifest.json"),
    model: Model = DEFAULT_MODEL,
    kind: Optional[JobKind] = typer.Option(None, "--kind", help="embed|rerank|classify (default: the model's kind)"),
    text_column: TextColumn = "text",
    id_column: IdColumn = None,
    query_column: QueryColumn = "query",
    document_column: DocumentColumn = "document",
    shard_rows: ShardRows = 2048,
    device: Device = "auto",
    devices: Devices = None,
    backend: Backend = DEFAULT_BACKEND,
    dtype: Dtype = DEFAULT_DTYPE,
    max_batch_tokens: MaxBatchTokens = None,
    memory_fraction: MemoryFraction = None,
    trust_remote_code: TrustRemoteCode = DEFAULT_TRUST_REMOTE_CODE,
    concurrency: Optional[int] = typer.Option(None, "--concurrency", min=1, help=f"Shards computing at once (they share batches; EMBEDFLEET_SHARD_LOOKAHEAD more are read ahead); default {RUN_CONCURRENCY} on one device, {SHARED_RUN_CONCURRENCY} per engine on several"),
    normalize: Normalize = None,
    truncate: Truncate = True,
    dimensions: Dimensions = None,
    prompt_name: PromptName = None,
    prompt: Prompt = None,
    output_dtype: OutputDtype = "float32",
    outputs: Outputs = None,
    image_column: ImageColumn = None,
    verbose: Verbose = False,
) -> None:
    """Embed (or rerank, classify) a corpus into Parquet on this machine, with no broker.

    With several devices (every visible GPU by default, or --devices 0,1 / 0,0 / cpu:N), each runs
    its own engine process taking shards of the job; a dead one is restarted and its shard redone."""
    setup_logging(verbose)
    try:
        options = build_options(normalize, truncate, dimensions, prompt_name, prompt, output_dtype, outputs)
        fmt = detect_format(input)
        slots = plan_slots(devices, device)
        spec = WorkerSpec(models=[model], device=slots[0].device, backend=backend, dtype=dtype,
                          concurrency=concurrency or run_concurrency(len(slots)), max_batch_tokens=max_batch_tokens,
                          memory_fraction=memory_fraction,
                          trust_remote_code=trust_remote_code,
                          storage_roots=StorageRoots.parse(run_roots(input, out, image_column)))
        columns = Columns(text=text_column, id=id_column, query=query_column, document=document_column,
                          image=image_column)
        if len(slots) > 1:
            manifest, seconds, handle = run_on_devices(slots, spec, input, out, fmt, kind, columns, shard_rows,
                                                       options, verbose)
        else:
            manifest, seconds, handle = run_here(spec, input, out, fmt, kind, columns, shard_rows, options)
    except (EmbedfleetError, ValidationError) as exc:
        raise fail(exc) from None
    summarize(manifest, seconds, handle)
    raise typer.Exit(0 if manifest.status == "complete" else 1)


def check_job(info: ModelInfo, kind: JobKind | None, input: str, fmt: str, columns: Columns) -> Columns:
    """The checks before any work is queued: the kind, images, the columns; returns the columns
    with the id column ``say_id_column`` settled on."""
    if kind is not None and kind != info.kind:
        raise BadInput(f"--kind {kind.value}: model {info.ref!r} is {info.kind.a_model}", param="kind")
    if columns.image and "image" not in info.modalities:
        raise BadInput(f"--image-column: model {info.ref!r} embeds text only (images need an image-text model: "
                       "CLIP, SigLIP)", param="image_column")
    columns = columns.model_copy(update={"id": say_id_column(input, columns.id)})
    check_columns(input, fmt, info.kind, columns)
    return columns


def submit(client: Client, input: str, out: str, kind: JobKind, columns: Columns, shard_rows: int,
           options: Any, model: str) -> tuple[Any, float, Any]:
    """Submit the corpus and follow it to its manifest; the seconds are the job's exact time (from
    the submission to the last part's durable write, ``JobManifest.seconds_since``), not the
    status poll's (a poll every 0.1 s made a 0.3 s job read 0.3 or 0.4 s)."""
    started, submitted = time.monotonic(), time.time()
    handle = client.submit_corpus(input, out, model=model, kind=kind, text_column=columns.text,
                                  id_column=columns.id, query_column=columns.query,
                                  document_column=columns.document, shard_rows=shard_rows, options=options,
                                  image_column=columns.image)
    manifest, polled = follow(handle, poll=0.1, started=started)
    exact = manifest.seconds_since(submitted)
    return manifest, polled if exact is None else exact, handle


def run_here(spec: WorkerSpec, input: str, out: str, fmt: str, kind: JobKind | None, columns: Columns,
             shard_rows: int, options: Any) -> tuple[Any, float, Any]:
    """One device: the engine in this process, on the in-memory transport."""
    model = str(spec.models[0])
    with InProcessWorker(spec) as worker:
        engine = worker.engines[0]
        columns = check_job(engine.info, kind, input, fmt, columns)
        engine.check_options(options)
        console.print(f"model {engine.info.name} ({engine.info.kind.value}, {engine.info.dims} dims) on "
                      f"{engine.backend.device} in {engine.backend.dtype}, batches of <= {engine.max_batch_tokens} tokens")
        selection = worker.selections[0]
        if selection.reason:
            console.print(f"backend auto: {escape(selection.reason)}")
        if selection.table and not selection.cached:
            console.print(selection.table)
        return submit(Client(app=worker.app), input, out, engine.info.kind, columns, shard_rows, options, model)


#: the inline call that has an engine check a job's options before its corpus is queued
OPTIONS_CHECK_TIMEOUT_S = 120.0


def check_options_on(client: Client, kind: JobKind, model: str, options: Options) -> None:
    """The job's options checked by a real engine before anything is queued (this process loads no
    model): one inline call of one short input with those options; a refusal raises as it would
    from ``Engine.check_options`` in this process."""
    job: EmbedJob | RerankJob | ClassifyJob
    if kind == JobKind.rerank:
        job = RerankJob(model=model, query="options check", documents=["options check"], options=options)
    elif kind == JobKind.classify:
        job = ClassifyJob(model=model, inputs=["options check"], options=options)
    else:
        job = EmbedJob(model=model, inputs=["options check"], options=options)
    client.call(job, timeout=OPTIONS_CHECK_TIMEOUT_S)


def run_on_devices(slots: list[DeviceSlot], spec: WorkerSpec, input: str, out: str, fmt: str,
                   kind: JobKind | None, columns: Columns, shard_rows: int, options: Any,
                   verbose: bool) -> tuple[Any, float, Any]:
    """Several devices: one engine process each on a private Redis; this process only submits and
    follows (the model's files are read for the checks, its weights are loaded by the engines)."""
    model = str(spec.models[0])
    info = describe(model, trust_remote_code=spec.trust_remote_code)
    columns = check_job(info, kind, input, fmt, columns)
    console.print(f"model {info.name} ({info.kind.value}, {info.dims} dims): starting {len(slots)} engine processes: "
                  + ", ".join(f"{s.label} ({len(s.cores)} cores)" if s.cores else s.label for s in slots))
    with LocalFleet(slots, spec, verbose, on_engine_ready=lambda m: console.print(engine_line(m))) as fleet:
        client = Client(broker=fleet.url, result_backend=fleet.url)
        check_options_on(client, info.kind, model, options)
        answer = submit(client, input, out, info.kind, columns, shard_rows, options, model)
        for row in engine_work(client.app):
            console.print(f"engine {row['device']} (pid {row['pid']}): {row.get('batches', 0):,} batches, "
                          f"{row.get('items', 0):,} inputs, {row.get('tokens', 0):,} tokens")
        return answer
