"""The CUDA sparse4x4 gather (csrc/sparse4x4_gemv.cuh, kernels/sparse4x4_gemv_cuda.py): up to 16 rows of x.

Off the GPU (CI): the kernel's own per-thread code, compiled for the host with nvcc
(tests/cuda/sparse4x4_emulate.cu) and run block by block as the GPU would run it, against the
reference in fp16 and bf16, every rows-of-x instantiation, both load paths, odd shapes and K
slices; its compile for sm_90 (registers, spills); its configs, its planning and the reasons it
gives where it cannot run. On a GPU with the extension built (tests marked ``gpu``): the op itself
against loraq.reference, with LoRA and bias, every config, exactly, and that the tuner offers it.
"""

import ctypes
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from loraq import reference  # noqa: E402
from loraq.formats import Sparse4x4Weight  # noqa: E402
from loraq.kernels import lora_linear_fwd  # noqa: E402
from loraq.kernels.autotune import CUDA_GATHER, configs_for, describe  # noqa: E402
from loraq.kernels.cuda_ext import SMEM_BUDGET  # noqa: E402
from loraq.kernels.sparse4x4_gemv_cuda import (CUDA_GATHER_SHAPES, CUDA_GATHER_TASK_INPUTS, WARPS_AN_SM,  # noqa: E402
                                               check_cuda_gather_config, cuda_gather_configs, cuda_gather_status,
                                               gather_slices, rows_for, sparse4x4_gemv_cuda)
from test_triton_kernels import _kernel_args, candidates_passed, check, f64, problem  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import sass_cuda  # noqa: E402

CFG = (1, 1, CUDA_GATHER_TASK_INPUTS, 1, 16, 1, CUDA_GATHER)


