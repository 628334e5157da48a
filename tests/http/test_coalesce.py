"""Coalescing: merge and split are inverse, and the scheduler sends alone when idle, merges when busy,
isolates a failing request, and never sends a request whose client stopped waiting.

The scheduler is driven by a recording ``run`` here (its logic, step by step); the whole path with
a real Redis and a real worker is covered by the 64-client tests in test_clients.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from producer.http.coalesce import Answer, Coalescer, merge, merge_key, split
from producer.errors import BadInput
from producer.http.errors import bad, status_of
from producer.jobs import ClassifyJob, EmbedJob, Options, RerankJob


def job(*texts: Any, **options: Any) -> EmbedJob:
    return EmbedJob(model="m", inputs=list(texts), options=Options(**options))


def answer_for(merged: EmbedJob, bad_word: str | None = None) -> Answer:
    """Row i holds (i, len(input i)); inputs equal to ``bad_word`` are per-item errors."""
    values = np.array([[i, len(str(x))] for i, x in enumerate(merged.inputs)], dtype=np.float32)
    errors = {i: f"input {i}: bad" for i, x in enumerate(merged.inputs) if x == bad_word}
    return Answer(values, [len(str(x)) for x in merged.inputs], [], errors)


def test_merge_keys_separate_what_cannot_share_a_job() -> None:
    assert merge_key(job("a")) == merge_key(job("b", "c"))
    assert merge_key(job("a")) != merge_key(job("a", dimensions=8))
    assert merge_key(job("a")) != merge_key(job([1, 2]))
    assert merge_key(job("a")) != merge_key(ClassifyJob(model="m", inputs=["a"]))
    assert merge_key(RerankJob(model="m", query="q", documents=["d"])) is None


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=8), data=st.data())
def test_split_undoes_merge(sizes: list[int], data: st.DataObject) -> None:
    jobs = [job(*[f"j{j}-{k}" for k in range(n)]) for j, n in enumerate(sizes)]
    merged = merge(jobs)
    assert merged.inputs == [x for j in jobs for x in j.inputs] and merged.options == jobs[0].options
    failed = data.draw(st.sets(st.integers(0, sum(sizes) - 1)))
    whole = answer_for(merged)
    whole.errors = {i: f"input {i}: bad" for i in failed}
    parts = split(whole, sizes)
    start = 0
    for part, n in zip(parts, sizes):
        np.testing.assert_array_equal(part.values, whole.values[start:start + n])
        assert part.n_tokens == whole.n_tokens[start:start + n]
        assert part.errors == {i - start: whole.errors[i] for i in failed if start <= i < start + n}
        start += n


class Recorder:
    """A ``run`` that records every job sent and answers when the test opens the gate."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.sent: list[list[Any]] = []
        self.gate = asyncio.Event()
        self.fail_on = fail_on

    async def __call__(self, sent: Any, queue: str, deadline: float) -> Answer:
        self.sent.append(list(sent.inputs))
        await self.gate.wait()
        if self.fail_on in sent.inputs:
            raise bad(f"the worker rejected {self.fail_on!r}")
        return answer_for(sent)


def retry_client_errors(exc: BaseException) -> bool:
    return isinstance(exc, BadInput) and status_of(exc)[0] == 400


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_idle_sends_alone_busy_merges_and_each_gets_its_rows() -> None:
    async def scenario() -> None:
        run = Recorder()
        coalescer = Coalescer(run, retry_client_errors)
        deadline = asyncio.get_running_loop().time() + 30
        first = asyncio.create_task(coalescer.submit(job("a"), "q", 1, deadline))
        await settle()
        assert run.sent == [["a"]]  # nothing in flight: sent at once, alone
        rest = [asyncio.create_task(coalescer.submit(job(f"b{i}", f"bb{i}"), "q", 1, deadline)) for i in range(3)]
        await settle()
        assert run.sent == [["a"]] and coalescer.waiting("q") == 3  # the one slot is taken: they wait
        run.gate.set()
        answers = await asyncio.gather(first, *rest)
        assert run.sent == [["a"], ["b0", "bb0", "b1", "bb1", "b2", "bb2"]]  # then leave as one job
        assert answers[0].values.tolist() == [[0, 1]]
        for i, got in enumerate(answers[1:]):  # rows come back to the request that sent them
            assert got.values[:, 0].tolist() == [2 * i, 2 * i + 1] and got.n_tokens == [2, 3]

    asyncio.run(scenario())


