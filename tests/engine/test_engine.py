"""The engine end to end on real models: quality against references, batching, failure handling.

* The bundled all-MiniLM-L6-v2 against sentence-transformers on real, varied texts.
* Tiny random models against a direct transformers computation (CLS / mean pooling, prompts,
  Matryoshka dimensions, normalization, rerank sigmoid / raw logits, classify softmax).
* Engine behaviour: order restored, concurrent requests sharing batches, out-of-memory split,
  NaN recompute, per-item errors (truncate=false, bad inputs) that never fail the others.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from producer.jobs import JobKind, Options
from producer.rules import MAX_INPUT_CHARS
from worker.engine.pipeline import Engine, EngineResult
from worker.engine.scheduler import Picked

from tests.fixtures_extra import (
    EDGE_TEXTS,
    GatedBackend,
    NanBackend,
    OomBackend,
    WrappedBackend,
    cosine_rows,
    first_token_id,
    make_engine,
    sample_texts,
    tiny_embed_engine,  # noqa: F401  (fixture)
)

COS_MIN = 0.99999


# ---------------------------------------------------------------------------- references
def _hf(path: Path, kind: str = "embed"):  # type: ignore[no-untyped-def]
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    loader = AutoModel if kind == "embed" else AutoModelForSequenceClassification
    model = loader.from_pretrained(str(path), dtype=torch.float32).eval()
    return AutoTokenizer.from_pretrained(str(path)), model


@torch.inference_mode()
def reference_embed(path: Path, texts: list[str], max_length: int, pooling: str, normalize: bool) -> np.ndarray:
    """Plain transformers: tokenize with truncation, run, pool by the mask, maybe normalize."""
    tokenizer, model = _hf(path)
    rows = []
    for start in range(0, len(texts), 16):
        enc = tokenizer(texts[start : start + 16], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        if pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
        rows.append(pooled)
    out = torch.cat(rows)
    if normalize:
        out = torch.nn.functional.normalize(out, dim=1)
    return out.numpy()


@torch.inference_mode()
def reference_logits(path: Path, first: list[str], second: list[str] | None, max_length: int) -> np.ndarray:
    tokenizer, model = _hf(path, "classify")
    enc = tokenizer(first, second, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return model(**enc).logits.numpy()


def assert_close_rows(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.isfinite(got).all(), f"{what}: non-finite output"
    cos = cosine_rows(got, want)
    worst = int(cos.argmin())
    assert cos.min() >= COS_MIN, f"{what}: row {worst} cosine {cos[worst]:.7f} < {COS_MIN}"
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5, err_msg=what)


def mixed_texts(n: int = 40, seed: int = 0) -> list[str]:
    """Real texts of shuffled lengths plus edge cases (one longer than any tiny model's limit)."""
    texts = sample_texts(n, step=101) + EDGE_TEXTS
    random.Random(seed).shuffle(texts)
    return texts


# ---------------------------------------------------------------------------- bundled model
@pytest.fixture(scope="module")
def bundled_engine(bundled_model: Path) -> Iterator[Engine]:
    engine = make_engine(None)
    yield engine
    engine.stop()


def test_bundled_model_matches_sentence_transformers(bundled_engine: Engine, bundled_model: Path) -> None:
    from sentence_transformers import SentenceTransformer

    texts = sample_texts(220) + EDGE_TEXTS
    result = bundled_engine.run(texts, timeout=600)
    assert not result.errors
    st_model = SentenceTransformer(str(bundled_model), device="cpu")
    assert st_model.max_seq_length == bundled_engine.info.max_length == 256
    want = st_model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=False)
    assert result.values.dtype == np.float32 and result.values.shape == (len(texts), 384)
    cos = cosine_rows(result.values, want)
    worst = int(cos.argmin())
    assert cos.min() >= COS_MIN, f"text {worst} ({texts[worst][:60]!r}): cosine {cos[worst]:.7f}"
    # The model's own files normalize; so do we.
    np.testing.assert_allclose(np.linalg.norm(result.values, axis=1), 1.0, atol=1e-5)
    # Truncation at 256 tokens is reported per item.
    long_index = texts.index(EDGE_TEXTS[5])
    assert result.truncated[long_index] and result.n_tokens[long_index] == 256
    single = texts.index("word")
    assert not result.truncated[single] and result.n_tokens[single] == 3  # [CLS] word [SEP]
    assert sum(result.truncated) == sum(len(st_model.tokenizer(t)["input_ids"]) > 256 for t in texts)


# ---------------------------------------------------------------------------- tiny embedders
def test_tiny_embed_cls_pooling_matches_transformers(tiny_embed_engine: Engine, tiny_embed_model: Path) -> None:
    info = tiny_embed_engine.info
    assert (info.pooling, info.normalize, info.max_length) == ("cls", True, 64)
    texts = mixed_texts()
    result = tiny_embed_engine.run(texts, timeout=120)
    assert not result.errors
    want = reference_embed(tiny_embed_model, texts, 64, "cls", normalize=True)
    assert_close_rows(result.values, want, "tiny bert cls")
    assert result.truncated[texts.index(EDGE_TEXTS[5])]
    assert result.n_tokens[texts.index(EDGE_TEXTS[5])] == 64


def test_tiny_xlmr_mean_pooling_matches_transformers(tiny_xlmr_model: Path) -> None:
    engine = make_engine(tiny_xlmr_model, max_batch_tokens=1024)
    try:
        info = engine.info
        assert (info.pooling, info.normalize, info.model_type) == ("mean", True, "xlm-roberta")
        texts = mixed_texts(seed=1)
        result = engine.run(texts, timeout=120)
        assert not result.errors
        want = reference_embed(tiny_xlmr_model, texts, info.max_length, "mean", normalize=True)
        assert_close_rows(result.values, want, "tiny xlm-r mean")
        assert max(result.n_tokens) == info.max_length
    finally:
        engine.stop()


