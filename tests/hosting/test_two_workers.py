"""Two in-process workers in one process: ``embedfleet run`` beside an embedded ``serve``.

Each worker hosts its own engines under a host name of its own, on a broker of its own
(``worker.hosting.memory_broker``), with its own storage roots and its own "stopping" flag. So
stopping one (the end of a ``run``) leaves the other serving: its queued calls, its direct calls
and its broadcast report; a run beside a serve finishes whichever started first; and one
worker's stop leaves the other's shards alone. Stop 26 met the first defect (a run's stop
cleared the process's one registry and the pidbox queue both workers shared: the facade then
hosted "none"); stop 27 the others (one memory broker and process-wide roots: a serve started
after a run made every shard of the run refused; one process-wide stop flag).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Iterator

import pytest
from celery.signals import task_prerun

from producer.broker import MEMORY_BROKER, MODELS_COMMAND, SHARD_TASK
from producer.client import Client, JobFailed
from producer.errors import SourceError
from producer.jobs import EmbedJob, RerankJob
from worker import sinks
from worker.commands.run import run_roots
from worker.commands.serve import start_embedded
from worker.hosting import stop, tasks
from worker.hosting.direct import EngineRunner
from worker.hosting.host import InProcessWorker, WorkerSpec
from worker.hosting.trust import StorageRoots, roots_of, use_roots

#: seconds a job of a few rows is given: it takes well under one; a refused shard never completes
JOB_TIMEOUT_S = 30


def _spec(*models: Path, roots: StorageRoots | None = None) -> WorkerSpec:
    return WorkerSpec(models=[str(m) for m in models], device="cpu", backend="torch", dtype="float32",
                      concurrency=1, storage_roots=roots)


def _reports(worker: InProcessWorker) -> dict[str, list[str]]:
    """The broadcast answers on ``worker``'s broker, by host name: the model ids each names."""
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
            assert run.hostname != facade.hostname and run.broker != facade.broker
            # each on a broker of its own: a broadcast reaches its own worker, and no other
            assert _reports(facade) == {facade.hostname: sorted(e.info.name for e in facade.engines)}
            assert _reports(run) == {run.hostname: [run.engines[0].info.name]}
        finally:
            run.stop()
        assert _answers(facade, embed, rerank) == (2, 3)
        assert _reports(facade) == {facade.hostname: sorted(e.info.name for e in facade.engines)}
        assert facade.registry.engine_for(rerank).info.name == facade.engines[1].info.name
    finally:
        facade.stop()


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": f"text number {i}"}) + "\n" for i in range(20)))
    return path


@pytest.fixture
def shard_apps() -> Iterator[list[Any]]:
    """The Celery app (one per worker) of each shard task begun in this process, in order: a
    worker traces its tasks with its own app's task objects (``worker.hosting.host.WorkerThreads``)."""
    apps: list[Any] = []

    def began(sender: Any = None, **_: Any) -> None:
        if sender is not None and sender.name == SHARD_TASK:
            apps.append(sender.app)

    task_prerun.connect(began, weak=False)
    try:
        yield apps
    finally:
        task_prerun.disconnect(began)


def _run_job(worker: InProcessWorker, corpus: Path, out: Path, model: Path) -> str:
    handle = Client(app=worker.app).submit_corpus(str(corpus), str(out), model=str(model), shard_rows=5)
    return handle.wait(timeout=JOB_TIMEOUT_S, poll=0.1).status


@pytest.mark.parametrize("run_first", [True, False], ids=["run-then-serve", "serve-then-run"])
def test_a_run_beside_an_embedded_serve_completes_on_its_own_worker(
        run_first: bool, tiny_embed_model: Path, corpus: Path, tmp_path: Path, shard_apps: list[Any]) -> None:
    """Whichever starts first: the serve's worker (roots "nowhere", as ``embedfleet serve`` gives it)
    takes none of the run's shards, and its roots are not the ones the run's shards are checked against.
    Before: with the serve started last, every shard of the run was refused and the job never ended."""
    out = tmp_path / "out"
    run_spec = _spec(tiny_embed_model, roots=StorageRoots.parse(run_roots(str(corpus), str(out), None)))
    serve_spec = _spec(tiny_embed_model, roots=StorageRoots())
    started: list[InProcessWorker] = []
    try:
        for which in ("run", "serve") if run_first else ("serve", "run"):
            started.append(InProcessWorker(run_spec).start() if which == "run"
                           else start_embedded([str(tiny_embed_model)], serve_spec))
        run, serve = started if run_first else started[::-1]
        assert _run_job(run, corpus, out, tiny_embed_model) == "complete"
        assert shard_apps and all(app is run.app for app in shard_apps)  # none ran on the serve's worker
        assert roots_of(serve.app) == StorageRoots() and roots_of(run.app) == run_spec.storage_roots
    finally:
        for worker in started:
            worker.stop()


