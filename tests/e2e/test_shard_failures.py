"""``embedfleet shard`` (array mode) on a shard whose data is bad: parked with the reason, as a
queue worker parks it, so the job still ends (partial or failed) with every shard accounted for.

Before, the child only exited 2 ("bad input") with nothing written: the shard had no marker, so
no manifest could ever be written and the job never ended, and each retry of the child (AWS Batch
attempts) failed the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from producer import storage


def _invoke(*args: Any) -> tuple[int, str]:
    import worker.commands.shard  # noqa: F401  - registers `plan` and `shard` on the app
    from producer.cli import console
    from worker.cli import app

    saved, console.width = console._width, 400  # so that rich does not wrap the lines matched
    try:
        result = CliRunner().invoke(app, [str(a) for a in args])
    finally:
        console._width = saved
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, " ".join(result.output.split())


def test_a_shard_of_bad_data_is_parked_and_the_job_ends(tiny_embed_model: Path, tmp_path: Path) -> None:
    corpus, out = tmp_path / "corpus.parquet", tmp_path / "out"
    pq.write_table(pa.table({"text": [f"text number {i}" for i in range(20)]}), corpus)
    code, output = _invoke("plan", corpus, "--out", out, "--model", tiny_embed_model, "--shard-rows", 10)
    assert code == 0, output
    corpus.write_bytes(b"not a parquet file at all")  # the source went bad after the plan
    engine = ("--device", "cpu", "--backend", "torch", "--dtype", "float32")
    for index in (0, 1):
        code, output = _invoke("shard", "--job-manifest", out, "--index", index, *engine)
        assert code == 1 and f"shard {index} failed" in output and "corpus.parquet" in output, output
        marker = storage.read_marker(str(out), index)
        assert marker is not None and marker.status == "failed" and "corpus.parquet" in (marker.failure or "")
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "partial" and [s["index"] for s in manifest["failed_shards"]] == [0, 1]
    code, output = _invoke("shard", "--job-manifest", out, "--index", 0, *engine)  # a retry: still failed, at once
    assert code == 1 and "already done" in output, output
