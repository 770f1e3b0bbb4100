"""The CUDA mma GEMV (csrc/int1_gemv_mma.cuh, kernels/int1_gemv_mma.py): int1, up to 16 rows of x.

Off the GPU (CI): its planning (K slices against the shared memory), its configs, the reasons it
gives where it cannot run, and that the forward launcher neither offers nor runs it there. On a GPU
with the extension built (tests marked ``gpu``): against loraq.reference in every scale mode,
dtype and config, with odd shapes, and exactly, one weight at a time.
"""


import pytest
import torch

pytest.importorskip("triton")

from loraq import reference  # noqa: E402
from loraq.formats import Int1Weight  # noqa: E402
from loraq.kernels import lora_linear_fwd  # noqa: E402
from loraq.kernels.autotune import CUDA_LUT, MMA_GEMV, describe  # noqa: E402
from loraq.kernels.cuda_ext import SMEM_BUDGET, smem_limits  # noqa: E402
from loraq.kernels.int1_gemv_mma import (MMA_MAX_M, MMA_SHAPES, MMA_TASK32_INPUTS,  # noqa: E402
                                         MMA_SPLIT_AT_LEAST, MMA_SPLIT_MIN_M, MMA_SPLIT_SHAPES, MMA_TASK32_MIN_M,
                                         MMA_TASK32_SHAPES, MMA_TASK_INPUTS, check_mma_config,
                                         int1_gemv_mma, k_slices, mma_gemv_configs, mma_gemv_status, row_groups)
from test_triton_kernels import _kernel_args, check, f64, problem, tuner_calls, workspaces_clean  # noqa: E402
from weights import offset_view  # noqa: E402

CFG = (MMA_MAX_M, 2, MMA_TASK_INPUTS, 1, 16, 1, MMA_GEMV)
CFG32 = (MMA_MAX_M, 2, MMA_TASK32_INPUTS, 1, 12, 1, MMA_GEMV)  # tasks of 32 rows x 256 inputs


def mma_offered(x, w, *lora_bias) -> bool:
    """Whether the forward launcher passes mma GEMV candidates to the tuner for this call."""
    with tuner_calls(lora_linear_fwd) as seen:
        lora_linear_fwd(x, "int1", *_kernel_args(w), *lora_bias)
    assert seen
    return any(c[6] == MMA_GEMV for call in seen for c in call.candidates)


