"""Launching a compiled Triton kernel again without Triton's per-call Python.

``kernel[grid](*args)`` spends about 20 µs of host time per launch in Triton 3.6-3.8 before its
C launcher runs (on a CPU where a torch matmul's host time is 3 µs): it specializes every argument,
builds a string key for its cache, checks the kernel's globals and makes a launch-metadata dict.
A small-batch call of loraq is one or two launches of kernels that run for a few microseconds, so
outside a CUDA graph that Python is most of what a user waits for.

:class:`FastLauncher` wraps a ``@triton.jit`` function. The first launch of each specialization
goes through Triton (which compiles and loads the kernel); the compiled kernel is kept under a key
that determines Triton's specialization, and later launches with that key call its launcher
directly, with the arguments Triton would pass. The key holds, for each positional argument, a
tensor's dtype and whether its address is a multiple of 16 (Triton specializes on both), an int's
or bool's value (Triton specializes ints on ``== 1``, divisibility by 16 and range), ``float`` for
a float (passed as fp32 whatever its value), and every keyword argument's value (constexprs and
launch options), plus the current device.

Opt-in with ``LORAQ_FAST_LAUNCH=1`` until it has run on a GPU: checked on the CPU only, against
Triton's own launch path with a fake driver (``tests/fast_launch_check.py``, Triton 3.5 to 3.9).
Triton is used as it is, with no fast path, where it would do more than launch: under the
interpreter, when launch hooks or a pipeline-inspection hook are installed (a profiler such as
Proton), when a kernel has pre-run hooks, for tuple and list arguments, and for Triton versions
other than those checked (:func:`supported`). Not in the key, as they do not change in a
process that launches loraq's kernels: Triton's debug and instrumentation knobs, and the values of
the kernels' global constexprs (Triton checks those on every launch). :func:`forget` drops the
kept kernels.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Dict, Tuple

import torch
from torch import Tensor
from torch.nn import Parameter

from .env import env_is
from .triton_support import triton_release

try:
    from triton import knobs as _knobs
    from triton.runtime import driver as _driver
    from triton.runtime.jit import JITFunction as _JITFunction
except ImportError:  # an older Triton: no fast path (supported() is False)
    _knobs = _driver = _JITFunction = None

MAX_ENTRIES = 1024  # specializations kept per kernel (a new batch size is a new key); then reset


def _key(device: int, kwargs: dict, args: tuple) -> tuple:
    """What Triton's specialization depends on (module docs): the device, each keyword value, and
    for each positional argument a tensor's dtype and address mod 16, ``float`` for a float, a
    bool as a bool (Triton passes ``True`` as ``u1`` but makes ``1`` a constant), the value of
    anything else. Raises TypeError for a tuple or list (Triton decides: they may hold tensors).
    One loop without calls: this runs on every launch."""
    key = [device, *kwargs.items()]
    add = key.append
    for a in args:
        t = type(a)
        if t is Tensor or t is Parameter or (t is not int and isinstance(a, Tensor)):
            add((a.dtype, a.data_ptr() & 15))
        elif t is float:
            add(float)
        elif t is bool:
            add((bool, a))
        elif t is tuple or t is list:
            raise TypeError("a tuple or list argument: launched by Triton")
        else:
            add(a)
    return tuple(key)


# Triton versions whose launch path tests/fast_launch_check.py has passed on (3.3 and 3.4 it cannot run on)
TESTED = ((3, 5), (3, 6), (3, 7), (3, 8), (3, 9))


@functools.lru_cache(maxsize=None)
def supported() -> bool:
    """Whether this Triton is one whose launch path ``tests/fast_launch_check.py`` has checked
    (``TESTED``) and still launches a cached kernel as ``kernel.run(grid..., stream, function,
    packed_metadata, launch_metadata, enter_hook, exit_hook, *bound_args)``, the call this module
    makes (read from its source, in case of a patched build)."""
    if _JITFunction is None:
        return False
    try:
        src = inspect.getsource(_JITFunction.run)
    except (OSError, TypeError):
        return False
    return (triton_release() in TESTED and "*bound_args.values())" in src
            and "kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata,"
            in src)


def fast_launch_offered() -> bool:
    """Whether launches may skip Triton's per-call Python (``LORAQ_FAST_LAUNCH=1``)."""
    return env_is("LORAQ_FAST_LAUNCH", "1")


