"""What every benchmark needs besides its own measurement: ports, a Redis of its own, processes,
and a line describing the machine for bench/RESULTS.md.

Benchmarks import the package and this module, never each other or the tests.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
#: The ``embedfleet`` console script of the interpreter running the benchmark.
EMBEDFLEET = str(Path(sys.executable).with_name("embedfleet"))
#: ``python -c ENTRY ...`` runs the CLI of whichever checkout is the working directory, old or new.
ENTRY = "from worker.cli import main; main()"
#: The single text of the latency benchmarks.
TEXT = "A short query about embedding servers and how fast they answer"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (or what platform says elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    """One line for RESULTS.md: CPU model, cores, operating system."""
    return f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


class RedisProcess:
    """A redis-server of the benchmark's own on a free port, without persistence."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed")
        self.port = free_port()
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait()

    def _wait(self) -> None:
        import redis

        for _ in range(300):
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.5).ping():
                    return
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise SystemExit("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        stop(self.proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_for_line(proc: subprocess.Popen, log: Path, marker: str, timeout: float = 300) -> None:
    """Until ``marker`` appears in the process's log; its exit meanwhile is an error with the log."""
    deadline = time.monotonic() + timeout
    while marker not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{marker!r} never appeared:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)



def wait_healthy(url: str, procs: list[subprocess.Popen], log: Path, timeout: float = 240) -> None:
    """Until ``url``/health answers 200; a server process that exits meanwhile ends the benchmark with its log.

    urllib rather than httpx, so the benchmarks that run on the device machine need nothing more there.
    """
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise SystemExit(log.read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:  # refused, or 503 until the workers answer (HTTPError is an OSError)
            pass
        time.sleep(0.25)
    raise SystemExit(f"{url} not ready: {log.read_text()[-3000:]}")


def timed(fn: Callable[[], Any], tokens: int, passes: int) -> dict[str, Any]:
    """One warm-up pass, then ``passes`` timed ones (the GPU synchronized around each, where there
    is one): tokens/s of the best and the worst pass, and the spread between them."""
    import torch

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    fn()
    times = []
    for _ in range(passes):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    rates = [tokens / t for t in times]
    return {"tokens": tokens, "best": max(rates), "worst": min(rates),
            "spread_pct": 100 * (max(rates) - min(rates)) / max(rates), "times_s": times}


def gpu_used_gib() -> float:
    """GPU memory in use on the current device, the CUDA context included (what nvidia-smi shows)."""
    import torch

    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 1024 ** 3


def write_corpus(texts: list[str], path: Path, row_group_size: int) -> Path:
    """A Parquet corpus of ``texts`` with string ids ``t0000000``..., one row group per shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [f"t{i:07d}" for i in range(len(texts))], "text": texts}), path,
                   row_group_size=row_group_size)
    return path


def print_report(text: str, out: Path | None) -> None:
    """Print a benchmark's Markdown report, and append it to ``out`` (its ``--out``) when given."""
    print(text)
    if out:
        with out.open("a") as handle:
            handle.write(text + "\n")
