"""What the HTTP facade adds over the engine: single-text latency and 64-client throughput.

Contenders, in one run on one machine, on the bundled all-MiniLM-L6-v2 (CPU; the same backend
and dtype in every path, ``--backend``/``--dtype``):
* engine alone: ``Engine.run([text])`` in this process (no queue, no HTTP);
* queue only: Celery's own ``send_task`` + ``AsyncResult.get`` through a real Redis to an
  ``embedfleet worker`` (no HTTP);
* embedded: ``embedfleet serve`` (in-process worker, memory transport) over HTTP;
* thin: ``embedfleet serve --broker redis://...`` over HTTP, jobs to the same ``embedfleet worker``;
  timed with a lean client (the standard library's ``http.client``), again with httpx, and with a bare
  socket (``RawClient``: the head read to its blank line, as wrk does).
Servers and workers are subprocesses, as deployed; the clients live in this process (keep-alive).

    python bench/facade_latency.py --requests 300 --out bench/RESULTS-facade.md

All paths run at once and latency is timed round by round (one call of each path per round,
each after ``--gap`` seconds of quiet), so on a shared machine a load swing shifts every path
alike; the report gives both the difference of medians and the median of per-round differences.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # `python bench/facade_latency.py` from the root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO as ROOT  # noqa: E402
from bench.common import ENTRY, TEXT, RedisProcess, free_port, machine, print_report, stop, wait_healthy  # noqa: E402
from producer.settings import passive_openmp  # noqa: E402


def summary(ms: list[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "mean": statistics.fmean(ms)}


# ------------------------------------------------------------------------------ processes
def spawn(args: list[str], log: Path, cwd: Path = ROOT) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               EMBEDFLEET_STORAGE_ROOTS=str(log.parent))  # a worker needs roots; these calls touch no storage
    return subprocess.Popen([sys.executable, "-c", ENTRY, *args], cwd=cwd, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


# ------------------------------------------------------------------------------ measurements
def start_engine(backend: str, dtype: str) -> Any:
    """The same engine the servers and the worker load (same backend and dtype, named explicitly:
    ``auto`` could measure its way to a different pick in each process)."""
    from worker.backends.select import load_backend
    from worker.engine.pipeline import Engine
    from worker.models.resolve import describe

    info = describe(None)
    return Engine(info, load_backend(backend, info, "cpu", dtype).backend).start()


def engine_throughput(engine: Any, clients: int, total: int) -> float:
    """Texts/s of the bare engine with ``clients`` single-text submits in flight at once."""
    start = time.perf_counter()
    done = 0
    while done < total:
        futures = [engine.submit([f"{TEXT} {done + i}"]) for i in range(clients)]
        for future in futures:
            future.result(120)
        done += clients
    return done / (time.perf_counter() - start)


class LeanClient:
    """Keep-alive HTTP/1.1 through the standard library's ``http.client``: close to what a load
    generator such as wrk spends per request, so the facade's own cost is not hidden behind a
    Python SDK's (httpx parses and validates far more; its row is reported beside this one)."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)

    def post(self, path: str, body: bytes) -> None:
        self.conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {data[:300]!r}")


class RawClient:
    """Keep-alive HTTP/1.1 on a bare socket, as a load generator such as wrk works: the request's bytes
    built once, the answer's head read to its blank line and only its Content-Length looked at.
    ``http.client`` parses every response head with the standard library's email parser, which on
    a core that sat idle costs the client a few hundred microseconds per call; this row shows how much
    of the "added" time is the client's own."""

    def __init__(self, url: str, path: str, body: bytes) -> None:
        import socket

        parts = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request = (f"POST {path} HTTP/1.1\r\nHost: {parts.hostname}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self.buffer = b""

    def post(self) -> None:
        self.sock.sendall(self.request)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        length = int(_CONTENT_LENGTH.search(head).group(1))  # type: ignore[union-attr]
        while len(self.buffer) < length:
            self.buffer += self._recv()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{head[:80]!r}: {body[:300]!r}")

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise RuntimeError("the server closed the connection")
        return chunk


_CONTENT_LENGTH = re.compile(rb"(?i)content-length:\s*(\d+)")


def callers(engine: Any, broker: str, embedded_url: str, thin_url: str,
            contender: dict[str, str] | None = None) -> dict[str, Callable[[], None]]:
    """One single-text call per path; all paths live at once so they are timed turn by turn.
    ``contender``: path name -> URL of an older checkout's servers, timed in the same rounds."""
    from producer.broker import INLINE_TASK, make_app
    from producer.jobs import EmbedJob, Options, inline_queue_name

    app = make_app(broker)
    job = EmbedJob(model="all-MiniLM-L6-v2", inputs=[TEXT]).model_dump(mode="json")
    body = {"input": TEXT, "model": "all-MiniLM-L6-v2"}
    raw = json.dumps(body).encode()
    embedded, thin = LeanClient(embedded_url), LeanClient(thin_url)
    thin_httpx = httpx.Client(base_url=thin_url, timeout=60)

    def queue() -> None:
        result = app.send_task(INLINE_TASK, args=[job], queue=inline_queue_name("embed", "all-MiniLM-L6-v2"),
                               expires=60)
        result.get(timeout=60)
        result.forget()

    calls: dict[str, Callable[[], None]] = {
        "engine": lambda: engine.run([TEXT], Options()),
        "queue": queue,
        "embedded": lambda: embedded.post("/v1/embeddings", raw),
        "thin": lambda: thin.post("/v1/embeddings", raw),
        "thin_httpx": lambda: thin_httpx.post("/v1/embeddings", json=body).raise_for_status(),
        "embedded_raw": RawClient(embedded_url, "/v1/embeddings", raw).post,
        "thin_raw": RawClient(thin_url, "/v1/embeddings", raw).post,
    }
    for name, url in (contender or {}).items():
        client = LeanClient(url)
        calls[name] = lambda client=client: client.post("/v1/embeddings", raw)  # type: ignore[misc]
        calls[f"{name}_raw"] = RawClient(url, "/v1/embeddings", raw).post
    return calls


def cpu_ns(pids: list[int]) -> int:
    """CPU time of these processes, every thread and every descendant, in ns (/proc's schedstat:
    exact, where utime and stime count 10 ms ticks)."""
    total = 0
    todo = list(pids)
    while todo:
        pid = todo.pop()
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                total += int((task / "schedstat").read_text().split()[0])
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError, IndexError):
            continue
    return total


