"""The engine's batch cycle for small inline calls: where the time from submit to answer goes.

Closed-loop clients keep ``--clients`` single-text (or ``--batch``-text) urgent calls in flight on
one engine in this process (as a worker's inline lane does), and every call is stamped at each
stage the engine passes it through:

    submit -> tokenize (start, end) -> formed (the scheduler handed out its batch) -> launch (the
    device thread took the batch; end of launch) -> post (the post thread took it; its outputs
    back) -> answer (the future resolved; the client's callback ran)

The table gives each stage's median and p90 gap from the previous one, plus requests/s, items per
batch and the process's CPU time per call (``time.process_time``: stable on a shared machine).
The stamps are taken by wrapping the engine's own methods on the instance, so the code measured is
the engine's, unchanged.

``--model tiny`` (default) is a random 2-layer BERT (hidden 32) with the bundled model's tokenizer,
so the forward costs almost nothing and the engine's own overhead shows; ``--model bundled`` is
all-MiniLM-L6-v2. ``--asynchronous`` makes the CPU backend look like a CUDA one to the engine (it
forms batches ahead and micro-batches adaptively, as on a GPU); ``--device-ms`` then adds that
many milliseconds of device time per batch, waited for off the GIL, as a GPU's event wait is.

    python -m bench.engine_cycle --clients 64 --seconds 3 --asynchronous --device-ms 0.5
    python -m bench.engine_cycle --against <commit>   # the same run on a worktree of that commit
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, TEXT, machine

STAGES = ("tokenize_start", "tokenize_end", "formed", "launch_start", "launch_end", "post_start", "outputs_back",
          "answer")


def tiny_model(dest: Path) -> Path:
    """A random 2-layer BERT (hidden 32, CLS pooling, normalized) with the bundled tokenizer."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    from worker.models.resolve import describe

    bundled = describe(None).path
    torch.manual_seed(1)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).eval().save_pretrained(dest)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (Path(bundled) / name).exists():
            shutil.copy(Path(bundled) / name, dest / name)
    return dest


class DeviceTime:
    """A backend wrapper: looks asynchronous to the engine, and each batch's outputs come back
    ``device_ms`` after its launch (the wait sleeps, off the GIL, like a CUDA event wait)."""

    def __init__(self, inner: Any, device_ms: float) -> None:
        self._inner = inner
        self._device_s = device_ms / 1000
        self.asynchronous = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def launch(self, batch: Any, precise: bool = False) -> Any:
        wait = self._inner.launch(batch, precise)
        ready = time.perf_counter() + self._device_s

        def later() -> Any:
            left = ready - time.perf_counter()
            if left > 0:
                time.sleep(left)
            return wait()

        return later


def instrument(engine: Any, stamps: dict[int, dict[str, float]]) -> None:
    """Wrap the engine's stage methods on the instance so each call's stages are stamped."""
    clock = time.perf_counter

    def each(requests: Any, stage: str) -> None:
        now = clock()
        for request in requests:
            entry = stamps.get(id(request.future))
            if entry is not None and stage not in entry:
                entry[stage] = now

    def owners(slots: Any) -> set:
        return {block.request for block in slots.owners}

    tokenize, next_batch = engine._tokenize, engine.scheduler.next_batch
    run_batch, complete = engine._run_batch, engine._complete_batch

    def _tokenize(request: Any, chunk: Any, as_ids: bool) -> None:
        each([request], "tokenize_start")
        tokenize(request, chunk, as_ids)
        each([request], "tokenize_end")

    def _next_batch(*args: Any, **kwargs: Any) -> Any:
        picked = next_batch(*args, **kwargs)
        if picked:
            each(owners(picked), "formed")
        return picked

    def _run_batch(slots: Any, batch: Any) -> None:
        each(owners(slots), "launch_start")
        run_batch(slots, batch)
        each(owners(slots), "launch_end")

    def _complete_batch(slots: Any, batch: Any, wait: Any, launched: float = 0.0) -> None:
        each(owners(slots), "post_start")

        def waited() -> Any:
            out = wait()
            each(owners(slots), "outputs_back")
            return out

        complete(slots, batch, waited, launched)

    if hasattr(engine, "_take_small"):  # small calls tokenized together (the engine's small lane)
        take, admit = engine._take_small, engine._admit

        def _take_small() -> Any:
            pending = take()
            each([request for request, _ in pending], "tokenize_start")
            return pending

        def _admit(request: Any, *rest: Any) -> Any:
            each([request], "tokenize_end")
            return admit(request, *rest)

        engine._take_small, engine._admit = _take_small, _admit
    engine._tokenize, engine.scheduler.next_batch = _tokenize, _next_batch
    engine._run_batch, engine._complete_batch = _run_batch, _complete_batch


