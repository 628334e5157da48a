"""The parent of a multi-device worker: one engine process per device, kept alive.

Why one process per device, each consuming the queues itself: the broker is already the
fleet's load balancer (late acks, prefetch 1, a visibility timeout), so N engine processes on
one host are N ordinary workers to it, and a shard or an inline call goes to whichever engine
asks first: no second scheduler, no host-local hop, and a dead engine loses nothing but its
unacknowledged messages, which the broker gives back. Each process has its own interpreter, GIL,
CUDA context and tokenizer threads, so one GPU's host work never waits on another's. (The
measurement behind the choice is in bench/RESULTS.md, "Every device of a host".)

The supervisor itself loads no model and imports no torch beyond counting GPUs. It starts the
engines (engines that share a device start one after another, so each memory profile sees the
device as the previous one left it), restarts one that dies with exponential backoff (a CUDA
error, an out-of-memory that could not be split, an Xid that killed the context), and on SIGTERM
or SIGINT stops every child within ``EMBEDFLEET_STOP_GRACE`` and then kills what is left. An
engine that fails on its very first start (a bad model reference, a device that does not exist)
stops the whole worker with that error: retrying a configuration error helps no one.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

from producer.settings import settings
from worker.hosting.devices import DeviceSlot
from worker.hosting.engine_process import run_engine
from worker.hosting.host import WorkerSpec

log = logging.getLogger(__name__)

#: the first restart waits this long; each death in a row doubles it, up to ``BACKOFF_MAX_S``
BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 60.0
#: an engine that served this long before dying starts again at the shortest backoff
STABLE_S = 60.0
#: how often the supervisor looks at its children and its stop flag
TICK_S = 0.2


@dataclass
class EngineChild:
    """One engine process and its history."""

    slot: DeviceSlot
    process: Any = None
    conn: Connection | None = None
    started_at: float = 0.0
    ready_at: float | None = None
    ever_ready: bool = False
    failures: int = 0
    restarts: int = 0
    restart_at: float | None = None
    pid: int | None = None
    last: dict[str, Any] = field(default_factory=dict)

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()


def backoff(failures: int) -> float:
    """Seconds before restarting an engine that died ``failures`` times in a row (1, 2, 4, ... 60)."""
    return min(BACKOFF_MAX_S, BACKOFF_START_S * 2 ** max(0, failures - 1))


def waves(slots: list[DeviceSlot]) -> list[list[int]]:
    """Slot indices in start order: the n-th engine of every device together, devices in parallel."""
    seen: dict[str, int] = {}
    rounds: list[list[int]] = []
    for i, slot in enumerate(slots):
        n = seen.get(slot.device, 0)
        seen[slot.device] = n + 1
        while len(rounds) <= n:
            rounds.append([])
        rounds[n].append(i)
    return rounds


class Supervisor:
    """Start, watch, restart and stop one engine process per ``DeviceSlot``."""

    def __init__(self, slots: list[DeviceSlot], spec: WorkerSpec, broker: str, result_backend: str | None = None,
                 verbose: bool = False,
                 on_engine_ready: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.slots = slots
        self.spec = spec
        self.broker = broker
        self.result_backend = result_backend
        self.verbose = verbose
        self.children = [EngineChild(slot) for slot in slots]
        self.on_engine_ready = on_engine_ready
        self._context = multiprocessing.get_context("spawn")
        self._stop = threading.Event()
        self._signals = 0
        #: why the worker ended when an engine could not start (its label and reason), else None
        self.failure: str | None = None

    # ------------------------------------------------------------------ children
    def _spawn(self, child: EngineChild) -> None:
        parent_end, child_end = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=run_engine, name=f"ef-engine-{child.slot.label}",
            args=(child.slot, self.spec, self.broker, self.result_backend, child_end, self.verbose))
        process.start()
        child_end.close()
        child.process, child.conn, child.pid = process, parent_end, process.pid
        child.started_at, child.ready_at, child.restart_at = time.monotonic(), None, None
        log.info("engine %s: started (pid %d)", child.slot.label, process.pid)

    def _read(self, child: EngineChild) -> None:
        """Messages from a child: readiness, or why it could not start."""
        assert child.conn is not None
        try:
            while child.conn.poll():
                message = child.conn.recv()
                child.last = message
                if message.get("ready"):
                    child.ready_at = time.monotonic()
                    child.ever_ready = True
                    if self.on_engine_ready is not None:
                        self.on_engine_ready(message)
        except (EOFError, OSError):
            child.conn.close()
            child.conn = None

    def _reap(self, child: EngineChild) -> int | None:
        """A child that exited: schedule its restart; returns an exit code when the worker must end."""
        if child.conn is not None:
            self._read(child)
        code = child.process.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        child.process = None
        if self._stop.is_set():
            return None
        if not child.ever_ready:
            reason = child.last.get("error") or f"it ended with {how} while starting (see the log above)"
            log.error("engine %s could not start: %s; stopping the worker", child.slot.label, reason)
            self.failure = f"engine {child.slot.label} could not start: {reason}"
            return int(child.last.get("code") or 1)
        served = time.monotonic() - (child.ready_at or child.started_at)
        child.failures = 1 if child.ready_at is not None and served >= STABLE_S else child.failures + 1
        delay = backoff(child.failures)
        child.restart_at = time.monotonic() + delay
        log.warning("engine %s (pid %s) died with %s; restarting it in %.0f s (its unacknowledged work goes "
                    "back to the queue)", child.slot.label, child.pid, how, delay)
        return None

    # ------------------------------------------------------------------ the loop
    def serve_forever(self, on_ready: Callable[[list[dict[str, Any]]], None] | None = None) -> int:
        """Start every engine, keep them alive until SIGTERM / SIGINT, stop them. Returns the exit
        code: 0 after a signal, a failed first start's code otherwise."""
        self._install_signals()
        try:
            for wave in waves(self.slots):
                for i in wave:
                    self._spawn(self.children[i])
                code = self._until(lambda: all(self.children[i].ready_at is not None for i in wave))
                if code is not None:
                    return code
                if self._stop.is_set():  # a signal while starting: start no further wave
                    return 0
            if on_ready is not None:
                on_ready([child.last for child in self.children])
            code = self._until(lambda: False)
            return 0 if code is None else code
        finally:
            self.stop()

    def _until(self, done: Callable[[], bool]) -> int | None:
        """Watch the children until ``done()`` or a stop; an exit code when the worker must end."""
        while not self._stop.is_set() and not done():
            now = time.monotonic()
            for child in self.children:
                if child.process is None and child.restart_at is not None and now >= child.restart_at:
                    child.restarts += 1
                    self._spawn(child)
            handles = [c.process.sentinel for c in self.children if c.process is not None]
            handles += [c.conn for c in self.children if c.conn is not None]
            wait(handles, timeout=TICK_S)
            for child in self.children:
                if child.conn is not None:
                    self._read(child)
                if child.process is not None and not child.process.is_alive():
                    code = self._reap(child)
                    if code is not None:
                        return code
        return None

    # ------------------------------------------------------------------ stopping
    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: killing the engines and exiting now")
            for child in self.children:
                if child.alive():
                    child.process.kill()
            os._exit(128 + signum)
        log.warning("signal %d: stopping %d engine(s) (unfinished work goes back to the queue)", signum,
                    sum(c.alive() for c in self.children))
        self._stop.set()

    def request_stop(self) -> None:
        """Ask ``serve_forever`` (running on another thread) to stop every engine and return."""
        self._stop.set()

    def stop(self) -> None:
        """SIGTERM to every engine; whatever is still there after the stop grace is killed."""
        self._stop.set()
        alive = [c for c in self.children if c.alive()]
        for child in alive:
            try:
                os.kill(child.process.pid, signal.SIGTERM)
            except ProcessLookupError:  # it ended on its own meanwhile
                pass
        deadline = time.monotonic() + settings().stop_grace + 2
        for child in alive:
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.is_alive():
                log.error("engine %s did not stop in time; killing it", child.slot.label)
                child.process.kill()
                child.process.join(5)
        for child in self.children:
            if child.conn is not None:
                child.conn.close()
                child.conn = None
