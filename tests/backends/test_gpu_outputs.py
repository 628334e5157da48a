"""bge-m3's three outputs, SPLADE and CLIP/SigLIP on a GPU (skipped without CUDA), against the CPU in fp32.

bge-m3 runs on CUDA's unpadded encoder (the default there) and on the padded path; SPLADE (its
masked-LM head is not in the unpadded encoder) and CLIP/SigLIP on the padded path. Bars: dense
and ColBERT vectors cosine >= 0.999 per vector to fp32 in bf16/fp16; sparse vectors (as
vocabulary-sized vectors) cosine >= 0.999, and the token ids of fp32's largest weights kept;
CLIP/SigLIP texts and images in bf16 cosine >= 0.99 (tiny random towers, bf16 rounding).

On the H200: ``python -m pytest -q tests/backends/test_gpu_outputs.py`` (well under a minute).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from producer.jobs import Options
from worker.backends.torch import TorchBackend
from worker.engine.pipeline import Engine
from worker.models.resolve import describe

from tests.families import save_bge_m3, save_splade
from tests.fixtures_extra import EDGE_TEXTS, cosine_rows, sample_texts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

COS_MIN = 0.999
ALL = ["dense", "sparse", "multivector"]
TEXTS = sample_texts(40, step=11) + EDGE_TEXTS


def _run(path: Path, device: str, dtype: str, options: Options, **switches: object):  # type: ignore[no-untyped-def]
    info = describe(str(path))
    engine = Engine(info, TorchBackend(info, device, dtype, **switches), max_batch_tokens=8192).start()
    try:
        result = engine.run(TEXTS, options, timeout=600)
    finally:
        engine.stop()
    assert not result.errors, result.errors
    return result


def _dense_sparse(rows, vocab: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    out = np.zeros((len(rows), vocab), dtype=np.float32)
    for i, (indices, values) in enumerate(rows):
        out[i, indices] = values
    return out


def _check_sparse(got, want, vocab: int) -> None:  # type: ignore[no-untyped-def]
    # An input whose every token is special (or pruned) has no weights in either: equal, but its
    # cosine is 0/0, so it is compared by emptiness and left out of the cosine.
    empty = [len(g_idx) == 0 for g_idx, _ in got]
    assert empty == [len(w_idx) == 0 for w_idx, _ in want]
    keep = [i for i, e in enumerate(empty) if not e]
    cos = cosine_rows(_dense_sparse([got[i] for i in keep], vocab), _dense_sparse([want[i] for i in keep], vocab))
    assert keep and cos.min() >= COS_MIN, np.round(cos, 5)
    for (g_idx, _), (w_idx, w_val) in zip(got, want):
        top = set(w_idx[np.argsort(-w_val)[:5]].tolist())
        assert top <= set(g_idx.tolist())


@pytest.fixture(scope="module")
def m3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_bge_m3(tmp_path_factory.mktemp("gpu") / "bge-m3", hidden=128, colbert_dim=128, max_length=512)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("varlen", [True, False])
def test_bge_m3_three_outputs_on_cuda(m3: Path, dtype: str, varlen: bool) -> None:
    reference = _run(m3, "cpu", "float32", Options(outputs=ALL))
    got = _run(m3, "cuda", dtype, Options(outputs=ALL), varlen=varlen)
    assert cosine_rows(got.values, reference.values).min() >= COS_MIN
    assert got.multivector.counts == reference.multivector.counts
    assert cosine_rows(got.multivector.vectors, reference.multivector.vectors).min() >= COS_MIN
    _check_sparse(got.sparse, reference.sparse, 30522)
    dense_only = _run(m3, "cuda", dtype, Options(), varlen=varlen)  # the unchanged dense path
    np.testing.assert_allclose(dense_only.values, got.values, atol=2e-2)


def test_bge_m3_on_cuda_holds_its_weights_only_after_load(m3: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Loaded as a worker loads it (a recipe), the batch budget is profiled in a throwaway process,
    so the serving process runs no forward before its first request (its peak allocation since load
    is what load left), and the heads lie in the encoder's one weight allocation (on their own, the
    allocator would give ColBERT's weight a segment of its own with slack)."""
    from worker.backends.select import load_backend

    monkeypatch.setenv("EMBEDFLEET_CACHE", str(tmp_path))  # no cached profile: one is measured now
    info = describe(str(m3))
    backend = load_backend("torch", info, "cuda", "float16").backend
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    loaded = torch.cuda.memory_allocated()
    engine = Engine(info, backend)
    try:
        assert "cached profile" not in engine.budget_report, engine.budget_report
        assert torch.cuda.max_memory_allocated() == loaded
        arena = backend.encoder.layers[0].qkv.weight.untyped_storage().data_ptr()
        assert backend.heads.colbert.weight.untyped_storage().data_ptr() == arena
        assert backend.heads.sparse.bias.untyped_storage().data_ptr() == arena
    finally:
        engine.stop()


