"""Where a single-text call's time goes on the thin path: a timestamp at every hop, beside the engine alone.

One client sends one single-text call at a time (``--gap`` s of quiet before each) through the
thin facade (``embedfleet serve --broker redis://...``, one process) to one ``embedfleet worker``;
the engine alone (``Engine.run`` in this process, same backend and dtype) is timed in the same
rounds. Every process stamps each hop with ``time.monotonic_ns()`` (CLOCK_MONOTONIC: one clock for
every process of the machine) into a file of its own, by wrapping the code's own functions at
start (the code measured is unchanged; a wrapper that finds no such function in an older
checkout stamps nothing):

    client send -> facade: ASGI call (uvicorn parsed the request) -> dispatch (body validated,
    checks done) -> LPUSH start -> LPUSH end -> worker: BRPOP readable -> inline lane (kombu's
    message built) -> submitted to the engine -> engine done (the future's callback) -> answer
    made -> store start (the writer thread took it) -> store end -> facade: reply read (pub/sub)
    -> answered (result decoded) -> response sent -> client received

The table gives each hop's median (p90) gap from the previous stamp, and the engine's own time
(submit -> done in the worker) beside the engine alone's, so the added latency splits into hops
that compute and hops that wait (a thread or process wake-up on a busy core).

    python -m bench.facade_hops --requests 200 --warmup 20
    python -m bench.facade_hops --contender /tmp/prev     # an older checkout's thin path in the same rounds
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import http.client
import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

if __package__ in (None, ""):  # `python bench/facade_hops.py` from the root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, TEXT, RedisProcess, free_port, machine, print_report, stop, wait_healthy  # noqa: E402

MODEL = "all-MiniLM-L6-v2"

#: (stage, module, attribute, where): the stamp taken at the function's entry ("in") or after it
#: returned ("out"); coroutine functions are awaited before an "out" stamp.
FACADE_STAMPS = [
    ("f_asgi", "producer.http.fast", "FastRoutes.__call__", "in"),
    ("f_dispatch", "producer.http.dispatch", "Dispatcher.call", "in"),
    ("f_push0", "producer.http.publish", "RedisPublisher.send", "in"),
    ("f_push1", "producer.http.publish", "RedisPublisher.send", "out"),
    ("f_reply", "producer.http.replies", "RedisReplies._deliver", "in"),
    ("f_answered", "producer.http.dispatch", "Dispatcher.call", "out"),
    ("f_sent", "producer.http.fast", "FastRoutes.__call__", "out"),
]
WORKER_STAMPS = [
    ("w_read", "worker.hosting.transport", "Channel._brpop_read", "in"),
    ("w_lane", "worker.hosting.inline", "FastInline.__call__", "in"),
    ("w_submitted", "worker.hosting.inline", "FastInline.__call__", "out"),
    ("w_done", "worker.hosting.inline", "FastInline._finish", "in"),
    ("w_put", "worker.hosting.inline", "AnswerWriter.put", "in"),
    ("w_store0", "worker.hosting.results", "InlineResultBackend.store_inlines", "in"),
    ("w_store1", "worker.hosting.results", "InlineResultBackend.store_inlines", "out"),
    ("w_store0", "worker.hosting.results", "InlineResultBackend.store_inline", "in"),
    ("w_store1", "worker.hosting.results", "InlineResultBackend.store_inline", "out"),
]
ORDER = ["c_send", "f_asgi", "f_dispatch", "f_push0", "f_push1", "w_read", "w_lane", "w_submitted", "w_done",
         "w_put", "w_store0", "w_store1", "f_reply", "f_answered", "f_sent", "c_recv"]
#: (label, first stamp, last stamp): stretches of the path, each measured within a round
SEGMENTS = [
    ("client send -> facade sends the job (HTTP in, parse, checks, message)", "c_send", "f_push0"),
    ("facade sends -> worker's BRPOP readable (Redis hop)", "f_push0", "w_read"),
    ("worker read -> submitted to the engine", "w_read", "w_submitted"),
    ("engine (submitted -> done)", "w_submitted", "w_done"),
    ("engine done -> store starts (answer, writer thread)", "w_done", "w_store0"),
    ("store starts -> facade reads the reply (Redis hop)", "w_store0", "f_reply"),
    ("facade reply -> client has the response (decode, render, HTTP out)", "f_reply", "c_recv"),
    ("everything but the engine", "c_send", "c_recv"),
]
LABELS = {
    "f_asgi": "facade: the ASGI call (uvicorn read and parsed the request)",
    "f_dispatch": "facade: dispatch (body parsed and validated, key, checks)",
    "f_push0": "facade: LPUSH starts (coalescer, message built)",
    "f_push1": "facade: LPUSH answered",
    "w_read": "worker: BRPOP's answer readable (kombu's event loop woke)",
    "w_lane": "worker: inline lane called (kombu message built)",
    "w_submitted": "worker: submitted to the engine (decode, validate, submit)",
    "w_done": "worker: engine done (the future's callback: engine's own time)",
    "w_put": "worker: answer made (base64, JSON shape)",
    "w_store0": "worker: store starts (the writer thread woke)",
    "w_store1": "worker: SET + PUBLISH answered",
    "f_reply": "facade: reply read off pub/sub",
    "f_answered": "facade: result decoded (dispatch returns)",
    "f_sent": "facade: response sent",
    "c_recv": "client: response read",
}


# ------------------------------------------------------------------------------ the stamps, in each process
class Stamps:
    """Appends ``stage<TAB>ns`` lines to a file (O_APPEND: one write per stamp, ~2 us)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def __call__(self, stage: str) -> None:
        os.write(self.fd, f"{stage}\t{time.monotonic_ns()}\n".encode())


