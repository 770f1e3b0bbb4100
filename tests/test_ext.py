"""The compiled extension: loraq._C (built with CUDA_HOME=... pip install --no-build-isolation -e .),
or the same sources built by ``loraq build-ext`` (``loraq.extension``)."""

import pytest
import torch

from loraq import extension
from loraq.formats import Int1Weight, Sparse4x4Weight

if extension.load():
    pytest.skip(f"no compiled extension: {extension.load()}", allow_module_level=True)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N, K, group_size", [(7, 45, None), (13, 70, 16), (1, 1, None), (33, 100, 7)])
def test_int1_dequantize_matches_python(device, dtype, N, K, group_size):
    q = Int1Weight.from_dense(torch.randn(N, K, dtype=dtype), group_size=group_size).to(device)
    out = torch.ops.loraq.int1_dequantize(q.packed, q.scale, K, group_size or K)
    assert out.dtype == dtype and torch.equal(out, q.dequantize())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N, K", [(7, 45), (4, 4), (1, 1), (30, 37)])
def test_sparse4x4_dequantize_matches_python(device, dtype, N, K):
    s = Sparse4x4Weight.from_dense(torch.randn(N, K, dtype=dtype)).to(device)
    out = torch.ops.loraq.sparse4x4_dequantize(s.values, s.positions, N, K)
    assert out.dtype == dtype and torch.equal(out, s.dequantize())


def test_bad_arguments_raise_clear_errors():
    q = Int1Weight.from_dense(torch.randn(5, 40))
    with pytest.raises(RuntimeError, match="words per row"):
        torch.ops.loraq.int1_dequantize(q.packed, q.scale, 70, 70)
    with pytest.raises(RuntimeError, match="packed must be Int"):
        torch.ops.loraq.int1_dequantize(q.packed.float(), q.scale, 40, 40)
    with pytest.raises(RuntimeError, match="scale has 4 rows, packed 5"):
        torch.ops.loraq.int1_dequantize(q.packed, q.scale[:4].contiguous(), 40, 40)
    s = Sparse4x4Weight.from_dense(torch.randn(5, 40))
    with pytest.raises(RuntimeError, match="values must be"):
        torch.ops.loraq.sparse4x4_dequantize(s.values, s.positions, 9, 40)


def test_int1_gemv_mma_is_registered_for_cuda_and_meta():
    """The CUDA mma GEMV's op: its schema (ws and parts written in place), a Meta kernel for
    tracing (it computes nothing), and no CPU kernel (the launcher never offers it off the GPU)."""
    schema = str(torch.ops.loraq.int1_gemv_mma.default._schema)
    assert "Tensor(a!) ws" in schema and "Tensor(b!)? parts" in schema
    meta = dict(device="meta")
    x = torch.empty(2, 64, dtype=torch.float16, **meta)
    args = (torch.empty(3, 2, dtype=torch.int32, **meta), torch.empty(3, 1, dtype=torch.float16, **meta),
            torch.empty(3, 1, dtype=torch.float16, **meta), None, torch.empty(2, 3, **meta), None, 0, 0, 1, 8, 1)
    torch.ops.loraq.int1_gemv_mma(x, *args)
    cpu = [torch.zeros(a.shape, dtype=a.dtype) if isinstance(a, torch.Tensor) else a for a in (x, *args)]
    with pytest.raises(NotImplementedError):
        torch.ops.loraq.int1_gemv_mma(*cpu)


def test_sparse4x4_gemv_is_registered_for_cuda_and_meta():
    """The CUDA sparse4x4 gather's op: its schema (ws and parts written in place), a Meta kernel
    for tracing (it computes nothing), and no CPU kernel (the launcher never offers it off the GPU)."""
    schema = str(torch.ops.loraq.sparse4x4_gemv.default._schema)
    assert "Tensor(a!) ws" in schema and "Tensor(b!)? parts" in schema
    meta = dict(device="meta")
    x = torch.empty(2, 64, dtype=torch.float16, **meta)
    args = (torch.empty(3, 16, dtype=torch.float16, **meta), torch.empty(3, 8, dtype=torch.uint8, **meta), None,
            torch.empty(2, 12, **meta), None, 12, 1, 1, 8, 1)
    torch.ops.loraq.sparse4x4_gemv(x, *args)
    cpu = [torch.zeros(a.shape, dtype=a.dtype) if isinstance(a, torch.Tensor) else a for a in (x, *args)]
    with pytest.raises(NotImplementedError):
        torch.ops.loraq.sparse4x4_gemv(*cpu)
