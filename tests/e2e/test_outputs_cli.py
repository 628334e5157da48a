"""``embedfleet run --outputs``: bge-m3's sparse and multi-vector outputs in Parquet, end to end.

The tiny bge-m3 (``tests.families.save_bge_m3``) embeds a corpus with a bad row through the
embedded worker; the parts are read back with pyarrow and DuckDB as they are, and compared with
the engine's own outputs (themselves checked against FlagEmbedding's definition in
``tests/models/test_bge_m3.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from producer.jobs import Options

from tests.families import tiny_bge_m3_model  # noqa: F401  (fixture)
from tests.fixtures_extra import make_engine, sample_texts

pytestmark = pytest.mark.timeout(300)

TEXTS = sample_texts(12)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "texts.parquet"
    texts = TEXTS[:5] + [""] + TEXTS[5:]  # row 5 is bad: it fails alone
    pq.write_table(pa.table({"id": [f"doc-{i}" for i in range(len(texts))], "text": texts}), path)
    return path


@pytest.fixture(scope="module")
def three_outputs(cli: Any, corpus: Path, tiny_bge_m3_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("out") / "m3"
    code, output = cli(corpus, "--out", out, "--model", tiny_bge_m3_model, "--shard-rows", 5,
                           "--outputs", "dense,sparse,multivector")
    assert code == 0, output
    return out


def test_parquet_schema_and_metadata(three_outputs: Path) -> None:
    part = pq.read_table(sorted(three_outputs.glob("part-*.parquet"))[0])
    schema = part.schema
    assert schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert schema.field("sparse_indices").type == pa.list_(pa.int32())
    assert schema.field("sparse_values").type == pa.list_(pa.float32())
    assert schema.field("multivector").type == pa.list_(pa.list_(pa.float32(), 24))
    meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
    assert json.loads(meta["embedfleet.outputs"]) == ["dense", "sparse", "multivector"]
    assert meta["embedfleet.sparse.vocab_size"] == "30522" and meta["embedfleet.multivector.dimensions"] == "24"


def test_rows_match_the_engine_and_the_bad_row_is_recorded(three_outputs: Path, tiny_bge_m3_model: Path) -> None:
    table = pa.concat_tables([pq.read_table(p) for p in sorted(three_outputs.glob("part-*.parquet"))])
    assert table.column("id").to_pylist() == [f"doc-{i}" for i in range(len(TEXTS) + 1) if i != 5]
    manifest = json.loads((three_outputs / "_manifest.json").read_text())
    assert [e["row"] for e in manifest["errors"]] == [5] and manifest["status"] == "complete"
    engine = make_engine(tiny_bge_m3_model)
    try:
        expected = engine.run(TEXTS, Options(outputs=["dense", "sparse", "multivector"]))
    finally:
        engine.stop()
    indices, values = table.column("sparse_indices").to_pylist(), table.column("sparse_values").to_pylist()
    multivector, n_tokens = table.column("multivector").to_pylist(), table.column("n_tokens").to_pylist()
    for row in range(len(TEXTS)):
        want_i, want_v = expected.sparse[row]
        assert indices[row] == want_i.tolist() and indices[row] == sorted(indices[row])
        np.testing.assert_allclose(values[row], want_v, atol=2e-5)
        assert len(multivector[row]) == n_tokens[row] - 1 == len(expected.multivector[row])
        np.testing.assert_allclose(np.array(multivector[row]), expected.multivector[row], atol=2e-5)


def test_pandas_reads_the_parts_as_they_are(three_outputs: Path) -> None:
    import pandas as pd

    frame = pd.read_parquet(three_outputs, columns=["id", "sparse_indices", "sparse_values", "multivector", "n_tokens"])
    assert len(frame) == len(TEXTS)
    for _, row in frame.iterrows():
        assert len(row.sparse_indices) == len(row.sparse_values) > 0
        assert len(row.multivector) == row.n_tokens - 1 and len(row.multivector[0]) == 24


def test_duckdb_reads_the_parts_as_they_are(three_outputs: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    glob = str(three_outputs / "part-*.parquet")
    rows = duckdb.sql(f"SELECT id, len(sparse_indices) AS nnz, len(sparse_values) AS nv, len(multivector) AS nm, "
                      f"n_tokens, multivector[1] AS first FROM read_parquet('{glob}') ORDER BY id").fetchall()
    assert len(rows) == len(TEXTS)
    for _, nnz, nv, nm, n_tokens, first in rows:
        assert nnz == nv > 0 and nm == n_tokens - 1 and len(first) == 24
        assert abs(sum(x * x for x in first) - 1) < 1e-4  # ColBERT vectors are unit length
    top = duckdb.sql(f"SELECT max(list_max(sparse_values)) FROM read_parquet('{glob}')").fetchall()[0][0]
    assert top > 0


def test_the_default_is_dense_only(cli: Any, corpus: Path, tiny_bge_m3_model: Path, tmp_path: Path) -> None:
    code, output = cli(corpus, "--out", tmp_path / "dense", "--model", tiny_bge_m3_model)
    assert code == 0, output
    part = pq.read_table(sorted((tmp_path / "dense").glob("part-*.parquet"))[0])
    assert "embedding" in part.column_names and "sparse_indices" not in part.column_names
    assert "multivector" not in part.column_names


def test_sparse_only_in_float16_and_unknown_outputs_refused(cli: Any, corpus: Path, tiny_bge_m3_model: Path,
                                                            tmp_path: Path) -> None:
    code, output = cli(corpus, "--out", tmp_path / "mv", "--model", tiny_bge_m3_model,
                           "--outputs", "multivector", "--output-dtype", "float16")
    assert code == 0, output
    part = pq.read_table(sorted((tmp_path / "mv").glob("part-*.parquet"))[0])
    assert part.column_names[:2] == ["id", "multivector"] and "embedding" not in part.column_names
    assert part.schema.field("multivector").type == pa.list_(pa.list_(pa.float16(), 24))
    code, output = cli(corpus, "--out", tmp_path / "bad", "--model", tiny_bge_m3_model, "--outputs", "colbert")
    assert code != 0 and "unknown output 'colbert'" in output
    code, output = cli(corpus, "--out", tmp_path / "bad2", "--outputs", "sparse")
    assert code != 0 and "does not give sparse" in output, output
