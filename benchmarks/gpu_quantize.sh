#!/usr/bin/env bash
# The device script for quantization speed (issue 8): GPU tests of the pipeline, GPTQ and the expert Hessians, then
# bench_quantize.py on the working tree ("bench") and on a baseline version of the pipeline ("base"), a comparison of
# their packed bits, and bench_quantize_parts.py.
#   STEPS="tests base bench compare parts" BENCH_ARGS="--cases mixtral-8x7b:5 --profile-layer 2" \
#     bash benchmarks/gpu_quantize.sh
# Env: STEPS (tests, base, bench, compare, parts, extra, extra2; default "tests bench"), BENCH_ARGS (passed to both
# bench runs), EXTRA_ARGS / EXTRA2_ARGS (more bench runs on the working tree, steps "extra" / "extra2"), PARTS
# (bench_quantize_parts --parts),
# BASE (folder holding the baseline's versions of changed files at their repo paths, e.g. out/baseline_v2/moequant/
# pipeline.py and out/baseline_v2/kernels/expert_hessians.py from `git show HEAD:PATH`; carried: out/ is ignored),
# STEP_TIMEOUT (seconds per step, default 600), END (seconds after the start by which the steps must be over).
# Like gpu_kernels.sh it imports moequant from a shim (the device has no editable install): every module of the
# working tree's moequant/ linked, kernels/ linked as moequant.kernels, and a minimal __init__ (no moequant._C).
# Logs go to $OUT (or ./bench_out). At the end everything is packed into results.tgz and traces.tgz (split into
# parts of 15 MB) because only a few files come back from the device.
set -o pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
. "$(dirname "$0")/shim.sh"  # ROOT, SITE, PYTHONPATH (moequant from the working tree)
PY=${PY:-python3}
BASE=${BASE:-out/baseline_v2}
t0=$SECONDS
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  $PY -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__,
"transformers", transformers.__version__)'; nproc; free -g; date -u; } 2>&1 | tee "$OUT/env.log"

base_site() {  # a copy of the shim with the baseline's files in place of the working tree's
  local b
  b=$(mktemp -d)
  cp -rL "$SITE/moequant" "$b/moequant"
  [ -d "$BASE/moequant" ] && cp -r "$BASE/moequant/." "$b/moequant/"
  [ -d "$BASE/kernels" ] && cp -r "$BASE/kernels/." "$b/moequant/kernels/"
  echo "$b"
}

compare() {  # packed-bit digests of the cases both runs measured
  $PY - "$OUT/bench_quantize_base.json" "$OUT/bench_quantize_new.json" <<'EOF'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
for ca in a["cases"]:
    cb = next((c for c in b["cases"] if c["case"] == ca["case"] and c["layers_run"] == ca["layers_run"]), None)
    if cb is None or "packed_digest" not in ca or "packed_digest" not in cb:
        continue
    da, db = ca["packed_digest"], cb["packed_digest"]
    diff = [k for k in da if da[k] != db.get(k)]
    print(f"{ca['case']}: {len(da)} packed weights; {'all bit-identical' if not diff else f'{len(diff)} DIFFER'}"
          f" between base and new", diff[:8])
EOF
}

rc=0
for step in ${STEPS:-tests bench}; do
  echo "== step $step at $((SECONDS - t0)) s"
  limit=${STEP_TIMEOUT:-600}
  if [ -n "$END" ]; then  # END: seconds after the start by which every step must be over (the files still get packed)
    left=$((END - (SECONDS - t0)))
    [ "$left" -lt 30 ] && { echo "== skipping $step: ${left} s left before END"; rc=1; continue; }
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  T="timeout $limit"
  case $step in
    tests) # test_scale's GPU tests carry the gpu marker; the Hessian kernel's test file is GPU-or-interpreter as a whole
           (cd "$SITE" && $T $PY -m pytest -q -p no:cacheprovider -m gpu "$ROOT/tests/test_scale.py";
            $T $PY -m pytest -q -p no:cacheprovider "$ROOT/tests/test_kernels_hessians.py") 2>&1 \
             | tee "$OUT/gpu_tests.log" | tail -25 || rc=1 ;;
    base) PYTHONPATH="$(base_site)${PYTHONPATH:+:$PYTHONPATH}" $T $PY benchmarks/bench_quantize.py --out "$OUT" \
            --tag base --hash $BENCH_ARGS || rc=1 ;;
    bench) $T $PY benchmarks/bench_quantize.py --out "$OUT" --tag new --hash $BENCH_ARGS || rc=1 ;;
    extra) $T $PY benchmarks/bench_quantize.py --out "$OUT" --tag extra $EXTRA_ARGS || rc=1 ;;
    extra2) $T $PY benchmarks/bench_quantize.py --out "$OUT" --tag extra2 $EXTRA2_ARGS || rc=1 ;;
    compare) compare 2>&1 | tee "$OUT/compare.log" || rc=1 ;;
    parts) $T $PY benchmarks/bench_quantize_parts.py --out "$OUT" ${PARTS:+--parts $PARTS} || rc=1 ;;
    *) echo "unknown step $step"; rc=1 ;;
  esac
done
echo "== done at $((SECONDS - t0)) s (rc $rc)"
(cd "$OUT" && ls -la && tar czf traces.tgz --remove-files $(ls *.json.gz 2>/dev/null) 2>/dev/null;
 [ -f traces.tgz ] && split -b 15M -d traces.tgz traces.tgz. && rm traces.tgz;
 tar czf results.tgz --remove-files $(ls | grep -v '^traces.tgz' | grep -v '^results.tgz'); ls -la)
exit $rc
