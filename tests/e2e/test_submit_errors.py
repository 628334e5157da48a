"""`embedfleet submit` answers a bad source, a file where the output folder belongs, and an output
folder owned by another job with one line and exit 2 (it printed 130-150-line tracebacks)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import RedisServer

EMBEDFLEET = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "embedfleet"


def test_submit_errors_are_one_line_and_exit_2(tmp_path: Path, redis_server: RedisServer) -> None:
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["one", "two"]}), corpus)
    (tmp_path / "a-file").write_text("x")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(corpus.read_bytes()[:40])

    def submit(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(EMBEDFLEET), "submit", *args, "--broker", redis_server.url], capture_output=True,
                              text=True, timeout=120, env={"COLUMNS": "400", "PATH": "/usr/bin:/bin"})

    assert submit(str(corpus), "--out", str(tmp_path / "taken")).returncode == 0
    cases = {
        "no such file": submit(str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "o1")),
        "as parquet": submit(str(broken), "--out", str(tmp_path / "o2")),
        "a file is in the way": submit(str(corpus), "--out", str(tmp_path / "a-file")),
        "already holds job": submit(str(corpus), "--out", str(tmp_path / "taken"), "--shard-rows", "1"),
    }
    for said, done in cases.items():
        output = done.stdout + done.stderr
        assert done.returncode == 2, output
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and said in errors[0], output
        assert "Traceback" not in output and len(output.splitlines()) <= 3, output


def test_status_wait_gives_up_at_its_timeout(tmp_path: Path, redis_server: RedisServer) -> None:
    """No worker: the job never moves; --timeout ends the wait with exit 3 and what to run next."""
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["one", "two"]}), corpus)
    out = tmp_path / "out"
    env = {"COLUMNS": "400", "PATH": "/usr/bin:/bin"}
    submitted = subprocess.run([str(EMBEDFLEET), "submit", str(corpus), "--out", str(out), "--broker",
                                redis_server.url], capture_output=True, text=True, timeout=120, env=env)
    assert submitted.returncode == 0, submitted.stderr
    waited = subprocess.run([str(EMBEDFLEET), "status", str(out), "--wait", "--timeout", "1"], capture_output=True,
                            text=True, timeout=120, env=env)
    assert waited.returncode == 3, waited.stdout + waited.stderr
    said = waited.stdout + waited.stderr
    assert "not finished after 1 s: 0/1 shards done" in said and "Traceback" not in said
