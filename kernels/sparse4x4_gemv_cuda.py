"""``y = x·Ŵᵀ + s·(x·Aᵀ)·Bᵀ + b`` for up to 16 rows of ``x`` and a sparse4x4 ``Ŵ``, as CUDA.

The kernel is CUDA C++ (``csrc/sparse4x4_gemv.cuh``, built into ``loraq._C`` as
``torch.ops.loraq.sparse4x4_gemv``). It computes what the Triton gather (``sparse4x4_gemv.py``)
does, one product per stored value, but keeps the block's slice of ``x`` in shared memory and
gives each lane a tile row: a lane reads 32 values and their positions with five 16-byte loads,
and a warp's 32 lanes gather from one short stretch of shared memory at a time. Triton's gather
was limited by L1 requests (two per value, NOTES.md). The work is cut stream-K style (every warp
takes an equal run of 32 tile rows x 32 tile columns), ``rows`` rows of ``x`` a block (1, 2, 4 or
8; more rows of ``x`` are more blocks). Sums go into the zeroed fp32 workspace by atomics, the
first ``slots`` blocks store their share of ``x·Aᵀ``, and ``splitk_finish.finish`` adds the LoRA
path and the bias and casts: two launches a call, like the other small-batch forwards.

It is an autotune candidate of :func:`lora_linear_fwd` for sparse4x4 in fp16 and bf16 up to 16
rows when the extension is built and ``LORAQ_CUDA_GEMV=1`` is set (``cuda_ext.cuda_gemv_offered``:
written without a GPU, it stays opt-in until its GPU tests have passed on one; a forced ``config``
runs it regardless). Configs: ``(rows of x a block, blocks an SM, CUDA_GATHER_TASK_INPUTS, K slices
at least, warps a block, 1, CUDA_GATHER)``.
"""

from typing import List, Tuple

import torch

from .autotune import CUDA_GATHER, Config
from .cuda_ext import MAX_SLOTS, extension_problem, fit_slices, sm_count
from .decode import lora_in_dtype, weight_args
from .splitk_finish import run_split

CUDA_GATHER_MAX_M = 16  # rows of x a call (csrc: kMaxRows)
CUDA_GATHER_TASK_INPUTS = 128  # inputs a task: 32 tile columns (csrc: kTaskInputs)
CUDA_GATHER_ROWS = (1, 2, 4, 8)  # rows of x a block (the kernel's instantiations)
CUDA_GATHER_MAX_WARPS = 16  # warps a block (its launch bound: 512 threads)
# (blocks an SM, warps a block), kept where the registers of `rows` let that many warps share an
# SM (WARPS_AN_SM[rows]; compiled for sm_90, bench/sass_cuda.py: 72 registers for 1 row, 77-80 for
# 2, 89 for 4 (127 with word-by-word loads), 105 for 8)
CUDA_GATHER_SHAPES = ((1, 16), (3, 8), (2, 8), (1, 8), (2, 16), (4, 8))
WARPS_AN_SM = {1: 24, 2: 24, 4: 16, 8: 16}


def cuda_gather_status(x: torch.Tensor) -> Tuple[bool, str]:
    """``(usable, why not)`` for the CUDA gather on ``x`` (a sparse4x4 weight)."""
    if x.device.type != "cuda":
        return False, f"the CUDA gather GEMV is a CUDA kernel, x is on {x.device}"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return False, f"the CUDA gather GEMV takes float16 or bfloat16, got {x.dtype}"
    if not 1 <= x.shape[0] <= CUDA_GATHER_MAX_M:
        return False, f"the CUDA gather GEMV takes 1 to {CUDA_GATHER_MAX_M} rows of x, got {x.shape[0]}"
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return False, "the CUDA gather GEMV is built for compute capability 8.0 or newer"
    problem = extension_problem("sparse4x4_gemv")
    return (not problem), problem


def rows_for(M: int) -> int:
    """Rows of x a block for an ``M``-row call: ``M`` rounded up to a power of two, at most 8."""
    if not 1 <= M <= CUDA_GATHER_MAX_M:
        raise ValueError(f"the CUDA gather GEMV takes 1 to {CUDA_GATHER_MAX_M} rows of x, got {M}")
    return min(8, 1 << (M - 1).bit_length())


def gather_slices(rows: int, K: int, blocks_per_sm: int, at_least: int = 1) -> int:
    """K slices (about ``at_least`` or more) so that ``blocks_per_sm`` blocks' copies of ``x``
    (``rows`` rows of a slice, fp32) fit the shared memory (``cuda_ext.fit_slices``)."""
    return fit_slices(K, CUDA_GATHER_TASK_INPUTS, lambda inputs: rows * inputs * 4, blocks_per_sm, at_least,
                      f"{rows} rows of x")


