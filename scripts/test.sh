#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite against real parts: models, files, Redis, moto.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
# 3 processes on 2 cores: most tests wait on Redis, HTTP servers and worker subprocesses
# --dist loadfile as tests/schedule.py changes it: the longest first, a file whole unless its tests
# are independent, so no long test starts last
# --durations: the slowest tests printed at the end, to keep CI under its 20 minutes on 2 cores
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-3}" --dist loadfile \
  --durations=25 "$@"
