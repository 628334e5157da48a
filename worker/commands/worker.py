"""``embedfleet worker``: host models for a fleet, consuming their queues until stopped."""

from __future__ import annotations

import logging
from typing import Annotated, List, Optional

import typer
from rich.markup import escape

from producer.cli import app, console, fail
from producer.errors import BadInput, EmbedfleetError
from producer.jobs import DEFAULT_MODEL
from producer.logs import setup_logging
from producer.options import Broker, ResultBackend, Verbose, default, envvar
from producer.settings import settings
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
from worker.hosting.devices import DeviceSlot, plan_slots
from worker.hosting.host import InProcessWorker, WorkerSpec
from worker.hosting.supervisor import Supervisor
from worker.hosting.trust import StorageRoots

log = logging.getLogger(__name__)


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


def storage_roots(flags: list[str] | None) -> StorageRoots:
    """The roots from ``--storage-root`` or the environment; none at all is refused, since any
    message on the broker could otherwise make this worker read or write any file."""
    given = list(flags or []) or [r for r in (settings().storage_roots or "").split(",") if r.strip()]
    roots = StorageRoots.parse(given)
    if roots.empty:
        raise BadInput("name where the jobs may read and write: --storage-root DIR or s3://bucket/prefix/ "
                       f"(repeatable, or {envvar('storage_roots')}); --storage-root '*' allows anything",
                       param="storage_root")
    if roots.anything:
        log.warning("--storage-root '*': any message on the broker may make this worker read or write any file")
    return roots


@app.command("worker")
def worker_command(
    broker: Broker,
    result_backend: ResultBackend = None,
    model: Annotated[List[str], typer.Option("--model", help="Models to host (repeatable)")] = [DEFAULT_MODEL],  # noqa: B006
    device: Device = "auto",
    devices: Devices = None,
    backend: Backend = DEFAULT_BACKEND,
    dtype: Dtype = DEFAULT_DTYPE,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1,
                                             help="Shards computing at once; they share one engine (EMBEDFLEET_SHARD_LOOKAHEAD more are read ahead)")] = 4,
    inline_slots: Annotated[int, typer.Option(
        "--inline-slots", min=1, envvar=envvar("inline_slots"),
        help="Inline calls in flight beside the shards (a lane shards never fill)")] = int(default("inline_slots")),  # type: ignore[call-overload]
    max_batch_tokens: MaxBatchTokens = None,
    memory_fraction: MemoryFraction = None,
    trust_remote_code: TrustRemoteCode = DEFAULT_TRUST_REMOTE_CODE,
    storage_root: Annotated[Optional[List[str]], typer.Option(
        "--storage-root", help="A folder or URI prefix (s3://bucket/prefix/) the jobs may read and write "
        f"(repeatable; else {envvar('storage_roots')}, comma-separated); '*' allows anything")] = None,
    verbose: Verbose = False,
) -> None:
    """Host models for a fleet: consume their queues on BROKER until stopped (Ctrl+C / SIGTERM).

    With several devices (every visible GPU by default, or --devices), each runs its own engine
    process consuming the queues itself, and this process supervises them: a dead engine is
    restarted with backoff, and a stop signal stops them all.

    A model it cannot serve faithfully is refused, not half-loaded: the worker still consumes that
    model's queues, and its shards and calls fail at once with the reason.
    """
    setup_logging(verbose)
    try:
        roots = storage_roots(storage_root)
        slots = plan_slots(devices, device)
    except EmbedfleetError as exc:
        raise fail(exc) from None
    spec = WorkerSpec(models=list(model), device=slots[0].device, backend=backend, dtype=dtype,
                      concurrency=concurrency, inline_slots=inline_slots, max_batch_tokens=max_batch_tokens,
                      memory_fraction=memory_fraction, trust_remote_code=trust_remote_code, keep_refused=True,
                      storage_roots=roots)
    if len(slots) > 1:
        raise typer.Exit(supervise(slots, spec, broker, result_backend, verbose))

    def ready(worker: InProcessWorker) -> None:
        say_selections(worker)
        console.print(ready_line(worker, broker))

    try:
        code = InProcessWorker(spec, broker=broker, backend=result_backend).serve_forever(on_ready=ready)
    except EmbedfleetError as exc:
        raise fail(exc) from None
    raise typer.Exit(code)


def engine_line(message: dict) -> str:
    """One engine process is consuming: its device, pid, batch budget, and what it refused."""
    line = (f"engine {message['label']} (pid {message['pid']}): {', '.join(message['models']) or 'no model'}, "
            f"batches of <= {', '.join(str(t) for t in message['batch_tokens'])} tokens")
    if message.get("refused"):
        line += f"; refused: {', '.join(message['refused'])}"
    return line


def supervise(slots: list[DeviceSlot], spec: WorkerSpec, broker: str, result_backend: str | None,
              verbose: bool) -> int:
    """One engine process per device under a supervisor; returns the exit code."""
    console.print(f"starting {len(slots)} engine processes: "
                  + ", ".join(f"{s.label} ({len(s.cores)} cores)" if s.cores else s.label for s in slots))
    announced: set[str] = set()

    def engine_ready(message: dict) -> None:
        for reason in message.get("selections", []):
            if message["label"] not in announced:
                console.print(f"{message['label']}: backend auto: {escape(reason)}")
        announced.add(message["label"])
        console.print(engine_line(message))

    def ready(messages: list[dict]) -> None:
        models = sorted({m for message in messages for m in message["models"]})
        console.print(f"worker ready: {', '.join(models) or 'no model'} on {broker.split('@')[-1]}, "
                      f"{len(messages)} engines ({', '.join(m['label'] for m in messages)})")

    return Supervisor(slots, spec, broker, result_backend, verbose, on_engine_ready=engine_ready).serve_forever(ready)
