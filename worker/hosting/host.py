"""Host engines and run a Celery worker for them, for the embedded default and for the fleet.

``InProcessWorker`` loads the engines a worker hosts and consumes their queues: on a thread
with the in-memory transport (each worker on a broker of its own: ``worker.hosting.memory_broker``)
for ``embedfleet run`` and ``serve`` in embedded mode (so the very same producer -> queue -> task
-> engine -> sink path runs with nothing else installed), or in the foreground on a real broker
for ``embedfleet worker``.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from celery import Celery
from celery.concurrency.thread import TaskPool as ThreadTaskPool
from kombu import Exchange, Queue

from producer.broker import MEMORY_BROKER, declare_queue
from producer.errors import Unavailable, UnsupportedModel
from producer.jobs import inline_queue_name, queue_name
from producer.settings import settings
from worker import sinks
from worker.backends.select import Selection, load_backend
from worker.engine.pipeline import Engine
from worker.hosting import isolation, limits, memory_broker, poison, stop
from worker.hosting import registry as runtime
from worker.hosting.app import create_app
from worker.hosting.lanes import INLINE_QUEUES, SHARD_SLOTS, LaneConsumer
from worker.hosting.trust import StorageRoots, use_roots
from worker.models.resolve import ModelInfo, describe

log = logging.getLogger(__name__)

#: How often the in-memory transport's consumers look for messages (``embedfleet run``).
MEMORY_POLL_S = 0.005


@dataclass
class WorkerSpec:
    """What a worker hosts and how it runs it."""

    models: list[str | None] = field(default_factory=lambda: [None])
    device: str = "auto"
    backend: str = field(default_factory=lambda: settings().backend)
    dtype: str = field(default_factory=lambda: settings().dtype)
    concurrency: int = 4
    #: Pool threads kept for inline calls beside the ``concurrency`` shard slots (``worker.hosting.lanes``).
    inline_slots: int = field(default_factory=lambda: settings().inline_slots)
    #: Shards held beyond ``concurrency``, read and tokenized ahead (``None``: as many as ``concurrency``).
    lookahead: int | None = field(default_factory=lambda: settings().shard_lookahead)
    max_batch_tokens: int | None = None
    memory_fraction: float | None = None
    #: run the code a model folder ships (config auto_map), see ``worker.models.loading``
    trust_remote_code: bool = field(default_factory=lambda: settings().trust_remote_code)
    #: a model refused as unfaithful (``UnsupportedModel``) stays on its queues, and its jobs fail at
    #: once with the reason (``embedfleet worker``); otherwise the refusal ends the start (run, serve, shard)
    keep_refused: bool = False
    #: where broker messages may read and write (``worker.hosting.trust``); ``None`` checks nothing
    storage_roots: StorageRoots | None = None

    @property
    def shard_slots(self) -> int:
        """Shards in flight: ``concurrency`` computing plus the lookahead.

        Every shard task submits its texts to the one engine as soon as it has read them; the
        engine's scheduler builds each batch around its oldest pending item, so the shards run
        roughly in arrival order and those read ahead wait behind the current ones. When a shard
        finishes, its write, marker and acknowledgement (and the read and tokenization of the
        shard that takes its slot) happen while the device works on those ahead: the pipeline
        does not drain at a shard boundary.
        """
        ahead = self.concurrency if self.lookahead is None else self.lookahead
        return self.concurrency + ahead


def load_engine(model: str | None, spec: WorkerSpec) -> tuple[Engine, Selection]:
    """Resolve and load one model into a started engine; also returns how its backend was chosen
    (the table of candidates under ``--backend auto``). The caller hosts it: a worker registers
    it in its own registry (``worker.hosting.registry``), ``embedfleet shard`` runs it alone."""
    info = describe(model, trust_remote_code=spec.trust_remote_code)
    selection = load_backend(spec.backend, info, spec.device, spec.dtype)
    engine = Engine(info, selection.backend, max_batch_tokens=spec.max_batch_tokens,
                    memory_fraction=spec.memory_fraction).start()
    if selection.backend.asynchronous and selection.backend.device != "cpu":  # CPU streams (openvino) need none
        log.info("%s warmed up on %s in %.2f s", info.name, selection.backend.device, engine.warm_up())
    # the first part's one-time costs (pyarrow's compute module, the Parquet writer) at start, not in a job
    log.debug("the Parquet sink warmed up in %.2f s", sinks.warm_up(info, selection.backend.dtype))
    return engine, selection


def queues_for(engines: list[Engine], refs: list[str | None]) -> list[str]:
    """The shard queues a worker consumes: one per hosted model, under the names producers use."""
    names = []
    for engine, ref in zip(engines, refs):
        names.append(queue_name(engine.info.kind, ref or engine.info.name))
    return sorted(set(names))


def inline_queues_for(engines: list[Engine], refs: list[str | None]) -> list[str]:
    """The inline-call queue beside each shard queue, under the names producers use."""
    return sorted({inline_queue_name(engine.info.kind, ref or engine.info.name) for engine, ref in zip(engines, refs)})


def consume_without_acks(app: Celery, queues: list[str]) -> None:
    """Declare ``queues`` on ``app`` as consumed with ``no_ack``: the broker keeps no
    unacknowledged copy (``producer.jobs.inline_queue_name`` says why that is right for inline
    calls). Celery then picks these declarations when the worker selects the queues by name."""
    for name in queues:
        app.amqp.queues.add(Queue(name, Exchange(name), routing_key=name, no_ack=True))


#: Workers started in this process so far: the second and later ones get a host name of their own.
_workers = itertools.count(1)


def host_name() -> str:
    """A new worker's Celery host name: ``embedfleet-PID@HOST`` for the process's first worker,
    ``embedfleet-PID-N@HOST`` for its N-th. Two workers of one process (``embedfleet run`` beside
    an embedded ``serve``) must not share one: the name is their remote-control (pidbox) queue,
    and a shared queue hands each message to whichever of them reads it first, so a broadcast
    reaches one of them and the stopping worker's ``cancel_consumer`` can cancel the other's
    queues (stop 26: the embedded facade then answered nothing)."""
    n = next(_workers)
    return f"embedfleet-{os.getpid()}{'' if n == 1 else f'-{n}'}@{socket.gethostname()}"


class WorkerThreads(ThreadTaskPool):
    """Celery's thread pool, whose threads trace tasks with their own worker's app.

    Celery's worker runs a task under the *current* app of the pool thread (``trace_task_ret``);
    a new thread has none and takes the process's default, the worker started last. With two
    workers in one process, the first one's tasks would run as the last one's: its task objects,
    its result backend, and its engines (``worker.hosting.registry.of`` finds them by the app)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.executor.shutdown(wait=False)  # Celery's own, no thread started yet: replaced
        self.executor = ThreadPoolExecutor(max_workers=self.limit, initializer=self.app.set_current)


