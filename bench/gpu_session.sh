#!/usr/bin/env bash
# One call on a GPU machine: install loraq in place, run the kernel tests on the GPU, then the
# benchmark. Everything lands in $OUT (default bench/results/run-<time>): info.txt (install log,
# versions, host timings), tests.txt, bench.txt, bench.csv, bench.png, bench.md (the targets, met
# or missed, and every row) and the autotune winners under cache/autotune/ (seven files: a device
# call returns eight at most). SEED_CACHE=<folder of autotune .json files> starts from an earlier
# call's winners, so that a second call does not tune again.
# TEST_TIMEOUT / BENCH_TIMEOUT (seconds) keep the call inside a device lease: the benchmark gets 270
# by default, the tests what is left of CALL_BUDGET (default 570 of a device call's 600 s) after
# the install, the benchmark and the SANITIZE and NCU steps asked for, at most 270 and at least 60
# (test_seconds, below; the extension's build counts against it); TESTS picks the
# tests (default "gpu": the GPU-marked large shapes and every tile, lookup and gather config;
# "gemv": those of the lookup and gathering GEMVs alone; "slab": the dense-slab path's; "pairs": int1's
# pair decode's; "cuda" (alias "mma"): the CUDA GEMVs' (the lookup GEMV's too) and the extension's; "all": the files, which compile for many
# minutes); BENCH_DX_LORA=1 also times dX with the LoRA term (--backward-lora); NCU="forward int1
# 8192 28672 16;dx int1 8192 28672 16" (op, format, K, N, M; ';' between problems) profiles the
# kernels the tuner chose for each problem after the benchmark, with the stall reasons, into
# ncu.txt (the eighth file; NCU_TIMEOUT seconds each, default 90); extra arguments go to
# bench_kernels.py. Run
# bench/fetch_baselines.sh first (and carry bench/wheels) to compare with GemLite and bitsandbytes.
# LORAQ_BUILD_EXT=1 builds loraq._C first (its CUDA GEMVs: int1 mma, sparse4x4 gather and mma); SANITIZE=1
# then also runs those kernels' exact and LoRA/bias tests under compute-sanitizer (SANITIZE_TIMEOUT
# seconds, default 240).
set -uo pipefail
cd "$(dirname "$0")/.."

