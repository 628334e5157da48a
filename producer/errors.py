"""Every error embedfleet raises on purpose, under one root.

Why one root: callers decide what a failure means by its class, never by its name or its text.
The HTTP facade maps a class to a status (``producer.http.errors``), the CLI maps it to an exit
code (``producer.cli``), and a shard's task asks ``permanent`` whether a retry could help (a bad
row or a bad corpus cannot; a broker hiccup can). An error that crosses the broker (an inline
call's answer) travels as its ``code`` and message, and is rebuilt here from the code.

The builtin bases (``ValueError``, ``LookupError``, ``FileExistsError``) are kept where a caller
of the public API may already catch them.
"""

from __future__ import annotations

from typing import Any, ClassVar


class EmbedfleetError(Exception):
    """The root. ``code`` names the error on the wire and in HTTP bodies; ``param`` the field."""

    code: ClassVar[str] = "error"
    #: A shard that fails with this error fails on every retry (it is the data, not the moment).
    permanent: ClassVar[bool] = False
    _by_code: ClassVar[dict[str, type["EmbedfleetError"]]] = {}

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        #: A finer code than the class's for the HTTP body (``wrong_model_kind``); wire codes stay the class's.
        self.detail_code = code
        self.headers = headers

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        EmbedfleetError._by_code.setdefault(cls.code, cls)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes despite keyword-only fields
        return (_rebuild, (type(self), self.message, self.param, self.detail_code, self.headers))

    @property
    def public_code(self) -> str:
        """The code shown to HTTP clients: the finer one where given, else the class's."""
        return self.detail_code or self.code

    def to_wire(self) -> dict[str, Any]:
        """What an inline result carries instead of a pickled exception."""
        return {"code": self.code, "message": self.message, "param": self.param, "detail": self.detail_code}


def _rebuild(cls: type[EmbedfleetError], message: str, param: str | None, code: str | None,
             headers: dict[str, str] | None) -> EmbedfleetError:
    return cls(message, param=param, code=code, headers=headers)


def from_wire(data: dict[str, Any]) -> EmbedfleetError:
    """The error an inline result reports, as its class (unknown codes: the root class)."""
    cls = EmbedfleetError._by_code.get(str(data.get("code")), EmbedfleetError)
    message = str(data.get("message") or "the worker failed")
    try:
        return cls(message, param=data.get("param"), code=data.get("detail"))
    except TypeError:  # a class with its own constructor (InputError) never travels: the root stands in
        return EmbedfleetError(message, param=data.get("param"), code=data.get("detail"))


# ---------------------------------------------------------------------------- bad input
class BadInput(EmbedfleetError, ValueError):
    """The request, a row or an option is wrong as given; the message names the field and limit."""

    code = "bad_input"
    permanent = True


class TooLarge(BadInput):
    """Within the rules but over a configured limit (HTTP 413)."""

    code = "too_large"


class SettingsError(BadInput):
    """An ``EMBEDFLEET_*`` variable (or another setting) has a value that cannot be used."""

    code = "bad_setting"


class SourceError(BadInput):
    """A corpus that cannot be used as given; the message names the file and the problem."""

    code = "bad_source"


class InputError(BadInput):
    """Some inputs of a call could not be processed; ``errors`` maps input index to the reason."""

    code = "bad_inputs"

    def __init__(self, errors: dict[int, str]) -> None:
        self.errors = errors
        shown = "; ".join(f"[{i}] {msg}" for i, msg in list(errors.items())[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        super().__init__(f"{len(errors)} input(s) rejected: {shown}{more}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (InputError, (self.errors,))


class UnsupportedModel(BadInput):
    """A model folder embedfleet cannot serve faithfully (it is refused, never half-loaded)."""

    code = "unsupported_model"


class OutputConflict(BadInput, FileExistsError):
    """The output folder belongs to another job (or holds finished output)."""

    code = "output_conflict"


# ---------------------------------------------------------------------------- not found
class Untrusted(BadInput):
    """A broker message names storage outside the worker's roots, or a job its output folder does
    not hold (``worker.hosting.trust``); it is refused, never run."""

    code = "untrusted_message"


class NotFound(EmbedfleetError, LookupError):
    """What was named does not exist here."""

    code = "not_found"
    permanent = True


class ModelNotFound(NotFound):
    """The reference names no model this machine can load; the message says what was tried."""

    code = "model_not_found"


class JobNotFound(NotFound):
    """No job at the given id or folder."""

    code = "job_not_found"


# ---------------------------------------------------------------------------- not now
class Unavailable(EmbedfleetError):
    """Nothing can take the work right now (no worker, no broker, a stopping engine); retry later."""

    code = "unavailable"


class ModelNotServed(Unavailable, LookupError):
    """A job named a model this worker does not host (a routing mistake, not a bad input)."""

    code = "model_not_served"


class EngineStopped(Unavailable, RuntimeError):
    """The engine was stopped before this request finished; its work was not done."""

    code = "engine_stopped"


class Overloaded(EmbedfleetError):
    """Too much work is in flight; the caller should retry shortly (HTTP 429)."""

    code = "overloaded"


class TimedOut(EmbedfleetError, TimeoutError):
    """No answer came before the deadline (HTTP 504)."""

    code = "timeout"


class ShardTimeLimit(TimedOut):
    """A shard ran past its soft time limit (``worker.hosting.limits``): a failed delivery, retried."""

    code = "shard_time_limit"

    def __init__(self, message: str = "the shard ran past its soft time limit", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)


class Unauthorized(EmbedfleetError):
    """A missing or wrong API key (HTTP 401)."""

    code = "invalid_api_key"


# ---------------------------------------------------------------------------- failures
class StorageError(EmbedfleetError, OSError):
    """Storage refused a read or a write even after retries."""

    code = "storage_error"


class JobFailed(EmbedfleetError, RuntimeError):
    """A bulk job finished with shards that could not be processed."""

    code = "job_failed"


class JobLost(JobFailed):
    """A running job's messages are gone from the broker (a Redis restarted without persistence):
    its missing shards will not come unless they are sent again (``embedfleet resume OUT``)."""

    code = "job_lost"


class WorkerFailed(EmbedfleetError):
    """The worker hit an error that is not the caller's fault (a bug, a device error)."""

    code = "worker_error"
