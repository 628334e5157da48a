"""A full output disk (a real tmpfs, mounted by the test) fails the job after N deliveries with
the storage error, in one line, and leaves no temp file behind; before, every shard was requeued
forever and each failed write left its temp file."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
EMBEDFLEET = REPO / ".venv" / "bin" / "embedfleet"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs; skipped where this machine does not let the test mount one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small disk to fill")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> None:
    """Write until the disk refuses another byte."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def test_a_full_output_disk_fails_the_job_after_n_deliveries(tmp_path: Path, small_disk: Path,
                                                             tiny_embed_model: Path) -> None:
    corpus = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(300)], "text": [f"text number {i}" for i in range(300)]}),
                   corpus)
    out = small_disk / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EMBEDFLEET_MAX_DELIVERIES": "2", "OMP_NUM_THREADS": "1"}
    same = ["--out", str(out), "--model", str(tiny_embed_model), "--shard-rows", "150", "--id-column", "id"]
    planned = subprocess.run([str(EMBEDFLEET), "plan", str(corpus), *same], capture_output=True, text=True, env=env)
    assert planned.returncode == 0, planned.stdout + planned.stderr  # _job.json is on the disk
    fill(small_disk)
    done = subprocess.run([str(EMBEDFLEET), "run", str(corpus), *same, "--device", "cpu"], capture_output=True,
                          text=True, env=env, timeout=240)
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1, output[-3000:]
    assert "2 shard(s) could not be written" in output and "No space left on device" in output, output[-3000:]
    assert output.count("error: job ") == 1  # the storage error, said once at the end
    leftovers = [str(p) for p in small_disk.rglob("*") if ".tmp-" in p.name]
    assert leftovers == [], "a failed write left its temp file"
