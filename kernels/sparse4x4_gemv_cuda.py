"""``y = x·Ŵᵀ + s·(x·Aᵀ)·Bᵀ + b`` for up to 16 rows of ``x`` and a sparse4x4 ``Ŵ``, as CUDA.

Two kernels of ``loraq._C``, one op (``torch.ops.loraq.sparse4x4_gemv``), both reading each stored
value once, with the block's slice of ``x`` in shared memory and the work cut stream-K style
(every warp takes an equal run of tasks):

* **the gather** (``csrc/sparse4x4_gemv.cuh``, variant ``CUDA_GATHER``): what the Triton gather
  (``sparse4x4_gemv.py``) computes, one product per stored value, with a tile row a lane: a lane
  reads 32 values and their positions with five 16-byte loads, and a warp gathers from one short
  stretch of shared memory at a time (Triton's gather was limited by L1 requests, two per value:
  NOTES.md). ``rows`` rows of ``x`` a block (1, 2, 4 or 8; more are more blocks); each row of x
  costs four predicated FMAs per value.
* **the tensor-core kernel** (``csrc/sparse4x4_gemv_mma.cuh``, variant ``SPARSE_MMA``): each warp
  decodes 16 tiles at a time into the dense A operand of ``mma.sync`` (seven instructions per tile
  and lane), and ``x`` is the B operand: up to 16 rows of ``x`` for about the cost of one.

Sums go into the zeroed fp32 workspace by atomics, the first ``slots`` blocks store their share
of ``x·Aᵀ``, and ``splitk_finish.finish`` adds the LoRA path and the bias and casts: two launches a
call, like the other small-batch forwards. With ``LORAQ_ONE_LAUNCH=1`` the tensor-core kernel
finishes in its own launch (``csrc/gemv_finish.cuh``; written without a GPU, not run on one yet).

Both are autotune candidates of :func:`lora_linear_fwd` for sparse4x4 in fp16 and bf16 up to 16
rows when the extension is built and ``LORAQ_CUDA_GEMV`` is not ``0`` (``cuda_ext.cuda_gemv_offered``;
written without a GPU, their GPU tests passed on an H100 on 2026-11-24; a forced ``config`` runs
them regardless). Configs: ``(rows of x a block, blocks an SM, inputs a task, K
slices at least, warps a block, 1, variant)``: the gather's rows are 1, 2, 4 or 8 and its tasks
``GATHER_TASK_INPUTS``; the tensor-core kernel's are 16 and ``SPARSE_MMA_TASK_INPUTS``.
"""

from functools import lru_cache
from typing import List, Tuple

import torch

from .autotune import CUDA_GATHER, SPARSE_MMA, Config
from .cuda_ext import MAX_SLOTS, extension_problem, fit_slices, sm_count, smem_limits
from .decode import lora_and_bias_args, weight_args
from .splitk_finish import bind_split, one_launch_offered, run_cuda_one_launch
from .device_guard import on_input_device

SPARSE_CUDA_MAX_M = 16  # rows of x a call (csrc: kMaxRows)
GATHER_TASK_INPUTS = 128  # the gather's inputs a task: 32 tile columns (csrc: kTaskInputs)
GATHER_ROWS = (1, 2, 4, 8)  # the gather's rows of x a block (its instantiations)
SPARSE_MMA_TASK_INPUTS = 512  # the tensor-core kernel's inputs a task: 128 tile columns
SPARSE_MMA_ROWS = 16  # its "rows of x a block": all of them, one or two mma tiles of 8
MAX_WARPS = 16  # warps a block (the kernels' launch bound: 512 threads)
# (blocks an SM, warps a block), kept where the registers of the kernel let that many warps share
# an SM (WARPS_AN_SM[rows]; compiled for sm_90, bench/sass_cuda.py: the gather 72 registers for
# 1 row, 77-80 for 2, up to 128 for 4 and 8; the tensor-core kernel 64-86, 124 with word-by-word loads)
SHAPES = ((1, 16), (3, 8), (2, 8), (1, 8), (2, 16), (4, 8))
WARPS_AN_SM = {1: 24, 2: 24, 4: 16, 8: 16, SPARSE_MMA_ROWS: 16}


def sparse_cuda_status(x: torch.Tensor) -> Tuple[bool, str]:
    """``(usable, why not)`` for the CUDA kernels on ``x`` (a sparse4x4 weight)."""
    if x.device.type != "cuda":
        return False, f"the sparse4x4 CUDA GEMVs are CUDA kernels, x is on {x.device}"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return False, f"the sparse4x4 CUDA GEMVs take float16 or bfloat16, got {x.dtype}"
    if not 1 <= x.shape[0] <= SPARSE_CUDA_MAX_M:
        return False, f"the sparse4x4 CUDA GEMVs take 1 to {SPARSE_CUDA_MAX_M} rows of x, got {x.shape[0]}"
    capability = torch.cuda.get_device_capability(x.device)
    if capability < (8, 0):
        return False, "the sparse4x4 CUDA GEMVs need compute capability 8.0 or newer (mma.sync with bf16)"
    problem = extension_problem("sparse4x4_gemv", capability)
    return (not problem), problem


