"""Packaging details pyproject.toml cannot express.

* ``kernels/`` (Triton) installs as ``loraq.kernels``.
* The optional compiled extension ``loraq._C`` is built from ``csrc/`` with ninja when torch is
  importable at build time (``pip install --no-build-isolation``) and a CUDA toolkit is found
  (``CUDA_HOME``); otherwise, or with ``LORAQ_BUILD_EXT=0``, it is skipped with one line and
  loraq runs on its Triton and reference backends.
"""

import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _skip(reason):
    sys.stderr.write(f"loraq: not building the optional extension loraq._C: {reason}\n")
    return {}


def extension_kwargs():
    if os.environ.get("LORAQ_BUILD_EXT", "1") == "0":
        return _skip("LORAQ_BUILD_EXT=0")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources:
        return _skip("csrc/ holds no sources")
    try:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as e:  # torch missing in an isolated build environment
        return _skip(f"torch is not importable at build time ({type(e).__name__}); "
                     "use pip install --no-build-isolation to build it")
    if CUDA_HOME is None:
        return _skip("no CUDA toolkit found (set CUDA_HOME, e.g. /usr/local/cuda)")
    ext = CUDAExtension(
        "loraq._C",
        sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(
    packages=["loraq", "loraq.formats", "loraq.kernels"],
    package_dir={"loraq": "loraq", "loraq.kernels": "kernels"},
    **extension_kwargs(),
)
