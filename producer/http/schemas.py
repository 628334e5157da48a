"""The wire shapes of the facade's routes (OpenAI, infinity, Cohere/Jina), for parsing and OpenAPI.

Requests ignore unknown fields (clients send extras such as ``user``); strict types keep a
number from passing as a text. Responses are built as plain dicts and written by orjson (see
``producer.http.app``); the models here document them in the OpenAPI schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictInt, StrictStr, Tag

#: Documented bounds (the configured limits may be lower; those are checked per request -> 413).
Text = Annotated[StrictStr, Field(min_length=1)]
#: A token id travels as a 64-bit integer (the job message); a larger one is a 400 naming the field
#: here, and one outside the model's vocabulary is refused by the engine with its limit.
TokenId = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


EncodingFormat = Literal["float", "base64", "int8", "uint8", "binary", "ubinary"]
NumericType = Literal["float", "int8", "uint8", "binary", "ubinary"]
ModelName = Annotated[StrictStr | None, Field(
    description="A served model's id; when one model of the route's kind is served, any name "
    "(or none) answers with it")]


class EmbeddingRequest(_Request):
    """OpenAI's embeddings request (infinity, LangChain, llama-index send the same), with the fields
    vLLM (``embed_dtype``, ``endianness``, ``normalize``) and Voyage (``input_type``, ``output_dtype``,
    ``output_dimension``, ``truncation``) add."""

    input: Union[Text, list[Text], TokenIds, list[TokenIds]] = Field(
        description="A text, a list of texts, or token ids (one array, or one array per input)")
    model: ModelName = None
    encoding_format: EncodingFormat = Field(
        default="float", description="float, base64 (of float32, or of output_dtype), or a quantized type "
        "(producer.http.encodings)")
    dimensions: StrictInt | None = Field(default=None, ge=1, description="Keep the first N dimensions, renormalized")
    output_dimension: StrictInt | None = Field(default=None, ge=1, description="Voyage's name for dimensions")
    output_dtype: NumericType | None = Field(default=None, description="Voyage: the numeric type of each value")
    embed_dtype: Literal["float32", "float16"] = Field(default="float32", description="vLLM: base64 float width")
    endianness: Literal["native", "little", "big"] = Field(default="native", description="vLLM: base64 byte order")
    input_type: StrictStr | None = Field(default=None, description="query/document (Voyage) or Cohere's names: "
                                         "mapped onto the model's prompts")
    prompt_name: StrictStr | None = Field(default=None, description="A prompt named in the model's files")
    normalize: StrictBool | None = Field(default=None, description="L2-normalize; default: the model's files")
    truncation: StrictBool = Field(default=True, description="Cut over-long inputs (false: they are errors)")
    output: Literal["dense", "multivector"] | None = Field(
        default=None, description="embedfleet: dense vectors, or one vector per token (ColBERT: a list of vectors "
        "per item, as infinity returns for ColBERT models; base64 of the [n_tokens, d] float32 matrix); default: "
        "the model's own output")
    user: StrictStr | None = None


class ImageEmbeddingRequest(_Request):
    """infinity's ``/embeddings_image`` body: images as http(s) URLs or data URIs."""

    input: Union[StrictStr, list[StrictStr]] = Field(description="An image URL or data URI, or a list of them")
    model: ModelName = None
    encoding_format: Literal["float", "base64"] = "float"
    user: StrictStr | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], list[list[float]], str]


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str = Field(description="The model that answered")
    usage: Usage
    id: str
    created: int


class DocumentObject(_Request):
    text: Text


