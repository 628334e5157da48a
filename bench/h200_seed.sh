#!/usr/bin/env bash
# Issue 13's seed/mixed kernels (BERT-large architecture) on the H200, one call, each step under a timeout and
# printing as it goes: bash bench/h200_seed.sh PREV [STEPS], from a copy of this tree with .gpu carried beside
# it, PREV a checkout of the commit to compare against (carried too); T1, T2: steps 1 and 2's time limits (s).
# Steps (default 123), in this order:
#   1. throughput, PREV's engine (bf16, budget 65,536) on seed and mixed, measured by this script (--code-root):
#      best of 2 passes, then one profiled pass each (device busy time, gaps, time by kernel kind);
#   2. this tree, one process: the same throughput, the engine's launches taking turns on two CUDA streams, and
#      sentence-transformers fp16 (last: a call cut short keeps the engines' figures); then the profile section (the backend alone on the workloads cut into
#      the engine's batches, per variant and budget, a profiled pass each) and the micro section (the layer's
#      GEMMs, fused LayerNorm and attention alone);
#   3. the GPU tests of the dense-groups and flash paths and the kernel variants (two streams too) against fp32;
#   4. quality: the engine on the bundled MiniLM against sentence-transformers fp32 (2,100 texts);
#   5. the GEMMs alone again with a 64 MiB cuBLASLt workspace (CUBLASLT_WORKSPACE_SIZE, read at handle creation).
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
PREV=$(cd "${1:?usage: bash bench/h200_seed.sh PREV_CHECKOUT [STEPS]}" && pwd) || exit 1
STEPS=${2:-123}
OUT=${OUT:-/tmp/h200-out}; mkdir -p "$OUT"
SHIM=${SHIM:-$ROOT/../.gpu/shim}
export EMBEDFLEET_CACHE=${EMBEDFLEET_CACHE:-/tmp/efcache} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
date -u; nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader
step() { [[ $STEPS == *$1* ]] && { echo "== $1 $2"; date -u +%T; }; }
keep() { grep -v "Loading weights" | grep -E "^\[|SUMMARY|tok/s|passed|failed|Error|error" | cut -c1-700; }
if step 1 "throughput, $PREV"; then
  PYTHONPATH=/tmp/site:$SHIM:$PREV timeout ${T1:-50} python3 bench/gpu.py --code-root "$PREV" --sections throughput --passes 2 \
    --engines bfloat16:default:65536 --baselines none --timeline --label " (previous)" \
    --out $OUT/prev.md --json $OUT/prev.json 2>&1 | keep
fi
if step 2 "this tree: throughput beside sentence-transformers, profile, micro"; then
  PYTHONPATH=/tmp/site:$SHIM:$ROOT timeout ${T2:-115} python3 bench/gpu.py --sections throughput,profile,micro --passes 2 \
    --engines bfloat16:default:65536,bfloat16:streams2:65536 --baselines st --timeline \
    --out $OUT/this.md --json $OUT/this.json 2>&1 | keep
fi
if step 3 "GPU tests: dense groups, flash varlen, kernel variants"; then
  PYTHONPATH=/tmp/site:$SHIM:$ROOT timeout 45 python3 -m pytest -q -p no:cacheprovider tests/backends/test_gpu_paths.py \
    -k "dense_attention or kernel_variants or flash_varlen" 2>&1 | tail -4
fi
if step 4 "quality on the bundled MiniLM"; then
  PYTHONPATH=/tmp/site:$SHIM:$ROOT timeout 45 python3 bench/gpu.py --sections quality --quality-engines bfloat16:default \
    --quality-budget 65536 --out $OUT/quality.md 2>&1 | keep
fi
if step 5 "the GEMMs alone again with a 64 MiB cuBLASLt workspace"; then
  CUBLASLT_WORKSPACE_SIZE=65536 PYTHONPATH=/tmp/site:$SHIM:$ROOT timeout 40 python3 bench/gpu.py --sections micro \
    --out $OUT/micro-ws.md 2>&1 | grep -E "micro|Error|error" | cut -c1-300
fi
date -u
