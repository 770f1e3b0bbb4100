"""The int1 byte-lookup GEMV in CUDA (csrc/int1_gemv_lut8.cuh; the op's ``lut = 2``), without a
GPU: its table fill, loads, lane sums and the transpose's steps run on the host
(tests/cuda/int1_lut8_emulate.cu, the kernel's own code, block by block and lane by lane as the
kernel splits the work) against x·Ŵᵀ in float64; its table layout is checked for bank conflicts;
every instantiation is compiled for sm_90. The tests marked ``gpu`` run the op itself against the
reference, in two launches and in one (the one-launch finish's protocol, with this kernel's row
runs, runs on the host in tests/test_gemv_finish.py)."""

import ctypes
import random

import pytest
import torch

from host_cuda import host_library, sass_cuda
from loraq.formats import Int1Weight
from test_int1_gemv_lut_cuda import LUT_CFG, expected
from weights import aligned, offset_view

DTYPES = {torch.float16: 0, torch.bfloat16: 1}
SLICE_INPUTS = 1024  # csrc/int1_gemv_lut8.cuh: kSliceInputs


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    so = host_library("int1_lut8_emulate.cu", tmp_path_factory.mktemp("lut8"))
    so.int1_lut8_emulate.restype = ctypes.c_int
    so.int1_lut8_emulate.argtypes = ([ctypes.c_int] * 2 + [ctypes.c_void_p] * 4 + [ctypes.c_int] * 6
                                     + [ctypes.c_void_p])
    so.int1_lut8_entry_offset.argtypes = [ctypes.c_int] * 3
    so.int1_lut8_permuted_offset.argtypes = [ctypes.c_uint32, ctypes.c_int, ctypes.c_int]
    return so


def weight(kind, N, K):
    W = torch.randn(N, K)
    if kind == "onebit":
        return Int1Weight.from_dense(W, scale="onebit")
    return Int1Weight.from_dense(W, group_size=int(kind[1:]) if kind != "row" else None)


def emulate(lib, x, w, dtype, blocks, warps, g_offset=False):
    N, K = w.shape
    mode = 2 if w.scale_mode == "onebit" else (1 if w.group_size else 0)
    scale = w.scale.to(dtype).contiguous()
    g = w.col_scale.to(dtype).contiguous() if mode == 2 else None
    if g is not None:
        g = offset_view(g, 1) if g_offset else aligned(g)
    packed = w.packed.contiguous()
    ws = torch.zeros(N, dtype=torch.float32)
    rc = lib.int1_lut8_emulate(DTYPES[dtype], mode, x.data_ptr(), None if g is None else g.data_ptr(),
                               packed.data_ptr(), scale.data_ptr(), N, K, scale.shape[1], w.group_size or 0,
                               blocks, warps, ws.data_ptr())
    assert rc == 0
    return ws.double()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kind", ["row", "g32", "g96", "onebit"])
@pytest.mark.parametrize("N, K, blocks, warps", [
    (37, 45, 1, 1), (100, 700, 3, 4), (33, 1100, 2, 32), (129, 2048, 5, 3), (16, 1025, 1, 2), (300, 3000, 2, 8),
    (7, 64, 4, 32), (5, 7, 1, 1), (40, 31, 2, 3)])
@pytest.mark.parametrize("where", ["aligned", "offset"])
def test_the_kernels_sums_are_x_times_w(lib, dtype, kind, N, K, blocks, warps, where):
    """Odd N and K (a last word and a last slice cut short, K below one word), runs of rows that
    end inside a batch, warps with no rows at all (N = 7 over 128 warps), x (and onebit's g)
    aligned to 16 bytes or not."""
    w = weight(kind, N, K)
    x = torch.randn(1, K).to(dtype)
    x = aligned(x) if where == "aligned" else offset_view(x, 1)
    got = emulate(lib, x, w, dtype, blocks, warps, g_offset=where == "offset")
    want = expected(x, w, dtype)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max())), \
        float((got - want).abs().max())


