"""HMAC-SHA256 signatures over shard messages: only holders of ``EMBEDFLEET_SIGNING_KEY`` send work.

Why: the broker is shared infrastructure, and a worker does what its messages say. Storage roots
(``worker.hosting.trust``) bound *where* a message may read and write; a signature binds *who*
sent it: with the key set on producers and workers alike, a message that is unsigned, or whose
content was altered after signing, is refused. The signature covers every field of the message
(its canonical JSON, keys sorted), so no part of a signed job can be swapped.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from producer.settings import settings

FIELD = "signature"


def content(payload: dict[str, Any]) -> bytes:
    """What is signed: the message's JSON without its signature, keys sorted, no spaces."""
    return json.dumps({k: v for k, v in payload.items() if k != FIELD}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def signature(payload: dict[str, Any], key: str) -> str:
    return hmac.new(key.encode("utf-8"), content(payload), hashlib.sha256).hexdigest()


def sign(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` with its signature when ``EMBEDFLEET_SIGNING_KEY`` is set (else unchanged)."""
    key = settings().signing_key
    return {**payload, FIELD: signature(payload, key)} if key else payload


def refusal(payload: dict[str, Any]) -> str | None:
    """Why a worker holding the key must refuse ``payload``, or ``None`` (no key: nothing to check)."""
    key = settings().signing_key
    if not key:
        return None
    given = payload.get(FIELD)
    if not given:
        return "the message is unsigned, and this worker requires EMBEDFLEET_SIGNING_KEY signatures"
    if not hmac.compare_digest(str(given), signature(payload, key)):
        return "the message's signature does not match its content (altered, or another key)"
    return None
