"""The GPU speed paths, checked where CI runs (CPU): the unpadded encoder against transformers'
padded model on tiny BERT and XLM-R, packed batches through the engine, and the engine's
out-of-memory split and non-finite recompute with injected failures. The CUDA-only kernels
(flash varlen, fused kernels) are checked by the tests at the bottom, which
run only where a GPU is present (bench/gpu.py runs them on the H100).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from worker.backends.base import Backend, Batch
from worker.backends.torch import TorchBackend
from worker.engine.pipeline import Engine
from worker.models.resolve import describe

CUDA = torch.cuda.is_available()


def _random_lengths(rng: np.random.Generator, n: int, longest: int) -> list[int]:
    lengths = [int(x) for x in rng.integers(2, longest, size=n)]
    lengths[0] = longest  # one full-length input, one single-token input
    lengths[-1] = 1
    return lengths


def _batches(rng: np.random.Generator, lengths: list[int]) -> tuple[Batch, Batch]:
    ids = [rng.integers(1000, 20000, size=n).astype(np.int32) for n in lengths]
    types = [np.zeros(n, dtype=np.int32) for n in lengths]
    packed = Batch.pack(ids, types)
    longest = max(lengths)
    padded_ids = np.zeros((len(lengths), longest), dtype=np.int32)
    mask = np.zeros_like(padded_ids)
    for row, x in enumerate(ids):
        padded_ids[row, : len(x)] = x
        mask[row, : len(x)] = 1
    padded = Batch(padded_ids, mask, np.zeros_like(padded_ids), np.array(lengths, dtype=np.int32))
    return packed, padded


@pytest.mark.parametrize("fixture", ["tiny_embed_model", "tiny_xlmr_model"])
def test_varlen_encoder_matches_transformers_per_token(fixture: str, request: pytest.FixtureRequest) -> None:
    """Every packed token's hidden state equals the padded model's at the same position."""
    from transformers import AutoModel

    from worker.backends.varlen import build_encoder

    path: Path = request.getfixturevalue(fixture)
    reference = AutoModel.from_pretrained(str(path), attn_implementation="sdpa").eval()
    encoder = build_encoder(AutoModel.from_pretrained(str(path)).eval())
    rng = np.random.default_rng(7)
    lengths = _random_lengths(rng, 9, 60)
    packed, padded = _batches(rng, lengths)
    with torch.inference_mode():
        expected = reference(input_ids=torch.from_numpy(padded.input_ids).long(),
                             attention_mask=torch.from_numpy(padded.attention_mask).long()).last_hidden_state
        cu = torch.from_numpy(packed.cu_seqlens)
        positions = torch.cat([torch.arange(n, dtype=torch.int32) for n in lengths])
        got = encoder(torch.from_numpy(packed.input_ids), torch.from_numpy(packed.token_type_ids), positions, cu,
                      max(lengths))
    assert got.shape == (sum(lengths), reference.config.hidden_size)
    for row, n in enumerate(lengths):
        start = int(packed.cu_seqlens[row])
        torch.testing.assert_close(got[start : start + n], expected[row, :n], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("fixture", ["tiny_embed_model", "tiny_xlmr_model"])
def test_varlen_backend_equals_padded_backend(fixture: str, request: pytest.FixtureRequest) -> None:
    """Pooled outputs (CLS for the BERT fixture, mean for XLM-R) agree between the two paths."""
    info = describe(str(request.getfixturevalue(fixture)))
    varlen = TorchBackend(info, "cpu", "float32", varlen=True)
    padded = TorchBackend(info, "cpu", "float32", varlen=False)
    assert varlen.unpadded and not padded.unpadded
    rng = np.random.default_rng(11)
    packed, pad = _batches(rng, _random_lengths(rng, 7, 50))
    np.testing.assert_allclose(varlen.forward(packed), padded.forward(pad), atol=3e-5, rtol=1e-4)
    # the precise (widened) recompute runs the same function
    np.testing.assert_allclose(varlen.forward(packed, precise=True), varlen.forward(packed), atol=1e-6)


def test_fused_tail_falls_back_to_the_same_function_off_gpu(tiny_xlmr_model: Path) -> None:
    """The fused layer tail (bias after the GEMM, one LayerNorm call) computes what the plain one does."""
    info = describe(str(tiny_xlmr_model))
    plain = TorchBackend(info, "cpu", "float32", varlen=True, fused=False)
    fused = TorchBackend(info, "cpu", "float32", varlen=True, fused=True)
    assert fused.fused and all(layer.fused for layer in fused.encoder.layers)  # type: ignore[union-attr]
    rng = np.random.default_rng(12)
    packed, _ = _batches(rng, _random_lengths(rng, 6, 40))
    np.testing.assert_allclose(fused.forward(packed), plain.forward(packed), atol=2e-5)


def test_equal_length_groups() -> None:
    from worker.backends.varlen import equal_length_groups

    assert equal_length_groups([3, 450, 450, 450, 451]) == [(0, 1, 3), (3, 3, 450), (1353, 1, 451)]
    assert equal_length_groups([5]) == [(0, 1, 5)]
    assert equal_length_groups(list(range(1, 20)), max_groups=8) is None  # too many runs: varlen instead


@pytest.mark.parametrize("fixture", ["tiny_embed_model", "tiny_xlmr_model"])
@pytest.mark.parametrize("lengths", [[2, 30, 30, 30, 31, 31, 5], [30, 30, 30, 30]], ids=["runs", "one-run"])
def test_dense_attention_over_equal_length_runs(fixture: str, lengths: list[int], request: pytest.FixtureRequest,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Dense attention per run of equal lengths computes what padded attention does (several runs
    go into one packed buffer; a batch of one run returns the kernel's output as it is)."""
    info = describe(str(request.getfixturevalue(fixture)))
    dense = TorchBackend(info, "cpu", "float32", varlen=True, dense_groups=True)
    padded = TorchBackend(info, "cpu", "float32", varlen=False)
    assert dense.encoder.dense_groups  # type: ignore[union-attr]
    rng = np.random.default_rng(13)
    packed, pad = _batches(rng, lengths)  # runs: 2 | 30 x3 | 31 x2 | 5, or one run of 30 x4
    from worker.backends import varlen

    calls: list[int] = []
    real = varlen._dense_groups
    monkeypatch.setattr(varlen, "_dense_groups", lambda *a: calls.append(1) or real(*a))
    expected = padded.forward(pad)
    # a run shape's first batch runs unpadded (cuDNN would build a plan for a shape that may never
    # come back); the same shapes again take the dense kernels
    np.testing.assert_allclose(dense.forward(packed), expected, atol=3e-5, rtol=1e-4)
    assert not calls
    np.testing.assert_allclose(dense.forward(packed), expected, atol=3e-5, rtol=1e-4)
    assert calls


