"""The int1 lookup GEMV in CUDA (csrc/int1_gemv_lut.cuh; the op's ``lut = 1``), without a GPU:
its table fill, group offsets and lane sums run on the host (tests/cuda/int1_lut_emulate.cu, the
kernel's own code, block by block and lane by lane as the kernel splits the work) against x·Ŵᵀ in
float64; its table layout is checked for bank conflicts; every instantiation is compiled for
sm_90. The tests marked ``gpu`` run the op itself against the reference."""

import ctypes

import pytest
import torch

from host_cuda import host_library, sass_cuda
from loraq.formats import Int1Weight
from weights import aligned, offset_view

TASK_INPUTS = 512  # csrc/int1_gemv_lut.cuh: kTaskInputs
DTYPES = {torch.float16: 0, torch.bfloat16: 1}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    so = host_library("int1_lut_emulate.cu", tmp_path_factory.mktemp("lut"))
    so.int1_lut_emulate.restype = ctypes.c_int
    so.int1_lut_emulate.argtypes = ([ctypes.c_int] * 2 + [ctypes.c_void_p] * 4 + [ctypes.c_int] * 7
                                    + [ctypes.c_void_p])
    so.int1_lut_group_offset.argtypes = [ctypes.c_int] * 3
    so.int1_lut_table_bytes.argtypes = [ctypes.c_int]
    return so


def expected(x, w, dtype):
    """x·Ŵᵀ in float64 as the kernel means it: scales rounded to x's dtype (the launcher casts
    them), onebit's x·g rounded to it."""
    signs = w.signs().double()
    K = w.shape[1]
    if w.scale_mode == "onebit":
        xg = (x.float() * w.col_scale.to(dtype).float()).to(dtype).double()
        return (signs @ xg[0]) * w.scale.to(dtype).double()[:, 0]
    gs = w.group_size or K
    alpha = w.scale.to(dtype).double().repeat_interleave(gs, dim=1)[:, :K]
    return (signs * alpha) @ x.double()[0]


def emulate(lib, x, w, dtype, slice_inputs, blocks, warps):
    N, K = w.shape
    mode = 2 if w.scale_mode == "onebit" else (1 if w.group_size else 0)
    scale = w.scale.to(dtype).contiguous()
    g = w.col_scale.to(dtype).contiguous() if mode == 2 else None
    packed = w.packed.contiguous()
    ws = torch.zeros(N, dtype=torch.float32)
    rc = lib.int1_lut_emulate(DTYPES[dtype], mode, x.data_ptr(), None if g is None else g.data_ptr(),
                              packed.data_ptr(), scale.data_ptr(), N, K, scale.shape[1], w.group_size or 0,
                              slice_inputs, blocks, warps, ws.data_ptr())
    assert rc == 0
    return ws.double()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kind", ["row", "g32", "g96", "onebit"])
@pytest.mark.parametrize("N, K, slice_inputs, blocks, warps", [
    (37, 45, 512, 1, 1), (100, 700, 512, 3, 4), (33, 1100, 1024, 2, 32), (129, 2048, 512, 5, 3),
    (16, 513, 512, 1, 2)])
@pytest.mark.parametrize("where", ["aligned", "offset"])
def test_the_kernels_sums_are_x_times_w(lib, dtype, kind, N, K, slice_inputs, blocks, warps, where):
    W = torch.randn(N, K)
    if kind == "onebit":
        w = Int1Weight.from_dense(W, scale="onebit")
    else:
        w = Int1Weight.from_dense(W, group_size=int(kind[1:]) if kind != "row" else None)
    x = torch.randn(1, K).to(dtype)
    x = aligned(x) if where == "aligned" else offset_view(x, 1)
    got = emulate(lib, x, w, dtype, slice_inputs, blocks, warps)
    want = expected(x, w, dtype)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max())), \
        float((got - want).abs().max())


