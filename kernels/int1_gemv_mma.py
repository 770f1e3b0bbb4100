"""``y = x·Ŵᵀ + s·(x·Aᵀ)·Bᵀ + b`` for up to 16 rows of ``x`` and an int1 ``Ŵ``, on tensor cores
(and, for one row, by table lookup: ``CUDA_LUT`` and ``CUDA_LUT8`` below).

The kernel is CUDA C++ (``csrc/int1_gemv_mma.cuh``, built into ``loraq._C`` as
``torch.ops.loraq.int1_gemv_mma``): each warp decodes its weights two signs at a time straight
into ``mma.sync``'s A operand, and ``x``, copied once per block into shared memory in the same
pair order, is its B operand (its 8 columns are rows of ``x``; 9 to 16 rows take a second mma on
the same decoded registers, so 16 rows cost about 1.25x one row's instructions, compiled for
sm_90). The work is cut stream-K
style: every warp of the grid takes an equal run of 16-row x 512-input tasks, so a few hundred
programs fill the GPU whatever ``N`` is. Sums go into the zeroed fp32 workspace by atomics, the
first ``slots`` blocks store their share of ``x·Aᵀ``, and ``splitk_finish.finish`` adds the LoRA
path and the bias and casts: two launches a call, like the other small-batch forwards.

It is an autotune candidate of :func:`lora_linear_fwd` for int1 in fp16 and bf16 up to
``MMA_MAX_M`` rows when the extension is built (``CUDA_HOME=... pip install --no-build-isolation
-e .``), the GPU has ``mma.sync`` for bf16 (compute capability 8.0 or newer) and
``LORAQ_CUDA_GEMV`` is not ``0`` (``cuda_ext.cuda_gemv_offered``; a forced ``config`` runs it
regardless). Written without a GPU; its GPU tests passed on an H100 on 2026-11-24. From
``MMA_TASK32_MIN_M`` rows the tuner also times tasks of 32 weight rows x 256 inputs (config field
2 = ``MMA_TASK32_INPUTS``, two launches only; written without a GPU, not measured yet): each B
fragment read from shared memory feeds two row groups' mma, half the shared-memory reads a weight
where every read is two wavefronts (NOTES.md, v17). With
``LORAQ_OFFSET_DECODE=1`` (opt-in: written without a GPU, its GPU tests not run yet) per-row and
onebit weights take the offset decode, one ``LOP3`` a register of A instead of a shift and a
``LOP3`` (the op's modes 3 and 4; ``csrc/int1_gemv_mma.cuh``). Configs:
``(MMA_MAX_M, blocks an SM, MMA_TASK_INPUTS, K slices at least, warps a block, 1, MMA_GEMV)``.
"""

from functools import lru_cache
from typing import List, Tuple

import torch

from .autotune import CUDA_LUT, CUDA_LUT8, MMA_GEMV, Config
from .cuda_ext import MAX_SLOTS, extension_problem, fit_slices, sm_count, smem_limits
from .decode import SCALE_GROUP, SCALE_ONEBIT, SCALE_ROW, lora_and_bias_args, weight_args
from .env import env_is
from .splitk_finish import bind_split, one_launch_offered, run_cuda_one_launch
from .device_guard import on_input_device

MMA_MAX_M = 16  # rows of x: one mma tile of 8 (its N), or two on the same decoded weights
MMA_TASK_INPUTS = 512  # inputs a task: 4 lanes x 4 words of 32
# (blocks an SM, warps a block): 64 registers a thread (the kernel's launch bound) allow 32 warps an SM
MMA_SHAPES = ((2, 16), (4, 8), (1, 32), (2, 8))
# Tasks of two row groups (32 weight rows x 256 inputs, the op's row_groups = 2): from 5 rows of x,
# where a warp's read of B from shared memory is two wavefronts (8 distinct rows of 32 bytes; up to
# 4 rows it is one). Their kernels take up to 80 registers (launch bound: 768 threads, 24 warps, a
# block): 24 warps an SM fit the registers.
MMA_TASK32_INPUTS = 256
MMA_TASK32_MIN_M = 5
MMA_TASK32_SHAPES = ((1, 24), (2, 12), (3, 8), (2, 8))
MMA_TASK32_MAX_WARPS = 24
# From 9 rows of x, also K cut in at least 4 slices: each block copies its slice of x into shared
# memory before its first task (all blocks: blocks an SM x SMs x K / slices x rows x 2 bytes). At
# 8192→28672 and 16 rows, one block an SM needs 2 slices to fit: 17 MB from L2, about 3 µs at an
# assumed 5.5 TB/s in which no weight streams; 4 slices copy half that, for more flushes of partial
# sums (NOTES.md, v17). (rows of a task, blocks an SM, warps)
MMA_SPLIT_MIN_M = 9
MMA_SPLIT_AT_LEAST = 4
MMA_SPLIT_SHAPES = ((16, 1, 32), (16, 2, 16), (32, 1, 24))

