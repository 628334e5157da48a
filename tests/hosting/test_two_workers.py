"""Two in-process workers in one process: ``embedfleet run`` beside an embedded ``serve``.

Each worker hosts its own engines under a host name of its own, so stopping one (the end of a
``run``) leaves the other serving: its queued calls, its direct calls and its broadcast report.
Stop 26 met the opposite: a run's stop cleared the process's one registry and the pidbox queue
both workers shared, and the facade then hosted "none".
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from producer.broker import MODELS_COMMAND
from producer.client import Client
from producer.jobs import EmbedJob, RerankJob
from worker.commands.serve import start_embedded
from worker.hosting.direct import EngineRunner
from worker.hosting.host import InProcessWorker, WorkerSpec


def _spec(*models: Path) -> WorkerSpec:
    return WorkerSpec(models=[str(m) for m in models], device="cpu", backend="torch", dtype="float32",
                      concurrency=1)


def _reports(worker: InProcessWorker) -> dict[str, list[str]]:
    """Every worker's broadcast answer in this process, by host name: the model ids it names."""
    replies = worker.app.control.broadcast(MODELS_COMMAND, reply=True, timeout=2.0) or []
    return {host: sorted(m["id"] for m in answer["models"]) for reply in replies for host, answer in reply.items()}


def _answers(worker: InProcessWorker, embed: str, rerank: str) -> tuple[int, int]:
    """A queued embed call and a direct (facade) rerank call, answered by ``worker``: row counts."""
    queued = Client(app=worker.app).call(EmbedJob(model=embed, inputs=["a text", "another"]), timeout=30)
    runner = EngineRunner(worker.registry)
    direct: Any = asyncio.run(runner.run(RerankJob(model=rerank, query="q", documents=["d1", "d2", "d3"]), 30))
    return queued.n_items, len(direct.values)


def test_stopping_a_run_leaves_the_embedded_facade_serving(tiny_embed_model: Path, tiny_rerank_model: Path) -> None:
    embed, rerank = str(tiny_embed_model), str(tiny_rerank_model)
    facade = start_embedded([embed, rerank], _spec(tiny_embed_model, tiny_rerank_model))
    try:
        run = InProcessWorker(_spec(tiny_embed_model)).start()  # the same model as the facade's, as run and serve do
        try:
            assert run.hostname != facade.hostname
            both = _reports(facade)
            assert both[facade.hostname] == sorted(e.info.name for e in facade.engines)
            assert both[run.hostname] == [run.engines[0].info.name]
        finally:
            run.stop()
        assert _answers(facade, embed, rerank) == (2, 3)
        after = _reports(facade)  # (other workers of this test process may answer too)
        assert after[facade.hostname] == sorted(e.info.name for e in facade.engines)
        assert run.hostname not in after
        assert facade.registry.engine_for(rerank).info.name == facade.engines[1].info.name
    finally:
        facade.stop()
