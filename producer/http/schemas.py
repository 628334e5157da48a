"""The wire shapes of the facade's routes (OpenAI, infinity, Cohere/Jina), for parsing and OpenAPI.

Requests ignore unknown fields (clients send extras such as ``user``); strict types keep a
number from passing as a text. Responses are built as plain dicts and written by orjson (see
``producer.http.app``); the models here document them in the OpenAPI schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

#: Documented bounds (the configured limits may be lower; those are checked per request -> 413).
Text = Annotated[StrictStr, Field(min_length=1)]
TokenIds = Annotated[list[StrictInt], Field(min_length=1)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class EmbeddingRequest(_Request):
    """OpenAI's embeddings request (infinity and LangChain send the same)."""

    input: Union[Text, list[Text], TokenIds, list[TokenIds]] = Field(
        description="A text, a list of texts, or token ids (one array, or one array per input)")
    model: StrictStr | None = Field(default=None, description="Served model id; optional when one is served")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(default=None, ge=1, description="Keep the first N dimensions, renormalized")
    user: StrictStr | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class DocumentObject(_Request):
    text: Text


class RerankRequest(_Request):
    """Cohere / Jina / infinity rerank request."""

    query: Text
    documents: list[Union[Text, DocumentObject]] = Field(min_length=1)
    model: StrictStr | None = None
    top_n: StrictInt | None = Field(default=None, ge=1)
    return_documents: StrictBool = False
    raw_scores: StrictBool = Field(default=False, description="Raw logits instead of sigmoid scores")


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: DocumentObject | None = None


class RerankResponse(BaseModel):
    object: Literal["rerank"] = "rerank"
    model: str
    results: list[RerankResult]
    usage: Usage


class ClassifyRequest(_Request):
    """infinity's classify request."""

    input: Union[Text, list[Text]]
    model: StrictStr | None = None
    raw_scores: StrictBool = Field(default=False, description="Raw logits instead of probabilities")


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResponse(BaseModel):
    object: Literal["classify"] = "classify"
    model: str
    data: list[list[LabelScore]]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "embedfleet"
    created: int
    kind: str
    capabilities: list[str]
    dimensions: int
    max_length: int
    labels: list[str]
    backend: str
    device: str
    dtype: str
    workers: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in ((400, "Bad input"), (401, "Missing or wrong API key"), (404, "Unknown model"),
                         (413, "Too large"), (429, "Overloaded"), (503, "No worker answers"), (504, "Timed out"))
}