def measure(engine: Any, stamps: dict[int, dict[str, float]], clients: int, batch: int, seconds: float,
            warmup: float) -> dict[str, Any]:
    """``clients`` closed-loop urgent submits of ``batch`` texts on an ``instrument``-ed engine
    (``stamps``: its table); per-stage gaps of the calls timed."""
    timed: list[dict[str, float]] = []
    lock = threading.Lock()
    begin = time.perf_counter() + warmup
    stop_at = begin + seconds
    live = [clients]
    finished = threading.Event()
    counter = [0]
    texts_cache = [[f"{TEXT} {k} {i}" for i in range(batch)] for k in range(257)]

    def launch() -> None:
        with lock:
            counter[0] += 1
            index = counter[0]
        entry = {"submit": time.perf_counter()}
        future = _submit(engine, texts_cache[index % len(texts_cache)], stamps, entry)
        future.add_done_callback(lambda f: landed(entry, f))

    def landed(entry: dict[str, float], future: Any) -> None:
        entry["answer"] = time.perf_counter()
        future.result()
        stamps.pop(id(future), None)
        if begin <= entry["submit"] and entry["answer"] <= stop_at:
            with lock:
                timed.append(entry)
        if entry["answer"] < stop_at:
            again.put(True)  # the next call is submitted by the client thread, as a worker's consumer does
            return
        with lock:
            live[0] -= 1
            if live[0] == 0:
                finished.set()

    again: queue.SimpleQueue = queue.SimpleQueue()

    def client() -> None:
        while again.get():
            launch()

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    for _ in range(clients):
        again.put(True)
    time.sleep(max(0.0, begin - time.perf_counter()))
    cpu0, b0, i0 = time.process_time(), engine.stats["batches"], engine.stats["items"]
    time.sleep(max(0.0, stop_at - time.perf_counter()))
    cpu, b1, i1 = time.process_time() - cpu0, engine.stats["batches"], engine.stats["items"]
    finished.wait(seconds + warmup + 60)
    again.put(False)
    thread.join(10)
    gaps: dict[str, dict[str, float]] = {}
    previous = "submit"
    for stage in STAGES:
        values = [e[stage] - e[previous] for e in timed if stage in e and previous in e]
        if values:
            ms = np.array(values) * 1000
            gaps[stage] = {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90))}
        previous = stage
    total = np.array([e["answer"] - e["submit"] for e in timed]) * 1000
    return {"clients": clients, "batch": batch, "requests": len(timed), "req_s": len(timed) / seconds,
            "cpu_ms_per_request": 1000 * cpu / max(1, len(timed)), "items_per_batch": (i1 - i0) / max(1, b1 - b0),
            "p50": float(np.percentile(total, 50)), "p99": float(np.percentile(total, 99)), "gaps": gaps}


def _submit(engine: Any, texts: list[str], stamps: dict[int, dict[str, float]], entry: dict[str, float]) -> Any:
    """``engine.submit`` with the call's stamp entry registered under its future before any
    engine thread can reach it: from a wrapped ``_validate``, which submit calls with the new
    request before it queues anything."""
    validate = engine._validate

    def first(inputs: Any, options: Any, request: Any) -> Any:
        stamps[id(request.future)] = entry
        return validate(inputs, options, request)

    with _SUBMIT_LOCK:
        engine._validate = first
        try:
            return engine.submit(texts, urgent=True)
        finally:
            del engine._validate


_SUBMIT_LOCK = threading.Lock()


def profile_threads() -> list[Any]:
    """A cProfile in every thread started from now on (the engine's, its pools', the client's):
    ``threading.setprofile``'s hook starts one on the thread's first event."""
    import cProfile

    profiles: list[Any] = []

    def start(*_: Any) -> None:
        profile = cProfile.Profile()
        profiles.append(profile)
        profile.enable()

    threading.setprofile(start)
    return profiles


