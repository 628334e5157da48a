"""The CLI options that several commands share, declared once as Typer annotated types.

Each command's signature reads ``model: Model = DEFAULT_MODEL``; the flag, its help and the
variable it is read from are said here only. Options backed by a setting name their variable
from ``producer.settings.Settings``, so the environment and the flag can never disagree.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from producer.jobs import JobKind
from producer.settings import Settings


def envvar(field: str) -> str:
    return Settings.env_name(field)


def default(field: str) -> object:
    """A setting's default, for an option backed by it."""
    return Settings.model_fields[field].get_default(call_default_factory=True)


Broker = Annotated[str, typer.Option("--broker", envvar=envvar("broker"), help="redis://... or sqs://...")]
OptionalBroker = Annotated[Optional[str], typer.Option("--broker", envvar=envvar("broker"),
                                                        help="redis://... or sqs://...")]
ResultBackend = Annotated[Optional[str], typer.Option("--result-backend", envvar=envvar("result_backend"),
                                                       help="Where inline results travel (default: the Redis broker)")]
Model = Annotated[str, typer.Option("--model", help="Local dir, hub id, or the bundled default")]
Kind = Annotated[JobKind, typer.Option("--kind", help="embed|rerank|classify")]
TextColumn = Annotated[str, typer.Option("--text-column", help="The input column holding the texts")]
ImageColumn = Annotated[Optional[str], typer.Option(
    "--image-column", help="Image-text models (CLIP, SigLIP): embed the images of this column (bytes, local paths "
                           "relative to the corpus, s3:// or http(s) URIs) instead of texts")]
IdColumn = Annotated[Optional[str], typer.Option("--id-column",
                                                  help="Kept as `id` (type kept); default: the input's `id` "
                                                  "column if it has one, else the row number (from 0)")]
QueryColumn = Annotated[str, typer.Option("--query-column", help="Rerank: the query column")]
DocumentColumn = Annotated[str, typer.Option("--document-column", help="Rerank: the document column")]
ShardRows = Annotated[int, typer.Option("--shard-rows", min=1, help="Rows per shard (= per output part)")]
Normalize = Annotated[Optional[bool], typer.Option("--normalize/--no-normalize",
                                                    help="L2-normalize vectors; default: the model's files")]
Truncate = Annotated[bool, typer.Option("--truncate/--no-truncate",
                                        help="Cut over-long texts, or record them as errors")]
Dimensions = Annotated[Optional[int], typer.Option("--dimensions", min=1,
                                                    help="Matryoshka: keep N dims, renormalize")]
PromptName = Annotated[Optional[str], typer.Option("--prompt-name",
                                                    help="A prompt defined by the model, e.g. query")]
Prompt = Annotated[Optional[str], typer.Option("--prompt", help="A literal prefix for every text")]
Outputs = Annotated[Optional[str], typer.Option(
    "--outputs", help="Embed: comma-separated outputs to compute, of dense, sparse, multivector "
                      "(default: the model's own, dense for dense models); only these are computed")]
OutputDtype = Annotated[str, typer.Option("--output-dtype", help="float32|float16 in Parquet")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO")]
