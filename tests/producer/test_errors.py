"""One error root: HTTP status and exit codes come from the class, an error crosses the broker as its code."""

from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from producer.cli import exit_code
from producer.errors import (
    BadInput,
    EmbedfleetError,
    EngineStopped,
    InputError,
    JobFailed,
    ModelNotFound,
    ModelNotServed,
    NotFound,
    OutputConflict,
    Overloaded,
    SettingsError,
    SourceError,
    StorageError,
    TimedOut,
    TooLarge,
    Unauthorized,
    Unavailable,
    UnsupportedModel,
    WorkerFailed,
    from_wire,
)
from producer.http.errors import error_response, status_of
from worker.backends.base import BackendUnavailable
from worker.hosting.tasks import is_permanent


@pytest.mark.parametrize("error, status", [
    (BadInput("x"), 400), (SourceError("x"), 400), (UnsupportedModel("x"), 400), (OutputConflict("x"), 400),
    (TooLarge("x"), 413), (Unauthorized("x"), 401), (NotFound("x"), 404), (ModelNotFound("x"), 404),
    (Overloaded("x"), 429), (TimedOut("x"), 504), (Unavailable("x"), 503), (ModelNotServed("x"), 503),
    (EngineStopped("x"), 503), (BackendUnavailable("x"), 503), (WorkerFailed("x"), 502),
    (StorageError("x"), 502), (EmbedfleetError("x"), 502),
])
def test_http_status_comes_from_the_class(error: EmbedfleetError, status: int) -> None:
    assert status_of(error)[0] == status
    response = error_response(error)
    assert response.status_code == status


def test_the_body_is_openai_shaped_with_the_finer_code() -> None:
    response = error_response(BadInput("model 'x' is a rerank model", param="model", code="wrong_model_kind"))
    assert response.body == (b'{"error":{"message":"model \'x\' is a rerank model","type":"invalid_request_error",'
                             b'"param":"model","code":"wrong_model_kind"}}')


@pytest.mark.parametrize("error, code", [(BadInput("x"), 2), (ModelNotFound("x"), 2), (BackendUnavailable("x"), 2),
                                         (JobFailed("x"), 1), (KeyError("a bug"), 1)])
def test_exit_codes_come_from_the_class(error: BaseException, code: int) -> None:
    assert exit_code(error) == code


def test_errors_cross_the_broker_as_code_and_message() -> None:
    for error in (BadInput("dimensions=64 is over the model's 32 dimensions", param="dimensions"),
                  ModelNotServed("model 'm' is not hosted by this worker", code="no_worker"), TooLarge("big")):
        wire = error.to_wire()
        assert set(wire) == {"code", "message", "param", "detail"} and "Error" not in str(wire["code"])
        back = from_wire(wire)
        assert type(back) is type(error) and back.message == error.message and back.param == error.param
        assert back.public_code == error.public_code
    unknown = from_wire({"code": "from-a-newer-worker", "message": "something new"})
    assert type(unknown) is EmbedfleetError and status_of(unknown)[0] == 502


def test_errors_survive_pickling_and_keep_builtin_bases() -> None:
    error = pickle.loads(pickle.dumps(BadInput("bad", param="input[2]", code="c")))
    assert (error.message, error.param, error.detail_code) == ("bad", "input[2]", "c")
    assert isinstance(BadInput("x"), ValueError) and isinstance(OutputConflict("x"), FileExistsError)
    assert isinstance(ModelNotFound("x"), LookupError) and isinstance(TimedOut("x"), TimeoutError)
    assert pickle.loads(pickle.dumps(InputError({1: "empty"}))).errors == {1: "empty"}


def test_only_bad_data_parks_a_shard() -> None:
    assert is_permanent(SourceError("corrupt row group")) and is_permanent(BadInput("x"))
    assert is_permanent(MemoryError()) and is_permanent(SettingsError("x"))
    with pytest.raises(ValidationError) as info:
        from producer.jobs import ShardJob

        ShardJob.model_validate({"kind": "embed"})
    assert is_permanent(info.value)
    # a bug of ours, or a moment of trouble, is retried, never taken for bad data
    for transient in (KeyError("column"), TypeError("NoneType"), ValueError("x"), StorageError("x"),
                      Unavailable("x"), OSError("disk"), RuntimeError("cuda")):
        assert not is_permanent(transient), transient
