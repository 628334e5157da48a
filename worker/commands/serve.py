"""``embedfleet serve``: the HTTP facade, thin (``--broker``) or embedded (a worker in this process).

Thin mode holds no model: each request is a job on the model's queue, answered by whatever
workers consume it. Embedded mode starts the same in-process worker ``embedfleet run`` uses
(in-memory transport) and puts the same facade in front of it; its calls are handed to the
engine directly (``worker.hosting.direct``), without a message in between. With several devices
(every visible GPU by default, or ``--devices``) embedded mode runs one engine process per device
on a private host-local Redis (``worker.hosting.local_fleet``) and the facade in front of them is
the thin one: each call takes one Redis hop to whichever engine asks first, and /health,
/v1/models and /metrics report each engine's device.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import replace
from typing import Annotated, Any, List, Optional

import typer

from producer.broker import MEMORY_BROKER
from producer.cli import app, console, fail
from producer.client import Client
from producer.errors import BadInput, EmbedfleetError, Unavailable
from producer.http.app import create_app
from producer.http.directory import parse_wanted
from producer.http.processes import serve_processes
from producer.http.settings import FacadeSettings
from producer.jobs import DEFAULT_MODEL
from producer.logs import setup_logging
from producer.options import ResultBackend, Verbose, envvar
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
from worker.commands.worker import engine_line, say_selections
from worker.hosting.devices import DeviceSlot, plan_slots
from worker.hosting.direct import EngineRunner
from worker.hosting.host import InProcessWorker, WorkerSpec
from worker.hosting.local_fleet import LocalFleet
from worker.hosting.trust import StorageRoots

log = logging.getLogger(__name__)

#: The in-memory transport polls; 1 s (kombu's default) would add up to a second per request.
EMBEDDED_POLL_S = 0.002
KEEP_ALIVE_S = 75


def start_embedded(models: list[str], spec: WorkerSpec) -> InProcessWorker:
    """An in-process worker on the memory transport, polling often enough for HTTP latency."""
    worker = InProcessWorker(spec, broker=MEMORY_BROKER, handle_signals=False)
    worker.app.conf.broker_transport_options = {"polling_interval": EMBEDDED_POLL_S}
    return worker.start()


def check_port(host: str, port: int) -> None:
    """Fail at once when ``host:port`` cannot be bound, before any model is loaded (loading takes
    seconds to minutes, and uvicorn would only then find the port taken)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BadInput(f"--host {host!r} cannot be resolved: {exc}", param="host") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(address)
        except OSError as exc:
            raise Unavailable(f"cannot listen on {host}:{port}: {exc.strerror or exc} (another server there? "
                              "choose another with --port)", param="port") from None


def build(broker: Optional[str], result_backend: Optional[str], models: list[str], settings: FacadeSettings,
          spec: WorkerSpec) -> tuple[Any, InProcessWorker | None]:
    """The ASGI app and, in embedded mode, the worker behind it (stopped with the app)."""
    if broker:
        return create_app(Client(broker=broker, result_backend=result_backend), settings), None
    # (several devices: ``build_on_devices``)
    worker = start_embedded(models, spec)
    return create_app(Client(app=worker.app), settings, on_shutdown=worker.stop, runner=EngineRunner(worker.registry)), worker


def build_on_devices(slots: list[DeviceSlot], settings: FacadeSettings, spec: WorkerSpec,
                     verbose: bool) -> tuple[Any, LocalFleet]:
    """Embedded on several devices: the engine processes on a private Redis, the thin facade in
    front of them (the engines and the broker are stopped with the app)."""
    console.print("starting {} engine processes: {}".format(
        len(slots), ", ".join(f"{s.label} ({len(s.cores)} cores)" if s.cores else s.label for s in slots)))
    fleet = LocalFleet(slots, spec, verbose, on_engine_ready=lambda m: console.print(engine_line(m))).start()
    client = Client(broker=fleet.url, result_backend=fleet.url)
    return create_app(client, settings, on_shutdown=fleet.stop), fleet


