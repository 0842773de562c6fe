#!/usr/bin/env bash
# One device run for moequant._C: build (sm_80 + sm_90), GPU tests, ctest, compute-sanitizer
# memcheck, benchmarks. Logs and JSON go to $OUT (default ./out). Run from the repo root:
#   bash benchmarks/gpu_csrc.sh            (STEPS="build test ctest sanitize bench" to choose)
set -u -o pipefail
OUT=${OUT:-./out}
mkdir -p "$OUT"
STEPS=${STEPS:-"build test ctest sanitize ncu bench"}
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
# The device image presets TORCH_CUDA_ARCH_LIST=9.0a; we want sm_80 and sm_90 (MOEQUANT_ARCHS overrides).
export TORCH_CUDA_ARCH_LIST=${MOEQUANT_ARCHS:-"8.0;9.0"} MAX_JOBS=${MAX_JOBS:-16}
PY=${PY:-python3}
declare -A RC
has() { [[ " $STEPS " == *" $1 "* ]]; }
t0=$SECONDS

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/env.log"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/env.log"
nvcc --version | tail -1 | tee -a "$OUT/env.log"

if has build; then
  # ctest build in the background while the extension compiles
  (cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="80;90" >"$OUT/ctest.log" 2>&1 &&
     cmake --build build/cmake -j 4 >>"$OUT/ctest.log" 2>&1; echo "cmake build rc=$?" >>"$OUT/ctest.log") &
  CMAKE_PID=$!
  $PY setup.py build_ext --inplace 2>&1 | tee "$OUT/build.log" | grep -E "moequant:|error|warning" | head -40
  RC[build]=$?
  ls -la moequant/_C*.so | tee -a "$OUT/build.log"
  # without an editable install, moequant.kernels (the Triton kernels, for the comparison) is a link here
  [ -e moequant/kernels ] || ln -s ../kernels moequant/kernels
  cuobjdump --list-elf moequant/_C*.so 2>&1 | tee -a "$OUT/build.log" | grep -o "sm_[0-9]*" | sort | uniq -c
  $PY -c "import moequant.ops as o; assert o.cuda_available(), 'moequant._C has no CUDA'; print('moequant._C WITH_CUDA ok')" || RC[build]=1
  wait $CMAKE_PID
  echo "build done at $((SECONDS - t0)) s"
fi

if has test; then
  # (a hang, e.g. a lost mbarrier phase, ends at STEP_TIMEOUT instead of the whole call)
  MOEQUANT_DECODE_FUSED=${MOEQUANT_DECODE_FUSED:-1} timeout ${STEP_TIMEOUT:-300} $PY -m pytest -q tests/test_csrc_dequant.py \
    tests/test_csrc_moe_decode.py -k "not bad_input" 2>&1 | tee "$OUT/tests.log" | tail -15
  RC[test]=$?
  # the error-path tests apart: a crash there must not hide the others
  $PY -m pytest -q tests/test_csrc_dequant.py tests/test_csrc_moe_decode.py -k "bad_input" 2>&1 | tee -a "$OUT/tests.log" | tail -4
  RC[test_errors]=$?
  # one token through the two-launch kernels too (the run above has the fused kernel on): TMA on every
  # shape it takes (=2), and the register ring (=0)
  for tma in 2 0; do
    MOEQUANT_DECODE_FUSED=0 MOEQUANT_DECODE_TMA=$tma timeout ${STEP_TIMEOUT:-300} $PY -m pytest -q tests/test_csrc_moe_decode.py \
      -k "cuda and (M1 or one_token)" 2>&1 | tee -a "$OUT/tests.log" | tail -2
    RC[test_tma$tma]=$?
  done
  if [ "${RC[test_errors]}" != 0 ]; then
    # where it dies: the Python stack (faulthandler) and the native one (gdb) of the failing pytest process
    $PY -X faulthandler -m pytest -q -p no:cacheprovider tests/test_csrc_dequant.py -k "bad_input" 2>&1 | tail -40 \
      | tee -a "$OUT/tests.log"
    cuda-gdb -batch -ex run -ex bt --args $PY -m pytest -q -p no:cacheprovider tests/test_csrc_dequant.py -k bad_input \
      2>&1 | grep -vE "^\[New Thread|^\[Thread" | grep -A25 "received signal" | cut -c1-400 | tee -a "$OUT/tests.log"
  fi
  echo "tests done at $((SECONDS - t0)) s"
fi

if has ctest; then
  ctest --test-dir build/cmake --output-on-failure --timeout ${STEP_TIMEOUT:-300} 2>&1 | tee -a "$OUT/ctest.log" | tail -8
  RC[ctest]=$?
  timeout ${STEP_TIMEOUT:-300} build/cmake/test_kernels_cuda 2>&1 | tail -30 | tee -a "$OUT/ctest.log"
  if [ "${RC[ctest]}" != 0 ]; then
    cuda-gdb -batch -ex run -ex bt build/cmake/test_kernels_cuda 2>&1 | grep -vE "^\[New Thread|^\[Thread" | tail -20 | tee -a "$OUT/ctest.log"
  fi
