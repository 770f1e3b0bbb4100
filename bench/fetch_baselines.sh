#!/usr/bin/env bash
# Download the other libraries the benchmark compares with (GemLite, bitsandbytes), and pytest-xdist, into
# bench/wheels/ (ignored by git), for a GPU machine with no network: pass bench/wheels in the
# device call's carry, and bench/gpu_session.sh installs them there (without dependencies: the
# machine's torch and Triton stay as they are).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p wheels
python3 -m pip download --no-deps --dest wheels "${GEMLITE:-gemlite}" "${BITSANDBYTES:-bitsandbytes}"
# pytest-xdist (and its execnet): gpu_session.sh runs the GPU tests in 8 processes where it is installed,
# so that they fit one device call
python3 -m pip download --no-deps --dest wheels pytest-xdist execnet
ls -la wheels