# the op's modes for per-row α and onebit with the offset decode (csrc/int1_gemv_mma.cuh: one LOP3 a
# register of A instead of two, about 16% fewer instructions in the loop, and an error up to fp16's
# rounding of y where x does not average zero, NOTES.md v14b; opt-in with LORAQ_OFFSET_DECODE=1
# until its GPU tests have run)
OFFSET_MODES = {SCALE_ROW: 3, SCALE_ONEBIT: 4}


def row_groups(cfg) -> int:
    """Row groups a task of the mma GEMV config ``cfg``: 2 for 32-row tasks, else 1."""
    return 2 if cfg[6] == MMA_GEMV and cfg[2] == MMA_TASK32_INPUTS else 1


def op_mode(mode: int) -> int:
    """The op's ``mode`` for a weight's scale mode: the offset decode's where it applies and
    ``LORAQ_OFFSET_DECODE`` is ``1``."""
    return OFFSET_MODES.get(mode, mode) if env_is("LORAQ_OFFSET_DECODE", "1") else mode


def mma_gemv_status(x: torch.Tensor, meta) -> Tuple[bool, str]:
    """``(usable, why not)`` for the mma GEMV on ``x`` and an int1 weight's ``meta``."""
    if x.device.type != "cuda":
        return False, f"the mma GEMV is a CUDA kernel, x is on {x.device}"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return False, f"the mma GEMV takes float16 or bfloat16, got {x.dtype}"
    if not 1 <= x.shape[0] <= MMA_MAX_M:
        return False, f"the mma GEMV takes 1 to {MMA_MAX_M} rows of x, got {x.shape[0]}"
    if meta.get("scale_mode") != "onebit" and meta.get("group_size") and meta["group_size"] % 32:
        return False, f"the mma GEMV needs a group size that is a multiple of 32, got {meta['group_size']}"
    capability = torch.cuda.get_device_capability(x.device)
    if capability < (8, 0):
        return False, "the mma GEMV needs compute capability 8.0 or newer (mma.sync with bf16)"
    problem = extension_problem("int1_gemv_mma", capability)
    return (not problem), problem


