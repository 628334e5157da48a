"""Array-job mode against moto's S3 server: K child processes, one shard each, no broker.

Each child is a real ``embedfleet shard`` process with ``AWS_BATCH_JOB_ARRAY_INDEX`` set, as
AWS Batch starts them; together they must produce the complete job, and re-running a child (a
Spot retry, an operator re-submitting) must leave correct outputs untouched or restore missing
ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from producer import storage
from producer.jobs import JOB_FILE, MANIFEST, PARTS_DIR, SUCCESS, marker_name, part_name
from .conftest import REPO, S3

BUCKET = "fleet"
OUT = f"s3://{BUCKET}/jobs/corpus"
MANIFEST_URI = f"{OUT}/{JOB_FILE}"
N_ROWS = 37
SHARD_ROWS = 10
K = 4
ENTRY = "import worker.commands.shard; from producer.cli import app; app()"


def texts() -> list[str]:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    out = [" ".join(words[(i + j) % len(words)] for j in range(3 + i % 11)) for i in range(N_ROWS)]
    out[13] = "   "  # a bad row: recorded in the manifest, the others go on
    return out


def child_env(s3: S3, index: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "AWS_BATCH_JOB_ARRAY_INDEX"}
    env.update(s3.env)
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    if index is not None:
        env["AWS_BATCH_JOB_ARRAY_INDEX"] = str(index)
    return env


def start_child(s3: S3, index: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", ENTRY, "shard", "--job-manifest", MANIFEST_URI, "--device", "cpu", *extra],
        env=child_env(s3, index), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def run_child(s3: S3, index: int) -> tuple[int, str]:
    child = start_child(s3, index)
    output, _ = child.communicate(timeout=300)
    return child.returncode, output


def snapshot(s3: S3) -> dict[str, tuple[str, Any]]:
    """Every object of the job with its ETag and modification time: any rewrite changes it."""
    listing = s3.client().list_objects_v2(Bucket=BUCKET, Prefix="jobs/corpus/")["Contents"]
    return {o["Key"]: (o["ETag"], o["LastModified"]) for o in listing}


def key(name: str) -> str:
    return f"jobs/corpus/{name}"


@pytest.fixture(scope="module")
def array_job(s3_server: S3, tiny_embed_model: Path) -> dict[str, Any]:
    """Plan the job with the CLI (no broker), then run K children at once, as an array would."""
    import worker.commands.shard  # noqa: F401  - registers `plan` and `shard` on the app
    from producer.cli import app

    s3_server.client().create_bucket(Bucket=BUCKET)
    table = pa.table({"doc_id": [f"d{i:03d}" for i in range(N_ROWS)], "text": texts()})
    storage.publish_table(storage.locate(f"s3://{BUCKET}/corpora/corpus.parquet"), table)
    result = CliRunner().invoke(app, ["plan", f"s3://{BUCKET}/corpora/corpus.parquet", "--out", OUT,
                                      "--model", str(tiny_embed_model), "--id-column", "doc_id",
                                      "--shard-rows", str(SHARD_ROWS)])
    assert result.exit_code == 0, result.output
    planned = json.loads(result.stdout.strip().splitlines()[-1])
    children = [start_child(s3_server, i) for i in range(planned["array_size"])]
    outputs = [child.communicate(timeout=300)[0] for child in children]
    return {"planned": planned, "codes": [c.returncode for c in children], "outputs": outputs,
            "model": tiny_embed_model}


def read_all() -> pa.Table:
    manifest = storage.read_manifest(OUT)
    assert manifest is not None
    return pa.concat_tables([storage.read_table(storage.locate(f"{OUT}/{name}")) for name in manifest.parts])


def test_plan_prints_the_manifest_and_array_size(array_job: dict[str, Any]) -> None:
    assert array_job["planned"]["job_manifest"] == MANIFEST_URI
    assert array_job["planned"]["array_size"] == K
    assert array_job["planned"]["n_rows"] == N_ROWS


def test_k_children_produce_the_complete_output(array_job: dict[str, Any], s3_server: S3) -> None:
    assert array_job["codes"] == [0] * K, "\n".join(array_job["outputs"])
    manifest = storage.read_manifest(OUT)
    assert manifest is not None and manifest.status == "complete"
    assert manifest.parts == [part_name(i) for i in range(K)]
    assert manifest.n_rows == N_ROWS and manifest.rows_written == N_ROWS - 1
    assert [(e.row, e.id, e.field) for e in manifest.errors] == [(13, "d013", "text")]
    assert key(SUCCESS) in snapshot(s3_server)
    table = read_all()
    expected_ids = [f"d{i:03d}" for i in range(N_ROWS) if i != 13]
    assert table.column("id").to_pylist() == expected_ids


def test_vectors_equal_an_in_process_engine(array_job: dict[str, Any]) -> None:
    from worker.hosting.host import WorkerSpec, load_engine

    engine, _ = load_engine(str(array_job["model"]), WorkerSpec(device="cpu", dtype="float32"))
    try:
        good = [t for i, t in enumerate(texts()) if i != 13]
        reference = engine.run(good).values
    finally:
        engine.stop()
    got = np.asarray(read_all().column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-5)


def test_rerunning_a_finished_child_rewrites_nothing(array_job: dict[str, Any], s3_server: S3) -> None:
    assert array_job["codes"] == [0] * K
    before = snapshot(s3_server)
    time.sleep(1.1)  # LastModified has one-second resolution
    code, output = run_child(s3_server, 2)
    assert code == 0, output
    assert "already done" in output
    assert snapshot(s3_server) == before


def test_rerun_restores_a_shard_lost_before_its_marker(array_job: dict[str, Any], s3_server: S3) -> None:
    """A child killed after its part but before its marker (and so before the manifest)."""
    assert array_job["codes"] == [0] * K
    client = s3_server.client()
    manifest_before = json.loads(client.get_object(Bucket=BUCKET, Key=key(MANIFEST))["Body"].read())
    part_before = storage.read_table(storage.locate(f"{OUT}/{part_name(1)}"))
    for name in (f"{PARTS_DIR}/{marker_name(1)}", MANIFEST, SUCCESS):
        client.delete_object(Bucket=BUCKET, Key=key(name))
    untouched = {k: v for k, v in snapshot(s3_server).items() if k != key(part_name(1))}
    time.sleep(1.1)

    code, output = run_child(s3_server, 1)
    assert code == 0, output
    after = snapshot(s3_server)
    assert {k: after[k] for k in untouched} == untouched  # the other shards' files were not touched
    part_after = storage.read_table(storage.locate(f"{OUT}/{part_name(1)}"))
    assert part_after.column("id").to_pylist() == part_before.column("id").to_pylist()
    np.testing.assert_allclose(np.asarray(part_after.column("embedding").to_pylist()),
                               np.asarray(part_before.column("embedding").to_pylist()), rtol=1e-5, atol=1e-6)
    manifest_after = json.loads(client.get_object(Bucket=BUCKET, Key=key(MANIFEST))["Body"].read())
    # the times come from the markers, and shard 1's new marker holds the rerun's: only they move
    times = ("started_at", "finished_at")
    assert manifest_after["finished_at"] > manifest_before["finished_at"]
    assert {k: v for k, v in manifest_after.items() if k not in times} == \
        {k: v for k, v in manifest_before.items() if k not in times}
    assert key(SUCCESS) in after


def test_a_rerun_writes_a_manifest_the_last_child_did_not(array_job: dict[str, Any], s3_server: S3) -> None:
    """A child killed between its marker and the manifest: any re-run child finishes the job."""
    assert array_job["codes"] == [0] * K
    client = s3_server.client()
    manifest_before = json.loads(client.get_object(Bucket=BUCKET, Key=key(MANIFEST))["Body"].read())
    parts_before = {k: v for k, v in snapshot(s3_server).items() if k.endswith(".parquet")}
    for name in (MANIFEST, SUCCESS):
        client.delete_object(Bucket=BUCKET, Key=key(name))
    code, output = run_child(s3_server, 0)
    assert code == 0, output
    after = snapshot(s3_server)
    assert json.loads(client.get_object(Bucket=BUCKET, Key=key(MANIFEST))["Body"].read()) == manifest_before
    assert key(SUCCESS) in after
    assert {k: after[k] for k in parts_before} == parts_before


def test_index_out_of_range_and_missing_index_are_clear_errors(array_job: dict[str, Any],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from producer.cli import app

    monkeypatch.delenv("AWS_BATCH_JOB_ARRAY_INDEX", raising=False)
    runner = CliRunner()
    result = runner.invoke(app, ["shard", "--job-manifest", MANIFEST_URI, "--index", str(K)])
    assert result.exit_code == 2
    assert f"must be 0..{K - 1}" in " ".join(result.output.split())
    result = runner.invoke(app, ["shard", "--job-manifest", MANIFEST_URI],
                           env={"AWS_BATCH_JOB_ARRAY_INDEX": "1", "EMBEDFLEET_INDEX_OFFSET": str(K)})
    assert result.exit_code == 2 and f"{K + 1} is out of range" in " ".join(result.output.split())
    result = runner.invoke(app, ["shard", "--job-manifest", MANIFEST_URI])
    assert result.exit_code == 2 and "AWS_BATCH_JOB_ARRAY_INDEX is not set" in " ".join(result.output.split())
    result = runner.invoke(app, ["shard", "--job-manifest", f"s3://{BUCKET}/nowhere/_job.json", "--index", "0"])
    assert result.exit_code == 2 and "embedfleet plan" in " ".join(result.output.split())
    result = runner.invoke(app, ["plan", f"s3://{BUCKET}/corpora/corpus.parquet", "--out", f"s3://{BUCKET}/jobs/x",
                                 "--text-column", "body"])
    assert result.exit_code == 2 and "body" in result.output


TINI = "/usr/bin/tini"


@pytest.mark.parametrize("launcher", ["direct", "tini"])
def test_sigterm_stops_a_child_and_publishes_nothing(array_job: dict[str, Any], s3_server: S3,
                                                     launcher: str) -> None:
    """Spot reclaim / docker stop: exit 143 at once, no part, no marker; a retry redoes the shard.

    The ``tini`` case runs the images' exact entry point (``/usr/bin/tini -- embedfleet``) and
    signals tini, as ``docker stop`` does: the signal must reach embedfleet through it.
    """
    from producer.client import plan_corpus

    if launcher == "tini" and not Path(TINI).exists():
        pytest.skip("tini is not installed (apt-get install tini); the images install it")
    out = f"s3://{BUCKET}/jobs/long-{launcher}"
    many = [f"{texts()[i % 10]} {i}" for i in range(20_000)]  # long enough to be mid-shard at SIGTERM
    storage.publish_table(storage.locate(f"s3://{BUCKET}/corpora/long.parquet"), pa.table({"text": many}))
    plan_corpus(f"s3://{BUCKET}/corpora/long.parquet", out, model=str(array_job["model"]), shard_rows=len(many))
    prefix = [TINI, "-s", "--"] if launcher == "tini" else []
    child = subprocess.Popen(
        [*prefix, sys.executable, "-c", ENTRY, "shard", "--job-manifest", out, "--device", "cpu", "--index", "0"],
        env=child_env(s3_server, None), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert child.stdout is not None
    lines = []
    for line in child.stdout:  # wait until the model is loaded and the shard is being embedded
        lines.append(line)
        if "embedding shard 0" in line:
            break
    child.send_signal(signal.SIGTERM)
    rest, _ = child.communicate(timeout=60)
    output = "".join(lines) + rest
    assert child.returncode == 143, output
    assert "stopped by SIGTERM" in output
    prefix_key = out.split(f"{BUCKET}/", 1)[1]
    names = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix_key + "/")["Contents"]}
    assert names == {f"{prefix_key}/_job.json"}


def test_a_transient_failure_on_the_last_attempt_leaves_the_failure_marker(tiny_embed_model: Path,
                                                                          tmp_path: Path) -> None:
    """The source's S3 goes away after the plan (a network error: transient, not bad data). On an
    attempt AWS Batch will retry (``EMBEDFLEET_SHARD_ATTEMPTS``: its job definition's attempts),
    the child exits 75 with nothing written; on the last one it fails the shard in its marker with
    the reason, and the manifest names it. Before, the last attempt left no marker either: the
    array was over and the job never learned that the shard failed."""
    from moto.server import ThreadedMotoServer

    import worker.commands.shard  # noqa: F401  - registers `plan` and `shard` on the app
    from producer.cli import app

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3(f"http://{host}:{port}")  # a server of its own: this test stops it
    env = {**s3.env, "AWS_BATCH_JOB_ARRAY_INDEX": "0", "EMBEDFLEET_SHARD_ATTEMPTS": "2"}
    out, runner = tmp_path / "out", CliRunner()
    try:
        s3.client().create_bucket(Bucket="gone")
        with pytest.MonkeyPatch.context() as patch:
            for name, value in s3.env.items():
                patch.setenv(name, value)
            storage.publish_table(storage.locate("s3://gone/corpus.parquet"),
                                  pa.table({"text": [f"text number {i}" for i in range(8)]}))
        planned = runner.invoke(app, ["plan", "s3://gone/corpus.parquet", "--out", str(out), "--model",
                                      str(tiny_embed_model)], env=env)
        assert planned.exit_code == 0, planned.output
    finally:
        server.stop()  # from here on, reading the source fails with a network error
    shard = ["shard", "--job-manifest", str(out), "--device", "cpu", "--backend", "torch", "--dtype", "float32"]
    first = runner.invoke(app, shard, env={**env, "AWS_BATCH_JOB_ATTEMPT": "1"})
    assert first.exit_code == 75, first.output
    assert "attempt 1 of 2" in " ".join(first.output.split()) and storage.read_marker(str(out), 0) is None
    last = runner.invoke(app, shard, env={**env, "AWS_BATCH_JOB_ATTEMPT": "2"})
    assert last.exit_code == 1, last.output
    marker = storage.read_marker(str(out), 0)
    assert marker is not None and marker.status == "failed" and marker.deliveries == 2
    assert marker.failure is not None and marker.failure.startswith("failed on attempt 2 of 2 (the last)")
    manifest = storage.read_manifest(str(out))
    assert manifest is not None and manifest.status == "partial" and [s.index for s in manifest.failed_shards] == [0]
