"""The int1 mma GEMV (csrc/int1_gemv_mma.cuh) run on the host, off the GPU (CI has none).

tests/cuda/int1_mma_emulate.cu runs the kernel block by block and warp by warp: the copy of x
into shared memory, each lane's weight loads, decode constants and A and B registers are the
kernel's own functions; the mma is computed from the PTX ISA's fragment layout, and the task loop
follows the kernel's. Its sums (the workspace the first launch leaves) must be x·Ŵᵀ, within the
Triton tests' tolerance and exactly on unit vectors, for tasks of 16 rows x 512 inputs and of
32 x 256, every scale mode (the offset decode too), both dtypes, both load paths, odd N and K,
and K cut in slices that end inside tasks' row groups. The kernel itself runs only on a GPU
(tests/test_int1_gemv_mma.py, marked ``gpu``).
"""

import ctypes

import pytest
import torch

pytest.importorskip("triton")

from host_cuda import host_library  # noqa: E402
from loraq.formats import Int1Weight  # noqa: E402
from loraq.kernels.decode import SCALE_ONEBIT, SCALE_ROW, weight_args  # noqa: E402
from loraq.kernels.int1_gemv_mma import OFFSET_MODES  # noqa: E402
from test_triton_kernels import _kernel_args, check, f64, problem  # noqa: E402

KINDS = ["int1", "int1_g32", "int1_g64", "int1_g128", "int1_onebit"]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """tests/cuda/int1_mma_emulate.cu built into a shared library (nvcc, host code only)."""
    so = host_library("int1_mma_emulate.cu", tmp_path_factory.mktemp("int1_mma"))
    so.int1_mma_emulate.restype = ctypes.c_int
    so.int1_mma_emulate.argtypes = [ctypes.c_int] * 4 + [ctypes.c_void_p] * 5 + [ctypes.c_int] * 8
    return so


def emulate(lib, x, w, rg=1, blocks=2, warps=2, k_split=1, offset=False, vec=None):
    """The workspace (fp32 [M, N], x·Ŵᵀ times the row scales) as the kernel leaves it, from the
    host emulation; the scales in x's dtype as the launcher passes them; ``vec``: the 16- or 8-byte
    weight loads (default: the op's condition, KW % 4 == 0)."""
    M, K = x.shape
    N = w.shape[0]
    (packed, scale, col), (KW, G, group, _), mode = weight_args("int1", *_kernel_args(w))
    scale, col = scale.to(x.dtype).contiguous(), col.to(x.dtype).contiguous()
    if offset:
        mode = OFFSET_MODES[mode]
    if vec is None:
        vec = KW % 4 == 0
    x = x.contiguous()
    ws = torch.zeros(M, N, dtype=torch.float32)
    dtype = 0 if x.dtype == torch.float16 else 1
    rc = lib.int1_mma_emulate(dtype, mode, rg, int(vec), x.data_ptr(), packed.data_ptr(), scale.data_ptr(),
                              col.data_ptr(), ws.data_ptr(), M, N, K, G, group, blocks, warps, k_split)
    assert rc == 0
    return ws


def reference_check(ws, x, w, name):
    """The emulated sums against x·Ŵᵀ in float64, with the tolerance rule of the Triton tests."""
    ref = f64(x) @ w.to(torch.float64).dequantize().t()
    low = x @ w.dequantize().to(x.dtype).t()
    check(ws.to(x.dtype), ref, low, name)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rg", [1, 2], ids=["16-row tasks", "32-row tasks"])
@pytest.mark.parametrize("M, N, K", [(1, 37, 300), (5, 77, 1100), (9, 64, 2048), (16, 50, 700)])
def test_emulated_kernel_matches_reference(lib, kind, dtype, rg, M, N, K):
    """Odd N (partial row groups; with 32-row tasks, a task whose second group is past N at 37 and
    50), odd K (a partial word, task and chunk; K = 2048 takes the vector loads), 1 to 2 tiles of x."""
    torch.manual_seed(M * 1000 + N + K + rg)
    w, x, *_ = problem(kind, dtype, M, N, K, lora=False, bias=False, device="cpu")
    reference_check(emulate(lib, x, w, rg), x, w, f"{kind} {dtype} rg={rg} M={M} N={N} K={K}")