def test_one_workers_stop_leaves_the_other_workers_shards_alone(tiny_embed_model: Path, corpus: Path,
                                                                tmp_path: Path) -> None:
    """While one worker stops (its flag is set first thing in ``stop``), the other's shard tasks
    run; before, the one process-wide flag rejected and requeued them for as long as it was set."""
    out = tmp_path / "out"
    spec = _spec(tiny_embed_model, roots=StorageRoots.parse(run_roots(str(corpus), str(out), None)))
    stopping, other = InProcessWorker(spec).start(), InProcessWorker(spec).start()
    try:
        stopping.stopping.begin()
        assert not other.stopping.is_set()
        assert _run_job(other, corpus, out, tiny_embed_model) == "complete"
    finally:
        stopping.stopping.reset()
        other.stop()
        stopping.stop()


def test_stop_flags_and_roots_belong_to_their_worker() -> None:
    """One worker's reset leaves another's flag set (before, the first stop to end cleared it for
    every worker still stopping), and each app keeps the roots its worker was given."""
    from celery import Celery

    first, second = Celery("first", set_as_current=False), Celery("second", set_as_current=False)
    stop.of(first).begin()
    stop.of(second).begin()
    stop.of(second).reset()
    assert stop.of(first).is_set() and not stop.of(second).is_set()
    assert stop.of(first) is stop.of(first)
    roots = StorageRoots.parse(["/tmp"])
    use_roots(first, roots)
    use_roots(second, StorageRoots())
    assert roots_of(first) is roots and roots_of(second) == StorageRoots()
    assert roots_of(Celery("third", set_as_current=False)) is None  # no worker: nothing checked


@pytest.mark.parametrize("redis_first", [True, False], ids=["redis-then-memory", "memory-then-redis"])
def test_each_workers_failing_shard_is_counted_and_recorded_on_its_own_broker(
        redis_first: bool, redis_server: Any, tiny_embed_model: Path, corpus: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker on Redis beside an in-memory one (a fleet worker's process with an embedded serve,
    or a test): each counts its shards' deliveries, parks them and records an unwritable output on
    its own broker. Before, the broker was the process's, set by whichever worker started last: with
    the in-memory one last, the Redis worker's deliveries were counted in this process, it ran without
    isolation, and the shard it could not park was recorded in memory, where its job never looked
    (the job never ended); with the Redis one last, the other way round."""
    monkeypatch.setenv("EMBEDFLEET_MAX_DELIVERIES", "2")
    real_read, real_marker = tasks.read_shard, sinks.write_marker

    def corrupt(shard: Any, kind: Any, columns: Any) -> Any:  # bad data: parked at once
        if shard.index == 0:
            raise SourceError("row group 0 is corrupt")
        return real_read(shard, kind, columns)

    def full(out: str, report: Any) -> None:  # ... and its failure marker cannot be written either
        if report.status == "failed":
            raise OSError(28, "No space left on device")
        real_marker(out, report)

    monkeypatch.setattr(tasks, "read_shard", corrupt)
    monkeypatch.setattr(sinks, "write_marker", full)
    started: dict[str, InProcessWorker] = {}
    try:
        for which in ("redis", "memory") if redis_first else ("memory", "redis"):
            broker = redis_server.url if which == "redis" else MEMORY_BROKER
            started[which] = InProcessWorker(_spec(tiny_embed_model), broker=broker, handle_signals=False).start()
        for which, worker in started.items():
            with pytest.raises(JobFailed, match=r"could not be written .*shard 0: .*row group 0 is corrupt"):
                _run_job(worker, corpus, tmp_path / f"out-{which}", tiny_embed_model)
        redis = redis_server.client()
        counts = sorted(int(redis.get(key)) for key in redis.scan_iter("embedfleet:deliveries:*"))
        assert counts == [1, 1, 1, 2]  # the Redis worker's four shards, the bad one delivered twice; none of the other's
        (recorded,) = list(redis.scan_iter("embedfleet:job:*:unwritten"))
        assert list(redis.hgetall(recorded)) == [b"0"]
    finally:
        for worker in started.values():
            worker.stop()
