"""The process-wide "this worker is stopping" flag.

Set by a stop signal (or ``InProcessWorker.stop``) before the engines stop, so every task that
is caught mid-way gives its shard back to the queue, and an inline call is sent again for
another worker, instead of being failed or parked for a fault that is not its own.
"""

from __future__ import annotations

import threading

_stopping = threading.Event()


def begin_stop() -> None:
    """The worker is shutting down: tasks give their work back instead of failing it."""
    _stopping.set()


def stopping() -> bool:
    return _stopping.is_set()


def reset_stop() -> None:
    _stopping.clear()
