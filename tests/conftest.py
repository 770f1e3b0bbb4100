import importlib.util
import os
from pathlib import Path

import torch

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before any
# kernel is defined. The `auto` backend never picks it on the CPU: only tests that ask for it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from loraq import ops  # noqa: E402

# Define the kernels now, while TRITON_INTERPRET holds: a test that unsets it (to see the CPU-only
# backend status) must not be the first to import them, or they would be built for a GPU.
ops.load_backends()

# On a GPU, every remembered autotune answer is checked against the candidates of the call it
# answers (off the GPU the tuner remembers nothing: it takes the first config).
from loraq.kernels import autotune  # noqa: E402

autotune.CHECK_HITS = True


def pytest_configure(config):
    """Stop before any test where Triton's interpreter would compute garbage (Triton < 3.2 under
    numpy 2): every kernel test would fail with wrong numbers instead of this one reason."""
    from loraq.kernels.triton_support import interpreter_problem

    if os.environ.get("TRITON_INTERPRET") == "1" and interpreter_problem():
        pytest.exit(f"cannot run the kernel tests on the CPU: {interpreter_problem()}", returncode=4)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_backend(monkeypatch):
    """Every test starts from a fixed seed and the default backend choice."""
    torch.manual_seed(1234)
    monkeypatch.delenv("LORAQ_BACKEND", raising=False)
    yield


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    """For the tuner's tests (no GPU runs anything): an empty cache folder and memory, and a GPU
    named "Fake GPU 80GB"; yields the folder."""
    monkeypatch.setenv("LORAQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "gpu_name", lambda device: "Fake GPU 80GB")
    monkeypatch.setattr(autotune, "_MEMORY", {})
    monkeypatch.setattr(autotune, "_PICKED", {})
    monkeypatch.setattr(autotune, "_WARNED", set())
    monkeypatch.setattr(autotune, "_CAPTURE_WARNED", set())
    return tmp_path


@pytest.fixture
def needs_fake_driver():
    """Skip, with the reason, where ``bench/fake_driver.py`` cannot fake this Triton's launch
    path (releases before the ``JITFunction._do_compile`` it hooks)."""
    pytest.importorskip("triton")
    path = Path(__file__).resolve().parents[1] / "bench" / "fake_driver.py"
    spec = importlib.util.spec_from_file_location("_fake_driver_probe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if module.unsupported():
        pytest.skip(module.unsupported())
