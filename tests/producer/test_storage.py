"""producer.storage: the job spec's read (a worker reads it twice per shard, so equal bytes are not validated again)."""

from __future__ import annotations

from pathlib import Path

from producer.jobs import JOB_FILE, Columns, JobKind, JobSpec, ShardRef
from producer.storage import locate, publish_json, read_job


def _write(out: Path, job_id: str, n_shards: int) -> JobSpec:
    shards = [ShardRef(index=i, uri="src.parquet", format="parquet", row_start=i, row_stop=i + 1)
              for i in range(n_shards)]
    spec = JobSpec(job_id=job_id, kind=JobKind.embed, model="m", source="src.parquet", out=str(out),
                   columns=Columns(), n_rows=n_shards, shards=shards)
    publish_json(locate(str(out)).child(JOB_FILE), spec.model_dump(mode="json"))
    return spec


def test_read_job_reads_a_rewritten_spec_anew(tmp_path: Path) -> None:
    first = _write(tmp_path / "job", "job1", 3)
    assert read_job(str(tmp_path / "job")) == first
    assert read_job(str(tmp_path / "job")) is read_job(str(tmp_path / "job"))  # equal bytes: validated once
    second = _write(tmp_path / "job", "job2", 5)  # the folder's spec replaced (another job, same place)
    again = read_job(str(tmp_path / "job"))
    assert again == second and again.job_id == "job2" and len(again.shards) == 5
    other = _write(tmp_path / "other", "job3", 1)
    assert read_job(str(tmp_path / "other")) == other and read_job(str(tmp_path / "job")) == second
