#!/usr/bin/env bash
# The lead's final device call of stop 28 (bench/RESULTS.md): this tree against PREV (the stop's starting
# commit) in the same call, every step under a timeout, printing as it goes; all logs tarred into one file
# ($OUT/logs.tar.gz: only 8 files come back). Run from the repo root with .gpu and PREV carried
# (PREV: git archive <commit> | tar -x -C .wtprev):
#   bash bench/h200_final_call.sh .wtprev [STEPS]
# Steps (default 123):
#   1. GPU tests of the packed launch: graph replays = eager, no sync in a launch, kernel variants (streams too),
#      blocking CUDA waits = spinning ones;
#   2. issue 13's host-path figures, bench/h200_13h.sh (bulk graphed bare vs fleet, `embedfleet run` vs PREV,
#      short bge-base arch beside sentence-transformers, bulk BERT-large arch, short MiniLM);
#   3. issue 20's thin facade under load against PREV, bench/h200_issue20.sh.
# The seed/mixed kernels have their own call: bench/h200_seed.sh.
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
PREV=$(cd "${1:?usage: bash bench/h200_final_call.sh PREV_CHECKOUT [STEPS]}" && pwd) || exit 1
STEPS=${2:-123}
source .gpu/env.sh || exit 1
export PYTHONPATH=/tmp/site:$ROOT/.gpu/shim:$ROOT EMBEDFLEET_CACHE=/tmp/efcache
FINAL=${OUT:-/tmp/h200-out}; mkdir -p "$FINAL/s2" "$FINAL/s3"
date -u; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
step() { [[ $STEPS == *$1* ]] && { echo "== $1 $2"; date -u +%T; }; }
if step 1 "GPU tests: graph replays, no sync in a launch, kernel variants"; then
  timeout 90 python3 -m pytest -q -p no:cacheprovider tests/backends/test_gpu_paths.py \
    -k "graph or launch_queues or kernel_variants or blocking_wait" 2>&1 | tail -5
fi
if step 2 "issue 13: host path (bench/h200_13h.sh)"; then
  OUT=$FINAL/s2 bash bench/h200_13h.sh "$PREV" 12345 "${T13:-250}"
fi
if step 3 "issue 20: thin facade under load (bench/h200_issue20.sh)"; then
  OUT=$FINAL/s3 LIMIT=${T20:-115} bash bench/h200_issue20.sh "$PREV"
fi
(cd "$FINAL" && tar -czf logs.tar.gz s2 s3 && rm -rf s2 s3)
date -u +%T
