"""``/v1/embeddings`` builds one ``Options`` per distinct set of fields and shares it."""

from __future__ import annotations

import pytest

from producer.http.facade import shared_options
from producer.jobs import Options


@pytest.mark.parametrize("fields", [
    (None, None, None, True, None),
    (8, None, None, True, None),
    (None, "query", False, False, ("dense",)),
    (None, None, True, True, ("multivector",)),
])
def test_shared_options_equal_the_ones_built_per_request(fields: tuple) -> None:
    dimensions, prompt_name, normalize, truncate, outputs = fields
    built = Options(dimensions=dimensions, prompt_name=prompt_name, normalize=normalize, truncate=truncate,
                    outputs=None if outputs is None else list(outputs))
    assert shared_options(*fields) == built
    assert shared_options(*fields) is shared_options(*fields)


def test_requests_that_differ_in_any_field_never_share_options() -> None:
    variants = [(None, None, None, True, None), (8, None, None, True, None), (None, "query", None, True, None),
                (None, None, False, True, None), (None, None, None, False, None), (None, None, None, True, ("dense",))]
    made = [shared_options(*fields) for fields in variants]
    assert len({id(options) for options in made}) == len(variants)
    assert len({options.model_dump_json() for options in made}) == len(variants)


def test_a_bad_field_is_refused_as_before() -> None:
    with pytest.raises(ValueError, match="dimensions"):
        shared_options(0, None, None, True, None)
