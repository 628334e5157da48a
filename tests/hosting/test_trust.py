"""Storage roots and the _job.json binding: what a shard message may make a worker read and write."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from producer.client import plan_corpus
from producer.errors import SourceError, Untrusted
from producer.jobs import ShardJob
from producer.sources import read_shard
from worker.hosting.trust import StorageRoots, check_shard


def test_roots_normalize_refuse_dotdot_and_resolve_symlinks(tmp_path: Path) -> None:
    inside = tmp_path / "data"
    inside.mkdir()
    (inside / "link").symlink_to("/etc")
    roots = StorageRoots.parse([str(inside), "s3://bucket/prefix"])
    assert roots.refusal(str(inside / "corpus.parquet")) is None
    assert roots.refusal(str(inside)) is None
    assert roots.refusal(f"file://{inside}/a/b.parquet") is None
    assert roots.refusal("s3://bucket/prefix/run/part.parquet") is None
    assert "outside" in roots.refusal("/etc/passwd")
    assert "outside" in roots.refusal(str(inside / "link" / "passwd"))  # a symlink out is resolved, then refused
    assert "contains '..'" in roots.refusal(f"{inside}/out/../../escape")
    assert "outside" in roots.refusal("s3://bucket/prefix2/x")  # a prefix is a folder, not a string start
    assert "contains '..'" in roots.refusal("s3://bucket/prefix/../other/x")
    assert "outside" in roots.refusal(str(tmp_path / "data2" / "x"))
    assert StorageRoots.parse(["*"]).refusal("/etc/passwd") is None
    assert StorageRoots.parse([f"{inside},{tmp_path / 'other'}"]).folders == (inside.resolve(), (tmp_path / "other"))
    assert StorageRoots.parse([]).empty
    with pytest.raises(Untrusted, match="contains '..'"):
        StorageRoots.parse([f"{inside}/../x"])


def _job(tmp_path: Path) -> tuple[list[ShardJob], StorageRoots]:
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(10)], "text": [f"text {i}" for i in range(10)]}), corpus)
    spec = plan_corpus(str(corpus), str(tmp_path / "out"), model="tiny", id_column="id", shard_rows=5)
    jobs = [ShardJob(kind=spec.kind, job_id=spec.job_id, model=spec.model, out=spec.out, columns=spec.columns,
                     options=spec.options, shard=shard, n_shards=len(spec.shards)) for shard in spec.shards]
    return jobs, StorageRoots.parse([str(tmp_path)])


def test_a_shard_runs_only_as_its_job_planned_it(tmp_path: Path) -> None:
    jobs, roots = _job(tmp_path)
    check_shard(jobs[1], roots)  # as planned: fine
    hostile = {
        "/etc/passwd as the source": jobs[0].model_copy(update={"shard": jobs[0].shard.model_copy(
            update={"uri": "/etc/passwd"})}),
        "an output outside": jobs[0].model_copy(update={"out": "/tmp/x"}),
        "a '..' output": jobs[0].model_copy(update={"out": f"{jobs[0].out}/../../escape"}),
    }
    for what, job in hostile.items():
        with pytest.raises(Untrusted, match="outside the worker's storage roots|contains '..'"):
            check_shard(job, roots)
    anywhere = StorageRoots.parse(["*"])
    bound = {
        "the id column swapped for the text": (jobs[0].model_copy(update={"columns": jobs[0].columns.model_copy(
            update={"id": "text"})}), "columns differs"),
        "index 99": (jobs[0].model_copy(update={"shard": jobs[0].shard.model_copy(update={"index": 99})}),
                     "the job has 2 shards"),
        "another job's id": (jobs[0].model_copy(update={"job_id": "other"}), "belongs to job"),
        "another source": (jobs[0].model_copy(update={"shard": jobs[0].shard.model_copy(
            update={"uri": "/etc/passwd"})}), "differs from _job.json"),
        "a folder with no job": (jobs[0].model_copy(update={"out": str(tmp_path / "fresh")}), "no readable _job.json"),
    }
    for what, (job, reason) in bound.items():  # even with '*', the output folder's job decides
        with pytest.raises(Untrusted, match=reason):
            check_shard(job, anywhere)


def test_a_fifo_is_refused_as_a_source_instead_of_blocking(tmp_path: Path) -> None:
    jobs, _ = _job(tmp_path)
    fifo = tmp_path / "pipe.parquet"
    os.mkfifo(fifo)
    shard = jobs[0].shard.model_copy(update={"uri": str(fifo)})
    with pytest.raises(SourceError, match="not a regular file"):
        read_shard(shard, jobs[0].kind, jobs[0].columns)
    with pytest.raises(SourceError, match="a folder"):
        read_shard(shard.model_copy(update={"uri": str(tmp_path)}), jobs[0].kind, jobs[0].columns)
