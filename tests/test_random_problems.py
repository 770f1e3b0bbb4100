"""Random problems through the kernels against the reference (differential testing).

Each seed draws a problem: M, N and K (odd, prime, 1), the format (int1 per row, per group of an
odd or even size, onebit; sparse4x4), x's dtype and layout (transposed, sliced, 3-D), the
adapters (rank 1 to 17, fp32 or strided), the scaling (0, negative), the bias (strided, another
dtype) and, through a stand-in for the tuner, any one of the kernels the tuner could pick for it
(tiled, split, lookup, gather, dense slab). Forward and ``dX`` are compared with the float64
reference under the tolerance rule of ``test_triton_kernels.py``. Off CUDA the tuner would
always take its first config; here every candidate family gets drawn.
"""

import importlib
import random

import pytest
import torch

pytest.importorskip("triton")

from loraq import ops, reference  # noqa: E402
from loraq.formats import Int1Weight, Sparse4x4Weight  # noqa: E402
from test_triton_kernels import check  # noqa: E402

ops.load_backends()
from loraq.kernels import autotune  # noqa: E402

FWD = importlib.import_module("loraq.kernels.lora_linear_fwd")  # the modules: the package exports
DX = importlib.import_module("loraq.kernels.lora_linear_dx")  # functions of the same names

SEEDS = range(96)


def _draw(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    sizes = [1, 3, 4, 7, 16, 17, 23, 32, 37, 48, 53, 64, 71]
    M = rng.choice([1, 2, 3, 5, 16, 17, 33, 40, 70])
    N, K = rng.choice(sizes), rng.choice(sizes)
    fmt = rng.choice(["int1", "int1_group", "int1_onebit", "sparse4x4", "sparse4x4"])
    dtype = rng.choice([torch.float16, torch.bfloat16, torch.float32])
    W = torch.randn(N, K) * rng.choice([1.0, 0.02, 30.0])
    if fmt == "sparse4x4":
        w = Sparse4x4Weight.from_dense(W)
    else:
        group = rng.choice([5, 8, 16, 24, 32, 64]) if fmt == "int1_group" else None
        w = Int1Weight.from_dense(W, group_size=group, scale="onebit" if fmt == "int1_onebit" else "mean_abs")
    w = w.to(dtype)
    x = torch.randn(M, K) * rng.choice([1.0, 1e-3, 50.0])
    layout = rng.choice(["plain", "transposed", "sliced"])
    if layout == "transposed":
        x = x.t().contiguous().t()
    elif layout == "sliced":
        x = torch.cat([x, x], 1)[:, ::2]
    x = x.to(dtype)
    r = rng.choice([0, 1, 3, 16, 17])
    A = B = None
    if r:
        A, B = torch.randn(r, K) / K**0.5, torch.randn(N, r)
        A, B = (A.float(), B.to(dtype).t().contiguous().t()) if rng.random() < 0.3 else (A.to(dtype), B.to(dtype))
    bias = None
    if rng.random() < 0.6:
        bias = torch.randn(2 * N)[::2].to(rng.choice([dtype, torch.float32]))
    scaling = rng.choice([0.0, -1.3, 0.5, 2.0])
    return rng, w, x, A, B, bias, scaling


def _random_pick(rng, picked, checks):
    """A stand-in for the tuner: a kernel family (a config's last field) drawn uniformly among the
    candidates it would time, then a config of that family. The tuning check the launcher passes
    goes into ``checks``."""

    def pick(op, M, N, K, dtype, device, run, bench=None, extra=None, variant=(), check=None):
        candidates = autotune.configs_for(M) + list((extra() if callable(extra) else extra) or [])
        family = rng.choice(sorted({c[-1] for c in candidates}))
        picked.append(rng.choice([c for c in candidates if c[-1] == family]))
        checks.append(check)
        return picked[-1]
    return pick


def _tuning_check_judges(checks, out, what):
    """The tuner's check (``loraq.tuning_check``) that the launcher passed accepts the kernel's
    output ``out`` (which matched the reference) and refuses it with one checked value off."""
    assert len(checks) == 1 and checks[0] is not None, f"{what}: the launcher passed no tuning check"
    assert checks[0](out) is None, f"{what}: the tuning check refused a right answer: {checks[0](out)}"
    bad = out.clone()
    # past fp16's range this is inf (a tensor's cast; torch < 2.5 refuses to store the float itself)
    bad[-1, -1] = torch.tensor(float(out.float().abs().max()) * 4 + 1).to(out.dtype)
    assert checks[0](bad), f"{what}: the tuning check accepted a wrong answer"
    checks.clear()


@pytest.mark.parametrize("seed", SEEDS)
def test_a_random_problem_matches_the_reference(seed, monkeypatch):
    rng, w, x, A, B, bias, s = _draw(seed)
    picked, checks = [], []
    monkeypatch.setattr(FWD, "pick_config", _random_pick(rng, picked, checks))
    monkeypatch.setattr(DX, "pick_config", _random_pick(rng, picked, checks))
    w64 = w.to(torch.float64)
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    what = f"seed {seed}: {w!r}, x {x.dtype} {tuple(x.shape)}, rank {0 if A is None else A.shape[0]}, s {s}"

    y = ops.lora_linear(x, w, A, B, s, bias, backend="triton")
    ref = reference.lora_linear_ref(f64(x), w64, f64(A), f64(B), s, None if bias is None else f64(bias.to(x.dtype)))
    check(y, ref, reference.lora_linear_ref(x, w, A, B, s, bias), f"{what}, forward {picked}")
    _tuning_check_judges(checks, y, f"{what}, forward {picked}")

    dy = torch.randn(x.shape[0], w.shape[0]).to(x.dtype)
    Ac = None if A is None else A.to(x.dtype)
    dyB = None if B is None else dy @ B.to(x.dtype)
    lora_B = None if B is None or rng.random() < 0.5 else B.to(x.dtype)
    picked.clear()
    dx = ops.lora_linear_dx(dy, w, Ac, dyB, s, backend="triton", lora_B=lora_B)
    ref = reference.lora_linear_dx_ref(f64(dy), w64, f64(Ac), f64(dyB), s)
    check(dx, ref, reference.lora_linear_dx_ref(dy, w, Ac, dyB, s), f"{what}, dX {picked}")
    _tuning_check_judges(checks, dx, f"{what}, dX {picked}")
