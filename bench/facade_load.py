"""The facade under load: requests/s, p50/p99 and the servers' CPU time per request, beside the engine's.

A load generator in its own process (an asyncio client on raw keep-alive sockets, ~30 us of CPU
per request; ``--gen-cpus`` pins it with taskset) drives each path with ``--clients`` closed-loop
clients for ``--seconds``; the servers' CPU time comes from /proc (utime + stime of each server
process and its children, before and after), which is stable on a shared machine where
wall-clock rates are not. Paths, each with the same backend and dtype:

* engine: ``Engine.submit`` in a process of its own, ``--clients`` requests kept in flight (no
  queue, no HTTP): what the model can answer;
* thin: ``embedfleet serve --broker redis://...`` (``--facade-workers`` processes on one port)
  in front of one ``embedfleet worker``;
* embedded: ``embedfleet serve`` (worker in the facade's process, memory transport).

Shapes: one text per request (JSON floats), and ``--batch`` texts per request (base64, as
OpenAI's SDK asks), for which tokens/s is reported. Passes alternate the paths, so a load swing
hits all alike; the table gives the best pass and the spread.

    python -m bench.facade_load --seconds 8 --passes 2 --out bench/RESULTS.md
    python -m bench.facade_load --contender /tmp/prev    # an older checkout's thin and embedded paths beside

On the H200 (``--device cuda --dtype bfloat16 --paths engine,thin --gen-cpus 12-15``) the same
file measures the GPU worker behind the thin facade.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ENTRY, REPO, TEXT, RedisProcess, free_port, machine, print_report, stop, wait_healthy
from producer.settings import passive_openmp

MODEL = "all-MiniLM-L6-v2"
WORDS = ("embedding server queue worker batch token vector model query passage answer fast latency "
         "throughput request client facade redis engine").split()


def texts_for(index: int, count: int) -> list[str]:
    """``count`` distinct texts of ~12 words for request number ``index``."""
    return [f"{TEXT} {WORDS[(index + i) % len(WORDS)]} {index} {i}" for i in range(count)]


def model_name(ref: str | None) -> str:
    """The name requests give: the bundled model's, or the slug of ``--model`` (what the worker serves it as)."""
    from producer.jobs import model_slug

    return MODEL if ref is None else model_slug(ref)


def body_for(index: int, count: int, model: str = MODEL) -> bytes:
    if count == 1:
        return json.dumps({"input": texts_for(index, 1)[0], "model": model}).encode()
    return json.dumps({"input": texts_for(index, count), "model": model, "encoding_format": "base64"}).encode()


# ------------------------------------------------------------------------------ the load generator
_TOKENS = re.compile(rb'"total_tokens":\s*(\d+)')