def _wrap(function: Callable[..., Any], stamp: Stamps, stage: str, where: str) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(function):
        @functools.wraps(function)
        async def wrapped_async(*args: Any, **kwargs: Any) -> Any:
            if where == "in":
                stamp(stage)
                return await function(*args, **kwargs)
            try:
                return await function(*args, **kwargs)
            finally:
                stamp(stage)
        return wrapped_async

    @functools.wraps(function)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if where == "in":
            stamp(stage)
            return function(*args, **kwargs)
        try:
            return function(*args, **kwargs)
        finally:
            stamp(stage)
    return wrapped


def install(role: str, path: str) -> list[str]:
    """Wrap this role's functions (``facade`` or ``worker``) so each call stamps ``path``; the
    stages that found their function."""
    stamp = Stamps(path)
    found = []
    for stage, module_name, attribute, where in FACADE_STAMPS if role == "facade" else WORKER_STAMPS:
        try:
            owner: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        *parents, name = attribute.split(".")
        for parent in parents:
            owner = getattr(owner, parent, None)
        if owner is None or name not in vars(owner):
            continue
        setattr(owner, name, _wrap(vars(owner)[name], stamp, stage, where))
        found.append(stage)
    return found


BOOT = ("import sys, importlib.util; spec = importlib.util.spec_from_file_location('facade_hops', sys.argv.pop(1)); "
        "hops = importlib.util.module_from_spec(spec); spec.loader.exec_module(hops); "
        "print('stamps:', hops.install(sys.argv.pop(1), sys.argv.pop(1)), flush=True); "
        "hops.profile_main_thread(sys.argv.pop(1)); from worker.cli import main; main()")


def profile_main_thread(path: str) -> None:
    """``--cprofile``: the main thread (the facade's event loop, the worker's consumer) under
    cProfile, its statistics written to ``path`` when the process exits."""
    if not path:
        return
    import atexit
    import cProfile

    import signal

    profiler = cProfile.Profile()
    dumped = []

    def dump() -> None:
        if not dumped:
            dumped.append(True)
            profiler.disable()
            profiler.dump_stats(path)

    raise_signal = signal.raise_signal

    def dump_then_raise(signum: int) -> None:  # uvicorn ends by raising the signal it caught: no atexit then
        dump()
        raise_signal(signum)

    signal.raise_signal = dump_then_raise
    atexit.register(dump)
    profiler.enable()


