"""The sparse4x4 CUDA GEMVs (csrc/sparse4x4_gemv.cuh, the gather; csrc/sparse4x4_gemv_mma.cuh, on
tensor cores; kernels/sparse4x4_gemv_cuda.py): up to 16 rows of x.

Off the GPU (CI): the kernels' own code, compiled for the host with nvcc
(tests/cuda/sparse4x4_emulate.cu) and run block by block as the GPU would run it (the tensor-core
kernel's mma computed from the PTX ISA's fragment layout), against the reference in fp16 and
bf16, every instantiation, both load paths, odd shapes and K slices; their compile for sm_90
(registers, spills, instructions); their configs, planning and the reasons they give where they
cannot run. On a GPU with the extension built (tests marked ``gpu``): the op itself against
loraq.reference, with LoRA and bias, every config, exactly, and that the tuner offers them.
"""

import ctypes
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from loraq import reference  # noqa: E402
from loraq.formats import Sparse4x4Weight  # noqa: E402
from loraq.kernels import lora_linear_fwd  # noqa: E402
from loraq.kernels.autotune import CUDA_GATHER, SPARSE_MMA, describe  # noqa: E402
from loraq.kernels.cuda_ext import SMEM_BUDGET  # noqa: E402
from loraq.kernels.sparse4x4_gemv_cuda import (GATHER_TASK_INPUTS, SHAPES, SPARSE_MMA_ROWS,  # noqa: E402
                                               SPARSE_MMA_TASK_INPUTS, WARPS_AN_SM, check_sparse_cuda_config,
                                               rows_for, sparse4x4_gemv_cuda, sparse_cuda_configs, sparse_cuda_status,
                                               sparse_slices)
from test_triton_kernels import _kernel_args, check, f64, problem, tuner_calls, workspaces_clean  # noqa: E402
from host_cuda import host_library  # noqa: E402
from weights import aligned, offset_view  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import sass_cuda  # noqa: E402

CFG = (1, 1, GATHER_TASK_INPUTS, 1, 16, 1, CUDA_GATHER)
MMA_CFG = (SPARSE_MMA_ROWS, 1, SPARSE_MMA_TASK_INPUTS, 1, 16, 1, SPARSE_MMA)


# --- the kernel's code run on the host ----------------------------------------------------------


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """tests/cuda/sparse4x4_emulate.cu built into a shared library (nvcc, host code only)."""
    so = host_library("sparse4x4_emulate.cu", tmp_path_factory.mktemp("emulate"))
    so.sparse4x4_emulate.restype = ctypes.c_int
    so.sparse4x4_emulate.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 4 + [ctypes.c_int] * 6
    so.sparse4x4_mma_emulate.restype = ctypes.c_int
    so.sparse4x4_mma_emulate.argtypes = [ctypes.c_int] * 2 + [ctypes.c_void_p] * 4 + [ctypes.c_int] * 6
    return so


def emulate(lib, x, w, rows, blocks=2, warps=2, k_split=1, vec=None):
    """x·Ŵᵀ (fp32) as the gather computes it, from the host emulation; ``rows`` of x a block, or
    ``"mma"`` for the tensor-core kernel; ``vec`` forces the load path (default: the launcher's
    choice)."""
    M, K = x.shape
    N = w.shape[0]
    values = aligned(w.values.to(x.dtype).contiguous())
    positions = aligned(w.positions.contiguous())
    TK, PW = values.shape[1], positions.shape[1]
    if vec is None:
        vec = TK % 64 == 0 if rows == "mma" else TK % 32 == 0 and PW % 16 == 0
    x = x.contiguous()
    ws = torch.zeros(M, N, dtype=torch.float32)
    dtype = 0 if x.dtype == torch.float16 else 1
    pointers = (x.data_ptr(), values.data_ptr(), positions.data_ptr(), ws.data_ptr())
    if rows == "mma":
        rc = lib.sparse4x4_mma_emulate(dtype, int(vec), *pointers, M, N, K, blocks, warps, k_split)
    else:
        rc = lib.sparse4x4_emulate(dtype, rows, int(vec), *pointers, M, N, K, blocks, warps, k_split)
    assert rc == 0
    return ws