def test_merging_respects_options_and_size_caps() -> None:
    async def scenario() -> None:
        run = Recorder()
        coalescer = Coalescer(run, retry_client_errors, max_inputs=3)
        deadline = asyncio.get_running_loop().time() + 30
        tasks = [asyncio.create_task(coalescer.submit(j, "q", 1, deadline))
                 for j in (job("x"), job("a", "b"), job("c", dimensions=4), job("d"), job("e"))]
        await settle()
        run.gate.set()
        await asyncio.gather(*tasks)
        assert run.sent == [["x"], ["a", "b", "d"], ["c"], ["e"]]

    asyncio.run(scenario())


def test_a_failing_merged_job_is_resent_per_request() -> None:
    async def scenario() -> None:
        run = Recorder(fail_on="poison")
        coalescer = Coalescer(run, retry_client_errors)
        deadline = asyncio.get_running_loop().time() + 30
        first = asyncio.create_task(coalescer.submit(job("a"), "q", 1, deadline))
        await settle()
        waiting = [asyncio.create_task(coalescer.submit(job(t), "q", 1, deadline)) for t in ("b", "poison", "c")]
        await settle()
        run.gate.set()
        results = await asyncio.gather(first, *waiting, return_exceptions=True)
        assert run.sent == [["a"], ["b", "poison", "c"], ["b"], ["poison"], ["c"]]
        assert isinstance(results[2], BadInput) and status_of(results[2])[0] == 400
        assert [r.values.tolist() for i, r in enumerate(results) if i != 2] == [[[0, 1]]] * 3

    asyncio.run(scenario())


def test_a_request_that_times_out_while_waiting_is_never_sent() -> None:
    async def scenario() -> None:
        run = Recorder()
        coalescer = Coalescer(run, retry_client_errors)
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(coalescer.submit(job("a"), "q", 1, loop.time() + 30))
        await settle()
        with pytest.raises(asyncio.TimeoutError):
            await coalescer.submit(job("late"), "q", 1, loop.time() + 0.05)
        run.gate.set()
        await first
        await settle()
        assert run.sent == [["a"]]

    asyncio.run(scenario())


class DeadlineRecorder:
    """A ``run`` that honours its deadline as a real send does (``TimeoutError`` past it), answers
    when the test opens the gate of that call, and records what it was given and how it ended."""

    def __init__(self) -> None:
        self.sent: list[tuple[list[Any], float]] = []
        self.gates: list[asyncio.Event] = []
        self.ended: list[str] = []

    async def __call__(self, sent: Any, queue: str, deadline: float) -> Answer:
        self.sent.append((list(sent.inputs), deadline))
        gate = asyncio.Event()
        self.gates.append(gate)
        try:
            await asyncio.wait_for(gate.wait(), max(0.0, deadline - asyncio.get_running_loop().time()))
        except asyncio.CancelledError:
            self.ended.append("cancelled")
            raise
        except asyncio.TimeoutError:
            self.ended.append("timed out")
            raise
        self.ended.append("answered")
        return answer_for(sent)


def test_a_request_merged_into_an_older_one_keeps_its_own_deadline() -> None:
    """An older request (short deadline) and a newer one (long deadline) leave merged: the job
    runs until the newer one's deadline, the older one times out at its own (a 504) and the newer
    one gets its rows when the answer comes after that."""
    async def scenario() -> None:
        run = DeadlineRecorder()
        coalescer = Coalescer(run, retry_client_errors)
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(coalescer.submit(job("a"), "q", 1, loop.time() + 30))
        await settle()
        older_deadline, newer_deadline = loop.time() + 0.3, loop.time() + 30
        older = asyncio.create_task(coalescer.submit(job("old"), "q", 1, older_deadline))
        newer = asyncio.create_task(coalescer.submit(job("new", "newer"), "q", 1, newer_deadline))
        await settle()
        run.gates[0].set()
        await first
        await settle()
        assert [inputs for inputs, _ in run.sent] == [["a"], ["old", "new", "newer"]]
        assert run.sent[1][1] == newer_deadline, "the merged job took the older request's deadline"
        with pytest.raises(asyncio.TimeoutError):
            await older
        assert not newer.done()
        run.gates[1].set()
        got = await newer
        assert got.values[:, 0].tolist() == [1, 2] and got.n_tokens == [3, 5]
        assert run.ended == ["answered", "answered"]

    asyncio.run(scenario())


