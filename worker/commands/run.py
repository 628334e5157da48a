"""``embedfleet run``: the embedded default, a whole corpus job on this machine with no broker.

A worker runs in this process on the in-memory transport, fed by the same client and tasks a
fleet uses, so a laptop run and a fleet run differ only in where the queue lives.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError
from rich.markup import escape

from producer.cli import app, build_options, console, fail, follow, say_id_column, summarize
from producer.client import Client
from producer.errors import BadInput, EmbedfleetError
from producer.jobs import DEFAULT_MODEL, Columns, JobKind
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
    Dtype,
    MaxBatchTokens,
    MemoryFraction,
    TrustRemoteCode,
)
from worker.hosting.host import InProcessWorker, WorkerSpec
from worker.hosting.trust import StorageRoots


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
    backend: Backend = DEFAULT_BACKEND,
    dtype: Dtype = DEFAULT_DTYPE,
    max_batch_tokens: MaxBatchTokens = None,
    memory_fraction: MemoryFraction = None,
    trust_remote_code: TrustRemoteCode = DEFAULT_TRUST_REMOTE_CODE,
    concurrency: int = typer.Option(2, "--concurrency", min=1, help="Shards in flight (they share batches)"),
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
    """Embed (or rerank, classify) a corpus into Parquet on this machine, with no broker."""
    setup_logging(verbose)
    try:
        options = build_options(normalize, truncate, dimensions, prompt_name, prompt, output_dtype, outputs)
        fmt = detect_format(input)
        spec = WorkerSpec(models=[model], device=device, backend=backend, dtype=dtype, concurrency=concurrency,
                          max_batch_tokens=max_batch_tokens, memory_fraction=memory_fraction,
                          trust_remote_code=trust_remote_code, storage_roots=StorageRoots.parse(run_roots(input, out, image_column)))
        with InProcessWorker(spec) as worker:
            engine = worker.engines[0]
            model_kind = engine.info.kind
            if kind is not None and kind != model_kind:
                raise BadInput(f"--kind {kind.value}: model {model!r} is {model_kind.a_model}", param="kind")
            engine.check_options(options)
            if image_column and "image" not in engine.info.modalities:
                raise BadInput(f"--image-column: model {model!r} embeds text only (images need an image-text model: "
                               "CLIP, SigLIP)", param="image_column")
            id_column = say_id_column(input, id_column)
            columns = Columns(text=text_column, id=id_column, query=query_column, document=document_column,
                              image=image_column)
            check_columns(input, fmt, model_kind, columns)
            console.print(f"model {engine.info.name} ({model_kind.value}, {engine.info.dims} dims) on "
                          f"{engine.backend.device} in {engine.backend.dtype}, batches of <= {engine.max_batch_tokens} tokens")
            selection = worker.selections[0]
            if selection.reason:
                console.print(f"backend auto: {escape(selection.reason)}")
            if selection.table and not selection.cached:
                console.print(selection.table)
            client = Client(app=worker.app)
            started = time.monotonic()
            handle = client.submit_corpus(input, out, model=model, kind=model_kind, text_column=text_column,
                                          id_column=id_column, query_column=query_column,
                                          document_column=document_column, shard_rows=shard_rows, options=options,
                                          image_column=image_column)
            manifest, seconds = follow(handle, poll=0.1, started=started)
    except (EmbedfleetError, ValidationError) as exc:
        raise fail(exc) from None
    summarize(manifest, seconds, handle)
    raise typer.Exit(0 if manifest.status == "complete" else 1)
