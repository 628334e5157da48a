"""The input rules: one place, reasons with no position in them, the caller names the field."""

from __future__ import annotations

import pytest

from producer.errors import BadInput, TooLarge
from producer.rules import (
    MAX_INPUT_CHARS,
    count_problem,
    dimensions_problem,
    pair_problem,
    text_problem,
    token_ids_problem,
)


@pytest.mark.parametrize("value, words, too_large", [
    (None, "text must be a string, got NoneType", False),
    (7, "text must be a string, got int", False),
    ("", "text is empty", False),
    (" \t\n", "text is empty", False),
    ("x" * (MAX_INPUT_CHARS + 1), f"over the limit of {MAX_INPUT_CHARS}", True),
])
def test_text_rules(value: object, words: str, too_large: bool) -> None:
    problem = text_problem(value)
    assert problem is not None and words in problem.reason and problem.too_large is too_large
    assert not problem.reason.startswith(("input", "row"))
    assert text_problem("fine") is None and text_problem("x" * MAX_INPUT_CHARS) is None
    assert text_problem("abcd", max_chars=3) is not None


def test_pairs_name_the_side_that_is_wrong() -> None:
    assert "query is empty" in pair_problem(("", "doc")).reason  # type: ignore[union-attr]
    assert "document must be a string" in pair_problem(("q", 3)).reason  # type: ignore[union-attr]
    assert "pair" in pair_problem("just one").reason  # type: ignore[union-attr]
    assert pair_problem(["q", "d"]) is None


@pytest.mark.parametrize("value, words", [([], "non-empty list"), ([1, "a"], "integers only"), ([True], "integers only"),
                                          ([-1], ">= 0"), ([5, 40], "outside the vocabulary [0, 30)")])
def test_token_id_rules(value: object, words: str) -> None:
    assert words in token_ids_problem(value, vocab_size=30).reason  # type: ignore[union-attr]
    assert token_ids_problem([0, 29], vocab_size=30) is None and token_ids_problem([10**6]) is None


def test_counts_and_dimensions() -> None:
    assert "the list is empty" in count_problem([], 3).reason  # type: ignore[union-attr]
    many = count_problem([1] * 4, 3, " per request")
    assert many is not None and many.too_large and many.reason == "4 inputs exceed the limit of 3 per request"
    assert count_problem([1, 2, 3], 3) is None
    assert dimensions_problem(None, 32) is None and dimensions_problem(32, 32) is None
    assert dimensions_problem(33, 32).reason == "33 is over the model's 32 dimensions"  # type: ignore[union-attr]


def test_callers_add_their_own_prefix() -> None:
    problem = text_problem("")
    assert problem is not None
    error = problem.error("input[3]")
    assert type(error) is BadInput and error.param == "input[3]" and str(error).startswith("input[3]: text is empty")
    assert problem.at("row 17").startswith("row 17: text is empty")
    big = text_problem("xxxx", max_chars=2)
    assert big is not None and type(big.error("input[0]")) is TooLarge
    assert str(dimensions_problem(64, 32).error("dimensions", "=")) == "dimensions=64 is over the model's 32 dimensions"  # type: ignore[union-attr]