@app.command("serve")
def serve(
    broker: Annotated[Optional[str], typer.Option(
        "--broker", envvar=envvar("broker"),
        help="Thin mode: redis://... or sqs://...; omit to host the models here")] = None,
    result_backend: ResultBackend = None,
    model: Annotated[List[str], typer.Option(
        "--model", help="Model to serve (repeatable; thin mode: kind:ref also accepted). "
        "Embedded default: the bundled model; thin default: all answering")] = [],  # noqa: B006
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 7997,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar=envvar("api_key"), help="Require 'Authorization: Bearer KEY' on the API routes")] = None,
    protect_metrics: Annotated[bool, typer.Option(
        "--protect-metrics", help="/metrics asks for the API key too (open by default, for Prometheus)")] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds a request waits for a worker (504)")] = 30.0,
    max_inflight: Annotated[int, typer.Option("--max-inflight", min=1, help="Requests in flight before 429")] = 256,
    max_queue_depth: Annotated[int, typer.Option("--max-queue-depth", min=1, help="Queued jobs before 429")] = 1024,
    max_inputs: Annotated[int, typer.Option("--max-inputs", min=1, max=2048, help="Inputs per request (413)")] = 2048,
    max_chars: Annotated[int, typer.Option("--max-chars", min=1, help="Characters per input (413); above "
                                           "100,000, longer inputs are cut there, past any model's maximum")] = 100_000,
    max_body_bytes: Annotated[int, typer.Option("--max-body-bytes", min=1024, help="Body size (413)")] = 8 * 1024 * 1024,
    max_request_tokens: Annotated[int, typer.Option(
        "--max-request-tokens", min=1, help="Tokens per request (413), counted as one per UTF-8 byte, at most "
        "the model's maximum per input")] = FacadeSettings.max_request_tokens,
    jobs_per_worker: Annotated[int, typer.Option(
        "--jobs-per-worker", min=1, help="Jobs in flight per worker and model; concurrent requests past it "
        "are merged into the next job")] = FacadeSettings.jobs_per_worker,
    device: Device = "auto",
    devices: Devices = None,
    backend: Backend = DEFAULT_BACKEND,
    dtype: Dtype = DEFAULT_DTYPE,
    processes: Annotated[int, typer.Option(
        "--processes", min=1, max=256, help="Thin mode: facade processes on the one port (SO_REUSEPORT), "
        "each with its own event loop and reply subscription")] = 1,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1,
                                             help="Embedded mode: jobs in flight per worker")] = 64,
    max_batch_tokens: MaxBatchTokens = None,
    memory_fraction: MemoryFraction = None,
    trust_remote_code: TrustRemoteCode = DEFAULT_TRUST_REMOTE_CODE,
    verbose: Verbose = False,
) -> None:
    """Serve OpenAI / infinity-compatible HTTP routes: /v1/embeddings, /v1/rerank, /v1/classify, /v1/models."""
    import uvicorn

    setup_logging(verbose)
    settings = FacadeSettings(models=list(model), api_key=api_key, timeout_s=timeout, max_inflight=max_inflight,
                              max_queue_depth=max_queue_depth, max_inputs=max_inputs, max_chars=max_chars,
                              max_body_bytes=max_body_bytes, max_request_tokens=max_request_tokens,
                              jobs_per_worker=jobs_per_worker,
                              protect_metrics=protect_metrics)
    if processes > 1 and not broker:
        raise fail(BadInput("--processes above 1 needs --broker: every process would host its own copy of the "
                            "models; run one embedded server, or a thin facade in front of `embedfleet worker`",
                            param="processes"))
    if broker and devices:
        raise fail(BadInput("--devices applies to embedded mode (no --broker): a thin facade holds no model; "
                            "give --devices to `embedfleet worker`", param="devices"))
    if broker and broker.startswith("sqs://") and not model:
        # SQS has no broadcast: the facade asks each named model's queue what serves it
        raise fail(BadInput("with an sqs:// broker, name the models to serve: --model REF (or --model rerank:REF)"))
    try:
        check_port(host, port)
    except EmbedfleetError as exc:
        raise fail(exc) from None
    hosted = [parse_wanted(entry)[1] for entry in model] or [DEFAULT_MODEL]
    spec = WorkerSpec(models=hosted, device=device, backend=backend, dtype=dtype, concurrency=concurrency,
                      max_batch_tokens=max_batch_tokens, memory_fraction=memory_fraction,
                      trust_remote_code=trust_remote_code,
                      storage_roots=StorageRoots())  # the embedded worker answers calls; it takes no shards
    # keep-alive longer than load balancers' idle timeouts (60 s on AWS), so a pooled
    # connection is never closed by us just as a client reuses it
    config = {"host": host, "port": port, "log_level": "info" if verbose else "warning", "access_log": verbose,
              "timeout_keep_alive": KEEP_ALIVE_S}
    if processes > 1:
        console.print(f"embedfleet serve on http://{host}:{port} (thin, jobs to {broker.split('@')[-1]}, "  # type: ignore[union-attr]
                      f"{processes} processes)")
        status = serve_processes(lambda: build(broker, result_backend, hosted, settings, spec)[0], config, processes)
        raise typer.Exit(status)
    fleet: LocalFleet | None = None
    worker: InProcessWorker | None = None
    try:
        slots = plan_slots(devices, device) if not broker else []
        if len(slots) > 1:
            asgi, fleet = build_on_devices(slots, settings, replace(spec, device=slots[0].device), verbose)
        else:
            asgi, worker = build(broker, result_backend, hosted, settings, spec)
    except EmbedfleetError as exc:
        raise fail(exc) from None
    if worker is not None:
        say_selections(worker)
    mode = f"thin, jobs to {broker.split('@')[-1]}" if broker else f"embedded, hosting {', '.join(hosted)}"
    if fleet is not None:
        mode += f" on {len(slots)} engine processes ({', '.join(s.label for s in slots)})"
    console.print(f"embedfleet serve on http://{host}:{port} ({mode})")
    try:
        uvicorn.run(asgi, **config)
    finally:
        if worker is not None and worker.alive():
            worker.stop()
        if fleet is not None and fleet.alive():
            fleet.stop()
