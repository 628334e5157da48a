"""A private redis-server for the engine processes of one host (``run`` and embedded ``serve``
on several devices).

Why Redis and not the in-memory transport: engine processes are separate interpreters, so their
queue must live outside any one of them, and it must keep an unacknowledged shard for redelivery
when the engine holding it dies; Redis does both with the very code a fleet runs (late acks, the
heartbeat and sweeper of ``worker.hosting.liveness`` / ``sweeper``), so several devices on one
host are simply a small fleet. It listens on 127.0.0.1 on a free port with a random password,
keeps nothing on disk, and is stopped with the command. A host without redis-server gets a clear
error naming the setting (``EMBEDFLEET_REDIS_SERVER``) and the way round it (``--devices`` with one
device, or a fleet with ``worker --broker``).
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from producer.errors import Unavailable
from producer.settings import Settings, settings

#: how long redis-server may take to answer PING after it was started
START_TIMEOUT_S = 15.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalBroker:
    """redis-server as a child of this process, for this command's engine processes only."""

    def __init__(self) -> None:
        self.password = secrets.token_hex(16)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> "LocalBroker":
        binary = shutil.which(settings().redis_server)
        if binary is None:
            raise Unavailable(f"several devices on one host need redis-server as their host-local broker, and "
                              f"{settings().redis_server!r} was not found (install redis-server, or set "
                              f"{Settings.env_name('redis_server')} to its path; or run one engine: --devices with one "
                              "device, or a fleet: `embedfleet worker --broker redis://...`)", param="devices")
        self._dir = tempfile.TemporaryDirectory(prefix="embedfleet-broker-")
        for _attempt in range(3):  # another process may take the free port before redis-server binds it
            self.port = free_port()
            self.proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass", self.password,
                 "--save", "", "--appendonly", "no", "--dir", self._dir.name, "--loglevel", "warning",
                 "--logfile", str(Path(self._dir.name) / "redis.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)  # Ctrl+C reaches this command, which stops the engines first
            if self._wait_ready():
                return self
            self._kill()
        raise Unavailable(f"redis-server ({binary}) did not start as the host-local broker: "
                          f"{self._log_tail() or 'no log'}", param="devices")

    def _wait_ready(self) -> bool:
        import redis

        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.5)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                if client.ping():
                    return True
            except redis.exceptions.RedisError:
                time.sleep(0.05)
        return False

    def _log_tail(self) -> str:
        if self._dir is None:
            return ""
        path = Path(self._dir.name) / "redis.log"
        return path.read_text(errors="replace")[-500:].strip() if path.exists() else ""

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        """Stop redis-server (after the engines: they give their work back to it on the way out)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self._kill()
        self.proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