@pytest.mark.parametrize("kind", ["int1", "int1_onebit"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rg", [1, 2], ids=["16-row tasks", "32-row tasks"])
@pytest.mark.parametrize("M, N, K", [(1, 37, 1100), (9, 64, 2048), (16, 33, 1500)])
def test_emulated_offset_decode_matches_reference(lib, kind, dtype, rg, M, N, K):
    """The offset decode (the op's modes 3 and 4): each task takes its chunk's C/2 off both row
    groups' sums, so the error stays that of one task."""
    torch.manual_seed(M * 1000 + N + K + rg)
    w, x, *_ = problem(kind, dtype, M, N, K, lora=False, bias=False, device="cpu")
    reference_check(emulate(lib, x, w, rg, offset=True), x, w, f"offset {kind} {dtype} rg={rg} M={M}")


@pytest.mark.parametrize("rg", [1, 2], ids=["16-row tasks", "32-row tasks"])
@pytest.mark.parametrize("blocks, warps, k_split", [(1, 1, 1), (3, 2, 3), (2, 3, 40), (5, 4, 2)])
@pytest.mark.parametrize("offset", [False, True], ids=["pair order", "offset decode"])
def test_emulated_runs_and_slices(lib, rg, blocks, warps, k_split, offset):
    """Warps' runs that start and end inside row groups and chunks (the flush when the rows change,
    the last task's flush), one warp for everything, and K in 1 to 40 slices (slices end inside
    32-row tasks' chunks: K = 4100 is 16.02 chunks of 256)."""
    torch.manual_seed(blocks * 100 + warps * 10 + k_split)
    w, x, *_ = problem("int1_g64" if not offset else "int1", torch.float16, 13, 100, 4100, lora=False, bias=False,
                       device="cpu")
    reference_check(emulate(lib, x, w, rg, blocks, warps, k_split, offset), x, w,
                    f"rg={rg} blocks={blocks} warps={warps} slices={k_split} offset={offset}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rg", [1, 2], ids=["16-row tasks", "32-row tasks"])
@pytest.mark.parametrize("offset", [False, True], ids=["pair order", "offset decode"])
@pytest.mark.parametrize("vec", [False, True], ids=["word loads", "vector loads"])
def test_emulated_each_weight_lands_in_its_place(lib, dtype, rg, offset, vec):
    """Exact: row m of x is the unit vector at input k_m, so the sums are Ŵ[n, k_m] = ±α[n] to the
    bit, at every position a word, a lane's words, a task and a chunk of either width can give."""
    N, K = 50, 1024
    ks = [0, 15, 16, 17, 31, 32 * 5 + 7, 255, 256, 257, 511, 512 + 128 + 30, 767, 768, 1023, 1, 2, 33, 63, 64 + 16,
          700, 95, 96, 127, 128, 129, 1000]
    W = torch.randn(N, K)
    q = Int1Weight.from_dense(W)
    q.scale.copy_(torch.linspace(-3, 5, N).unsqueeze(1))
    q = q.to(dtype)
    dense = q.dequantize().to(dtype).float()
    for first in range(0, len(ks), 16):
        rows = ks[first:first + 16]
        x = torch.zeros(len(rows), K, dtype=dtype)
        x[torch.arange(len(rows)), torch.tensor(rows)] = 1
        ws = emulate(lib, x, q, rg, offset=offset, vec=vec)
        assert torch.equal(ws, dense[:, rows].t()), f"inputs {rows}"


def test_emulation_refuses_bad_arguments(lib):
    x = torch.randn(2, 64, dtype=torch.float16)
    w = Int1Weight.from_dense(torch.randn(8, 64)).to(torch.float16)
    (packed, scale, col), _, _ = weight_args("int1", *_kernel_args(w))
    ws = torch.zeros(2, 8)
    good = dict(dtype=0, mode=SCALE_ROW, rg=1, vec=0, M=2, N=8, K=64, G=1, group=64, blocks=1, warps=1, k_split=1)
    for bad in [dict(rg=3), dict(dtype=2), dict(mode=5), dict(M=17), dict(M=0), dict(k_split=0), dict(warps=0),
                dict(mode=1, group=48)]:
        a = dict(good, **bad)
        assert lib.int1_mma_emulate(a["dtype"], a["mode"], a["rg"], a["vec"], x.data_ptr(), packed.data_ptr(),
                                    scale.data_ptr(), col.data_ptr(), ws.data_ptr(), a["M"], a["N"], a["K"], a["G"],
                                    a["group"], a["blocks"], a["warps"], a["k_split"]) == 1, bad
    assert not ws.any()
    assert SCALE_ONEBIT in OFFSET_MODES and SCALE_ROW in OFFSET_MODES