def cuda_gather_configs(M: int) -> List[Config]:
    """The CUDA gather's candidates for ``1 ≤ M ≤ 16`` rows of x (K slices: 1, raised at run time
    when x's slice does not fit the shared memory)."""
    rows = rows_for(M)
    return [(rows, bps, CUDA_GATHER_TASK_INPUTS, 1, warps, 1, CUDA_GATHER)
            for bps, warps in CUDA_GATHER_SHAPES if bps * warps <= WARPS_AN_SM[rows]]


def check_cuda_gather_config(cfg) -> None:
    """Raise ValueError unless ``cfg`` is a config the CUDA gather runs."""
    if len(cfg) != 7 or cfg[6] != CUDA_GATHER:
        raise ValueError(f"config {cfg} is not a CUDA gather config (its last field must be {CUDA_GATHER})")
    rows, bps, inputs, split, warps, stages, _ = cfg
    if rows not in CUDA_GATHER_ROWS:
        raise ValueError(f"config {cfg}: rows of x a block must be one of {CUDA_GATHER_ROWS}")
    if inputs != CUDA_GATHER_TASK_INPUTS or stages != 1:
        raise ValueError(f"config {cfg}: the CUDA gather's fields 2 and 5 are fixed ({CUDA_GATHER_TASK_INPUTS}, 1)")
    if bps < 1 or split < 1 or not 1 <= warps <= CUDA_GATHER_MAX_WARPS:
        raise ValueError(f"config {cfg}: blocks an SM and K slices must be ≥ 1, warps 1 to {CUDA_GATHER_MAX_WARPS}")


def launch_cuda_gather(x, ptrs, N, lora_A, lora_B, scaling, bias, cfg):
    """The launch on arguments already prepared (``weight_args``'s pointers; ``lora_A``, ``lora_B``
    in ``x``'s dtype, or None) and checked. Two launches: the kernel, then
    ``splitk_finish.finish``. Returns ``y [M, N]`` in ``x.dtype``."""
    rows, bps, _, split, warps, _, _ = cfg
    values, positions, _ = ptrs
    M, K = x.shape
    slices = gather_slices(rows, K, bps, split)
    groups = -(-M // rows)  # blocks along z: rows of x
    blocks = max(1, -(-sm_count(x.device.index or 0) * bps // (slices * groups)))  # per slice and group
    has_lora = lora_A is not None
    R = lora_A.shape[0] if has_lora else 1
    slots = min(MAX_SLOTS, blocks * slices)
    values = values.to(x.dtype)  # Ŵ in the activation dtype, as the reference rounds it
    lora_A = lora_A.contiguous() if has_lora else None

    def launch(ws, parts):
        torch.ops.loraq.sparse4x4_gemv(x, values, positions, lora_A, ws, parts if has_lora else None, N, rows,
                                       blocks, warps, slices)

    return run_split(launch, M, N, slots, x, lora_B, R, scaling, bias)


def sparse4x4_gemv_cuda(x, tensors, meta, lora_A=None, lora_B=None, scaling: float = 1.0, bias=None,
                        rows: int = 0, blocks_per_sm: int = 2, warps: int = 16, k_split: int = 1):
    """``y [M, N]`` for ``x [M, K]`` (1 to 16 rows, fp16/bf16, CUDA) and a sparse4x4 weight's
    ``tensors``/``meta``, in ``x.dtype``; ``rows`` of x a block (0: :func:`rows_for`). Raises
    ValueError (with the reason) where the kernel does not run."""
    if x.dim() != 2 or x.shape[1] != meta["K"]:
        raise ValueError(f"x must be [M, {meta['K']}], got {tuple(x.shape)}")
    ok, why = cuda_gather_status(x)
    if not ok:
        raise ValueError(why)
    cfg = (rows or rows_for(x.shape[0]), blocks_per_sm, CUDA_GATHER_TASK_INPUTS, k_split, warps, 1, CUDA_GATHER)
    check_cuda_gather_config(cfg)
    x = x.contiguous()
    ptrs, _, _ = weight_args("sparse4x4", tensors, meta)
    A, B = lora_in_dtype(x, lora_A, lora_B)
    return launch_cuda_gather(x, ptrs, meta["N"], A, B, scaling, bias, cfg)


__all__ = ["sparse4x4_gemv_cuda", "cuda_gather_status", "cuda_gather_configs", "check_cuda_gather_config",
           "gather_slices", "rows_for", "launch_cuda_gather", "CUDA_GATHER_MAX_M"]
