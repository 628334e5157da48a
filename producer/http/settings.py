"""The limits and behaviour of one facade (``embedfleet serve``'s options)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from producer.rules import MAX_INLINE_INPUTS, MAX_INPUT_CHARS


@dataclass
class FacadeSettings:
    """Limits and behaviour of one facade; the defaults suit a single small worker."""

    models: list[str] = field(default_factory=list)
    """Models this facade serves (``ref`` or ``kind:ref``); empty: whatever workers answer."""
    api_key: str | None = None
    protect_metrics: bool = False
    """``/metrics`` asks for the API key too (``/health`` stays open for probes; ``/docs`` and
    ``/openapi.json`` always ask for it when a key is set)."""
    timeout_s: float = 30.0
    max_inflight: int = 256
    max_queue_depth: int = 1024
    max_inputs: int = MAX_INLINE_INPUTS
    max_chars: int = MAX_INPUT_CHARS
    max_body_bytes: int = 8 * 1024 * 1024
    max_request_tokens: int = 2048 * 256
    """Tokens one request may carry (413 past it), counted at the door as ``producer.http.checks
    .estimated_tokens`` does. The default admits the largest request the bundled model can be
    given (2,048 inputs of its 256-token maximum) and bounds long-context models by work, not
    by input count (2,048 inputs of 8,192 tokens would be 16.8 M tokens)."""
    jobs_per_worker: int = 4
    """Jobs in flight per worker and model; past it, concurrent requests wait and leave merged."""
    refresh_s: float = 5.0
    discovery_timeout_s: float = 0.5
    discovery: Literal["auto", "broadcast", "task"] = "auto"