class RerankRequest(_Request):
    """Cohere / Jina / infinity rerank request."""

    query: Text
    documents: list[Union[Text, DocumentObject]] = Field(min_length=1)
    model: ModelName = None
    top_n: StrictInt | None = Field(default=None, ge=1)
    return_documents: StrictBool = False
    raw_scores: StrictBool = Field(default=False, description="Raw logits instead of sigmoid scores")
    max_tokens_per_doc: StrictInt | None = Field(default=None, ge=1, description="Cohere: at least the model's "
                                                 "maximum length (documents are cut there)")
    top_k: StrictInt | None = Field(default=None, ge=1, description="Voyage's name for top_n")
    truncation: StrictBool = Field(default=True, description="Voyage: cut over-long pairs (false: errors)")


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: DocumentObject | None = None


class RerankResponse(BaseModel):
    object: Literal["rerank"] = "rerank"
    model: str
    results: list[RerankResult]
    data: list[RerankResult] = Field(description="The same results, under the name Voyage and older infinity read")
    usage: Usage
    id: str
    created: int


class ClassifyRequest(_Request):
    """infinity's classify request."""

    input: Union[Text, list[Text]]
    model: ModelName = None
    raw_scores: StrictBool = Field(default=False, description="Raw logits instead of probabilities")


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResponse(BaseModel):
    object: Literal["classify"] = "classify"
    model: str
    data: list[list[LabelScore]]
    usage: Usage
    id: str
    created: int


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
    stats: dict[str, int] = Field(description="Batches, items and tokens the workers ran (infinity's stats)")
    prompts: list[str] = Field(default_factory=list, description="Prompt names the model defines")
    devices: list[str] = Field(default_factory=list, description="The device of each worker process serving it "
                               "(cuda:0, cpu:1, ...), one entry per engine")
    outputs: list[str] = Field(default_factory=list, description="Embed: the outputs offered (dense, sparse, "
                               "multivector)")


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



# ---------------------------------------------------------------------------- TEI's native routes
TEIInput = Union[Text, list[Text], TokenIds, list[TokenIds]]
TruncationDirection = Literal["right", "Right", "left", "Left"]


class TEIEmbedSparseRequest(_Request):
    """TEI's ``/embed_sparse`` body."""

    inputs: TEIInput = Field(description="A text, a list of texts, or token ids (one array, or one per input)")
    model: ModelName = None
    truncate: StrictBool | None = Field(default=None, description="default: true (this server auto-truncates)")
    truncation_direction: TruncationDirection = "right"
    prompt_name: StrictStr | None = None


class SparseValue(BaseModel):
    """One non-zero weight of a sparse vector (TEI's shape): a token id and its weight."""

    index: int
    value: float


class TEIEmbedRequest(_Request):
    """TEI's ``/embed`` (and ``/embed_all``) body."""

    inputs: TEIInput = Field(description="A text, a list of texts, or token ids (one array, or one per input)")
    model: ModelName = None
    normalize: StrictBool = True
    truncate: StrictBool | None = Field(default=None, description="default: true (this server auto-truncates)")
    truncation_direction: TruncationDirection = "right"
    dimensions: StrictInt | None = Field(default=None, ge=1)
    prompt_name: StrictStr | None = None


PredictInput = Union[Text, list[Text], list[list[Text]]]


class TEIPredictRequest(_Request):
    """TEI's ``/predict`` body: a text, a pair of texts, or a batch of one-text (or pair) lists."""

    inputs: PredictInput
    model: ModelName = None
    raw_scores: StrictBool = False
    truncate: StrictBool | None = None
    truncation_direction: TruncationDirection = "right"


class Prediction(BaseModel):
    score: float
    label: str


class TEIRerankRequest(_Request):
    """TEI's ``/rerank`` body (``texts`` instead of Cohere's ``documents``)."""

    query: Text
    texts: list[Text] = Field(min_length=1)
    model: ModelName = None
    raw_scores: StrictBool = False
    return_text: StrictBool = False
    truncate: StrictBool | None = None
    truncation_direction: TruncationDirection = "right"


def _rerank_shape(value: Any) -> str:
    """TEI's body names its documents ``texts``; everything else is the Cohere/Jina body."""
    if isinstance(value, dict):
        return "tei" if "texts" in value and "documents" not in value else "cohere"
    return "tei" if isinstance(value, TEIRerankRequest) else "cohere"