def _unhooked(fn) -> bool:
    """Nothing for Triton to run around this launch: no launch hook (an empty hook chain or None,
    as Triton's launcher treats it), no pipeline-inspection hook, no pre-run hook on ``fn``."""
    rt = _knobs.runtime
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and (type(getattr(hook, "calls", None)) is not list or hook.calls):
            return False
    return getattr(rt, "add_stages_inspection_hook", None) is None and not fn.pre_run_hooks


class FastLauncher:
    """``FastLauncher(jit_fn)[grid](*args, **constexprs)``: launches as ``jit_fn[grid](...)``
    does, skipping Triton's per-call Python once a specialization has launched (module docs).

    Runtime values (tensors, ints, floats) go positionally; keywords are for constexprs and
    launch options (``num_warps``...), whose values are part of the key."""

    def __init__(self, fn):
        self.fn = fn
        self.entries: Dict[tuple, Tuple[Any, tuple]] = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args: tuple, kwargs: dict):
        """One launch of the kernel on ``grid``; returns what Triton's launch returns."""
        fn = self.fn
        if (type(fn) is not _JITFunction or type(grid) is not tuple or not fast_launch_offered()
                or not supported()):
            return fn[grid](*args, **kwargs)
        active = _driver.active
        device = active.get_current_device()
        try:
            key = _key(device, kwargs, args)
            entry = self.entries.get(key)
        except TypeError:  # an unhashable argument: Triton decides
            return fn[grid](*args, **kwargs)
        if entry is None or not _unhooked(fn):
            return self._first(key, grid, args, kwargs)
        kernel, tail = entry
        n = len(grid)
        kernel.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, active.get_current_stream(device),
                   kernel.function, kernel.packed_metadata, None, None, None, *args, *tail)
        return kernel

    def _first(self, key: tuple, grid: tuple, args: tuple, kwargs: dict):
        """Launch through Triton and keep the compiled kernel for ``key`` if later launches can
        reuse it: the bound arguments after the positional ones must be constants of the key."""
        kernel = self.fn[grid](*args, **kwargs)
        if kernel is None or not hasattr(kernel, "packed_metadata"):
            return kernel
        params = self.fn.params
        names = {p.name for p in params}
        bound = self.fn.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in names})
        bound.apply_defaults()
        tail = tuple(bound.arguments.values())[len(args):]
        if any(isinstance(v, torch.Tensor) for v in tail):
            return kernel  # a tensor by keyword: its address would be stale
        if any(p.is_constexpr and type(a) is float for p, a in zip(params, args)):
            return kernel  # a float constexpr given positionally: the key holds only its type
        if len(self.entries) >= MAX_ENTRIES:
            self.entries.clear()
        self.entries[key] = (kernel, tail)
        return kernel


def forget() -> None:
    """Drop every kept kernel: the next launch of each specialization goes through Triton."""
    for launcher in list(_LAUNCHERS.values()):
        launcher.entries.clear()


def fast(fn) -> FastLauncher:
    """The :class:`FastLauncher` of ``fn`` (one per function, made on first use)."""
    launcher = _LAUNCHERS.get(id(fn))  # by id: a JITFunction hashes its source on every call
    if launcher is None:
        launcher = _LAUNCHERS[id(fn)] = FastLauncher(fn)  # which keeps fn alive, so the id stays its
    return launcher


_LAUNCHERS: Dict[int, FastLauncher] = {}
