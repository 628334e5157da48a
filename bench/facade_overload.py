"""Single-text calls while a maximum-size request runs: does one large request stall the facade?

One ``embedfleet serve`` (embedded: the bundled all-MiniLM-L6-v2 in the facade's process, CPU)
per checkout. In each pass one client sends a maximum-size request (2,048 inputs of ~256 tokens:
the most the default limits admit, ~2.7 MB of JSON), and from that moment ``--clients`` clients
send single-text ``/v1/embeddings`` calls back to back for ``--seconds`` seconds (the window
outlasts the server's ``--timeout`` of 30 s, so what a large request leaves behind after its 504
is seen too). Reported per checkout: the large request's status and seconds, and the single
calls' count, p50, p99, max and failures (a 504 counts at the seconds it took), best pass by p99
with the spread over passes.

``--thin`` measures thin facades instead (``serve --broker`` in front of one ``embedfleet worker``,
on a redis-server of the benchmark's own per checkout): the large call travels as one inline
message, and its deadline with it.

``--contender PATH`` measures another checkout side by side in the same run (servers up at the
same time, passes alternating; a pass starts once every server is idle, so what one server's
large request left running never loads the other's pass), e.g. the commit before:

    git worktree add /tmp/before <commit> && ln -s $PWD/.venv /tmp/before/.venv
    python bench/facade_overload.py --contender /tmp/before --out bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (ENTRY, REPO, TEXT, RedisProcess, free_port, machine, print_report, stop,  # noqa: E402
                          wait_healthy)

#: ~250 tokens of the bundled model's vocabulary (it cuts at 256).
LONG = " ".join(f"benchmark sentence {i} about embedding servers under heavy load" for i in range(24))


def serve(checkout: Path, port: int, args: argparse.Namespace, log: Path, broker: str | None = None
          ) -> list[subprocess.Popen]:
    """``embedfleet serve`` of ``checkout``, run by that checkout's own virtualenv; with ``broker``
    a thin facade and an ``embedfleet worker`` behind it (the worker first)."""
    python = checkout / ".venv" / "bin" / "python"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               EMBEDFLEET_STORAGE_ROOTS=str(log.parent))  # a worker needs roots; these calls touch no storage
    engine = ["--device", "cpu", "--backend", args.backend, "--dtype", args.dtype]
    procs = []
    if broker:
        worker_log = log.with_suffix(".worker.log")
        procs.append(subprocess.Popen([str(python), "-c", ENTRY, "worker", "--broker", broker, *engine], cwd=checkout,
                                      env=env, stdout=worker_log.open("w"), stderr=subprocess.STDOUT))
    command = [str(python), "-c", ENTRY, "serve", "--port", str(port), "--timeout", str(args.timeout),
               *(["--broker", broker] if broker else engine)]
    procs.append(subprocess.Popen(command, cwd=checkout, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT))
    return procs


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(proc: subprocess.Popen, busy: float = 0.1, limit: float = 600) -> None:
    """Until the server uses under ``busy`` of a core over a second (or ``limit`` s passed)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        before = cpu_seconds(proc.pid)
        time.sleep(1.0)
        if cpu_seconds(proc.pid) - before < busy:
            return


