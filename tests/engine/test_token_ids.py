"""Token-id inputs (as OpenAI clients send them) give the same vectors as the text they encode."""

from __future__ import annotations

import numpy as np
import pytest

from producer.jobs import Options
from worker.backends.torch import TorchBackend
from worker.engine.pipeline import Engine
from worker.models.resolve import describe


@pytest.fixture(scope="module")
def engine(bundled_model):  # type: ignore[no-untyped-def]
    info = describe(str(bundled_model))
    with Engine(info, TorchBackend(info, device="cpu", dtype="float32")) as eng:
        yield eng


def test_token_ids_match_text(engine: Engine) -> None:
    texts = ["hello world", "Token ids are what tiktoken-style clients send."]
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(engine.info.path))
    raw_ids = [hf(t, add_special_tokens=False)["input_ids"] for t in texts]
    by_text = engine.run(texts)
    by_ids = engine.run(raw_ids)
    assert not by_ids.errors
    np.testing.assert_allclose(by_ids.values, by_text.values, atol=1e-6)
    assert by_ids.n_tokens == by_text.n_tokens


def test_long_token_ids_are_truncated_or_rejected(engine: Engine) -> None:
    long_ids = [2088] * 1000
    cut = engine.run([long_ids])
    assert cut.truncated == [True] and cut.n_tokens == [engine.info.max_length]
    refused = engine.run([long_ids, [2088]], Options(truncate=False))
    assert "maximum of 256 tokens" in refused.errors[0] and 1 not in refused.errors


@pytest.mark.parametrize(
    "bad, reason",
    [([], "non-empty list"), ([1, "a"], "integers only"), ([True], "integers only"), ([10**9], "outside the vocabulary")],
)
def test_bad_token_ids_fail_alone(engine: Engine, bad: list, reason: str) -> None:
    result = engine.run([bad, "fine"])
    assert reason in result.errors[0]
    assert 1 not in result.errors and np.isfinite(result.values[1]).all() and result.values[1].any()


def test_prompt_with_token_ids_is_an_error(engine: Engine) -> None:
    result = engine.run([[2088]], Options(prompt="query: "))
    assert "prompt cannot be put before token ids" in result.errors[0]


def test_token_ids_with_the_models_special_tokens_are_used_as_they_are(engine: Engine) -> None:
    """Ids as a tokenizer gives them ([CLS] ... [SEP]) embed like their text; [CLS] is not added twice."""
    from transformers import AutoTokenizer

    texts = ["hello world", "Special tokens come with the ids a tokenizer gives."]
    hf = AutoTokenizer.from_pretrained(str(engine.info.path))
    framed = [hf(t)["input_ids"] for t in texts]
    assert framed[0][0] == hf.cls_token_id and framed[0][-1] == hf.sep_token_id
    by_text = engine.run(texts)
    by_ids = engine.run(framed)
    assert not by_ids.errors
    np.testing.assert_allclose(by_ids.values, by_text.values, atol=1e-6)
    assert by_ids.n_tokens == [len(ids) for ids in framed] == by_text.n_tokens
    # a frame present at one end only is completed at the other
    half = engine.run([framed[0][:-1], framed[0][1:]])
    np.testing.assert_allclose(half.values, by_text.values[[0, 0]], atol=1e-6)