def test_a_job_nobody_waits_for_any_more_is_cancelled() -> None:
    """Every request of a sent job stopped waiting (timed out, or its client went away): the
    job's run is cancelled, not left running until its own deadline."""
    async def scenario() -> None:
        run = DeadlineRecorder()
        coalescer = Coalescer(run, retry_client_errors)
        loop = asyncio.get_running_loop()
        with pytest.raises(asyncio.TimeoutError):  # the run's own deadline is far: only the wait ends
            await coalescer.submit(job("gone"), "q", 1, loop.time() + 0.2)
        await settle()
        assert run.ended == ["cancelled"]
        waiter = asyncio.create_task(coalescer.submit(job("client leaves"), "q", 1, loop.time() + 30))
        await settle()
        waiter.cancel()  # what a disconnect does to the request's handler
        for _ in range(4):
            await settle()
        assert run.ended == ["cancelled", "cancelled"]
        assert coalescer.lanes["q"].inflight == 0

    asyncio.run(scenario())


def requests_per_job(url: str) -> tuple[float, float]:
    import re

    import httpx

    text = httpx.get(f"{url}/metrics").text
    found = dict(re.findall(r"^embedfleet_requests_per_job_(sum|count) (\S+)$", text, re.M))
    return float(found["sum"]), float(found["count"])


@pytest.mark.parametrize("mode", ["embedded", "thin"])
def test_concurrent_requests_with_different_options_are_never_merged(mode: str, request: Any) -> None:
    """Through real HTTP and a real worker: 64 concurrent requests in four option sets, merged
    into shared jobs while the worker is busy, each answered exactly as when sent alone."""
    import httpx

    served = request.getfixturevalue(mode)
    variants: list[dict[str, Any]] = [{}, {"dimensions": 8}, {"normalize": False}, {"dimensions": 8, "normalize": False}]
    bodies = [{"input": f"text {i % 8} of the burst", "model": served.embed, **variants[i % 4]} for i in range(64)]
    alone = {}
    for body in bodies[:8]:  # every (text, options) pair once (i % 8 fixes both), one at a time
        response = httpx.post(f"{served.url}/v1/embeddings", json=body, timeout=60)
        assert response.status_code == 200, response.text
        alone[repr(sorted(body.items()))] = response.json()["data"][0]["embedding"]
    before = requests_per_job(served.url)

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=served.url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(client.post("/v1/embeddings", json=b) for b in bodies))

    responses = asyncio.run(burst())
    after = requests_per_job(served.url)
    assert after[0] - before[0] == 64
    assert after[1] - before[1] < 64, "no request was merged: the test did not exercise merging"
    for body, response in zip(bodies, responses):
        assert response.status_code == 200, response.text
        got = response.json()["data"][0]["embedding"]
        np.testing.assert_allclose(got, alone[repr(sorted(body.items()))], rtol=1e-5, atol=1e-6)
        assert len(got) == body.get("dimensions", len(got))


def test_a_workers_answer_decodes_as_the_result_model_says() -> None:
    """``Answer.from_wire`` reads dense answers without the model; what it gives equals the model's
    decoding, and every other answer (an error, sparse rows, odd fields) goes through the model."""
    from producer.errors import ModelNotServed
    from producer.jobs import InlineResult, JobKind
    from worker.hosting.tasks import inline_answer

    class Result:
        def __init__(self, values: np.ndarray, errors: dict[int, str], labels: list[str]) -> None:
            self.values, self.errors, self.labels = values, errors, labels
            self.n_tokens, self.truncated = [3 + i for i in range(len(values))], [False] * len(values)
            self.outputs = ("dense",)

    rng = np.random.default_rng(3)
    for rows, errors, labels in ((1, {}, []), (4, {2: "input 2: empty"}, []), (3, {}, ["neg", "pos"])):
        value = inline_answer(job(*["t"] * rows), rows, Result(rng.random((rows, 8), dtype=np.float32), errors, labels))
        got, want = Answer.from_wire(value), Answer.of(InlineResult.model_validate(value))
        np.testing.assert_array_equal(got.values, want.values)
        assert (got.n_tokens, got.labels, got.errors) == (want.n_tokens, want.labels, want.errors) == \
            ([3 + i for i in range(rows)], labels, errors)
        assert got.values.dtype == np.float32 and got.values.shape == (rows, 8)
    refused = InlineResult(kind=JobKind.embed, model="m", error=ModelNotServed("not here").to_wire()).model_dump(mode="json")
    with pytest.raises(ModelNotServed):
        Answer.from_wire(refused)
    sparse = InlineResult(kind=JobKind.embed, model="m", n_items=1, outputs=["sparse"], sparse_counts=[0],
                          vocab_size=10).model_dump(mode="json")
    assert Answer.from_wire(sparse).sparse is not None
    short = dict(inline_answer(job("t"), 1, Result(np.ones((1, 8), np.float32), {}, [])), dims=9)  # 8 floats for 9
    with pytest.raises(ValueError):
        Answer.from_wire(short)
