"""Triton's launch path on a machine without a GPU: a fake CUDA driver and kernels that record.

Inside :func:`fake_cuda`, ``kernel[grid](...)`` of a ``@triton.jit`` function runs all of
Triton's per-call Python (argument specialization, the cache key, the launch metadata) as on an
sm_90 GPU, but compiles nothing: the first launch of each specialization stores a
:class:`RecordingKernel` in Triton's cache, whose ``run`` records what it was given instead of
launching. Tensors may be on the CPU. Used to measure the host time of loraq's launches
(``profile_host.py --stub-kernels``) and to check that ``kernels.fast_launch`` passes the
launcher exactly what Triton passes (``tests/fast_launch_check.py``).

The kernels must be ``JITFunction``s: import ``loraq.kernels`` without ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib
import gc
from typing import List

import torch


def unsupported() -> str:
    """Why this Triton's launch path cannot be faked here ("" where it can): the fake hooks
    ``JITFunction._do_compile`` and its per-device caches, which older Triton releases (3.0 among
    them) do not have."""
    import triton
    from triton.runtime.jit import JITFunction

    if hasattr(JITFunction, "_do_compile"):
        return ""
    return (f"bench/fake_driver.py hooks JITFunction._do_compile, which Triton {triton.__version__} lacks "
            "(its launch path is not faked)")


class FakeDriver:
    """The parts of Triton's active driver that a launch asks for: an sm_90 GPU whose current
    device and stream are what ``device`` and ``stream`` say (set them to switch)."""

    def __init__(self):
        self.device, self.stream = 0, 0

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return self.stream

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


class RecordingKernel:
    """A compiled kernel's stand-in: ``run`` appends ``(kernel name, grid, args, stream, device)``
    to ``calls`` (``args``: everything after the launch-metadata and hook arguments, as the
    launcher gets it; ``device``: the one it was compiled for)."""

    function = 0
    packed_metadata = ()

    def __init__(self, name: str, calls: List[tuple], device: int):
        self.name, self.calls, self.device = name, calls, device

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook, *args):
        self.calls.append((self.name, (gx, gy, gz), args, stream, self.device))


@contextlib.contextmanager
def fake_cuda():
    """Yields ``(calls, compiles, driver)``: the list each launch is recorded into, the list of
    kernel names Triton "compiled" (one per new specialization), and the :class:`FakeDriver`."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from loraq.kernels import fast_launch

    if unsupported():
        raise RuntimeError(unsupported())

    calls: List[tuple] = []
    compiles: List[str] = []
    touched = {}

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = RecordingKernel(self.fn.__name__, calls, device)
        self.device_caches[device][0][key] = kernel
        compiles.append(self.fn.__name__)
        touched[id(self)] = self
        return kernel

    # the per-device caches (binders made for the fake target) that exist before: the rest goes after
    before = {id(fn): (fn, set(fn.device_caches)) for fn in gc.get_objects() if type(fn) is JITFunction}
    real_compile, real_active = JITFunction._do_compile, getattr(driver, "_active", None)
    JITFunction._do_compile = do_compile
    fake = FakeDriver()
    driver.set_active(fake)
    fast_launch.forget()
    try:
        yield calls, compiles, fake
    finally:  # nothing of the fake GPU outlives the context (in Triton's caches or the fast launchers')
        JITFunction._do_compile = real_compile
        driver._active = real_active  # not reset_active(): without a GPU, making the default driver fails
        for fn, devices in list(before.values()) + [(fn, set()) for i, fn in touched.items() if i not in before]:
            for device in set(fn.device_caches) - devices:
                del fn.device_caches[device]
            for device in devices:
                cache = fn.device_caches[device][0]
                for key in [k for k, v in cache.items() if isinstance(v, RecordingKernel)]:
                    del cache[key]
        fast_launch.forget()