def test_graph_layout_pads_into_short_sequences_and_empty_ones() -> None:
    from worker.backends.varlen import graph_layout, token_bucket

    rng = np.random.default_rng(21)
    for n, longest in ((1, 3), (5, 40), (300, 256), (2000, 20), (526, 256)):
        lengths = rng.integers(1, longest + 1, size=n)
        tokens, sequences, bound, cu = graph_layout(lengths)  # type: ignore[misc]
        total = int(lengths.sum())
        assert total <= tokens <= max(64, total + total // 16 + 64) and tokens == token_bucket(total)
        assert bound >= lengths.max() and sequences >= n and sequences & (sequences - 1) == 0
        sizes = np.diff(cu)
        assert cu[0] == 0 and cu[-1] == tokens and len(cu) == sequences + 1
        np.testing.assert_array_equal(sizes[:n], lengths)  # the real inputs first, as they were
        assert (sizes[n:] >= 0).all() and (sizes[n:] <= bound).all()  # padding in sequences flash takes
    assert graph_layout(np.ones(20000, dtype=np.int64)) is None  # more inputs than a graph holds


@pytest.mark.parametrize("fixture", ["tiny_embed_model", "tiny_xlmr_model"])  # CLS and mean pooling
def test_graph_bucket_layout_gives_the_unpadded_vectors(fixture: str, request: pytest.FixtureRequest) -> None:
    """What a graph computes (its bucket's padded layout, as staged) equals the unpadded forward:
    the padding tokens change no real input's vector (run eagerly here; on CUDA it is replayed)."""
    from worker.backends.varlen import GraphedEncoder, graph_layout, stage
    from worker.models.heads import pool_varlen

    info = describe(str(request.getfixturevalue(fixture)))
    backend = TorchBackend(info, "cpu", "float32", varlen=True)
    assert backend.graphs is None  # CPU: never graphed
    graphed = GraphedEncoder(backend.encoder, pool_varlen, info.pooling, "cpu")  # type: ignore[arg-type]
    rng = np.random.default_rng(22)
    for n in (1, 7, 40):
        packed, _ = _batches(rng, _random_lengths(rng, n, 50) if n > 1 else [9])
        layout = graph_layout(packed.lengths)
        assert layout is not None and layout[0] > packed.n_real_tokens or n == 1
        staged = np.full(3 * layout[0] + layout[1] + 1, -1, dtype=np.int32)  # poisoned: all must be written
        stage(backend._packed_host(packed).numpy(), n, layout, staged)
        assert (staged >= 0).all()
        with torch.inference_mode():
            got = graphed._body(torch.from_numpy(staged), layout[0], layout[2])[:n].numpy()
        np.testing.assert_allclose(got, backend.forward(packed), atol=2e-5, rtol=1e-4)


def test_streams_need_the_unpadded_encoder_on_cuda(tiny_embed_model: Path) -> None:
    from producer.errors import BadInput

    info = describe(str(tiny_embed_model))
    with pytest.raises(BadInput, match="needs the unpadded encoder on CUDA"):
        TorchBackend(info, "cpu", "float32", varlen=True, streams=2)
    with pytest.raises(BadInput, match="at least 1"):
        TorchBackend(info, "cpu", "float32", varlen=True, streams=0)
    assert "streams" not in TorchBackend(info, "cpu", "float32", varlen=True, streams=1).mode


def test_varlen_refuses_what_it_cannot_run(tiny_classify_model: Path) -> None:
    info = describe(str(tiny_classify_model))
    backend = TorchBackend(info, "cpu", "float32", varlen=True)  # classifiers keep the padded path
    assert not backend.unpadded
    from transformers import GPT2Config, GPT2Model

    from worker.backends.varlen import VarlenEncoder

    with pytest.raises(ValueError, match="model type 'gpt2'"):
        VarlenEncoder(GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2)))


