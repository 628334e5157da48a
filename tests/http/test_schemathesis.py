"""Property-based fuzzing of the OpenAPI spec with schemathesis: no request makes the server fail.

The schemathesis CLI runs against the embedded server and the thin one (real Redis, a worker
process) over real HTTP: its coverage phase (edge values, missing fields, wrong types) and its
fuzzing phase, on every documented route. ``model`` is optional when one model of a kind is
served, so generated bodies without it reach the real engine. The number of cases is printed
(``-s``) for the closing note.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.http.servers import Served

#: Fuzzed cases per operation, after the coverage phase's edge values (missing fields, wrong types,
#: bounds), which do not depend on it. 50 took 115-133 s a mode on the 2-core CI machine (stop 26),
#: most of it in the fuzzing phase; every operation still gets its coverage cases and 10 fuzzed ones.
MAX_EXAMPLES = 10


@pytest.mark.parametrize("mode", ["embedded", "thin"])
def test_schemathesis_finds_no_server_error(mode: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    served: Served = request.getfixturevalue(mode)
    # The spec is fetched here with a generous timeout and handed over as a file: schemathesis'
    # own schema download gives up after 10 s, which a busy 2-core CI machine can exceed.
    spec = tmp_path / "openapi.json"
    spec.write_bytes(httpx.get(f"{served.url}/openapi.json", timeout=120).raise_for_status().content)
    st = Path(sys.executable).with_name("st")
    run = subprocess.run(
        [str(st), "run", str(spec), "--url", served.url, "--checks", "not_a_server_error",
         "--max-examples", str(MAX_EXAMPLES), "--seed", "1", "--request-timeout", "60", "--no-color"],
        capture_output=True, text=True, timeout=600,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    cases = re.search(r"(\d+) generated, (\d+) passed", output)
    assert cases and cases.group(1) == cases.group(2) and int(cases.group(1)) > 0, output[-3000:]
    print(f"\nschemathesis, {mode}: {cases.group(0)} (max {MAX_EXAMPLES} examples per operation, seed 1)")
