#!/usr/bin/env bash
# bench/sass_report.py compiled with the GPU machine's Triton (3.6 by default), not this
# machine's: the two versions lay out the same kernel differently (registers, layout conversions
# through shared memory), so predictions must use the device's. The first call installs that
# Triton into its own venv (TRITON_VENV, default /tmp/loraq-triton-<version>); torch and loraq
# come from the current python3's environment. Arguments go to sass_report.py:
#     bash bench/sass_like_device.sh fwd sparse4x4 gather
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${DEVICE_TRITON:-3.6.0}"
VENV="${TRITON_VENV:-/tmp/loraq-triton-$VERSION}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import triton" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "triton==$VERSION"
fi
OURS=$(python3 -c "import site; print(site.getsitepackages()[0])")
THEIRS=$("$VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")
PYTHONPATH="$THEIRS:$OURS${PYTHONPATH:+:$PYTHONPATH}" exec "$VENV/bin/python" bench/sass_report.py "$@"
