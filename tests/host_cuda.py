"""Test helper: a kernel's per-thread code, compiled for the host with nvcc and loaded with ctypes
(the emulations under tests/cuda/, which let CI, with no GPU, run the CUDA GEMVs' own code)."""

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import sass_cuda  # noqa: E402


def host_library(source: str, out_dir: Path) -> ctypes.CDLL:
    """``tests/cuda/<source>`` built into a shared library of host code in ``out_dir`` and loaded;
    skips the test where there is no nvcc."""
    compiler = sass_cuda.nvcc()
    if compiler is None:
        pytest.skip("no nvcc on this machine (CUDA_HOME unset and none on PATH)")
    out = out_dir / ("lib" + Path(source).stem + ".so")
    done = subprocess.run([compiler, "-O2", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-o", str(out),
                           str(ROOT / "tests" / "cuda" / source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return ctypes.CDLL(str(out))
