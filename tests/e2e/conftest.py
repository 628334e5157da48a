"""What the end-to-end tests share: ``embedfleet run`` invoked in this process."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def cli():  # type: ignore[no-untyped-def]
    """Invoke ``embedfleet run ARGS --device cpu`` in this process; returns (exit code, output with
    whitespace collapsed). The console is widened so rich does not wrap the messages tests match."""
    from producer.cli import console
    from worker.cli import app

    runner = CliRunner()
    saved = console._width
    console.width = 400

    def invoke(*args: Any) -> tuple[int, str]:
        result = runner.invoke(app, ["run", *map(str, args), "--device", "cpu"])
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, " ".join(result.output.split())

    yield invoke
    console._width = saved
