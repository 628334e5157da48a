"""The README's curl examples work as pasted (against a running server, the port swapped), and
the package's metadata raises no deprecation warning of ours when setuptools reads it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from tests.http.servers import Served

REPO = Path(__file__).resolve().parents[2]


def readme_curls() -> list[str]:
    """Every ``curl localhost:7997...`` command of the README, continuation lines joined."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in text.splitlines() if line.startswith("curl localhost:7997")]


def test_readme_curl_examples_work_as_pasted(single: Served) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    commands = readme_curls()
    assert len(commands) >= 3, commands
    host = single.url.removeprefix("http://")
    for command in commands:
        run = subprocess.run(["bash", "-c", command.replace("localhost:7997", host) + " -sS --fail-with-body"],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, (command, run.stdout[-500:], run.stderr[-500:])
        body = json.loads(run.stdout)
        assert "error" not in (body if isinstance(body, dict) else {}), (command, body)


def test_setuptools_reads_the_metadata_without_deprecation_warnings() -> None:
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dist = apply_configuration(Distribution(), REPO / "pyproject.toml")
    assert re.fullmatch(r"Apache-2\.0", dist.metadata.license_expression or "")