#: ``/rerank`` takes either body and answers in the shape of the one it got.
RerankBody = Annotated[Union[Annotated[RerankRequest, Tag("cohere")], Annotated[TEIRerankRequest, Tag("tei")]],
                       Discriminator(_rerank_shape)]
#: The branch names above, which validation errors carry in their location.
BODY_TAGS = frozenset({"cohere", "tei"})


class Rank(BaseModel):
    index: int
    score: float
    text: str | None = None


class SimilarityInput(_Request):
    source_sentence: Text
    sentences: list[Text] = Field(min_length=1)


class SimilarityParameters(_Request):
    prompt_name: StrictStr | None = None
    truncate: StrictBool | None = None
    truncation_direction: TruncationDirection = "right"


class TEISimilarityRequest(_Request):
    inputs: SimilarityInput
    parameters: SimilarityParameters | None = None
    model: ModelName = None


class TEITokenizeRequest(_Request):
    inputs: Union[Text, list[Text]]
    add_special_tokens: StrictBool = True
    prompt_name: StrictStr | None = None
    model: ModelName = None


class SimpleToken(BaseModel):
    id: int
    text: str
    special: bool
    start: int | None = None
    stop: int | None = None


class TEIDecodeRequest(_Request):
    ids: Union[TokenIds, list[TokenIds]]
    skip_special_tokens: StrictBool = True
    model: ModelName = None


class TEIInfo(BaseModel):
    """TEI's ``/info``, for the model answering TEI's routes (``models``: every served id)."""

    model_id: str
    model_sha: str | None
    model_dtype: str
    model_type: dict[str, Any]
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None = None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str
    sha: str | None = None
    docker_label: str | None = None
    models: list[str]


# ---------------------------------------------------------------------------- Cohere v2
CohereEmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]


class CohereImageUrl(BaseModel):
    """``{"url": ...}``: a data URI or an http(s) URL (Cohere's ``EmbedImageUrl``)."""

    model_config = ConfigDict(extra="ignore")  # Cohere's ``detail`` (auto/low/high) changes nothing for CLIP/SigLIP
    url: StrictStr


class CohereTextContent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class CohereImageContent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["image_url"]
    image_url: CohereImageUrl


class CohereEmbedInput(BaseModel):
    """One of Cohere's ``inputs``: its ``content`` components (``cohere.EmbedInput``)."""

    model_config = ConfigDict(extra="forbid")
    content: list[Annotated[Union[CohereTextContent, CohereImageContent], Field(discriminator="type")]] = Field(
        min_length=1)


class CohereEmbedRequest(_Request):
    """Cohere's ``POST /v2/embed`` (``cohere.ClientV2``): ``texts``, ``images`` (data URIs) or
    ``inputs`` (text or image components); images for image-text models (CLIP, SigLIP)."""

    model: ModelName = None
    texts: list[Text] | None = Field(default=None, min_length=1)
    images: list[StrictStr] | None = Field(default=None, min_length=1)
    inputs: list[CohereEmbedInput] | None = Field(default=None, min_length=1)
    input_type: StrictStr | None = Field(default=None, description="search_document, search_query, "
                                         "classification, clustering: mapped onto the model's prompts")
    embedding_types: list[CohereEmbeddingType] = Field(default_factory=lambda: ["float"], min_length=1)
    output_dimension: StrictInt | None = Field(default=None, ge=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    truncate: Literal["NONE", "START", "END"] = "END"


class CohereEmbedResponse(BaseModel):
    id: str
    embeddings: dict[str, list[Any]]
    texts: list[str]
    meta: dict[str, Any]
    response_type: Literal["embeddings_by_type"] = "embeddings_by_type"


class CohereRerankResult(BaseModel):
    index: int
    relevance_score: float


class CohereRerankResponse(BaseModel):
    id: str
    results: list[CohereRerankResult]
    meta: dict[str, Any]
