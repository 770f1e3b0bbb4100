"""Packaging details pyproject.toml cannot express.

* ``kernels/`` (Triton) installs as ``loraq.kernels``.
* The optional compiled extension ``loraq._C`` is built from ``csrc/`` with ninja when torch is
  importable at build time (``pip install --no-build-isolation``) and a CUDA toolkit is found
  (``CUDA_HOME``); otherwise, or with ``LORAQ_BUILD_EXT=0``, it is skipped with one line and
  loraq runs on its Triton and reference backends.
"""

import glob
import os
import re
import sys

import setuptools
from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
SETUPTOOLS_FLOOR = (77, 0)  # pyproject.toml's [build-system]: the [project] table and its license string

if tuple(map(int, re.match(r"(\d+)(?:\.(\d+))?", setuptools.__version__).groups("0"))) < SETUPTOOLS_FLOOR:
    # an isolated build gets it from [build-system]; --no-build-isolation takes this environment's,
    # which (setuptools 58, Python 3.9's) would build a package named UNKNOWN without saying why
    sys.exit(f"loraq: building needs setuptools >= {SETUPTOOLS_FLOOR[0]}, this environment has "
             f"{setuptools.__version__}: python -m pip install -U 'setuptools>={SETUPTOOLS_FLOOR[0]}' "
             "(or build without --no-build-isolation)")


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
    # With no GPU to detect, build for Ampere and Hopper instead of every architecture nvcc knows.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # the headers each translation unit includes: a change to one rebuilds the extension
    headers = sorted(glob.glob(os.path.join("csrc", "*.h")) + glob.glob(os.path.join("csrc", "*.cuh")))
    ext = CUDAExtension("loraq._C", sources, depends=headers, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})

    class OptionalBuildExtension(BuildExtension):
        """A failed compile of the optional extension must not fail the install of loraq."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as e:  # compiler or toolkit problems
                _skip(f"compiling it failed ({type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''}); "
                      "see the build log with pip -v")

    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


setup(
    packages=["loraq", "loraq.formats", "loraq.kernels", "loraq.csrc"],
    package_dir={"loraq": "loraq", "loraq.kernels": "kernels", "loraq.csrc": "csrc"},
    package_data={"loraq.csrc": ["*.cu", "*.cuh", "*.h", "*.cpp"]},
    **extension_kwargs(),
)