def test_engine_packed_results_match_padded_engine(tiny_embed_model: Path) -> None:
    """Through the whole engine (scheduler, pack, deliver), order restored, same vectors."""
    info = describe(str(tiny_embed_model))
    texts = [("word " * int(n)).strip() for n in np.random.default_rng(3).integers(1, 40, size=40)]
    with Engine(info, TorchBackend(info, "cpu", "float32", varlen=True), max_batch_tokens=200) as engine:
        packed = engine.run(texts, timeout=60)
        stats = dict(engine.stats)
    with Engine(info, TorchBackend(info, "cpu", "float32", varlen=False), max_batch_tokens=200) as engine:
        padded = engine.run(texts, timeout=60)
    assert not packed.errors and packed.n_tokens == padded.n_tokens
    np.testing.assert_allclose(packed.values, padded.values, atol=3e-5)
    assert stats["padded_tokens"] == stats["tokens"] == sum(packed.n_tokens)  # packed: no padding at all
    assert stats["batches"] > 1


class _Faulty(Backend):
    """Wraps a real backend and injects failures: OOM over a size, NaN rows until widened."""

    def __init__(self, inner: TorchBackend, oom_over_items: int = 10**9, nan_rows: int = 0) -> None:
        self.inner = inner
        self.name, self.device, self.dtype = inner.name, inner.device, inner.dtype
        self.unpadded = inner.unpadded
        self.preferred_batch_tokens = inner.preferred_batch_tokens
        self.oom_over_items = oom_over_items
        self.nan_rows = nan_rows
        self.calls: list[tuple[int, bool]] = []

    def forward(self, batch: Batch, precise: bool = False) -> np.ndarray:
        self.calls.append((len(batch.lengths), precise))
        if len(batch.lengths) > self.oom_over_items or batch.n_real_tokens > 10_000:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        out = self.inner.forward(batch, precise)
        if not precise and self.nan_rows:
            out = out.copy()
            out[: self.nan_rows] = np.nan
        return out

    def is_out_of_memory(self, error: BaseException) -> bool:
        return self.inner.is_out_of_memory(error)

    def close(self) -> None:
        self.inner.close()


