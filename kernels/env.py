"""loraq's switches, read from the environment on every call, cheaply.

The launch path asks a few of them per call (``LORAQ_FAST_LAUNCH``, ``LORAQ_ONE_LAUNCH``,
``LORAQ_CUDA_GEMV``, ``LORAQ_OFFSET_DECODE``), and users and tests may change them at run time, so they are not cached.
``os.environ.get`` encodes the name and decodes the value each time (about 1 µs); on POSIX,
CPython's ``os.environ`` keeps the raw table it updates on every change (``_data``, bytes to
bytes), which a comparison reads in 0.04 µs.
"""

import os
import warnings
from typing import Dict, Set, Tuple

_ENCODED: Dict[Tuple[str, str], Tuple[bytes, bytes]] = {}
_OFF = (None, b"", b"0")
_WARNED: Set[Tuple[str, str]] = set()  # (name, value) already warned about


def env_is(name: str, value: str) -> bool:
    """``os.environ.get(name) == value``. Asked whether a switch is ``"1"``, a value that is none
    of unset, empty, ``0`` and ``1`` (``true``, ``yes``, ``on``) is warned about once: it is off."""
    raw = getattr(os.environ, "_data", None)
    if type(raw) is not dict or os.name != "posix":  # Windows (str keys) or a replaced os.environ
        got = os.environ.get(name)
        if got == value:
            return True
        if value == "1" and got not in ("", "0", None):
            _warn_unknown(name, got)
        return False
    pair = _ENCODED.get((name, value))
    if pair is None:
        pair = _ENCODED[(name, value)] = (os.fsencode(name), os.fsencode(value))
    got = raw.get(pair[0])
    if got == pair[1]:
        return True
    if got not in _OFF and value == "1":  # a switch set to something it does not understand
        _warn_unknown(name, os.fsdecode(got))
    return False


def _warn_unknown(name: str, got: str) -> None:
    if (name, got) not in _WARNED:
        _WARNED.add((name, got))
        warnings.warn(f"{name}={got!r} is not understood: set {name}=1 to turn it on (0 or unset: off); "
                      f"it is off", RuntimeWarning, stacklevel=3)


# every switch that changes which kernel a call launches or how: a prepared launch
# (lora_linear_fwd.ForwardPlan) holds while these are as they were when it was made
SWITCHES = ("LORAQ_BACKEND", "LORAQ_FAST_LAUNCH", "LORAQ_ONE_LAUNCH", "LORAQ_CUDA_GEMV", "LORAQ_OFFSET_DECODE",
            "LORAQ_DENSE_SLAB_MIB", "TRITON_INTERPRET")
_SWITCHES_RAW = tuple(os.fsencode(n) for n in SWITCHES) if os.name == "posix" else ()


def switches() -> tuple:
    """The values of :data:`SWITCHES` now (raw bytes from ``os.environ``'s table where it has one:
    about 0.3 µs for all of them)."""
    raw = getattr(os.environ, "_data", None)
    if type(raw) is dict and _SWITCHES_RAW:
        return tuple(map(raw.get, _SWITCHES_RAW))
    return tuple(map(os.environ.get, SWITCHES))