def reference_check(y32, x, w, name):
    """The emulated sums against x·Ŵᵀ in float64, with the tolerance rule of the Triton tests."""
    ref = f64(x) @ w.to(torch.float64).dequantize().t()
    low = (x @ w.dequantize().to(x.dtype).t())
    check(y32.to(x.dtype), ref, low, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 2, 4, 8, "mma"])
@pytest.mark.parametrize("M, N, K", [(1, 37, 45), (3, 128, 512), (5, 70, 1000), (8, 9, 4), (13, 256, 1024),
                                     (16, 33, 130)])
def test_emulated_kernel_matches_reference(emulator, dtype, rows, M, N, K):
    torch.manual_seed(M * 1000 + N + K)
    w = Sparse4x4Weight.from_dense(torch.randn(N, K)).to(dtype)
    x = torch.randn(M, K, dtype=dtype)
    reference_check(emulate(emulator, x, w, rows), x, w, f"rows={rows} {dtype} M={M} N={N} K={K}")


@pytest.mark.parametrize("rows", [4, "mma"])
@pytest.mark.parametrize("vec", [True, False])
@pytest.mark.parametrize("blocks, warps, k_split", [(1, 1, 1), (3, 1, 1), (2, 2, 3), (1, 4, 7), (5, 3, 40)])
def test_emulated_work_split_and_load_paths(emulator, rows, vec, blocks, warps, k_split):
    """Every split of the work (stream-K runs that start and end inside a row group, slices of
    K) and both load paths (16-byte where the shape allows it, word by word everywhere) give the
    same answer."""
    torch.manual_seed(blocks * 100 + warps * 10 + k_split)
    N, K = (300, 2048) if vec else (301, 2050)
    w = Sparse4x4Weight.from_dense(torch.randn(N, K)).to(torch.float16)
    x = torch.randn(3 if rows == 4 else 11, K, dtype=torch.float16)
    y = emulate(emulator, x, w, rows, blocks, warps, k_split, vec)
    reference_check(y, x, w, f"rows={rows} vec={vec} blocks={blocks} warps={warps} k_split={k_split}")


