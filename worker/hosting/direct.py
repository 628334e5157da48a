"""The embedded facade's way to its engines: the job's inputs handed to its worker's engine in this process.

Through Celery's in-memory transport an embedded call is serialized twice for nothing: the job
to a JSON message and back, the vectors to base64 and back, with a poll of the transport and a
pool thread in between. Here the facade's dispatcher awaits the engine's own future and gets its
numpy rows as they are (``producer.http.coalesce.Answer``). Every limit, check and error is the
facade's as before (admission, deadlines, coalescing, 400/413/429/503/504); only the hop differs.

Token-level jobs (TEI's /tokenize, /decode, /embed_all) still travel as tasks: they are rare and
their answers are not rows.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from producer.errors import EngineStopped
from producer.http.coalesce import Answer
from producer.http.errors import unavailable
from producer.jobs import InlineJob, TokensJob
from worker.hosting.registry import Registry
from worker.hosting.tasks import start_inline


class EngineRunner:
    """``producer.http.dispatch.Runner`` for an embedded facade: the engines of its own worker.

    It holds that worker's registry rather than looking in the process: another worker in the
    same process (``embedfleet run`` beside the facade) hosts, and stops, engines of its own."""

    def __init__(self, engines: Registry) -> None:
        self.engines = engines

    def takes(self, job: InlineJob) -> bool:
        """Whether this job goes to the engine directly (all but token-level jobs)."""
        return not isinstance(job, TokensJob)

    async def run(self, job: InlineJob, timeout: float) -> Answer:
        """The engine's answer to ``job`` within ``timeout`` s (``asyncio.TimeoutError`` after)."""
        # a refusal (bad options, a model not hosted) raises as it is; past the deadline, or once
        # the wait below is cancelled (timeout, the client went away: that cancels the engine's
        # future too), the engine drops what has not run
        future, count = start_inline(job, time.monotonic() + timeout, engines=self.engines)
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except EngineStopped:
            raise unavailable("the server is stopping; retry shortly", "no_worker") from None
        return answer_of(result, count)


def answer_of(result: Any, count: int) -> Answer:
    """An ``EngineResult`` as the facade's ``Answer``: float32 rows, the engine's own lists."""
    values = np.asarray(result.values, dtype=np.float32).reshape(count, -1)
    return Answer(values, list(result.n_tokens), list(result.labels), dict(result.errors),
                  sparse=result.sparse, multivector=result.multivector)
