"""One worker's "this worker is stopping" flag.

Set by a stop signal (or ``InProcessWorker.stop``) before the engines stop, so every task that
is caught mid-way gives its shard back to the queue, and an inline call is sent again for
another worker, instead of being failed or parked for a fault that is not its own.

The flag belongs to a worker, not to the process: with two in-process workers (``embedfleet
run`` beside an embedded ``serve``), a process-wide flag made the stop of one reject and requeue
the other's shards and re-send its failed calls, and the first stop to finish cleared the flag
of another worker still stopping. A task finds its worker's flag through the Celery app it runs
under (``of``), as it finds its engines (``worker.hosting.registry``).
"""

from __future__ import annotations

import threading
from typing import Any

from worker.hosting.per_app import attached

#: the attribute of a Celery app that holds its worker's flag
_APP_ATTRIBUTE = "embedfleet_stop"


class StopFlag:
    """Whether one worker is stopping: set at the start of its stop, cleared at its end."""

    def __init__(self) -> None:
        self._stopping = threading.Event()

    def begin(self) -> None:
        """The worker is shutting down: its tasks give their work back instead of failing it."""
        self._stopping.set()

    def is_set(self) -> bool:
        """Whether the worker is stopping."""
        return self._stopping.is_set()

    def reset(self) -> None:
        """The stop is over (the worker may be started again)."""
        self._stopping.clear()


def of(app: Any) -> StopFlag:
    """The flag of the worker running ``app`` (a Celery app), made on first use; an app no worker
    runs on has one that is never set."""
    return attached(app, _APP_ATTRIBUTE, StopFlag)
