#!/usr/bin/env bash
# Issue 20's H200 call (bench/RESULTS-facade.md): the engine's cycle for small calls, then the thin
# facade under load, this tree against another checkout (the previous commit's tree) in the same
# call. Each step has its own timeout, sized for a cold machine. Run from the main checkout's root,
# with this tree and the other carried beside .gpu: bash .wt20/bench/h200_issue20.sh .wt20prev
set -o pipefail
source .gpu/env.sh || exit 1
ROOT=$(cd "${1:?the other checkout}" && pwd)
cd "$(dirname "$0")/.."
export EMBEDFLEET_CACHE=/tmp/efcache
date -u; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader; nproc
echo "== 1 engine cycle (bundled MiniLM fp16, this tree then $ROOT)"; date -u +%T
timeout 70 taskset -c 0-11 python3 -m bench.engine_cycle --model bundled --device cuda --dtype float16 \
  --clients 1,96 --seconds 1.5 --warmup 0.5 --passes 2 --against "$ROOT" > "$OUT/cycle.log" 2>&1; echo rc=$?
tail -12 "$OUT/cycle.log"
echo "== 2 facade load (thin, 4 facade processes; engine and thin of both trees)"; date -u +%T
timeout 140 taskset -c 0-11 python3 -m bench.facade_load --device cuda --dtype float16 --paths engine,thin \
  --contender "$ROOT" --contender-paths engine,thin --clients 96 --batch-clients 32 --seconds 2 --warmup 1 \
  --passes 2 --facade-processes 4 --gen-procs 3 --gen-cpus 12-15 --out "$OUT/facade.md" > "$OUT/facade.log" 2>&1
echo rc=$?; tail -45 "$OUT/facade.log"
date -u +%T