@pytest.mark.parametrize("prompt_name", ["query", "passage"])
def test_prompt_name_prefixes_the_models_prompt(tiny_embed_engine: Engine, tiny_embed_model: Path,
                                                prompt_name: str) -> None:
    texts = sample_texts(6, step=501) + ["word"]
    got = tiny_embed_engine.run(texts, Options(prompt_name=prompt_name), timeout=60).values
    prefix = tiny_embed_engine.info.prompts[prompt_name]
    assert prefix == f"{prompt_name}: "
    want = reference_embed(tiny_embed_model, [prefix + t for t in texts], 64, "cls", normalize=True)
    assert_close_rows(got, want, f"prompt {prompt_name}")
    plain = tiny_embed_engine.run(texts, timeout=60).values
    # A random tiny model's CLS vectors differ little between texts, so compare elementwise.
    assert (np.abs(got - plain).max(axis=1) > 1e-4).all(), "the prompt made no difference"


def test_literal_prompt_and_unknown_prompt_name(tiny_embed_engine: Engine, tiny_embed_model: Path) -> None:
    texts = ["alpha beta", "gamma"]
    got = tiny_embed_engine.run(texts, Options(prompt="Represent this: "), timeout=60).values
    want = reference_embed(tiny_embed_model, ["Represent this: " + t for t in texts], 64, "cls", True)
    assert_close_rows(got, want, "literal prompt")
    with pytest.raises(ValueError, match=r"prompt_name 'nope'.*passage, query"):
        tiny_embed_engine.submit(texts, Options(prompt_name="nope"))


def test_normalize_override(tiny_embed_engine: Engine, tiny_embed_model: Path) -> None:
    texts = sample_texts(8, step=301)
    raw = tiny_embed_engine.run(texts, Options(normalize=False), timeout=60).values
    want = reference_embed(tiny_embed_model, texts, 64, "cls", normalize=False)
    assert_close_rows(raw, want, "normalize=False")
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    explicit = tiny_embed_engine.run(texts, Options(normalize=True), timeout=60).values
    np.testing.assert_allclose(np.linalg.norm(explicit, axis=1), 1.0, atol=1e-5)


def test_a_call_without_options_gets_the_models_defaults_and_leaves_them_as_they_were(
        tiny_embed_engine: Engine) -> None:
    """``submit`` shares one default ``Options`` between calls that give none (no pydantic build
    per call): such a call is answered as one given ``Options()``, and nothing changes the default."""
    from worker.engine.pipeline import DEFAULT_OPTIONS

    texts = sample_texts(4, step=17)
    given = tiny_embed_engine.run(texts, Options(), timeout=60)
    for _ in range(2):
        default = tiny_embed_engine.run(texts, timeout=60)
        np.testing.assert_array_equal(default.values, given.values)
        assert default.n_tokens == given.n_tokens and default.outputs == given.outputs
    assert DEFAULT_OPTIONS == Options()


def test_normalize_true_on_a_model_that_does_not_normalize(tiny_embed_model: Path, tmp_path: Path) -> None:
    """A model whose files have no Normalize module returns raw pooled vectors unless asked."""
    import json
    import shutil

    folder = tmp_path / "tiny-bert-unnormalized"
    shutil.copytree(tiny_embed_model, folder)
    modules = [m for m in json.loads((folder / "modules.json").read_text()) if not m["type"].endswith("Normalize")]
    (folder / "modules.json").write_text(json.dumps(modules))
    engine = make_engine(folder)
    try:
        assert engine.info.normalize is False
        texts = ["one text", "another, longer text with more words"]
        plain = engine.run(texts, timeout=60).values
        assert_close_rows(plain, reference_embed(folder, texts, 64, "cls", False), "model default (no normalize)")
        forced = engine.run(texts, Options(normalize=True), timeout=60).values
        assert_close_rows(forced, reference_embed(folder, texts, 64, "cls", True), "normalize=True")
        # a Matryoshka cut renormalizes even here (a cut vector is not unit length), unless told not to
        cut = engine.run(texts, Options(dimensions=8), timeout=60).values
        full = reference_embed(folder, texts, 64, "cls", False)[:, :8]
        np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-5)
        assert_close_rows(cut, full / np.linalg.norm(full, axis=1, keepdims=True), "dimensions=8, model without Normalize")
        raw_cut = engine.run(texts, Options(dimensions=8, normalize=False), timeout=60).values
        assert_close_rows(raw_cut, full, "dimensions=8, normalize=False")
        assert engine.normalizes(Options(dimensions=8)) and not engine.normalizes(Options(dimensions=32))
    finally:
        engine.stop()


@pytest.mark.parametrize("dims", [1, 8, 31])
def test_matryoshka_dimensions_truncate_then_renormalize(tiny_embed_engine: Engine, tiny_embed_model: Path,
                                                         dims: int) -> None:
    texts = sample_texts(10, step=211)
    got = tiny_embed_engine.run(texts, Options(dimensions=dims), timeout=60).values
    full = reference_embed(tiny_embed_model, texts, 64, "cls", normalize=False)[:, :dims]
    want = full / np.linalg.norm(full, axis=1, keepdims=True)
    assert got.shape == (len(texts), dims)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert_close_rows(got, want, f"dimensions={dims}")


