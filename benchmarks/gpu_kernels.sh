#!/usr/bin/env bash
# The one device script for the Triton kernels: GPU tests, then both benchmarks (and optional tile sweeps).
#   bash benchmarks/gpu_kernels.sh            (on a CUDA machine, from the repository root; logs under $OUT or ./bench_out)
# Env: SWEEP="mixtral:4096,qwen3:1" adds MoE tile sweeps, HSWEEP=1 Hessian ones; MS="1,8,4096" and
# MODELS="mixtral,qwen3" limit the MoE benchmark; STEPS="tests moe" picks and orders the parts.
# It imports moequant from a minimal shim (packing, reference, quant, kernels) so that nothing else in the
# package (nor an unbuilt moequant._C) has to be in working order for the kernels to be tested and timed.
set -o pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
ROOT=$(pwd)
SITE=$(mktemp -d)
mkdir -p "$SITE/moequant"
echo '"""shim: the parts of moequant the kernels need"""' > "$SITE/moequant/__init__.py"
for f in packing.py reference.py quant; do ln -s "$ROOT/moequant/$f" "$SITE/moequant/$f"; done
ln -s "$ROOT/kernels" "$SITE/moequant/kernels"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"  # not $ROOT: its moequant/ has no kernels/ (python -m runs from $SITE)
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv; $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; date -u; } 2>&1 | tee "$OUT/gpu_tests.log"
rc=0
# STEPS picks and orders the parts (default: tests hessian moe, plus the sweeps when SWEEP / HSWEEP are set)
STEPS=${STEPS:-"tests hessian moe ${HSWEEP:+hsweep} ${SWEEP:+sweep}"}
for step in $STEPS; do
  case $step in
    tests) (cd "$SITE" && $PY -m pytest -q -p no:cacheprovider --noconftest "$ROOT/tests/test_kernels_hessians.py" \
             "$ROOT/tests/test_kernels_fused_moe.py") 2>&1 | tee -a "$OUT/gpu_tests.log" || rc=1 ;;
    hessian) $PY benchmarks/bench_hessian.py --out "$OUT" 2>&1 | tee "$OUT/bench_hessian.log" || rc=1 ;;
    moe) $PY benchmarks/bench_moe_gemm.py ${MS:+--ms $MS} ${MODELS:+--models $MODELS} --out "$OUT" 2>&1 \
           | tee "$OUT/bench_moe_gemm.log" || rc=1 ;;
    hsweep) $PY benchmarks/bench_hessian.py --sweep --out "$OUT" 2>&1 | tee -a "$OUT/sweep.log" || rc=1 ;;
    sweep) $PY benchmarks/bench_moe_gemm.py --sweep "${SWEEP:-mixtral:4096,mixtral:8}" --out "$OUT" 2>&1 \
             | tee -a "$OUT/sweep.log" || rc=1 ;;
    *) echo "unknown step $step"; rc=1 ;;
  esac
done
exit $rc
