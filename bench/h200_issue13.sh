#!/usr/bin/env bash
# Issue 13's H200 measurements that helper 13 (stop 26) ran out of device time for, each under a timeout sized for a
# cold machine (its second call printed nothing within 66 s: two workers and a bare engine starting). Run from
# anywhere, .gpu carried: bash bench/h200_issue13.sh PREV, where PREV is a checkout of the commit to compare against
# (e.g. `git archive <main before issue-13-s26> | tar -x -C .wtprev`, carried too). Steps, most wanted first:
#   1. the GPU tests that a packed launch does not synchronize (CLS and mean pooling; bge-m3 three outputs), with the
#      kernel variants;
#   2. bulk MiniLM 100k through Redis + Parquet against PREV in the same rounds, plus a 1 ms switch interval variant;
#   3. bulk, BERT-large architecture (CLS pooling: the sync never applied there), 30k texts, against PREV;
#   4. short texts, MiniLM, against PREV (mean pooling: the sync applied to every batch);
#   5. embedfleet run on the sample corpus, twice.
# The limits add up to more than one call should take (~16 min): on a warm machine steps 1-2 took ~4 min in
# helper 13's first call; run the first steps, or comment steps out, to fit the device time left.
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
PREV=$(cd "${1:?usage: bash bench/h200_issue13.sh PREV_CHECKOUT}" && pwd) || exit 1
source .gpu/env.sh || exit 1
# env.sh puts the project root on PYTHONPATH; keep it, and the bench's workers run from their own checkouts
export PYTHONPATH=/tmp/site:$ROOT/.gpu/shim:$ROOT EMBEDFLEET_CACHE=/tmp/efcache
date -u; git log -1 --format=%h 2>/dev/null; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
echo "== 1 GPU test: launches queue without a device sync"; date -u +%T
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/backends/test_gpu_paths.py tests/backends/test_gpu_outputs.py \
  -k "launch_queues or kernel_variants" 2>&1 | tail -4
echo "== 2 bulk MiniLM 100k: this vs $PREV, + si1"; date -u +%T
timeout 240 python3 -m bench.bulk --n 100000 --device cuda --dtype bfloat16 --rounds 2 --concurrency 4 \
  --variant "prev@$PREV" --variant si1:EMBEDFLEET_SWITCH_INTERVAL=0.001 --out $OUT/bulk.md > $OUT/bulk.log 2>&1
echo rc=$?; grep -v "Loading weights" $OUT/bulk.log | tail -16
echo "== 3 bulk BERT-large arch 30k: this vs $PREV"; date -u +%T
timeout 60 python3 -c "from pathlib import Path; from bench.gpu import build_model; build_model('bge-large', Path('/tmp/bl'), False)"
timeout 240 python3 -m bench.bulk --n 30000 --model /tmp/bl --device cuda --dtype bfloat16 --rounds 2 --concurrency 4 \
  --variant "prev@$PREV" --out $OUT/bulk-large.md > $OUT/bulk-large.log 2>&1
echo rc=$?; grep -v "Loading weights" $OUT/bulk-large.log | tail -12
echo "== 4 short texts, MiniLM: this vs $PREV"; date -u +%T
timeout 150 python3 -m bench.host --against "$PREV" --device cuda --workloads short --backends torch --n 60000 --rounds 2 \
  --passes 3 --dtype bfloat16 --budget 65536 > $OUT/host.log 2>&1; echo rc=$?; tail -6 $OUT/host.log
echo "== 5 embedfleet run x2"
for i in 1 2; do timeout 60 embedfleet run data/sample-corpus.parquet --out /tmp/run$i --id-column id --device cuda \
  --dtype bfloat16 2>&1 | tail -2; done
date -u +%T