def test_dimensions_over_the_model_width_is_an_error(tiny_embed_engine: Engine) -> None:
    with pytest.raises(ValueError, match=r"dimensions=33 is over the model's 32 dimensions"):
        tiny_embed_engine.submit(["x"], Options(dimensions=33))


# ---------------------------------------------------------------------------- rerank / classify
PAIRS_Q = ["what is a generator?", "how do I open a file", "unicode handling 日本語", "x"]


def test_tiny_rerank_matches_transformers_sigmoid_and_raw(tiny_rerank_model: Path) -> None:
    engine = make_engine(tiny_rerank_model)
    try:
        assert engine.info.kind == JobKind.rerank and engine.info.dims == 1
        docs = sample_texts(12, step=401) + [EDGE_TEXTS[5]]
        pairs = [(PAIRS_Q[i % len(PAIRS_Q)], d) for i, d in enumerate(docs)]
        logits = reference_logits(tiny_rerank_model, [q for q, _ in pairs], [d for _, d in pairs],
                                  engine.info.max_length)[:, 0]
        scores = engine.run(pairs, timeout=60)
        raw = engine.run(pairs, Options(raw_scores=True), timeout=60)
        assert not scores.errors and not raw.errors
        assert scores.values.shape == (len(pairs),)
        np.testing.assert_allclose(raw.values, logits, rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(scores.values, 1 / (1 + np.exp(-logits)), rtol=1e-4, atol=1e-6)
        assert ((scores.values > 0) & (scores.values < 1)).all()
        assert scores.truncated[-1] and scores.n_tokens[-1] == engine.info.max_length
        bad = engine.run([("q", "doc"), "not a pair", ("q", ""), (1, "doc")], timeout=60)
        assert set(bad.errors) == {1, 2, 3}
        assert "pair" in bad.errors[1] and "document is empty" in bad.errors[2]
        assert "query must be a string" in bad.errors[3]
        assert bad.values[0] == pytest.approx(float(engine.run([("q", "doc")]).values[0]), abs=1e-6)
    finally:
        engine.stop()


def test_tiny_classify_matches_transformers_softmax(tiny_classify_model: Path) -> None:
    engine = make_engine(tiny_classify_model)
    try:
        info = engine.info
        assert info.kind == JobKind.classify and info.labels == ("negative", "neutral", "positive")
        texts = mixed_texts(20, seed=3)
        logits = reference_logits(tiny_classify_model, texts, None, info.max_length)
        result = engine.run(texts, timeout=60)
        assert not result.errors and result.labels == info.labels
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        np.testing.assert_allclose(result.values, probs, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(result.values.sum(1), 1.0, atol=1e-5)
        # The raw logits the backend hands the head are transformers' logits.
        tokens = engine.tokenizer.encode_tokens(texts[:4])
        block = type("Block", (), {"tokens": tokens})()
        batch = engine._collate(Picked([block], np.zeros(4, np.int64), np.arange(4), tokens.lengths))
        np.testing.assert_allclose(engine.backend.forward(batch), logits[:4], rtol=1e-4, atol=2e-5)
    finally:
        engine.stop()


# ---------------------------------------------------------------------------- batching behaviour
def test_order_restored_across_many_batches(tiny_embed_model: Path) -> None:
    """A small budget forces many length-sorted batches; results still come back in input order."""
    engine = make_engine(tiny_embed_model, max_batch_tokens=96, wrap=WrappedBackend)
    backend: WrappedBackend = engine.backend  # type: ignore[assignment]
    try:
        texts = mixed_texts(60, seed=7)
        result = engine.run(texts, timeout=120)
        assert engine.stats["batches"] >= 10
        for call in backend.calls:  # padded cost within budget, except an item alone
            assert call["n"] == 1 or call["n"] * max(call["lengths"]) <= 96, call
        assert sorted(n for c in backend.calls for n in c["lengths"]) == sorted(
            e.n_tokens for e in engine.tokenizer.encode(texts))
        want = reference_embed(tiny_embed_model, texts, 64, "cls", normalize=True)
        assert_close_rows(result.values, want, "order across batches")
        assert result.n_tokens == [e.n_tokens for e in engine.tokenizer.encode(texts)]
        assert engine.stats["busy_ms"] > 0  # the device's busy time (bench.bulk's measure of feeding) is counted
    finally:
        engine.stop()


class _WaitingBackend(WrappedBackend):
    """A CUDA-like backend whose outputs are waited for as a device is: ``spin`` burns this
    thread's CPU until it has used ``spin`` seconds of it (CUDA's default event wait), else the
    wait sleeps ``sleep`` seconds (a blocking wait)."""

    def __init__(self, inner, spin: float = 0.0, sleep: float = 0.0) -> None:  # type: ignore[no-untyped-def]
        super().__init__(inner)
        self.asynchronous, self.spin, self.sleep = True, spin, sleep

    def launch(self, batch, precise: bool = False):  # type: ignore[no-untyped-def]
        output = self.inner.forward(batch, precise=precise)

        def wait():  # type: ignore[no-untyped-def]
            until = time.thread_time() + self.spin
            while time.thread_time() < until:
                pass
            time.sleep(self.sleep)
            return output

        return wait


@pytest.mark.parametrize("spin", [True, False])
def test_the_wait_for_outputs_is_counted_apart_with_its_cpu(tiny_embed_model: Path, spin: bool) -> None:
    """``wait_ms`` / ``wait_cpu_ms``: the post thread's wall and CPU time waiting for outputs, so
    bench.host can take a spinning wait's CPU out of the engine process's CPU a text."""
    engine = make_engine(tiny_embed_model, max_batch_tokens=4096,
                         wrap=lambda inner: _WaitingBackend(inner, spin=0.05 if spin else 0.0,
                                                            sleep=0.0 if spin else 0.05))
    try:
        assert not engine.run(["one short text", "and another"], timeout=60).errors
        batches = engine.stats["batches"]
        assert batches >= 1 and engine.stats["wait_ms"] >= 50 * batches
        if spin:
            assert engine.stats["wait_cpu_ms"] >= 50 * batches
        else:
            assert engine.stats["wait_cpu_ms"] < engine.stats["wait_ms"] / 2
    finally:
        engine.stop()


def test_concurrent_requests_share_batches(tiny_embed_model: Path) -> None:
    engine = make_engine(tiny_embed_model, max_batch_tokens=4096, wrap=GatedBackend)
    backend: GatedBackend = engine.backend  # type: ignore[assignment]
    try:
        first = engine.submit(["the request that holds the device"])
        assert backend.entered.wait(30)
        groups = [sample_texts(3, step=97 + 13 * i) for i in range(12)]
        with ThreadPoolExecutor(12) as pool:
            futures = list(pool.map(lambda g: engine.submit(g), groups))
        _wait_tokenized(engine)
        backend.gate.set()
        results = [f.result(60) for f in futures]
        first.result(60)
        n_requests = len(groups) + 1
        assert engine.stats["batches"] < n_requests, engine.stats
        assert any(call["n"] > 3 for call in backend.calls), "no batch held items of several requests"
        for group, result in zip(groups, results):
            assert not result.errors
            assert_close_rows(result.values, reference_embed(tiny_embed_model, group, 64, "cls", True),
                              "concurrent request")
    finally:
        backend.gate.set()
        engine.stop()


def test_an_urgent_call_goes_ahead_of_a_pending_backlog(tiny_embed_model: Path) -> None:
    """An inline call (urgent) submitted behind 300 pending bulk texts runs in the very next
    batch, not after the backlog nor behind batches formed while the device was busy."""
    with _device_held_with_a_backlog(tiny_embed_model) as (engine, backend, first, bulk):
        call_text = "urgent " + " ".join(["call"] * 30)  # longer than every bulk text
        call = engine.submit([call_text], urgent=True)
        _wait_tokenized(engine)
        backend.gate.set()
        result = call.result(60)
        bulk.result(60)
        first.result(60)
        urgent_id = first_token_id(engine, call_text)
        assert urgent_id != first_token_id(engine, "short text 0")
        batches = [c["first_ids"] for c in backend.calls]
        assert len(batches) > 20, "the backlog should need many batches"
        position = next(i for i, ids in enumerate(batches) if urgent_id in ids)
        # A synchronous backend forms no batch while one runs: right after the gated batch.
        assert position == 1, f"the urgent call ran in batch {position} of {len(batches)}"
        assert_close_rows(result.values, reference_embed(tiny_embed_model, [call_text], 64, "cls", True),
                          "urgent call")


def test_a_small_call_is_not_queued_behind_a_large_call(tiny_embed_model: Path) -> None:
    """A large inline call (300 texts, dozens of batches) is pending when a one-text call
    arrives: the small call runs within the next two batches, long before the large one ends."""
    engine = make_engine(tiny_embed_model, max_batch_tokens=64, wrap=GatedBackend)
    backend: GatedBackend = engine.backend  # type: ignore[assignment]
    try:
        first = engine.submit(["the request that holds the device"])
        assert backend.entered.wait(30)
        large = engine.submit([f"short text {i}" for i in range(300)], urgent=True)
        _wait_tokenized(engine)
        call_text = "urgent " + " ".join(["call"] * 30)
        small = engine.submit([call_text], urgent=True)
        _wait_tokenized(engine)
        backend.gate.set()
        small.result(60), large.result(60), first.result(60)
        urgent_id = first_token_id(engine, call_text)
        batches = [c["first_ids"] for c in backend.calls]
        assert len(batches) > 20, "the large call should need many batches"
        position = next(i for i, ids in enumerate(batches) if urgent_id in ids)
        assert position <= 2, f"the small call ran in batch {position} of {len(batches)}, behind the large one"
    finally:
        backend.gate.set()
        engine.stop()


def test_a_cancelled_call_is_not_computed(tiny_embed_model: Path) -> None:
    """A call whose caller went away (its future cancelled) while it waited: none of its items
    reaches the device; the call behind it is answered."""
    engine = make_engine(tiny_embed_model, max_batch_tokens=64, wrap=GatedBackend)
    backend: GatedBackend = engine.backend  # type: ignore[assignment]
    try:
        first = engine.submit(["the request that holds the device"])
        assert backend.entered.wait(30)
        gone = engine.submit([f"short text {i}" for i in range(300)], urgent=True)
        _wait_tokenized(engine)
        assert gone.cancel()
        kept = engine.submit(["still wanted"], urgent=True)
        backend.gate.set()
        assert not kept.result(60).errors and not first.result(60).errors
        ran = sum(call["n"] for call in backend.calls)
        assert ran == 2, f"{ran} items computed; the cancelled call's 300 should have been dropped"
        assert engine.stats["dropped"] == 300
    finally:
        backend.gate.set()
        engine.stop()


def test_a_withdrawn_call_is_not_computed(tiny_embed_model: Path) -> None:
    """A call its caller withdrew (``withdrawn()`` turns true: a revoked message) while it waited
    for the device: none of its items is computed; the call behind it is answered."""
    engine = make_engine(tiny_embed_model, max_batch_tokens=64, wrap=GatedBackend)
    backend: GatedBackend = engine.backend  # type: ignore[assignment]
    revoked = threading.Event()
    try:
        first = engine.submit(["the request that holds the device"])
        assert backend.entered.wait(30)
        engine.submit([f"short text {i}" for i in range(100)], urgent=True, withdrawn=revoked.is_set)
        _wait_tokenized(engine)
        revoked.set()
        kept = engine.submit(["still wanted"], urgent=True)
        backend.gate.set()
        assert not kept.result(60).errors and not first.result(60).errors
        assert sum(call["n"] for call in backend.calls) == 2 and engine.stats["dropped"] == 100
    finally:
        backend.gate.set()
        engine.stop()


def test_a_call_past_its_deadline_is_dropped_and_fails_timed_out(tiny_embed_model: Path) -> None:
    """A call whose deadline passes while it waits for the device fails with TimedOut and none
    of its items is computed; one already past its deadline is not even tokenized."""
    from producer.errors import TimedOut

    engine = make_engine(tiny_embed_model, max_batch_tokens=64, wrap=GatedBackend)
    backend: GatedBackend = engine.backend  # type: ignore[assignment]
    try:
        first = engine.submit(["the request that holds the device"])
        assert backend.entered.wait(30)
        soon = time.monotonic() + 0.3
        late = engine.submit([f"short text {i}" for i in range(200)], urgent=True, deadline=soon)
        expired = engine.submit(["already too late"], urgent=True, deadline=time.monotonic() - 1)
        _wait_tokenized(engine)
        while time.monotonic() <= soon:  # let the deadline pass while the device is held
            time.sleep(0.05)
        backend.gate.set()
        for future in (late, expired):
            with pytest.raises(TimedOut):
                future.result(60)
        first.result(60)
        assert sum(call["n"] for call in backend.calls) == 1
        assert engine.stats["dropped"] == 201
    finally:
        backend.gate.set()
        engine.stop()


@pytest.mark.parametrize("asynchronous", [False, True])
def test_batches_are_formed_ahead_only_for_asynchronous_backends(tiny_embed_model: Path, asynchronous: bool) -> None:
    """While a batch runs, a CUDA-like backend has three more formed behind it (two queued, one
    waiting to enter the queue); a synchronous one has none, so urgent work can still jump in."""
    with _device_held_with_a_backlog(tiny_embed_model, asynchronous) as (engine, backend, first, bulk):
        if asynchronous:
            deadline = time.monotonic() + 30
            while engine._formed._value > 0 and time.monotonic() < deadline:  # forming is quick
                time.sleep(0.01)
            assert engine._ready.qsize() == 2 and engine._formed._value == 0
            assert len(engine.scheduler) < 300
        else:
            assert engine._ready.qsize() == 0 and engine._formed._value == 0
            assert len(engine.scheduler) == 300
        backend.gate.set()
        assert not bulk.result(60).errors and not first.result(60).errors


def test_calls_arriving_while_an_asynchronous_device_is_busy_share_one_batch(tiny_embed_model: Path) -> None:
    """Adaptive micro-batching: while a CUDA-like device is busy (one batch running, one formed
    waiting for it), single-text calls that arrive are not formed into batches of their own; when
    the device frees they leave together, each with its own answer. Eagerly formed, they would be
    four batches of one (up to four are formed ahead)."""
    engine = make_engine(tiny_embed_model, max_batch_tokens=4096,
                         wrap=lambda inner: GatedBackend(inner, asynchronous=True))
    backend: GatedBackend = engine.backend  # type: ignore[assignment]
    try:
        first = engine.submit(["the request that holds the device"], urgent=True)
        assert backend.entered.wait(30)
        second = engine.submit(["the call formed behind it"], urgent=True)
        deadline = time.monotonic() + 30
        while engine._ready.qsize() < 1 and time.monotonic() < deadline:  # forming is quick
            time.sleep(0.01)
        texts = [f"a later single-text call number {i}" for i in range(4)]
        later = []
        for text in texts:
            later.append(engine.submit([text], urgent=True))
            _wait_tokenized(engine)
        assert engine._ready.qsize() == 1 and len(engine.scheduler) == 4, "the later calls were formed eagerly"
        backend.gate.set()
        for future in (first, second, *later):
            assert not future.result(60).errors
        assert [call["n"] for call in backend.calls] == [1, 1, 4]
        singles = reference_embed(tiny_embed_model, texts, 64, "cls", True)
        assert_close_rows(np.vstack([f.result().values for f in later]), singles, "batched single calls")
    finally:
        backend.gate.set()
        engine.stop()


def _hold_tokenize_pool(engine: Engine) -> threading.Event:
    """Keep every tokenize pool thread busy until the returned event is set, so the calls
    submitted meanwhile wait together for the engine's small-call task."""
    workers = engine._tokenize_pool._max_workers
    release, started = threading.Event(), threading.Barrier(workers + 1)
    for _ in range(workers):
        engine._tokenize_pool.submit(lambda: (started.wait(30), release.wait(60)))
    started.wait(30)
    return release


def _count_tokenizer_calls(engine: Engine, fail_on: str | None = None) -> list[list[str]]:
    """The engine's tokenizer, recording the texts of each columnar call (and raising on any
    call holding ``fail_on``)."""
    calls: list[list[str]] = []
    encode = engine.tokenizer.encode_tokens

    def recorded(values):  # type: ignore[no-untyped-def]
        calls.append(list(values))
        if fail_on is not None and any(fail_on in value for value in values):
            raise RuntimeError("the tokenizer failed on this text")
        return encode(values)

    engine.tokenizer.encode_tokens = recorded  # type: ignore[method-assign]
    return calls


def test_small_calls_waiting_together_share_one_tokenizer_call_but_never_their_options(
        tiny_embed_model: Path) -> None:
    """Small calls that arrive while the tokenize threads are busy go through one tokenizer call
    (and one hand-over to the scheduler), and each still gets exactly its own options: prompt,
    truncation (a cut input fails only where truncate=false), dimensions, normalization."""
    engine = make_engine(tiny_embed_model, max_batch_tokens=4096)
    calls = _count_tokenizer_calls(engine)
    text, long_text = "plain text one", " ".join(["word"] * 200)
    asks = [([text], Options()), ([text], Options(prompt_name="query")), ([text, long_text], Options(truncate=False)),
            ([long_text], Options(truncate=True)), ([text], Options(dimensions=8)), ([text], Options(normalize=False))]
    try:
        items = engine.stats["items"]
        release = _hold_tokenize_pool(engine)
        futures = [engine.submit(inputs, options, urgent=True) for inputs, options in asks]
        release.set()
        results = [future.result(60) for future in futures]
        assert [len(call) for call in calls] == [7], "the waiting calls were not tokenized together"
        assert engine.stats["items"] - items == 6 and not engine._open
    finally:
        engine.stop()
    raw = reference_embed(tiny_embed_model, [text, "query: " + text, long_text], 64, "cls", False)
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    cut = raw[:1, :8] / np.linalg.norm(raw[:1, :8])
    assert [r.errors for r in results] == [{}, {}, {1: results[2].errors.get(1, "missing")}, {}, {}, {}]
    assert "longer than the model's maximum" in results[2].errors[1] and results[3].truncated == [True]
    for got, want, what in ((results[0].values, unit[:1], "plain"), (results[1].values, unit[1:2], "prompt"),
                            (results[2].values[:1], unit[:1], "truncate=false"), (results[3].values, unit[2:], "cut"),
                            (results[4].values, cut, "dimensions"), (results[5].values, raw[:1], "normalize=false")):
        assert_close_rows(got, want, what)
    assert not results[2].values[1].any()


def test_a_tokenizer_failure_in_a_shared_call_fails_only_its_own_call(tiny_embed_model: Path) -> None:
    """The shared call failed: each call is tokenized alone again, so only the one holding the
    text the tokenizer cannot take fails; the others are answered."""
    engine = make_engine(tiny_embed_model, max_batch_tokens=4096)
    calls = _count_tokenizer_calls(engine, fail_on="poison")
    try:
        release = _hold_tokenize_pool(engine)
        good, bad, other = (engine.submit([t], urgent=True) for t in ("fine text", "poison text", "another one"))
        release.set()
        assert not good.result(60).errors and not other.result(60).errors
        with pytest.raises(RuntimeError, match="the tokenizer failed"):
            bad.result(60)
        assert sorted(len(call) for call in calls) == [1, 1, 1, 3]
    finally:
        engine.stop()


def test_a_small_call_tokenized_here_runs_on_the_callers_thread_and_one_behind_others_waits_its_turn(
        tiny_embed_model: Path) -> None:
    """``tokenize_here``: with no small call waiting, the caller's thread tokenizes (before submit
    returns); while others wait for the pool, it joins them instead. Every call gets its own vectors."""
    engine = make_engine(tiny_embed_model, max_batch_tokens=4096)
    threads: list[str] = []
    encode = engine.tokenizer.encode_tokens

    def recorded(values):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return encode(values)

    engine.tokenizer.encode_tokens = recorded  # type: ignore[method-assign]
    texts = ["tokenized by the caller", "waits with the others", "queued first"]
    try:
        here = engine.submit([texts[0]], urgent=True, tokenize_here=True)
        assert threads == [threading.current_thread().name]  # already tokenized when submit returned
        release = _hold_tokenize_pool(engine)
        queued = engine.submit([texts[2]], urgent=True)
        behind = engine.submit([texts[1]], Options(dimensions=8), urgent=True, tokenize_here=True)
        assert len(threads) == 1  # it did not jump the waiting call: it waits for the pool with it
        release.set()
        values = [f.result(60).values for f in (here, behind, queued)]
        assert threads[1:] == [threads[1]] and threads[1].startswith("ef-tokenize")  # one pool call for both
    finally:
        engine.stop()
    raw = reference_embed(tiny_embed_model, texts, 64, "cls", False)
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    cut = raw[1:2, :8] / np.linalg.norm(raw[1:2, :8])
    for got, want, what in ((values[0], unit[:1], "here"), (values[1], cut, "behind, its own options"),
                            (values[2], unit[2:], "queued")):
        assert_close_rows(got, want, what)


def test_small_calls_beyond_one_chunk_are_tokenized_a_chunk_at_a_time(tiny_embed_model: Path) -> None:
    """Waiting small calls are taken a chunk's worth at a time (whole calls, at least one), the
    rest by the next task; every call is answered once, with its own vectors."""
    engine = make_engine(tiny_embed_model, max_batch_tokens=4096, tokenize_chunk=4)
    calls = _count_tokenizer_calls(engine)
    texts = [f"small call number {i}" for i in range(7)]
    try:
        release = _hold_tokenize_pool(engine)
        futures = [engine.submit([t], urgent=True) for t in texts[:5]] + [engine.submit(texts[5:], urgent=True)]
        release.set()
        values = np.vstack([future.result(60).values for future in futures])
        assert [len(call) for call in calls] == [4, 3]
    finally:
        engine.stop()
    assert_close_rows(values, reference_embed(tiny_embed_model, texts, 64, "cls", True), "a chunk at a time")


@contextmanager
def _device_held_with_a_backlog(model: Path, asynchronous: bool = False) -> Iterator[tuple]:
    """A gated engine whose device is held by one request while 300 short bulk texts wait,
    tokenized; yields ``(engine, backend, first, bulk)`` and stops the engine afterwards."""
    engine = make_engine(model, max_batch_tokens=64, wrap=lambda inner: GatedBackend(inner, asynchronous))
    backend: GatedBackend = engine.backend  # type: ignore[assignment]
    try:
        first = engine.submit(["the request that holds the device"])
        assert backend.entered.wait(30)
        bulk = engine.submit([f"short text {i}" for i in range(300)])
        _wait_tokenized(engine)
        yield engine, backend, first, bulk
    finally:
        backend.gate.set()
        engine.stop()


def _wait_tokenized(engine: Engine) -> None:
    """Block until every tokenization task queued so far has finished (both pool threads busy
    with a barrier task means all earlier tasks are done)."""
    workers = engine._tokenize_pool._max_workers
    barrier = threading.Barrier(workers + 1)
    for _ in range(workers):
        engine._tokenize_pool.submit(barrier.wait, 30)
    barrier.wait(30)


def test_oom_splits_in_halves_never_retries_whole(tiny_embed_model: Path) -> None:
    engine = make_engine(tiny_embed_model, max_batch_tokens=100_000, wrap=lambda b: OomBackend(b, max_items=3))
    backend: OomBackend = engine.backend  # type: ignore[assignment]
    try:
        texts = sample_texts(20, step=59)
        result = engine.run(texts, timeout=120)
        assert not result.errors
        assert_close_rows(result.values, reference_embed(tiny_embed_model, texts, 64, "cls", True), "after OOM")
        calls = backend.calls
        assert calls[0] == {**calls[0], "n": 20, "outcome": "oom"}
        assert all(c["n"] <= 3 for c in calls if c["outcome"] == "ok")
        assert engine.stats["oom_splits"] >= 1
        # Each failed batch is followed by exactly its two halves (depth first), never by itself again.
        seen_failed = set()
        for i, call in enumerate(calls):
            key = tuple(call["lengths"])
            assert key not in seen_failed, f"batch {key} was retried whole after an OOM"
            if call["outcome"] == "oom":
                seen_failed.add(key)
                half = call["n"] // 2
                assert calls[i + 1]["lengths"] == call["lengths"][:half], "the first half was not tried next"
        assert sum(c["n"] for c in calls if c["outcome"] == "ok") == 20
    finally:
        engine.stop()


def test_oom_on_a_single_item_fails_only_that_item(tiny_embed_model: Path) -> None:
    wrap = lambda b: OomBackend(b, max_items=100, max_tokens=30)  # noqa: E731
    engine = make_engine(tiny_embed_model, max_batch_tokens=100_000, wrap=wrap)
    try:
        long_text = " ".join(["memory"] * 50)
        texts = ["short one", long_text, "another short text", "x"]
        result = engine.run(texts, timeout=60)
        assert set(result.errors) == {1}
        # reasons name no position (callers add input[i] or row N)
        assert "does not fit in device memory" in result.errors[1] and not result.errors[1].startswith("input")
        assert (result.values[1] == 0).all()
        ok = [0, 2, 3]
        want = reference_embed(tiny_embed_model, [texts[i] for i in ok], 64, "cls", True)
        assert_close_rows(result.values[ok], want, "the others after a lone OOM")
    finally:
        engine.stop()


def test_nan_outputs_are_recomputed_precisely(tiny_embed_model: Path) -> None:
    holder: dict[str, NanBackend] = {}

    def wrap(inner):  # type: ignore[no-untyped-def]
        holder["b"] = NanBackend(inner, poison_ids=set())
        return holder["b"]

    engine = make_engine(tiny_embed_model, wrap=wrap)
    try:
        texts = ["zebra crossing at night", "apple pie recipe", "zebra stripes", "plain text"]
        holder["b"].poison_ids = {first_token_id(engine, "zebra")}
        result = engine.run(texts, timeout=60)
        assert not result.errors
        assert np.isfinite(result.values).all()
        assert_close_rows(result.values, reference_embed(tiny_embed_model, texts, 64, "cls", True), "after NaN")
        assert engine.stats["recomputed"] == 2
        precise_calls = [c for c in holder["b"].calls if c["precise"]]
        assert len(precise_calls) == 1 and precise_calls[0]["n"] == 2
    finally:
        engine.stop()


def test_nan_even_when_precise_fails_that_item_alone(tiny_embed_model: Path) -> None:
    holder: dict[str, NanBackend] = {}

    def wrap(inner):  # type: ignore[no-untyped-def]
        holder["b"] = NanBackend(inner, poison_ids=set())
        return holder["b"]

    engine = make_engine(tiny_embed_model, wrap=wrap)
    try:
        texts = ["apple pie recipe", "zebra crossing", "plain text", "banana bread"]
        zebra = first_token_id(engine, "zebra")
        holder["b"].poison_ids = {zebra}
        holder["b"].always = {zebra}
        result = engine.run(texts, timeout=60)
        assert set(result.errors) == {1}
        assert "non-finite" in result.errors[1]
        assert np.isfinite(result.values).all(), "a NaN left the engine"
        ok = [0, 2, 3]
        want = reference_embed(tiny_embed_model, [texts[i] for i in ok], 64, "cls", True)
        assert_close_rows(result.values[ok], want, "others after NaN")
    finally:
        engine.stop()


# ---------------------------------------------------------------------------- per-item errors
def test_truncate_false_is_a_per_item_error_naming_the_limit(tiny_embed_engine: Engine) -> None:
    texts = ["fits", " ".join(["overlong"] * 100), "also fits"]
    strict = tiny_embed_engine.run(texts, Options(truncate=False), timeout=60)
    assert set(strict.errors) == {1}
    assert "maximum of 64 tokens" in strict.errors[1] and "truncate" in strict.errors[1]
    assert (strict.values[1] == 0).all() and np.isfinite(strict.values).all()
    lenient = tiny_embed_engine.run(texts, Options(truncate=True), timeout=60)
    assert not lenient.errors and lenient.truncated == [False, True, False]
    np.testing.assert_allclose(strict.values[[0, 2]], lenient.values[[0, 2]], atol=1e-6)


def test_truncate_false_with_every_item_too_long_still_answers(tiny_embed_engine: Engine) -> None:
    result = tiny_embed_engine.run([" ".join(["overlong"] * 100)] * 2, Options(truncate=False), timeout=60)
    assert set(result.errors) == {0, 1}


def test_bad_inputs_fail_alone(tiny_embed_engine: Engine) -> None:
    inputs = ["good", "", "   ", None, 123, "x" * (MAX_INPUT_CHARS + 1), "also good", ["list"]]
    result: EngineResult = tiny_embed_engine.run(inputs, timeout=60)
    assert set(result.errors) == {1, 2, 3, 4, 5, 7}
    assert result.errors[1].startswith("text is empty")  # reasons name no position: callers add it
    assert result.errors[3].startswith("text must be a string, got NoneType")
    assert result.errors[4].startswith("text must be a string, got int")
    assert f"over the limit of {MAX_INPUT_CHARS}" in result.errors[5]
    assert result.ok == [True, False, False, False, False, False, True, False]
    good = tiny_embed_engine.run(["good", "also good"], timeout=60).values
    np.testing.assert_allclose(result.values[[0, 6]], good, atol=1e-6)
    assert (result.values[[1, 2, 3, 4, 5, 7]] == 0).all()


def test_all_text_inputs_fail_alone_with_the_per_item_reasons(tiny_embed_engine: Engine) -> None:
    """A call of plain strings only is checked column-wise (``Engine._validate_texts``); one input
    of another type sends the call through the per-item loop. Both must fail the same items with
    the same reasons and tokenize the same (prompted) texts."""
    texts = ["good", "", "   ", "\u3000\n\x1c\x85", "x" * (MAX_INPUT_CHARS + 1), "x" * MAX_INPUT_CHARS,
             " padded ", "\u3000 a", "also good"]
    options = Options(prompt="query: ")
    columnar = tiny_embed_engine.run(texts, options, timeout=60)
    per_item = tiny_embed_engine.run([*texts, None], options, timeout=60)
    assert set(columnar.errors) == {1, 2, 3, 4}
    assert columnar.errors == {i: reason for i, reason in per_item.errors.items() if i < len(texts)}
    assert columnar.n_tokens == per_item.n_tokens[:len(texts)]
    np.testing.assert_allclose(columnar.values, per_item.values[:len(texts)], atol=1e-6)
    plain = tiny_embed_engine.run(["good", "also good"], timeout=60).values
    assert not np.allclose(columnar.values[[0, 8]], plain, atol=1e-3)  # the prompt went before the texts


def test_all_inputs_bad_resolves_immediately(tiny_embed_engine: Engine) -> None:
    result = tiny_embed_engine.run(["", None], timeout=10)
    assert set(result.errors) == {0, 1} and result.values.shape == (2, 32)


# ---------------------------------------------------------------------------- stopping
@pytest.mark.parametrize("pool", ["_tokenize_pool", "_post_pool"])
def test_stop_resolves_every_pending_request(tiny_embed_model: Path, pool: str) -> None:
    """A request caught anywhere in the pipeline by stop() must end (EngineStopped or a result)."""
    engine = make_engine(tiny_embed_model)
    executor = getattr(engine, pool)
    release = threading.Event()
    for _ in range(executor._max_workers):  # occupy the pool so the request's task stays queued
        executor.submit(release.wait, 30)
    future = engine.submit(["a request caught by stop"])
    if pool == "_post_pool":
        _wait_tokenized(engine)
        while engine.stats["batches"] == 0:  # the forward ran; delivery is queued behind the blockers
            threading.Event().wait(0.01)
    engine.stop()
    release.set()
    try:
        future.result(timeout=5)  # a liveness bound, not a timing: stop() has already returned
    except Exception as exc:  # EngineStopped is the honest answer
        assert type(exc).__name__ == "EngineStopped", repr(exc)


@pytest.mark.parametrize("fixture", ["tiny_embed_model", "tiny_rerank_model"])
def test_warm_up_runs_batches_and_leaves_the_engine_serving(fixture: str, request: pytest.FixtureRequest) -> None:
    """``Engine.warm_up`` (run at start for CUDA engines, so a device's first-batch costs are not a
    job's) really runs batches, long inputs truncated, and the engine answers as before afterwards."""
    model = request.getfixturevalue(fixture)
    with make_engine(model) as engine:
        inputs = [("a query", "a document")] if engine.info.kind == JobKind.rerank else ["a text"]
        before = engine.run(inputs).values
        batches = engine.stats["batches"]
        assert engine.warm_up() > 0
        assert engine.stats["batches"] > batches
        assert engine.stats["items"] >= 4 * 65 + len(inputs)
        np.testing.assert_allclose(engine.run(inputs).values, before, rtol=1e-5, atol=1e-6)