def test_out_of_memory_splits_packed_batches(tiny_embed_model: Path) -> None:
    info = describe(str(tiny_embed_model))
    texts = [f"text number {i} " + "word " * (i % 13) for i in range(24)]
    with Engine(info, TorchBackend(info, "cpu", "float32", varlen=True), max_batch_tokens=10_000) as engine:
        expected = engine.run(texts, timeout=60)
    faulty = _Faulty(TorchBackend(info, "cpu", "float32", varlen=True), oom_over_items=5)
    with Engine(info, faulty, max_batch_tokens=10_000) as engine:  # type: ignore[arg-type]
        got = engine.run(texts, timeout=60)
        splits = engine.stats["oom_splits"]
    assert not got.errors
    np.testing.assert_allclose(got.values, expected.values, atol=1e-5)
    assert splits >= 3  # 24 -> 12 -> 6 -> 3 items
    assert max(n for n, _ in faulty.calls[1:]) <= 12


def test_single_input_that_never_fits_fails_alone(tiny_embed_model: Path) -> None:
    info = describe(str(tiny_embed_model))
    faulty = _Faulty(TorchBackend(info, "cpu", "float32", varlen=True), oom_over_items=0)
    with Engine(info, faulty, max_batch_tokens=10_000) as engine:  # type: ignore[arg-type]
        result = engine.run(["one", "two words"], timeout=60)
    assert set(result.errors) == {0, 1}
    assert "does not fit in device memory on its own" in result.errors[0]
    assert not result.values.any()


def test_non_finite_rows_are_recomputed_wider(tiny_embed_model: Path) -> None:
    info = describe(str(tiny_embed_model))
    texts = ["alpha beta", "gamma", "delta epsilon zeta", "eta"]
    with Engine(info, TorchBackend(info, "cpu", "float32", varlen=True)) as engine:
        expected = engine.run(texts, timeout=60)
    faulty = _Faulty(TorchBackend(info, "cpu", "float32", varlen=True), nan_rows=2)
    with Engine(info, faulty) as engine:  # type: ignore[arg-type]
        got = engine.run(texts, timeout=60)
        recomputed = engine.stats["recomputed"]
    assert not got.errors and np.isfinite(got.values).all()
    np.testing.assert_allclose(got.values, expected.values, atol=1e-5)
    assert recomputed == 2
    assert (2, True) in faulty.calls  # only the two bad rows went round again, widened


# ---------------------------------------------------------------------------- CUDA only
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the H100 by bench/gpu.py)")


@gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_flash_varlen_matches_padded_sdpa_on_gpu(tiny_xlmr_model: Path, dtype: str) -> None:
    info = describe(str(tiny_xlmr_model))
    flash = TorchBackend(info, "cuda", dtype, varlen=True)
    padded = TorchBackend(info, "cuda", "float32", varlen=False)
    assert flash.encoder is not None and str(next(flash.encoder.parameters()).dtype) == f"torch.{dtype}"
    rng = np.random.default_rng(5)
    packed, pad = _batches(rng, _random_lengths(rng, 16, 120))
    a, b = flash.forward(packed), padded.forward(pad)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.999


