"""Model resolution follows what is served: a refresh that changes the served models changes the answer."""

from __future__ import annotations

import pytest

from producer.errors import EmbedfleetError
from producer.http.directory import Directory, ServedModel
from producer.http.settings import FacadeSettings
from producer.jobs import JobKind


def served(name: str, kind: str = "embed") -> ServedModel:
    return ServedModel(id=name, ref=f"/models/{name}", kind=kind, queue=f"{kind}.{name}", inline_queue=f"{kind}.{name}.inline",
                       dimensions=8, max_length=128, labels=(), backend="torch", device="cpu", dtype="float32",
                       token_ids=True, workers=("w1",), stats={})


def test_resolution_follows_each_refresh() -> None:
    directory = Directory(app=None, settings=FacadeSettings())
    a, b, ranker = served("model-a"), served("model-b"), served("ranker", "rerank")
    directory.models = {"model-a": a, "ranker": ranker}
    for _ in range(2):  # asked again: the same answers
        assert directory.resolve("model-a", JobKind.embed, "/v1/embeddings") is a
        assert directory.resolve("anything", JobKind.embed, "/v1/embeddings") is a  # the one embed model
        assert directory.resolve(None, JobKind.rerank, "/v1/rerank") is ranker
    with pytest.raises(EmbedfleetError):
        directory.resolve("ranker", JobKind.embed, "/v1/embeddings")  # a model of another kind
    directory.models = {"model-b": b}  # what a refresh does
    assert directory.resolve("anything", JobKind.embed, "/v1/embeddings") is b
    assert directory.resolve("model-a", JobKind.embed, "/v1/embeddings") is b
    directory.models = {"model-a": a, "model-b": b}
    assert directory.resolve("model-b", JobKind.embed, "/v1/embeddings") is b
    with pytest.raises(EmbedfleetError, match="not served"):  # two embed models: an unknown name is a 404
        directory.resolve("anything", JobKind.embed, "/v1/embeddings")
    directory.models = {}
    with pytest.raises(EmbedfleetError, match="no worker"):
        directory.resolve("model-a", JobKind.embed, "/v1/embeddings")