def spawn(role: str, args: list[str], work: Path, name: str, cwd: Path, profile: str = "") -> subprocess.Popen:
    """An ``embedfleet`` process of checkout ``cwd`` with this file's stamps installed first."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", EMBEDFLEET_STORAGE_ROOTS=str(work),
               PYTHONPATH=os.pathsep.join([str(cwd.resolve()), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]))
    log = work / f"{name}.log"
    return subprocess.Popen([sys.executable, "-c", BOOT, str(Path(__file__).resolve()), role,
                             str(work / f"{name}.stamps"), profile, *args], cwd=cwd, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def read_stamps(path: Path) -> list[tuple[int, str]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        stage, _, ns = line.partition("\t")
        if ns:
            out.append((int(ns), stage))
    return out


# ------------------------------------------------------------------------------ the measurement
class Thin:
    """One thin path: its worker and facade (stamped), and a keep-alive client."""

    def __init__(self, name: str, cwd: Path, broker: str, work: Path, same: list[str], profile: Path | None = None) -> None:
        self.name, self.port = name, free_port()
        where = {role: str(profile / f"{name}-{role}.prof") if profile else "" for role in ("worker", "facade")}
        self.worker = spawn("worker", ["worker", "--broker", broker, *same, "--concurrency", "4"], work,
                            f"{name}-worker", cwd, where["worker"])
        self.facade = spawn("facade", ["serve", "--broker", broker, "--port", str(self.port)], work, f"{name}-facade",
                            cwd, where["facade"])
        self.work = work
        self.conn: http.client.HTTPConnection | None = None
        self.client = Stamps(str(work / f"{name}-client.stamps"))
        self.rounds: list[tuple[int, int]] = []

    def ready(self) -> None:
        url = f"http://127.0.0.1:{self.port}"
        wait_healthy(url, [self.worker, self.facade], self.work / f"{self.name}-facade.log")
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def call(self, body: bytes, timed: bool) -> float:
        assert self.conn is not None
        start = time.monotonic_ns()
        self.conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        data = response.read()
        end = time.monotonic_ns()
        if response.status != 200:
            raise SystemExit(f"{self.name}: {response.status}: {data[:300]!r}")
        if timed:
            self.rounds.append((start, end))
        return (end - start) / 1e6

    def hops(self) -> list[dict[str, int]]:
        """Each timed round's stamps: stage -> ns (the first of each stage inside the round)."""
        events = sorted(read_stamps(self.work / f"{self.name}-facade.stamps")
                        + read_stamps(self.work / f"{self.name}-worker.stamps"))
        rounds = []
        for start, end in self.rounds:
            stages = {"c_send": start, "c_recv": end}
            for ns, stage in events:
                if start <= ns <= end and stage not in stages:
                    stages[stage] = ns
            rounds.append(stages)
        return rounds

    def close(self) -> None:
        for proc in (self.facade, self.worker):
            stop(proc)


def start_engine(backend: str, dtype: str, model: str | None) -> Any:
    from worker.backends.select import load_backend
    from worker.engine.pipeline import Engine
    from worker.models.resolve import describe

    info = describe(model)
    return Engine(info, load_backend(backend, info, "cpu", dtype).backend).start()


def run(args: argparse.Namespace) -> str:
    from producer.jobs import Options

    work = Path(tempfile.mkdtemp(prefix="ef-hops-"))
    load_before = os.getloadavg()
    redis = RedisProcess(work)
    same = ["--device", "cpu", "--backend", args.backend, "--dtype", args.dtype, *(["--model", args.model] if args.model else [])]
    paths = [Thin("thin", REPO, f"{redis.url[:-2]}/1", work, same, args.cprofile)]
    if args.contender:
        paths.append(Thin("thin@contender", Path(args.contender), f"{redis.url[:-2]}/2", work, same))
    engine = start_engine(args.backend, args.dtype, args.model)
    name = MODEL if args.model is None else _slug(args.model)
    body = json.dumps({"input": TEXT, "model": name}).encode()
    engine_ms: list[float] = []
    ms: dict[str, list[float]] = {p.name: [] for p in paths}
    try:
        for path in paths:
            path.ready()
        time.sleep(args.gap)
        for round_ in range(args.warmup + args.requests):
            timed = round_ >= args.warmup
            start = time.perf_counter()
            engine.run([TEXT], Options())
            if timed:
                engine_ms.append((time.perf_counter() - start) * 1000)
            time.sleep(args.gap)
            for path in paths:
                elapsed = path.call(body, timed)
                if timed:
                    ms[path.name].append(elapsed)
                time.sleep(args.gap)
    finally:
        for path in paths:
            path.close()
        redis.stop()
        engine.stop()
    load_after = os.getloadavg()
    return report(args, paths, engine_ms, ms, (load_before[0], load_after[0]))