def test_small_integers_give_exact_sums(lib):
    """Integer inputs and scales of 1: every entry and sum is an exact integer in fp32, so any
    slip of a byte, lane, row or step of the transpose shows as a wrong integer."""
    N, K = 45, 2100
    w = Int1Weight.from_dense(torch.randn(N, K))
    w.scale.fill_(1.0)
    x = torch.randint(-3, 4, (1, K)).half()
    got = emulate(lib, x, w, torch.float16, 2, 5)
    assert torch.equal(got, expected(x, w, torch.float16))


@pytest.mark.parametrize("old, new", [
    ("return (l >> 2) & (kRows - 1);", "return ((l >> 2) ^ 1) & (kRows - 1);"),  # the row a lane ends with
    ("return upper ? v[i] : v[i + P];", "return upper ? v[i + P] : v[i];"),  # the half a lane sends
    ("return 0x6604u | ((uint32_t)b << 4);", "return 0x6604u | ((uint32_t)(b ^ 1) << 4);"),  # the byte a lookup takes
    ("if (left > 1) load_rows(col, a.KW, n0 + kRows,", "if (left > 1) load_rows(col, a.KW, n0 + kRows - 1,"),
])
def test_a_planted_bug_fails_the_check(tmp_path, old, new):
    """The check has teeth: the emulation built from a copy of the kernel with one line changed
    (each a plausible slip) no longer gives x·Ŵᵀ."""
    if sass_cuda.nvcc() is None:
        pytest.skip("no nvcc")
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "csrc", tmp_path / "csrc")
    shutil.copytree(root / "tests" / "cuda", tmp_path / "tests" / "cuda")
    header = tmp_path / "csrc" / "int1_gemv_lut8.cuh"
    text = header.read_text()
    assert text.count(old) == 1, old
    header.write_text(text.replace(old, new))
    so = tmp_path / "libmutant.so"
    done = subprocess.run([sass_cuda.nvcc(), "-O2", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-o", str(so),
                           str(tmp_path / "tests" / "cuda" / "int1_lut8_emulate.cu")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    mutant = ctypes.CDLL(str(so))
    mutant.int1_lut8_emulate.restype = ctypes.c_int
    mutant.int1_lut8_emulate.argtypes = ([ctypes.c_int] * 2 + [ctypes.c_void_p] * 4 + [ctypes.c_int] * 6
                                         + [ctypes.c_void_p])
    w = weight("row", 100, 2100)
    x = torch.randn(1, 2100).half()
    want = expected(x, w, torch.float16)
    got = emulate(mutant, x, w, torch.float16, 2, 3)
    assert not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


def test_the_emulation_refuses_bad_arguments(lib):
    x = torch.randn(1, 64, dtype=torch.float16)
    w = Int1Weight.from_dense(torch.randn(8, 64))
    ws = torch.zeros(8)
    args = [0, 0, x.data_ptr(), None, w.packed.data_ptr(), w.scale.half().data_ptr(), 8, 64, 1, 0, 1, 1,
            ws.data_ptr()]
    for i, bad in [(1, 3), (11, 33), (10, 0), (0, 2)]:
        changed = list(args)
        changed[i] = bad
        assert lib.int1_lut8_emulate(*changed) == 1
    group16 = list(args)
    group16[1], group16[9] = 1, 16
    assert lib.int1_lut8_emulate(*group16) == 1
    assert torch.count_nonzero(ws) == 0


def test_the_layout_has_no_bank_conflicts_and_no_overlap(lib):
    """Every (byte, entry, lane column) has its own 4 bytes inside the 128 KiB table, and lane l's
    entries all lie in bank l: a warp's lookup is one wavefront whatever the weights."""
    size = lib.int1_lut8_table_bytes()
    assert size == 128 * 1024
    seen = set()
    for b in range(4):
        for e in range(256):
            for lane in range(32):
                o = lib.int1_lut8_entry_offset(b, e, lane)
                assert 0 <= o <= size - 4 and o % 4 == 0
                assert (o // 4) % 32 == lane
                seen.add(o)
    assert len(seen) == size // 4


def test_the_permute_builds_each_bytes_entry_offset(lib):
    """One PRMT of the weight word and the lane's low byte (plus 64 KiB for bytes 2 and 3, the
    LDS's immediate) is the offset of the entry the byte picks in the lane's column."""
    rng = random.Random(0)
    words = [0, 0xFFFFFFFF, 0x80000001, 0x01020304] + [rng.getrandbits(32) for _ in range(200)]
    for word in words:
        for lane in (0, 1, 17, 31):
            for b in range(4):
                byte = (word >> (8 * b)) & 0xFF
                assert lib.int1_lut8_permuted_offset(word, lane, b) == lib.int1_lut8_entry_offset(b, byte, lane)


def test_every_instantiation_compiles_for_hopper():
    """Every instantiation the op can launch compiles for sm_90 at 64 registers; its loop (a batch
    of 8 rows: 32 lookups of 8 weights a lane) stays under 1 instruction a weight with per-row and
    onebit scales, and the table's base folds into every LDS (no IADD a lookup). The two-launch
    kernels spill nothing, nor do the one-launch ones (csrc/gemv_finish.cuh; with the wait for
    x·Aᵀ out of line they spilled 188 bytes), whose loop is the two-launch one's within 2%."""
    if sass_cuda.nvcc() is None:
        pytest.skip("no nvcc")
    results = sass_cuda.compile_all(90, "lut8")
    assert len(results) == 12  # 2 dtypes x 3 modes x two launches or one
    loops = {(r["dtype"], r["mode"], r["one"]): r["loop"] for r in results}
    for r in results:
        loop = r["loop"]
        assert loop is not None and loop["LDS"] == 32 and loop["PRMT"] == 32, sass_cuda.describe(r)
        assert r["registers"] <= 64 and r["spill_bytes"] == 0 and r["call_spill_bytes"] == 0, sass_cuda.describe(r)
        per_weight = sum(loop.values()) / 256
        assert per_weight <= (1.0 if r["mode"] != 1 else 1.5), sass_cuda.describe(r)
        if r["one"]:
            two = sum(loops[(r["dtype"], r["mode"], False)].values())
            assert sum(loop.values()) <= 1.02 * two, sass_cuda.describe(r)


# --- the launcher, off the GPU ----------------------------------------------------------------
from loraq.kernels import lora_linear_fwd  # noqa: E402
from loraq.kernels.autotune import CUDA_LUT, CUDA_LUT8, MMA_GEMV, describe  # noqa: E402
from loraq.kernels.int1_gemv_mma import (CUDA_LUT8_SLICE_INPUTS, check_mma_config, cuda_lut8_configs,  # noqa: E402
                                         int1_gemv_mma, lut8_k_slices)
from test_int1_gemv_lut_cuda import run_lut  # noqa: E402  (the byte-lookup configs through the same check)
from test_triton_kernels import _kernel_args, check, f64, problem, tuner_calls, workspaces_clean  # noqa: E402
from loraq import reference  # noqa: E402

LUT8_CFG = (1, 1, CUDA_LUT8_SLICE_INPUTS, 1, 32, 1, CUDA_LUT8)


@pytest.mark.parametrize("K, slices", [(1, 1), (1023, 1), (1024, 1), (1025, 2), (4096, 4), (8192, 8), (14336, 14)])
def test_k_is_cut_in_slices_of_1024(K, slices):
    assert lut8_k_slices(K) == slices
    assert SLICE_INPUTS == CUDA_LUT8_SLICE_INPUTS


def test_configs_are_valid_and_bad_ones_are_refused():
    for cfg in cuda_lut8_configs(1):
        check_mma_config(cfg)
        assert describe(cfg).startswith("CUDA byte-lookup GEMV (loraq._C)")
    with pytest.raises(ValueError, match="one row of x"):
        cuda_lut8_configs(2)
    for bad in [(16, 1, 1024, 1, 32, 1, CUDA_LUT8), (1, 2, 1024, 1, 32, 1, CUDA_LUT8), (1, 1, 512, 1, 32, 1, CUDA_LUT8),
                (1, 1, 1024, 3, 32, 1, CUDA_LUT8), (1, 1, 1024, 1, 33, 1, CUDA_LUT8), (1, 1, 1024, 1, 0, 1, CUDA_LUT8),
                (1, 1, 1024, 1, 32, 2, CUDA_LUT8)]:
        with pytest.raises(ValueError, match="byte-lookup"):
            check_mma_config(bad)


@pytest.mark.parametrize("cfg, lookup", [(LUT_CFG, True), (LUT8_CFG, "byte")], ids=["nibble", "byte"])
def test_forced_off_the_gpu_it_raises_with_the_reason(cfg, lookup):
    """Both lookup GEMVs, forced off the GPU or given two rows of x, raise with the reason."""
    w, x, A, B, b = problem("int1", torch.float16, 1, 37, 300, device="cpu")
    tensors, meta = _kernel_args(w)
    with pytest.raises(ValueError, match="CUDA int1 GEMV, which cannot run here: .*CUDA kernel"):
        lora_linear_fwd(x, "int1", tensors, meta, A, B, 0.5, b, config=cfg)
    with pytest.raises(ValueError, match="one row of x, got 2"):
        int1_gemv_mma(torch.cat([x, x]), tensors, meta, lookup=lookup)
    with pytest.raises(ValueError, match="lookup must be"):
        int1_gemv_mma(x, tensors, meta, lookup="word")


@pytest.mark.parametrize("M", [1, 2, 16])
@pytest.mark.parametrize("table_fits", [True, False])
def test_the_tuner_gets_it_for_one_row_where_the_table_fits(monkeypatch, M, table_fits):
    """Where the CUDA GEMVs can run (faked here), one row of x adds both lookup GEMVs' configs to
    the mma GEMV's, the byte-lookup one only where a block may take its 128 KiB table."""
    import importlib

    module = importlib.import_module("loraq.kernels.lora_linear_fwd")
    monkeypatch.setattr(module, "mma_gemv_status", lambda x, meta: (True, ""))
    monkeypatch.setattr(module, "cuda_lut8_status",
                        lambda x, meta: (True, "") if table_fits else (False, "the table needs more"))
    monkeypatch.setenv("LORAQ_CUDA_GEMV", "1")
    w, x, A, B, b = problem("int1", torch.float16, M, 37, 300, device="cpu")
    with tuner_calls(lora_linear_fwd) as seen:
        lora_linear_fwd(x, "int1", *_kernel_args(w), A, B, 0.5, b)
    variants = [c[6] for c in seen[0].candidates]
    assert MMA_GEMV in variants
    assert (CUDA_LUT in variants) == (M == 1)
    assert (CUDA_LUT8 in variants) == (M == 1 and table_fits)


def test_the_status_asks_for_the_tables_shared_memory(monkeypatch):
    """On a GPU whose blocks take less than 128 KiB of shared memory the kernel is not offered,
    with the reason (the status of the 4-input lookup GEMV first)."""
    import importlib

    module = importlib.import_module("loraq.kernels.int1_gemv_mma")
    w, x, *_ = problem("int1", torch.float16, 1, 37, 300, device="cpu")
    meta = _kernel_args(w)[1]
    assert not module.cuda_lut8_status(x, meta)[0]  # on the CPU: the lookup GEMV's own reason
    monkeypatch.setattr(module, "cuda_lut_status", lambda x, meta: (True, ""))
    monkeypatch.setattr(module, "smem_limits", lambda index: (101376, 102400))
    ok, why = module.cuda_lut8_status(x, meta)
    assert not ok and "131072 bytes of shared memory a block, this GPU allows 101376" in why
    monkeypatch.setattr(module, "smem_limits", lambda index: (232448, 233472))
    assert module.cuda_lut8_status(x, meta) == (True, "")


@pytest.mark.parametrize("one_launch, env", [(True, "0"), (None, "1"), (False, "1"), (None, "0")])
@pytest.mark.parametrize("lora", [True, False])
def test_the_plan_launches_it_in_one_launch_when_asked(monkeypatch, one_launch, env, lora):
    """bind_mma's plan for the byte-lookup GEMV (the op faked, on the CPU): with one_launch (or
    LORAQ_ONE_LAUNCH=1 when it is None) one call of the op with y, zeroed counters for every unit
    of 16 rows and item of x·Aᵀ, and x·Aᵀ [1, 1, 16]; else the op without y, then the finish.
    Either way K slices of 1024, one block an SM among them."""
    import importlib

    module = importlib.import_module("loraq.kernels.int1_gemv_mma")
    from loraq.kernels.decode import lora_and_bias_args, weight_args

    monkeypatch.setattr(module, "sm_count", lambda index: 132)
    monkeypatch.setattr(module, "smem_limits", lambda index: (232448, 233472))
    monkeypatch.setenv("LORAQ_ONE_LAUNCH", env)
    N, K = 100, 3000
    w, x, A, B, b = problem("int1", torch.float16, 1, N, K, r=5, lora=lora, device="cpu")
    tensors, meta = _kernel_args(w)
    ptrs, ints, mode = weight_args("int1", tensors, meta)
    A, B, b = lora_and_bias_args(x, A, B, b)
    calls = []

    def fake_op(x, packed, scale, col, lora_A, ws, parts, mode_op, group, blocks, warps, k_split, y=None,
                counters=None, lora_B=None, bias=None, scaling=1.0, slots=0, lut=0, row_groups=1):
        calls.append(dict(y=y, counters=counters, parts=parts, blocks=blocks, warps=warps, k_split=k_split, lut=lut,
                          slots=slots, zeroed=not ws.any() and (counters is None or not counters.any())))
        if y is not None:
            y.fill_(3)
        elif parts is not None:  # the slots' shares of x·Aᵀ, for the finish
            parts.zero_()

    monkeypatch.setattr(torch.ops.loraq, "int1_gemv_mma", fake_op, raising=False)
    run = module.bind_mma(x.shape, x.dtype, x.device, ptrs, ints, mode, N, A, B, 0.5, b, LUT8_CFG[:4] + (16,) + LUT8_CFG[5:],
                          one_launch)
    y = run(x)
    (call,) = calls
    assert call["lut"] == 2 and call["k_split"] == 3 and call["blocks"] == 44 and call["warps"] == 16 and call["zeroed"]
    if one_launch or (one_launch is None and env == "1"):
        assert torch.equal(y, torch.full((1, N), 3.0, dtype=torch.float16))
        items = call["slots"] * -(-5 // 4) if lora else 0
        assert call["counters"].numel() >= -(-N // 16) + 2 + items
        assert (call["parts"] is not None) == lora and (not lora or tuple(call["parts"].shape) == (1, 1, 16))
    else:
        assert call["y"] is None and call["counters"] is None and y.shape == (1, N)


# --- on a GPU, with the extension built -------------------------------------------------------
from test_int1_gemv_mma import _needs_kernel, calls_then_graph_replays  # noqa: E402  (what the mma GEMV needs)


def _needs_lut8():
    _needs_kernel()
    from loraq.kernels.int1_gemv_mma import cuda_lut8_status

    ok, why = cuda_lut8_status(torch.zeros(1, 32, dtype=torch.float16, device="cuda"),
                               {"scale_mode": "mean_abs", "group_size": None})
    if not ok:
        pytest.skip(why)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["int1", "int1_g32", "int1_g96", "int1_onebit"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N, K", [(37, 300), (1000, 1000), (77, 4100), (4096, 4096), (300, 14336), (28672, 8192)])
def test_gpu_matches_reference(kind, dtype, N, K):
    _needs_lut8()
    run_lut(kind, dtype, N, K, LUT8_CFG)


@pytest.mark.gpu
@pytest.mark.parametrize("warps", [32, 16, 7, 1])
def test_gpu_every_block_size(warps):
    _needs_lut8()
    run_lut("int1_g64", torch.float16, 1000, 4100, LUT8_CFG[:4] + (warps,) + LUT8_CFG[5:])


@pytest.mark.gpu
def test_gpu_more_slices_than_sms():
    """K in more slices than the GPU has SMs: one block a slice, in more than one wave."""
    _needs_lut8()
    K = 1024 * (torch.cuda.get_device_properties(0).multi_processor_count + 5) - 100
    run_lut("int1", torch.float16, 77, K, LUT8_CFG)


@pytest.mark.gpu
@pytest.mark.parametrize("lora_bias", [(True, True), (False, False), (True, False), (False, True)],
                         ids=["lora+bias", "plain", "lora", "bias"])
def test_gpu_with_and_without_lora_and_bias(lora_bias):
    _needs_lut8()
    run_lut("int1", torch.bfloat16, 333, 2000, LUT8_CFG, lora=lora_bias[0], bias=lora_bias[1])


@pytest.mark.gpu
def test_gpu_exact_with_small_integers():
    """Integer x and scales of 1: the sums are exact, so y equals x·signsᵀ exactly (fp32 workspace,
    |y| ≤ K < 2^11 so that fp16 holds it; two K slices)."""
    _needs_lut8()
    N, K = 3000, 2000
    w = Int1Weight.from_dense(torch.randn(N, K))
    w.scale.fill_(1.0)
    x = torch.randint(-1, 2, (1, K)).half()
    tensors, meta = _kernel_args(w.to("cuda"))
    y = lora_linear_fwd(x.cuda(), "int1", tensors, meta, None, None, 1.0, None, config=LUT8_CFG)
    assert torch.equal(y.cpu().double(), (x.double() @ w.signs().double().T))


@pytest.mark.gpu
def test_gpu_the_op_refuses_more_rows_and_too_few_slices():
    _needs_lut8()
    w, x, A, B, b = problem("int1", torch.float16, 2, 64, 2048)
    tensors, _ = _kernel_args(w)
    ws = torch.zeros(2, 64, device="cuda")
    scale = tensors["scale"].half()
    packed = tensors["packed"]
    with pytest.raises(RuntimeError, match=r"lookup GEMV \(lut = 2\) takes one row of x"):
        torch.ops.loraq.int1_gemv_mma(x, packed, scale, scale, None, ws, None, 0, 0, 1, 32, 2, lut=2)
    with pytest.raises(RuntimeError, match="k_split must be at least ceil"):
        torch.ops.loraq.int1_gemv_mma(x[:1], packed, scale, scale, None, ws[:1], None, 0, 0, 1, 32, 1, lut=2)
    y = torch.empty(1, 64, device="cuda", dtype=torch.float16)
    counters = torch.zeros(2, dtype=torch.int32, device="cuda")  # too few: 4 arrivals + 2
    with pytest.raises(RuntimeError, match="counters must have at least"):
        torch.ops.loraq.int1_gemv_mma(x[:1], packed, scale, scale, None, ws[:1], None, 0, 0, 1, 32, 2, y, counters,
                                      lut=2)
    assert torch.count_nonzero(ws) == 0 and torch.count_nonzero(counters) == 0


# --- the one-launch finish (csrc/gemv_finish.cuh: units of 16 rows arrived at by rows) ---------


def run_one_launch(kind, dtype, N, K, warps=32, lora=True, bias=True):
    """int1_gemv_mma(lookup="byte") with its finish in the same launch and in a second one, each
    against the reference, the workspaces left zero after each."""
    w, x, A, B, b = problem(kind, dtype, 1, N, K, r=5, lora=lora, bias=bias)
    tensors, meta = _kernel_args(w)
    want = (reference.lora_linear_ref(f64(x), w.to(torch.float64), f64(A), f64(B), 0.5, f64(b)),
            reference.lora_linear_ref(x, w, A, B, 0.5, b))
    for one in (True, False):
        y = int1_gemv_mma(x, tensors, meta, A, B, 0.5, b, warps=warps, one_launch=one, lookup="byte")
        assert y.shape == (1, N) and y.dtype == dtype
        check(y, *want, f"byte lookup {kind} {dtype} N={N} K={K} warps={warps} one launch={one}")
        assert workspaces_clean(), f"one launch={one} left its workspace dirty"


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["int1", "int1_g32", "int1_g96", "int1_onebit"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N, K", [(37, 300), (1000, 1000), (77, 4100), (4096, 4096), (28672, 8192)])
def test_gpu_one_launch_matches_reference(kind, dtype, N, K):
    _needs_lut8()
    run_one_launch(kind, dtype, N, K)


@pytest.mark.gpu
@pytest.mark.parametrize("warps", [32, 16, 7, 1])
@pytest.mark.parametrize("lora_bias", [(True, True), (False, False), (True, False), (False, True)],
                         ids=["lora+bias", "plain", "lora", "bias"])
def test_gpu_one_launch_every_block_size_and_path(warps, lora_bias):
    _needs_lut8()
    run_one_launch("int1_g64", torch.float16, 1000, 4100, warps, *lora_bias)


@pytest.mark.gpu
def test_gpu_one_launch_more_slices_than_sms_and_fewer_rows_than_warps():
    """More K slices than SMs (blocks that wait for an SM while others finish: the finishers
    compute the unclaimed batches of x·Aᵀ), and 5 rows for hundreds of warps (the last warp of
    each slice pads the only unit)."""
    _needs_lut8()
    run_one_launch("int1", torch.float16, 77, 1024 * (torch.cuda.get_device_properties(0).multi_processor_count + 5) - 100)
    run_one_launch("int1_onebit", torch.bfloat16, 5, 3000)


@pytest.mark.gpu
def test_gpu_one_launch_a_warp_arrives_at_more_than_32_units():
    """One block a slice of one warp: each warp's run is all 1000 rows, 63 units, so its lanes take
    the units 32 at a time (arrive_and_finish's outer loop, which the host emulation does not
    reach: it arrives unit by unit)."""
    _needs_lut8()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    run_one_launch("int1", torch.float16, 1000, 1024 * (sms // 2 + 1), warps=1)


@pytest.mark.gpu
def test_gpu_one_launch_many_calls_and_a_cuda_graph():
    """Ten calls, then a CUDA graph replayed five times: each finds the counters, x·Aᵀ and the
    sums zero, so every answer is the first's (within the order of the atomics)."""
    _needs_lut8()
    w, x, A, B, b = problem("int1", torch.float16, 1, 4096, 4096, r=16)
    tensors, meta = _kernel_args(w)
    run = lambda: int1_gemv_mma(x, tensors, meta, A, B, 0.5, b, one_launch=True, lookup="byte")  # noqa: E731
    want = (reference.lora_linear_ref(f64(x), w.to(torch.float64), f64(A), f64(B), 0.5, f64(b)),
            reference.lora_linear_ref(x, w, A, B, 0.5, b))
    calls_then_graph_replays(run, want, "byte lookup, one launch")