def write_profile(profiles: list[Any], path: str) -> None:
    """The threads' profiles merged, top 40 by own time, into ``path``."""
    import io
    import pstats

    for profile in profiles:
        profile.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiles[0], stream=stream)
    for profile in profiles[1:]:
        stats.add(profile)
    stats.sort_stats("tottime").print_stats(40)
    Path(path).write_text(stream.getvalue())


def serve(args: argparse.Namespace) -> None:
    """Build the engine in this checkout and print one JSON line per measurement."""
    import torch

    from worker.backends.torch import TorchBackend
    from worker.engine.pipeline import Engine
    from worker.models.resolve import describe

    with tempfile.TemporaryDirectory() as tmp:
        path = None if args.model == "bundled" else str(tiny_model(Path(tmp) / "tiny"))
        info = describe(path)
        backend: Any = TorchBackend(info, device=args.device, dtype=args.dtype)
        if args.device == "cpu":
            torch.set_num_threads(args.torch_threads)  # the forward is not what is measured: no OpenMP spinning
        if args.asynchronous and args.device == "cpu":
            backend = DeviceTime(backend, args.device_ms)
        engine = Engine(info, backend, max_batch_tokens=args.max_batch_tokens)
        stamps: dict[int, dict[str, float]] = {}
        instrument(engine, stamps)
        profiles = profile_threads() if args.profile else []
        engine.start()
        try:
            if backend.asynchronous and args.device != "cpu":
                engine.warm_up()
            engine.run(["warm up"] * 64, timeout=60)
            for passes in range(args.passes):
                for clients in args.clients:
                    result = measure(engine, stamps, clients, args.batch, args.seconds, args.warmup)
                    result["pass"] = passes
                    print(json.dumps(result), flush=True)
        finally:
            engine.stop()
            if args.profile:
                write_profile(profiles, args.profile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "bundled"), default="tiny")
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64])
    parser.add_argument("--batch", type=int, default=1, help="texts per call")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: the real asynchronous path (no --device-ms)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--asynchronous", action="store_true", help="the engine's CUDA-like path")
    parser.add_argument("--device-ms", type=float, default=0.0, help="device time per batch (with --asynchronous)")
    parser.add_argument("--profile", help="write the engine threads' merged cProfile (top 40, own time) here")
    parser.add_argument("--against", help="a commit (measured on a worktree of it) or a checkout's folder (as it "
                        "is, no git needed): the same measurement there, run after this one")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    run_all(args)


def run_all(args: argparse.Namespace) -> None:
    forwarded = _without(sys.argv[1:], "--against")
    trees = [("this tree", REPO)]
    worktree = None
    if args.against and Path(args.against).is_dir():
        trees.append((args.against, Path(args.against).resolve()))
    elif args.against:
        worktree = Path(tempfile.mkdtemp(prefix="cycle-")) / "old"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.against],
                       check=True, capture_output=True)
        trees.append((args.against, worktree))
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f}")
    try:
        rows: list[tuple[str, dict[str, Any]]] = []
        for label, tree in trees:
            out = subprocess.run([sys.executable, str(REPO / "bench" / "engine_cycle.py"), *forwarded, "--serve"],
                                 cwd=tree, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                     [str(tree), *filter(None, [os.environ.get("PYTHONPATH")])])}, capture_output=True,
                                 text=True, timeout=600)
            if out.returncode:
                print(out.stderr[-3000:])
                raise SystemExit(f"{label}: the measurement failed")
            rows += [(label, json.loads(line)) for line in out.stdout.splitlines() if line.startswith("{")]
        report(rows)
    finally:
        if worktree is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)],
                           capture_output=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")


def _without(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == flag:
            skip = True
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return out


def report(rows: list[tuple[str, dict[str, Any]]]) -> None:
    head = "| tree | clients | pass | req/s | p50 / p99 ms | CPU ms/call | items/batch | " + \
        " | ".join(STAGES) + " |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for label, r in rows:
        gaps = " | ".join(f"{r['gaps'][s]['p50']:.2f} ({r['gaps'][s]['p90']:.2f})" if s in r["gaps"] else "-"
                          for s in STAGES)
        print(f"| {label} | {r['clients']} | {r['pass']} | {r['req_s']:.0f} | {r['p50']:.2f} / {r['p99']:.2f} | "
              f"{r['cpu_ms_per_request']:.3f} | {r['items_per_batch']:.1f} | {gaps} |")


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    main()
