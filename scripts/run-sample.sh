#!/usr/bin/env bash
# The main job: embed the bundled sample corpus (12,000 real English texts from the Python
# standard library's documentation) with the bundled all-MiniLM-L6-v2 into Parquet, no broker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT="${1:-vectors}"
export HF_HUB_OFFLINE=1
.venv/bin/embedfleet run data/sample-corpus.parquet --out "$OUT" --id-column id