# Seconds for the tests: what CALL_BUDGET leaves after the time spent so far ($SECONDS), the
# benchmark, and the sanitize and ncu steps when asked for (each at its timeout, ncu's per problem);
# 270 at most, 60 at least (then the steps after them may not fit: run them in a call of their own).
test_seconds() {
  local reserve=$(( ${BENCH_TIMEOUT:-270} + 20 )) problems
  [ "${SANITIZE:-0}" = 1 ] && reserve=$(( reserve + ${SANITIZE_TIMEOUT:-240} ))
  if [ -n "${NCU:-}" ]; then
    IFS=';' read -ra problems <<< "$NCU"
    reserve=$(( reserve + ${#problems[@]} * (${NCU_TIMEOUT:-90} + 30) ))  # + the untimed tuning run
  fi
  local left=$(( ${CALL_BUDGET:-570} - SECONDS - reserve ))
  (( left > 270 )) && left=270
  (( left < 60 )) && left=60
  echo "$left"
}
OUT="${OUT:-bench/results/run-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export LORAQ_CACHE_DIR="${LORAQ_CACHE_DIR:-$OUT/cache}"
if [ -n "${SEED_CACHE:-}" ]; then mkdir -p "$LORAQ_CACHE_DIR/autotune" && cp "$SEED_CACHE"/*.json "$LORAQ_CACHE_DIR/autotune/"; fi
INFO="$OUT/info.txt"
# LORAQ_BUILD_EXT=1 builds the extension loraq._C (its CUDA GEMVs become autotune candidates of int1
# and sparse4x4 forwards up to 16 rows): for this GPU's architecture alone, on every core
if [ "${LORAQ_BUILD_EXT:-0}" = 1 ]; then
  [ -d /usr/local/cuda ] && export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
  # the system compiler: a gcc whose C++ runtime gets linked into _C.so (the H100 machine's
  # /opt/gcc) made every refused argument crash Python instead of raising
  [ -x /usr/bin/gcc ] && [ -x /usr/bin/g++ ] && export CC="${CC:-/usr/bin/gcc}" CXX="${CXX:-/usr/bin/g++}"
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}"
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  export LORAQ_CUDA_GEMV="${LORAQ_CUDA_GEMV:-1}"  # the tuner times them (the default; 0 leaves them out)
fi
LORAQ_BUILD_EXT="${LORAQ_BUILD_EXT:-0}" python3 -m pip install -q --no-deps --no-build-isolation -e . \
  > "$INFO" 2>&1 || { cat "$INFO"; exit 1; }
# loraq._C, or a build of `loraq build-ext` in $LORAQ_CACHE_DIR/ext
python3 -c "import torch; from loraq import extension as e; assert not e.load(), e.load(); print('compiled ops from', e.origin(), [o for o in ('int1_gemv_mma', 'sparse4x4_gemv') if hasattr(torch.ops.loraq, o)])" \
  >> "$INFO" 2>&1 || echo "no compiled extension (LORAQ_BUILD_EXT=${LORAQ_BUILD_EXT:-0})" >> "$INFO"
# the other libraries, when bench/fetch_baselines.sh downloaded them (this machine has no network)
if compgen -G "bench/wheels/*" > /dev/null; then
  python3 -m pip install -q --no-deps --no-build-isolation bench/wheels/* >> "$INFO" 2>&1 \
    || echo "installing bench/wheels failed (see info.txt): those providers will be skipped"
fi
python3 -m loraq info 2>&1 | tee -a "$INFO"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit --format=csv >> "$INFO" 2>&1
echo "## host time (bench/profile_host.py)" >> "$INFO"
python3 bench/profile_host.py >> "$INFO" 2>&1; tail -n 8 "$INFO"
# the Python alone on this host (Triton's launches recorded by a fake driver, not run), both launch paths
python3 bench/profile_host.py --stub-kernels --M 1 2>&1 | head -n 5 >> "$INFO"; tail -n 5 "$INFO"
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
KERNEL_TESTS=(tests/test_triton_kernels.py tests/test_int1_gemv_lut.py tests/test_sparse4x4_gemv.py
              tests/test_sparse4x4_gemv_dx.py tests/test_splitk_finish.py tests/test_dense_slab.py
              tests/test_int1_pairs.py tests/test_int1_gemv_mma.py tests/test_int1_gemv_lut_cuda.py tests/test_int1_gemv_lut8_cuda.py
              tests/test_sparse4x4_gemv_cuda.py tests/test_fast_launch.py tests/test_forward_plan.py
              tests/test_training_plan.py)
if [ "${TESTS:-gpu}" = all ]; then SELECT=("${KERNEL_TESTS[@]}" tests/test_bench.py)
elif [ "${TESTS:-gpu}" = slab ]; then SELECT=(tests/test_dense_slab.py tests/test_bench.py -k "gpu or dense_slab")
elif [ "${TESTS:-gpu}" = mma ] || [ "${TESTS:-gpu}" = cuda ]; then
  SELECT=(tests/test_int1_gemv_mma.py tests/test_int1_gemv_lut_cuda.py tests/test_int1_gemv_lut8_cuda.py tests/test_sparse4x4_gemv_cuda.py
          tests/test_ext.py tests/test_forward_plan.py
          tests/test_training_plan.py tests/test_bench.py
          -k "(gpu or mma or gemv or dequantize) and not (compiles or k_slices or fragment or emulat)")  # not the CPU tests
elif [ "${TESTS:-gpu}" = pairs ]; then SELECT=(tests/test_int1_pairs.py tests/test_bench.py -k "gpu or pairs")
elif [ "${TESTS:-gpu}" = gemv ]; then SELECT=("${KERNEL_TESTS[@]:1}" tests/test_bench.py -k "gpu or every_lut or every_gather or finish")
else SELECT=("${KERNEL_TESTS[@]}" tests/test_bench.py -k "gpu or every_tile or every_lut or every_gather or finish"); fi
# in a process group of its own, killed whole before anything is timed: no test process (an xdist
# worker of a pytest that timeout stopped) may still be launching kernels while the benchmark tunes
TEST_SECONDS="${TEST_TIMEOUT:-$(test_seconds)}"
echo "tests: at most $TEST_SECONDS s ($SECONDS s of the call spent)"
setsid timeout "$TEST_SECONDS" python3 -m pytest -q -ra -p no:cacheprovider $XDIST "${SELECT[@]}" \
  > "$OUT/tests.txt" 2>&1 &
TESTS_PID=$!
wait "$TESTS_PID"; TESTS_RC=$?
kill -KILL -- "-$TESTS_PID" 2>/dev/null && sleep 2
echo "tests exit $TESTS_RC"; tail -n 25 "$OUT/tests.txt"
# SANITIZE=1: the CUDA GEMVs' exact and LoRA/bias tests (and the byte-lookup GEMV's one-launch ones) once more under compute-sanitizer's memcheck
# (out-of-bounds and misaligned accesses), appended to tests.txt
if [ "${SANITIZE:-0}" = 1 ]; then
  timeout "${SANITIZE_TIMEOUT:-240}" compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q \
    -p no:cacheprovider tests/test_int1_gemv_mma.py tests/test_int1_gemv_lut_cuda.py tests/test_int1_gemv_lut8_cuda.py \
    tests/test_sparse4x4_gemv_cuda.py -k "(each_weight or each_value or with_and_without or one_launch_every_block) and not emulated" >> "$OUT/tests.txt" 2>&1
  echo "sanitize exit $?" | tee -a "$OUT/tests.txt"
fi
timeout "${BENCH_TIMEOUT:-270}" python3 bench/bench_kernels.py --backward ${BENCH_DX_LORA:+--backward-lora} --csv "$OUT/bench.csv" \
  --plot "$OUT/bench.png" --markdown "$OUT/bench.md" "$@" > "$OUT/bench.txt" 2>&1
echo "bench exit $?"; grep -v '^forward\|^backward' "$OUT/bench.txt" | tail -n 20
# a run killed before it wrote its report: rebuild the report and plot from the printed rows
if [ ! -f "$OUT/bench.md" ] && grep -q '^forward' "$OUT/bench.txt"; then
  python3 bench/bench_kernels.py --from-log "$OUT/bench.txt" --csv "$OUT/bench.csv" --plot "$OUT/bench.png" \
    --markdown "$OUT/bench.md"
fi
[ -f "$OUT/bench.md" ] && sed -n '/## Targets/,/## All rows/p' "$OUT/bench.md"
# ncu on the kernels of one call the tuner chose: tuned first without the profiler (its timings
# would be the profiler's), then one call profiled, selected by run_problem.py's NVTX range
if [ -n "${NCU:-}" ]; then
  IFS=';' read -ra PROBLEMS <<< "$NCU"
  for problem in "${PROBLEMS[@]}"; do
    read -r op fmt k n m <<< "$problem"
    args=(bench/run_problem.py --op "$op" --format "$fmt" --K "$k" --N "$n" --M "$m")
    { echo "## ncu: $problem"; python3 "${args[@]}"; } >> "$OUT/ncu.txt" 2>&1
    timeout "${NCU_TIMEOUT:-90}" ncu --nvtx --nvtx-include "loraq_call/" --section SpeedOfLight \
      --section Occupancy --section LaunchStats --section SchedulerStats --section WarpStateStats \
      --section MemoryWorkloadAnalysis \
      --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
      python3 "${args[@]}" >> "$OUT/ncu.txt" 2>&1
    echo "ncu $problem: exit $?"
  done
fi
