"""Several facade processes on one port: SO_REUSEPORT listeners, one forked child each.

One facade process is one event loop on one core: parsing, validation and rendering of every
request run there. ``serve_processes`` forks ``processes`` children; each builds its own app
(so each has its own directory, publisher and reply subscription: ``RedisReplies`` gives every
process a task-id prefix of its own, so a process receives exactly its own results on its one
pattern subscription, and no result is delivered twice) and listens on its own socket bound with
``SO_REUSEPORT``, so the kernel spreads new connections evenly over the processes (one shared
listening socket lets whichever process wakes first take most of them).

The parent only supervises: it forwards SIGTERM / SIGINT (each child's uvicorn then stops
gracefully, finishing what it holds), and forks a replacement for a child that dies on its own.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

#: A child that dies sooner than this after its start is restarted after a pause; after
#: ``QUICK_DEATHS`` such deaths in a row (a bad setting: it would only die again) the server stops.
MIN_LIFETIME_S = 10.0
QUICK_DEATHS = 3


def reuse_port_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening socket on ``host:port`` that other processes of this user may bind too."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def _child(build: Callable[[], Any], config: dict[str, Any]) -> int:
    """Runs in a forked child: its own socket, its own app, uvicorn until told to stop."""
    import uvicorn

    try:
        sock = reuse_port_socket(config["host"], config["port"])
        server = uvicorn.Server(uvicorn.Config(build(), **config))
        server.run(sockets=[sock])
        return 0 if server.started else 3
    except BaseException:  # noqa: BLE001 - a child must never return into the parent's code
        log.exception("facade process %d failed", os.getpid())
        return 1


def _fork(build: Callable[[], Any], config: dict[str, Any]) -> int:
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os._exit(_child(build, config))
    return pid


def serve_processes(build: Callable[[], Any], config: dict[str, Any], processes: int) -> int:
    """Run ``processes`` facade processes on ``config``'s host and port until SIGTERM / SIGINT.

    ``build`` makes the ASGI app in each child (after the fork: no thread or connection of the
    parent is shared); ``config`` holds ``uvicorn.Config``'s keyword arguments. Returns the exit
    status: 0 after a requested stop, else that of the child that could not keep running.
    """
    stopping = False

    def stop(signum: int, _: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def spawn() -> None:
        pid = _fork(build, config)
        children[pid] = time.monotonic()
        if stopping:  # the signal came during the fork
            os.kill(pid, signal.SIGTERM)

    children: dict[int, float] = {}
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    quick = 0  # deaths in a row soon after a start
    try:
        for _ in range(processes):
            spawn()
        while children:
            try:
                pid, raw = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries os.wait itself
                continue
            started = children.pop(pid, None)
            if started is None or stopping:
                continue
            code = os.waitstatus_to_exitcode(raw)
            quick = quick + 1 if time.monotonic() - started < MIN_LIFETIME_S else 0
            if quick >= QUICK_DEATHS:
                log.error("facade processes exited right after their start %d times (last: %d); stopping", quick, code)
                status = code or 1
                stop(signal.SIGTERM, None)
                continue
            log.warning("facade process %d exited with %d; starting another", pid, code)
            time.sleep(1.0 if quick else 0.0)
            if not stopping:
                spawn()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status