#: A consumer that dies more often than this within the window makes the worker exit.
MAX_CONSUMER_RESTARTS = 5
RESTART_WINDOW_S = 600

class InProcessWorker:
    """Engines plus a Celery worker consuming their queues on a background thread.

    With a real broker, ``start()`` called on the main thread also takes over SIGTERM and
    SIGINT: the first one interrupts whatever runs (model loading included) with
    ``KeyboardInterrupt``; ``stop()`` then gives unfinished shards back to the queue, and a
    watchdog ends the process after the ``EMBEDFLEET_STOP_GRACE`` setting's seconds if anything
    hangs. A second signal exits at once.
    """

    def __init__(self, spec: WorkerSpec, broker: str = MEMORY_BROKER, backend: str | None = None,
                 handle_signals: bool | None = None) -> None:
        self.spec = spec
        self.hostname = host_name()
        #: an in-memory broker this worker made for itself (given one that names none, such as
        #: ``MEMORY_BROKER``); dropped at its stop. A named one (``memory://localhost/NAME``) is shared.
        self._private_broker = broker.startswith("memory://") and not memory_broker.names_one(broker)
        if self._private_broker:  # a broker of its own, named after it (``worker.hosting.memory_broker``)
            broker = memory_broker.private_url(self.hostname.split("@", 1)[0])
        self.broker = broker
        self.app: Celery = create_app(broker, backend, prefetch=1)
        if broker.startswith("memory://"):
            self.app.conf.broker_transport = memory_broker.TRANSPORT
            # The in-memory transport polls its queues; kombu's default of 1 s left a shard slot
            # idle for up to a second after each shard (`embedfleet run`: most of a small job).
            self.app.conf.broker_transport_options = {"polling_interval": MEMORY_POLL_S}
        #: this worker's engines by model reference, for its tasks (found through ``self.app``)
        self.registry = runtime.of(self.app)
        #: this worker's "stopping" flag, for its tasks (found through ``self.app`` too)
        self.stopping = stop.of(self.app)
        self.engines: list[Engine] = []
        #: How each engine's backend was chosen, in the order of ``engines``.
        self.selections: list[Selection] = []
        #: models asked for but refused (``WorkerSpec.keep_refused``): (reference, what it is)
        self.refused: list[tuple[str | None, ModelInfo]] = []
        self.queues: list[str] = []  # shard queues
        self.inline_queues: list[str] = []
        self._controller: Any = None
        self._thread: threading.Thread | None = None
        self._handle_signals = (not broker.startswith("memory://")) if handle_signals is None else handle_signals
        self._signalled = threading.Event()
        self._sweeper: Any = None
        self._heartbeat: Any = None

    def start(self) -> "InProcessWorker":
        if self._handle_signals:
            self.install_signal_handlers()
            note_failure = poison.deliveries_for(self.broker).note_failure
            limits.hard_limit_of(self.app).action = limits.stop_at_hard_limit(note_failure)
        loaded: list[tuple[str | None, Engine, Selection]] = []
        for model in self.spec.models:
            try:
                engine, selection = load_engine(model, self.spec)
            except UnsupportedModel as exc:
                if not self.spec.keep_refused:
                    raise
                self._refuse(model, exc)
                continue
            self.registry.register(engine, model)
            loaded.append((model, engine, selection))
        self.engines = [engine for _, engine, _ in loaded]
        self.selections = [selection for _, _, selection in loaded]
        refs = [model for model, _, _ in loaded]
        refused = [(ref or info.name, info) for ref, info in self.refused]
        self.queues = sorted(set(queues_for(self.engines, refs)) | {queue_name(i.kind, r) for r, i in refused})
        self.inline_queues = sorted(set(inline_queues_for(self.engines, refs))
                                    | {inline_queue_name(i.kind, r) for r, i in refused})
        consume_without_acks(self.app, self.inline_queues)
        use_roots(self.app, self.spec.storage_roots)
        for name in self.queues + self.inline_queues:
            declare_queue(self.app, name)
        # Celery traces a task with the *current* app; this worker's pool threads are given this
        # app (``WorkerThreads``), and threads that have none (eager calls, a caller's own) take
        # the default: this one, the process's latest worker. Under another app, results would go
        # to that app's backend (a disabled one: every inline call times out) and the task would
        # look for its engines in that app's registry.
        self.app.set_default()
        # Everything loaded so far (torch, transformers, the weights' Python objects) lives as
        # long as the process: out of the collector's sight, a full collection takes well under
        # a millisecond instead of ~200 ms, a pause that would otherwise land on some request.
        gc.collect()
        gc.freeze()
        on_redis = self.broker.startswith(("redis://", "rediss://"))
        if on_redis:  # alive (and claiming what it holds) before the first message arrives
            self._heartbeat = _heartbeat(self.broker, self.hostname)
        self._start_consumer()
        if on_redis:
            from worker.hosting.sweeper import Sweeper

            self._sweeper = Sweeper(self.app, self.broker, self.queues).start()
        log.info("worker consuming %s", ", ".join(self.queues + self.inline_queues))
        return self

    def _refuse(self, model: str | None, error: UnsupportedModel) -> None:
        """Keep a refused model's queues, so its shards fail with the reason instead of waiting."""
        info = describe(model, trust_remote_code=self.spec.trust_remote_code)
        self.registry.refuse(info, error, model)
        self.refused.append((model, info))
        log.error("refusing to serve %s; its jobs on this worker fail with: %s", model or info.name, error)

    def _start_consumer(self) -> None:
        """A Celery consumer on a thread, feeding the engines already loaded (kept on restarts)."""
        ready = threading.Event()
        self.app.conf[SHARD_SLOTS] = self.spec.shard_slots
        self.app.conf[INLINE_QUEUES] = self.inline_queues
        self._controller = self.app.WorkController(
            app=self.app,
            pool_cls=WorkerThreads,
            consumer_cls=LaneConsumer,
            concurrency=self.spec.shard_slots + (self.spec.inline_slots if self.inline_queues else 0),
            queues=self.queues,
            hostname=self.hostname,
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            loglevel="WARNING",
            ready_callback=lambda *_: ready.set(),
        )
        self._thread = threading.Thread(target=self._controller.start, name="ef-celery", daemon=True)
        self._thread.start()
        while not ready.wait(0.2):  # a short wait, so a signal is handled promptly
            if not self._thread.is_alive():
                raise Unavailable("the worker's consumer stopped while starting (see the log)")

    # ------------------------------------------------------------------ signals
    def install_signal_handlers(self) -> None:
        """SIGTERM behaves like Ctrl+C; only possible on the main thread (else a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signalled.is_set():
            log.warning("second signal: exiting now")
            os._exit(128 + signum)
        self._signalled.set()
        log.warning("signal %d: stopping (unfinished work goes back to the queue)", signum)
        self.stopping.begin()
        _arm_watchdog(settings().stop_grace, limits.EXIT_TIME_LIMIT if limits.hard_limit_of(self.app).tripped else 1)
        raise KeyboardInterrupt

    def serve_forever(self, on_ready: Callable[["InProcessWorker"], None] | None = None) -> int:
        """Start, run until SIGTERM / SIGINT, stop. Returns the exit code (0 after a signal)."""
        try:
            self.start()
            if on_ready is not None:
                on_ready(self)
            restarts: list[float] = []
            while True:
                while self.alive():
                    time.sleep(0.5)
                # kombu can die of an "unrecoverable" error when the broker drops mid-ack; the
                # models are still loaded, so start a new consumer instead of exiting (its
                # unacknowledged messages were restored to the queue). A consumer that keeps
                # dying is a real fault: exit and let the supervisor decide.
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < RESTART_WINDOW_S] + [now]
                if len(restarts) > MAX_CONSUMER_RESTARTS:
                    log.error("the worker's consumer stopped %d times in %d s; exiting", len(restarts),
                              RESTART_WINDOW_S)
                    return 1
                log.warning("the worker's consumer stopped on its own; starting a new one")
                time.sleep(1.0)
                self._start_consumer()
        except KeyboardInterrupt:
            return limits.EXIT_TIME_LIMIT if limits.hard_limit_of(self.app).tripped else 0
        finally:
            self.stop()

    # ------------------------------------------------------------------ lifecycle
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop taking messages, then stop the engines (in-flight shards fail fast and go back to
        their queue; in-flight inline calls are sent again), then the consumer. Consumption ends
        first so that what goes back is taken by another worker, not by this one on its way out.
        A broker this worker made for itself goes with it: nothing else consumes it."""
        self.stopping.begin()
        if self._sweeper is not None:
            self._sweeper.stop()
        try:
            self._stop_consuming()
            for engine in self.registry.unregister_all():
                engine.stop()
            if self._controller is not None:
                self._controller.stop(in_sighandler=False, exitcode=0)
            if self._thread is not None:
                self._thread.join(10)
            if self._heartbeat is not None:  # last: what it held was given back by now
                self._heartbeat.stop()
                self._heartbeat = None
        finally:
            self.stopping.reset()
            if self._private_broker:
                memory_broker.drop(self.broker)
                poison.forget(self.broker)  # its counts and isolation went with it
                isolation.forget(self.broker)

    def _stop_consuming(self) -> None:
        """Cancel this worker's queues through Celery's remote control (run by the consumer's own
        thread, as kombu requires). Without remote control (SQS) the stop goes on regardless; a
        message this worker then takes again fails with a clear error or is retried by it."""
        if not self.alive() or not self.app.conf.worker_enable_remote_control:
            return
        for queue in self.queues + self.inline_queues:
            try:
                self.app.control.cancel_consumer(queue, destination=[self.hostname], reply=True, timeout=1.0)
            except Exception as exc:  # the broker is gone: nothing more will arrive anyway
                log.warning("could not stop consuming %s: %s", queue, exc)
                return

    def __enter__(self) -> "InProcessWorker":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _heartbeat(broker: str, hostname: str) -> Any:
    """This worker's liveness key on the broker's Redis (``worker.hosting.liveness``)."""
    import redis

    from worker.hosting.liveness import Heartbeat

    client = redis.Redis.from_url(broker, socket_connect_timeout=5, socket_timeout=10)
    return Heartbeat(client, hostname, settings().liveness_ttl).start()


def _arm_watchdog(seconds: int, code: int = 1) -> None:
    """Whatever hangs during shutdown (a stuck device call, a dead network), exit anyway."""
    timer = threading.Timer(seconds, lambda: os._exit(code))
    timer.daemon = True
    timer.start()