def rows_for(M: int) -> int:
    """The gather's rows of x a block for an ``M``-row call: ``M`` rounded up to a power of two,
    at most 8."""
    if not 1 <= M <= SPARSE_CUDA_MAX_M:
        raise ValueError(f"the sparse4x4 CUDA GEMVs take 1 to {SPARSE_CUDA_MAX_M} rows of x, got {M}")
    return min(8, 1 << (M - 1).bit_length())


def slice_bytes(rows: int, M: int):
    """Bytes of a block's copy of ``x`` as a function of a slice's inputs: the gather keeps
    ``rows`` rows in fp32; the tensor-core kernel one or two tiles of 8 rows in 16 bits, 32 bytes
    of padding a row."""
    if rows == SPARSE_MMA_ROWS:
        tile_rows = 8 if M <= 8 else 16
        return lambda inputs: tile_rows * (inputs * 2 + 32)
    return lambda inputs: rows * inputs * 4


@lru_cache(maxsize=1024)  # per call otherwise (host time): a few shapes, a few configs
def sparse_slices(rows: int, M: int, K: int, blocks_per_sm: int, at_least: int = 1, limits=None) -> int:
    """K slices (about ``at_least`` or more) so that ``blocks_per_sm`` blocks' copies of ``x`` fit
    the shared memory (``cuda_ext.fit_slices``; ``limits``: ``cuda_ext.smem_limits`` of the GPU)."""
    task = SPARSE_MMA_TASK_INPUTS if rows == SPARSE_MMA_ROWS else GATHER_TASK_INPUTS
    return fit_slices(K, task, slice_bytes(rows, M), blocks_per_sm, at_least, f"{rows} rows of x",
                      *([limits] if limits else []))


def sparse_cuda_configs(M: int) -> List[Config]:
    """The candidates for ``1 ≤ M ≤ 16`` rows of x: the gather's (``rows_for(M)`` rows a block)
    and the tensor-core kernel's (K slices: 1, raised at run time when x's slice does not fit)."""
    rows = rows_for(M)
    gather = [(rows, bps, GATHER_TASK_INPUTS, 1, warps, 1, CUDA_GATHER)
              for bps, warps in SHAPES if bps * warps <= WARPS_AN_SM[rows]]
    mma = [(SPARSE_MMA_ROWS, bps, SPARSE_MMA_TASK_INPUTS, 1, warps, 1, SPARSE_MMA)
           for bps, warps in SHAPES if bps * warps <= WARPS_AN_SM[SPARSE_MMA_ROWS]]
    return gather + mma


def check_sparse_cuda_config(cfg) -> None:
    """Raise ValueError unless ``cfg`` is a config one of the sparse4x4 CUDA GEMVs runs."""
    if len(cfg) != 7 or cfg[6] not in (CUDA_GATHER, SPARSE_MMA):
        raise ValueError(f"config {cfg} is not a sparse4x4 CUDA GEMV config (its last field must be "
                         f"{CUDA_GATHER} or {SPARSE_MMA})")
    rows, bps, inputs, split, warps, stages, variant = cfg
    mma = variant == SPARSE_MMA
    if rows not in ((SPARSE_MMA_ROWS,) if mma else GATHER_ROWS):
        raise ValueError(f"config {cfg}: rows of x a block must be one of "
                         f"{(SPARSE_MMA_ROWS,) if mma else GATHER_ROWS}")
    task = SPARSE_MMA_TASK_INPUTS if mma else GATHER_TASK_INPUTS
    if inputs != task or stages != 1:
        raise ValueError(f"config {cfg}: fields 2 and 5 are fixed ({task}, 1)")
    if bps < 1 or split < 1 or not 1 <= warps <= MAX_WARPS:
        raise ValueError(f"config {cfg}: blocks an SM and K slices must be ≥ 1, warps 1 to {MAX_WARPS}")


def launch_sparse_cuda(x, ptrs, N, lora_A, lora_B, scaling, bias, cfg, one_launch=None):
    """The launch on arguments already prepared (``weight_args``'s pointers; ``lora_A``, ``lora_B``
    and ``bias`` in ``x``'s dtype and contiguous, or None) and checked. Two launches: the kernel,
    then ``splitk_finish.finish``; the tensor-core kernel with ``one_launch`` (None:
    ``LORAQ_ONE_LAUNCH=1``) finishes in its own launch (``csrc/gemv_finish.cuh``). Returns
    ``y [M, N]`` in ``x.dtype``."""
    x = x.contiguous()  # the ops take a contiguous x
    return bind_sparse_cuda(x.shape, x.dtype, x.device, ptrs, N, lora_A, lora_B, scaling, bias, cfg, one_launch)(x)


