#!/usr/bin/env bash
# The lead's final H200 call of stop 26 (bench/RESULTS.md): the GPU tests of this stop's new code, then
# issue 13's owed measurements (bulk MiniLM 100k and short texts against PREV in the same call, the
# sample run), each step under a timeout sized to fit one call of the
# session's last device minutes. Run from the repo root with .gpu and PREV carried:
#   bash bench/h200_final_call.sh .wtprev     (PREV = git archive <commit> | tar -x -C .wtprev)
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
PREV=$(cd "${1:?usage: bash bench/h200_final_call.sh PREV_CHECKOUT}" && pwd) || exit 1
source .gpu/env.sh || exit 1
export PYTHONPATH=/tmp/site:$ROOT/.gpu/shim:$ROOT EMBEDFLEET_CACHE=/tmp/efcache
date -u; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
echo "== 1 GPU tests: no-sync launches, kernel variants, bge-m3 outputs"; date -u +%T
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/backends/test_gpu_paths.py tests/backends/test_gpu_outputs.py \
  -k "launch_queues or kernel_variants or three" 2>&1 | tail -4
echo "== 2 bulk MiniLM 100k: this vs PREV, + 1 ms switch interval"; date -u +%T
timeout 175 python3 -m bench.bulk --n 100000 --device cuda --dtype bfloat16 --rounds 2 --concurrency 4 \
  --variant "prev@$PREV" --variant si1:EMBEDFLEET_SWITCH_INTERVAL=0.001 --out $OUT/bulk.md > $OUT/bulk.log 2>&1
echo rc=$?; grep -v "Loading weights" $OUT/bulk.log | tail -16
echo "== 3 embedfleet run x2"; date -u +%T
for i in 1 2; do timeout 22 embedfleet run data/sample-corpus.parquet --out /tmp/run$i --id-column id --device cuda \
  --dtype bfloat16 2>&1 | tail -2; done
echo "== 4 short texts, MiniLM: this vs PREV"; date -u +%T
timeout 100 python3 -m bench.host --against "$PREV" --device cuda --workloads short --backends torch --n 60000 --rounds 2 \
  --passes 2 --dtype bfloat16 --budget 65536 > $OUT/host.log 2>&1; echo rc=$?; tail -6 $OUT/host.log
date -u +%T
