"""How long an inline call waits while the same worker runs a bulk job.

One ``embedfleet worker`` on a real Redis hosts the bundled all-MiniLM-L6-v2 with ``--concurrency``
shard slots. A bulk job over the sample corpus fills them; meanwhile this process makes one
single-text inline call every ``--gap`` seconds (Celery's ``Client.embed``, no HTTP) and times
it. Reported: the idle latency before the job, the latency during it, and the job's rows/s (the
price the bulk job pays for the calls).

``--contender PATH`` runs the same measurement against the worker of another checkout (with its
own ``.venv``), e.g. the commit before the inline lane, side by side in one run:

    git worktree add /tmp/before <commit> && (cd /tmp/before && bash scripts/setup.sh)
    python bench/inline_under_bulk.py --contender /tmp/before --out bench/RESULTS-facade.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import ENTRY, TEXT, RedisProcess, machine, stop  # noqa: E402
from producer.client import Client  # noqa: E402

CORPUS = ROOT / "data" / "sample-corpus.parquet"


def start_worker(checkout: Path, broker: str, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    """The worker of ``checkout``, run by that checkout's own virtualenv."""
    python = checkout / ".venv" / "bin" / "python"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               EMBEDFLEET_STORAGE_ROOTS=str(log.parent))  # the corpus and the outputs live there
    command = [str(python), "-c", ENTRY, "worker", "--broker", broker, "--device", "cpu",
               "--backend", args.backend, "--dtype", args.dtype, "--concurrency", str(args.concurrency)]
    return subprocess.Popen(command, cwd=checkout, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def timed_call(client: Client) -> float:
    start = time.perf_counter()
    client.embed(TEXT, timeout=600)
    return (time.perf_counter() - start) * 1000


def measure(checkout: Path, args: argparse.Namespace, work: Path) -> dict[str, object]:
    """Idle latency, latency during a bulk job, and the job's throughput, for one worker."""
    redis = RedisProcess(work)
    log = work / f"worker-{checkout.name}.log"
    worker = start_worker(checkout, redis.url, args, log)
    try:
        client = Client(broker=redis.url)
        timed_call(client)  # waits for the worker to come up, and warms it
        idle = [timed_call(client) for _ in range(args.idle_calls)]
        corpus = work / "corpus.parquet"
        pq.write_table(pq.read_table(CORPUS).slice(0, args.rows), corpus)
        out = work / f"out-{checkout.name}"
        started = time.perf_counter()
        handle = client.submit_corpus(str(corpus), str(out), id_column="id", shard_rows=args.shard_rows)
        busy: list[float] = []
        while not handle.progress().finished:
            time.sleep(args.gap)
            busy.append(timed_call(client))
        manifest = handle.wait(timeout=600)
        seconds = time.perf_counter() - started
        return {"idle": idle, "busy": busy, "rows_per_s": manifest.rows_written / seconds}
    finally:
        stop(worker)
        redis.stop()


def pct(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q):.0f}" if values else "-"


def report(results: dict[str, dict], args: argparse.Namespace, command: str) -> str:
    lines = [
        f"## Inline calls during a bulk job, {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        f"Machine: {machine()}. Command: `{command}`.",
        f"One worker, `--concurrency {args.concurrency}`, {args.backend} {args.dtype}; a {args.rows}-row job in "
        f"{args.shard_rows}-row shards; a single-text call every {args.gap} s while it runs.",
        "",
        "| worker | idle p50 ms | during the job: calls, p50 / p90 / max ms | job rows/s |",
        "| --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        busy = r["busy"]
        lines.append(f"| {name} | {pct(r['idle'], 50)} | {len(busy)}, {pct(busy, 50)} / {pct(busy, 90)} / "
                     f"{max(busy) if busy else 0:.0f} | {r['rows_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--shard-rows", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=1, help="The worker's shard slots")
    parser.add_argument("--gap", type=float, default=0.25, help="Seconds between inline calls")
    parser.add_argument("--idle-calls", type=int, default=20)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--contender", type=Path, default=None, help="Another checkout whose worker to compare")
    parser.add_argument("--out", type=Path, default=None, help="Append the Markdown report here")
    args = parser.parse_args()
    results = {}
    for checkout in [ROOT, args.contender] if args.contender else [ROOT]:
        commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        label = f"{'this checkout' if checkout == ROOT else 'contender'} ({commit})"
        with tempfile.TemporaryDirectory(prefix="ef-inline-bulk-") as work:
            results[label] = measure(Path(checkout).resolve(), args, Path(work))
    text = report(results, args, "python " + " ".join(sys.argv))
    print(text)
    if args.out:
        with args.out.open("a") as handle:
            handle.write("\n" + text)


if __name__ == "__main__":
    main()
