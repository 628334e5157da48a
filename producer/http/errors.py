"""Errors the facade answers with, in OpenAI's shape: ``{"error": {message, type, param, code}}``.

Shared by the routes (``producer.http.app``) and the dispatch to workers (``producer.http.dispatch``).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """An error the client caused or must know about, rendered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers


def error_response(error: ApiError) -> JSONResponse:
    body = {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def too_large(message: str, param: str | None = None) -> ApiError:
    return ApiError(413, message, "invalid_request_error", param, "request_too_large")


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def timed_out(model: str, timeout: float) -> ApiError:
    return ApiError(504, f"no answer from a worker for model {model!r} within {timeout:g} s", "timeout_error",
                    None, "timeout")


def unavailable(message: str, code: str, param: str | None = None, retry_after_s: int = 1) -> ApiError:
    """503: nothing can take the job right now (no worker, no broker); retry after a moment."""
    return ApiError(503, message, "service_unavailable", param, code, {"Retry-After": str(retry_after_s)})


def overloaded(message: str) -> ApiError:
    return ApiError(429, message, "rate_limit_error", None, "overloaded", {"Retry-After": "1"})
