#!/usr/bin/env bash
# The device script for quantization speed (issue 8): GPU tests of the pipeline and GPTQ, then bench_quantize.py.
#   STEPS="tests bench" BENCH_ARGS="--cases mixtral-8x7b:3 --baseline mixtral-8x7b" bash benchmarks/gpu_quantize.sh
# Env: STEPS (tests, bench; default both), BENCH_ARGS (passed to bench_quantize.py), BENCH_TIMEOUT (seconds).
# Like gpu_kernels.sh it imports moequant from a shim (the device has no editable install): every module of the
# working tree's moequant/ linked, kernels/ linked as moequant.kernels, and a minimal __init__ (no moequant._C).
# Logs go to $OUT (or ./bench_out): gpu_tests.log, bench_quantize.{log,md,json}.
set -o pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
. "$(dirname "$0")/shim.sh"  # ROOT, SITE, PYTHONPATH (moequant from the working tree)
PY=${PY:-python3}
t0=$SECONDS
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  $PY -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__,
"transformers", transformers.__version__)'; nproc; free -g; date -u; } 2>&1 | tee "$OUT/env.log"
rc=0
for step in ${STEPS:-tests bench}; do
  echo "== step $step at $((SECONDS - t0)) s"
  case $step in
    tests) (cd "$SITE" && $PY -m pytest -q -p no:cacheprovider -m gpu "$ROOT/tests/test_scale.py") 2>&1 \
             | tee "$OUT/gpu_tests.log" | tail -20 || rc=1 ;;
    bench) timeout "${BENCH_TIMEOUT:-1800}" $PY benchmarks/bench_quantize.py --out "$OUT" $BENCH_ARGS || rc=1 ;;
    *) echo "unknown step $step"; rc=1 ;;
  esac
done
echo "== done at $((SECONDS - t0)) s (rc $rc)"
exit $rc
