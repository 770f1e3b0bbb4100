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
from typing import List

import torch


class FakeDriver:
    """The parts of Triton's active driver that a launch asks for: device 0 of an sm_90 GPU."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


class RecordingKernel:
    """A compiled kernel's stand-in: ``run`` appends ``(kernel name, grid, args)`` to ``calls``
    (``args``: everything after the launch-metadata and hook arguments, as the launcher gets it)."""

    function = 0
    packed_metadata = ()

    def __init__(self, name: str, calls: List[tuple]):
        self.name, self.calls = name, calls

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook, *args):
        self.calls.append((self.name, (gx, gy, gz), args))


@contextlib.contextmanager
def fake_cuda():
    """Yields ``(calls, compiles)``: the list each launch is recorded into, and the list of kernel
    names Triton "compiled" (one per new specialization)."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from loraq.kernels import fast_launch

    calls: List[tuple] = []
    compiles: List[str] = []
    touched = set()

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = RecordingKernel(self.fn.__name__, calls)
        self.device_caches[device][0][key] = kernel
        compiles.append(self.fn.__name__)
        touched.add(self)
        return kernel

    real_compile, real_active = JITFunction._do_compile, getattr(driver, "_active", None)
    JITFunction._do_compile = do_compile
    driver.set_active(FakeDriver())
    fast_launch.forget()
    try:
        yield calls, compiles
    finally:  # no recording kernel outlives the context (in Triton's caches or the fast launchers')
        JITFunction._do_compile = real_compile
        driver._active = real_active  # not reset_active(): without a GPU, making the default driver fails
        for fn in touched:
            fn.device_caches.clear()
        fast_launch.forget()
