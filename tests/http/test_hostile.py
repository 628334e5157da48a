"""Hostile and malformed requests get OpenAI-shaped 4xx answers, and the server keeps serving."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.http.servers import Served

BIG = "x" * (3 * 1024 * 1024)


def _cases(model: str) -> list[tuple[str, Any, int, str | None]]:
    """(name, json body or raw bytes, expected status, expected error param)."""
    return [
        ("empty list", {"input": [], "model": model}, 400, "input"),
        ("empty string", {"input": "  ", "model": model}, 400, "input[0]"),
        ("number input", {"input": 5, "model": model}, 400, "input"),
        ("object input", {"input": {"text": "a"}, "model": model}, 400, "input"),
        ("mixed list", {"input": ["a", 3], "model": model}, 400, "input"),
        ("nested lists", {"input": [["a", "b"]], "model": model}, 400, "input"),
        ("deep nesting", {"input": [[[1]]], "model": model}, 400, "input"),
        ("null input", {"input": None, "model": model}, 400, "input"),
        ("no input", {"model": model}, 400, "input"),
        ("model not a string", {"input": "a", "model": 7}, 400, "model"),
        ("unknown model", {"input": "a", "model": "no-such-model"}, 404, "model"),
        ("negative dimensions", {"input": "a", "model": model, "dimensions": -3}, 400, "dimensions"),
        ("zero dimensions", {"input": "a", "model": model, "dimensions": 0}, 400, "dimensions"),
        ("too many dimensions", {"input": "a", "model": model, "dimensions": 4096}, 400, "dimensions"),
        ("bad encoding", {"input": "a", "model": model, "encoding_format": "int9"}, 400, "encoding_format"),
        ("token id outside the vocabulary", {"input": [[2023, 10**9]], "model": model}, 400, "input[0]"),
        ("too many inputs", {"input": ["a"] * 2049, "model": model}, 413, "input"),
        ("multi-megabyte string", {"input": BIG[: 2 * 1024 * 1024], "model": model}, 413, "input[0]"),
        ("body over the limit", {"input": [BIG, BIG], "model": model}, 413, None),
        ("not json", b"{this is not json", 400, None),
        ("json array body", [1, 2, 3], 400, None),
    ]


def _post(url: str, body: Any) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(f"{url}/v1/embeddings", content=body, headers={"content-type": "application/json"})
    return httpx.post(f"{url}/v1/embeddings", json=body, timeout=60)


@pytest.mark.parametrize("mode", ["embedded", "thin"])
def test_hostile_inputs_get_4xx_and_the_server_keeps_serving(mode: str, request: pytest.FixtureRequest) -> None:
    served: Served = request.getfixturevalue(mode)
    failures = []
    for name, body, status, param in _cases(served.embed):
        response = _post(served.url, body)
        error = response.json().get("error", {}) if response.headers.get("content-type", "").startswith(
            "application/json") else {}
        if response.status_code != status or not error.get("message") or (param and error.get("param") != param):
            failures.append(f"{name}: {response.status_code} {response.text[:300]}")
    assert not failures, "\n".join(failures)
    ok = _post(served.url, {"input": ["still serving"], "model": served.embed})
    assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 32


@pytest.mark.parametrize("mode", ["embedded", "thin"])
def test_token_ids_embed_like_their_text(mode: str, request: pytest.FixtureRequest) -> None:
    """OpenAI clients may send token ids (without special tokens); they embed like the text."""
    served: Served = request.getfixturevalue(mode)
    ids = [7592, 2088]  # "hello world" in the bundled vocabulary, no [CLS]/[SEP]
    by_text = _post(served.url, {"input": ["hello world"], "model": served.embed}).json()
    for body in ({"input": [ids], "model": served.embed}, {"input": ids, "model": served.embed}):
        response = _post(served.url, body)
        assert response.status_code == 200, response.text
        assert response.json()["data"][0]["embedding"] == pytest.approx(by_text["data"][0]["embedding"], abs=1e-6)
        assert response.json()["usage"]["prompt_tokens"] == by_text["usage"]["prompt_tokens"]


@pytest.mark.parametrize("mode", ["embedded", "thin"])
def test_token_ids_past_64_bits_are_a_400_naming_the_field(mode: str, request: pytest.FixtureRequest) -> None:
    """Found by schemathesis: an id past 64 bits could not travel in the job message (a 503)."""
    served: Served = request.getfixturevalue(mode)
    embed = _post(served.url, {"input": [[7592, 2**64]], "model": served.embed})
    decode = httpx.post(f"{served.url}/decode", json={"ids": [[2**64]], "model": served.embed}, timeout=60)
    for response in (embed, decode):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["message"]


def test_wrong_kind_and_missing_model(embedded: Served) -> None:
    wrong = _post(embedded.url, {"input": "a", "model": embedded.rerank})
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "wrong_model_kind"
    # two embed models are served: the model must be named
    missing = _post(embedded.url, {"input": "a"})
    assert missing.status_code == 400 and "tiny-bert" in missing.json()["error"]["message"]
