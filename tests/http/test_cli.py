"""``embedfleet serve`` as a user runs it: a subprocess, thin (Redis) and embedded, with an API key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.conftest import RedisServer, free_port
from tests.http.servers import ROOT, WorkerProcess, wait_ready

#: The lead registers the command by importing worker.commands.serve in worker/cli.py; import it here too.
ENTRY = "import worker.commands.serve; from worker.cli import main; main()"


def _serve(args: list[str], log: Path) -> Iterator[str]:
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-c", ENTRY, "serve", "--port", str(port), *args], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc=proc, log=log)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture
def serve_thin(redis_module: RedisServer, fleet_worker: WorkerProcess, tmp_path: Path) -> Iterator[str]:
    yield from _serve(["--broker", redis_module.url, "--model", "tiny-bert", "--api-key", "k3y"], tmp_path / "s.log")


def test_serve_thin_subprocess_with_api_key(serve_thin: str) -> None:
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{serve_thin}/v1", api_key="wrong").embeddings.create(input="a", model="tiny-bert")
    result = OpenAI(base_url=f"{serve_thin}/v1", api_key="k3y").embeddings.create(input=["a", "b"], model="tiny-bert")
    assert [len(d.embedding) for d in result.data] == [32, 32]
    models = httpx.get(f"{serve_thin}/v1/models", headers={"Authorization": "Bearer k3y"}).json()
    assert [m["id"] for m in models["data"]] == ["tiny-bert"]  # --model restricts what is served


def test_serve_embedded_subprocess(tiny_embed_model: Path, tmp_path: Path) -> None:
    for url in _serve(["--model", str(tiny_embed_model), "--device", "cpu"], tmp_path / "e.log"):
        response = httpx.post(f"{url}/embeddings", json={"input": "hello", "model": "tiny-bert"})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] == 3
        health = httpx.get(f"{url}/health").json()["models"]  # open without a key: no host names in it
        # per device: where it runs and its batch budget (issue 17), never which host
        assert health == {"tiny-bert": {"kind": "embed", "workers": 1,
                                        "devices": [{"device": "cpu", "max_batch_tokens": 2048}]}}


def test_serve_checks_its_port_before_loading_models(tmp_path: Path) -> None:
    """A taken port fails at once: the missing model would be the error if models were loaded first.
    --max-chars above 100,000 is accepted."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        run = subprocess.run([sys.executable, "-c", ENTRY, "serve", "--port", str(port), "--max-chars", "500000",
                              "--model", str(tmp_path / "no-such-model")], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120)
    output = run.stdout + run.stderr
    assert run.returncode == 2, output
    assert f"cannot listen on 127.0.0.1:{port}" in output and "--port" in output, output
    assert "no-such-model" not in output, output
