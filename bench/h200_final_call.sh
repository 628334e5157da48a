#!/usr/bin/env bash
# The lead's final H200 call of stop 25 (bench/RESULTS.md): GPU tests on main, then the measurements the helpers could not make; each step under a timeout that fits the session's last device minutes. Run from anywhere: bash bench/h200_final_call.sh (with .gpu carried).
set -o pipefail
cd "$(dirname "$0")/.."
source .gpu/env.sh
export EMBEDFLEET_CACHE=/tmp/efcache
date -u; git log -1 --format=%h 2>/dev/null; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
echo "== 1 GPU tests"; date -u +%T
timeout 120 python3 -m pytest -q -x tests/backends/test_gpu_outputs.py tests/backends/test_gpu_paths.py 2>&1 | tee $OUT/tests.log | tail -12
echo "== 2 memory probes"; date -u +%T
timeout 110 python3 bench/outputs.py --workdir /tmp/ebo --memory-only --probes transformers-fp16,embedfleet-fp16-three,embedfleet-fp16-dense --out $OUT/memory.md > $OUT/memory.log 2>&1; echo rc=$?; tail -25 $OUT/memory.log
echo "== 3 bulk MiniLM 100k"; date -u +%T
timeout 90 python3 -m bench.bulk --n 100000 --device cuda --dtype bfloat16 --rounds 2 --concurrency 4 --out $OUT/bulk.md > $OUT/bulk.log 2>&1; echo rc=$?; tail -25 $OUT/bulk.log
echo "== 3b embedfleet run x2"; for i in 1 2; do timeout 25 embedfleet run data/sample-corpus.parquet --out /tmp/run$i --id-column id --device cuda --dtype bfloat16 2>&1 | tail -2; done
echo "== 4 facade"; date -u +%T
timeout 100 taskset -c 0-11 python3 -m bench.facade_load --device cuda --dtype float16 --paths engine,thin --thin-facade "j16=--jobs-per-worker 16" --clients 96 --batch-clients 32 --seconds 1.5 --warmup 1 --passes 2 --facade-processes 4 --gen-procs 3 --gen-cpus 12-15 --out $OUT/facade.md > $OUT/facade.log 2>&1; echo rc=$?; tail -30 $OUT/facade.log
date -u +%T