@pytest.mark.parametrize("M", [1, 3, 8, 16])
@pytest.mark.parametrize("K", [1, 31, 512, 513, 1000, 4096, 8192, 14336, 28672])
@pytest.mark.parametrize("bps", [1, 2, 4])
@pytest.mark.parametrize("at_least", [1, 3])
@pytest.mark.parametrize("offset", [False, True], ids=["pair order", "offset decode"])
@pytest.mark.parametrize("task", [MMA_TASK_INPUTS, MMA_TASK32_INPUTS], ids=["16-row tasks", "32-row tasks"])
def test_k_slices_cover_k_and_fit_the_shared_memory(M, K, bps, at_least, offset, task):
    """The slices are whole tasks, cover K, number what the kernel launches (its own rounding:
    ceil(K / slices) up to a task), and their copies of x (with the offset decode's table of C,
    one float a row and task) fit the budget."""
    slices = k_slices(M, K, bps, at_least, offset=offset, task_inputs=task)
    tasks = -(-K // task)
    per = -(-(-(-K // slices)) // task) * task  # the kernel's slice length
    assert 1 <= slices <= tasks and -(-K // per) == slices
    assert bps * M * (per * 2 + 32 + (4 * (per // task) if offset else 0)) <= SMEM_BUDGET
    assert per // task <= -(-tasks // min(at_least, tasks))  # at least as fine as asked


def test_k_slices_raise_when_one_task_does_not_fit():
    with pytest.raises(ValueError, match="do not fit"):
        k_slices(MMA_MAX_M, 4096, 64)


def test_configs_are_valid_and_bad_ones_are_refused():
    """16-row tasks at every M; 32-row tasks from MMA_TASK32_MIN_M rows of x (where a warp's read
    of B is two wavefronts), with at most 24 warps an SM (their kernels' 80 registers); from
    MMA_SPLIT_MIN_M rows a few with K in at least 4 slices (smaller copies of x)."""
    for M in (1, 4, 5, 8, 9, 16):
        configs = mma_gemv_configs(M)
        assert len(set(configs)) == len(configs) and all(c[6] == MMA_GEMV for c in configs)
        split = [c for c in configs if c[3] == MMA_SPLIT_AT_LEAST]
        tall = [c for c in configs if row_groups(c) == 2 and c not in split]
        assert len(configs) == len(MMA_SHAPES) + len(tall) + len(split)
        assert len(tall) == (len(MMA_TASK32_SHAPES) if M >= MMA_TASK32_MIN_M else 0)
        assert len(split) == (len(MMA_SPLIT_SHAPES) if M >= MMA_SPLIT_MIN_M else 0)
        assert all(c[3] == 1 for c in configs if c not in split)
        for cfg in configs:
            check_mma_config(cfg)
            assert "CUDA mma GEMV" in describe(cfg)
            assert ("32-row tasks" in describe(cfg)) == (cfg[2] == MMA_TASK32_INPUTS)
        assert all(c[4] * c[1] <= 24 for c in tall)
    with pytest.raises(ValueError, match="1 to 16 rows"):
        mma_gemv_configs(17)
    R = MMA_MAX_M
    for bad, match in [((R, 2, 512, 1, 16, 1, 2), "not an mma GEMV config"), ((8, 2, 512, 1, 16, 1, MMA_GEMV), "fixed"),
                       ((R, 2, 128, 1, 16, 1, MMA_GEMV), "field 2"), ((R, 0, 512, 1, 16, 1, MMA_GEMV), "≥ 1"),
                       ((R, 4, 512, 1, 32, 1, MMA_GEMV), "64 warps"), ((R, 1, 512, 1, 33, 1, MMA_GEMV), "warps 1 to 32"),
                       ((R, 1, 256, 1, 32, 1, MMA_GEMV), "warps 1 to 24"), ((R, 2, 256, 1, 16, 1, MMA_GEMV), "24 warps an SM"),
                       ((1, 1, 256, 1, 16, 1, CUDA_LUT), "fixed")]:
        with pytest.raises(ValueError, match=match):
            check_mma_config(bad)


def test_status_names_what_is_missing():
    meta = {"N": 4, "K": 64, "scale_mode": "mean_abs", "group_size": None}
    ok, why = mma_gemv_status(torch.zeros(1, 64, dtype=torch.float16), meta)
    assert not ok and "CUDA kernel" in why
    if torch.cuda.is_available():
        cuda = torch.zeros(1, 64, dtype=torch.float16, device="cuda")
        assert "float16 or bfloat16" in mma_gemv_status(cuda.float(), meta)[1]
        assert "1 to 16 rows" in mma_gemv_status(torch.zeros(17, 64, dtype=torch.float16, device="cuda"), meta)[1]
        assert "multiple of 32" in mma_gemv_status(cuda, dict(meta, group_size=48))[1]


def test_offset_decode_is_opt_in_and_only_for_row_and_onebit_scales(monkeypatch):
    from loraq.kernels.decode import SCALE_GROUP, SCALE_ONEBIT, SCALE_ROW
    from loraq.kernels.int1_gemv_mma import op_mode

    monkeypatch.delenv("LORAQ_OFFSET_DECODE", raising=False)
    assert [op_mode(m) for m in (SCALE_ROW, SCALE_GROUP, SCALE_ONEBIT)] == [0, 1, 2]
    monkeypatch.setenv("LORAQ_OFFSET_DECODE", "1")
    assert [op_mode(m) for m in (SCALE_ROW, SCALE_GROUP, SCALE_ONEBIT)] == [3, 1, 4]  # csrc: kScale*Offset
    monkeypatch.setenv("LORAQ_OFFSET_DECODE", "0")
    assert op_mode(SCALE_ROW) == 0


def test_launcher_refuses_it_off_the_gpu_and_never_offers_it(monkeypatch):
    """Forced, it raises with the reason before anything runs; tuned, it is not among the
    candidates on the CPU (nor anywhere the extension is missing)."""
    w, x, A, B, b = problem("int1", torch.float16, 2, 37, 300, device="cpu")
    tensors, meta = _kernel_args(w)
    with pytest.raises(ValueError, match="CUDA int1 GEMV, which cannot run here: .*CUDA kernel"):
        lora_linear_fwd(x, "int1", tensors, meta, A, B, 0.5, b, config=CFG)
    with pytest.raises(ValueError, match="int1_gemv_mma|CUDA kernel"):
        int1_gemv_mma(x, tensors, meta, A, B, 0.5, b)
    s = problem("sparse4x4", torch.float16, 2, 37, 300, device="cpu")[0]
    with pytest.raises(ValueError, match="it takes an int1 weight, got sparse4x4"):
        lora_linear_fwd(x, "sparse4x4", *_kernel_args(s), A, B, 0.5, b, config=CFG)
    if not torch.cuda.is_available():  # Triton runs CPU tensors only in its interpreter (no GPU)
        monkeypatch.setenv("LORAQ_CUDA_GEMV", "1")  # offered, but it cannot run here
        assert not mma_offered(x, w, A, B, 0.5, b)


@pytest.mark.parametrize("M", [2, 8, 16, 17])
def test_one_launch_keys_the_tuner_apart_up_to_16_rows(monkeypatch, M):
    """With LORAQ_ONE_LAUNCH=1 the int1 GEMVs (the lookup GEMV up to 4 rows, the CUDA mma GEMV up
    to 16) time differently: their winners are cached under another key; past 16 rows nothing
    changes."""
    w, x, A, B, b = problem("int1", torch.float32, M, 37, 300, device="cpu")
    keys = {}
    for one in ("0", "1"):
        monkeypatch.setenv("LORAQ_ONE_LAUNCH", one)
        with tuner_calls(lora_linear_fwd) as seen:
            lora_linear_fwd(x, "int1", *_kernel_args(w), A, B, 0.5, b)
        keys[one] = seen[0].op
    assert keys["1"] == (keys["0"] + ":one" if M <= MMA_MAX_M else keys["0"]), keys


# --- on a GPU, with the extension built -------------------------------------------------------


def _needs_kernel():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ok, why = mma_gemv_status(torch.zeros(1, 32, dtype=torch.float16, device="cuda"),
                              {"scale_mode": "mean_abs", "group_size": None})
    if not ok:
        pytest.skip(why)


KINDS = ["int1", "int1_g32", "int1_g64", "int1_g128", "int1_onebit"]


def run_mma(kind, dtype, M, N, K, cfg=CFG, lora=True, bias=True, scaling=0.5):
    w, x, A, B, b = problem(kind, dtype, M, N, K, r=5, lora=lora, bias=bias)
    tensors, meta = _kernel_args(w)
    y = lora_linear_fwd(x, "int1", tensors, meta, A, B, scaling, b, config=cfg)
    assert y.shape == (M, N) and y.dtype == dtype
    check(y, reference.lora_linear_ref(f64(x), w.to(torch.float64), f64(A), f64(B), scaling, f64(b)),
          reference.lora_linear_ref(x, w, A, B, scaling, b), f"mma {kind} {dtype} M={M} N={N} K={K} {cfg}")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("N, K", [(37, 300), (1000, 1000), (77, 4100), (4096, 4096), (300, 14336)])
def test_matches_reference(kind, dtype, M, N, K):
    """Odd N (a partial 16-row task) and K (a partial word, task and slice; K % 128 != 0 takes the
    word-by-word loads), with LoRA and bias."""
    _needs_kernel()
    run_mma(kind, dtype, M, N, K)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", MMA_SHAPES, ids=str)
@pytest.mark.parametrize("k_split", [1, 3, 40])
@pytest.mark.parametrize("M", [1, 5, 13])
def test_every_shape_and_split(shape, k_split, M):
    """Every (blocks an SM, warps) candidate, with K cut into 1, 3 and as many slices as tasks."""
    _needs_kernel()
    bps, warps = shape
    run_mma("int1_g64", torch.float16, M, 1000, 4100, (MMA_MAX_M, bps, MMA_TASK_INPUTS, k_split, warps, 1, MMA_GEMV))


@pytest.mark.gpu
@pytest.mark.parametrize("lora_bias", [(True, True), (False, False), (True, False), (False, True)],
                         ids=["lora+bias", "plain", "lora", "bias"])
@pytest.mark.parametrize("M", [1, 2, 7, 12])
def test_with_and_without_lora_and_bias(lora_bias, M):
    _needs_kernel()
    run_mma("int1", torch.bfloat16, M, 333, 2000, lora=lora_bias[0], bias=lora_bias[1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", [CFG, CFG32], ids=["16-row tasks", "32-row tasks"])
def test_each_weight_lands_in_its_place(dtype, cfg):
    """Exact: row m of x is the unit vector at input k_m, so y[m, n] = Ŵ[n, k_m] = ±α[n], with α
    from -3 to 5 and the inputs at every position a word, a task's lane and a chunk can give (N = 50:
    a partial row group, in a partial 32-row task)."""
    _needs_kernel()
    _unit_vectors(dtype, cfg)


def _unit_vectors(dtype, cfg):
    N, K = 50, 1100
    ks = [0, 15, 16, 17, 31, 32 * 5 + 7, 511, 512 + 128 + 30, 1099, 1, 2, 14, 18, 30, 33, 63, 64 + 16, 700,
          255, 256, 257, 64 + 31, 767, 768, 1024 + 40]
    W = torch.randn(N, K)
    q = Int1Weight.from_dense(W)
    q.scale.copy_(torch.linspace(-3, 5, N).unsqueeze(1))
    q = q.to(dtype).to("cuda")
    tensors, meta = _kernel_args(q)
    dense = q.dequantize().to(dtype)
    for first in range(0, len(ks), MMA_MAX_M):
        rows = ks[first:first + MMA_MAX_M]
        x = torch.zeros(len(rows), K, dtype=dtype, device="cuda")
        x[torch.arange(len(rows)), torch.tensor(rows)] = 1
        y = lora_linear_fwd(x, "int1", tensors, meta, config=cfg)
        assert torch.equal(y, dense[:, rows].t()), f"inputs {rows} {cfg}"


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 9])
def test_views_that_start_unaligned(M):
    """packed 4 bytes, x and lora_A 2 bytes into their buffers, with K % 128 == 0 (where an aligned
    packed takes 16-byte loads): the launcher must see the pointer and load word by word (the copy
    of x and the share of x·Aᵀ check their own)."""
    _needs_kernel()
    w, x, A, B, b = problem("int1_g32", torch.float16, M, 64, 2048, r=5)
    tensors, meta = _kernel_args(w)
    tensors = dict(tensors, packed=offset_view(tensors["packed"], 1))
    y = lora_linear_fwd(offset_view(x, 1), "int1", tensors, meta, offset_view(A, 1), B, 0.5, b, config=CFG)
    check(y, reference.lora_linear_ref(f64(x), w.to(torch.float64), f64(A), f64(B), 0.5, f64(b)),
          reference.lora_linear_ref(x, w, A, B, 0.5, b), f"unaligned M={M}")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 8, 9, 16])
@pytest.mark.parametrize("N, K", [(37, 300), (1000, 1000), (77, 4100), (4096, 4096), (300, 14336)])
def test_offset_decode_matches_reference(monkeypatch, kind, dtype, M, N, K):
    """LORAQ_OFFSET_DECODE=1: per-row and onebit weights take the offset decode (group scales keep
    pair order), with LoRA and bias, odd N and K, and K split in slices (14336 at 16 rows)."""
    _needs_kernel()
    monkeypatch.setenv("LORAQ_OFFSET_DECODE", "1")
    run_mma(kind, dtype, M, N, K)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", MMA_SHAPES, ids=str)
@pytest.mark.parametrize("k_split", [1, 3, 40])
@pytest.mark.parametrize("M", [1, 13])
def test_offset_decode_every_shape_and_split(monkeypatch, shape, k_split, M):
    """The offset decode's constants C (one a row of x and chunk) are taken off after each task:
    runs that start and end inside row groups, 1 to 40 slices."""
    _needs_kernel()
    monkeypatch.setenv("LORAQ_OFFSET_DECODE", "1")
    bps, warps = shape
    run_mma("int1", torch.float16, M, 1000, 4100, (MMA_MAX_M, bps, MMA_TASK_INPUTS, k_split, warps, 1, MMA_GEMV))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_offset_decode_is_exact_on_unit_vectors(monkeypatch, dtype):
    """Rows of x that are unit vectors: 2·(16·x' + b) − (32·x' + 1) = 2b − 1 exactly, so y is the
    column of Ŵ to the bit, at every position of a word, a task and a chunk."""
    _needs_kernel()
    monkeypatch.setenv("LORAQ_OFFSET_DECODE", "1")
    for cfg in (CFG, CFG32):
        _unit_vectors(dtype, cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 16])
def test_offset_decode_keeps_its_precision_when_x_does_not_average_zero(dtype, M):
    """x = randn + 1, one block of one warp a K slice: at one row of x one warp runs all 56 tasks
    of K = 28672 (16 rows need K slices to fit the shared memory: 5 on an H100). The offset decode's
    sums carry 16·Σx', which each task takes off again (C/2 of its chunk), so the error stays that
    of one task, not of the run. A numpy model of the mma rounding toward zero (NOTES.md, v14b)
    gives 4.9e-4 of max|y| (pair order 5.8e-6; the constant taken off once a run instead: 3.0e-2).
    Against x·Ŵᵀ in float64; the op is called directly for the one-warp launch."""
    _needs_kernel()
    N, K = 16, 28672
    torch.manual_seed(M)
    w = Int1Weight.from_dense(torch.randn(N, K)).to(dtype).to("cuda")
    x = (torch.randn(M, K, device="cuda") + 1).to(dtype)
    want = x.double() @ w.to(torch.float64).dequantize().t()
    scale = w.scale.to(dtype)
    errors = {}
    slices = k_slices(M, K, 1, limits=smem_limits(0), offset=True)  # 1 at one row; 16 rows of 28672 inputs do not fit
    for mode in (0, 3):  # pair order, the offset decode
        ws = torch.zeros(M, N, device="cuda")
        torch.ops.loraq.int1_gemv_mma(x, w.packed, scale, scale, None, ws, None, mode, 0, 1, 1, slices)
        errors[mode] = ((ws.double() - want).abs().max() / want.abs().max()).item()
    assert errors[3] < 1.5e-3, errors  # the fp16 tests' tolerance; fp16's own rounding of y is 4.9e-4
    assert errors[0] < 5e-5, errors


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("N, K", [(37, 300), (77, 4100), (4096, 4096)])
def test_32_row_tasks_match_reference(kind, dtype, M, N, K):
    """Tasks of two row groups (32 rows x 256 inputs): odd N (a task whose second group is partly
    or wholly past N), odd K (a partial word, task and slice), LoRA and bias; M = 1 too (the tuner
    offers them from 5 rows, a forced config runs them at any). Fewer cases than the 16-row tasks'
    own: the host emulation (test_int1_gemv_mma_emulated.py) covers the kernel's code in depth."""
    _needs_kernel()
    run_mma(kind, dtype, M, N, K, cfg=CFG32)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", MMA_TASK32_SHAPES, ids=str)
@pytest.mark.parametrize("k_split", [1, 3, 40])
@pytest.mark.parametrize("M", [5, 13])
@pytest.mark.parametrize("offset", [False, True], ids=["pair order", "offset decode"])
def test_32_row_tasks_every_shape_and_split(monkeypatch, shape, k_split, M, offset):
    """Every (blocks an SM, warps) candidate of 32-row tasks, K in 1, 3 and 40 slices (runs that
    start and end inside a block of 32 rows), per-group scales, and the offset decode (its C, one a
    row of x and chunk of 256 inputs, taken off after each task from both groups' sums)."""
    _needs_kernel()
    if offset:
        monkeypatch.setenv("LORAQ_OFFSET_DECODE", "1")
    bps, warps = shape
    run_mma("int1" if offset else "int1_g64", torch.float16, M, 1000, 4100,
            (MMA_MAX_M, bps, MMA_TASK32_INPUTS, k_split, warps, 1, MMA_GEMV))


@pytest.mark.gpu
def test_32_row_tasks_refused_where_they_do_not_run():
    """The op takes row_groups 1 or 2, and 2 only for the mma GEMV in two launches; it refuses the
    rest before it writes anything."""
    _needs_kernel()
    w, x, *_ = problem("int1", torch.float16, 1, 64, 512, lora=False, bias=False)
    tensors, meta = _kernel_args(w)
    scale = tensors["scale"].to(torch.float16)
    ws = torch.zeros(1, 64, device="cuda")
    y = torch.full((1, 64), 7.0, dtype=torch.float16, device="cuda")
    counters = torch.zeros(64, dtype=torch.int32, device="cuda")
    for warps, kwargs, match in [(4, dict(row_groups=3), "row_groups must be 1"),
                                 (4, dict(row_groups=2, lut=1), "with a lookup GEMV"),
                                 (4, dict(row_groups=2, y=y, counters=counters), "with y"),
                                 (32, dict(row_groups=2), "1 to 24 warps")]:  # its launch bound: 768 threads
        with pytest.raises(RuntimeError, match=match):
            torch.ops.loraq.int1_gemv_mma(x, tensors["packed"], scale, scale, None, ws, None, 0, 0, 1, warps, 1,
                                          **kwargs)
    assert not ws.any() and (y == 7).all()
    torch.ops.loraq.int1_gemv_mma(x, tensors["packed"], scale, scale, None, ws, None, 0, 0, 1, 4, 1, row_groups=2)
    assert ws.any()


def _one_and_two_launches(kind, dtype, M, N, K, cfg=CFG, lora=True, bias=True, offset=False):
    """The op through int1_gemv_mma with its finish in the same launch and in a second one: each
    checked against the reference, the workspace left zero after each. (32-row tasks take two
    launches either way.)"""
    w, x, A, B, b = problem(kind, dtype, M, N, K, r=5, lora=lora, bias=bias)
    tensors, meta = _kernel_args(w)
    _, bps, _, split, warps, _, _ = cfg
    want = (reference.lora_linear_ref(f64(x), w.to(torch.float64), f64(A), f64(B), 0.5, f64(b)),
            reference.lora_linear_ref(x, w, A, B, 0.5, b))
    out = {}
    for one in (True, False):
        out[one] = int1_gemv_mma(x, tensors, meta, A, B, 0.5, b, bps, warps, split, one_launch=one,
                                 task_rows=16 * row_groups(cfg))
        assert out[one].shape == (M, N) and out[one].dtype == dtype
        check(out[one], *want, f"mma {kind} {dtype} M={M} N={N} K={K} {cfg} one launch={one}")
        assert workspaces_clean(), f"one launch={one} left its workspace dirty"
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 9, 16])
@pytest.mark.parametrize("N, K", [(37, 300), (1000, 1000), (77, 4100), (4096, 4096), (28672, 8192)])
def test_one_launch_finish_matches_reference(kind, dtype, M, N, K):
    """The finish in the same launch (csrc/gemv_finish.cuh): row groups finished by the warp that
    completes them, x·Aᵀ from batches claimed by every warp; the workspace, x·Aᵀ and the counters
    zero after (the next call and CUDA graphs find them so)."""
    _needs_kernel()
    _one_and_two_launches(kind, dtype, M, N, K)


@pytest.mark.gpu
@pytest.mark.parametrize("lora_bias", [(True, True), (False, False)], ids=["lora+bias", "plain"])
def test_32_row_tasks_take_two_launches_when_one_is_asked(monkeypatch, lora_bias):
    """int1_gemv_mma(task_rows=32, one_launch=True) (and the tuner's 32-row candidates under
    LORAQ_ONE_LAUNCH=1) run two launches: never the one-launch path, right either way, the
    workspaces clean. (Not bit for bit: the atomics add in any order.)"""
    _needs_kernel()
    from loraq.kernels import int1_gemv_mma as launcher

    def refuse(*args, **kwargs):
        raise AssertionError("32-row tasks took the one-launch path")

    monkeypatch.setattr(launcher, "_one_launch", refuse)
    _one_and_two_launches("int1", torch.float16, 9, 1000, 4100, CFG32, *lora_bias)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", MMA_SHAPES, ids=str)
@pytest.mark.parametrize("k_split", [1, 3, 40])
@pytest.mark.parametrize("lora_bias", [(True, True), (False, False), (True, False), (False, True)],
                         ids=["lora+bias", "plain", "lora", "bias"])
def test_one_launch_every_shape_split_and_path(shape, k_split, lora_bias):
    _needs_kernel()
    bps, warps = shape
    _one_and_two_launches("int1_g64", torch.float16, 5, 1000, 4100,
                          (MMA_MAX_M, bps, MMA_TASK_INPUTS, k_split, warps, 1, MMA_GEMV), *lora_bias)


@pytest.mark.gpu
def test_one_launch_many_calls_and_a_cuda_graph():
    """Ten calls in a row, then a CUDA graph replayed five times: each must find the counters,
    x·Aᵀ and the sums zero, so every answer equals the first (the finish reads the sums in any
    order of arrival: close, not equal, to the two-launch answer)."""
    _needs_kernel()
    w, x, A, B, b = problem("int1", torch.float16, 3, 4096, 4096, r=16)
    tensors, meta = _kernel_args(w)
    run = lambda: int1_gemv_mma(x, tensors, meta, A, B, 0.5, b, 2, 16, 1, one_launch=True)  # noqa: E731
    want = (reference.lora_linear_ref(f64(x), w.to(torch.float64), f64(A), f64(B), 0.5, f64(b)),
            reference.lora_linear_ref(x, w, A, B, 0.5, b))
    calls_then_graph_replays(run, want, "one launch")


def calls_then_graph_replays(run, want, what):
    """``run()`` (a one-launch call) ten times, then captured in a CUDA graph replayed five
    times: each answer checked against ``want`` (the float64 and the dtype's reference), the
    workspaces zero after the calls, and every replay's answer the first call's."""
    first = run()
    for _ in range(10):
        check(run(), *want, f"{what}, again")
    assert workspaces_clean()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # the workspace of this stream exists before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            y = run()
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize()
        check(y, *want, f"{what}, graph replay")
        torch.testing.assert_close(y, first, rtol=2e-3, atol=2e-3 * first.abs().max().item())


@pytest.mark.gpu
def test_one_launch_refuses_bad_finish_arguments():
    """The op checks the finish's tensors before anything runs and changes nothing."""
    _needs_kernel()
    w, x, A, B, b = problem("int1", torch.float16, 2, 64, 1024, r=4)
    tensors, meta = _kernel_args(w)
    ws = torch.zeros(2, 64, device="cuda")
    xa = torch.zeros(1, 2, 16, device="cuda")
    y = torch.empty(2, 64, dtype=torch.float16, device="cuda")
    counters = torch.zeros(4, dtype=torch.int32, device="cuda")  # too few: 4 arrivals + 2 + batches
    scale = tensors["scale"].to(torch.float16)
    with pytest.raises(RuntimeError, match="counters must have at least"):
        torch.ops.loraq.int1_gemv_mma(x, tensors["packed"], scale, scale, A, ws, xa, 0, 0, 2, 4, 1, y, counters,
                                      B, b, 0.5, 2)
    with pytest.raises(RuntimeError, match="they come with y"):
        torch.ops.loraq.int1_gemv_mma(x, tensors["packed"], scale, scale, None, ws, None, 0, 0, 2, 4, 1, None,
                                      counters)
    with pytest.raises(RuntimeError, match="y must be"):
        torch.ops.loraq.int1_gemv_mma(x, tensors["packed"], scale, scale, None, ws, None, 0, 0, 2, 4, 1,
                                      y[:, :10].contiguous(), torch.zeros(100, dtype=torch.int32, device="cuda"))
    with pytest.raises(RuntimeError, match="memory location|overlap"):  # the counters inside the sums
        torch.ops.loraq.int1_gemv_mma(x, tensors["packed"], scale, scale, None, ws, None, 0, 0, 2, 4, 1, y,
                                      ws.view(-1).view(torch.int32))
    assert not ws.any() and not xa.any() and not counters.any()


@pytest.mark.gpu
def test_the_tuner_offers_it_up_to_16_rows(monkeypatch):
    """With the extension built (and LORAQ_CUDA_GEMV not 0), a forward of up to 16 rows (int1, fp16) times
    it among the others; with LORAQ_CUDA_GEMV=0, it does not."""
    _needs_kernel()
    w, x, A, B, b = problem("int1", torch.float16, 16, 64, 512)
    monkeypatch.setenv("LORAQ_CUDA_GEMV", "1")
    assert mma_offered(x, w, A, B, 0.5, b) and mma_offered(x[:1], w)
    assert not mma_offered(torch.cat([x, x[:1]]), w, A, B, 0.5, b)  # 17 rows
    assert not mma_offered(x.float(), w)
    assert mma_offered(x[:3], w, A, B, 0.5, b)
    monkeypatch.setenv("LORAQ_CUDA_GEMV", "0")
    assert not mma_offered(x[:3], w, A, B, 0.5, b)  # turned off
    monkeypatch.delenv("LORAQ_CUDA_GEMV")
    assert mma_offered(x[:3], w, A, B, 0.5, b)  # on by default
    with tuner_calls(lora_linear_fwd) as seen:  # 32-row tasks from MMA_TASK32_MIN_M rows
        for m in (MMA_TASK32_MIN_M - 1, MMA_TASK32_MIN_M):
            lora_linear_fwd(x[:m], "int1", *_kernel_args(w))
    tall = [any(c[6] == MMA_GEMV and row_groups(c) == 2 for c in call.candidates) for call in seen]
    assert tall == [False, True], tall


@pytest.mark.parametrize("rg", [1, 2], ids=["16-row tasks", "32-row tasks"])
def test_fragment_order_emulated_from_the_ptx_layout(rg):
    """One task of the kernel in numpy: x filled in pair order as ``fill_x`` stores it
    (``x_unit``), each lane's A and B registers as ``task_mma`` builds them, placed in the
    16 x 16 and 16 x 8 operands by the PTX ISA's fragment layout for mma.m16n8k16, and the
    accumulator read as ``flush`` reads it. The sum must be Ŵ·xᵀ: the permutations of the decode,
    the shared layout and the fragments agree. A task is 16 rows x 512 inputs (lane t: words 4t to
    4t + 3 of rows g and g + 8), or with two row groups 32 x 256 (words 2t, 2t + 1 of rows g + 8h,
    h = 0..3; one B fragment for both groups). (The kernel itself runs only on a GPU, below.)"""
    import numpy as np

    rng = np.random.default_rng(rg)
    M, LW = 16, 4 // rg  # rows of x; words a lane loads of each of its rows
    rows, words_a_row = 16 * rg, 4 * LW  # of the task
    words = rng.integers(0, 2**32, size=(rows, words_a_row), dtype=np.uint64)
    x = rng.standard_normal((M, 32 * words_a_row))
    signs = np.where((words[:, :, None] >> np.arange(32, dtype=np.uint64)) & 1, 1.0, -1.0).reshape(rows, -1)
    row_units = 32 * words_a_row // 4 + 4  # one chunk a slice, as the kernel computes it

    def x_unit(m, c, j, i, t):  # csrc/int1_gemv_mma.cuh
        return m * row_units + ((c * LW + j) * 8 + i) * 4 + t

    xs = np.zeros((M * row_units, 2, 2))  # 8-byte units: two pairs of (low, high)
    for m in range(M):
        for w in range(words_a_row):  # fill_x: word w = 4·LW·c + LW·t + j
            for p in range(16):
                unit = x_unit(m, w // words_a_row, w % LW, p >> 1, (w // LW) & 3)
                xs[unit, p & 1] = (x[m, 32 * w + p], x[m, 32 * w + p + 16])

    def sign_pair(word, p):  # the pair's (low, high): bits p and p + 16, set = +1
        return tuple(1.0 if (int(word) >> b) & 1 else -1.0 for b in (p, p + 16))

    out = np.zeros((rows, M))
    for tile in range(M // 8):
        for j in range(LW):
            for i in range(8):
                B = np.full((16, 8), np.nan)
                for lane in range(32):  # one B fragment a step, for every row group
                    g, t = lane >> 2, lane & 3
                    xrow = tile * 8 + g
                    b = xs[x_unit(xrow if xrow < M else 0, 0, j, i, t)].reshape(4)  # b0 .. b3
                    for e in range(4):  # PTX: row 2t + (e & 1), + 8 from b2; column g
                        B[2 * t + (e & 1) + (8 if e >= 2 else 0), g] = b[e]
                assert not np.isnan(B).any()
                for r in range(rg):
                    A = np.full((16, 16), np.nan)
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        wu, wv = words[16 * r + g, LW * t + j], words[16 * r + g + 8, LW * t + j]
                        regs = [sign_pair(wu, 2 * i), sign_pair(wv, 2 * i), sign_pair(wu, 2 * i + 1),
                                sign_pair(wv, 2 * i + 1)]
                        a = [h for reg in regs for h in reg]  # a0 .. a7
                        for e in range(8):  # PTX: row g for a0,a1,a4,a5, else g + 8; column 2t + (e & 1), + 8 from a4
                            A[g + (8 if e in (2, 3, 6, 7) else 0), 2 * t + (e & 1) + (8 if e >= 4 else 0)] = a[e]
                    assert not np.isnan(A).any()  # every element given once
                    D = A @ B
                    for lane in range(32):  # flush: c0, c1 row g, c2, c3 row g + 8; columns 2t, 2t + 1
                        g, t = lane >> 2, lane & 3
                        for e in range(4):
                            n = g + (8 if e >= 2 else 0)
                            out[16 * r + n, tile * 8 + 2 * t + (e & 1)] += D[n, 2 * t + (e & 1)]
    np.testing.assert_allclose(out, signs @ x.T, rtol=1e-12, atol=1e-9)  # each element of D is one lane's


def test_every_instantiation_compiles_for_hopper_without_spills():
    """nvcc (CI has one; the extension itself is not built there) compiles every kernel the
    launcher can pick for sm_90: 64 registers at most (the launch bound that lets 32 warps share
    an SM; 80 with 32-row tasks, whose bound is 768 threads), nothing spilled, and the mma loop
    (bench/sass_cuda.py) with 32 HMMA a tile of x. The one-launch instantiations
    (csrc/gemv_finish.cuh) spill in their finish, after the loop (at 64 registers, 256-304 bytes),
    store nothing to the stack in the loop and reload at most 6 values a task there (group scales,
    two tiles of x), and their loop stays within 5% of the two-launch one's. A 32-row task (the
    same 8192 weights) reads B from shared memory half as often: at most 16 + 4 LDS a tile of x
    where a 16-row task has 32."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import sass_cuda

    if sass_cuda.nvcc() is None:
        pytest.skip("no nvcc on this machine (CUDA_HOME unset and none on PATH)")
    kernels = sass_cuda.compile_all()
    # 2 dtypes x 5 modes (3 and 4: the offset decode) x 2 load paths x 1 or 2 tiles x (two or one launch
    # with 16-row tasks, two launches with 32-row tasks)
    assert len(kernels) == 120
    for k in kernels:
        assert k["registers"] <= (64 if k["rg"] == 1 else 80), k
        assert k["spill_bytes"] <= (320 if k["one"] else 0), k
        assert k["call_spill_bytes"] <= (64 if k["one"] else 0), k  # the out-of-line wait for x·Aᵀ
        assert k["loop"].get("STL", 0) == 0 and k["loop"].get("LDL", 0) <= (6 if k["one"] else 0), k
        assert k["loop"] is not None and k["loop"]["HMMA"] == 32 * k["tiles"], k
    loop = {(k["dtype"], k["mode"], k["vec"], k["tiles"], k["one"], k["rg"]): k["loop"] for k in kernels}
    for (dtype, mode, vec, tiles, one, rg), ops in loop.items():
        total = sum(ops.values())
        if one:
            assert total <= 1.05 * sum(loop[(dtype, mode, vec, tiles, False, 1)].values()), (dtype, mode, vec, tiles)
        if mode in (3, 4):  # the offset decode's point: fewer instructions
            assert total < sum(loop[(dtype, mode - 3, vec, tiles, one, rg)].values()) - 40, (dtype, mode, vec, tiles, one)
        if rg == 2:
            assert ops["LDS"] <= 20 * tiles < loop[(dtype, mode, vec, tiles, False, 1)]["LDS"], (dtype, mode, vec, tiles)