def test_the_emulation_refuses_bad_arguments(lib):
    x = torch.randn(1, 64, dtype=torch.float16)
    w = Int1Weight.from_dense(torch.randn(8, 64))
    ws = torch.zeros(8)
    args = [0, 0, x.data_ptr(), None, w.packed.data_ptr(), w.scale.half().data_ptr(), 8, 64, 1, 0, 512, 1, 1,
            ws.data_ptr()]
    for i, bad in [(1, 3), (10, 256), (12, 33), (9, 16)]:
        changed = list(args)
        changed[i] = bad
        if i == 9:
            changed[1] = 1  # group mode with a group of 16
        assert lib.int1_lut_emulate(*changed) == 1


@pytest.mark.parametrize("chunks", [1, 2, 3, 16, 28])
def test_the_table_layout_has_no_bank_conflicts_and_no_overlap(lib, chunks):
    """At each step (the lanes' word j of the chunk, group i), the 16 lanes of a half look up
    16 entries of one group (16 consecutive banks) and the two halves' groups lie in different
    banks; groups are 64-byte aligned (the nibble's offset is ORed in), distinct, inside the table."""
    size = lib.int1_lut_table_bytes(chunks)
    seen = set()
    for c in range(chunks):
        for j in range(8):
            for i in range(8):
                off = []
                for h in range(2):
                    p = (j & 3) | (h << 2) | ((j >> 2) << 3)  # chunk_word(h, j)
                    o = lib.int1_lut_group_offset(16 * c + p, i, chunks)
                    assert o % 64 == 0 and 0 <= o and o + 64 <= size
                    assert o not in seen
                    seen.add(o)
                    off.append(o)
                banks = [{(o // 4 + e) % 32 for e in range(16)} for o in off]
                assert not banks[0] & banks[1], (c, j, i, off)
    assert len(seen) == chunks * TASK_INPUTS // 4
    assert size == 16 * chunks * TASK_INPUTS + 128  # 16 bytes an input, and the padding


def test_every_instantiation_compiles_for_hopper():
    """Every instantiation the op can launch compiles for sm_90; two-launch ones do not spill, the
    one-launch ones (their wait for x·Aᵀ inlined: out of line, 240 bytes went to the stack) at most
    16 bytes and nothing in the loop, and the loop (two tasks: 128 lookups of 4 weights a lane)
    stays near 4 instructions a lookup."""
    if sass_cuda.nvcc() is None:
        pytest.skip("no nvcc")
    results = sass_cuda.compile_all(90, "lut")
    assert len(results) == 24
    for r in results:
        loop = r["loop"]
        assert loop is not None and loop["LDS"] == 128, sass_cuda.describe(r)
        total = sum(loop.values())
        assert r["spill_bytes"] <= (16 if r["one"] else 0) and r["call_spill_bytes"] == 0, sass_cuda.describe(r)
        assert loop.get("STL", 0) == 0 and loop.get("LDL", 0) == 0, sass_cuda.describe(r)
        limit = 1.5 if r["mode"] != 1 and r["vec"] else (1.7 if r["mode"] != 1 else 2.4)
        assert total / 512 <= limit, sass_cuda.describe(r)


# --- the launcher, off the GPU ----------------------------------------------------------------
from loraq import reference  # noqa: E402
from loraq.kernels import lora_linear_fwd  # noqa: E402
from loraq.kernels.autotune import CUDA_LUT  # noqa: E402
from loraq.kernels.cuda_ext import SMEM_BUDGET  # noqa: E402
from loraq.kernels.int1_gemv_mma import (CUDA_LUT_TASK_INPUTS, check_mma_config, cuda_lut_configs,  # noqa: E402
                                         lut_k_slices)
from test_triton_kernels import _kernel_args, check, f64, problem  # noqa: E402

LUT_CFG = (1, 1, CUDA_LUT_TASK_INPUTS, 1, 32, 1, CUDA_LUT)


@pytest.mark.parametrize("K", [1, 511, 512, 8192, 14336, 28672])
@pytest.mark.parametrize("bps", [1, 2, 4])
@pytest.mark.parametrize("at_least", [1, 3])
def test_lut_k_slices_cover_k_and_fit_the_shared_memory(K, bps, at_least):
    slices = lut_k_slices(K, bps, at_least)
    tasks = -(-K // CUDA_LUT_TASK_INPUTS)
    per = -(-tasks // slices)
    assert -(-tasks // per) == slices and slices >= min(at_least, tasks)
    table = 16 * per * CUDA_LUT_TASK_INPUTS + 128
    assert table <= SMEM_BUDGET and bps * (table + 1024) <= SMEM_BUDGET


def test_lut_configs_are_valid_and_bad_ones_are_refused():
    for cfg in cuda_lut_configs(1):
        check_mma_config(cfg)
    with pytest.raises(ValueError, match="one row of x"):
        cuda_lut_configs(2)
    for bad in [(16, 1, 512, 1, 32, 1, CUDA_LUT), (1, 1, 256, 1, 32, 1, CUDA_LUT), (1, 1, 512, 1, 33, 1, CUDA_LUT),
                (1, 1, 512, 1, 32, 1, 99)]:
        with pytest.raises(ValueError):
            check_mma_config(bad)


# forced off the GPU, and the tuner's offer at one row: tests/test_int1_gemv_lut8_cuda.py, for
# both lookup GEMVs


# --- on a GPU, with the extension built -------------------------------------------------------
from test_int1_gemv_mma import _needs_kernel  # noqa: E402  (the lookup GEMV needs what the mma GEMV needs)


def run_lut(kind, dtype, N, K, cfg=LUT_CFG, lora=True, bias=True, one_launch=False, monkeypatch=None):
    w, x, A, B, b = problem(kind, dtype, 1, N, K, r=5, lora=lora, bias=bias)
    tensors, meta = _kernel_args(w)
    if monkeypatch is not None:
        monkeypatch.setenv("LORAQ_ONE_LAUNCH", "1" if one_launch else "0")
    y = lora_linear_fwd(x, "int1", tensors, meta, A, B, 0.5, b, config=cfg)
    assert y.shape == (1, N) and y.dtype == dtype
    check(y, reference.lora_linear_ref(f64(x), w.to(torch.float64), f64(A), f64(B), 0.5, f64(b)),
          reference.lora_linear_ref(x, w, A, B, 0.5, b), f"lookup {kind} {dtype} N={N} K={K} {cfg}")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["int1", "int1_g32", "int1_g96", "int1_onebit"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N, K", [(37, 300), (1000, 1000), (77, 4100), (4096, 4096), (300, 14336), (28672, 8192)])
def test_gpu_matches_reference(kind, dtype, N, K):
    _needs_kernel()
    run_lut(kind, dtype, N, K)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", cuda_lut_configs(1), ids=str)
@pytest.mark.parametrize("k_split", [1, 3, 40])
@pytest.mark.parametrize("one_launch", [False, True], ids=["two launches", "one launch"])
def test_gpu_every_config_split_and_finish(cfg, k_split, one_launch, monkeypatch):
    _needs_kernel()
    run_lut("int1_g64", torch.float16, 1000, 4100, cfg[:3] + (k_split,) + cfg[4:], one_launch=one_launch,
            monkeypatch=monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("lora_bias", [(True, True), (False, False), (True, False), (False, True)],
                         ids=["lora+bias", "plain", "lora", "bias"])
def test_gpu_with_and_without_lora_and_bias(lora_bias):
    _needs_kernel()
    run_lut("int1", torch.bfloat16, 333, 2000, lora=lora_bias[0], bias=lora_bias[1])


@pytest.mark.gpu
def test_gpu_the_op_refuses_more_rows_and_the_offset_modes():
    _needs_kernel()
    w, x, A, B, b = problem("int1", torch.float16, 2, 64, 512)
    tensors, _ = _kernel_args(w)
    ws = torch.zeros(2, 64, device="cuda")
    scale = tensors["scale"].half()
    with pytest.raises(RuntimeError, match="lookup GEMV .* one row of x"):
        torch.ops.loraq.int1_gemv_mma(x, tensors["packed"], scale, scale, None, ws, None, 0, 0, 1, 32, 1, lut=1)
    with pytest.raises(RuntimeError, match="lookup GEMV .* one row of x and modes 0 to 2"):
        torch.ops.loraq.int1_gemv_mma(x[:1], tensors["packed"], scale, scale, None, ws[:1], None, 3, 0, 1, 32, 1,
                                      lut=1)