def _slug(ref: str) -> str:
    from producer.jobs import model_slug

    return model_slug(ref)


def report(args: argparse.Namespace, paths: list[Thin], engine_ms: list[float], ms: dict[str, list[float]],
           load: tuple[float, float]) -> str:
    e50 = float(np.percentile(engine_ms, 50))
    lines = [
        f"## Thin path hop by hop — {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC (`bench/facade_hops.py`)",
        "",
        f"Machine: {machine()}; load average {load[0]:.2f} before, {load[1]:.2f} after.",
        f"Command: `python -m bench.facade_hops {' '.join(sys.argv[1:])}`",
        f"Model: {args.model or 'bundled ' + MODEL}, {args.backend} {args.dtype} on CPU; one text per call, "
        f"{args.requests} rounds after {args.warmup} warm-up rounds, {args.gap * 1000:.0f} ms of quiet before each call.",
        "",
        f"Engine alone (Engine.run in the benchmark's process): p50 {e50:.2f} ms, p90 {np.percentile(engine_ms, 90):.2f}.",
        "",
    ]
    for path in paths:
        rounds = path.hops()
        total = np.array(ms[path.name])
        lines += [f"### {path.name}: p50 {np.percentile(total, 50):.2f} ms (added over the engine alone "
                  f"{np.percentile(total, 50) - e50:+.2f} ms), p90 {np.percentile(total, 90):.2f}", "",
                  "| hop (stamp) | gap from the previous stamp, ms: p50 (p90) | since the client's send, p50 |",
                  "|---|---:|---:|"]
        previous = "c_send"
        for stage in ORDER[1:]:
            gaps = [(r[stage] - r[previous]) / 1e6 for r in rounds if stage in r and previous in r]
            since = [(r[stage] - r["c_send"]) / 1e6 for r in rounds if stage in r]
            if not gaps:
                continue
            lines.append(f"| {LABELS[stage]} | {np.percentile(gaps, 50):.3f} ({np.percentile(gaps, 90):.3f}) | "
                         f"{np.percentile(since, 50):.3f} |")
            previous = stage
        lines += ["", "| segment (per round, then the median) | p50 ms | p90 ms |", "|---|---:|---:|"]
        for label, first, last in SEGMENTS:
            values = [(r[last] - r[first] - (r["w_done"] - r["w_submitted"] if first == "c_send" and last == "c_recv" else 0)) / 1e6
                      for r in rounds if first in r and last in r and "w_done" in r and "w_submitted" in r]
            if values:
                lines.append(f"| {label} | {np.percentile(values, 50):.3f} | {np.percentile(values, 90):.3f} |")
        engine_in_worker = [(r["w_done"] - r["w_submitted"]) / 1e6 for r in rounds if "w_done" in r and "w_submitted" in r]
        if engine_in_worker:
            inside = float(np.percentile(engine_in_worker, 50))
            lines += ["", f"Engine in the worker (submitted -> done) p50 {inside:.2f} ms against the engine alone's "
                      f"{e50:.2f} ms: the hops outside the engine add {np.percentile(total, 50) - inside:.2f} ms "
                      "(p50 of the whole less p50 of the engine's part)."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--gap", type=float, default=0.05, help="Seconds of quiet before each timed call")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--model", default=None, help="A model folder instead of the bundled model")
    parser.add_argument("--contender", default=None, help="An older checkout whose thin path runs in the same rounds")
    parser.add_argument("--cprofile", type=Path, default=None, help="A folder for cProfile statistics of this "
                        "checkout's facade and worker main threads (their timings then include cProfile's cost)")
    parser.add_argument("--out", type=Path, default=None, help="Append the Markdown report here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from producer.settings import passive_openmp

    passive_openmp()
    print_report(run(args), args.out)


if __name__ == "__main__":
    main()