@pytest.mark.parametrize("rows", [1, 2, 8, "mma"])
@pytest.mark.parametrize("where", ["aligned", "unaligned"])
def test_emulated_copy_of_x_takes_either_load_path(emulator, rows, where):
    """The block's copy of x loads eight inputs at once where x's rows are 16-byte aligned and
    one at a time where they are not (here K % 8 == 0 but x starts 2 bytes in): same answer,
    with the copy split over several rounds of every thread (three blocks of one warp)."""
    torch.manual_seed(17)
    N, K = 70, 1024
    w = Sparse4x4Weight.from_dense(torch.randn(N, K)).to(torch.bfloat16)
    x = torch.randn(13 if rows == "mma" else rows, K, dtype=torch.bfloat16)
    x = aligned(x) if where == "aligned" else offset_view(x, 1)
    y = emulate(emulator, x, w, rows, blocks=3, warps=1, k_split=2)
    reference_check(y, x, w, f"rows={rows} x {where}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_emulated_each_value_lands_in_its_place(emulator, dtype):
    """Exact: small integers for x and the values make every sum exact in fp32, so the result must
    equal x·Ŵᵀ bit for bit (a value in the wrong row or column of its tile would show)."""
    g = torch.Generator().manual_seed(3)
    N, K = 64, 512
    W = torch.randint(-8, 9, (N, K), generator=g).float()
    w = Sparse4x4Weight.from_dense(W).to(dtype)
    x = torch.randint(-4, 5, (5, K), generator=g).to(dtype)
    exact = (x.double() @ w.dequantize().double().t()).float()
    assert torch.equal(emulate(emulator, x, w, 8), exact)
    assert torch.equal(emulate(emulator, x, w, "mma"), exact)


def test_emulation_catches_a_wrong_kernel(emulator):
    """The checks above can fail: positions with their rows and columns inside the tile swapped
    (a decode that read p as 4·c + r) give a different answer."""
    torch.manual_seed(1)
    w = Sparse4x4Weight.from_dense(torch.randn(64, 256)).to(torch.float16)
    pos = w.tile_positions()
    swapped = ((pos & 3) << 2) | (pos >> 2)
    assert (swapped != pos).any()
    lo, hi = swapped[:, 0::2], swapped[:, 1::2]
    wrong = Sparse4x4Weight(w.values, (lo | (hi << 4)).to(torch.uint8), tuple(w.shape))
    x = torch.randn(2, 256, dtype=torch.float16)
    ref = x.double() @ w.dequantize().double().t()
    for rows in (2, "mma"):
        assert (emulate(emulator, x, wrong, rows).double() - ref).abs().max() > 0.1


# --- compiled for Hopper ------------------------------------------------------------------------


def test_every_instantiation_compiles_for_hopper_without_spills():
    """nvcc compiles every kernel the launcher can pick for sm_90 with nothing spilled, within the
    registers that WARPS_AN_SM assumes; the gather's task loop has four FFMA per stored value and
    row of x, the tensor-core kernel's one HMMA per step and tile of x and at most 1.6 instructions
    a stored value with 16-byte loads (bench/sass_cuda.py), with its finish in the same launch or
    not."""
    if sass_cuda.nvcc() is None:
        pytest.skip("no nvcc on this machine (CUDA_HOME unset and none on PATH)")
    gather = sass_cuda.compile_all(kernel="sparse")
    assert len(gather) == 16
    for k in gather:
        assert k["spill_bytes"] == 0, k
        assert WARPS_AN_SM[k["rows"]] * 32 * -(-k["registers"] // 8) * 8 <= 65536, k
        assert k["loop"] is not None and k["loop"]["FFMA"] == 4 * 32 * k["rows"], k
    mma = sass_cuda.compile_all(kernel="sparse_mma")
    assert len(mma) == 16  # 2 dtypes x 2 load paths x 1 or 2 tiles of x x two launches or one
    loop = {(k["dtype"], k["vec"], k["tiles"], k["one"]): sum(k["loop"].values()) for k in mma if k["loop"]}
    for k in mma:
        assert k["spill_bytes"] == 0, k
        assert WARPS_AN_SM[SPARSE_MMA_ROWS] * 32 * -(-k["registers"] // 8) * 8 <= 65536, k
        assert k["loop"] is not None and k["loop"]["HMMA"] == 32 * k["tiles"], k
        if k["vec"]:
            assert sum(k["loop"].values()) <= 1.6 * 512, k
        if k["one"]:  # the one-launch finish (csrc/gemv_finish.cuh) leaves the loop about as it was (with
            # loads value by value, the fallback for unaligned weights, it grew 20%: NOTES.md v15)
            grown = 1.03 if k["vec"] else 1.25
            assert loop[(k["dtype"], k["vec"], k["tiles"], True)] <= grown * loop[(k["dtype"], k["vec"], k["tiles"], False)], k


# --- planning, configs and refusals (CPU) -------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 2, 4, 8])
@pytest.mark.parametrize("K", [1, 127, 128, 1000, 4096, 14336, 28672])
@pytest.mark.parametrize("bps", [1, 3])
@pytest.mark.parametrize("at_least", [1, 5])
def test_gather_slices_cover_k_and_fit_the_shared_memory(rows, K, bps, at_least):
    slices = sparse_slices(rows, rows, K, bps, at_least)
    tasks = -(-K // GATHER_TASK_INPUTS)
    per_tiles = -(-(-(-(-(-K // 4)) // slices)) // 32) * 32  # the kernel's slice_tiles_for
    assert 1 <= slices <= tasks and -(-(-(-K // 4)) // per_tiles) == slices
    assert bps * (rows * per_tiles * 4 * 4 + 1024) <= SMEM_BUDGET


@pytest.mark.parametrize("M", [1, 8, 9, 16])
@pytest.mark.parametrize("K", [1, 511, 512, 1000, 4096, 14336, 28672])
@pytest.mark.parametrize("bps", [1, 3])
def test_mma_slices_cover_k_and_fit_the_shared_memory(M, K, bps):
    slices = sparse_slices(SPARSE_MMA_ROWS, M, K, bps)
    per_tiles = -(-(-(-(-(-K // 4)) // slices)) // 128) * 128  # the kernel's slice_tiles_for
    assert -(-(-(-K // 4)) // per_tiles) == slices
    tile_rows = 8 if M <= 8 else 16
    assert bps * (tile_rows * (per_tiles * 4 * 2 + 32) + 1024) <= SMEM_BUDGET  # the launcher's smem


def test_slices_raise_when_one_task_does_not_fit_and_follow_the_device_limits():
    with pytest.raises(ValueError, match="8 rows of x do not fit"):
        sparse_slices(8, 8, 4096, 64)
    # an sm_86-like GPU (99 KiB a block, 100 KiB an SM less 16 for L1): 8 fp32 rows of 4096 inputs
    # (128 KiB) take 2 slices there, 1 on an H100-like budget
    assert sparse_slices(8, 8, 4096, 1) == 1
    assert sparse_slices(8, 8, 4096, 1, limits=(99 * 1024, 84 * 1024)) == 2


def test_rows_and_configs():
    assert [rows_for(M) for M in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 8, 8]
    for M in (1, 2, 3, 8, 16):
        configs = sparse_cuda_configs(M)
        gather = [c for c in configs if c[6] == CUDA_GATHER]
        mma = [c for c in configs if c[6] == SPARSE_MMA]
        assert gather and mma and len(gather) + len(mma) == len(configs)
        assert all(c[0] == rows_for(M) for c in gather) and all(c[0] == SPARSE_MMA_ROWS for c in mma)
        for cfg in configs:
            check_sparse_cuda_config(cfg)
            assert cfg[1] * cfg[4] <= WARPS_AN_SM[cfg[0]] and (cfg[1], cfg[4]) in SHAPES
            assert ("CUDA gather GEMV" if cfg[6] == CUDA_GATHER else "CUDA sparse mma GEMV") in describe(cfg)
    with pytest.raises(ValueError, match="1 to 16 rows"):
        sparse_cuda_configs(17)
    G, T = CUDA_GATHER, GATHER_TASK_INPUTS
    for bad, match in [((1, 1, T, 1, 16, 1, 2), "not a sparse4x4 CUDA GEMV config"), ((3, 1, T, 1, 16, 1, G), "one of"),
                       ((16, 1, T, 1, 16, 1, G), "one of"), ((8, 1, SPARSE_MMA_TASK_INPUTS, 1, 16, 1, SPARSE_MMA), "one of"),
                       ((1, 1, 256, 1, 16, 1, G), "fixed"), ((16, 1, T, 1, 16, 1, SPARSE_MMA), "fixed"),
                       ((1, 0, T, 1, 16, 1, G), "≥ 1"), ((1, 1, T, 1, 17, 1, G), "warps 1 to 16")]:
        with pytest.raises(ValueError, match=match):
            check_sparse_cuda_config(bad)


def sparse_cuda_offered(x, w, *lora_bias) -> bool:
    """Whether the forward launcher passes sparse4x4 CUDA candidates to the tuner for this call."""
    with tuner_calls(lora_linear_fwd) as seen:
        lora_linear_fwd(x, "sparse4x4", *_kernel_args(w), *lora_bias)
    assert seen
    return {CUDA_GATHER, SPARSE_MMA} <= {c[6] for call in seen for c in call.candidates}


def test_status_and_refusals_off_the_gpu(monkeypatch):
    """Forced, they raise with the reason before anything runs; tuned, they are not among the
    candidates on the CPU (nor anywhere the extension is missing)."""
    ok, why = sparse_cuda_status(torch.zeros(1, 64, dtype=torch.float16))
    assert not ok and "CUDA kernels" in why
    w, x, A, B, b = problem("sparse4x4", torch.float16, 2, 37, 300, device="cpu")
    tensors, meta = _kernel_args(w)
    for cfg in (CFG, MMA_CFG):
        with pytest.raises(ValueError, match="sparse4x4 CUDA GEMV, which cannot run here: .*CUDA kernels"):
            lora_linear_fwd(x, "sparse4x4", tensors, meta, A, B, 0.5, b, config=cfg)
    for kernel in ("gather", "mma"):
        with pytest.raises(ValueError, match="CUDA kernels"):
            sparse4x4_gemv_cuda(x, tensors, meta, A, B, 0.5, b, kernel=kernel)
    with pytest.raises(ValueError, match="'gather' or 'mma'"):
        sparse4x4_gemv_cuda(x, tensors, meta, kernel="dense")
    i = problem("int1", torch.float16, 2, 37, 300, device="cpu")[0]
    with pytest.raises(ValueError, match="it takes a sparse4x4 weight, got int1"):
        lora_linear_fwd(x, "int1", *_kernel_args(i), A, B, 0.5, b, config=CFG)
    if not torch.cuda.is_available():  # Triton runs CPU tensors only in its interpreter (no GPU)
        monkeypatch.setenv("LORAQ_CUDA_GEMV", "1")  # offered, but they cannot run here
        assert not sparse_cuda_offered(x, w, A, B, 0.5, b)
    else:
        cuda = torch.zeros(1, 64, dtype=torch.float16, device="cuda")
        assert "float16 or bfloat16" in sparse_cuda_status(cuda.float())[1]
        assert "1 to 16 rows" in sparse_cuda_status(torch.zeros(17, 64, dtype=torch.float16, device="cuda"))[1]


# --- on a GPU, with the extension built -------------------------------------------------------


def _needs_kernel():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ok, why = sparse_cuda_status(torch.zeros(1, 32, dtype=torch.float16, device="cuda"))
    if not ok:
        pytest.skip(why)


def run_kernel(kernel, dtype, M, N, K, cfg=None, lora=True, bias=True, scaling=0.5):
    w, x, A, B, b = problem("sparse4x4", dtype, M, N, K, r=5, lora=lora, bias=bias)
    tensors, meta = _kernel_args(w)
    cfg = cfg or next(c for c in sparse_cuda_configs(M) if c[6] == kernel)
    y = lora_linear_fwd(x, "sparse4x4", tensors, meta, A, B, scaling, b, config=cfg)
    assert y.shape == (M, N) and y.dtype == dtype
    check(y, reference.lora_linear_ref(f64(x), w.to(torch.float64), f64(A), f64(B), scaling, f64(b)),
          reference.lora_linear_ref(x, w, A, B, scaling, b), f"sparse4x4 CUDA {dtype} M={M} N={N} K={K} {cfg}")


KERNELS = [CUDA_GATHER, SPARSE_MMA]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 2, 3, 8, 9, 16])
@pytest.mark.parametrize("N, K", [(37, 300), (1000, 1000), (77, 4100), (4096, 4096), (300, 14336), (28672, 512)])
def test_matches_reference(kernel, dtype, M, N, K):
    _needs_kernel()
    run_kernel(kernel, dtype, M, N, K)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("k_split", [1, 3, 40])
@pytest.mark.parametrize("rows, M", [(1, 1), (2, 2), (4, 3), (8, 5), (8, 16), (1, 4), (16, 1), (16, 9), (16, 16)])
def test_every_shape_split_and_rows(shape, k_split, rows, M):
    _needs_kernel()
    bps, warps = shape
    mma = rows == SPARSE_MMA_ROWS
    cfg = (rows, bps, SPARSE_MMA_TASK_INPUTS if mma else GATHER_TASK_INPUTS, k_split, warps, 1,
           SPARSE_MMA if mma else CUDA_GATHER)
    run_kernel(cfg[6], torch.float16, M, 333, 2100, cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("lora_bias", [(True, True), (False, False), (True, False), (False, True)],
                         ids=["lora+bias", "plain", "lora", "bias"])
@pytest.mark.parametrize("M", [1, 2, 7, 12])
def test_with_and_without_lora_and_bias(kernel, lora_bias, M):
    _needs_kernel()
    run_kernel(kernel, torch.bfloat16, M, 513, 1027, lora=lora_bias[0], bias=lora_bias[1])


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_each_value_lands_in_its_place(kernel, dtype):
    """Exact on the GPU: integer x and values, every sum exact in fp32."""
    _needs_kernel()
    g = torch.Generator().manual_seed(5)
    N, K = 1000, 2048
    w = Sparse4x4Weight.from_dense(torch.randint(-8, 9, (N, K), generator=g).float()).to(dtype).to("cuda")
    x = torch.randint(-4, 5, (12, K), generator=g).to(dtype).to("cuda")
    tensors, meta = _kernel_args(w)
    for M in (1, 6, 12):
        cfg = next(c for c in sparse_cuda_configs(M) if c[6] == kernel)
        y = lora_linear_fwd(x[:M], "sparse4x4", tensors, meta, config=cfg)
        exact = (x[:M].double() @ w.dequantize().double().t()).to(dtype)
        assert torch.equal(y, exact), f"M={M}"


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("M", [1, 9])
def test_views_that_start_unaligned(kernel, M):
    """values, positions, x and lora_A one element into their buffers, with TK % 128 == 0 (where
    aligned ones take 16-byte loads): the kernels must see the pointers and load value by value
    (the copy of x and the share of x·Aᵀ check their own)."""
    _needs_kernel()
    w, x, A, B, b = problem("sparse4x4", torch.float16, M, 64, 2048, r=5)
    tensors, meta = _kernel_args(w)
    tensors = {name: offset_view(t, 1) for name, t in tensors.items()}
    cfg = next(c for c in sparse_cuda_configs(M) if c[6] == kernel)
    y = lora_linear_fwd(offset_view(x, 1), "sparse4x4", tensors, meta, offset_view(A, 1), B, 0.5, b, config=cfg)
    check(y, reference.lora_linear_ref(f64(x), w.to(torch.float64), f64(A), f64(B), 0.5, f64(b)),
          reference.lora_linear_ref(x, w, A, B, 0.5, b), f"unaligned {kernel} M={M}")


@pytest.mark.gpu
def test_the_tuner_offers_them_up_to_16_rows(monkeypatch):
    """With the extension built (and LORAQ_CUDA_GEMV not 0), a sparse4x4 forward of up to 16 rows (fp16)
    times both kernels among the others; with LORAQ_CUDA_GEMV=0, it does not."""
    _needs_kernel()
    w, x, A, B, b = problem("sparse4x4", torch.float16, 16, 64, 512)
    monkeypatch.setenv("LORAQ_CUDA_GEMV", "1")
    assert sparse_cuda_offered(x, w, A, B, 0.5, b) and sparse_cuda_offered(x[:1], w)
    assert not sparse_cuda_offered(torch.cat([x, x[:1]]), w, A, B, 0.5, b)  # 17 rows
    assert not sparse_cuda_offered(x.float(), w)
    monkeypatch.setenv("LORAQ_CUDA_GEMV", "0")
    assert not sparse_cuda_offered(x[:3], w, A, B, 0.5, b)  # turned off
    monkeypatch.delenv("LORAQ_CUDA_GEMV")
    assert sparse_cuda_offered(x[:3], w, A, B, 0.5, b)  # on by default


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 9, 16])
@pytest.mark.parametrize("N, K", [(37, 300), (1000, 1000), (77, 4100), (4096, 4096), (28672, 8192)])
@pytest.mark.parametrize("lora_bias", [(True, True), (False, False), (True, False), (False, True)],
                         ids=["lora+bias", "plain", "lora", "bias"])
def test_mma_one_launch_finish_matches_reference(dtype, M, N, K, lora_bias):
    """The tensor-core kernel with its finish in the same launch (csrc/gemv_finish.cuh) against
    the reference and the two-launch answer, the workspace (sums, x·Aᵀ, counters) zero after."""
    _needs_kernel()
    w, x, A, B, b = problem("sparse4x4", dtype, M, N, K, r=5, lora=lora_bias[0], bias=lora_bias[1])
    tensors, meta = _kernel_args(w)
    want = (reference.lora_linear_ref(f64(x), w.to(torch.float64), f64(A), f64(B), 0.5, f64(b)),
            reference.lora_linear_ref(x, w, A, B, 0.5, b))
    for one in (True, False):
        y = sparse4x4_gemv_cuda(x, tensors, meta, A, B, 0.5, b, kernel="mma", one_launch=one)
        check(y, *want, f"sparse4x4 mma one launch={one} {dtype} M={M} N={N} K={K}")
        assert workspaces_clean(), f"one launch={one} left its workspace dirty"


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("k_split", [1, 3, 40])
def test_mma_one_launch_every_shape_and_split(shape, k_split):
    _needs_kernel()
    bps, warps = shape
    w, x, A, B, b = problem("sparse4x4", torch.float16, 5, 333, 2100, r=16)
    tensors, meta = _kernel_args(w)
    y = sparse4x4_gemv_cuda(x, tensors, meta, A, B, 0.5, b, kernel="mma", blocks_per_sm=bps, warps=warps,
                            k_split=k_split, one_launch=True)
    check(y, reference.lora_linear_ref(f64(x), w.to(torch.float64), f64(A), f64(B), 0.5, f64(b)),
          reference.lora_linear_ref(x, w, A, B, 0.5, b), f"sparse4x4 mma one launch {shape} split {k_split}")
    assert workspaces_clean()


@pytest.mark.gpu
def test_mma_one_launch_refuses_bad_finish_arguments():
    """The op checks the finish's tensors before anything runs and changes nothing."""
    _needs_kernel()
    w, x, A, B, b = problem("sparse4x4", torch.float16, 2, 64, 1024, r=4)
    tensors, meta = _kernel_args(w)
    values, positions = tensors["values"].to(x.dtype), tensors["positions"]
    ws = torch.zeros(2, 64, device="cuda")
    xa = torch.zeros(1, 2, 16, device="cuda")
    y = torch.empty(2, 64, dtype=torch.float16, device="cuda")
    counters = torch.zeros(4, dtype=torch.int32, device="cuda")  # too few: 4 arrivals + 2 + batches
    with pytest.raises(RuntimeError, match="counters must have at least"):
        torch.ops.loraq.sparse4x4_gemv(x, values, positions, A, ws, xa, 64, 16, 2, 4, 1, y, counters, B, b, 0.5, 2)
    with pytest.raises(RuntimeError, match="they come with y"):
        torch.ops.loraq.sparse4x4_gemv(x, values, positions, None, ws, None, 64, 16, 2, 4, 1, None, counters)
    with pytest.raises(RuntimeError, match="memory location|overlap"):  # y over x
        torch.ops.loraq.sparse4x4_gemv(x, values, positions, None, ws, None, 64, 16, 2, 4, 1,
                                       x.view(-1)[:128].view(2, 64), torch.zeros(100, dtype=torch.int32, device="cuda"))
    assert not ws.any() and not xa.any() and not counters.any()


@pytest.mark.gpu
def test_the_gather_refuses_the_one_launch_finish():
    """Only the tensor-core kernel finishes in its own launch: the op refuses y for the gather
    (the Python launcher never asks), before anything runs."""
    _needs_kernel()
    w, x, A, B, b = problem("sparse4x4", torch.float16, 2, 64, 512)
    tensors, meta = _kernel_args(w)
    ws = torch.zeros(2, 64, device="cuda")
    y = torch.empty(2, 64, dtype=torch.float16, device="cuda")
    counters = torch.zeros(100, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="tensor-core kernel's"):
        torch.ops.loraq.sparse4x4_gemv(x, tensors["values"].to(x.dtype), tensors["positions"], None, ws, None, 64,
                                       1, 2, 4, 1, y, counters)
    assert not ws.any() and not counters.any()
