"""The host (Python) path of a call: the plain-int helpers the launchers use instead of Triton's
constexpr functions, ``LoraLinear``'s no-gradient path, and ``bench/profile_host.py
--stub-kernels``, which measures that Python on any CPU."""

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraq import nn as lnn
from loraq import ops
from loraq.formats import compress_weight

REPO = Path(__file__).resolve().parents[1]


def test_host_math_matches_triton():
    triton = pytest.importorskip("triton")
    from loraq.kernels.host_math import block_r, cdiv, next_pow2

    rng = random.Random(0)
    for _ in range(500):
        a, b = rng.randint(0, 1 << 20), rng.randint(1, 4096)
        assert cdiv(a, b) == triton.cdiv(a, b)
    for n in list(range(1, 300)) + [rng.randint(1, 1 << 30) for _ in range(100)]:
        assert next_pow2(n) == triton.next_power_of_2(n)
        assert block_r(n) == max(16, triton.next_power_of_2(n))
    assert next_pow2(0) == 1 and block_r(1) == 16 and block_r(17) == 32


@pytest.mark.parametrize("fmt", ["int1", "sparse4x4"])
@pytest.mark.parametrize("lead", [(3,), (2, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_without_grad_matches_the_autograd_path(fmt, lead, bias):
    """The no-gradient path (parameters read from ``_parameters``, no ``.to()`` or reshape when
    not needed) computes what the autograd path computes, 2-D and 3-D inputs alike."""
    torch.manual_seed(0)
    K, N = 24, 20
    b = torch.randn(N) if bias else None
    layer = lnn.LoraLinear(compress_weight(torch.randn(N, K), fmt), rank=4, bias=b, backend="reference")
    torch.nn.init.normal_(layer.lora_A)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(*lead, K)
    with torch.no_grad():
        y = layer(x)
    y_grad = layer(x.requires_grad_())
    assert y.shape == (*lead, N)
    torch.testing.assert_close(y, y_grad.detach(), rtol=0, atol=0)
    ref = ops.lora_linear(x.detach(), layer.base, layer.lora_A, layer.lora_B, layer.scaling, layer.bias,
                          backend="reference")
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_layer_sees_a_replaced_adapter_and_a_moved_base():
    """Reading ``_parameters`` and caching the base by the ids of its buffers still follows a
    parameter set anew and a base cast to another dtype."""
    torch.manual_seed(1)
    layer = lnn.LoraLinear(compress_weight(torch.randn(16, 32), "int1"), rank=4, backend="reference")
    torch.nn.init.normal_(layer.lora_A)  # B is zero: a new B changes the output
    x = torch.randn(2, 32)
    with torch.no_grad():
        before = layer(x)
        layer.lora_B = torch.nn.Parameter(torch.randn(16, 4))
        after = layer(x)
    assert not torch.equal(before, after)
    expected = x @ layer.base.dequantize().t() + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(after, expected.detach())
    base = layer.base
    assert layer.base is base  # cached while the buffers stay
    layer.double()
    assert layer.base is not base and layer.base.dtype == torch.float64
    with torch.no_grad():
        assert layer(x.double()).dtype == torch.float64


def test_profile_host_stub_kernels_runs_the_whole_stack_on_the_cpu(needs_fake_driver):
    out = subprocess.run([sys.executable, "bench/profile_host.py", "--stub-kernels", "--K", "64", "--N", "48"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    # the GEMV and its finish were launched (recorded), and each layer of the stack was timed with
    # Triton's launch path and the fast one
    assert "_int1_gemv_lut_kernel" in out.stdout and "_splitk_finish_kernel" in out.stdout
    for row in ("kernels.lora_linear_fwd (launcher)", "ops.lora_linear (triton)", "LoraLinear forward, no grad",
                "LoraLinear forward + backward (training)", "the same, fp32 layer under fp16 autocast"):
        line = next(ln for ln in out.stdout.splitlines() if row in ln)
        triton_us, fast_us = map(float, line.split(row)[1].split())
        assert triton_us > 0 and fast_us > 0
    assert "fast_launch.py" in out.stdout  # the profile ran the fast path


def test_profile_host_times_each_row_of_its_default_mode():
    """The mode a GPU machine runs (``bench/gpu_session.sh``), here on the CPU with the reference
    backend: every row, the training step and the fp32 layer under autocast included."""
    out = subprocess.run([sys.executable, "bench/profile_host.py", "--K", "64", "--N", "48", "--M", "3"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    for row in ("ops.lora_linear (reference)", "LoraLinear forward, no grad", "LoraLinear forward + autograd graph",
                "LoraLinear forward + backward (training)", "the same, fp32 layer under bf16 autocast"):
        line = next(ln for ln in out.stdout.splitlines() if row in ln)
        assert all(float(v) > 0 for v in line.split(row)[1].split())


@pytest.mark.parametrize("fmt,cuda_op,kernel", [("int1", "mma", "int1_gemv_mma"), ("int1", "lut", "int1_gemv_mma"),
                                                  ("sparse4x4", "mma", "sparse4x4_gemv")])
def test_profile_host_runs_the_extensions_launchers_on_the_cpu(fmt, cuda_op, kernel, needs_fake_driver):
    """``--cuda-op``: the launchers of ``loraq._C``'s GEMVs (bound once by a plan, then called)
    run their Python on the CPU, the extension's op recorded with the finish kernel after it."""
    out = subprocess.run([sys.executable, "bench/profile_host.py", "--stub-kernels", "--cuda-op", cuda_op,
                          "--format", fmt, "--K", "64", "--N", "48"], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert f"({kernel}, _splitk_finish_kernel;" in first, first
    line = next(ln for ln in out.stdout.splitlines() if "LoraLinear forward, no grad" in ln)
    assert all(float(v) > 0 for v in line.split("no grad")[1].split())


def test_layer_with_a_parametrized_adapter():
    """A parametrization moves ``lora_A`` out of ``_parameters``: the forward still finds it."""
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, t):
            return 2 * t

    torch.manual_seed(2)
    layer = lnn.LoraLinear(compress_weight(torch.randn(12, 16), "int1"), rank=2, backend="reference")
    torch.nn.init.normal_(layer.lora_A)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = layer(x)
        parametrize.register_parametrization(layer, "lora_A", Double())
        assert "lora_A" not in layer._parameters
        after = layer(x)
    lora = layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(after - before, (lora / 2).detach())