LOAD_PROBE = """
import json, sys, torch
from worker.backends.select import load_backend
from worker.models.resolve import describe

def outside_allocator():
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()

torch.zeros(1, device="cuda")
info = describe(sys.argv[1])
before = outside_allocator()
backend = load_backend("torch", info, "cuda", "float16").backend
print(json.dumps({"grown": outside_allocator() - before, "heads": backend.heads is not None}))
"""


def test_loading_bge_m3_on_cuda_holds_nothing_outside_the_allocator(m3: Path) -> None:
    """In a fresh process (torch's stream pool, library handles and kernel modules are per
    process), building the backend adds device memory only through the caching allocator, as
    transformers' load does (bench/outputs.py measured 0 there on the H200, and 69 MiB for our
    load while it created a side copy stream: torch's pool of streams). A failure names what grew."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(m3)], capture_output=True, text=True,
                          timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["heads"]
    assert result["grown"] < 16 * 2 ** 20, f"{result['grown'] / 2 ** 20:.1f} MiB outside the allocator after load"


def test_splade_on_cuda(tmp_path: Path) -> None:
    folder = save_splade(tmp_path / "splade")
    reference = _run(folder, "cpu", "float32", Options())
    got = _run(folder, "cuda", "bfloat16", Options())
    _check_sparse(got.sparse, reference.sparse, 30522)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_image_text_on_cuda(tmp_path: Path, family: str) -> None:
    import base64

    from tests.families import image_bytes, save_image_text

    folder = save_image_text(tmp_path / family, family, image_size=64)
    images = [{"image": "data:image/png;base64," + base64.b64encode(image_bytes(70 + i, 50, "PNG", i)).decode()}
              for i in range(20)]
    inputs = [*TEXTS[:20], *images]
    info = describe(str(folder))
    results = []
    for device, dtype in (("cpu", "float32"), ("cuda", "bfloat16")):
        engine = Engine(info, TorchBackend(info, device, dtype), max_batch_tokens=8192).start()
        try:
            results.append(engine.run(inputs, timeout=600))
        finally:
            engine.stop()
    assert not results[1].errors
    assert cosine_rows(results[1].values, results[0].values).min() >= 0.99


def test_bge_m3_launch_queues_its_outputs_without_a_device_sync(m3: Path) -> None:
    """All three heads' launch only queues work (the ColBERT rows are taken by an index made on the
    host, not a boolean mask the device must count): the device thread can run ahead (issue 13)."""
    from worker.backends.base import Batch

    info = describe(str(m3))
    backend = TorchBackend(info, "cuda", "bfloat16", varlen=True)
    rng = np.random.default_rng(9)
    lengths = [int(n) for n in rng.integers(3, 60, size=10)]
    batch = Batch.pack([rng.integers(5, 1000, size=n).astype(np.int32) for n in lengths],
                       [np.zeros(n, dtype=np.int32) for n in lengths])
    backend.launch_outputs(batch, tuple(ALL))()  # the first use loads and compiles, which may synchronize
    torch.cuda.set_sync_debug_mode("error")
    try:
        wait = backend.launch_outputs(batch, tuple(ALL))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    out = wait()
    assert out.dense.shape[0] == 10 and [len(v) for v in out.multivector] == [n - 1 for n in lengths]
