"""loraq's switches, read from the environment on every call, cheaply.

The launch path asks a few of them per call (``LORAQ_FAST_LAUNCH``, ``LORAQ_ONE_LAUNCH``,
``LORAQ_CUDA_GEMV``), and users and tests may change them at run time, so they are not cached.
``os.environ.get`` encodes the name and decodes the value each time (about 1 µs); on POSIX,
CPython's ``os.environ`` keeps the raw table it updates on every change (``_data``, bytes to
bytes), which a comparison reads in 0.04 µs.
"""

import os
from typing import Dict, Tuple

_ENCODED: Dict[Tuple[str, str], Tuple[bytes, bytes]] = {}


def env_is(name: str, value: str) -> bool:
    """``os.environ.get(name) == value``."""
    raw = getattr(os.environ, "_data", None)
    if type(raw) is not dict or os.name != "posix":  # Windows (str keys) or a replaced os.environ
        return os.environ.get(name) == value
    pair = _ENCODED.get((name, value))
    if pair is None:
        pair = _ENCODED[(name, value)] = (os.fsencode(name), os.fsencode(value))
    return raw.get(pair[0]) == pair[1]
