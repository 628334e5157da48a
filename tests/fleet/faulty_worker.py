"""`embedfleet` with test-only faults in its shard task, for the fleet tests (run as a script).

* A shard holding ``KILL_MARK`` in a text makes its process exit at once (``os._exit``, like a
  native crash or the kernel's OOM killer), as soon as another shard runs beside it in the process,
  or after ``ALONE_S`` seconds alone: the poison shard that takes its innocent neighbours down.
* A shard holding ``SLOW_MARK`` reads forever in Python (a loop of short sleeps): a slow source
  that a soft time limit can interrupt.
* A shard holding ``BLOCK_MARK`` never returns from reading its source: the thread waits on an
  event nobody sets (a C-level wait no exception reaches, like a hung network read or a FIFO).

Only tests start workers through this script; the package itself carries no fault hook.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from worker.cli import main  # first: sets OpenMP up before torch loads, as the console script does
import worker.hosting.tasks as tasks

KILL_MARK = "embedfleet-test-kill-this-worker"
BLOCK_MARK = "embedfleet-test-block-this-read"
SLOW_MARK = "embedfleet-test-read-this-slowly"
ALONE_S = 1.0

_inside = [0]
_lock = threading.Lock()
_real_read = tasks.read_shard
_real_run = tasks.run_shard


def run_shard(payload: dict[str, Any], deliveries: int = 1, **worker: Any) -> dict[str, Any]:
    with _lock:
        _inside[0] += 1
    try:
        return _real_run(payload, deliveries=deliveries, **worker)  # the worker's engines and roots
    finally:
        with _lock:
            _inside[0] -= 1


def read_shard(*args: Any, **kwargs: Any) -> Any:
    rows = _real_read(*args, **kwargs)
    texts = [str(value) for value in rows.values]
    if any(KILL_MARK in text for text in texts):
        deadline = time.monotonic() + ALONE_S
        while time.monotonic() < deadline and _inside[0] < 2:
            time.sleep(0.005)
        print(f"faulty_worker: poison shard read; exiting with {_inside[0] - 1} other shard(s) running", flush=True)
        os._exit(70)
    if any(BLOCK_MARK in text for text in texts):
        print("faulty_worker: blocking this read forever", flush=True)
        threading.Event().wait()
    if any(SLOW_MARK in text for text in texts):
        print("faulty_worker: reading this slowly, forever", flush=True)
        while True:
            time.sleep(0.05)
    return rows


tasks.read_shard = read_shard
tasks.run_shard = run_shard

if __name__ == "__main__":
    main()