async def _client(host: str, port: int, path: str, bodies: list[bytes], stop_at: float, begin: float,
                  out: dict[str, Any]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    heads = [f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
             f"Content-Length: {len(b)}\r\n\r\n".encode() + b for b in bodies]
    i = 0
    try:
        while True:
            now = time.perf_counter()
            if now >= stop_at:
                return
            writer.write(heads[i % len(heads)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
            data = await reader.readexactly(length)
            done = time.perf_counter()
            if status != 200:
                out["errors"][status] = out["errors"].get(status, 0) + 1
                if len(out["samples"]) < 3:
                    out["samples"].append(data[:300].decode(errors="replace"))
                continue
            if begin <= done <= stop_at:  # answers of the timed window only
                out["latencies"].append(done - now)
                match = _TOKENS.search(data)
                out["tokens"] += int(match.group(1)) if match else 0
    finally:
        writer.close()


async def _generate(url: str, path: str, clients: int, seconds: float, warmup: float, batch: int,
                    model: str = MODEL) -> dict[str, Any]:
    host, port = url.split("//")[1].split(":")
    out: dict[str, Any] = {"latencies": [], "tokens": 0, "errors": {}, "samples": []}
    begin = time.perf_counter() + warmup
    stop_at = begin + seconds
    await asyncio.gather(*(_client(host, int(port), path, [body_for(k * 7919 + j, batch, model) for j in range(16)],
                                   stop_at, begin, out) for k in range(clients)))
    return out


def generate(args: argparse.Namespace) -> None:
    """The generator process: print one JSON line (requests, tokens, latencies' percentiles)."""
    out = asyncio.run(_generate(args.url, args.path, args.clients, args.seconds, args.warmup, args.batch,
                                model_name(args.model)))
    ms = np.array(out["latencies"]) * 1000
    print(json.dumps({"requests": len(ms), "seconds": args.seconds, "tokens": out["tokens"],
                      "ms": [round(float(x), 2) for x in ms], "errors": out["errors"], "samples": out["samples"]}))


# ------------------------------------------------------------------------------ the engine alone
def engine_alone(args: argparse.Namespace) -> None:
    """Serve nothing: keep ``clients`` requests in flight on a bare engine; its CPU time too.

    With ``--serve`` the engine stays loaded and runs one measurement per JSON line on stdin
    (``{"clients": .., "batch": ..}``), so the passes of a run pay for one model load, not one each."""
    from worker.backends.select import load_backend
    from worker.engine.pipeline import Engine
    from worker.models.resolve import describe

    info = describe(args.model)
    engine = Engine(info, load_backend(args.backend, info, args.device, args.dtype).backend).start()
    try:
        if not args.serve:
            print(json.dumps(measure_engine(engine, args.clients, args.batch, args.seconds, args.warmup)), flush=True)
            return
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            ask = json.loads(line)
            print(json.dumps(measure_engine(engine, ask["clients"], ask["batch"], args.seconds, args.warmup)), flush=True)
    finally:
        engine.stop()


def measure_engine(engine: Any, clients: int, batch: int, seconds: float, warmup: float) -> dict[str, Any]:
    """``clients`` closed-loop submits of ``batch`` texts for ``seconds`` after ``warmup``."""
    import threading

    lock = threading.Lock()
    stats: dict[str, Any] = {"latencies": [], "tokens": 0}
    counter = [0]
    begin = time.perf_counter() + warmup
    stop_at = begin + seconds
    finished = threading.Event()
    live = [clients]
    batches = [0, 0]

    def launch(k: int) -> None:
        with lock:
            counter[0] += 1
            index = counter[0]
        started = time.perf_counter()
        future = engine.submit(texts_for(index, batch), urgent=True)
        future.add_done_callback(lambda f: landed(k, started, f))

    def landed(k: int, started: float, future: Any) -> None:
        done = time.perf_counter()
        result = future.result()
        with lock:
            if begin <= done <= stop_at:
                stats["latencies"].append(done - started)
                stats["tokens"] += int(sum(result.n_tokens))
        if done < stop_at:
            launch(k)
            return
        with lock:
            live[0] -= 1
            if live[0] == 0:
                finished.set()

    for k in range(clients):
        launch(k)
    time.sleep(max(0.0, begin - time.perf_counter()))
    cpu0 = time.process_time()
    batches[:] = [engine.stats["batches"], engine.stats["items"]]
    time.sleep(max(0.0, stop_at - time.perf_counter()))
    batches[:] = [engine.stats["batches"] - batches[0], engine.stats["items"] - batches[1]]
    finished.wait(seconds + warmup + 120)
    cpu = time.process_time() - cpu0
    ms = np.array(stats["latencies"]) * 1000
    return {"requests": len(ms), "seconds": seconds, "tokens": stats["tokens"], "cpu_s": cpu,
            "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "errors": {},
            "per_batch": batches[1] / max(1, batches[0])}


# ------------------------------------------------------------------------------ processes, CPU time
def tree_cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` and every descendant (uvicorn's worker processes), in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, IndexError, ValueError):
            continue
    return total


def requests_per_job(url: str) -> tuple[float, float]:
    """The facade's requests-per-job histogram: (requests, jobs) so far (one process's, with several)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = dict(re.findall(r"^embedfleet_requests_per_job_(sum|count) (\S+)$", text, re.M))
    return float(found.get("sum", 0)), float(found.get("count", 0))


def spawn(args: list[str], log: Path, cwd: Path = REPO, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=own_path(cwd),
               EMBEDFLEET_STORAGE_ROOTS=str(log.parent), **(extra_env or {}))  # a worker needs roots; these calls touch no storage
    return subprocess.Popen([sys.executable, "-c", ENTRY, *args], cwd=cwd, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def own_path(checkout: Path) -> str:
    """``PYTHONPATH`` with ``checkout`` first: a server's helper processes (the engine's tokenizer
    processes get the parent's path minus its working directory) import that checkout's code,
    not whichever tree the benchmark's own ``PYTHONPATH`` names (two trees in one run)."""
    return os.pathsep.join([str(Path(checkout).resolve()), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])


def _model(args: argparse.Namespace) -> list[str]:
    """``--model`` for a child (generator, engine, worker), when one is given."""
    return ["--model", args.model] if args.model else []


def _pinned(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus else []


def clients_for(args: argparse.Namespace, batch: int) -> int:
    return args.clients if batch == 1 else args.batch_clients


def run_generator(args: argparse.Namespace, url: str, batch: int) -> dict[str, Any]:
    """``--gen-procs`` generator processes at once, the clients shared out; their counts summed."""
    clients = clients_for(args, batch)
    procs = max(1, min(args.gen_procs, clients))
    running = [subprocess.Popen(
        [*_pinned(args.gen_cpus), sys.executable, "-m", "bench.facade_load", "generate", "--url", url,
         "--clients", str(clients // procs + (k < clients % procs)), "--seconds", str(args.seconds),
         "--warmup", str(args.warmup), "--batch", str(batch), *_model(args)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        for k in range(procs)]
    parts = [json.loads(proc.communicate()[0].strip().splitlines()[-1]) for proc in running]
    ms = np.array([x for part in parts for x in part["ms"]])
    errors: dict[str, int] = {}
    for part in parts:
        for status, n in part["errors"].items():
            errors[status] = errors.get(status, 0) + n
    return {"requests": len(ms), "seconds": args.seconds, "tokens": sum(p["tokens"] for p in parts),
            "p50": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
            "p99": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
            "errors": errors, "samples": [x for p in parts for x in p["samples"]]}


class EngineProcess:
    """The engine alone in a process of its own, loaded once for every pass (``engine --serve``)."""

    def __init__(self, args: argparse.Namespace, name: str = "engine", cwd: Path = REPO) -> None:
        self.name = name
        command = [*_pinned(args.server_cpus), sys.executable, "-m", "bench.facade_load", "engine", "--serve",
                   "--seconds", str(args.seconds), "--warmup", str(args.warmup),
                   "--backend", args.backend, "--dtype", args.dtype, "--device", args.device, *_model(args)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=own_path(cwd))
        self.proc = subprocess.Popen(command, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)

    def _line(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise SystemExit(f"the engine process ended (exit {self.proc.wait()})")
        return json.loads(line)

    def ready(self) -> None:
        self._line()

    def measure(self, args: argparse.Namespace, batch: int) -> dict[str, Any]:
        """One measurement; its CPU time is the engine process's and its children's (the tokenizer
        processes beside a GPU engine), counted as the servers' are (``Path_.measure``), so the
        CPU per request compares with theirs; the engine's own process alone is ``cpu_own_s``."""
        before = tree_cpu_s(self.proc.pid)
        self.proc.stdin.write(json.dumps({"clients": clients_for(args, batch), "batch": batch}) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        out = self._line()
        out["cpu_own_s"] = out["cpu_s"]
        out["cpu_s"] = (tree_cpu_s(self.proc.pid) - before) * args.seconds / (args.seconds + args.warmup)
        return out

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        stop(self.proc)


class Path_:
    """One HTTP path under test: its URL and the server processes whose CPU time it costs."""

    def __init__(self, name: str, url: str, procs: list[subprocess.Popen]) -> None:
        self.name, self.url, self.procs = name, url, procs

    def measure(self, args: argparse.Namespace, batch: int) -> dict[str, Any]:
        """One generator run; CPU seconds per server process (facade first), warm-up's share taken out."""
        before = [tree_cpu_s(p.pid) for p in self.procs]
        jobs_before = requests_per_job(self.url)
        out = run_generator(args, self.url, batch)
        jobs_after = requests_per_job(self.url)
        out["per_job"] = (jobs_after[0] - jobs_before[0]) / max(1.0, jobs_after[1] - jobs_before[1])
        share = args.seconds / (args.seconds + args.warmup)
        out["cpu_each"] = [(tree_cpu_s(p.pid) - b) * share for p, b in zip(self.procs, before)]
        out["cpu_s"] = sum(out["cpu_each"])
        return out


def thin_variants(args: argparse.Namespace) -> list[tuple[str, list[str], list[str]]]:
    """(suffix, extra worker options, extra facade options) of each thin path of this checkout:
    the plain one, then each ``--thin-worker NAME=OPTIONS`` (``x3=--devices 0,0,0``: three engine
    processes on one GPU; an ``EMBEDFLEET_*=value`` among them goes into that worker's environment
    only: ``si1=EMBEDFLEET_SWITCH_INTERVAL=0.001``) and each ``--thin-facade NAME=OPTIONS``
    (``j16=--jobs-per-worker 16``)."""
    variants: list[tuple[str, list[str], list[str]]] = [("", [], [])]
    for spec in args.thin_worker:
        name, _, options = spec.partition("=")
        variants.append((f"[{name}]", options.split(), []))
    for spec in args.thin_facade:
        name, _, options = spec.partition("=")
        variants.append((f"[{name}]", [], options.split()))
    return variants


def start_paths(args: argparse.Namespace, work: Path, redis: RedisProcess) -> tuple[list[Path_], list[subprocess.Popen]]:
    """Every path's servers started at once (their model loads overlap), then each waited for."""
    same = ["--device", args.device, "--backend", args.backend, "--dtype", args.dtype]
    hosted = _model(args)
    pinned = _pinned(args.server_cpus)
    paths: list[Path_] = []
    everything: list[subprocess.Popen] = []
    waits: list[tuple[str, list[subprocess.Popen], Path]] = []
    checkouts = [("", REPO)] + ([("@contender", Path(args.contender))] if args.contender else [])
    for suffix, cwd in checkouts:
        wanted = args.paths.split(",") if cwd == REPO else args.contender_paths.split(",")
        for variant, worker_args, facade_args in thin_variants(args) if "thin" in wanted else ():
            if variant and cwd != REPO:
                continue
            db = len(paths) + 1  # each thin path's fleet on its own Redis database: queues apart
            broker = f"{redis.url[:-2]}/{db}"
            port = free_port()
            procs = ["--processes", str(args.facade_processes)] if args.facade_processes > 1 else []
            name = f"thin{variant}{suffix}"
            settings_env = {k: v for k, _, v in (a.partition("=") for a in worker_args) if k.startswith("EMBEDFLEET_")}
            options = [a for a in worker_args if a.partition("=")[0] not in settings_env]
            worker = spawn(["worker", "--broker", broker, *same, *hosted, "--concurrency", str(args.clients),
                            *options], work / f"{name}-worker.log", cwd, settings_env)
            facade = spawn(["serve", "--broker", broker, "--port", str(port), *procs, *args.facade_args.split(),
                            *facade_args],
                           work / f"{name}.log", cwd)
            for proc in (worker, facade) if pinned else ():
                subprocess.run(["taskset", "-a", "-p", "-c", args.server_cpus, str(proc.pid)], check=False,
                               capture_output=True)
            url = f"http://127.0.0.1:{port}"
            waits.append((url, [worker, facade], work / f"{name}.log"))
            paths.append(Path_(name, url, [facade, worker]))
            everything += [worker, facade]
        if "embedded" in wanted:
            port = free_port()
            embedded = spawn(["serve", "--port", str(port), *same, *hosted, "--concurrency", str(args.clients)],
                             work / f"embedded{suffix}.log", cwd)
            url = f"http://127.0.0.1:{port}"
            waits.append((url, [embedded], work / f"embedded{suffix}.log"))
            paths.append(Path_(f"embedded{suffix}", url, [embedded]))
            everything.append(embedded)
    for url, procs, log in waits:
        wait_healthy(url, procs, log)
    return paths, everything


def spread(values: list[float]) -> str:
    return f"{max(values):,.0f} ({max(values) - min(values):,.0f})"


def report(args: argparse.Namespace, results: dict[tuple[str, int], list[dict[str, Any]]], load: tuple[float, float]) -> str:
    lines = [
        f"## Facade under load — {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC (`bench/facade_load.py`)",
        "",
        f"Machine: {machine()}; load average {load[0]:.2f} before, {load[1]:.2f} after.",
        f"Command: `python -m bench.facade_load {' '.join(sys.argv[1:])}`",
        f"Model: {args.model or 'bundled ' + MODEL}, {args.backend} {args.dtype} on {args.device} in every path; closed-loop clients for {args.seconds:g} s per pass ({args.warmup:g} s warm-up), {args.passes} passes; "
        f"load generator pinned to {args.gen_cpus or 'no core'}, servers to {args.server_cpus or 'no core'}.",
        "",
    ]
    for batch in (1, args.batch):
        engine = results.get(("engine", batch))
        best_engine = max(r["requests"] for r in engine) / args.seconds if engine else None
        unit = "requests/s, best (spread)" if batch == 1 else "texts/s | tokens/s, best (spread)"
        lines += [f"{batch} text{'s' if batch > 1 else ''} per request, {clients_for(args, batch)} clients:", "",
                  f"| path | {unit} | vs engine | p50 ms | p99 ms | server CPU ms / request (facade + worker) | "
                  "requests / job (engine: items / batch) | errors |"]
        lines.append("|---|" + "---:|" * (lines[-1].count("|") - 2))
        for (name, b), runs in results.items():
            if b != batch:
                continue
            rates = [r["requests"] / args.seconds for r in runs]
            best = max(runs, key=lambda r: r["requests"])
            rate = spread(rates) if batch == 1 else \
                f"{spread([x * batch for x in rates])} | {spread([r['tokens'] / args.seconds for r in runs])}"
            ratio = f"{max(rates) / best_engine:.0%}" if best_engine and name != "engine" else "-"
            cpu_run = min(runs, key=lambda r: r["cpu_s"] / max(1, r["requests"]))
            cpu = f"{cpu_run['cpu_s'] * 1000 / max(1, cpu_run['requests']):.2f}"
            if "cpu_own_s" in cpu_run:  # the engine alone: with its tokenizer processes, and without them
                cpu += f" (its own process {cpu_run['cpu_own_s'] * 1000 / max(1, cpu_run['requests']):.2f})"
            if len(cpu_run.get("cpu_each", [])) == 2:
                facade_ms, worker_ms = (c * 1000 / max(1, cpu_run["requests"]) for c in cpu_run["cpu_each"])
                cpu += f" ({facade_ms:.2f} + {worker_ms:.2f}; cores busy {cpu_run['cpu_each'][0] / args.seconds:.1f}"
                cpu += f" + {cpu_run['cpu_each'][1] / args.seconds:.1f})"
            errors = sum(sum(r["errors"].values()) for r in runs)
            lines.append(f"| {name} | {rate} | {ratio} | {best['p50']:.1f} | {best['p99']:.1f} | {cpu} | {best.get('per_job', best.get('per_batch', float('nan'))):.1f} | {errors} |")
        lines.append("")
    return "\n".join(lines)


def profile_paths(args: argparse.Namespace, paths: list[Path_], work: Path) -> str:
    """One more run per thin path of this checkout and per shape of ``--profile-batch`` (texts a
    request: ``1,32``), not counted, with py-spy sampling its facade and worker processes (children
    included; the raw stacks are kept beside ``--profile``): the threads that hold the GIL
    (``--profile-mode gil``: where the Python time goes), or every thread on a CPU (``cpu``: a
    thread spinning in C, such as a wait for the device, shows too)."""
    import shutil

    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        return "py-spy not found: no profile"
    summaries = []
    for path in paths:
        if not path.name.startswith("thin") or "@" in path.name:  # this checkout's thin paths
            continue
        for batch in (int(b) for b in str(args.profile_batch).split(",")):
            summaries.append(_profile_run(args, spy, path, batch))
    return "\n\n".join(summaries)


def _profile_run(args: argparse.Namespace, spy: str, path: Path_, batch: int) -> str:
    """One generator run of ``batch`` texts a request on ``path`` under py-spy; its summaries."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "", path.name)  # thin[si1] -> thinsi1
    files = [args.profile.with_name(f"{args.profile.stem}-{stem}-b{batch}-{role}.raw") for role in ("facade", "worker")]
    gil = ["--gil"] if args.profile_mode == "gil" else []
    spies = [subprocess.Popen([spy, "record", "--pid", str(proc.pid), "--subprocesses", *gil, "--nonblocking",
                               "--rate", str(args.profile_rate), "--duration", str(int(args.seconds + args.warmup)),
                               "--format", "raw", "--output", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for proc, out in zip(path.procs, files)]
    out = run_generator(args, path.url, batch)
    for spy_proc in spies:
        spy_proc.wait(timeout=60)
    kind = "GIL-holding" if args.profile_mode == "gil" else "on-CPU"
    rate = f"{out['requests'] / args.seconds:,.0f} requests/s during it"
    return "\n\n".join(f"### {path.name} {role}, {batch} text(s) a request ({kind} samples, {rate})\n"
                        f"{summarize_profile(raw)}" for role, raw in zip(("facade", "worker"), files))


def summarize_profile(raw: Path, top: int = 40) -> str:
    """py-spy's raw stacks -> the functions holding the GIL, inclusive share of the samples."""
    if not raw.exists():
        return "(no samples)"
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():  # py-spy can write undecodable names
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        seen = set()
        for frame in stack.split(";"):
            name = frame.split(" (")[0]
            where = frame.rsplit("/", 1)[-1].split(":")[0] if "/" in frame else ""
            key = f"{name} {where}".strip()
            if key not in seen:
                seen.add(key)
                inclusive[key] = inclusive.get(key, 0) + n
    # the trunk every sample shares (process, CLI, event loop) says nothing: from 95% down
    ranked = sorted(((k, n) for k, n in inclusive.items() if n < 0.95 * total), key=lambda kv: -kv[1])[:top]
    return f"{total} samples\n" + "\n".join(f"{100 * n / max(1, total):5.1f}% {key}" for key, n in ranked)


def bench(args: argparse.Namespace) -> str:
    work = Path(tempfile.mkdtemp(prefix="ef-load-"))
    load_before = os.getloadavg()
    redis = RedisProcess(work)
    procs: list[subprocess.Popen] = []
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    engines: list[EngineProcess] = []
    try:
        if "engine" in args.paths.split(","):
            engines.append(EngineProcess(args))
            if args.contender and "engine" in args.contender_paths.split(","):  # the older checkout's engine, this benchmark's driver (copied in beside it)
                engines.append(EngineProcess(args, "engine@contender", Path(args.contender)))
        paths, procs = start_paths(args, work, redis)
        for engine in engines:
            engine.ready()
        for _ in range(args.passes):
            for batch in (1, args.batch):
                for engine in engines:
                    results.setdefault((engine.name, batch), []).append(engine.measure(args, batch))
                for path in paths:
                    results.setdefault((path.name, batch), []).append(path.measure(args, batch))
                print({k: [round(r["requests"] / args.seconds) for r in v] for k, v in results.items()}, flush=True)
            print(report(args, results, (load_before[0], os.getloadavg()[0])), flush=True)  # kept if cut short
        if args.profile is not None:
            args.profile.write_text(profile_paths(args, paths, work) + "\n")
    finally:
        for engine in engines:
            engine.close()
        for proc in procs:
            stop(proc)
        redis.stop()
    for key, runs in results.items():
        for r in runs:
            if r["errors"]:
                print(f"{key}: errors {r['errors']} {r.get('samples')}", file=sys.stderr)
    return report(args, results, (load_before[0], os.getloadavg()[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode")
    for name in ("generate", "engine"):
        p = sub.add_parser(name)
        p.add_argument("--url", default="")
        p.add_argument("--path", default="/v1/embeddings")
        p.add_argument("--clients", type=int, default=64)
        p.add_argument("--seconds", type=float, default=8)
        p.add_argument("--warmup", type=float, default=2)
        p.add_argument("--batch", type=int, default=1)
        p.add_argument("--backend", default="torch")
        p.add_argument("--dtype", default="float32")
        p.add_argument("--device", default="cpu")
        p.add_argument("--model", default=None)
        p.add_argument("--serve", action="store_true", help="engine: one measurement per JSON line on stdin")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="Texts per request of the second shape")
    parser.add_argument("--batch-clients", type=int, default=8, help="Concurrent clients of the second shape")
    parser.add_argument("--paths", default="engine,thin,embedded")
    parser.add_argument("--facade-processes", type=int, default=1, help="Thin facade processes on one port "
                        "(`serve --processes`, the contender's too: it needs that option)")
    parser.add_argument("--gen-procs", type=int, default=1, help="Load generator processes sharing the clients")
    parser.add_argument("--facade-args", default="", help="More `serve` options for every thin facade")
    parser.add_argument("--thin-facade", action="append", default=[], metavar="NAME=OPTIONS",
                        help="Another thin path whose facade gets these options (j16='--jobs-per-worker 16')")
    parser.add_argument("--thin-worker", action="append", default=[], metavar="NAME=OPTIONS",
                        help="Another thin path whose worker gets these options (x3='--devices 0,0,0')")
    parser.add_argument("--contender", default=None, help="A checkout whose thin path (thin@contender) and engine "
                        "(engine@contender: it needs this file's `engine --serve`) run beside")
    parser.add_argument("--contender-paths", default="engine,thin,embedded", help="Which paths the contender runs")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="A model folder every path hosts instead of the bundled "
                        "model (a tiny random one shows the servers' own cost: the forward costs ~nothing)")
    parser.add_argument("--gen-cpus", default=None, help="taskset CPU list for the load generator")
    parser.add_argument("--server-cpus", default=None, help="taskset CPU list for the servers and the engine")
    parser.add_argument("--out", type=Path, default=None, help="Append the Markdown report here")
    parser.add_argument("--profile", type=Path, default=None, help="After the passes, one uncounted single-text "
                        "run per thin path under py-spy; the summary into this file")
    parser.add_argument("--profile-mode", choices=("gil", "cpu"), default="gil", help="--profile: threads holding "
                        "the GIL, or every thread on a CPU (a thread spinning in C without the GIL too)")
    parser.add_argument("--profile-rate", type=int, default=97, help="py-spy samples per second (--profile)")
    parser.add_argument("--profile-batch", default="1", help="--profile: texts per request of its runs, one run "
                        "each (1,32: both shapes; a batch over 1 runs with --batch-clients clients)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    passive_openmp()  # the engine alone runs with the OpenMP setting the worker's CLI gives itself
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    if args.mode == "generate":
        return generate(args)
    if args.mode == "engine":
        return engine_alone(args)
    print_report(bench(args), args.out)


if __name__ == "__main__":
    main()
