"""Equal quality to fp32: what a faster backend or dtype may lose, measured the way users lose it.

What users lose with a faster, lossier stack (int8, bf16) is retrieval quality, so that is what
is measured, without labels: embed a corpus with torch fp32 and with the candidate, take some of
its texts as queries, and compare each query's top-10 neighbours under the candidate with its
top-10 under fp32 (recall@10 against fp32), beside every vector's cosine to its fp32 vector. A
candidate is of *equal quality* when recall@10 >= 0.97 and the smallest cosine >= 0.99 (one
vector per-vector cosine of 0.999, the earlier gate, is passed by fp32 and bf16 only, and says
little about retrieval). Scores (rerank, classify) stay compared directly: within 0.01.

The texts the selection measures quality on are real English: paragraphs of the Python
documentation that every CPython ships (``pydoc_data.topics``), the same source as the
repository's sample corpus, so a worker measures on real prose anywhere without a download.
Random-word texts have flat neighbourhoods in which near-ties swap places under any change, so
they make recall meaningless. This module imports nothing from the backends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

#: Top-k neighbours compared per query.
K = 10
#: Equal quality: recall@K against fp32 at least this ...
RECALL_GATE = 0.97
#: ... and every vector's cosine to fp32 at least this.
COSINE_GATE = 0.99
#: Scores (rerank, classify): at most this far from fp32's.
SCORE_TOLERANCE = 0.01
#: Real paragraphs (``prose``) embedded by every candidate of the auto selection for the rule;
#: the paragraphs after them are for calibration (the OpenVINO int8 smoothing), never measured on.
QUALITY_TEXTS = 384


@dataclass(frozen=True)
class Agreement:
    """How a candidate's vectors agree with fp32's on one corpus."""

    recall: float
    cos_min: float
    cos_mean: float

    @property
    def equal_quality(self) -> bool:
        """recall@10 >= 0.97 and min cosine >= 0.99 (NaN anywhere fails)."""
        return bool(self.recall >= RECALL_GATE and self.cos_min >= COSINE_GATE)


def normalized(vectors: np.ndarray) -> np.ndarray:
    """Unit rows (a zero row stays zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def cosines(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Each row's cosine to the same row of ``reference``."""
    return (normalized(reference) * normalized(values)).sum(axis=1)


def neighbours(vectors: np.ndarray, queries: np.ndarray, k: int = K) -> np.ndarray:
    """``[len(queries), k]``: each query row's k nearest other rows by cosine (itself excluded)."""
    unit = normalized(vectors)
    scores = unit[queries] @ unit.T
    scores[np.arange(len(queries)), queries] = -np.inf
    k = min(k, len(unit) - 1)
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return top


def recall_at_k(reference: np.ndarray, values: np.ndarray, queries: np.ndarray, k: int = K) -> float:
    """Mean overlap of each query's top-k under ``values`` with its top-k under ``reference``."""
    expected, found = neighbours(reference, queries, k), neighbours(values, queries, k)
    hits = [len(np.intersect1d(a, b, assume_unique=True)) for a, b in zip(expected, found)]
    return float(np.mean(hits)) / expected.shape[1]


def query_rows(n: int, n_queries: int) -> np.ndarray:
    """``n_queries`` row numbers spread evenly over a corpus of ``n`` (all rows when fewer)."""
    if n_queries >= n:
        return np.arange(n)
    return np.linspace(0, n - 1, n_queries).round().astype(np.int64)


def agreement(reference: np.ndarray, values: np.ndarray, n_queries: int = 1000, k: int = K) -> Agreement:
    """recall@k against ``reference`` (``n_queries`` of the rows as queries) and the cosines."""
    cosine = cosines(reference, values)
    if not np.isfinite(values).all():
        return Agreement(float("nan"), float("nan"), float("nan"))
    recall = recall_at_k(reference, values, query_rows(len(reference), n_queries), k)
    return Agreement(recall, float(cosine.min()), float(cosine.mean()))


def prose(n: int, min_words: int = 5, max_words: int = 200) -> list[str]:
    """``n`` real English paragraphs from the Python documentation shipped with CPython.

    Deterministic for one Python version: topics in sorted order, paragraphs in order, code
    blocks and tables skipped (lines mostly of symbols), whitespace collapsed.
    """
    from pydoc_data.topics import topics

    out: list[str] = []
    seen: set[str] = set()
    for name in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            text = " ".join(paragraph.split())
            words = text.split()
            letters = sum(ch.isalpha() or ch.isspace() for ch in text)
            if min_words <= len(words) <= max_words and letters >= 0.85 * len(text) and text not in seen:
                seen.add(text)
                out.append(text)
                if len(out) == n:
                    return out
    return out
