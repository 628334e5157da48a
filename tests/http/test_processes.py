"""Several facade processes on one port (``embedfleet serve --processes``): every request is
answered once, with its own vectors, whichever process took its connection; a stop ends them all."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest

from tests.conftest import RedisServer, free_port
from tests.http.servers import ROOT, WorkerProcess, wait_ready


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.fixture(scope="module")
def served(redis_module: RedisServer, fleet_worker: WorkerProcess,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    log = tmp_path_factory.mktemp("processes") / "serve.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-c", "from worker.cli import main; main()", "serve", "--broker",
                             redis_module.url, "--port", str(port), "--processes", "2", "--model", "tiny-bert"],
                            cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc=proc, log=log)
    wait_ready(url, proc=fleet_worker.proc, log=fleet_worker.log)
    yield url, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_every_request_is_answered_once_with_its_own_vectors(served: tuple[str, subprocess.Popen]) -> None:
    url, proc = served
    assert len(children(proc.pid)) == 2
    texts = [f"request number {i} about {'embedding ' * (i % 5)}servers" for i in range(96)]

    async def fire() -> list[httpx.Response]:
        # a client per request: every request on a new connection, so both processes take some
        async def one(text: str) -> httpx.Response:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                return await client.post("/v1/embeddings", json={"input": text, "model": "tiny-bert"})
        return await asyncio.gather(*(one(t) for t in texts))

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * len(texts)
    vectors = np.array([r.json()["data"][0]["embedding"] for r in responses])
    assert all(len(r.json()["data"]) == 1 for r in responses)
    # each answer is its own text's: the same texts again, in one request, give the same rows
    together = httpx.post(f"{url}/v1/embeddings", json={"input": texts, "model": "tiny-bert"}, timeout=60).json()
    expected = np.array([row["embedding"] for row in together["data"]])
    np.testing.assert_allclose(vectors, expected, rtol=1e-4, atol=1e-5)
    assert len({tuple(np.round(v, 4)) for v in vectors}) == len(texts)


def test_a_child_that_dies_is_replaced_and_a_stop_ends_them_all(served: tuple[str, subprocess.Popen]) -> None:
    url, proc = served
    first = children(proc.pid)
    os.kill(first[0], signal.SIGKILL)
    for _ in range(200):
        now = children(proc.pid)
        if len(now) == 2 and first[0] not in now:
            break
        time.sleep(0.1)
    assert len(now) == 2 and first[0] not in now
    wait_ready(url, proc=proc)
    assert httpx.post(f"{url}/v1/embeddings", json={"input": "still here"}, timeout=60).status_code == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not [pid for pid in now if Path(f"/proc/{pid}").exists()]  # reaped before the parent exited


def test_processes_need_a_broker() -> None:
    done = subprocess.run([sys.executable, "-c", "from worker.cli import main; main()", "serve", "--processes", "2",
                           "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "--processes above 1 needs --broker" in done.stdout + done.stderr