# --- the kernel's code run on the host ----------------------------------------------------------


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """tests/cuda/sparse4x4_emulate.cu built into a shared library (nvcc, host code only)."""
    compiler = sass_cuda.nvcc()
    if compiler is None:
        pytest.skip("no nvcc on this machine (CUDA_HOME unset and none on PATH)")
    lib = tmp_path_factory.mktemp("emulate") / "libsparse4x4_emulate.so"
    done = subprocess.run([compiler, "-O2", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-o", str(lib),
                           str(ROOT / "tests" / "cuda" / "sparse4x4_emulate.cu")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    so = ctypes.CDLL(str(lib))
    so.sparse4x4_emulate.restype = ctypes.c_int
    so.sparse4x4_emulate.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 4 + [ctypes.c_int] * 6
    return so.sparse4x4_emulate


def aligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` whose data starts 16-byte aligned (the 16-byte load path's need)."""
    flat = torch.empty(t.numel() * t.element_size() + 16, dtype=torch.uint8)
    start = (-flat.data_ptr()) % 16
    out = flat[start:start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def emulate(fn, x, w, rows, blocks=2, warps=2, k_split=1, vec=None):
    """x·Ŵᵀ (fp32) as the kernel computes it, from the host emulation; ``vec`` forces the load
    path (default: the launcher's choice)."""
    M, K = x.shape
    N = w.shape[0]
    values = aligned(w.values.to(x.dtype).contiguous())
    positions = aligned(w.positions.contiguous())
    TK, PW = values.shape[1], positions.shape[1]
    if vec is None:
        vec = TK % 32 == 0 and PW % 16 == 0
    x = x.contiguous()
    ws = torch.zeros(M, N, dtype=torch.float32)
    rc = fn(0 if x.dtype == torch.float16 else 1, rows, int(vec), x.data_ptr(), values.data_ptr(),
            positions.data_ptr(), ws.data_ptr(), M, N, K, blocks, warps, k_split)
    assert rc == 0
    return ws


def reference_check(y32, x, w, name):
    """The emulated sums against x·Ŵᵀ in float64, with the tolerance rule of the Triton tests."""
    ref = f64(x) @ w.to(torch.float64).dequantize().t()
    low = (x @ w.dequantize().to(x.dtype).t())
    check(y32.to(x.dtype), ref, low, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 2, 4, 8])
@pytest.mark.parametrize("M, N, K", [(1, 37, 45), (3, 128, 512), (5, 70, 1000), (8, 9, 4), (13, 256, 1024),
                                     (16, 33, 130)])
def test_emulated_kernel_matches_reference(emulator, dtype, rows, M, N, K):
    torch.manual_seed(M * 1000 + N + K)
    w = Sparse4x4Weight.from_dense(torch.randn(N, K)).to(dtype)
    x = torch.randn(M, K, dtype=dtype)
    reference_check(emulate(emulator, x, w, rows), x, w, f"rows={rows} {dtype} M={M} N={N} K={K}")


@pytest.mark.parametrize("vec", [True, False])
@pytest.mark.parametrize("blocks, warps, k_split", [(1, 1, 1), (3, 1, 1), (2, 2, 3), (1, 4, 7), (5, 3, 40)])
def test_emulated_work_split_and_load_paths(emulator, vec, blocks, warps, k_split):
    """Every split of the work (stream-K runs that start and end inside a row group, slices of
    K) and both load paths (16-byte where the shape allows it, word by word everywhere) give the
    same answer."""
    torch.manual_seed(blocks * 100 + warps * 10 + k_split)
    N, K = (300, 2048) if vec else (301, 2050)
    w = Sparse4x4Weight.from_dense(torch.randn(N, K)).to(torch.float16)
    x = torch.randn(3, K, dtype=torch.float16)
    y = emulate(emulator, x, w, 4, blocks, warps, k_split, vec)
    reference_check(y, x, w, f"vec={vec} blocks={blocks} warps={warps} k_split={k_split}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_emulated_each_value_lands_in_its_place(emulator, dtype):
    """Exact: small integers for x and the values make every sum exact in fp32, so the result must
    equal x·Ŵᵀ bit for bit (a value in the wrong row or column of its tile would show)."""
    g = torch.Generator().manual_seed(3)
    N, K = 64, 512
    W = torch.randint(-8, 9, (N, K), generator=g).float()
    w = Sparse4x4Weight.from_dense(W).to(dtype)
    x = torch.randint(-4, 5, (5, K), generator=g).to(dtype)
    y = emulate(emulator, x, w, 8)
    assert torch.equal(y, (x.double() @ w.dequantize().double().t()).float())


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
    y = emulate(emulator, x, wrong, 2)
    ref = x.double() @ w.dequantize().double().t()
    assert (y.double() - ref).abs().max() > 0.1


# --- compiled for Hopper ------------------------------------------------------------------------


def test_every_instantiation_compiles_for_hopper_without_spills():
    """nvcc compiles every kernel the launcher can pick for sm_90 with nothing spilled, within the
    registers that WARPS_AN_SM assumes, and the task loop has four FFMA per stored value and row of
    x (bench/sass_cuda.py)."""
    if sass_cuda.nvcc() is None:
        pytest.skip("no nvcc on this machine (CUDA_HOME unset and none on PATH)")
    kernels = sass_cuda.compile_all(kernel="sparse")
    assert len(kernels) == 16
    for k in kernels:
        assert k["spill_bytes"] == 0, k
        if k["vec"]:  # the shapes offered for these rows fit their warps in the register file
            assert WARPS_AN_SM[k["rows"]] * 32 * -(-k["registers"] // 8) * 8 <= 65536, k
        assert k["loop"] is not None and k["loop"]["FFMA"] == 4 * 32 * k["rows"], k


# --- planning, configs and refusals (CPU) -------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 2, 4, 8])
@pytest.mark.parametrize("K", [1, 127, 128, 1000, 4096, 14336, 28672])
@pytest.mark.parametrize("bps", [1, 3])
@pytest.mark.parametrize("at_least", [1, 5])
def test_slices_cover_k_and_fit_the_shared_memory(rows, K, bps, at_least):
    slices = gather_slices(rows, K, bps, at_least)
    tasks = -(-K // CUDA_GATHER_TASK_INPUTS)
    per_tiles = -(-(-(-(-(-K // 4)) // slices)) // 32) * 32  # the kernel's slice_tiles_for
    assert 1 <= slices <= tasks and -(-(-(-K // 4)) // per_tiles) == slices
    assert bps * rows * per_tiles * 4 * 4 <= SMEM_BUDGET


def test_slices_raise_when_one_task_does_not_fit():
    with pytest.raises(ValueError, match="8 rows of x do not fit"):
        gather_slices(8, 4096, 64)


def test_rows_and_configs():
    assert [rows_for(M) for M in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 8, 8]
    for M in (1, 2, 3, 8, 16):
        configs = cuda_gather_configs(M)
        assert configs and all(c[0] == rows_for(M) and c[6] == CUDA_GATHER for c in configs)
        for cfg in configs:
            check_cuda_gather_config(cfg)
            assert cfg[1] * cfg[4] <= WARPS_AN_SM[cfg[0]] and (cfg[1], cfg[4]) in CUDA_GATHER_SHAPES
            assert "CUDA gather GEMV" in describe(cfg)
    with pytest.raises(ValueError, match="1 to 16 rows"):
        cuda_gather_configs(17)
    for bad, match in [((1, 1, 128, 1, 16, 1, 2), "not a CUDA gather config"), ((3, 1, 128, 1, 16, 1, CUDA_GATHER), "one of"),
                       ((1, 1, 256, 1, 16, 1, CUDA_GATHER), "fixed"), ((1, 0, 128, 1, 16, 1, CUDA_GATHER), "≥ 1"),
                       ((1, 1, 128, 1, 17, 1, CUDA_GATHER), "warps 1 to 16")]:
        with pytest.raises(ValueError, match=match):
            check_cuda_gather_config(bad)


def gather_offered(x, w, *lora_bias) -> bool:
    """Whether the forward launcher passes CUDA gather candidates to the tuner for this call (the
    tuner itself is replaced: it returns the first tiled config, which then runs)."""
    fwd = importlib.import_module("loraq.kernels.lora_linear_fwd")
    seen = []

    def spy(op, M, N, K, dtype, device, run, bench=None, extra=None):
        seen.extend(candidates_passed(extra) or [])
        return configs_for(M)[0]

    real, fwd.pick_config = fwd.pick_config, spy
    try:
        lora_linear_fwd(x, "sparse4x4", *_kernel_args(w), *lora_bias)
    finally:
        fwd.pick_config = real
    assert seen
    return any(c[6] == CUDA_GATHER for c in seen)


def test_status_and_refusals_off_the_gpu(monkeypatch):
    """Forced, it raises with the reason before anything runs; tuned, it is not among the
    candidates on the CPU (nor anywhere the extension is missing)."""
    ok, why = cuda_gather_status(torch.zeros(1, 64, dtype=torch.float16))
    assert not ok and "CUDA kernel" in why
    w, x, A, B, b = problem("sparse4x4", torch.float16, 2, 37, 300, device="cpu")
    tensors, meta = _kernel_args(w)
    with pytest.raises(ValueError, match="CUDA gather GEMV, which cannot run here: .*CUDA kernel"):
        lora_linear_fwd(x, "sparse4x4", tensors, meta, A, B, 0.5, b, config=CFG)
    with pytest.raises(ValueError, match="CUDA kernel"):
        sparse4x4_gemv_cuda(x, tensors, meta, A, B, 0.5, b)
    i = problem("int1", torch.float16, 2, 37, 300, device="cpu")[0]
    with pytest.raises(ValueError, match="it takes a sparse4x4 weight, got int1"):
        lora_linear_fwd(x, "int1", *_kernel_args(i), A, B, 0.5, b, config=CFG)
    monkeypatch.setenv("LORAQ_CUDA_GEMV", "1")  # offered, but it cannot run here
    assert not gather_offered(x, w, A, B, 0.5, b)
    if torch.cuda.is_available():
        cuda = torch.zeros(1, 64, dtype=torch.float16, device="cuda")
        assert "float16 or bfloat16" in cuda_gather_status(cuda.float())[1]
        assert "1 to 16 rows" in cuda_gather_status(torch.zeros(17, 64, dtype=torch.float16, device="cuda"))[1]


# --- on a GPU, with the extension built -------------------------------------------------------


def _needs_kernel():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ok, why = cuda_gather_status(torch.zeros(1, 32, dtype=torch.float16, device="cuda"))
    if not ok:
        pytest.skip(why)


def run_gather(dtype, M, N, K, cfg=None, lora=True, bias=True, scaling=0.5):
    w, x, A, B, b = problem("sparse4x4", dtype, M, N, K, r=5, lora=lora, bias=bias)
    tensors, meta = _kernel_args(w)
    cfg = cfg or cuda_gather_configs(M)[0]
    y = lora_linear_fwd(x, "sparse4x4", tensors, meta, A, B, scaling, b, config=cfg)
    assert y.shape == (M, N) and y.dtype == dtype
    check(y, reference.lora_linear_ref(f64(x), w.to(torch.float64), f64(A), f64(B), scaling, f64(b)),
          reference.lora_linear_ref(x, w, A, B, scaling, b), f"cuda gather {dtype} M={M} N={N} K={K} {cfg}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 2, 3, 8, 9, 16])
@pytest.mark.parametrize("N, K", [(37, 300), (1000, 1000), (77, 4100), (4096, 4096), (300, 14336), (28672, 512)])
def test_matches_reference(dtype, M, N, K):
    _needs_kernel()
    run_gather(dtype, M, N, K)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", CUDA_GATHER_SHAPES, ids=str)
@pytest.mark.parametrize("k_split", [1, 3, 40])
@pytest.mark.parametrize("rows, M", [(1, 1), (2, 2), (4, 3), (8, 5), (8, 16), (1, 4)])
def test_every_shape_split_and_rows(shape, k_split, rows, M):
    _needs_kernel()
    bps, warps = shape
    run_gather(torch.float16, M, 333, 2100, (rows, bps, CUDA_GATHER_TASK_INPUTS, k_split, warps, 1, CUDA_GATHER))


@pytest.mark.gpu
@pytest.mark.parametrize("lora_bias", [(True, True), (False, False), (True, False), (False, True)],
                         ids=["lora+bias", "plain", "lora", "bias"])
@pytest.mark.parametrize("M", [1, 2, 7, 12])
def test_with_and_without_lora_and_bias(lora_bias, M):
    _needs_kernel()
    run_gather(torch.bfloat16, M, 513, 1027, lora=lora_bias[0], bias=lora_bias[1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_each_value_lands_in_its_place(dtype):
    """Exact on the GPU: integer x and values, every sum exact in fp32."""
    _needs_kernel()
    g = torch.Generator().manual_seed(5)
    N, K = 1000, 2048
    w = Sparse4x4Weight.from_dense(torch.randint(-8, 9, (N, K), generator=g).float()).to(dtype).to("cuda")
    x = torch.randint(-4, 5, (6, K), generator=g).to(dtype).to("cuda")
    tensors, meta = _kernel_args(w)
    for M in (1, 6):
        y = lora_linear_fwd(x[:M], "sparse4x4", tensors, meta, config=cuda_gather_configs(M)[0])
        exact = (x[:M].double() @ w.dequantize().double().t()).to(dtype)
        assert torch.equal(y, exact), f"M={M}"


@pytest.mark.gpu
def test_the_tuner_offers_it_up_to_16_rows(monkeypatch):
    """With the extension built and LORAQ_CUDA_GEMV=1, a sparse4x4 forward of up to 16 rows (fp16)
    times it among the others; without the variable, it does not."""
    _needs_kernel()
    w, x, A, B, b = problem("sparse4x4", torch.float16, 16, 64, 512)
    monkeypatch.setenv("LORAQ_CUDA_GEMV", "1")
    assert gather_offered(x, w, A, B, 0.5, b) and gather_offered(x[:1], w)
    assert not gather_offered(torch.cat([x, x[:1]]), w, A, B, 0.5, b)  # 17 rows
    assert not gather_offered(x.float(), w)
    monkeypatch.delenv("LORAQ_CUDA_GEMV")
    assert not gather_offered(x[:3], w, A, B, 0.5, b)  # opt-in
