"""The launchers run on their input's GPU.

Triton launches on the current CUDA device's current stream, whatever device the tensors are on
(so do ``fast_launch`` and the split-K finish after a ``loraq._C`` GEMV). With ``x`` on ``cuda:1``
while ``cuda:0`` is current, a kernel would run on device 0 against device 1's memory, unordered
with device 1's stream. Each public launcher is wrapped so that ``x``'s device is current while
it runs (one comparison per call when it already is).
"""

import functools

import torch


def on_input_device(launcher):
    """``launcher(x, ...)`` run with ``x``'s CUDA device current (``torch.cuda.device``)."""

    @functools.wraps(launcher)
    def run(x, *args, **kwargs):
        if x.is_cuda and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                return launcher(x, *args, **kwargs)
        return launcher(x, *args, **kwargs)

    run.on_input_device = True
    return run