@lru_cache(maxsize=1024)  # per call otherwise (host time): a few shapes, a few configs
def k_slices(M: int, K: int, blocks_per_sm: int, at_least: int = 1, limits=None, offset: bool = False,
             task_inputs: int = MMA_TASK_INPUTS) -> int:
    """K slices (about ``at_least`` or more) of whole tasks of ``task_inputs`` inputs (512, or
    ``MMA_TASK32_INPUTS``) so that ``blocks_per_sm`` blocks' copies of ``x`` (``M`` rows of a slice,
    pair order, 2 bytes an input, 32 bytes of padding a row, and with the offset decode
    (``offset``) 4 bytes a row and task) fit the shared memory (``cuda_ext.fit_slices``;
    ``limits``: ``cuda_ext.smem_limits`` of the GPU)."""
    table = 4 if offset else 0
    return fit_slices(K, task_inputs, lambda inputs: M * (inputs * 2 + 32 + table * (inputs // task_inputs)),
                      blocks_per_sm, at_least,
                      f"{M} rows of x", *([limits] if limits else []))


# The lookup GEMV (csrc/int1_gemv_lut.cuh, the op's lut = 1) for one row of x: each block tabulates
# the 16 signed sums of every 4 inputs of its K slice in shared memory (16 bytes an input), and a
# lane adds one entry a nibble of weights. Configs (1, blocks an SM, CUDA_LUT_TASK_INPUTS, K slices
# at least, warps a block, 1, CUDA_LUT); the table of 8192 inputs (128 KiB) fits one block an SM.
CUDA_LUT_TASK_INPUTS = 512
CUDA_LUT_SHAPES = ((1, 32), (2, 16), (4, 8), (2, 8))


def cuda_lut_status(x: torch.Tensor, meta) -> Tuple[bool, str]:
    """``(usable, why not)`` for the CUDA lookup GEMV on ``x`` and an int1 weight's ``meta``."""
    if x.dim() == 2 and x.shape[0] != 1:
        return False, f"the CUDA lookup GEMV takes one row of x, got {x.shape[0]}"
    return mma_gemv_status(x, meta)


@lru_cache(maxsize=1024)
def lut_k_slices(K: int, blocks_per_sm: int, at_least: int = 1, limits=None) -> int:
    """K slices (about ``at_least`` or more) so that ``blocks_per_sm`` blocks' tables (16 bytes an
    input of a slice, and 128 of padding) fit the shared memory (``cuda_ext.fit_slices``)."""
    return fit_slices(K, CUDA_LUT_TASK_INPUTS, lambda inputs: 16 * inputs + 128, blocks_per_sm, at_least,
                      "the lookup GEMV's table", *([limits] if limits else []))


def cuda_lut_configs(M: int) -> List[Config]:
    """The CUDA lookup GEMV's candidates (one row of x)."""
    if M != 1:
        raise ValueError(f"the CUDA lookup GEMV takes one row of x, got {M}")
    return [(1, bps, CUDA_LUT_TASK_INPUTS, 1, warps, 1, CUDA_LUT) for bps, warps in CUDA_LUT_SHAPES]


# The byte-lookup GEMV (csrc/int1_gemv_lut8.cuh, the op's lut = 2) for one row of x: each block
# tabulates the 256 signed sums of every 8 inputs of a K slice of 1024 (a 128 KiB table, one block
# an SM) and a lane adds one entry a byte of weights: a PRMT, an LDS and an FADD for 8 weights.
# Written without a GPU (2026-11-25), not measured; two launches, or one with LORAQ_ONE_LAUNCH=1.
# Configs (1, 1, CUDA_LUT8_SLICE_INPUTS, 1, warps a block, 1, CUDA_LUT8): blocks an SM, the slice
# and K's slices (ceil(K / 1024)) are fixed.
CUDA_LUT8_SLICE_INPUTS = 1024
CUDA_LUT8_TABLE_BYTES = 128 * 1024
CUDA_LUT8_WARPS = (32, 16)
MAX_GRID_Y = 65535  # K slices are the grid's y


def cuda_lut8_status(x: torch.Tensor, meta) -> Tuple[bool, str]:
    """``(usable, why not)`` for the byte-lookup GEMV on ``x`` and an int1 weight's ``meta``:
    the CUDA lookup GEMV's conditions and a GPU whose blocks may take its 128 KiB table."""
    ok, why = cuda_lut_status(x, meta)
    if not ok:
        return ok, why
    if lut8_k_slices(x.shape[-1]) > MAX_GRID_Y:
        return False, (f"the byte-lookup GEMV cuts K in slices of {CUDA_LUT8_SLICE_INPUTS}, at most {MAX_GRID_Y} "
                       f"(the grid's y), got K = {x.shape[-1]}")
    per_block = smem_limits(x.device.index or 0)[0]
    if per_block < CUDA_LUT8_TABLE_BYTES:
        return False, (f"the byte-lookup GEMV's table needs {CUDA_LUT8_TABLE_BYTES} bytes of shared memory a block, "
                       f"this GPU allows {per_block}")
    return True, ""


def lut8_k_slices(K: int) -> int:
    """The byte-lookup GEMV's K slices: one a 1024 inputs."""
    return max(1, -(-K // CUDA_LUT8_SLICE_INPUTS))


def cuda_lut8_configs(M: int) -> List[Config]:
    """The byte-lookup GEMV's candidates (one row of x)."""
    if M != 1:
        raise ValueError(f"the CUDA byte-lookup GEMV takes one row of x, got {M}")
    return [(1, 1, CUDA_LUT8_SLICE_INPUTS, 1, warps, 1, CUDA_LUT8) for warps in CUDA_LUT8_WARPS]


def mma_gemv_configs(M: int) -> List[Config]:
    """The mma GEMV's candidates for ``1 ≤ M ≤ MMA_MAX_M`` rows of x: 16-row tasks, from
    ``MMA_TASK32_MIN_M`` rows 32-row tasks too, with K slices 1 (raised at run time when x's slice
    does not fit the shared memory); from ``MMA_SPLIT_MIN_M`` rows a few with at least
    ``MMA_SPLIT_AT_LEAST`` slices too (``MMA_SPLIT_SHAPES``)."""
    if not 1 <= M <= MMA_MAX_M:
        raise ValueError(f"the mma GEMV takes 1 to {MMA_MAX_M} rows of x, got {M}")
    tall = MMA_TASK32_SHAPES if M >= MMA_TASK32_MIN_M else ()
    split = MMA_SPLIT_SHAPES if M >= MMA_SPLIT_MIN_M else ()
    return ([(MMA_MAX_M, bps, MMA_TASK_INPUTS, 1, warps, 1, MMA_GEMV) for bps, warps in MMA_SHAPES]
            + [(MMA_MAX_M, bps, MMA_TASK32_INPUTS, 1, warps, 1, MMA_GEMV) for bps, warps in tall]
            + [(MMA_MAX_M, bps, MMA_TASK32_INPUTS if rows == 32 else MMA_TASK_INPUTS, MMA_SPLIT_AT_LEAST, warps, 1,
                MMA_GEMV) for rows, bps, warps in split])


def check_mma_config(cfg) -> None:
    """Raise ValueError unless ``cfg`` is a config the mma GEMV (or, variant ``CUDA_LUT``, the
    lookup GEMV; ``CUDA_LUT8``, the byte-lookup GEMV) runs."""
    if len(cfg) != 7 or cfg[6] not in (MMA_GEMV, CUDA_LUT, CUDA_LUT8):
        raise ValueError(f"config {cfg} is not an mma GEMV config (its last field must be {MMA_GEMV}, or "
                         f"{CUDA_LUT} for the lookup GEMV, {CUDA_LUT8} for the byte-lookup GEMV)")
    rows, bps, inputs, split, warps, stages, variant = cfg
    if variant == CUDA_LUT8:
        if (rows, bps, inputs, split, stages) != (1, 1, CUDA_LUT8_SLICE_INPUTS, 1, 1) or not 1 <= warps <= 32:
            raise ValueError(f"config {cfg}: the byte-lookup GEMV's fields 0 to 3 and 5 are fixed "
                             f"(1, 1, {CUDA_LUT8_SLICE_INPUTS}, 1, 1) and it takes 1 to 32 warps a block")
        return
    if variant == MMA_GEMV:
        if rows != MMA_MAX_M or inputs not in (MMA_TASK_INPUTS, MMA_TASK32_INPUTS) or stages != 1:
            raise ValueError(f"config {cfg}: the mma GEMV's fields 0 and 5 are fixed ({MMA_MAX_M}, 1) and field 2 "
                             f"(inputs a task) is {MMA_TASK_INPUTS}, or {MMA_TASK32_INPUTS} for 32-row tasks")
    elif (rows, inputs) != (1, CUDA_LUT_TASK_INPUTS) or stages != 1:
        raise ValueError(f"config {cfg}: the lookup GEMV's fields 0, 2 and 5 are fixed (1, {CUDA_LUT_TASK_INPUTS}, 1)")
    # warps a block: the kernel's launch bound; an SM: the hardware's 64, or the 24 that 32-row
    # tasks' 80 registers a thread fit (more blocks would run in a second wave, planned as one)
    top, per_sm = (MMA_TASK32_MAX_WARPS, MMA_TASK32_MAX_WARPS) if row_groups(cfg) == 2 else (32, 64)
    if bps < 1 or split < 1 or not 1 <= warps <= top or bps * warps > per_sm:
        raise ValueError(f"config {cfg}: blocks an SM and K slices must be ≥ 1, warps 1 to {top}, "
                         f"and at most {per_sm} warps an SM")


def launch_mma(x, ptrs, ints, mode, N, lora_A, lora_B, scaling, bias, cfg, one_launch=None):
    """The launch on arguments already prepared (``weight_args``'s; ``lora_A``, ``lora_B`` and
    ``bias`` in ``x``'s dtype and contiguous, or None) and checked. Two launches (the kernel, then
    ``splitk_finish.finish``), or with ``one_launch`` (None: ``LORAQ_ONE_LAUNCH=1``) one: the
    kernel finishes itself (``csrc/gemv_finish.cuh``). Returns ``y [M, N]`` in ``x.dtype``."""
    x = x.contiguous()  # the ops take a contiguous x
    return bind_mma(x.shape, x.dtype, x.device, ptrs, ints, mode, N, lora_A, lora_B, scaling, bias, cfg,
                    one_launch)(x)


def bind_mma(shape, dtype, device, ptrs, ints, mode, N, lora_A, lora_B, scaling, bias, cfg, one_launch=None):
    """:func:`launch_mma` for every contiguous ``x`` of ``shape`` ``[M, K]``, ``dtype`` and
    ``device``, its plan (slices, blocks, the switches' answers) worked out once: ``run(x) -> y``.
    The tensors are read at each call; a scale in another dtype than x's is cast at each call."""
    _, bps, inputs, split, warps, _, variant = cfg
    (packed, scale, col), (_, _, group, _) = ptrs, ints
    M, K = shape
    index = device.index or 0
    lut = {CUDA_LUT: 1, CUDA_LUT8: 2}.get(variant, 0)  # the lookup GEMVs: one row of x, no offset decode
    rg = row_groups(cfg)  # 32-row tasks: two launches only
    mode_op = mode if lut else op_mode(mode)  # the switch is read once: the plan and the launch agree
    limits = smem_limits(index)
    # slices of 1024 inputs, one block an SM in one wave: the SMs left over idle (4 of 132 at
    # K = 8192; from 67 slices up to half of them, where spreading them would not shorten the
    # slices that got fewer blocks)
    if lut == 2:
        slices = lut8_k_slices(K)
        blocks = max(1, sm_count(index) // slices)
    else:
        slices = (lut_k_slices(K, bps, split, limits) if lut
                  else k_slices(M, K, bps, split, limits, offset=mode_op in OFFSET_MODES.values(), task_inputs=inputs))
        blocks = max(1, -(-sm_count(index) * bps // slices))  # per slice
    has_lora = lora_A is not None
    R = lora_A.shape[0] if has_lora else 1
    slots = min(MAX_SLOTS, blocks * slices)
    lora_A = lora_A.contiguous() if has_lora else None
    group = group if mode == SCALE_GROUP else 0
    # the kernel reads the scales in x's dtype (the reference rounds Ŵ to it too); col is onebit's g
    same_dtype = scale.dtype == dtype and col.dtype == dtype

    def scales():
        c = (col if col.dtype == dtype else col.to(dtype)) if col is not scale else None
        s = scale if scale.dtype == dtype else scale.to(dtype)
        return s, s if c is None else c

    # 32-row tasks: two launches only
    if rg == 1 and (one_launch_offered() if one_launch is None else one_launch):
        def run_one(x):
            s, c = scales()
            return _one_launch(x, packed, s, c, lora_A, lora_B, bias, scaling, mode_op, group, N, blocks, warps,
                               slices, slots, lut)
        return run_one

    def launch(x, ws, parts):
        s, c = (scale, col) if same_dtype else scales()
        torch.ops.loraq.int1_gemv_mma(x, packed, s, c, lora_A, ws, parts, mode_op, group, blocks, warps, slices,
                                      lut=lut, row_groups=rg)

    return bind_split(launch, M, N, slots, lora_B, R, scaling, bias, dtype, device)


def _one_launch(x, packed, scale, col, lora_A, lora_B, bias, scaling, mode_op, group, N, blocks, warps, slices,
                slots, lut):
    """The kernel with its finish in the same launch (``splitk_finish.run_cuda_one_launch``)."""
    has_lora = lora_A is not None

    def launch(ws, xa, y, counters):
        torch.ops.loraq.int1_gemv_mma(x, packed, scale, col, lora_A, ws, xa, mode_op, group, blocks, warps, slices, y,
                                      counters, lora_B, bias, float(scaling), slots if has_lora else 0, lut)

    return run_cuda_one_launch(launch, x.shape[0], N, lora_A.shape[0] if has_lora else None, slots, x)


@on_input_device
def int1_gemv_mma(x, tensors, meta, lora_A=None, lora_B=None, scaling: float = 1.0, bias=None,
                  blocks_per_sm: int = 2, warps: int = 16, k_split: int = 1, one_launch=None, lookup=False,
                  task_rows: int = 16):
    """``y [M, N]`` for ``x [M, K]`` (1 to 16 rows, fp16/bf16, CUDA) and an int1 weight's
    ``tensors``/``meta``, in ``x.dtype``; raises ValueError (with the reason) where the kernel
    does not run. ``one_launch``: finish in the same launch (None: ``LORAQ_ONE_LAUNCH=1``; tasks of
    32 rows always take two launches). ``lookup``: ``True`` (or
    ``"nibble"``) the lookup GEMV of 4 inputs an entry, ``"byte"`` the byte-lookup GEMV (both one
    row of x; the byte-lookup GEMV ignores ``blocks_per_sm`` and ``k_split``: one block an SM, K in
    slices of 1024) instead of the mma GEMV. ``task_rows``: the mma GEMV's tasks, 16 weight rows x
    512 inputs or 32 x 256."""
    if lookup not in (False, True, "nibble", "byte"):
        raise ValueError(f"lookup must be False, True, 'nibble' or 'byte', got {lookup!r}")
    if x.dim() != 2 or x.shape[1] != meta["K"]:
        raise ValueError(f"x must be [M, {meta['K']}], got {tuple(x.shape)}")
    status = {False: mma_gemv_status, "byte": cuda_lut8_status}.get(lookup, cuda_lut_status)
    ok, why = status(x, meta)
    if not ok:
        raise ValueError(why)
    if task_rows not in (16, 32) or (lookup and task_rows != 16):
        raise ValueError(f"task_rows must be 16, or 32 for the mma GEMV, got {task_rows}")
    inputs = MMA_TASK32_INPUTS if task_rows == 32 else MMA_TASK_INPUTS
    if lookup == "byte":
        cfg = (1, 1, CUDA_LUT8_SLICE_INPUTS, 1, warps, 1, CUDA_LUT8)
    elif lookup:
        cfg = (1, blocks_per_sm, CUDA_LUT_TASK_INPUTS, k_split, warps, 1, CUDA_LUT)
    else:
        cfg = (MMA_MAX_M, blocks_per_sm, inputs, k_split, warps, 1, MMA_GEMV)
    check_mma_config(cfg)
    x = x.contiguous()
    ptrs, ints, mode = weight_args("int1", tensors, meta)
    A, B, bias = lora_and_bias_args(x, lora_A, lora_B, bias)
    return launch_mma(x, ptrs, ints, mode, meta["N"], A, B, scaling, bias, cfg, one_launch)


__all__ = ["int1_gemv_mma", "mma_gemv_status", "mma_gemv_configs", "check_mma_config", "k_slices",
           "launch_mma", "bind_mma", "op_mode", "MMA_MAX_M", "OFFSET_MODES", "cuda_lut_status", "cuda_lut_configs",
           "lut_k_slices", "CUDA_LUT_TASK_INPUTS", "MMA_TASK32_INPUTS", "MMA_TASK32_MIN_M", "MMA_TASK32_SHAPES",
           "MMA_SPLIT_MIN_M", "MMA_SPLIT_SHAPES", "MMA_SPLIT_AT_LEAST",
           "row_groups", "cuda_lut8_status", "cuda_lut8_configs", "lut8_k_slices", "CUDA_LUT8_SLICE_INPUTS",
           "CUDA_LUT8_TABLE_BYTES", "CUDA_LUT8_WARPS"]