@gpu
@pytest.mark.parametrize("graphs", [True, False])
@pytest.mark.parametrize("fixture", ["tiny_embed_model", "tiny_xlmr_model"])  # CLS and mean pooling
def test_launch_queues_a_batch_without_waiting_for_the_device(fixture: str, graphs: bool,
                                                              request: pytest.FixtureRequest) -> None:
    """A launch only queues work. One synchronizing call in it (mean pooling's repeat_interleave
    without output_size was one) makes the device thread wait for every batch to finish, so none
    is queued ahead and each host delay idles the GPU (issue 13's bulk gap). A graph replay too."""
    info = describe(str(request.getfixturevalue(fixture)))
    backend = TorchBackend(info, "cuda", "bfloat16", varlen=True, graphs=graphs)
    assert (backend.graphs is not None) == graphs
    rng = np.random.default_rng(8)
    packed, _ = _batches(rng, _random_lengths(rng, 12, 100))
    backend.forward(packed)  # the first use loads and compiles, which may synchronize
    backend.forward(packed)  # graphs: a bucket is captured at its second batch
    torch.cuda.set_sync_debug_mode("error")
    try:
        wait = backend.launch(packed)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert wait().shape == (12, info.dims)
    assert not graphs or (backend.graphs is not None and len(backend.graphs.graphs) == 1)  # captured once


@gpu
@pytest.mark.parametrize("graphs", [True, False])
def test_blocking_wait_gives_the_spinning_waits_vectors(tiny_embed_model: Path, graphs: bool,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``EMBEDFLEET_CUDA_WAIT=block``: the post thread's wait sleeps on a blocking-sync event instead
    of spinning; the launch still only queues work, and the vectors are the spinning wait's."""
    info = describe(str(tiny_embed_model))
    rng = np.random.default_rng(10)
    packed, _ = _batches(rng, _random_lengths(rng, 12, 100))
    vectors = {}
    for mode in ("spin", "block"):
        monkeypatch.setenv("EMBEDFLEET_CUDA_WAIT", mode)
        backend = TorchBackend(info, "cuda", "bfloat16", varlen=True, graphs=graphs)
        assert backend.blocking_wait == (mode == "block")
        backend.forward(packed)
        backend.forward(packed)  # graphs: captured at the second batch
        torch.cuda.set_sync_debug_mode("error")
        try:
            wait = backend.launch(packed)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        vectors[mode] = wait()
    np.testing.assert_array_equal(vectors["block"], vectors["spin"])


@gpu
@pytest.mark.parametrize("fixture", ["tiny_embed_model", "tiny_xlmr_model"])  # CLS and mean pooling
def test_graph_replays_equal_eager_launches_on_gpu(fixture: str, request: pytest.FixtureRequest) -> None:
    """Replays give the eager path's vectors: several buckets replayed in turn, several batches queued
    at once, a bucket replayed with other inputs; a bucket's first batch runs eagerly."""
    from worker.backends.varlen import graph_layout

    info = describe(str(request.getfixturevalue(fixture)))
    graphed = TorchBackend(info, "cuda", "bfloat16", varlen=True, graphs=True)
    eager = TorchBackend(info, "cuda", "bfloat16", varlen=True, graphs=False, dense_groups=False)
    assert graphed.graphs is not None
    rng = np.random.default_rng(9)
    batches = [_batches(rng, _random_lengths(rng, n, 100))[0] for n in (5, 17, 64, 300)]
    same_bucket = Batch.pack([rng.integers(1000, 20000, size=int(n)).astype(np.int32) for n in batches[2].lengths],
                             [np.zeros(int(n), dtype=np.int32) for n in batches[2].lengths])  # other ids
    keys = {graph_layout(b.lengths)[:3] for b in batches}  # type: ignore[index]
    assert len(keys) == len(batches)
    expected = [eager.forward(b) for b in batches + [same_bucket]]
    waits = []
    for round_ in range(3):  # 1: eager (first batch of each bucket), 2: captures, 3: replays
        waits += [(graphed.launch(b), i) for i, b in enumerate(batches)]  # queued at once, read after
        if round_ == 2:
            waits.append((graphed.launch(same_bucket), len(batches)))
        assert len(graphed.graphs.graphs) == (0 if round_ == 0 else len(keys))
    for wait, i in waits:
        got = wait()
        cosine = (got * expected[i]).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected[i], axis=1)
        assert got.shape == expected[i].shape and cosine.min() > 0.999, (i, cosine.min())
    assert graphed.graphs.failed is None


