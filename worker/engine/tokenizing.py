"""Tokenization in worker processes, so the Python side of the Rust tokenizer leaves the engine's GIL.

Why: the Rust tokenizer's batch call spreads the text work over the cores outside the GIL, but
what it hands back is one Python ``Encoding`` per input, and reading each one's ids builds a
Python list: per-text work under the engine process's one GIL, beside the threads that form,
launch and deliver batches. On a fast GPU with short texts that serial part sets the rate (the
engine with no maths reached 1.83M tokens/s on the H200 machine's 16 cores, bench/RESULTS-host.md,
while MiniLM's forward alone runs at ~7.9M). Here each chunk goes to one of ``processes`` spawned
processes that each hold a copy of the tokenizer (pickled: its JSON and settings, no
transformers import), tokenize it single-threaded and send back ``Tokens``: a few flat numpy
arrays, whatever the number of texts. The engine process pickles the strings out (one C pass)
and unpickles the arrays in, so no Python object per text is made there. For BERT WordPiece
models a child's work is mostly Python too (``worker.models.wordpiece``: ~4-5 µs a short text,
against ~35-44 µs for the Rust call; the round trip costs the calling thread ~0.4-0.6 µs a text,
``bench/tokenize_stages.py``), which is one more reason it runs outside the engine process.

The processes are fresh interpreters (``python -c``, not forked: the engine process runs CUDA and
threads; and not multiprocessing's spawn, which re-runs the parent's main script in each child,
so an unguarded script would start its worker again there), started with the engine, so the
first request does not pay their start. They speak length-prefixed pickles over their stdin and
stdout, and end when their stdin closes (the engine stopped, or its process died). Small chunks (an inline
call of a few texts) stay in the calling thread, where a round trip to another process would only
add latency. A pool whose process died is not used again: its chunks, and all later ones, are
tokenized in the calling thread (logged once), so a lost process never fails a request.

This module must not import the device side (``worker.backends``): it only moves tokenization.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import subprocess
import sys
import threading
from typing import IO, Any, Sequence

from producer.settings import set_env, settings
from worker.models.tokenizer import BatchTokenizer, Tokens

log = logging.getLogger(__name__)

#: Chunks of fewer inputs are tokenized in the calling thread: the round trip to a process
#: (~0.1-0.3 ms) is worth paying only when the chunk's own work is several times that.
MIN_PROCESS_CHUNK = 64

#: Inputs per chunk when processes tokenize (the engine's default then): each chunk runs
#: single-threaded in one process, so a request of 1,000 texts should still spread over several.
PROCESS_CHUNK = 256

#: Cores left to the engine process itself (its device, preparing and delivering threads).
KEPT_CORES = 2

#: Fewest cores on which processes pay: below this the engine's own threads need them all.
MIN_CORES = 4

#: What a child runs: the parent's import path first, then ``serve``.
_BOOT = ("import sys, pickle; sys.path[:0] = pickle.loads(bytes.fromhex(sys.argv[1])); "
         "from worker.engine.tokenizing import serve; serve()")


def available_cores() -> int:
    """The cores this process may run on (its affinity: an engine pinned to a share sees that share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def default_processes(accelerated: bool, cores: int | None = None) -> int:
    """How many tokenizer processes an engine runs: ``EMBEDFLEET_TOKENIZE_PROCESSES`` if set, else
    all but ``KEPT_CORES`` of the cores for an engine whose model runs on an accelerator (a GPU)
    on ``MIN_CORES`` or more, else none. A CPU backend (OpenVINO's streams included) needs its
    cores for the model itself, so it tokenizes in threads as before."""
    chosen = settings().tokenize_processes
    if chosen is not None:
        return chosen
    cores = available_cores() if cores is None else cores
    if not accelerated or cores < MIN_CORES:
        return 0
    return cores - KEPT_CORES


# ---------------------------------------------------------------------------------- the wire
def _send(stream: IO[bytes], message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(len(data).to_bytes(8, "little") + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    header = stream.read(8)
    if len(header) < 8:
        raise EOFError("the other side closed the pipe")
    size = int.from_bytes(header, "little")
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the other side closed the pipe mid-message")
    return pickle.loads(data)


def serve() -> None:
    """A child's loop: read the tokenizer, then answer ``(as_ids, values)`` with ``("ok", Tokens)``
    or ``("error", exception)`` until stdin closes. Single-threaded: the processes are the
    parallelism (each one's own Rust pool would oversubscribe the cores)."""
    set_env("TOKENIZERS_PARALLELISM", "false")
    inbox, outbox = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print must not corrupt the answers
    tokenizer: BatchTokenizer = _receive(inbox)
    _send(outbox, ("ready", os.getpid()))
    while True:
        try:
            as_ids, values = _receive(inbox)
        except EOFError:
            return
        try:
            tokens = tokenizer.encode_ids_tokens(values) if as_ids else tokenizer.encode_tokens(values)
            answer: tuple[str, Any] = ("ok", tokens)
        except Exception as exc:  # the engine fails the request with it, as it would in-thread
            answer = ("error", exc)
        try:
            _send(outbox, answer)
        except (pickle.PicklingError, TypeError, AttributeError):
            _send(outbox, ("error", RuntimeError(f"{type(answer[1]).__name__}: {answer[1]}")))


class ChildLost(Exception):
    """A tokenizer process is gone (its pipes broke or closed): the pool is not used again."""


class _Child:
    """One tokenizer process and its two pipes; used by one thread at a time."""

    def __init__(self, tokenizer_blob: bytes) -> None:
        path = pickle.dumps([p for p in sys.path if p]).hex()
        self.process = subprocess.Popen([sys.executable, "-c", _BOOT, path], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE)
        assert self.process.stdin is not None and self.process.stdout is not None
        self._in, self._out = self.process.stdin, self.process.stdout
        self._in.write(len(tokenizer_blob).to_bytes(8, "little") + tokenizer_blob)
        self._in.flush()
        self.pid: int | None = None
        self._started = threading.Lock()

    def ready(self) -> int:
        """Wait for the child's "ready" (once); ``ChildLost`` if it died first."""
        with self._started:
            if self.pid is None:
                kind, pid = self._talk(None)
                if kind != "ready":
                    raise ChildLost(f"the tokenizer process said {kind!r} instead of 'ready'")
                self.pid = pid
        return self.pid

    def encode(self, values: list[Any], as_ids: bool) -> Tokens:
        """The child's ``Tokens`` for ``values``; the tokenizer's own error is raised as it was there."""
        self.ready()
        kind, payload = self._talk((as_ids, values))
        if kind == "error":
            raise payload
        return payload

    def _talk(self, message: Any) -> Any:
        """Send ``message`` (None: nothing) and read the answer; any pipe failure is ``ChildLost``."""
        try:
            if message is not None:
                _send(self._in, message)
            return _receive(self._out)
        except (OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:  # ValueError: a closed pipe
            raise ChildLost(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        for stream in (self._in, self._out):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()


class TokenizerProcesses:
    """``BatchTokenizer.encode_tokens`` / ``encode_ids_tokens`` run in ``processes`` child processes.

    Thread-safe: the engine's tokenize threads call it concurrently; each takes an idle child,
    waits for its answer (the GIL released meanwhile) and gives it back.
    """

    def __init__(self, tokenizer: BatchTokenizer, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        self.tokenizer = tokenizer
        self.processes = processes
        self._lock = threading.Lock()
        blob = pickle.dumps(tokenizer, protocol=pickle.HIGHEST_PROTOCOL)
        self._children = [_Child(blob) for _ in range(processes)]
        self._idle: queue.Queue[_Child | None] = queue.Queue()
        for child in self._children:
            self._idle.put(child)
        self._broken = False

    def wait_ready(self) -> list[int]:
        """Wait until every process has loaded the tokenizer; their process ids (none if one died
        first: the pool is given up and the engine's threads tokenize)."""
        pids = []
        for child in list(self._children):
            try:
                pids.append(child.ready())
            except ChildLost as exc:
                self._give_up(exc)
                return []
        return pids

    @property
    def broken(self) -> bool:
        """Whether the processes were given up (one died): chunks are tokenized in-thread since."""
        return self._broken

    def encode_tokens(self, values: Sequence[Any]) -> Tokens:
        return self._run(values, as_ids=False)

    def encode_ids_tokens(self, values: Sequence[Any]) -> Tokens:
        return self._run(values, as_ids=True)

    def _run(self, values: Sequence[Any], as_ids: bool) -> Tokens:
        if not self._broken and len(values) >= MIN_PROCESS_CHUNK:
            child = self._idle.get()
            if child is None:  # the pool closed while this thread waited: pass the word on
                self._idle.put(None)
            else:
                try:
                    tokens = child.encode(values if isinstance(values, list) else list(values), as_ids)
                except ChildLost as exc:  # the child died: never trust the pool again
                    self._give_up(exc)
                except BaseException:  # the tokenizer's own error, raised there: the child is fine
                    self._idle.put(child)
                    raise
                else:
                    self._idle.put(child)
                    return tokens
        local = self.tokenizer
        return local.encode_ids_tokens(values) if as_ids else local.encode_tokens(values)

    def _give_up(self, error: BaseException) -> None:
        with self._lock:
            if self._broken:
                return
            self._broken = True
        log.warning("a tokenizer process failed (%s: %s); tokenizing in the engine's threads from now on",
                    type(error).__name__, error)
        self.close()

    def close(self) -> None:
        """End the processes (their stdin closes, so they exit). Threads waiting for an idle child
        get a ``None`` instead (passed on to the next waiter) and tokenize in their own thread."""
        with self._lock:
            self._broken = True
            children, self._children = self._children, []
        self._idle.put(None)
        for child in children:
            child.close()
