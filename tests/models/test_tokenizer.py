"""The columnar tokenizer path (``Tokens``) against the per-text one (``Encoded``): the same ids,
segment ids, truncation flags and token counts on a corpus with empty, over-long, multilingual,
pair, framed and token-id inputs (the engine runs only the columnar one)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.models.token_lists import as_list, reference
from worker.models.tokenizer import AsciiShortcut, BatchTokenizer
from worker.models.wordpiece import AsciiWordPiece

CORPUS = [
    "",
    "   ",
    "hello world",
    "Grüße aus Köln, ça va? ¿Qué tal? Привет, как дела? 你好，世界。こんにちは 안녕하세요 مرحبا",
    "emoji 🤖🚀 and zero\u200bwidth and tabs\tand\nnewlines",
    "word " * 300,  # over-long: cut at the maximum
    "x" * 2000,
    "tokens " * 60,  # near the limit
]


@pytest.mark.parametrize("max_length", [64, 256])
def test_texts_match_the_per_text_path(bundled_model: Path, max_length: int) -> None:
    tok = BatchTokenizer(bundled_model, max_length)
    got = tok.encode_tokens(CORPUS)
    assert as_list(got) == reference(tok.encode(CORPUS))
    assert got.lengths.tolist() == [e.n_tokens for e in tok.encode(CORPUS)]
    assert got.truncated.any() and not got.truncated.all()  # the corpus exercises both
    assert got.ids.dtype == np.int32 and got.offsets[-1] == got.ids.shape[0]


def test_an_input_exactly_at_the_limit_is_not_truncated(bundled_model: Path) -> None:
    tok = BatchTokenizer(bundled_model, 12)
    exact = " ".join(["word"] * 10)  # [CLS] + 10 + [SEP] = 12
    got = tok.encode_tokens([exact, exact + " word"])
    assert got.lengths.tolist() == [12, 12] and got.truncated.tolist() == [False, True]


def test_pairs_keep_their_segment_ids(bundled_model: Path) -> None:
    tok = BatchTokenizer(bundled_model, 48)
    pairs = [("a query", "a document " * 40), ("¿qué?", "réponse courte"), ("q", "")]
    got = tok.encode_tokens(pairs)
    assert got.type_ids is not None and set(got.type_ids.tolist()) == {0, 1}
    assert as_list(got) == reference(tok.encode(pairs))


def test_framed_inputs_match(bundled_model: Path) -> None:
    tok = BatchTokenizer(bundled_model, 40, frame=("judge this:", "answer yes or no"))
    assert as_list(tok.encode_tokens(CORPUS)) == reference(tok.encode(CORPUS))


def test_token_ids_match_the_per_input_path(bundled_model: Path) -> None:
    tok = BatchTokenizer(bundled_model, 32)
    cls_, sep = tok.encode(["x"])[0].ids[[0, -1]].tolist()
    inputs = [[2088], [cls_, 2088, 2003, sep], [cls_, 2088], [2088, sep], [2088] * 100, list(range(1000, 1030)),
              [cls_, *range(1000, 1040), sep]]
    got = tok.encode_ids_tokens(inputs)
    assert as_list(got) == reference(tok.encode_ids(inputs))
    assert got.truncated.tolist() == [False, False, False, False, True, False, True]


def test_an_empty_batch(bundled_model: Path) -> None:
    tok = BatchTokenizer(bundled_model, 32)
    for got in (tok.encode_tokens([]), tok.encode_ids_tokens([])):
        assert len(got) == 0 and got.ids.shape == (0,) and got.offsets.tolist() == [0]


# ------------------------------------------------------------------ the ASCII shortcut
ASCII_CORPUS = [
    "Hello World", "MiXeD CaSe and PUNCT!?,.;:'\"()[]{}<>@#$%^&*_-+=~`|\\/", "",
    "tab\there\nnewline\rreturn \x00nul\x01\x0b\x0c\x1f\x7fend",
    "a[CLS]b", "x[cls]y", "[MASK] at the start", "ends with [SEP]", "[UnK]", "[pad]ding",
    "word " * 300,  # over-long
    "snake_case CamelCase ALLCAPS 123 4.56 e-mail@example.com https://x.y/z?q=1",
    *[f"c{chr(i)}d E{chr(i)}F {chr(i)}" for i in range(128)],  # every ASCII character, inside and alone
]


def test_the_ascii_shortcut_gives_the_full_tokenizers_ids(bundled_model: Path) -> None:
    tok = BatchTokenizer(bundled_model, 64)
    tok._wordpiece = None  # the shortcut of tokenizers that are not WordPiece (test_wordpiece.py: the others)
    assert tok._ascii is not None  # the bundled model's normalizer is BertNormalizer
    taken = [text for text in ASCII_CORPUS if tok._ascii.prepare(text) is not None]
    assert len(taken) > len(ASCII_CORPUS) - 10  # most go the short way: the comparison is not vacuous
    assert all(tok._ascii.prepare(text) is None for text in ("a[CLS]b", "x[cls]y", "[UnK]", "Ünïcode"))
    mixed = ASCII_CORPUS + CORPUS  # a chunk with non-ASCII texts: split between the two paths, order kept
    for batch in (ASCII_CORPUS, mixed, [t for t in mixed if not t.isascii()]):
        assert as_list(tok.encode_tokens(batch)) == reference(tok.encode(batch))


def test_the_ascii_shortcut_keeps_frames(bundled_model: Path) -> None:
    tok = BatchTokenizer(bundled_model, 40, frame=("judge this:", "answer yes or no"))
    tok._wordpiece = None
    assert as_list(tok.encode_tokens(ASCII_CORPUS)) == reference(tok.encode(ASCII_CORPUS))


def test_no_shortcut_without_a_bert_normalizer(bundled_model: Path) -> None:
    from tokenizers import normalizers

    tok = BatchTokenizer(bundled_model, 64)
    tok._tokenizer.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase()])
    assert AsciiShortcut.of(tok._tokenizer) is None and AsciiWordPiece.of(tok._tokenizer) is None
    tok._ascii = tok._wordpiece = None
    assert as_list(tok.encode_tokens(ASCII_CORPUS)) == reference(tok.encode(ASCII_CORPUS))