def one_pass(url: str, args: argparse.Namespace) -> dict[str, object]:
    """The large request and ``--seconds`` of single-text calls beside it."""
    big_body = {"input": [f"{i} {LONG}" for i in range(args.inputs)]}
    big: dict[str, object] = {}

    def large() -> None:
        start = time.perf_counter()
        try:
            response = httpx.post(f"{url}/v1/embeddings", json=big_body, timeout=600)
            big["status"] = response.status_code
        except httpx.HTTPError as exc:
            big["status"] = type(exc).__name__
        big["seconds"] = time.perf_counter() - start
        big["ended"] = time.perf_counter()

    latencies: list[tuple[float, float]] = []  # (sent at, seconds)
    failures: list[object] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + args.seconds

    def singles() -> None:
        with httpx.Client(timeout=120) as client:
            while time.monotonic() < stop_at:
                start = time.perf_counter()
                try:
                    status: object = client.post(f"{url}/v1/embeddings", json={"input": TEXT}).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                took = time.perf_counter() - start
                with lock:
                    latencies.append((start, took))
                    if status != 200:
                        failures.append(status)

    threads = [threading.Thread(target=large)] + [threading.Thread(target=singles) for _ in range(args.clients)]
    threads[0].start()
    time.sleep(0.2)  # the large request is in first (parsing its body takes a moment)
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join()
    sent = np.array([at for at, _ in latencies])
    ms = np.array([took for _, took in latencies]) * 1000
    during = ms[sent < float(big["ended"])]  # type: ignore[arg-type]  # sent while the large one ran
    return {"big_status": big.get("status"), "big_s": float(big.get("seconds", float("nan"))),
            "n_during": int(during.size), "p50_during": float(np.percentile(during, 50)),
            "p99_during": float(np.percentile(during, 99)), "max_during": float(during.max()),
            "n": int(ms.size), "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "failed": len(failures), "failures": sorted({str(f) for f in failures})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contender", type=Path, action="append", default=[],
                        help="Another checkout (with its .venv) measured in the same run")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=45.0, help="Window of single-text calls per pass")
    parser.add_argument("--clients", type=int, default=2, help="Single-text clients, back to back each")
    parser.add_argument("--inputs", type=int, default=2048, help="Inputs of the large request")
    parser.add_argument("--timeout", type=float, default=30.0, help="The servers' --timeout")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--thin", action="store_true",
                        help="Thin facades (serve --broker) in front of an embedfleet worker, on a redis-server of "
                             "the benchmark's own, instead of embedded servers")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"facade-overload-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    checkouts = [REPO, *[path.resolve() for path in args.contender]]
    servers: list[tuple[Path, str, list[subprocess.Popen]]] = []
    redis = [RedisProcess(work) for _ in checkouts] if args.thin else []  # one broker per checkout
    try:
        for n, checkout in enumerate(checkouts):
            port = free_port()
            log = work / f"serve-{n}.log"
            procs = serve(checkout, port, args, log, redis[n].url if redis else None)
            url = f"http://127.0.0.1:{port}"
            servers.append((checkout, url, procs))
            wait_healthy(url, procs, log, timeout=300)
        results: dict[int, list[dict[str, object]]] = {n: [] for n in range(len(servers))}
        for p in range(args.passes):
            for n, (checkout, url, _) in enumerate(servers):
                for _ in range(20):  # warm: the model, the route, the connection
                    httpx.post(f"{url}/v1/embeddings", json={"input": TEXT}, timeout=60)
                got = one_pass(url, args)
                print(f"pass {p + 1} {checkout}: {got}", flush=True)
                results[n].append(got)
                for other in servers:  # what a large request left running ends before the next pass
                    for proc in other[2]:
                        wait_idle(proc)
    finally:
        for _, _, procs in servers:
            for proc in procs:
                stop(proc)
        for broker in redis:
            broker.stop()
    print_report(report(servers, results, args), args.out)


def describe(checkout: Path) -> str:
    head = subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%h %s"], capture_output=True,
                          text=True).stdout.strip()
    return head[:70] or str(checkout)


def report(servers: list[tuple[Path, str, list[subprocess.Popen]]], results: dict[int, list[dict[str, object]]],
           args: argparse.Namespace) -> str:
    lines = [f"\n## Facade under a maximum-size request{' (thin)' if args.thin else ''} ({dt.date.today().isoformat()})\n",
             f"Machine: {machine()} (shared with other work). Command: `python bench/facade_overload.py "
             + " ".join(f"--contender {c}" for c, _, _ in servers[1:])
             + f" --passes {args.passes} --seconds {args.seconds:g} --clients {args.clients} --inputs {args.inputs}"
             f" --backend {args.backend} --dtype {args.dtype}{' --thin' if args.thin else ''}`. "
             f"{'Thin `serve --broker` + `worker` (own redis-server)' if args.thin else 'Embedded `serve`'} "
             f"`--timeout {args.timeout:g}`, bundled "
             f"all-MiniLM-L6-v2 on CPU; one request of {args.inputs} x ~256 tokens, and {args.clients} clients "
             f"sending single texts back to back for {args.seconds:g} s from its start. \"while it ran\": the "
             "calls sent before the large request ended (answered or 504); \"window\": all of them (what it "
             "leaves behind). Best pass by p99 while it ran; the last column has every pass's.\n",
             "| checkout | large request | calls while it ran | p50 ms | p99 ms | max ms | calls in window | "
             "window p50 / p99 ms | failed | p99 while it ran, per pass |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for n, (checkout, _, _) in enumerate(servers):
        passes = results[n]
        best = min(passes, key=lambda r: r["p99_during"])  # type: ignore[arg-type, return-value]
        spread = ", ".join(f"{r['p99_during']:.0f}" for r in passes)
        lines.append(f"| {describe(checkout)} | {best['big_status']} after {best['big_s']:.1f} s | "
                     f"{best['n_during']} | {best['p50_during']:.0f} | {best['p99_during']:.0f} | "
                     f"{best['max_during']:.0f} | {best['n']} | {best['p50']:.0f} / {best['p99']:.0f} | "
                     f"{best['failed']} {' '.join(best['failures'])} | {spread} |")  # type: ignore[arg-type]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
