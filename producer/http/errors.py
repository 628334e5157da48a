"""Errors as HTTP answers, in OpenAI's shape: ``{"error": {message, type, param, code}}``.

The one place where an error class becomes a status: every route, the dispatch to workers and
the middleware raise errors of ``producer.errors``, and ``error_response`` renders them. The
helpers below build the errors the facade raises most, with the codes clients already match on.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from producer.errors import (
    BadInput,
    EmbedfleetError,
    NotFound,
    Overloaded,
    TimedOut,
    TooLarge,
    Unauthorized,
    Unavailable,
)

#: (class, status, OpenAI error type), most specific first; the root is a worker-side failure.
STATUS: tuple[tuple[type[EmbedfleetError], int, str], ...] = (
    (TooLarge, 413, "invalid_request_error"),
    (BadInput, 400, "invalid_request_error"),
    (Unauthorized, 401, "authentication_error"),
    (NotFound, 404, "invalid_request_error"),
    (Overloaded, 429, "rate_limit_error"),
    (TimedOut, 504, "timeout_error"),
    (Unavailable, 503, "service_unavailable"),
    (EmbedfleetError, 502, "server_error"),
)


def status_of(error: EmbedfleetError) -> tuple[int, str]:
    """The HTTP status and OpenAI error type of an error, by its class."""
    for cls, status, kind in STATUS:
        if isinstance(error, cls):
            return status, kind
    return 500, "server_error"  # pragma: no cover - the root row matches every error


def body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, object]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(error: EmbedfleetError) -> JSONResponse:
    status, kind = status_of(error)
    return JSONResponse(body(error.message, kind, error.param, error.public_code), status_code=status,
                        headers=error.headers)


def plain_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error the framework raised (no route, wrong method, body over the limit while read)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = "request_too_large" if status == 413 else None
    return JSONResponse(body(message, kind, None, code), status_code=status, headers=headers)


def too_large(message: str, param: str | None = None) -> TooLarge:
    return TooLarge(message, param=param, code="request_too_large")


def bad(message: str, param: str | None = None, code: str | None = None) -> BadInput:
    return BadInput(message, param=param, code=code)


def not_found(message: str, param: str | None = "model") -> NotFound:
    return NotFound(message, param=param, code="model_not_found")


def timed_out(model: str, timeout: float) -> TimedOut:
    return TimedOut(f"no answer from a worker for model {model!r} within {timeout:g} s", code="timeout")


def unavailable(message: str, code: str, param: str | None = None, retry_after_s: int = 1) -> Unavailable:
    """503: nothing can take the job right now (no worker, no broker); retry after a moment."""
    return Unavailable(message, param=param, code=code, headers={"Retry-After": str(retry_after_s)})


def overloaded(message: str) -> Overloaded:
    return Overloaded(message, code="overloaded", headers={"Retry-After": "1"})


def unauthorized() -> Unauthorized:
    return Unauthorized("missing or wrong API key (send 'Authorization: Bearer <key>')", code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"})