def interleaved(calls: dict[str, Callable[[], None]], n: int, warmup: int, gap: float,
                servers: dict[str, list[int]] | None = None) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Each round times one call of every path, so load drift on a shared machine hits all alike.

    ``gap`` seconds of quiet precede every call: a path must not pay for the previous one's
    leftovers (the CPU math library's threads spin for a while after each forward pass, and
    on 2 cores that slows whatever runs next by several ms). The CPU time of the processes
    serving a path (``servers``) is read before its call and after the quiet that follows it,
    so what they spend after answering counts too; the mean per call (ms) comes back beside the
    latencies.
    """
    out: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, int] = {name: 0 for name in calls}
    servers = servers or {}
    time.sleep(gap)
    for round_ in range(warmup + n):
        for name, call in calls.items():
            before = cpu_ns(servers.get(name, []))
            start = time.perf_counter()
            call()
            elapsed = time.perf_counter() - start
            time.sleep(gap)
            if round_ >= warmup:
                out[name].append(elapsed * 1000)
                cpu[name] += cpu_ns(servers.get(name, [])) - before
    return out, {name: cpu[name] / 1e6 / max(1, n) for name in calls if servers.get(name)}


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
def paired(a: list[float], b: list[float]) -> float:
    """Median of per-round differences: what path ``a`` adds over ``b`` under the same load."""
    return float(np.median(np.array(a) - np.array(b)))


def run(args: argparse.Namespace) -> str:
    work = Path(tempfile.mkdtemp(prefix="ef-bench-"))
    load_before = os.getloadavg()
    engine = start_engine(args.backend, args.dtype)
    redis = RedisProcess(work)
    same = ["--device", "cpu", "--backend", args.backend, "--dtype", args.dtype]
    procs: list[subprocess.Popen] = []
    try:
        e_port, t_port = free_port(), free_port()
        embedded = spawn(["serve", "--port", str(e_port), *same, "--concurrency", str(args.clients)],
                         work / "embedded.log")
        worker = spawn(["worker", "--broker", redis.url, *same, "--concurrency", str(args.clients)],
                       work / "worker.log")
        thin = spawn(["serve", "--broker", redis.url, "--port", str(t_port)], work / "thin.log")
        procs = [embedded, worker, thin]
        e_url, t_url = f"http://127.0.0.1:{e_port}", f"http://127.0.0.1:{t_port}"
        contender: dict[str, str] = {}
        if args.contender:  # an older checkout's embedded server, and its thin facade and worker on db 2
            old, c_broker = Path(args.contender), f"{redis.url[:-2]}/2"
            ce_port, ct_port = free_port(), free_port()
            procs += [spawn(["serve", "--port", str(ce_port), *same, "--concurrency", str(args.clients)],
                            work / "embedded-c.log", old),
                      spawn(["worker", "--broker", c_broker, *same, "--concurrency", str(args.clients)],
                            work / "worker-c.log", old),
                      spawn(["serve", "--broker", c_broker, "--port", str(ct_port)], work / "thin-c.log", old)]
            contender = {"embedded@contender": f"http://127.0.0.1:{ce_port}",
                         "thin@contender": f"http://127.0.0.1:{ct_port}"}
        wait_healthy(e_url, [embedded], work / "embedded.log")
        wait_healthy(t_url, [worker], work / "worker.log")
        wait_healthy(t_url, [thin], work / "thin.log")
        for url, log in zip(contender.values(), ("embedded-c.log", "thin-c.log")):
            wait_healthy(url, procs[3:], work / log)
        card = httpx.get(f"{e_url}/v1/models").json()["data"][0]
        thin_card = httpx.get(f"{t_url}/v1/models").json()["data"][0]
        loaded = (engine.backend.name, engine.backend.dtype)
        for name, c in (("embedded", card), ("thin", thin_card)):
            if (c["backend"], c["dtype"]) != loaded:
                raise SystemExit(f"the {name} server runs {c['backend']} {c['dtype']}, the engine {loaded}: not comparable")
        servers = {"queue": [worker.pid], "embedded": [embedded.pid], "thin": [thin.pid, worker.pid],
                   "thin_httpx": [thin.pid, worker.pid], "embedded_raw": [embedded.pid], "thin_raw": [thin.pid, worker.pid]}
        if args.contender:
            servers.update({"embedded@contender": [procs[3].pid], "thin@contender": [procs[5].pid, procs[4].pid],
                            "embedded@contender_raw": [procs[3].pid], "thin@contender_raw": [procs[5].pid, procs[4].pid]})
        ms, server_ms = interleaved(callers(engine, redis.url, e_url, t_url, contender), args.requests, args.warmup,
                                    args.gap, servers)
        stats = {name: summary(values) for name, values in ms.items()}
        print({k: round(v["p50"], 2) for k, v in stats.items()}, flush=True)
        tput: dict[str, tuple[float, float]] = {}
        if args.total:
            tput["engine"] = (engine_throughput(engine, args.clients, args.total), float("nan"))
            tput["embedded"] = http_throughput(e_url, args.clients, args.total)
            tput["thin"] = http_throughput(t_url, args.clients, args.total)
            print(tput, flush=True)
    finally:
        for proc in procs:
            stop(proc)
        redis.stop()
        engine.stop()
    load_after = os.getloadavg()

    def line(name: str, label: str) -> str:
        s = stats[name]
        added = "-" if name == "engine" else f"{s['p50'] - stats['engine']['p50']:+.2f} / {paired(ms[name], ms['engine']):+.2f}"
        cpu = f"{server_ms[name]:.2f}" if name in server_ms else "-"
        return f"| {label} | {s['p50']:.2f} | {s['p99']:.2f} | {s['mean']:.2f} | {added} | {cpu} |"

    lines = [
        f"## Facade latency and throughput — {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {machine()}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
        "(the cores were shared with other work).",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"Model: bundled all-MiniLM-L6-v2 on {card['device']}, {card['backend']} {card['dtype']} in every path. One text of "
        f"{len(TEXT.split())} words per request. Latency: {args.requests} rounds after {args.warmup} warm-up "
        "rounds; each round times one call of every path in turn (so load drift hits all paths alike), "
        f"each call after {args.gap * 1000:.0f} ms of quiet; a path's server CPU is counted from its call's "
        "start to the end of the quiet after it (the queue-only path's client, Celery's send_task and get, runs in this process and is not counted).",
        "",
        "| path | p50 ms | p99 ms | mean ms | added vs engine, ms: p50 difference / median paired difference "
        "| server CPU ms / call (facade + worker processes) |",
        "|---|---|---|---|---|---|",
        line("engine", "engine alone (Engine.run, in process)"),
        line("queue", "queue only: send_task + result via Redis (no HTTP)"),
        line("embedded", "embedded: HTTP -> facade -> memory transport -> worker"),
        line("thin", "thin: HTTP -> facade -> Redis -> `embedfleet worker`"),
        line("thin_httpx", "thin, the client being httpx instead of http.client"),
        line("embedded_raw", "embedded, the client a bare socket (RawClient) instead of http.client"),
        line("thin_raw", "thin, the client a bare socket (RawClient) instead of http.client"),
        *([line("embedded@contender", f"embedded, {args.contender}"), line("thin@contender", f"thin, {args.contender}"),
           line("embedded@contender_raw", f"embedded, {args.contender}, bare socket client"),
           line("thin@contender_raw", f"thin, {args.contender}, bare socket client")]
          if args.contender else []),
        "",
    ]
    if not tput:
        return "\n".join(lines)
    lines += [
        f"Throughput, {args.clients} concurrent clients, one text per request ({args.total} timed requests):",
        "",
        "| path | requests/s | p50 ms under load |",
        "|---|---|---|",
        f"| engine alone ({args.clients} single-text submits in flight) | {tput['engine'][0]:.0f} | - |",
        f"| embedded | {tput['embedded'][0]:.0f} | {tput['embedded'][1]:.1f} |",
        f"| thin (Redis) | {tput['thin'][0]:.0f} | {tput['thin'][1]:.1f} |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--total", type=int, default=1280, help="Timed requests in the throughput run (0: none)")
    parser.add_argument("--contender", default=None, help="An older checkout whose embedded and thin paths are "
                        "timed in the same rounds (its own worker, on Redis database 2)")
    parser.add_argument("--gap", type=float, default=0.05, help="Seconds of quiet before each timed call")
    parser.add_argument("--backend", default="torch", help="Backend of the engine, the worker and the servers")
    parser.add_argument("--dtype", default="float32", help="Their dtype (the same in every path)")
    parser.add_argument("--out", type=Path, default=None, help="Append the Markdown report here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    passive_openmp()  # the in-process engine with the OpenMP setting the CLI's servers give themselves
    print_report(run(args), args.out)


if __name__ == "__main__":
    main()
