"""``embedfleet serve``: the HTTP facade, thin (``--broker``) or embedded (a worker in this process).

Thin mode holds no model: each request is a job on the model's queue, answered by whatever
workers consume it. Embedded mode starts the same in-process worker ``embedfleet run`` uses
(in-memory transport) and puts the same facade in front of it, so the request path is identical.
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional

import typer

from producer.broker import MEMORY_BROKER
from producer.cli import app, console, fail
from producer.client import Client
from producer.http.app import FacadeSettings, create_app, parse_wanted
from worker.backends import BackendUnavailable
from worker.hosting.host import InProcessWorker, WorkerSpec
from worker.models.resolve import DEFAULT_MODEL, ModelNotFound

log = logging.getLogger(__name__)

#: The in-memory transport polls; 1 s (kombu's default) would add up to a second per request.
EMBEDDED_POLL_S = 0.002
KEEP_ALIVE_S = 75


def start_embedded(models: list[str], spec: WorkerSpec) -> InProcessWorker:
    """An in-process worker on the memory transport, polling often enough for HTTP latency."""
    worker = InProcessWorker(spec, broker=MEMORY_BROKER, handle_signals=False)
    worker.hosting.app.conf.broker_transport_options = {"polling_interval": EMBEDDED_POLL_S}
    return worker.start()


def build(broker: Optional[str], result_backend: Optional[str], models: list[str], settings: FacadeSettings,
          spec: WorkerSpec) -> tuple[Any, InProcessWorker | None]:
    """The ASGI app and, in embedded mode, the worker behind it (stopped with the app)."""
    if broker:
        return create_app(Client(broker=broker, result_backend=result_backend), settings), None
    worker = start_embedded(models, spec)
    return create_app(Client(app=worker.hosting.app), settings, on_shutdown=worker.stop), worker


@app.command("serve")
def serve(
    broker: Optional[str] = typer.Option(None, "--broker", envvar="EMBEDFLEET_BROKER",
                                         help="Thin mode: redis://... or sqs://...; omit to host the models here"),
    result_backend: Optional[str] = typer.Option(None, "--result-backend", envvar="EMBEDFLEET_RESULT_BACKEND"),
    model: List[str] = typer.Option([], "--model", help="Model to serve (repeatable; thin mode: kind:ref also "
                                    "accepted). Embedded default: the bundled model; thin default: all answering"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(7997, "--port", min=1, max=65535),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="EMBEDFLEET_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on the API routes"),
    timeout: float = typer.Option(30.0, "--timeout", min=0.1, help="Seconds a request waits for a worker (504)"),
    max_inflight: int = typer.Option(256, "--max-inflight", min=1, help="Requests in flight before 429"),
    max_queue_depth: int = typer.Option(1024, "--max-queue-depth", min=1, help="Queued jobs before 429"),
    max_inputs: int = typer.Option(2048, "--max-inputs", min=1, max=2048, help="Inputs per request (413)"),
    max_chars: int = typer.Option(100_000, "--max-chars", min=1, max=100_000, help="Characters per input (413)"),
    max_body_bytes: int = typer.Option(8 * 1024 * 1024, "--max-body-bytes", min=1024, help="Body size (413)"),
    jobs_per_worker: int = typer.Option(FacadeSettings.jobs_per_worker, "--jobs-per-worker", min=1,
                                        help="Jobs in flight per worker and model; concurrent requests past it "
                                        "are merged into the next job"),
    device: str = typer.Option("auto", "--device", help="Embedded mode: auto|cpu|cuda|mps"),
    backend: str = typer.Option("auto", "--backend", envvar="EMBEDFLEET_BACKEND", help="auto|torch|onnx|neuron (auto: measured at start on CPU, torch on GPUs)"),
    dtype: str = typer.Option("auto", "--dtype", envvar="EMBEDFLEET_DTYPE", help="auto|float32|bfloat16|float16|int8 (int8: onnx only)"),
    concurrency: int = typer.Option(64, "--concurrency", min=1, help="Embedded mode: jobs in flight per worker"),
    max_batch_tokens: Optional[int] = typer.Option(None, "--max-batch-tokens", min=1, help="Embedded mode"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Serve OpenAI / infinity-compatible HTTP routes: /v1/embeddings, /v1/rerank, /v1/classify, /v1/models."""
    import uvicorn

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = FacadeSettings(models=list(model), api_key=api_key, timeout_s=timeout, max_inflight=max_inflight,
                              max_queue_depth=max_queue_depth, max_inputs=max_inputs, max_chars=max_chars,
                              max_body_bytes=max_body_bytes, jobs_per_worker=jobs_per_worker)
    if broker and broker.startswith("sqs://") and not model:
        # SQS has no broadcast: the facade asks each named model's queue what serves it
        raise fail("with an sqs:// broker, name the models to serve: --model REF (or --model rerank:REF)")
    hosted = [parse_wanted(entry)[1] for entry in model] or [DEFAULT_MODEL]
    spec = WorkerSpec(models=hosted, device=device, backend=backend, dtype=dtype, concurrency=concurrency,
                      max_batch_tokens=max_batch_tokens)
    try:
        asgi, worker = build(broker, result_backend, hosted, settings, spec)
    except (ModelNotFound, BackendUnavailable, ValueError) as exc:
        raise fail(str(exc)) from None
    mode = f"thin, jobs to {broker.split('@')[-1]}" if broker else f"embedded, hosting {', '.join(hosted)}"
    console.print(f"embedfleet serve on http://{host}:{port} ({mode})")
    try:
        # keep-alive longer than load balancers' idle timeouts (60 s on AWS), so a pooled
        # connection is never closed by us just as a client reuses it
        uvicorn.run(asgi, host=host, port=port, log_level="info" if verbose else "warning", access_log=verbose,
                    timeout_keep_alive=KEEP_ALIVE_S)
    finally:
        if worker is not None and worker.alive():
            worker.stop()
