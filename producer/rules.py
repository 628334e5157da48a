"""The rules every input must follow, written once for the facade, the contract and the engine.

Why one place: the same text is judged at the HTTP door (to answer 400/413 before a broker is
involved), in the job message (to bound what a worker receives) and in the engine (the last
word, for rows of a corpus that nobody checked before). Each rule returns a ``Problem`` holding
a reason without any position in it; the caller adds its own prefix (``input[3]``, ``row 17``),
so no message is ever rewritten on its way to the user.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from producer.errors import BadInput, TooLarge

#: Inputs one inline call may carry (larger work is a corpus job).
MAX_INLINE_INPUTS = 2048
#: Characters one input may have before it is refused outright (the model truncates tokens anyway).
MAX_INPUT_CHARS = 100_000


@dataclass(frozen=True)
class Problem:
    """Why an input cannot be used. ``too_large``: over a limit (413) rather than malformed (400)."""

    reason: str
    too_large: bool = False

    def error(self, param: str, separator: str = ": ") -> BadInput:
        """The error a caller raises, naming the field (``input[3]: is empty; ...``)."""
        cls = TooLarge if self.too_large else BadInput
        return cls(f"{param}{separator}{self.reason}", param=param)

    def at(self, where: str) -> str:
        """The reason prefixed with a position (``row 17``), for per-row reports."""
        return f"{where}: {self.reason}"


def text_problem(value: Any, max_chars: int = MAX_INPUT_CHARS, what: str = "text") -> Problem | None:
    """A text must be a non-blank string of at most ``max_chars`` characters."""
    if not isinstance(value, str):
        return Problem(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        return Problem(f"{what} is empty; give at least one non-whitespace character")
    if len(value) > max_chars:
        return Problem(f"{what} has {len(value)} characters, over the limit of {max_chars}", too_large=True)
    return None


def pair_problem(value: Any, max_chars: int = MAX_INPUT_CHARS) -> Problem | None:
    """A rerank input is a (query, document) pair of texts."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        return Problem("must be a (query, document) pair")
    return text_problem(value[0], max_chars, "query") or text_problem(value[1], max_chars, "document")


def token_ids_problem(value: Any, vocab_size: int | None = None) -> Problem | None:
    """Token ids are a non-empty list of integers inside the model's vocabulary."""
    if not isinstance(value, (list, tuple)) or not value:
        return Problem("token ids must be a non-empty list of token ids")
    for token in value:
        if isinstance(token, bool) or not isinstance(token, int):
            return Problem(f"token ids must hold integers only, got {type(token).__name__}")
        if token < 0:
            return Problem(f"token ids hold {token}; token ids must be >= 0")
        if vocab_size is not None and token >= vocab_size:
            return Problem(f"token ids hold token id {token}, outside the vocabulary [0, {vocab_size})")
    return None


def count_problem(values: Sequence[Any], limit: int, hint: str = "") -> Problem | None:
    """A list of inputs holds at least one and at most ``limit`` items."""
    if len(values) == 0:
        return Problem("the list is empty; give at least one input")
    if len(values) > limit:
        return Problem(f"{len(values)} inputs exceed the limit of {limit}{hint}", too_large=True)
    return None


def dimensions_problem(dimensions: int | None, model_dims: int) -> Problem | None:
    """Matryoshka truncation keeps at most the model's own dimensions."""
    if dimensions is not None and dimensions > model_dims:
        return Problem(f"{dimensions} is over the model's {model_dims} dimensions")
    return None
