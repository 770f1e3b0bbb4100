#!/usr/bin/env bash
# One call on a GPU machine: install loraq in place, run the kernel tests on the GPU, then the
# benchmark. Everything lands in $OUT (default bench/results/run-<time>): info.txt, tests.txt,
# bench.txt, bench.csv, bench.png and bench.md (the targets, met or missed, and every row).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/run-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
LORAQ_BUILD_EXT="${LORAQ_BUILD_EXT:-0}" python3 -m pip install -q --no-deps --no-build-isolation -e . \
  > "$OUT/install.txt" 2>&1 || { cat "$OUT/install.txt"; exit 1; }
python3 -m loraq info | tee "$OUT/info.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit --format=csv >> "$OUT/info.txt" 2>&1
python3 -m pytest -q -ra -p no:cacheprovider tests/test_triton_kernels.py tests/test_bench.py 2>&1 | tee "$OUT/tests.txt"
python3 bench/bench_kernels.py --backward --csv "$OUT/bench.csv" --plot "$OUT/bench.png" --markdown "$OUT/bench.md" \
  "$@" 2>&1 | tee "$OUT/bench.txt"
