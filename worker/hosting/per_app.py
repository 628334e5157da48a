"""State that belongs to one worker, kept on the Celery app it runs.

Why on the app: two in-process workers (``embedfleet run`` beside an embedded ``serve``) share
the process, so module-level state made one worker's stop or registry the other's. A task, the
inline lane and the remote-control answers all run under their worker's app, so each finds its
own worker's state from that app (``worker.hosting.registry``, ``worker.hosting.stop``, the storage
roots of ``worker.hosting.trust``).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")

_attach_lock = threading.Lock()


def attached(app: Any, attribute: str, make: Callable[[], T]) -> T:
    """``app``'s ``attribute``, made by ``make`` on first use (once, under a lock)."""
    found = getattr(app, attribute, None)
    if found is None:
        with _attach_lock:
            found = getattr(app, attribute, None)
            if found is None:
                found = make()
                setattr(app, attribute, found)
    return found
