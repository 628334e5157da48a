"""Helpers for the facade tests: uvicorn in a thread, an `embedfleet worker` subprocess, references."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


class ServerThread:
    """uvicorn serving an ASGI app on a free port in a thread (its lifespan runs as in production)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the facade did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@dataclass
class Served:
    """A running facade and what the tests need to know about it."""

    url: str
    mode: str
    embed: str  # tiny embed model id
    bundled: str
    rerank: str | None = None
    classify: str | None = None
    worker_app: Any = None


def reference(engine: Any, texts: list[str], **options: Any) -> np.ndarray:
    from producer.jobs import Options

    result = engine.run(texts, Options(**options), timeout=120)
    assert not result.errors
    return result.values


class WorkerProcess:
    """``embedfleet worker`` in a subprocess: a real fleet member on a real broker."""

    def __init__(self, broker: str, models: list[str], log: Path) -> None:
        self.broker = broker
        self.models = models
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        args = [sys.executable, "-c", "from worker.cli import main; main()", "worker", "--broker", self.broker,
                "--device", "cpu", "--concurrency", "64"]
        for model in self.models:
            args += ["--model", model]
        args += ["--storage-root", str(self.log.parent)]  # inline calls only: it reads and writes no corpus
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def wait_ready(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    """Until /health says ready; a helper process that exits meanwhile fails at once, with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process exited: {log.read_text()[-2000:] if log else proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} did not become ready")
