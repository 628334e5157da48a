"""The ``embedfleet`` command: the producer's commands plus ``run`` and ``worker``.

``run`` is the embedded default: a worker in this process on the in-memory transport, fed by the
same client and tasks a fleet uses. ``worker`` hosts models for a real broker.
"""

from __future__ import annotations

import logging
import os
from typing import List, Optional

import typer
from pydantic import ValidationError

from producer.cli import app, build_options, console, fail, follow, summarize
from producer.client import DEFAULT_SHARD_ROWS, Client
from producer.jobs import JobKind
from producer.sources import SourceError, check_columns, detect_format
import worker.commands.shard  # noqa: F401  (registers `plan` and `shard`)
import worker.commands.serve  # noqa: F401  (registers `serve`)
from worker.backends import BackendUnavailable
from worker.hosting.host import InProcessWorker, WorkerSpec
from worker.models.resolve import DEFAULT_MODEL, ModelNotFound

KNOWN_ERRORS = (SourceError, ModelNotFound, FileExistsError, ValueError, BackendUnavailable)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


@app.command()
def run(
    input: str = typer.Argument(..., help="Corpus: Parquet, JSONL, CSV or a text file (one text a line)"),
    out: str = typer.Option(..., "--out", help="Output folder: part-NNNNN.parquet files and _manifest.json"),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Local dir, hub id, or the bundled default"),
    kind: Optional[JobKind] = typer.Option(None, "--kind", help="embed|rerank|classify (default: the model's kind)"),
    text_column: str = typer.Option("text", "--text-column"),
    id_column: Optional[str] = typer.Option(None, "--id-column", help="Kept as `id` (type kept); default: row number"),
    query_column: str = typer.Option("query", "--query-column", help="Rerank: the query column"),
    document_column: str = typer.Option("document", "--document-column", help="Rerank: the document column"),
    shard_rows: int = typer.Option(2048, "--shard-rows", min=1, help="Rows per output part"),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda|mps"),
    backend: str = typer.Option("auto", "--backend", envvar="EMBEDFLEET_BACKEND", help="auto|torch|onnx|neuron (auto: measured at start on CPU, torch on GPUs)"),
    dtype: str = typer.Option("auto", "--dtype", envvar="EMBEDFLEET_DTYPE", help="auto|float32|bfloat16|float16|int8 (int8: onnx only)"),
    max_batch_tokens: Optional[int] = typer.Option(None, "--max-batch-tokens", min=1),
    memory_fraction: Optional[float] = typer.Option(None, "--memory-fraction", min=0.05, max=1.0,
                                                    envvar="EMBEDFLEET_MEMORY_FRACTION",
                                                    help="GPU: share of free memory the batch budget may use (default 0.8)"),
    concurrency: int = typer.Option(2, "--concurrency", min=1, help="Shards in flight (they share batches)"),
    normalize: Optional[bool] = typer.Option(None, "--normalize/--no-normalize", help="Default: the model's files"),
    truncate: bool = typer.Option(True, "--truncate/--no-truncate", help="Cut over-long texts, or record them as errors"),
    dimensions: Optional[int] = typer.Option(None, "--dimensions", min=1, help="Matryoshka: keep N dims, renormalize"),
    prompt_name: Optional[str] = typer.Option(None, "--prompt-name", help="A prompt defined by the model, e.g. query"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="A literal prefix for every text"),
    output_dtype: str = typer.Option("float32", "--output-dtype", help="float32|float16 in Parquet"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Embed (or rerank, classify) a corpus into Parquet on this machine, with no broker."""
    _setup_logging(verbose)
    try:
        options = build_options(normalize, truncate, dimensions, prompt_name, prompt, output_dtype)
        fmt = detect_format(input)
        spec = WorkerSpec(models=[model], device=device, backend=backend, dtype=dtype, concurrency=concurrency,
                          max_batch_tokens=max_batch_tokens, memory_fraction=memory_fraction)
        with InProcessWorker(spec) as worker:
            engine = worker.engines[0]
            model_kind = engine.info.kind
            if kind is not None and kind != model_kind:
                raise ValueError(f"--kind {kind.value}: model {model!r} is a {model_kind.value} model")
            engine.check_options(options)
            check_columns(input, fmt, model_kind, _columns(text_column, id_column, query_column, document_column))
            console.print(f"model {engine.info.name} ({model_kind.value}, {engine.info.dims} dims) on "
                          f"{engine.backend.device} in {engine.backend.dtype}, batches of <= {engine.max_batch_tokens} tokens")
            if getattr(engine.backend, "autoselect_table", ""):
                console.print(engine.backend.autoselect_table)
            client = Client(app=worker.hosting.app)
            handle = client.submit_corpus(input, out, model=model, kind=model_kind, text_column=text_column,
                                          id_column=id_column, query_column=query_column,
                                          document_column=document_column, shard_rows=shard_rows, options=options)
            manifest, seconds = follow(handle, poll=0.1)
    except ValidationError as exc:
        raise fail(_validation_message(exc)) from None
    except KNOWN_ERRORS as exc:
        raise fail(str(exc)) from None
    summarize(manifest, seconds)
    raise typer.Exit(0 if manifest.status == "complete" else 1)


def _columns(text: str, id_: Optional[str], query: str, document: str):  # type: ignore[no-untyped-def]
    from producer.jobs import Columns

    return Columns(text=text, id=id_, query=query, document=document)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ())) or "options"
        parts.append(f"{where}: {error.get('msg')}")
    return "; ".join(parts)


@app.command("worker")
def worker_command(
    broker: str = typer.Option(..., "--broker", envvar="EMBEDFLEET_BROKER", help="redis://... or sqs://..."),
    result_backend: Optional[str] = typer.Option(None, "--result-backend", envvar="EMBEDFLEET_RESULT_BACKEND"),
    model: List[str] = typer.Option([DEFAULT_MODEL], "--model", help="Models to host (repeatable)"),
    device: str = typer.Option("auto", "--device"),
    backend: str = typer.Option("auto", "--backend", envvar="EMBEDFLEET_BACKEND", help="auto|torch|onnx|neuron (auto: measured at start on CPU, torch on GPUs)"),
    dtype: str = typer.Option("auto", "--dtype", envvar="EMBEDFLEET_DTYPE", help="auto|float32|bfloat16|float16|int8 (int8: onnx only)"),
    concurrency: int = typer.Option(4, "--concurrency", min=1, help="Shards in flight; they share one engine"),
    inline_slots: int = typer.Option(WorkerSpec.inline_slots, "--inline-slots", min=1,
                                     envvar="EMBEDFLEET_INLINE_SLOTS",
                                     help="Inline calls in flight beside the shards (a lane shards never fill)"),
    max_batch_tokens: Optional[int] = typer.Option(None, "--max-batch-tokens", min=1),
    memory_fraction: Optional[float] = typer.Option(None, "--memory-fraction", min=0.05, max=1.0,
                                                    envvar="EMBEDFLEET_MEMORY_FRACTION",
                                                    help="GPU: share of free memory the batch budget may use (default 0.8)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Host models for a fleet: consume their queues on BROKER until stopped (Ctrl+C / SIGTERM)."""
    _setup_logging(verbose)
    spec = WorkerSpec(models=list(model), device=device, backend=backend, dtype=dtype, concurrency=concurrency,
                      inline_slots=inline_slots, max_batch_tokens=max_batch_tokens, memory_fraction=memory_fraction)
    try:
        code = InProcessWorker(spec, broker=broker, backend=result_backend).serve_forever(
            on_ready=lambda w: console.print(
                f"worker ready: {', '.join(e.info.name for e in w.engines)} on {broker.split('@')[-1]}"))
    except KNOWN_ERRORS as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(code)


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main", "DEFAULT_SHARD_ROWS"]
