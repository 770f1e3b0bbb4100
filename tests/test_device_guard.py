"""Every public launcher runs with its input's CUDA device current (``kernels/device_guard.py``):
Triton launches on the current device's stream, whatever device the tensors are on. No GPU
needed: the device calls are recorded."""

import contextlib
from types import SimpleNamespace

import torch

import loraq.kernels as kernels
from loraq.kernels.device_guard import on_input_device


def test_every_public_launcher_is_guarded():
    launchers = [getattr(kernels, name) for name in kernels.__all__ if callable(getattr(kernels, name))]
    assert len(launchers) == 7
    assert all(getattr(fn, "on_input_device", False) for fn in launchers), [fn.__name__ for fn in launchers]


def test_the_input_device_is_made_current_only_when_it_is_not(monkeypatch):
    events = []

    @contextlib.contextmanager
    def device(d):
        events.append(("enter", d))
        yield
        events.append(("exit", d))

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)

    @on_input_device
    def launcher(x, y, scale=1.0):
        """A launcher."""
        events.append(("run", x.device, y, scale))
        return "done"

    on_1 = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    assert launcher(on_1, 2, scale=0.5) == "done"
    assert events == [("enter", torch.device("cuda", 1)), ("run", torch.device("cuda", 1), 2, 0.5),
                      ("exit", torch.device("cuda", 1))]
    events.clear()
    on_0 = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    assert launcher(on_0, 3) == "done" and events == [("run", torch.device("cuda", 0), 3, 1.0)]
    events.clear()
    assert launcher(torch.zeros(1), 4) == "done" and events == [("run", torch.device("cpu"), 4, 1.0)]
    assert launcher.__name__ == "launcher" and launcher.__doc__ == "A launcher."
