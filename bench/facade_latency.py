"""What the HTTP facade adds over the engine: single-text latency and 64-client throughput.

Contenders, in one run on one machine, on the bundled all-MiniLM-L6-v2 (fp32, CPU):
* engine alone: ``Engine.run([text])`` in this process (no queue, no HTTP);
* queue only (thin): ``send_task`` + result through a real Redis to an ``embedfleet worker``;
* embedded: ``embedfleet serve`` (in-process worker, memory transport) over HTTP;
* thin: ``embedfleet serve --broker redis://...`` over HTTP, jobs to the same ``embedfleet worker``.
Servers and workers are subprocesses, as deployed; the client is this process (httpx, keep-alive).

    python bench/facade_latency.py --requests 300 --clients 64 --out bench/RESULTS-facade.md
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENTRY = "import worker.serve; from worker.cli import main; main()"
TEXT = "A short query about embedding servers and how fast they answer"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def timed(fn: Callable[[], Any], n: int, warmup: int) -> list[float]:
    """Milliseconds per call, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def summary(ms: list[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "mean": statistics.fmean(ms)}


# ------------------------------------------------------------------------------ processes
def spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-c", ENTRY, *args], cwd=ROOT, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text()[-3000:])
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready: {log.read_text()[-3000:]}")


class Redis:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed")
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


# ------------------------------------------------------------------------------ measurements
def engine_alone(n: int, warmup: int, clients: int, total: int) -> tuple[dict[str, float], float]:
    """Single-text latency of the bare engine, and its throughput on ``clients`` concurrent submits."""
    from producer.jobs import Options
    from worker.backends import load_backend
    from worker.engine.pipeline import Engine
    from worker.models import describe

    info = describe(None)
    engine = Engine(info, load_backend("torch", info, "cpu", "auto")).start()
    try:
        latency = summary(timed(lambda: engine.run([TEXT], Options()), n, warmup))
        start = time.perf_counter()
        done = 0
        while done < total:
            futures = [engine.submit([f"{TEXT} {done + i}"]) for i in range(clients)]
            for future in futures:
                future.result(120)
            done += clients
        return latency, done / (time.perf_counter() - start)
    finally:
        engine.stop()


def queue_only(broker: str, n: int, warmup: int) -> dict[str, float]:
    """send_task + result through Redis, no HTTP: what the queue itself costs."""
    from producer.broker import INLINE_TASK, make_app
    from producer.jobs import EmbedJob

    app = make_app(broker)
    job = EmbedJob(model="all-MiniLM-L6-v2", inputs=[TEXT]).model_dump(mode="json")

    def call() -> None:
        result = app.send_task(INLINE_TASK, args=[job], queue="embed.all-MiniLM-L6-v2", expires=60)
        result.get(timeout=60)
        result.forget()

    return summary(timed(call, n, warmup))


def http_latency(url: str, n: int, warmup: int) -> dict[str, float]:
    with httpx.Client(base_url=url, timeout=60) as client:
        body = {"input": TEXT, "model": "all-MiniLM-L6-v2"}

        def call() -> None:
            response = client.post("/v1/embeddings", json=body)
            response.raise_for_status()

        return summary(timed(call, n, warmup))


def http_throughput(url: str, clients: int, total: int) -> tuple[float, float]:
    """Requests/s with ``clients`` concurrent single-text clients, and their p50 latency (ms)."""
    latencies: list[float] = []

    async def client_loop(client: httpx.AsyncClient, k: int, count: int) -> None:
        for i in range(count):
            start = time.perf_counter()
            response = await client.post("/v1/embeddings", json={"input": f"{TEXT} {k} {i}",
                                                                  "model": "all-MiniLM-L6-v2"})
            response.raise_for_status()
            latencies.append((time.perf_counter() - start) * 1000)

    async def main() -> float:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
            await asyncio.gather(*(client_loop(client, k, 2) for k in range(clients)))  # warm-up
            latencies.clear()
            start = time.perf_counter()
            await asyncio.gather(*(client_loop(client, k, total // clients) for k in range(clients)))
            return time.perf_counter() - start

    seconds = asyncio.run(main())
    return len(latencies) / seconds, float(np.percentile(latencies, 50))


# ------------------------------------------------------------------------------ report
def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def row(name: str, s: dict[str, float], base: dict[str, float] | None) -> str:
    added = f"{s['p50'] - base['p50']:+.2f}" if base else "-"
    return f"| {name} | {s['p50']:.2f} | {s['p99']:.2f} | {s['mean']:.2f} | {added} |"


def run(args: argparse.Namespace) -> str:
    work = Path(tempfile.mkdtemp(prefix="ef-bench-"))
    results: dict[str, Any] = {}
    load_before = os.getloadavg()
    results["engine"], results["engine_tput"] = engine_alone(args.requests, args.warmup, args.clients, args.total)
    print("engine alone", results["engine"], f"{results['engine_tput']:.0f} texts/s", flush=True)

    port = free_port()
    embedded = spawn(["serve", "--port", str(port), "--device", "cpu", "--concurrency", str(args.clients)],
                     work / "embedded.log")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, embedded, work / "embedded.log")
        results["embedded"] = http_latency(url, args.requests, args.warmup)
        results["embedded_tput"] = http_throughput(url, args.clients, args.total)
        print("embedded", results["embedded"], results["embedded_tput"], flush=True)
    finally:
        stop(embedded)

    redis = Redis(work)
    worker = spawn(["worker", "--broker", redis.url, "--device", "cpu", "--concurrency", str(args.clients)],
                   work / "worker.log")
    port = free_port()
    thin = spawn(["serve", "--broker", redis.url, "--port", str(port)], work / "thin.log")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, worker, work / "worker.log")
        wait_ready(url, thin, work / "thin.log")
        results["queue"] = queue_only(redis.url, args.requests, args.warmup)
        results["thin"] = http_latency(url, args.requests, args.warmup)
        results["thin_tput"] = http_throughput(url, args.clients, args.total)
        print("queue only", results["queue"], "thin", results["thin"], results["thin_tput"], flush=True)
    finally:
        stop(thin)
        stop(worker)
        redis.proc.terminate()

    load_after = os.getloadavg()
    e = results["engine"]
    lines = [
        f"## Facade latency and throughput — {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {machine()}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
        "(the cores are shared with other work: read the spread, not only the medians).",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"Model: bundled all-MiniLM-L6-v2, fp32, CPU (torch). One text of {len(TEXT.split())} words per request; "
        f"{args.requests} timed requests after {args.warmup} warm-up ones, one at a time.",
        "",
        "| path | p50 ms | p99 ms | mean ms | added at p50 vs engine, ms |",
        "|---|---|---|---|---|",
        row("engine alone (Engine.run, in process)", e, None),
        row("queue only: send_task + result via Redis (no HTTP)", results["queue"], e),
        row("embedded: HTTP -> facade -> memory transport -> worker", results["embedded"], e),
        row("thin: HTTP -> facade -> Redis -> `embedfleet worker`", results["thin"], e),
        "",
        f"Throughput, {args.clients} concurrent clients, single-text requests ({args.total} timed):",
        "",
        "| path | requests/s | p50 ms under load |",
        "|---|---|---|",
        f"| engine alone ({args.clients} concurrent submits) | {results['engine_tput']:.0f} | - |",
        f"| embedded | {results['embedded_tput'][0]:.0f} | {results['embedded_tput'][1]:.1f} |",
        f"| thin (Redis) | {results['thin_tput'][0]:.0f} | {results['thin_tput'][1]:.1f} |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--total", type=int, default=1280, help="Timed requests in the throughput run")
    parser.add_argument("--out", type=Path, default=None, help="Append the Markdown report here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    report = run(args)
    print(report)
    if args.out:
        with args.out.open("a") as handle:
            handle.write(report + "\n")


if __name__ == "__main__":
    main()
