"""`embedfleet run` on a corpus, this checkout beside older ones (or other settings) in the same
rounds, with each job's exact time and where it went: the shards' timeline from their
done-markers.

Why: issue 13's target for ``embedfleet run`` on the sample corpus (>= 1M tokens/s of job time
on the H200) is a small job (12,000 rows, ~345k tokens: ~50 ms of MiniLM on the device), so its
time is mostly the host's critical path: the submission, the shards' reads, the waves of shards
the worker holds at once, the last part's write. The CLI prints only the total; the markers say
when each shard started and ended and how long its stages took.

    python -m bench.run_job --against /tmp/prev --rounds 2 --device cuda --dtype bfloat16

Each run is a fresh process from the checkout's root (``python -c ENTRY run ...``), as a user
runs it, so the first run of a round pays the same one-time costs in every checkout (the
machine's caches, the batch-budget profile and compiled kernels, are shared after the first).
Job time is the CLI's exact figure (submission to the last part's durable write); tokens/s
counts real tokens. Best of the rounds and the spread per contender.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import ENTRY, REPO, machine

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_DONE = re.compile(r"rows written to .* in [\d,]+ part\(s\) in ([\d.]+) s")


def contender(spec: str) -> tuple[str, Path, dict[str, str]]:
    """``LABEL[@CHECKOUT][:EMBEDFLEET_X=V,...]`` -> (label, checkout, environment)."""
    head, _, settings = spec.partition(":")
    label, _, checkout = head.partition("@")
    env = dict(pair.split("=", 1) for pair in settings.split(",") if pair)
    if not label or any(not key.startswith("EMBEDFLEET_") for key in env):
        raise SystemExit(f"--contender {spec!r}: LABEL[@CHECKOUT][:EMBEDFLEET_X=VALUE,...]")
    return label, Path(checkout).resolve() if checkout else REPO, env


def one_run(checkout: Path, env: dict[str, str], corpus: Path, out: Path, args: argparse.Namespace) -> dict:
    """One ``embedfleet run`` from ``checkout``: its job seconds, tokens and the shards' timeline."""
    command = [sys.executable, "-c", ENTRY, "run", str(corpus), "--out", str(out), "--id-column", args.id_column,
               "--device", args.device, "--dtype", args.dtype, *args.extra]
    path = os.pathsep.join([str(checkout), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.run(command, cwd=checkout, capture_output=True, text=True, timeout=args.timeout,
                          env={**os.environ, "PYTHONPATH": path, "COLUMNS": "400", **env})
    found = _DONE.search(" ".join((proc.stdout + proc.stderr).split()))  # the CLI reports on stderr
    if proc.returncode or not found:
        raise SystemExit(f"{checkout}: run failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return {"seconds": float(found.group(1)), **timeline(out)}


def timeline(out: Path) -> dict:
    """Tokens and, per shard in start order, its start and end (ms after the first start) and stages."""
    from producer.storage import read_markers

    markers = sorted(read_markers(str(out)).values(), key=lambda m: (m.started_at or 0, m.index))
    first = min((m.started_at for m in markers if m.started_at is not None), default=0.0)
    shards = [f"{m.index}: {1000 * ((m.started_at or first) - first):.0f}-{1000 * ((m.finished_at or first) - first):.0f}"
              f" ({', '.join(f'{k} {1000 * v:.0f}' for k, v in m.seconds.items())})" for m in markers]
    last = max((m.finished_at for m in markers if m.finished_at is not None), default=first)
    return {"tokens": sum(m.n_tokens for m in markers), "span": last - first, "shards": shards}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=REPO / "data" / "sample-corpus.parquet")
    parser.add_argument("--id-column", default="id")
    parser.add_argument("--against", type=Path, action="append", default=[], help="an older checkout (prev)")
    parser.add_argument("--contender", action="append", default=[], metavar="LABEL[@CHECKOUT][:EMBEDFLEET_X=V,...]",
                        help="another contender: a checkout and/or settings")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--timeline", action="store_true", help="print every run's shard timeline")
    parser.add_argument("extra", nargs="*", help="more `embedfleet run` options, after --")
    args = parser.parse_args()
    contenders = [("this", REPO, {})] + [(f"prev{i or ''}", path.resolve(), {}) for i, path in enumerate(args.against)]
    contenders += [contender(spec) for spec in args.contender]
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in contenders}
    work = Path(tempfile.mkdtemp(prefix="ef-runjob-"))
    try:
        for round_ in range(args.rounds):
            for label, checkout, env in contenders:
                out = work / f"{label}-{round_}"
                run = one_run(checkout, env, args.corpus, out, args)
                runs[label].append(run)
                print(f"round {round_ + 1}: {label} {run['seconds']:.3f} s, {run['tokens'] / run['seconds']:,.0f} "
                      f"tokens/s; submission to first start {1000 * (run['seconds'] - run['span']):.0f} ms, first start "
                      f"to last part {1000 * run['span']:.0f} ms", flush=True)
                if args.timeline or round_ == args.rounds - 1:
                    print("    shards (ms after the first start: start-end (stages)): " + "; ".join(run["shards"]),
                          flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n`embedfleet run` {args.corpus.name}, device {args.device}, dtype {args.dtype}; machine: {machine()}")
    print("| contender | best job time | spread | tokens/s (best) |\n| --- | ---: | ---: | ---: |")
    for label, checkout, env in contenders:
        times = [r["seconds"] for r in runs[label]]
        best = min(times)
        what = label + ("" if checkout == REPO else f" ({checkout})") + "".join(f" {k}={v}" for k, v in env.items())
        print(f"| {what} | {best:.3f} s | {max(times) - best:.3f} s | {runs[label][0]['tokens'] / best:,.0f} |")


if __name__ == "__main__":
    main()
