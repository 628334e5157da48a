"""Token batches as plain lists, to compare a columnar ``Tokens`` with the per-text ``Encoded``
path: ids, segment ids and the truncation flag of each input."""

from __future__ import annotations

from worker.models.tokenizer import Encoded, Tokens


def as_list(tokens: Tokens) -> list[tuple[list[int], list[int], bool]]:
    types = tokens.token_types()
    return [(tokens.ids[a:b].tolist(), types[a:b].tolist(), bool(tokens.truncated[i]))
            for i, (a, b) in enumerate(zip(tokens.offsets[:-1], tokens.offsets[1:]))]


def reference(encoded: list[Encoded]) -> list[tuple[list[int], list[int], bool]]:
    return [(e.ids.tolist(), e.type_ids.tolist(), e.truncated) for e in encoded]
