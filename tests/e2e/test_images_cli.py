"""``embedfleet run images.parquet --image-column image`` on a tiny random CLIP: image cells as local
paths (relative to the corpus, and absolute) and as bytes, each bad cell recorded in the manifest
with its reason while the other rows are written; vectors equal the engine's for the same images."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.families import image_bytes, save_image_text
from tests.fixtures_extra import make_engine

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_image_text(tmp_path_factory.mktemp("vision") / "tiny-clip", "clip")


def engine_vectors(model: Path, images: list[bytes]) -> np.ndarray:
    engine = make_engine(model)
    try:
        uris = [{"image": "data:image/png;base64," + base64.b64encode(b).decode()} for b in images]
        return engine.run(uris, timeout=120).values
    finally:
        engine.stop()


def test_paths_in_an_image_column(cli: Any, clip: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    images = [image_bytes(40, 30, "PNG", 1), image_bytes(50, 60, "JPEG", 2), image_bytes(32, 32, "PNG", 3)]
    (corpus / "a.png").write_bytes(images[0])
    (corpus / "sub" / "b.jpg").write_bytes(images[1])
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(images[2])
    (corpus / "c.png").write_bytes(images[2])
    (corpus / "broken.png").write_bytes(b"\x89PNG but not really")
    cells = ["a.png", "sub/b.jpg", str(corpus / "c.png"), "missing.png", str(outside), "broken.png"]
    pq.write_table(pa.table({"id": list(range(len(cells))), "image": cells}), corpus / "images.parquet")
    code, output = cli(corpus / "images.parquet", "--out", tmp_path / "out", "--model", clip,
                           "--image-column", "image")
    assert code == 0, output
    table = pq.read_table(sorted((tmp_path / "out").glob("part-*.parquet"))[0])
    assert table.column("id").to_pylist() == [0, 1, 2]
    got = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(got, engine_vectors(clip, images), atol=2e-5)
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    errors = {e["row"]: e for e in manifest["errors"]}
    assert sorted(errors) == [3, 4, 5] and all(e["field"] == "image" for e in errors.values())
    assert "no image file at" in errors[3]["reason"]
    assert "outside the worker's storage roots" in errors[4]["reason"]
    assert "not an image PIL can read" in errors[5]["reason"]


def test_bytes_in_an_image_column(cli: Any, clip: Path, tmp_path: Path) -> None:
    images = [image_bytes(33, 47, "JPEG", 4), image_bytes(64, 20, "PNG", 5)]
    source = tmp_path / "bytes.parquet"
    pq.write_table(pa.table({"image": pa.array([images[0], b"", images[1]], pa.binary())}), source)
    code, output = cli(source, "--out", tmp_path / "out", "--model", clip, "--image-column", "image")
    assert code == 0, output
    table = pq.read_table(sorted((tmp_path / "out").glob("part-*.parquet"))[0])
    assert table.column("id").to_pylist() == [0, 2]
    got = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(got, engine_vectors(clip, images), atol=2e-5)
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert [e["row"] for e in manifest["errors"]] == [1] and "empty" in manifest["errors"][0]["reason"]


def test_an_image_column_on_a_text_model_is_refused(cli: Any, tmp_path: Path, tiny_embed_model: Path) -> None:
    source = tmp_path / "bytes.parquet"
    pq.write_table(pa.table({"image": pa.array([image_bytes(8, 8)], pa.binary())}), source)
    code, output = cli(source, "--out", tmp_path / "out", "--model", tiny_embed_model, "--image-column", "image")
    assert code != 0 and "embeds text only" in output, output
