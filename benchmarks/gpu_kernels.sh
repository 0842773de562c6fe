#!/usr/bin/env bash
# The one device script for the Triton kernels: GPU tests, benchmarks, tile sweeps and ncu profiles, in one call.
#   bash benchmarks/gpu_kernels.sh        (on a CUDA machine, from the repository root; logs under $OUT or ./bench_out)
# Env:
#   STEPS="tests moe sweep ncu hessian ncu_hessian hsweep"   the parts, in order (default: tests hessian moe)
#   MS="1,8,4096" MODELS="mixtral,qwen3"  limit the MoE benchmark;  SWEEP="mixtral:4096,qwen3:16" the sweep points
#   V1=.devbuild/moe_v1/kernels           an earlier kernels/ folder timed side by side (column v1_us) and profiled
#   NCU_POINTS="mixtral:16,mixtral:4096"  points profiled by `ncu --set full` (GEMM1 + GEMM2 of ours; of $NCU_V1 first)
#   HESSIAN_ARGS="--tokens 65536"          arguments of bench_hessian.py
#   HESSIAN_MODES="GPTQ,AGQ,AGQ-rows"      the modes step ncu_hessian profiles (`ncu --set full`, DSV2 gate_up, 64k)
#                                          and step hsweep times (default there GPTQ,GPTQ-rows,AGQ-rows)
#   HSWEEP_CONFIGS="128:32:8:5,..."        hsweep's tile configs, block_k:block_t:warps:stages (default: SWEEP)
#   TESTS="tests/test_kernels_fused_moe.py"  the GPU test files (default: both kernel test files); TEST_K="expr": pytest -k
# Logs go to $OUT as they are written; CSVs, plots and ncu exports to a work folder packed into
# $OUT/kernels_run.tgz after every step (a run cut short still returns what it finished); the ncu report
# is copied to $OUT when it is under 15 MB.
# It imports moequant from a shim: every module of the working tree's moequant/ linked, kernels/ linked as
# moequant.kernels (what the editable install maps), and a minimal __init__ so that importing moequant.models
# or moequant.kernels does not import the whole package (nor an unbuilt moequant._C).
set -o pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
W=$(mktemp -d)
. "$(dirname "$0")/shim.sh"  # ROOT, SITE, PYTHONPATH (moequant from the working tree)
PY=${PY:-python3}
t0=$SECONDS
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; date -u; } 2>&1 \
  | tee "$OUT/env.log"
rc=0
V1ARG=${V1:+--v1 $V1}
NCU_V1ARG=${NCU_V1:+--v1 $NCU_V1}
TESTS=${TESTS:-tests/test_kernels_fused_moe.py tests/test_kernels_hessians.py}
for step in ${STEPS:-tests hessian moe}; do
  echo "== step $step at $((SECONDS - t0)) s"
  case $step in
    tests) # from $SITE: python -m puts the working directory first on sys.path, and the root's moequant/ is not the shim
           (cd "$SITE" && $PY -m pytest -q -p no:cacheprovider --durations=5 ${TEST_K:+-k "$TEST_K"} $(for t in $TESTS; do echo "$ROOT/$t"; done)) \
             2>&1 | tee "$OUT/gpu_tests.log" | tail -15 || rc=1 ;;
    hessian) $PY benchmarks/bench_hessian.py ${HESSIAN_ARGS:-} --out "$W" 2>&1 | tee "$OUT/bench_hessian.log" || rc=1 ;;
    moe) $PY benchmarks/bench_moe_gemm.py ${MS:+--ms $MS} ${MODELS:+--models $MODELS} $V1ARG --out "$W" 2>&1 \
           | tee "$OUT/bench_moe_gemm.log" || rc=1 ;;
    sweep) $PY benchmarks/bench_moe_gemm.py --sweep "${SWEEP:-mixtral:4096,mixtral:16}" --out "$W" 2>&1 \
             | tee "$OUT/sweep.log" || rc=1 ;;
    ncu) ncu --set full --clock-control none -k regex:_moe_gemm -f -o "$W/ncu_moe" \
           $PY benchmarks/bench_moe_gemm.py --profile "${NCU_POINTS:-mixtral:16,mixtral:4096}" $NCU_V1ARG --out "$W" \
           > "$OUT/ncu_run.log" 2>&1 || { rc=1; tail -20 "$OUT/ncu_run.log"; }
         ncu --import "$W/ncu_moe.ncu-rep" --page raw --csv > "$W/ncu_raw.csv" 2>>"$OUT/ncu_run.log"
         ncu --import "$W/ncu_moe.ncu-rep" --page details --csv > "$W/ncu_details.csv" 2>>"$OUT/ncu_run.log"
         $PY benchmarks/bench_moe_gemm.py --ncu-summary "$W/ncu_raw.csv" --out "$W" 2>&1 | tee "$OUT/ncu_summary.log" \
           || rc=1 ;;
    hsweep) $PY benchmarks/bench_hessian.py --sweep --modes "${HESSIAN_MODES:-GPTQ,GPTQ-rows,AGQ-rows}" \
              ${HSWEEP_CONFIGS:+--configs $HSWEEP_CONFIGS} --out "$W" 2>&1 | tee "$OUT/hessian_sweep.log" || rc=1 ;;
    ncu_hessian) ncu --set full --clock-control none -k regex:'_expert_hessian|_sorted_rows' -f -o "$W/ncu_hessian" \
           $PY benchmarks/bench_hessian.py --profile --modes "${HESSIAN_MODES:-GPTQ,AGQ,AGQ-rows}" --out "$W" \
           > "$OUT/ncu_hessian_run.log" 2>&1 || { rc=1; tail -20 "$OUT/ncu_hessian_run.log"; }
         ncu --import "$W/ncu_hessian.ncu-rep" --page raw --csv > "$W/ncu_hessian_raw.csv" 2>>"$OUT/ncu_hessian_run.log"
         ncu --import "$W/ncu_hessian.ncu-rep" --page details --csv > "$W/ncu_hessian_details.csv" \
           2>>"$OUT/ncu_hessian_run.log"
         $PY benchmarks/bench_moe_gemm.py --ncu-summary "$W/ncu_hessian_raw.csv" --out "$W" 2>&1 \
           | tee "$OUT/ncu_hessian_summary.log" || rc=1 ;;
    *) echo "unknown step $step"; rc=1 ;;
  esac
  tar czf "$OUT/kernels_run.tgz" -C "$W" --exclude='*.ncu-rep' .
done
if [ -f "$W/ncu_moe.ncu-rep" ] && [ "$(stat -c %s "$W/ncu_moe.ncu-rep")" -lt 15000000 ]; then cp "$W/ncu_moe.ncu-rep" "$OUT/"; fi
echo "== done at $((SECONDS - t0)) s, rc=$rc"
exit $rc
