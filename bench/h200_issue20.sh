#!/usr/bin/env bash
# Issue 20's H200 call (bench/RESULTS-facade.md): the thin facade under load, this tree against another
# checkout (an older commit's tree) in the same call, with an extra thin path of this tree (THIN_FACADE, default
# thin[j8]: 8 jobs in flight per worker and facade process), then each of this tree's thin paths once more under py-spy (GIL samples, 1 and
# 32 texts a request). Each step has its own timeout, sized for a cold machine. Run from the main
# checkout's root with this tree, the other and (optionally) a py-spy binary (py-spy.xz) carried beside
# .gpu: bash .wt20/bench/h200_issue20.sh .wt20prev [.wt20tools/py-spy.xz]
set -o pipefail
source .gpu/env.sh || exit 1
ROOT=$(cd "${1:?the other checkout}" && pwd)
SPY=${2:+$(cd "$(dirname "$2")" && pwd)/$(basename "$2")}
cd "$(dirname "$0")/.."
export EMBEDFLEET_CACHE=/tmp/efcache PYTHONPATH=/tmp/site:$OLDPWD/.gpu/shim:$(pwd)
if [ -n "$SPY" ] && [ -f "$SPY" ]; then
  mkdir -p /tmp/spy && python3 -c "import lzma, sys; open('/tmp/spy/py-spy', 'wb').write(lzma.open(sys.argv[1]).read())" \
    "$SPY" && chmod +x /tmp/spy/py-spy && export PATH=/tmp/spy:$PATH
fi
date -u; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader; nproc; which py-spy
echo "== facade load (thin, 4 facade processes; engine and thin of both trees; thin[THIN_FACADE] of this one)"; date -u +%T
PROFILE=(); command -v py-spy >/dev/null && PROFILE=(--profile "$OUT/prof.md" --profile-batch 1,32 --profile-rate 250)
# THIN_FACADE: an extra thin path of this tree, NAME=its facade's options ("" for none); LIMIT, SECONDS_: the
# step's limit and a pass's length in seconds
EXTRA=(); [ -n "${THIN_FACADE-j8=--jobs-per-worker 8}" ] && EXTRA=(--thin-facade "${THIN_FACADE-j8=--jobs-per-worker 8}")
timeout "${LIMIT:-112}" taskset -c 0-11 python3 -m bench.facade_load --device cuda --dtype float16 --paths engine,thin \
  "${EXTRA[@]}" --contender "$ROOT" --contender-paths thin \
  --clients 96 --batch-clients 32 --seconds "${SECONDS_:-2}" --warmup 0.5 --passes 2 --facade-processes 4 --gen-procs 3 \
  --gen-cpus 12-15 --out "$OUT/facade.md" "${PROFILE[@]}" > "$OUT/facade.log" 2>&1
rc=$?; echo rc=$rc; date -u +%T
if [ $rc -ne 0 ]; then  # which server stopped, and why: the tail of every server log of the run
  for f in /tmp/ef-load-*/*.log; do echo "--- $f"; grep -v "Loading weights" "$f" | tail -n 12; done > "$OUT/server-logs.txt" 2>&1
  tail -c 6000 "$OUT/server-logs.txt"
fi
ls "$OUT"/*.raw >/dev/null 2>&1 && (cd "$OUT" && python3 -c "import glob, tarfile; t = tarfile.open('prof-raw.tar.xz', 'w:xz'); [t.add(f) for f in sorted(glob.glob('*.raw'))]; t.close()" && rm -f ./*.raw)
tail -40 "$OUT/facade.log"
grep -A14 "worker, " "$OUT/prof.md" 2>/dev/null | head -70
date -u +%T
