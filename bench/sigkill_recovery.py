"""How long a bulk job takes to finish after its workers are SIGKILLed, with default settings.

Two ``embedfleet worker`` processes on a redis-server of the benchmark's own host the bundled
all-MiniLM-L6-v2 (``--concurrency 2`` each); a job of ``--rows`` rows of the sample corpus in
``--shards`` shards is submitted; each time ``--kill-every`` more shards are done, one worker
(alternately) is killed with SIGKILL, mid-shard, and started again. Reported: seconds from the
last kill to the job's end (or "not done" at ``--limit``), shards delivered more than once,
and whether every row was written exactly once. No setting is changed from its default (the
visibility timeout stays at an hour).

``--contender PATH`` runs the same storm against another checkout's workers (its own ``.venv``)
in the same run, e.g. the commit before liveness:

    git worktree add /tmp/before <commit> && (cd /tmp/before && bash scripts/setup.sh)
    python bench/sigkill_recovery.py --contender /tmp/before --out bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import ENTRY, RedisProcess, machine, stop, wait_for_line  # noqa: E402

CORPUS = ROOT / "data" / "sample-corpus.parquet"


def start_worker(checkout: Path, broker: str, log: Path) -> subprocess.Popen:
    """A worker of ``checkout`` (its own virtualenv), default settings, waited for until ready."""
    python = checkout / ".venv" / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDFLEET_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               EMBEDFLEET_STORAGE_ROOTS=str(log.parent))  # the one setting a worker cannot start without
    command = [str(python), "-c", ENTRY, "worker", "--broker", broker, "--device", "cpu", "--backend", "torch",
               "--concurrency", "2", "--verbose"]
    with log.open("a") as handle:
        proc = subprocess.Popen(command, cwd=checkout, env=env, stdout=handle, stderr=subprocess.STDOUT)
    wait_for_line(proc, log, "worker ready")
    return proc


def submit(checkout: Path, broker: str, corpus: Path, out: Path, shard_rows: int) -> None:
    """Submit with the checkout's own producer: messages of another version may not validate."""
    python = checkout / ".venv" / "bin" / "python"
    subprocess.run([str(python), "-c", ENTRY, "submit", str(corpus), "--out", str(out), "--broker", broker,
                    "--id-column", "id", "--shard-rows", str(shard_rows)], cwd=checkout, check=True,
                   capture_output=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def done_shards(out: Path) -> int:
    parts = out / "_parts"
    return len(list(parts.glob("part-*.json"))) if parts.exists() else 0


def storm(checkout: Path, args: argparse.Namespace, work: Path) -> dict[str, object]:
    """Run the job through ``args.kills`` SIGKILLs; measure from the last kill to the end."""
    redis = RedisProcess(work)
    logs = [work / f"worker-{checkout.name}-{i}.log" for i in range(2)]
    procs = [start_worker(checkout, redis.url, log) for log in logs]
    corpus = work / "corpus.parquet"
    pq.write_table(pq.read_table(CORPUS).slice(0, args.rows), corpus)
    out = work / f"out-{checkout.name}"
    try:
        submit(checkout, redis.url, corpus, out, args.rows // args.shards)
        last_kill = time.monotonic()
        for kill in range(args.kills):
            threshold = (kill + 1) * args.kill_every
            while done_shards(out) < threshold:  # a contender may never get there (its shards stuck)
                if time.monotonic() - last_kill > args.limit:
                    return {"after_last_kill_s": None, "limit": args.limit, **check(out, corpus)}
                time.sleep(0.05)
            victim = kill % 2
            procs[victim].send_signal(signal.SIGKILL)
            procs[victim].wait(30)
            last_kill = time.monotonic()
            procs[victim] = start_worker(checkout, redis.url, logs[victim])
        while not (out / "_manifest.json").exists() and time.monotonic() - last_kill < args.limit:
            time.sleep(0.2)
        after = time.monotonic() - last_kill
        finished = (out / "_manifest.json").exists()
        return {"after_last_kill_s": after if finished else None, "limit": args.limit, **check(out, corpus)}
    finally:
        for proc in procs:
            stop(proc)
        redis.stop()


def check(out: Path, corpus: Path) -> dict[str, object]:
    """Rows written once each (ids against the corpus), and shards delivered more than once."""
    parts = sorted(out.glob("part-*.parquet"))
    ids = pq.read_table(parts, columns=["id"]).column("id").to_pylist() if parts else []
    want = pq.read_table(corpus, columns=["id"]).column("id").to_pylist()
    markers = [json.loads(p.read_text()) for p in sorted((out / "_parts").glob("part-*.json"))] \
        if (out / "_parts").exists() else []
    return {"rows": len(ids), "every_row_once": sorted(ids) == sorted(want) and len(ids) == len(set(ids)),
            "redelivered": sum(m.get("deliveries", 1) > 1 for m in markers)}


def line(name: str, runs: list[dict[str, object]]) -> str:
    times = [r["after_last_kill_s"] for r in runs]
    shown = ", ".join(f"{t:.1f}" if t is not None else f"not done at {r['limit']}" for t, r in zip(times, runs))
    once = all(r["every_row_once"] for r in runs)
    redelivered = ", ".join(str(r["redelivered"]) for r in runs)
    return f"| {name} | {shown} | {redelivered} | {'yes' if once else 'no'} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--kill-every", type=int, default=3, help="more shards done between two kills")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--limit", type=float, default=300.0, help="seconds after the last kill before giving up")
    parser.add_argument("--contender", type=Path, action="append", default=[])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    checkouts = [ROOT, *args.contender]
    results: dict[Path, list[dict[str, object]]] = {c: [] for c in checkouts}
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.passes):  # contenders interleaved, pass by pass
            for checkout in checkouts:
                work = Path(tmp) / f"{checkout.name}-{n}"
                work.mkdir()
                results[checkout].append(storm(checkout, args, work))
                print(checkout, results[checkout][-1], flush=True)
    command = "python bench/sigkill_recovery.py " + " ".join(sys.argv[1:])
    text = [f"\n## SIGKILL storm, default settings ({dt.date.today()})\n", f"Machine: {machine()}. Command: `{command}`.",
            f"{args.rows} rows in {args.shards} shards, 2 workers x 2 slots, {args.kills} SIGKILLs "
            f"(one every {args.kill_every} shards done), {args.passes} passes.\n",
            "| workers | job done after the last kill (s), per pass | shards delivered twice | every row once |",
            "| --- | --- | --- | --- |"]
    text += [line("this checkout" if c == ROOT else str(c), results[c]) for c in checkouts]
    print("\n".join(text))
    if args.out:
        with args.out.open("a") as handle:
            handle.write("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