def bind_sparse_cuda(shape, dtype, device, ptrs, N, lora_A, lora_B, scaling, bias, cfg, one_launch=None):
    """:func:`launch_sparse_cuda` for every contiguous ``x`` of ``shape`` ``[M, K]``, ``dtype``
    and ``device``, its plan worked out once: ``run(x) -> y``. The tensors are read at each call;
    values in another dtype than x's are cast at each call."""
    rows, bps, _, split, warps, _, _ = cfg
    values, positions, _ = ptrs
    M, K = shape
    index = device.index or 0
    slices = sparse_slices(rows, M, K, bps, split, smem_limits(index))
    groups = -(-M // rows)  # blocks along z (the gather's rows of x; one for the tensor-core kernel)
    blocks = max(1, -(-sm_count(index) * bps // (slices * groups)))  # per slice and group
    has_lora = lora_A is not None
    R = lora_A.shape[0] if has_lora else 1
    slots = min(MAX_SLOTS, blocks * slices)
    lora_A = lora_A.contiguous() if has_lora else None

    def vals():  # Ŵ in x's dtype, as the reference rounds it
        return values if values.dtype == dtype else values.to(dtype)

    if rows == SPARSE_MMA_ROWS and (one_launch_offered() if one_launch is None else one_launch):
        return lambda x: _one_launch(x, vals(), positions, lora_A, lora_B, bias, scaling, N, blocks, warps, slices,
                                     slots)

    def launch(x, ws, parts):
        torch.ops.loraq.sparse4x4_gemv(x, vals(), positions, lora_A, ws, parts, N, rows, blocks, warps, slices)

    return bind_split(launch, M, N, slots, lora_B, R, scaling, bias, dtype, device)


def _one_launch(x, values, positions, lora_A, lora_B, bias, scaling, N, blocks, warps, slices, slots):
    """The tensor-core kernel with its finish in the same launch (``splitk_finish.run_cuda_one_launch``)."""
    has_lora = lora_A is not None

    def launch(ws, xa, y, counters):
        torch.ops.loraq.sparse4x4_gemv(x, values, positions, lora_A, ws, xa, N, SPARSE_MMA_ROWS, blocks, warps, slices,
                                       y, counters, lora_B, bias, float(scaling), slots if has_lora else 0)

    return run_cuda_one_launch(launch, x.shape[0], N, lora_A.shape[0] if has_lora else None, slots, x)


@on_input_device
def sparse4x4_gemv_cuda(x, tensors, meta, lora_A=None, lora_B=None, scaling: float = 1.0, bias=None,
                        kernel: str = "gather", blocks_per_sm: int = 1, warps: int = 16, k_split: int = 1,
                        one_launch=None):
    """``y [M, N]`` for ``x [M, K]`` (1 to 16 rows, fp16/bf16, CUDA) and a sparse4x4 weight's
    ``tensors``/``meta``, in ``x.dtype``, by ``kernel`` (``"gather"`` or ``"mma"``). Raises
    ValueError (with the reason) where the kernel does not run. ``one_launch`` (the ``"mma"``
    kernel only): finish in the same launch (None: ``LORAQ_ONE_LAUNCH=1``)."""
    if x.dim() != 2 or x.shape[1] != meta["K"]:
        raise ValueError(f"x must be [M, {meta['K']}], got {tuple(x.shape)}")
    if kernel not in ("gather", "mma"):
        raise ValueError(f"kernel must be 'gather' or 'mma', got {kernel!r}")
    ok, why = sparse_cuda_status(x)
    if not ok:
        raise ValueError(why)
    if kernel == "mma":
        cfg = (SPARSE_MMA_ROWS, blocks_per_sm, SPARSE_MMA_TASK_INPUTS, k_split, warps, 1, SPARSE_MMA)
    else:
        cfg = (rows_for(x.shape[0]), blocks_per_sm, GATHER_TASK_INPUTS, k_split, warps, 1, CUDA_GATHER)
    check_sparse_cuda_config(cfg)
    x = x.contiguous()
    ptrs, _, _ = weight_args("sparse4x4", tensors, meta)
    A, B, bias = lora_and_bias_args(x, lora_A, lora_B, bias)
    return launch_sparse_cuda(x, ptrs, meta["N"], A, B, scaling, bias, cfg, one_launch)


__all__ = ["sparse4x4_gemv_cuda", "sparse_cuda_status", "sparse_cuda_configs", "check_sparse_cuda_config",
           "sparse_slices", "rows_for", "launch_sparse_cuda", "bind_sparse_cuda", "SPARSE_CUDA_MAX_M"]
