"""The neuron backend without Inferentia hardware: buckets, padding, cache keys, cores, cache storage.

The compile/run step is the only part that needs the Neuron SDK. Here a CPU stand-in plays the
device: it "compiles" by recording the bucket, and runs the plain transformers model while
asserting that every call has exactly the compiled static shape, which is what a Neuron graph
enforces. Its outputs must equal the torch backend's on the same batches.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from producer.jobs import JobKind
from worker.backends.base import BackendUnavailable
from worker.backends.select import load_backend
from worker.backends.base import Batch
from worker.backends.neuron import NeuronBackend, core_env, worker_cores
from worker.backends.neuron_buckets import Bucket, BucketGrid, pad_to_bucket
from worker.backends.neuron_cache import COMPLETE, ArtifactCache, cache_key
from worker.models.resolve import describe


@pytest.fixture(autouse=True)
def neuron_env() -> Iterator[None]:
    """The backend sets the runtime's core variables in this process; put them back after."""
    names = ("NEURON_RT_VISIBLE_CORES", "NEURON_RT_NUM_CORES")
    saved = {name: os.environ.pop(name, None) for name in names}
    yield
    for name, value in saved.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value


def make_batch(lengths: list[int], width: int | None = None, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    width = width or max(lengths)
    ids = np.zeros((len(lengths), width), dtype=np.int32)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(1000, 2000, n)
        ids[row, 0], ids[row, n - 1] = 101, 102
        mask[row, :n] = 1
    return Batch(ids, mask, np.zeros_like(ids), np.array(lengths, dtype=np.int32))


# ---------------------------------------------------------------------------- buckets
def test_bucket_choice_is_the_smallest_that_holds_the_batch() -> None:
    grid = BucketGrid((1, 4, 8, 16), (64, 128, 256))
    assert grid.choose(1, 10) == Bucket(1, 64)
    assert grid.choose(3, 64) == Bucket(4, 64)
    assert grid.choose(4, 65) == Bucket(4, 128)
    assert grid.choose(9, 256) == Bucket(16, 256)
    assert grid.choose(40, 5) == Bucket(16, 64)  # too many rows: the largest batch; plan() splits


def test_too_long_input_names_the_limit() -> None:
    with pytest.raises(ValueError, match="largest compiled sequence bucket \\(256\\).*EMBEDFLEET_NEURON_SEQ_LENS"):
        BucketGrid((1,), (64, 256)).choose(1, 257)


def test_plan_splits_large_batches_and_picks_a_bucket_per_chunk() -> None:
    grid = BucketGrid((1, 4, 8), (32, 64))
    lengths = np.array([10] * 8 + [40] * 8 + [5] * 3)
    plan = grid.plan(lengths)
    assert [(r.start, r.stop) for r, _ in plan] == [(0, 8), (8, 16), (16, 19)]
    assert [b for _, b in plan] == [Bucket(8, 32), Bucket(8, 64), Bucket(4, 32)]


def test_grid_reaches_the_model_maximum_and_reads_the_environment() -> None:
    assert BucketGrid.for_model(256).seq_lens == (64, 128, 256)
    assert BucketGrid.for_model(200).seq_lens == (64, 128, 200)
    env = {"EMBEDFLEET_NEURON_BATCH_SIZES": "8, 1", "EMBEDFLEET_NEURON_SEQ_LENS": "128,32"}
    grid = BucketGrid.from_env(512, env)
    assert grid.batch_sizes == (1, 8) and grid.seq_lens == (32, 128, 512)
    with pytest.raises(ValueError, match="EMBEDFLEET_NEURON_BATCH_SIZES='8,x'"):
        BucketGrid.from_env(512, {"EMBEDFLEET_NEURON_BATCH_SIZES": "8,x"})
    with pytest.raises(ValueError, match="positive"):
        BucketGrid((0, 2), (64,))


# ---------------------------------------------------------------------------- padding
def test_padding_fills_the_bucket_exactly() -> None:
    batch = make_batch([5, 3, 7])
    inputs = pad_to_bucket(batch, slice(0, 3), Bucket(4, 16), pad_id=0)
    for value in inputs.values():
        assert value.shape == (4, 16) and value.dtype == np.int64
    np.testing.assert_array_equal(inputs["input_ids"][:3, :7], batch.input_ids)
    np.testing.assert_array_equal(inputs["attention_mask"][:3, :7], batch.attention_mask)
    assert inputs["attention_mask"][:3, 7:].sum() == 0
    assert inputs["attention_mask"][:3].sum() == 15  # only real tokens attend
    assert inputs["attention_mask"][3].tolist() == [1] + [0] * 15  # filler row: one token, dropped later


def test_padding_a_slice_and_refusing_what_does_not_fit() -> None:
    batch = make_batch([4, 4, 9, 2])
    inputs = pad_to_bucket(batch, slice(1, 3), Bucket(2, 16), pad_id=7)
    np.testing.assert_array_equal(inputs["input_ids"][:, :9], batch.input_ids[1:3])
    assert (inputs["input_ids"][:, 9:] == 7).all()
    with pytest.raises(ValueError, match="does not fit"):
        pad_to_bucket(batch, slice(0, 4), Bucket(2, 16))
    with pytest.raises(ValueError, match="does not fit"):
        pad_to_bucket(batch, slice(1, 3), Bucket(2, 8))
    # A chunk needs only its own longest row, not the whole batch's.
    short = pad_to_bucket(batch, slice(0, 2), Bucket(2, 4))
    np.testing.assert_array_equal(short["input_ids"], batch.input_ids[0:2, :4])


# ---------------------------------------------------------------------------- cache keys
def test_cache_keys_change_with_everything_that_changes_the_graph(tiny_embed_model: Path) -> None:
    info = describe(str(tiny_embed_model))
    versions = {"neuronx-cc": "2.15", "optimum-neuron": "0.0.28"}
    key = cache_key(info, Bucket(4, 64), "bfloat16", versions)
    assert key == cache_key(info, Bucket(4, 64), "bfloat16", dict(reversed(versions.items())))
    assert key.startswith("tiny-bert-feature-extraction-b4-s64-bfloat16-")
    assert all(c.isalnum() or c in "-_." for c in key)
    others = {
        cache_key(info, Bucket(8, 64), "bfloat16", versions),
        cache_key(info, Bucket(4, 128), "bfloat16", versions),
        cache_key(info, Bucket(4, 64), "float32", versions),
        cache_key(info, Bucket(4, 64), "bfloat16", {**versions, "neuronx-cc": "2.16"}),
        cache_key(info.__class__(**{**info.__dict__, "revision": "other"}), Bucket(4, 64), "bfloat16", versions),
        cache_key(info.__class__(**{**info.__dict__, "kind": JobKind.classify}), Bucket(4, 64), "bfloat16", versions),
    }
    assert key not in others and len(others) == 6


# ---------------------------------------------------------------------------- cores
def test_one_worker_per_neuroncore() -> None:
    assert core_env("neuron:3", {}) == {"NEURON_RT_VISIBLE_CORES": "3"}
    assert core_env("neuron:2-3", {}) == {"NEURON_RT_VISIBLE_CORES": "2-3"}
    assert core_env("neuron", {}) == {"NEURON_RT_NUM_CORES": "1"}  # one free core, not all of them
    assert core_env("auto", {"NEURON_RT_VISIBLE_CORES": "5"}) == {}  # the launcher already chose
    with pytest.raises(ValueError, match="conflicts with NEURON_RT_VISIBLE_CORES=1"):
        core_env("neuron:2", {"NEURON_RT_VISIBLE_CORES": "1"})
    with pytest.raises(ValueError, match="number or a range"):
        core_env("neuron:x", {})
    with pytest.raises(ValueError, match="not one the neuron backend runs on"):
        core_env("cuda", {})
    assert worker_cores(2) == ["0", "1"]
    assert worker_cores(24, 2)[:2] == ["0-1", "2-3"] and len(worker_cores(24, 2)) == 12
    with pytest.raises(ValueError, match="do not split"):
        worker_cores(6, 4)


# ---------------------------------------------------------------------------- no SDK
def test_without_the_sdk_the_error_says_what_to_install(tiny_embed_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    try:
        import optimum.neuron  # noqa: F401
        pytest.skip("optimum-neuron is installed here")
    except ImportError:
        pass
    monkeypatch.delenv("NEURON_RT_NUM_CORES", raising=False)
    with pytest.raises(BackendUnavailable, match="pip install 'embedfleet\\[neuron\\]'"):
        load_backend("neuron", describe(str(tiny_embed_model)), "neuron", "auto")
    import os

    assert "NEURON_RT_NUM_CORES" not in os.environ  # nothing changed when the backend is unavailable


# ---------------------------------------------------------------------------- the backend on a stand-in device
class CpuStandIn:
    """Plays neuronx-cc + the runtime: one 'graph' per bucket folder, static shapes enforced."""

    def __init__(self) -> None:
        self.compiles: list[Bucket] = []
        self.calls: list[tuple[int, int]] = []

    def versions(self) -> dict[str, str]:
        return {"stand-in": "1"}

    def compile(self, info, bucket: Bucket, dtype: str, dest: Path) -> None:  # type: ignore[no-untyped-def]
        self.compiles.append(bucket)
        (dest / "graph.json").write_text(json.dumps({"batch": bucket.batch, "seq": bucket.seq, "dtype": dtype}))
        (dest / "weights").mkdir()
        (dest / "weights" / "note.txt").write_text("nested files travel too")

    def load(self, info, path: Path):  # type: ignore[no-untyped-def]
        import torch
        from transformers import AutoModel

        shape = json.loads((path / "graph.json").read_text())
        model = AutoModel.from_pretrained(str(info.path)).eval()

        def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
            for value in inputs.values():
                assert value.shape == (shape["batch"], shape["seq"]), "a Neuron graph only takes its own shape"
            self.calls.append((shape["batch"], shape["seq"]))
            with torch.inference_mode():
                tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
                return model(**tensors).last_hidden_state.float().numpy()

        return run


def test_backend_matches_torch_and_compiles_each_bucket_once(tiny_embed_model: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.backends.torch import TorchBackend

    monkeypatch.delenv("NEURON_RT_NUM_CORES", raising=False)
    monkeypatch.delenv("NEURON_RT_VISIBLE_CORES", raising=False)
    info = describe(str(tiny_embed_model))
    device = CpuStandIn()
    grid = BucketGrid((1, 4), (16, 64))
    backend = NeuronBackend(info, device="neuron:1", dtype="float32", compiler=device, grid=grid,
                            cache_root=str(tmp_path / "cache"))
    assert backend.device == "neuron (1)"
    import os

    assert os.environ["NEURON_RT_VISIBLE_CORES"] == "1"
    reference = TorchBackend(info, device="cpu", dtype="float32")
    batch = make_batch([12, 3, 40, 7, 9, 2])  # 6 rows: a 4-row chunk (seq 64) and a 2-row one (seq 16)
    got = backend.forward(batch)
    np.testing.assert_allclose(got, reference.forward(batch), rtol=1e-4, atol=1e-5)
    assert device.calls == [(4, 64), (4, 16)]
    small = make_batch([5])
    np.testing.assert_allclose(backend.forward(small), reference.forward(small), rtol=1e-4, atol=1e-5)
    assert sorted(device.compiles) == [Bucket(1, 16), Bucket(4, 16), Bucket(4, 64)]
    backend.forward(batch)
    assert len(device.compiles) == 3  # loaded graphs are reused

    # A second worker on the same cache folder loads, it does not compile.
    second = CpuStandIn()
    again = NeuronBackend(info, device="neuron:1", dtype="float32", compiler=second, grid=grid,
                          cache_root=str(tmp_path / "cache"))
    np.testing.assert_allclose(again.forward(batch), got, rtol=1e-5, atol=1e-6)
    assert second.compiles == []
    assert (tmp_path / "cache" / backend.key(Bucket(4, 64)) / COMPLETE).is_file()


def test_engine_runs_on_the_neuron_backend(tiny_embed_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.engine.pipeline import Engine

    monkeypatch.delenv("NEURON_RT_NUM_CORES", raising=False)
    info = describe(str(tiny_embed_model))
    backend = NeuronBackend(info, device="neuron", dtype="float32", compiler=CpuStandIn(),
                            grid=BucketGrid((2, 8), (32, 64)), cache_root=str(tmp_path / "cache"))
    texts = [f"text number {i} " + "word " * (i % 9) for i in range(21)]
    with Engine(info, backend) as engine:
        neuron = engine.run(texts)
    from worker.backends.torch import TorchBackend

    with Engine(info, TorchBackend(info, device="cpu", dtype="float32")) as engine:
        torch_result = engine.run(texts)
    assert neuron.errors == {}
    np.testing.assert_allclose(neuron.values, torch_result.values, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- shared cache on S3
def test_compiled_graphs_are_shared_through_s3(s3_server, tiny_embed_model: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    s3_server.client().create_bucket(Bucket="neuron-cache")
    monkeypatch.setenv("EMBEDFLEET_CACHE", str(tmp_path / "first"))
    info = describe(str(tiny_embed_model))
    grid = BucketGrid((4,), (64,))
    first = CpuStandIn()
    backend = NeuronBackend(info, device="neuron:0", dtype="bfloat16", compiler=first, grid=grid,
                            cache_root="s3://neuron-cache/graphs")
    monkeypatch.delenv("NEURON_RT_VISIBLE_CORES", raising=False)
    batch = make_batch([9, 4])
    expected = backend.forward(batch)
    key = backend.key(Bucket(4, 64))
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket="neuron-cache")["Contents"]}
    assert keys == {f"graphs/{key}/graph.json", f"graphs/{key}/weights/note.txt", f"graphs/{key}/{COMPLETE}"}

    # Another machine (empty local disk) fetches the graph instead of compiling it.
    monkeypatch.setenv("EMBEDFLEET_CACHE", str(tmp_path / "second"))
    second = CpuStandIn()
    other = NeuronBackend(info, device="neuron:0", dtype="bfloat16", compiler=second, grid=grid,
                          cache_root="s3://neuron-cache/graphs")
    np.testing.assert_allclose(other.forward(batch), expected, rtol=1e-5, atol=1e-6)
    assert second.compiles == [] and first.compiles == [Bucket(4, 64)]
    assert (tmp_path / "second" / "neuron-from-s3" / key / "weights" / "note.txt").is_file()


def test_an_upload_cut_short_is_not_a_cache_hit(s3_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client = s3_server.client()
    client.create_bucket(Bucket="half-cache")
    client.put_object(Bucket="half-cache", Key="graphs/k1/graph.json", Body=b"{}")  # no _COMPLETE marker
    cache = ArtifactCache("s3://half-cache/graphs", local_root=str(tmp_path / "local"))
    assert cache.fetch("k1") is False
    staging = cache.staging_dir("k1")
    (staging / "graph.json").write_text('{"batch": 1}')
    cache.store("k1", staging)
    assert cache.fetch("k1") is True
    assert json.loads((cache.local_dir("k1") / "graph.json").read_text()) == {"batch": 1}
    body = client.get_object(Bucket="half-cache", Key="graphs/k1/graph.json")["Body"].read()
    assert json.loads(body) == {"batch": 1}
