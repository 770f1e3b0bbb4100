"""The one-launch LoRA path and bias (kernels/lowrank_output.py) against loraq.reference: odd
shapes, every dtype, with and without each part, the columns split over programs, and bad input."""

import pytest
import torch

pytest.importorskip("triton")

from loraq import reference  # noqa: E402
from test_triton_kernels import DEV, DTYPES, check, f64  # noqa: E402


def _inputs(dtype, M, N, K, r, bias):
    x = torch.randn(M, K, dtype=dtype, device=DEV)
    A = torch.randn(r, K, dtype=dtype, device=DEV) / K**0.5 if r else None
    B = torch.randn(N, r, dtype=dtype, device=DEV) if r else None
    b = torch.randn(N, dtype=dtype, device=DEV) if bias else None
    return x, A, B, b


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M, N, K, r", [(1, 37, 45, 5), (3, 300, 130, 16), (17, 129, 257, 33), (70, 21, 75, 1)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n_split", [None, 3])
def test_lowrank_output_matches_reference(dtype, M, N, K, r, bias, n_split):
    from loraq.kernels.lowrank_output import lowrank_output

    x, A, B, b = _inputs(dtype, M, N, K, r, bias)
    room = torch.full((M, N + 7), float("nan"), dtype=dtype, device=DEV)
    y = room[:, :N]  # a row stride wider than N; nothing past N is written
    out = lowrank_output(y, x, A, B, 0.7, b, n_split=n_split)
    assert out is y and y.dtype == dtype
    check(y, reference.lowrank_output_ref(f64(x), f64(A), f64(B), 0.7, f64(b)),
          reference.lowrank_output_ref(x, A, B, 0.7, b), f"lowrank {dtype}")
    assert room[:, N:].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lowrank_output_bias_alone(dtype):
    from loraq.kernels.lowrank_output import lowrank_output

    x, _, _, b = _inputs(dtype, 5, 33, 20, 0, True)
    y = lowrank_output(torch.empty(5, 33, dtype=dtype, device=DEV), x, None, None, 0.7, b)
    assert torch.equal(y, b.expand(5, 33))


def test_lowrank_output_refuses_bad_input_and_writes_nothing():
    from loraq.kernels.lowrank_output import lowrank_output

    x, A, B, b = _inputs(torch.float16, 4, 10, 12, 3, True)
    y = torch.zeros(4, 10, dtype=torch.float16, device=DEV)
    with pytest.raises(ValueError, match="needs the LoRA factors, a bias, or both"):
        lowrank_output(y, x, None, None, 1.0, None)
    with pytest.raises(ValueError, match="unit-stride"):
        lowrank_output(y.t().contiguous().t(), x, A, B, 1.0, b)
    with pytest.raises(ValueError, match=r"y must be \[4, N\]"):
        lowrank_output(torch.zeros(3, 10, dtype=torch.float16, device=DEV), x, A, B, 1.0, b)
    assert not y.any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_lowrank_output_at_a_large_shape(dtype):
    """The dense-slab forward's shape: thousands of rows (no column split) and a few (split)."""
    from loraq.kernels.lowrank_output import lowrank_output

    for M in (4096, 40):
        x, A, B, b = _inputs(dtype, M, 4099, 4096, 16, True)
        y = lowrank_output(torch.empty(M, 4099, dtype=dtype, device=DEV), x, A, B, 2.0, b)
        check(y, reference.lowrank_output_ref(f64(x), f64(A), f64(B), 2.0, f64(b)),
              reference.lowrank_output_ref(x, A, B, 2.0, b), f"lowrank M={M}")
