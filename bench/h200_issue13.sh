#!/usr/bin/env bash
# Issue 13's H200 measurements, each step under a timeout sized for a cold machine, printing as it goes.
# Run from anywhere, .gpu carried: bash bench/h200_issue13.sh PREV [STEPS], where PREV is a checkout of the
# commit to compare against (e.g. `git archive <commit> | tar -x -C .wtprev`, carried too) and STEPS the step
# numbers to run (default 12345). Steps, most wanted first:
#   1. the GPU tests of the packed launch: no device sync in a launch (eager and graph replay), replays equal
#      eager launches, the kernel variants against fp32;
#   2. bench.launch_diag: per-launch host time against device time for bulk-shaped batches, graphs vs eager,
#      and the bare engine on the mixed workload with and without graphs;
#   3. bulk MiniLM 100k through Redis + Parquet against PREV in the same rounds;
#   4. embedfleet run on the sample corpus, twice (the first on a cold machine: model load, profile, captures);
#   5. bulk, BERT-large architecture (CLS pooling, not graphed by default), 30k texts, against PREV.
# Stop 27's call (cold machine) ran steps 1-4 in 4.6 min with step 1 at 60 s (11 tests in 24 s), step 2 cut at
# 45 s (the shapes done, not the quality and engine passes) and step 3 cut at 150 s (round 1 and the second bare
# pass done); a later call whose first step was pytest under 24 s printed nothing (the cold start). The limits
# below are for a cold machine; step 5 needs ~4 min more.
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
PREV=$(cd "${1:?usage: bash bench/h200_issue13.sh PREV_CHECKOUT [STEPS]}" && pwd) || exit 1
STEPS=${2:-12345}
source .gpu/env.sh || exit 1
# env.sh puts the project root on PYTHONPATH; keep it, and the bench's workers run from their own checkouts
export PYTHONPATH=/tmp/site:$ROOT/.gpu/shim:$ROOT EMBEDFLEET_CACHE=/tmp/efcache
OUT=${OUT:-/tmp/h200-out}; mkdir -p "$OUT"
date -u; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
step() { [[ $STEPS == *$1* ]] && { echo "== $1 $2"; date -u +%T; }; }
if step 1 "GPU tests: launches queue without a sync, graph replays = eager, kernel variants"; then
  timeout 90 python3 -m pytest -q -p no:cacheprovider tests/backends/test_gpu_paths.py \
    -k "launch_queues or graph_replays or kernel_variants" 2>&1 | tail -4
fi
if step 2 "launch vs device time, graphs vs eager"; then
  timeout 100 python3 -m bench.launch_diag --n 30000 --variants 2 2>&1 | grep -v "Loading weights" > $OUT/diag.log
  echo rc=$?; grep -v "^      " $OUT/diag.log
fi
if step 3 "bulk MiniLM 100k: this vs $PREV"; then
  timeout 240 python3 -m bench.bulk --n 100000 --device cuda --dtype bfloat16 --rounds 2 --concurrency 4 \
    --variant "prev@$PREV" --out $OUT/bulk.md > $OUT/bulk.log 2>&1
  echo rc=$?; grep -v "Loading weights" $OUT/bulk.log | tail -14
fi
if step 4 "embedfleet run x2"; then
  for limit in 60 35; do timeout $limit embedfleet run data/sample-corpus.parquet --out /tmp/run$limit --id-column id \
    --device cuda --dtype bfloat16 2>&1 | tail -2; done
fi
if step 5 "bulk BERT-large arch 30k: this vs $PREV"; then
  timeout 60 python3 -c "from pathlib import Path; from bench.gpu import build_model; build_model('bge-large', Path('/tmp/bl'), False)"
  timeout 240 python3 -m bench.bulk --n 30000 --model /tmp/bl --device cuda --dtype bfloat16 --rounds 2 --concurrency 4 \
    --variant "prev@$PREV" --out $OUT/bulk-large.md > $OUT/bulk-large.log 2>&1
  echo rc=$?; grep -v "Loading weights" $OUT/bulk-large.log | tail -12
fi
date -u +%T