@gpu
@pytest.mark.parametrize("variant", ["plain", "fused", "fused-tanh", "dense", "graphs", "streams"])
def test_kernel_variants_on_gpu(tiny_embed_model: Path, variant: str) -> None:
    """Each GPU variant (Triton LayerNorm, GELU epilogue, dense groups, graphs, launches taking turns
    on two streams) against fp32 padded."""
    info = describe(str(tiny_embed_model))
    reference = TorchBackend(info, "cuda", "float32", varlen=False)
    fast = TorchBackend(info, "cuda", "bfloat16", varlen=True, fused=variant.startswith("fused"),
                        approximate_gelu=variant == "fused-tanh", dense_groups=variant == "dense",
                        graphs=variant == "graphs", streams=2 if variant == "streams" else None)
    assert fast.fused == variant.startswith("fused")
    rng = np.random.default_rng(6)
    for n in (5, 17, 64):  # several sizes: kernels are shape-dynamic
        lengths = _random_lengths(rng, n, 100)
        if variant == "dense":
            lengths = sorted([100] * n + lengths[:3])  # a few runs of equal lengths
        packed, padded = _batches(rng, lengths)
        a, b = fast.forward(packed), reference.forward(padded)
        if variant in ("dense", "graphs"):  # the second batch of a run shape / bucket takes that path
            a = fast.forward(packed)
        if variant == "streams":  # two launches in flight, one on each stream, then both waited for
            waits = [fast.launch(packed), fast.launch(packed)]
            a, again = waits[0](), waits[1]()
            twice = (again * b).sum(1) / np.linalg.norm(again, axis=1) / np.linalg.norm(b, axis=1)
            assert twice.min() > 0.999, (variant, n, twice.min())
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cosine.min() > 0.999, (variant, n, cosine.min())
    assert variant != "graphs" or (fast.graphs is not None and len(fast.graphs.graphs) == 3)


@gpu
def test_profiled_budget_is_cached_and_sane(tiny_embed_model: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.backends.base import Recipe
    from worker.backends.select import build
    from worker.engine import memory

    monkeypatch.setenv("EMBEDFLEET_CACHE", str(tmp_path))
    info = describe(str(tiny_embed_model))
    backend = build(Recipe("torch", info, "cuda", "bfloat16", (("varlen", True),)))
    first = memory.batch_budget(backend, info.revision, info.max_length, 0.5)  # profiled in a child process
    assert 512 <= first.tokens <= 65536 and "budget" in first.report and "cached" not in first.report
    second = memory.batch_budget(backend, info.revision, info.max_length, 0.5)
    assert "(cached profile)" in second.report and second.tokens == first.tokens
    assert (tmp_path / "memory-profiles.json").is_file()
    capped = memory.batch_budget(backend, info.revision, info.max_length, 0.5, cap=2048)
    assert capped.tokens == 2048 and "no profile" in capped.report
    weights = list(backend.encoder.parameters())  # type: ignore[union-attr]
    assert len({p.untyped_storage().data_ptr() for p in weights}) == 1  # one arena for all weights
