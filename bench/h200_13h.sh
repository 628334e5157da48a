#!/usr/bin/env bash
# Issue 13's host-path figures on the H200 in one call (stop 28, helper 13h), steps in the order given, each step
# under a timeout cut to what is left of the call's own deadline, printing as it goes.
# Run from this checkout's root with the project root's .gpu kit set up:
#   bash bench/h200_13h.sh PREV [STEPS] [SECONDS]
# e.g. with this checkout copied to .wt13h and the older one to .wtprev in the project root (carry .gpu .wt13h
# .wtprev; under 64 MiB with the copies' tests/ left out):
#   source .gpu/env.sh && cd .wt13h && export PYTHONPATH=/tmp/site:$PWD/../.gpu/shim:$PWD EMBEDFLEET_CACHE=/tmp/efcache \
#     && bash bench/h200_13h.sh ../.wtprev 21 200
# For step 1's GIL profile, carry py-spy's manylinux wheel too, unpack it (python3 -m zipfile -e WHEEL /tmp/pyspy) and
# set PYSPY to /tmp/pyspy/py_spy-*.data/scripts/py-spy (chmod +x).
# PREV: a checkout of the commit to compare against; STEPS: the steps to run, in that order (default 12345); SECONDS:
# the deadline for the whole script (default 220). Steps:
#   1. bulk MiniLM 100k through Redis + Parquet: the bare engine with CUDA graphs (the default since 34e15b5)
#      beside the fleet with graphs, and a fleet with 4 batches in flight instead of 2 (slack for the device
#      thread's waits for the GIL), per-shard stages and timeline, py-spy's GIL holders in the last round
#      (with py-spy at $PYSPY);
#   2. `embedfleet run` on the sample corpus: this vs PREV, 2 rounds, with the shards' timeline;
#   3. short texts, bge-base arch (bench/gpu.py's short section, sentence-transformers fp16 at batch 256);
#   4. bulk BERT-large arch 20k (not graphed: over the size rule), bare vs fleet;
#   5. short texts, MiniLM, bare engine: this, this with 4 batches in flight, and this with blocking CUDA
#      waits (stop 29), with the engine process's CPU a text less the post thread's wait for the device
#      (wait_cpu_ms);
#   6. (stop 29) short texts, MiniLM, bare engine: this vs PREV vs this with blocking CUDA waits
#      (EMBEDFLEET_CUDA_WAIT=block: the post thread sleeps instead of spinning) vs this with tokenizer chunks of
#      512 instead of 256 (half the round trips to the tokenizer processes), CPU a text each;
#   7. (stop 29) bulk MiniLM 100k through Redis + Parquet: bare engine, fleet, fleet with blocking waits.
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
PREV=$(cd "${1:?usage: bash bench/h200_13h.sh PREV_CHECKOUT [STEPS] [SECONDS]}" && pwd) || exit 1
STEPS=${2:-12345}
END=$((SECONDS + ${3:-220}))
OUT=${OUT:-/tmp/h200-out}; mkdir -p "$OUT" /tmp/ef-gpu  # at most 8 files come back from $OUT: logs only
PYSPY=${PYSPY:-}
date -u; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader; nproc
left() { local l=$((END - SECONDS)); (( l > $1 )) && echo "$1" || echo "$(( l > 5 ? l : 5 ))"; }
s1() {
  echo "== 1 bulk MiniLM 100k: graphed bare vs graphed fleets (2 and 4 in flight) ($(date -u +%T), $((END - SECONDS)) s left)"
  timeout "$(left 110)" python3 -m bench.bulk --n 100000 --device cuda --dtype bfloat16 --rounds 2 --concurrency 4 \
    --variant f4:EMBEDFLEET_BATCHES_IN_FLIGHT=4 ${PYSPY:+--py-spy "$PYSPY" --profile-dir /tmp/ef-gil} \
    > "$OUT/bulk.log" 2>&1
  echo rc=$?; grep -v "Loading weights" "$OUT/bulk.log" | grep -E "^round|^\||GIL|^    |Fleet" | cut -c1-600
}
s2() {
  echo "== 2 embedfleet run, sample corpus: this vs PREV ($(date -u +%T), $((END - SECONDS)) s left)"
  timeout "$(left 55)" python3 -m bench.run_job --against "$PREV" --rounds 2 --device cuda --dtype bfloat16 \
    > "$OUT/run.log" 2>&1; echo rc=$?; tail -12 "$OUT/run.log" | cut -c1-900
}
s3() {
  (( END - SECONDS > 30 )) || { echo "== 3 skipped: too little time left"; return; }
  echo "== 3 short bge-base arch vs sentence-transformers fp16 ($(date -u +%T), $((END - SECONDS)) s left)"
  timeout "$(left 45)" python3 bench/gpu.py --sections short --short-models "bge-base arch" --short-chunks default \
    --short-processes default --short-st-batches 256 --short-n 30000 --passes 2 --workdir /tmp/ef-gpu \
    --out /tmp/ef-gpu/short.md > "$OUT/gpu-short.log" 2>&1
  echo rc=$?; grep -E "short |tok/s" "$OUT/gpu-short.log" | grep -v Loading | tail -8
}
s4() {
  (( END - SECONDS > 45 )) || { echo "== 4 skipped: too little time left"; return; }
  echo "== 4 bulk BERT-large arch 20k: bare vs fleet ($(date -u +%T), $((END - SECONDS)) s left)"
  timeout "$(left 25)" python3 -c "from pathlib import Path; from bench.gpu import build_model; build_model('bge-large', Path('/tmp/bl'), False)"
  timeout "$(left 90)" python3 -m bench.bulk --n 20000 --model /tmp/bl --device cuda --dtype bfloat16 --rounds 2 \
    --concurrency 4 > "$OUT/bulk-large.log" 2>&1
  echo rc=$?; grep -v "Loading weights" "$OUT/bulk-large.log" | grep -E "^round|^\||Fleet" | cut -c1-500
}
s5() {
  (( END - SECONDS > 40 )) || { echo "== 5 skipped: too little time left"; return; }
  echo "== 5 short MiniLM: this vs 4 batches in flight vs blocking waits ($(date -u +%T), $((END - SECONDS)) s left)"
  timeout "$(left 85)" python3 -m bench.host --device cuda --workloads short --backends torch --n 60000 --rounds 2 \
    --passes 2 --dtype bfloat16 --budget 65536 --variant f4:EMBEDFLEET_BATCHES_IN_FLIGHT=4 \
    --variant block:EMBEDFLEET_CUDA_WAIT=block > "$OUT/host.log" 2>&1
  echo rc=$?; grep -E "^round|^\|" "$OUT/host.log"
}
s6() {
  (( END - SECONDS > 40 )) || { echo "== 6 skipped: too little time left"; return; }
  echo "== 6 short MiniLM: this vs PREV vs blocking waits vs chunks of 512 ($(date -u +%T), $((END - SECONDS)) s left)"
  timeout "$(left 130)" python3 -m bench.host --against "$PREV" --device cuda --workloads short --backends torch \
    --n 60000 --rounds 2 --passes 2 --dtype bfloat16 --budget 65536 --variant block:EMBEDFLEET_CUDA_WAIT=block \
    --variant c512:chunk=512 > "$OUT/host-wait.log" 2>&1
  echo rc=$?; grep -E "^round|^\|" "$OUT/host-wait.log"
}
s7() {
  (( END - SECONDS > 50 )) || { echo "== 7 skipped: too little time left"; return; }
  echo "== 7 bulk MiniLM 100k: bare vs fleet vs fleet with blocking waits ($(date -u +%T), $((END - SECONDS)) s left)"
  timeout "$(left 110)" python3 -m bench.bulk --n 100000 --device cuda --dtype bfloat16 --rounds 2 --concurrency 4 \
    --variant block:EMBEDFLEET_CUDA_WAIT=block > "$OUT/bulk-wait.log" 2>&1
  echo rc=$?; grep -v "Loading weights" "$OUT/bulk-wait.log" | grep -E "^round|^\||Fleet" | cut -c1-600
}
for n in $(echo "$STEPS" | grep -o .); do "s$n"; done
date -u +%T