fi

if has sanitize; then
  {
    echo "== memcheck: standalone kernel tests"
    compute-sanitizer --tool memcheck --error-exitcode 9 build/cmake/test_kernels_cuda 2>&1 | tail -6
    echo "rc=$?"
    echo "== memcheck: pytest GPU subset"
    compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest -q -x tests/test_csrc_moe_decode.py tests/test_csrc_dequant.py \
      -k "cuda and (M1-E8 or M3-E8 or M12 or many_tokens or b1-40x128 or b0-64x256-int4-g64 or int3-g32 or large_stack)" 2>&1 | tail -8
    echo "rc=$?"
    echo "== racecheck: standalone kernel tests"
    compute-sanitizer --tool racecheck --error-exitcode 9 build/cmake/test_kernels_cuda 2>&1 | tail -4
    echo "rc=$?"
  } 2>&1 | tee "$OUT/sanitizer.log"
  RC[sanitize]=$(grep -c "^rc=[1-9]" "$OUT/sanitizer.log")
  echo "sanitizer done at $((SECONDS - t0)) s"
fi

if has ncu; then
  # what limits the decode kernels: speed of light, memory, occupancy, stall reasons (2 launches of one call)
  for case in ${NCU_CASES:-mixtral:1 qwen3:1 mixtral:8}; do
    set -- ${case/:/ }
    echo "== ncu $1 M=$2" | tee -a "$OUT/ncu.log"
    timeout ${STEP_TIMEOUT:-300} ncu -k regex:moe_decode --launch-skip 2 --launch-count 2 --section SpeedOfLight --section MemoryWorkloadAnalysis \
      --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
      $PY benchmarks/profile_decode.py --shape $1 --m $2 2>&1 | grep -vE "^==PROF==" >> "$OUT/ncu.log"
  done
  # instructions, pipe use and stall reasons (per issued instruction) at Mixtral M=1
  timeout ${STEP_TIMEOUT:-300} ncu -k regex:moe_decode --launch-skip 2 --launch-count 2 --page raw --metrics \
    smsp__inst_executed.sum,gpu__time_duration.sum,dram__bytes_read.sum,regex:sm__inst_executed_pipe_.*.avg.pct_of_peak_sustained_active,regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio,smsp__issue_active.avg.pct_of_peak_sustained_active \
    $PY benchmarks/profile_decode.py --shape mixtral --m 1 2>&1 | grep -vE "^==PROF==|device__" > "$OUT/ncu_raw.log"
  grep -E "== ncu|moe_decode|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Registers Per|Achieved Occupancy|Theoretical Occupancy|Issued Warp|Stall" "$OUT/ncu.log" | head -80
  echo "ncu done at $((SECONDS - t0)) s"
fi

if has bench; then
  $PY benchmarks/bench_dequant.py --json "$OUT/bench_dequant.json" 2>&1 | tee "$OUT/bench.log" | tail -20
  timeout ${STEP_TIMEOUT:-300} $PY benchmarks/bench_decode_moe.py --json "$OUT/bench_decode.json" ${BENCH_ARGS:-} 2>&1 \
    | tee -a "$OUT/bench.log" | grep -E "^\||device|fail|Error|not available"
  RC[bench]=$?
fi

if has paths; then
  # the one-token kernels side by side (TMA, the sm_90 default, and the register ring), then variants
  for tma in ${PATH_TMA:-1 2 0}; do
    echo "== MOEQUANT_DECODE_TMA=$tma" | tee -a "$OUT/paths.log"
    MOEQUANT_DECODE_TMA=$tma $PY benchmarks/bench_decode_moe.py --ms "${PATH_MS:-1}" --no-baselines \
      --json "$OUT/bench_decode_tma$tma.json" 2>&1 | tee -a "$OUT/paths.log" | grep -E "^\||fail|Error"
  done
  for v in ${VARIANTS:-}; do  # env settings joined by +, e.g. VARIANTS="MOEQUANT_DECODE_SPLITS=2,10+MOEQUANT_DECODE_STAGES=3,4"
    echo "== $v" | tee -a "$OUT/paths.log"
    env ${v//+/ } $PY benchmarks/bench_decode_moe.py --shapes "${VARIANT_SHAPES:-mixtral}" --ms "${VARIANT_MS:-1}" --no-baselines 2>&1 \
      | tee -a "$OUT/paths.log" | grep -E "^\| [A-Z]"
  done
  echo "paths done at $((SECONDS - t0)) s"
fi

echo "== summary ($((SECONDS - t0)) s)"
for k in "${!RC[@]}"; do echo "$k rc=${RC[$k]}"; done
