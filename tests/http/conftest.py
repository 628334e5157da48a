"""Fixtures for the facade tests: a real uvicorn on a free port, embedded or thin (real Redis).

Embedded: one in-process worker per session (its engines in its own registry) hosting the
bundled model and the tiny embed / rerank / classify models, behind ``embedfleet serve``'s app.
Thin: a real redis-server, an ``embedfleet worker`` subprocess, and a facade that holds no model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import RedisServer
from tests.http.servers import Served, ServerThread, WorkerProcess, wait_ready


@pytest.fixture(scope="session")
def reference_engine(bundled_model: Path) -> Iterator[Any]:
    """A bare engine for the bundled model (not registered: no worker sees it): the direct call."""
    from worker.backends.select import load_backend
    from worker.engine.pipeline import Engine
    from worker.models.resolve import describe

    info = describe(str(bundled_model))
    engine = Engine(info, load_backend("torch", info, "cpu", "auto").backend).start()
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def embedded(tiny_embed_model: Path, tiny_rerank_model: Path, tiny_classify_model: Path,
             bundled_model: Path) -> Iterator[Served]:
    import worker.commands.serve as serve
    from producer.http.settings import FacadeSettings
    from worker.hosting.host import WorkerSpec

    models = [str(tiny_embed_model), str(tiny_rerank_model), str(tiny_classify_model), str(bundled_model)]
    spec = WorkerSpec(models=models, device="cpu", concurrency=64)
    settings = FacadeSettings(timeout_s=60, refresh_s=1.0, max_body_bytes=4 * 1024 * 1024)
    app, worker = serve.build(None, None, models, settings, spec)
    server = ServerThread(app).start()
    yield Served(server.url, "embedded", "tiny-bert", "all-MiniLM-L6-v2", "tiny-rerank", "tiny-classify",
                 worker_app=worker.app)
    server.stop()
    if worker.alive():
        worker.stop()


@pytest.fixture(scope="module")
def redis_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fleet_worker(redis_module: RedisServer, tiny_embed_model: Path, bundled_model: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    proc = WorkerProcess(redis_module.url, [str(tiny_embed_model), str(bundled_model)], log).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def thin(redis_module: RedisServer, fleet_worker: WorkerProcess) -> Iterator[Served]:
    from producer.client import Client
    from producer.http.app import create_app
    from producer.http.settings import FacadeSettings

    settings = FacadeSettings(timeout_s=60, refresh_s=1.0, max_body_bytes=4 * 1024 * 1024)
    server = ServerThread(create_app(Client(broker=redis_module.url), settings)).start()
    wait_ready(server.url, proc=fleet_worker.proc, log=fleet_worker.log)
    yield Served(server.url, "thin", "tiny-bert", "all-MiniLM-L6-v2")
    server.stop()


@pytest.fixture(scope="session")
def single(embedded: Served, bundled_model: Path, tiny_rerank_model: Path, tiny_classify_model: Path) -> Iterator[Served]:
    """A second facade on the embedded worker that serves one model of each kind (as infinity and
    TEI do), so any model name resolves; it also accepts inputs over 100,000 characters."""
    from producer.client import Client
    from producer.http.app import create_app
    from producer.http.settings import FacadeSettings

    wanted = [str(bundled_model), f"rerank:{tiny_rerank_model}", f"classify:{tiny_classify_model}"]
    settings = FacadeSettings(models=wanted, timeout_s=60, refresh_s=1.0, max_chars=300_000,
                              max_body_bytes=4 * 1024 * 1024)
    server = ServerThread(create_app(Client(app=embedded.worker_app), settings)).start()
    wait_ready(server.url)
    yield Served(server.url, "single", "all-MiniLM-L6-v2", "all-MiniLM-L6-v2", "tiny-rerank", "tiny-classify",
                 worker_app=embedded.worker_app)
    server.stop()


@pytest.fixture(scope="session")
def embed_only(embedded: Served, bundled_model: Path) -> Iterator[Served]:
    """A facade on the embedded worker that serves the bundled model alone (a TEI-like server)."""
    from producer.client import Client
    from producer.http.app import create_app
    from producer.http.settings import FacadeSettings

    settings = FacadeSettings(models=[str(bundled_model)], timeout_s=60, refresh_s=1.0)
    server = ServerThread(create_app(Client(app=embedded.worker_app), settings)).start()
    wait_ready(server.url)
    yield Served(server.url, "embed_only", "all-MiniLM-L6-v2", "all-MiniLM-L6-v2", worker_app=embedded.worker_app)
    server.stop()
