"""Tokenizer processes (``worker.engine.tokenizing``): the same ``Tokens`` as the in-thread path,
really computed in the children; small chunks stay in-thread; a dead child or a tokenizer error
loses nothing; an engine with processes gives the vectors of one without; an unguarded script
that starts them is not run again in the children; the default count from the cores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from tests.fixtures_extra import make_engine
from worker.engine import tokenizing
from worker.engine.tokenizing import MIN_PROCESS_CHUNK, TokenizerProcesses, default_processes
from worker.models.tokenizer import BatchTokenizer, Tokens

CORPUS = [
    "",
    "hello world",
    "Grüße aus Köln, ça va? Привет, как дела? 你好，世界。こんにちは 안녕하세요 مرحبا",
    "emoji 🤖🚀 and zero\u200bwidth and tabs\tand\nnewlines",
    "word " * 300,  # over-long: cut at the maximum
    "tokens " * 60,
]
TEXTS = (CORPUS * (2 * MIN_PROCESS_CHUNK // len(CORPUS) + 1))[: 2 * MIN_PROCESS_CHUNK]


class Refuses:
    """Stands in for the parent's own tokenizer: any use of it fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"tokenized in the parent ({name}), not in a child process")


def same(a: Tokens, b: Tokens) -> None:
    assert np.array_equal(a.ids, b.ids)
    assert np.array_equal(a.offsets, b.offsets)
    assert np.array_equal(a.truncated, b.truncated)
    assert np.array_equal(a.token_types(), b.token_types())


@pytest.fixture()
def tokenizer(bundled_model: Path) -> BatchTokenizer:
    return BatchTokenizer(bundled_model, 64)


@pytest.fixture()
def processes(tokenizer: BatchTokenizer) -> Iterator[TokenizerProcesses]:
    pool = TokenizerProcesses(tokenizer, 2)
    yield pool
    pool.close()


def test_children_give_the_in_thread_tokens(tokenizer: BatchTokenizer, processes: TokenizerProcesses) -> None:
    pids = processes.wait_ready()
    assert len(set(pids)) == 2 and os.getpid() not in pids
    processes.tokenizer = Refuses()  # type: ignore[assignment]
    same(processes.encode_tokens(TEXTS), tokenizer.encode_tokens(TEXTS))
    pairs = [(text, "a document") for text in TEXTS]
    same(processes.encode_tokens(pairs), tokenizer.encode_tokens(pairs))
    ids = [[101, 7592, 2088, 102], [7592] * 100, [2088]] * MIN_PROCESS_CHUNK
    same(processes.encode_ids_tokens(ids), tokenizer.encode_ids_tokens(ids))
    assert not processes.broken


def test_a_small_chunk_stays_in_the_calling_thread(tokenizer: BatchTokenizer,
                                                   processes: TokenizerProcesses) -> None:
    calls: list[int] = []

    class Spy:
        def encode_tokens(self, values: Any) -> Tokens:
            calls.append(len(values))
            return tokenizer.encode_tokens(values)

    processes.tokenizer = Spy()  # type: ignore[assignment]
    same(processes.encode_tokens(CORPUS), tokenizer.encode_tokens(CORPUS))
    assert calls == [len(CORPUS)]


def test_a_killed_child_loses_nothing(tokenizer: BatchTokenizer) -> None:
    pool = TokenizerProcesses(tokenizer, 1)
    try:
        (pid,) = pool.wait_ready()
        os.kill(pid, signal.SIGKILL)
        same(pool.encode_tokens(TEXTS), tokenizer.encode_tokens(TEXTS))  # done in-thread instead
        assert pool.broken
        same(pool.encode_tokens(TEXTS), tokenizer.encode_tokens(TEXTS))
    finally:
        pool.close()


def test_a_thread_waiting_for_a_child_when_the_pool_closes_tokenizes_itself(tokenizer: BatchTokenizer) -> None:
    pool = TokenizerProcesses(tokenizer, 1)
    pool.wait_ready()
    held = pool._idle.get()  # the only child is busy elsewhere
    got: list[Tokens] = []
    waiter = threading.Thread(target=lambda: got.append(pool.encode_tokens(TEXTS)), daemon=True)
    waiter.start()
    pool.close()
    waiter.join(60)
    assert not waiter.is_alive() and len(got) == 1
    same(got[0], tokenizer.encode_tokens(TEXTS))
    assert held.process.wait(10) is not None  # closed with the pool


def test_a_tokenizer_error_reaches_the_caller_and_the_child_stays(tokenizer: BatchTokenizer,
                                                                  processes: TokenizerProcesses) -> None:
    with pytest.raises(TypeError):
        processes.encode_tokens([12345] * MIN_PROCESS_CHUNK)
    processes.tokenizer = Refuses()  # type: ignore[assignment]
    same(processes.encode_tokens(TEXTS), tokenizer.encode_tokens(TEXTS))
    assert not processes.broken


def test_an_engine_with_processes_gives_the_same_results(tiny_embed_model: Path) -> None:
    texts = [f"text number {i} " + "word " * (i % 40) for i in range(300)] + ["", "   "] + ["long " * 400] * 3
    results = {}
    for count in (0, 2):
        # 303 valid texts in chunks of 101: each big enough to go to a child
        engine = make_engine(tiny_embed_model, max_batch_tokens=512, tokenize_processes=count, tokenize_chunk=101)
        try:
            assert (engine.tokenizer_processes is not None) == bool(count)
            if count:
                engine.tokenizer_processes.tokenizer = Refuses()  # type: ignore[union-attr]
            results[count] = engine.run(texts, timeout=120)
        finally:
            engine.stop()
    a, b = results[0], results[2]
    assert a.n_tokens == b.n_tokens and a.truncated == b.truncated and a.errors == b.errors
    assert sorted(a.errors) == [300, 301]
    np.testing.assert_allclose(a.values, b.values, atol=1e-5)


def test_an_unguarded_script_is_not_run_again_in_the_children(bundled_model: Path, tmp_path: Path) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        from pathlib import Path
        from worker.engine.tokenizing import TokenizerProcesses
        from worker.models.tokenizer import BatchTokenizer
        print("script body ran", flush=True)
        pool = TokenizerProcesses(BatchTokenizer(Path({str(bundled_model)!r}), 64), 2)
        print(len(pool.wait_ready()), "children", pool.encode_tokens(["a text"] * 100).ids.size, flush=True)
        pool.close()
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(tokenizing.__file__).parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["script body ran", "2 children 400"]


def test_the_default_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMBEDFLEET_TOKENIZE_PROCESSES", raising=False)
    assert default_processes(accelerated=True, cores=16) == 14
    assert default_processes(accelerated=True, cores=2) == 0  # the engine's own threads need them
    assert default_processes(accelerated=False, cores=16) == 0  # a CPU model needs its cores
    monkeypatch.setenv("EMBEDFLEET_TOKENIZE_PROCESSES", "3")
    assert default_processes(accelerated=False, cores=2) == 3
    monkeypatch.setenv("EMBEDFLEET_TOKENIZE_PROCESSES", "0")
    assert default_processes(accelerated=True, cores=16) == 0
