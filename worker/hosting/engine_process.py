"""One engine process of a multi-device worker: pinned to its device and its cores, then an
ordinary ``InProcessWorker`` consuming the model queues itself.

Started by ``worker.hosting.supervisor`` with multiprocessing's *spawn* (a fresh interpreter: no
CUDA context, lock or thread is inherited from the parent). Before anything heavy is imported it
pins itself to its share of the host's cores and sizes the tokenizer's and torch's thread pools
to them, so engines on one host do not fight over cores; it names its device for /v1/models,
/health, metrics and done-markers; then it loads its engines and reports to the parent over a pipe:
``{"ready": ...}`` once consuming, or ``{"error": ..., "code": ...}`` when it could not start.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any

from producer.errors import EmbedfleetError
from producer.settings import keep_freed_memory, set_env, settings, use_switch_interval
from worker.hosting.devices import DeviceSlot
from worker.hosting.host import InProcessWorker, WorkerSpec

log = logging.getLogger(__name__)

#: ``embedfleet``'s exit code for an error refused before work started (``producer.cli.EXIT_CODES``)
START_FAILED = 2


def pin(slot: DeviceSlot) -> None:
    """Cores, thread pools and (NeuronCores) the runtime's visible cores, before any library reads them."""
    if slot.cores:
        os.sched_setaffinity(0, slot.cores)
        threads = str(len(slot.cores))
        set_env("OMP_NUM_THREADS", threads)  # torch's intra-op pool (``worker.backends.base.cpu_threads``)
        set_env("RAYON_NUM_THREADS", threads)  # the Rust tokenizer's pool
    if slot.device.startswith("neuron:"):
        set_env("NEURON_RT_VISIBLE_CORES", slot.device.partition(":")[2])


def slot_spec(spec: WorkerSpec, slot: DeviceSlot) -> WorkerSpec:
    """The worker's spec for this engine: its device, and its part of the device's memory."""
    fraction = spec.memory_fraction if spec.memory_fraction is not None else settings().memory_fraction
    shared = slot.memory_fraction(fraction) if slot.share > 1 else spec.memory_fraction
    return replace(spec, device=slot.device, memory_fraction=shared)


def describe_ready(worker: InProcessWorker, slot: DeviceSlot) -> dict[str, Any]:
    """What the parent prints and checks when this engine is consuming."""
    return {
        "ready": True,
        "pid": os.getpid(),
        "label": slot.label,
        "hostname": worker.hostname,
        "models": [engine.info.name for engine in worker.engines],
        "refused": [ref or info.name for ref, info in worker.refused],
        "selections": [sel.reason for sel in worker.selections if sel.reason],
        "batch_tokens": [engine.max_batch_tokens for engine in worker.engines],
    }


def run_engine(slot: DeviceSlot, spec: WorkerSpec, broker: str, result_backend: str | None,
               conn: Connection, verbose: bool) -> None:
    """The child's entry point: pin, load, consume until SIGTERM / SIGINT; exits with the worker's code."""
    os.setpgid(0, 0)  # a terminal's Ctrl+C reaches the parent only, which stops the children in order
    watch_parent()
    pin(slot)
    use_switch_interval()
    keep_freed_memory()
    from producer.logs import setup_logging

    setup_logging(verbose)
    worker = InProcessWorker(slot_spec(spec, slot), broker=broker, backend=result_backend, handle_signals=True)
    worker.registry.set_device_label(slot.label)
    worker.hostname = f"embedfleet-{os.getpid()}-{slot.label.replace(':', '')}@{worker.hostname.partition('@')[2]}"
    try:
        code = worker.serve_forever(on_ready=lambda w: conn.send(describe_ready(w, slot)))
    except EmbedfleetError as exc:
        _tell(conn, {"error": str(exc), "code": START_FAILED})
        sys.exit(START_FAILED)
    finally:
        conn.close()
    sys.exit(code)


#: how often an engine process checks that its parent is still there
PARENT_POLL_S = 1.0


def watch_parent() -> None:
    """Stop (as on SIGTERM) when the supervisor is gone, even killed with SIGKILL: an orphaned
    engine would go on holding its device and taking work that nobody supervises."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="ef-parent-watch", daemon=True).start()


def _tell(conn: Connection, message: dict[str, Any]) -> None:
    try:
        conn.send(message)
    except (OSError, ValueError):  # the parent is gone: nobody to tell
        pass
