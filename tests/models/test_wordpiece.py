"""``AsciiWordPiece`` against the Rust tokenizer: the same ids, truncation flags and token counts
for ASCII chunks (every ASCII character, punctuation, words split into pieces, words too long or
with no match, empty and over-long texts), chunks it covers only in part (non-ASCII, control
characters, its own separator, added tokens: those go to Rust and come back in order), a cased
tokenizer, a frame, the bound on words remembered, and a copy sent to a tokenizer process."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer

from bench.workloads import vocabulary
from tests.models.token_lists import as_list, reference
from worker.models.tokenizer import BatchTokenizer, Tokens
from worker.models.wordpiece import AsciiWordPiece

PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def ascii_corpus(seed: int, n: int) -> list[str]:
    """Printable ASCII texts (tab, newline and carriage return are control characters here)."""
    rng = random.Random(seed)
    words = vocabulary()
    odd = ["", "   ", "x" * 101, "q" * 100, "zzqxjkv", "unaffable", "embeddings", "##ing", "don't", "U.S.A.",
           "e-mail@example.com", "3.14159", "MiXeD CaSe", "[cls", "sep]", "[ mask ]", "a" * 5000]
    texts = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.4:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 40)))
        elif kind < 0.7:
            text = "".join(rng.choice("abcXYZ019 " + PUNCT) for _ in range(rng.randint(0, 80)))
        elif kind < 0.9:
            text = "".join(chr(rng.randint(0x20, 0x7e)) for _ in range(rng.randint(0, 60)))
        else:
            text = rng.choice(odd)
        texts.append(text)
    always = ["word " * 300, "MiXeD CaSe Words", "Hello, World!"]  # over-long at every limit; cased
    return texts + always + [f"c{chr(i)}d E{chr(i)}F {chr(i)}" for i in range(0x20, 0x7f)]


class Refuses:
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the Rust tokenizer was called for a chunk the shortcut covers")


@pytest.mark.parametrize("max_length", [12, 64, 256])
def test_ascii_chunks_match_the_rust_tokenizer_without_calling_it(bundled_model: Path, max_length: int) -> None:
    tok = BatchTokenizer(bundled_model, max_length)
    assert tok._wordpiece is not None  # the bundled MiniLM is BERT WordPiece
    for seed in range(4):
        texts = ascii_corpus(seed, 300)
        expected = reference(tok.encode(texts))
        tok._rust_tokens = Refuses()  # type: ignore[method-assign]
        got = tok.encode_tokens(texts)
        del tok._rust_tokens
        assert as_list(got) == expected
        assert got.ids.dtype == np.int32 and got.offsets[-1] == got.ids.shape[0]
        assert got.truncated.any() and not got.truncated.all()


def test_a_chunk_covered_in_part_keeps_its_order(bundled_model: Path) -> None:
    tok = BatchTokenizer(bundled_model, 64)
    others = ["Grüße aus Köln", "tab\tand\nnewline\rreturn", "nul\x00 and \x7f del", "its own \x01 separator",
              "a [CLS] inside", "lower [sep] too", "[MASK]", "你好，世界", "emoji 🤖", "word " * 100 + "é"]
    texts = [t for pair in zip(ascii_corpus(7, len(others)), others) for t in pair] + ["plain end"]
    assert as_list(tok.encode_tokens(texts)) == reference(tok.encode(texts))
    taken, _, _ = tok._wordpiece.content(texts)  # type: ignore[union-attr]
    # cleaned control characters and the separator are covered; non-ASCII and added tokens are not
    assert [texts[i] for i in range(len(texts)) if i not in set(taken.tolist())] == [
        "Grüße aus Köln", "a [CLS] inside", "lower [sep] too", "[MASK]", "你好，世界", "emoji 🤖",
        "word " * 100 + "é"]
    assert as_list(tok.encode_tokens(others)) == reference(tok.encode(others))


def test_inputs_that_are_not_text_still_fail_in_the_tokenizer(bundled_model: Path) -> None:
    tok = BatchTokenizer(bundled_model, 64)
    with pytest.raises(TypeError):
        tok.encode_tokens(["a text", 12345])  # type: ignore[list-item]


def test_a_frame_goes_around_the_cut_content(bundled_model: Path) -> None:
    tok = BatchTokenizer(bundled_model, 24, frame=("judge this:", "answer yes or no"))
    texts = ascii_corpus(3, 100) + ["Grüße"]
    assert as_list(tok.encode_tokens(texts)) == reference(tok.encode(texts))


def _variant(bundled_model: Path, **normalizer: Any) -> Tokenizer:
    config = json.loads((bundled_model / "tokenizer.json").read_text())
    config["normalizer"].update(normalizer)
    config["truncation"] = config["padding"] = None
    return Tokenizer.from_str(json.dumps(config))


def content_ids(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def test_a_cased_tokenizer(bundled_model: Path) -> None:
    cased = _variant(bundled_model, lowercase=False)
    shortcut = AsciiWordPiece.of(cased)
    assert shortcut is not None and not shortcut.lower
    texts = ascii_corpus(11, 300)
    taken, ids, lengths = shortcut.content(texts)
    assert taken.tolist() == list(range(len(texts)))
    flat = np.concatenate([np.asarray(x, dtype=np.int32) for x in content_ids(cased, texts)])
    assert np.array_equal(ids, flat) and lengths.tolist() == [len(x) for x in content_ids(cased, texts)]
    assert any("MiXeD" in t for t in texts) and not np.array_equal(ids, AsciiWordPiece.of(
        _variant(bundled_model)).content(texts)[1])  # type: ignore[union-attr]  # case mattered


def test_only_bert_wordpiece_tokenizers_get_it(bundled_model: Path) -> None:
    assert AsciiWordPiece.of(_variant(bundled_model)) is not None
    assert AsciiWordPiece.of(_variant(bundled_model, clean_text=False)) is None
    config = json.loads((bundled_model / "tokenizer.json").read_text())
    config["pre_tokenizer"] = {"type": "Whitespace"}
    assert AsciiWordPiece.of(Tokenizer.from_str(json.dumps(config))) is None


def test_words_remembered_are_bounded(bundled_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.models import wordpiece

    monkeypatch.setattr(wordpiece, "MAX_REMEMBERED", 10)
    tokenizer = _variant(bundled_model)
    shortcut = AsciiWordPiece.of(tokenizer)
    assert shortcut is not None
    vocabulary_only = len(shortcut.codes)
    rng = random.Random(5)
    texts = [" ".join("".join(rng.choice("bcdfgqxz") for _ in range(9)) for _ in range(5)) for _ in range(200)]
    reference_ids = content_ids(tokenizer, texts)
    first = shortcut.codes
    for _ in range(2):  # the first call fills the words remembered past the bound; the second starts afresh
        _, ids, lengths = shortcut.content(texts)
        assert ids.tolist() == [i for x in reference_ids for i in x]
        assert lengths.tolist() == [len(x) for x in reference_ids]
    assert shortcut.codes is not first and len(first) > vocabulary_only + 10
    assert len(shortcut.codes) <= vocabulary_only + 1 + 5 * len(texts)  # one chunk's words at most


def test_a_copy_for_a_tokenizer_process_gives_the_same_ids(bundled_model: Path) -> None:
    shortcut = AsciiWordPiece.of(_variant(bundled_model))
    assert shortcut is not None
    texts = ascii_corpus(2, 200)
    before = shortcut.content(texts)
    copy = pickle.loads(pickle.dumps(shortcut))
    assert len(copy.codes) < len(shortcut.codes)  # the vocabulary travels, not the words remembered here
    for a, b in zip(before, copy.content(texts)):
        assert np.array_equal(a, b)


def test_tokens_merge_keeps_positions_and_segment_ids() -> None:
    a = Tokens(np.array([1, 2, 3], np.int32), np.array([0, 2, 3]), np.array([False, True]), None, 0)
    b = Tokens(np.array([7, 8], np.int32), np.array([0, 0, 2]), np.array([True, False]),
               np.array([0, 1], np.int32))
    merged = Tokens.merge(4, [(np.array([1, 2]), a), (np.array([0, 3]), b)])
    assert as_list(merged) == [([], [], True), ([1, 2], [0, 0], False), ([3], [0], True), ([7, 8], [0, 1], False)]
    same = Tokens.merge(3, [(np.array([2]), a.__class__(np.array([5], np.int32), np.array([0, 1]),
                                                         np.array([False]), None, 0)), (np.array([0, 1]), a)])
    assert same.type_ids is None and as_list(same) == [([1, 2], [0, 0], False), ([3], [0], True), ([5], [0], False)]


def test_threads_splitting_new_words_at_once_get_their_own_ids(bundled_model: Path) -> None:
    """The engine's tokenize threads share one shortcut: a word split by one thread never takes
    the code of a word another thread split at the same moment."""
    import sys
    import threading

    tokenizer = _variant(bundled_model)
    shortcut = AsciiWordPiece.of(tokenizer)
    assert shortcut is not None
    rng = random.Random(9)
    batches = [[" ".join("".join(rng.choice("bcdfgkmpqxz") for _ in range(7)) for _ in range(8))
                for _ in range(40)] for _ in range(8)]
    got: dict[int, list[int]] = {}
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=lambda k=k: got.__setitem__(k, shortcut.content(batches[k])[1].tolist()))
                   for k in range(len(batches))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        sys.setswitchinterval(interval)
    for k, texts in enumerate(batches):
        assert got[k] == [i for x in content_ids(tokenizer, texts) for i in x]


@pytest.mark.parametrize("max_length", [1, 3])  # (2: the probe for special tokens fails, as before)
def test_a_maximum_with_no_room_for_content_is_the_rust_tokenizers(bundled_model: Path, max_length: int) -> None:
    tok = BatchTokenizer(bundled_model, max_length)
    texts = ["hello world", "", "a"]
    assert as_list(tok.encode_tokens(texts)) == [(e.ids.tolist(), e.type_ids.tolist(), e.truncated)
                                                 for e in tok.encode(texts)]
