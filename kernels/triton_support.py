"""What the installed Triton can run of loraq's kernels: the features that arrived after 3.0.

loraq asks for ``triton>=3.0`` (torch 2.4's). Two things depend on the version, each checked here
once, so that a kernel that cannot run is never offered and a forced one is refused with the
reason instead of a compiler traceback:

* ``tl.gather`` (Triton 3.3): the int1 lookup GEMV reads its table with it. Without it the
  tuner leaves that GEMV out; the other candidates cover the same shapes.
* The interpreter (``TRITON_INTERPRET=1``, the CPU tests): Triton 3.0 and 3.1's interpreter
  leaves the outputs of a kernel unwritten when numpy 2 is installed (checked here with numpy
  2.0.2 and 2.4.6: a kernel that copies a tensor stored nothing). 3.2 runs right with numpy 2.
"""

import functools
import itertools
from typing import Tuple

import triton
import triton.language as tl

GATHER_SINCE = (3, 3)
INTERPRETER_NUMPY2_SINCE = (3, 2)


def _release(version: str) -> Tuple[int, int]:
    """``(major, minor)`` of a version string (``"3.0.0"``, ``"3.6.0+git1234"``, ``"2.0.0rc1"``)."""
    major, minor = (version.split(".") + ["0", "0"])[:2]
    return tuple(int("".join(itertools.takewhile(str.isdigit, part)) or 0) for part in (major, minor))


def triton_release() -> Tuple[int, int]:
    """The installed Triton's ``(major, minor)``."""
    return _release(triton.__version__)


@functools.lru_cache(maxsize=None)
def gather_problem() -> str:
    """Why the lookup GEMV cannot compile here ("" where ``tl.gather`` exists)."""
    if hasattr(tl, "gather"):
        return ""
    return (f"the lookup GEMV reads its table with tl.gather, which Triton {triton.__version__} lacks "
            f"(Triton >= {GATHER_SINCE[0]}.{GATHER_SINCE[1]})")


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> str:
    """Why Triton's interpreter cannot run loraq's kernels right here ("" where it can)."""
    import numpy

    if triton_release() >= INTERPRETER_NUMPY2_SINCE or _release(numpy.__version__) < (2, 0):
        return ""
    return (f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) leaves kernel outputs unwritten "
            f"with numpy {numpy.__version__}: install numpy<2, or Triton >= "
            f"{INTERPRETER_NUMPY2_SINCE[0]}.{INTERPRETER_NUMPY2_SINCE[1]}")
