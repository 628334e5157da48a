"""``embedfleet worker``: host models for a fleet, consuming their queues until stopped."""

from __future__ import annotations

from typing import Annotated, List

import typer
from rich.markup import escape

from producer.cli import app, console, fail
from producer.errors import EmbedfleetError
from producer.jobs import DEFAULT_MODEL
from producer.logs import setup_logging
from producer.options import Broker, ResultBackend, Verbose, default, envvar
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


def say_selections(worker: InProcessWorker) -> None:
    """What ``--backend auto`` chose for each model, and why (measured now, or cached)."""
    for engine, selection in zip(worker.engines, worker.selections):
        if selection.reason:
            console.print(f"{engine.info.name}: backend auto: {escape(selection.reason)}")


def ready_line(worker: InProcessWorker, broker: str) -> str:
    """What the worker serves, and what it refuses (its jobs fail with the reason printed above)."""
    line = f"worker ready: {', '.join(e.info.name for e in worker.engines) or 'no model'} on {broker.split('@')[-1]}"
    if worker.refused:
        names = ", ".join(ref or info.name for ref, info in worker.refused)
        line += f"; refused (their jobs fail with the reason): {names}"
    return line


@app.command("worker")
def worker_command(
    broker: Broker,
    result_backend: ResultBackend = None,
    model: Annotated[List[str], typer.Option("--model", help="Models to host (repeatable)")] = [DEFAULT_MODEL],  # noqa: B006
    device: Device = "auto",
    backend: Backend = DEFAULT_BACKEND,
    dtype: Dtype = DEFAULT_DTYPE,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1,
                                             help="Shards in flight; they share one engine")] = 4,
    inline_slots: Annotated[int, typer.Option(
        "--inline-slots", min=1, envvar=envvar("inline_slots"),
        help="Inline calls in flight beside the shards (a lane shards never fill)")] = int(default("inline_slots")),  # type: ignore[call-overload]
    max_batch_tokens: MaxBatchTokens = None,
    memory_fraction: MemoryFraction = None,
    trust_remote_code: TrustRemoteCode = DEFAULT_TRUST_REMOTE_CODE,
    verbose: Verbose = False,
) -> None:
    """Host models for a fleet: consume their queues on BROKER until stopped (Ctrl+C / SIGTERM).

    A model it cannot serve faithfully is refused, not half-loaded: the worker still consumes that
    model's queues, and its shards and calls fail at once with the reason.
    """
    setup_logging(verbose)
    spec = WorkerSpec(models=list(model), device=device, backend=backend, dtype=dtype, concurrency=concurrency,
                      inline_slots=inline_slots, max_batch_tokens=max_batch_tokens, memory_fraction=memory_fraction,
                      trust_remote_code=trust_remote_code, keep_refused=True)

    def ready(worker: InProcessWorker) -> None:
        say_selections(worker)
        console.print(ready_line(worker, broker))

    try:
        code = InProcessWorker(spec, broker=broker, backend=result_backend).serve_forever(on_ready=ready)
    except EmbedfleetError as exc:
        raise fail(exc) from None
    raise typer.Exit(code)
