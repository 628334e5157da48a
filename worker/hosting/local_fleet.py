"""Several engine processes for one command on this host (``run`` and embedded ``serve`` with
more than one device): a private broker, the supervisor on a thread, and the moment all are ready.

The engines are exactly those of ``embedfleet worker --devices`` (``worker.hosting.supervisor``,
``engine_process``): each consumes the queues itself, so the private broker spreads shards and
inline calls over them, a dead engine is restarted with backoff and its unacknowledged shard is
delivered again; there is no second scheduler in this process. The command talks to them as a
producer does to a fleet (``producer.client.Client`` on the private broker's URL).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from producer.broker import MODELS_COMMAND
from producer.errors import Unavailable
from worker.hosting.devices import DeviceSlot
from worker.hosting.host import WorkerSpec
from worker.hosting.local_broker import LocalBroker
from worker.hosting.supervisor import Supervisor

log = logging.getLogger(__name__)


def engine_work(app: Any, timeout: float = 3.0) -> list[dict[str, Any]]:
    """What each engine process has done since it started, asked over the broker (the broadcast
    the facade's directory uses): its device, pid, and its engines' batch counters."""
    rows = []
    for reply in app.control.broadcast(MODELS_COMMAND, reply=True, timeout=timeout) or []:
        for hostname, answer in reply.items():
            pid = hostname.split("-")[1] if hostname.count("-") >= 2 else "?"
            for model in answer.get("models", []):
                rows.append({"device": model.get("device"), "pid": pid, "model": model.get("id"),
                             **{k: int(v) for k, v in (model.get("stats") or {}).items()}})
    return sorted(rows, key=lambda r: (str(r["device"]), str(r["pid"])))


class LocalFleet:
    """A private redis-server and one supervised engine process per ``DeviceSlot``."""

    def __init__(self, slots: list[DeviceSlot], spec: WorkerSpec, verbose: bool = False,
                 on_engine_ready: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.slots = slots
        self.spec = spec
        self.verbose = verbose
        self.on_engine_ready = on_engine_ready
        self.broker = LocalBroker()
        self.supervisor: Supervisor | None = None
        #: each engine's ready message (``engine_process.describe_ready``), once all are consuming
        self.engines: list[dict[str, Any]] = []
        self.code: int | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The private broker (and result backend) the engines consume."""
        return self.broker.url

    def start(self) -> "LocalFleet":
        """Start the broker and every engine; returns once all consume, or raises why one could not start."""
        self.broker.start()
        try:
            self.supervisor = Supervisor(self.slots, self.spec, self.url, self.url, self.verbose,
                                         on_engine_ready=self.on_engine_ready)
            self._thread = threading.Thread(target=self._serve, name="ef-supervisor", daemon=True)
            self._thread.start()
            while not self._ready.wait(0.2):
                if not self._thread.is_alive():
                    raise Unavailable(self.supervisor.failure or f"the engine processes ended (exit code {self.code}) "
                                      "while starting (see the log above)", param="devices")
        except BaseException:
            self.stop()
            raise
        return self

    def _serve(self) -> None:
        assert self.supervisor is not None

        def ready(messages: list[dict[str, Any]]) -> None:
            self.engines = messages
            self._ready.set()

        self.code = self.supervisor.serve_forever(on_ready=ready)

    def alive(self) -> bool:
        """The supervisor still runs (an engine that dies is restarted; a failed first start ends it)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Every engine first (they give unfinished work back to the broker), then the broker."""
        if self.supervisor is not None:
            self.supervisor.request_stop()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.broker.stop()

    def __enter__(self) -> "LocalFleet":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
