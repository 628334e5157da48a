#!/usr/bin/env bash
# The lead's final H200 calls of stop 27 (bench/RESULTS.md): this tree against PREV (the stop's starting
# commit) in the same call, every step under a timeout sized for a cold machine, printing as it goes.
# Run from the repo root with .gpu and PREV carried (PREV: git archive <commit> | tar -x -C .wtprev):
#   bash bench/h200_final_call.sh .wtprev 1234     # first call (issue 13)
#   bash bench/h200_final_call.sh .wtprev 56       # second call, on the warm machine (issues 13 and 20)
# Steps:
#   1. GPU tests of the packed launch: no sync (eager and graph replay), replays = eager, kernel variants,
#      bge-m3's three outputs;
#   2. the graphed engine's per-vector cosine to fp32 on the bundled model (bench.launch_diag --quality-only);
#   3. bulk MiniLM 100k through Redis + Parquet: this, PREV, and this with EMBEDFLEET_CUDA_GRAPHS=true, same rounds;
#   4. embedfleet run on the sample corpus: twice eager (the first cold), once with graphs;
#   5. short texts, MiniLM, bare engine: this vs PREV (bench.host);
#   6. issue 20's thin facade under load, this vs PREV (bench/h200_issue20.sh).
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
PREV=$(cd "${1:?usage: bash bench/h200_final_call.sh PREV_CHECKOUT [STEPS]}" && pwd) || exit 1
STEPS=${2:-123456}
source .gpu/env.sh || exit 1
export PYTHONPATH=/tmp/site:$ROOT/.gpu/shim:$ROOT EMBEDFLEET_CACHE=/tmp/efcache
OUT=${OUT:-/tmp/h200-out}; mkdir -p "$OUT"
date -u; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
step() { [[ $STEPS == *$1* ]] && { echo "== $1 $2"; date -u +%T; }; }
if step 1 "GPU tests: no sync in a launch, graph replays = eager, kernel variants, bge-m3 outputs"; then
  timeout 110 python3 -m pytest -q -p no:cacheprovider tests/backends/test_gpu_paths.py tests/backends/test_gpu_outputs.py \
    -k "launch_queues or graph or kernel_variants or three" 2>&1 | tail -6
fi
if step 2 "graphed engine vs fp32, bundled model"; then
  timeout 60 python3 -m bench.launch_diag --quality-only 2>&1 | grep -v "Loading weights" | tail -8
fi
if step 3 "bulk MiniLM 100k: this, PREV, this with graphs"; then
  timeout 250 python3 -m bench.bulk --n 100000 --device cuda --dtype bfloat16 --rounds 2 --concurrency 4 \
    --variant "prev@$PREV" --variant graphs:EMBEDFLEET_CUDA_GRAPHS=true --out $OUT/bulk.md > $OUT/bulk.log 2>&1
  echo rc=$?; grep -v "Loading weights" $OUT/bulk.log | tail -18
fi
if step 4 "embedfleet run: eager x2, graphs x1"; then
  for limit in 60 35; do timeout $limit embedfleet run data/sample-corpus.parquet --out /tmp/run$limit --id-column id \
    --device cuda --dtype bfloat16 2>&1 | tail -2; done
  EMBEDFLEET_CUDA_GRAPHS=true timeout 35 embedfleet run data/sample-corpus.parquet --out /tmp/rung --id-column id \
    --device cuda --dtype bfloat16 2>&1 | tail -2
fi
if step 5 "short texts, MiniLM: this vs PREV"; then
  timeout 150 python3 -m bench.host --against "$PREV" --device cuda --workloads short --backends torch --n 60000 \
    --rounds 2 --passes 2 --dtype bfloat16 --budget 65536 > $OUT/host.log 2>&1; echo rc=$?; grep -E "^round|^\|" $OUT/host.log | tail -12
fi
if step 6 "thin facade under load: this vs PREV"; then
  bash bench/h200_issue20.sh "$PREV"
fi
date -u +%T
