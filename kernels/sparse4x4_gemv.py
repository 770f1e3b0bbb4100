"""``y = x·Ŵᵀ + s·(x·Aᵀ)·Bᵀ + b`` for a few rows of ``x`` and a sparse4x4 ``Ŵ``, by gathering.

The tiled kernel (``lora_linear_fwd``) spreads each stored value over its 4x4 tile and compares
every element with the tile's position before ``tl.dot``: sixteen selects per stored value, for a
product that is almost all zeros. At small batches that decode is the whole cost. This kernel
never builds the tile. A stored value ``v`` at tile ``(tn, tk)`` and position ``p`` has one
product: ``y[m, 4·tn + p // 4] += v · x[m, 4·tk + p % 4]``. Each program loads a block of values
and their positions, gathers the one input each value needs (from L1: a row of ``x`` is a few
KB), and multiply-adds it into one of four accumulators, one per row inside a tile. Nothing is
reduced across threads until the end. Compiled for sm_90, one value costs about 24 instructions
for one row of ``x`` (about 1.5 per weight) and 11.5 per row from 4 rows, whose values and
positions are loaded and decoded once (``bench/sass_report.py``).

Programs split N (``BLOCK_N`` rows, a multiple of 4), K (``K_PER_SPLIT`` each, walked
``BLOCK_K`` at a time) and M (``ROWS`` rows of ``x`` each); partial sums meet through fp32
atomics in a zeroed workspace. The programs of the first block of outputs also store their
slice's share of ``x·Aᵀ``; ``splitk_finish.finish`` adds the LoRA path and the bias and casts, in
the second and last launch of a call. In the one-launch mode (``LORAQ_ONE_LAUNCH=1``) the first
program of each slice to claim it stores the share, and the last program of each block of
outputs to arrive finishes it (``splitk_finish._finish_if_last``).
"""

import torch
import triton
import triton.language as tl

from .autotune import GATHER, GATHER_FWD, GATHER_T, GATHER_T_X4, GATHER_X4
from .decode import interpreter_upcast, lora_and_bias_args, split_plan, weight_args
from .splitk_finish import XA_BLOCK_K, _claim_share, _finish_if_last, _store_xa_part, bind_split, one_launch_offered, run_one_launch
from .host_math import cdiv, block_r, next_pow2
from .fast_launch import fast
from .device_guard import on_input_device


@triton.jit
def _add_by_slot(slot, vals, other, acc0, acc1, acc2, acc3):
    """``acc_i += vals · other`` where ``slot == i`` (0..3): each stored value lands in the
    accumulator of its row (forward) or column (dX) inside its tile. The selected value is made
    once per value and shared by every row of x, when ``other`` has more rows than ``vals``."""
    acc0 += tl.where(slot == 0, vals, 0.0) * other
    acc1 += tl.where(slot == 1, vals, 0.0) * other
    acc2 += tl.where(slot == 2, vals, 0.0) * other
    acc3 += tl.where(slot == 3, vals, 0.0) * other
    return acc0, acc1, acc2, acc3


@triton.jit
def _sum_slots(acc0, acc1, acc2, acc3, AXIS: tl.constexpr):
    """The four ``[ROWS, A, B]`` accumulators summed over ``AXIS`` (1 or 2) and set side by side:
    ``[ROWS, the other axis, 4]``, the slot last (output ``4·t + slot``)."""
    s4 = tl.arange(0, 4)[None, None, :]
    out = tl.where(s4 == 0, tl.sum(acc0, axis=AXIS)[:, :, None], 0.0)
    out += tl.where(s4 == 1, tl.sum(acc1, axis=AXIS)[:, :, None], 0.0)
    out += tl.where(s4 == 2, tl.sum(acc2, axis=AXIS)[:, :, None], 0.0)
    out += tl.where(s4 == 3, tl.sum(acc3, axis=AXIS)[:, :, None], 0.0)
    return out


@triton.jit
def _gather_step(x_rows, values_ptr, pos_ptr, rows, tn, k0, k_end, K, TK, PW, acc0, acc1, acc2, acc3,
                 TK_B: tl.constexpr, MASKED: tl.constexpr, TRANSPOSE: tl.constexpr, X4: tl.constexpr):
    """Add the products of one ``[TN_B, TK_B]`` block of stored values with ``ROWS`` rows of x to
    the four accumulators ``[ROWS, TN_B, TK_B]`` (one per row inside a tile; ``[ROWS, TK_B,
    TN_B]`` if ``TRANSPOSE``). ``MASKED`` only for the last block of a slice: the others lie
    inside ``K`` (rows past ``N`` and ``M`` were clamped by the caller), so they load without
    masks."""
    # The values and position bytes are addressed as [ROWS, TN_B, TK_B] (the same address for
    # every row, which Triton loads once): with the shape of the gathered inputs they get the same
    # register layout, and nothing moves between threads. Each value loads the byte that holds its
    # nibble (low nibble: even tile column). The axis order decides how Triton spreads the block
    # over the lanes: Triton 3.8 puts the lanes along the tile columns in the [ROWS, TN_B, TK_B]
    # order, Triton 3.6 only in the swapped one (bench/results/NOTES.md); the autotuner times both.
    if TRANSPOSE:
        j = tl.arange(0, TK_B)[None, :, None]  # tile column inside the block
        t = tn[None, None, :]
    else:
        j = tl.arange(0, TK_B)[None, None, :]
        t = tn[None, :, None]
    same = rows[:, None, None] * 0
    v_ptrs = values_ptr + t * TK + (k0 // 4 + j) + same
    p_ptrs = pos_ptr + t * PW + (k0 // 8 + j // 2) + same
    if MASKED:
        inside = k0 + j * 4 < k_end
        vals = tl.load(v_ptrs, mask=inside, other=0.0)
        byte = tl.load(p_ptrs, mask=inside, other=0)
    else:
        vals = tl.load(v_ptrs)
        byte = tl.load(p_ptrs)
    vals = vals.to(tl.float32)
    nib = (byte.to(tl.int32) >> ((j & 1) * 4)) & 15  # k0 is a multiple of 8: j's parity is the column's
    row = nib >> 2  # the output row (inside the tile) it adds to
    if X4:
        # the four inputs of each tile column, loaded once per row of x and tile column (shared by
        # every tile row a thread holds), then the value's one picked in registers: one position
        # byte per value is the only per-value load left
        q = tl.arange(0, 4)[None, None, None, :]
        x_ptrs = x_rows[:, :, :, None] + k0 + j[:, :, :, None] * 4 + q
        if MASKED:
            x4 = tl.load(x_ptrs, mask=k0 + j[:, :, :, None] * 4 + q < K, other=0.0)
        else:
            x4 = tl.load(x_ptrs)
        x4 = tl.reshape(x4.to(tl.float32), x4.shape[:3] + [2, 2])  # [..., q // 2, q % 2]
        x_even, x_odd = tl.split(x4)
        x0, x2 = tl.split(x_even)
        x1, x3 = tl.split(x_odd)
        c = nib & 3
        xv = tl.where(c == 0, x0, tl.where(c == 1, x1, tl.where(c == 2, x2, x3)))
    else:
        col = j * 4 + (nib & 3)  # the input it multiplies, from k0
        if MASKED:  # a position inside the padding must not read past a row of x
            xv = tl.load(x_rows + k0 + col, mask=inside & (k0 + col < K), other=0.0)
        else:
            xv = tl.load(x_rows + k0 + col)
    return _add_by_slot(row, vals, xv.to(tl.float32), acc0, acc1, acc2, acc3)


@triton.jit
def _sparse4x4_gemv_kernel(
    x_ptr, values_ptr, pos_ptr, a_ptr, parts_ptr, ws_ptr,
    y_ptr, b_ptr, bias_ptr, cnt_ptr,  # the one-launch finish's (placeholders without ONE_LAUNCH)
    M, N, K, TK, PW, R, K_PER_SPLIT, stride_xm, stride_ar, s, stride_bn, stride_ym,
    HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TRANSPOSE: tl.constexpr, X4: tl.constexpr,
    ONE_LAUNCH: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    TN_B: tl.constexpr = BLOCK_N // 4  # tile rows per program
    TK_B: tl.constexpr = BLOCK_K // 4  # tile columns per step
    # the accumulators' shape: [ROWS, tile rows, tile columns], or with the last two swapped
    A1: tl.constexpr = TK_B if TRANSPOSE else TN_B
    A2: tl.constexpr = TN_B if TRANSPOSE else TK_B
    # the rows of x vary fastest over the grid: the programs that read the same block of weights
    # for other rows run together, and find it in L2
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    if ONE_LAUNCH:  # whichever program of this slice claims first stores its share of x·Aᵀ
        claimed = _claim_share(cnt_ptr, pid_s, pid_m, tl.num_programs(1), tl.num_programs(0), tl.num_programs(2),
                               HAS_LORA)
        stores_share = claimed == 0
    else:
        stores_share = pid_n == 0
    rows = tl.arange(0, ROWS)
    offs_m = pid_m * ROWS + rows
    # rows of Ŵ past N and of x past M are clamped to the last real ones: their loads stay in
    # bounds without masks, and their results are never stored
    tn = tl.minimum(pid_n * TN_B + tl.arange(0, TN_B), (N + 3) // 4 - 1)
    x_rows = x_ptr + tl.minimum(offs_m, M - 1)[:, None, None] * stride_xm  # [ROWS, 1, 1]
    # one accumulator per row inside the tile, summed over K only at the end: the loop does no
    # reduction across threads, only multiply-adds in registers
    acc0 = tl.zeros((ROWS, A1, A2), dtype=tl.float32)
    acc1 = tl.zeros((ROWS, A1, A2), dtype=tl.float32)
    acc2 = tl.zeros((ROWS, A1, A2), dtype=tl.float32)
    acc3 = tl.zeros((ROWS, A1, A2), dtype=tl.float32)
    k_start = pid_s * K_PER_SPLIT  # a multiple of BLOCK_K (decode.split_plan)
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    # whole blocks of whole tiles first, unmasked; then the slice's last, partial block
    k_full = k_start + (((k_end // 4) * 4 - k_start) // BLOCK_K) * BLOCK_K
    for k0 in range(k_start, k_full, BLOCK_K):
        acc0, acc1, acc2, acc3 = _gather_step(x_rows, values_ptr, pos_ptr, rows, tn, tl.multiple_of(k0, BLOCK_K),
                                              k_end, K, TK, PW, acc0, acc1, acc2, acc3, TK_B, False, TRANSPOSE, X4)
    if k_full < k_end:
        acc0, acc1, acc2, acc3 = _gather_step(x_rows, values_ptr, pos_ptr, rows, tn, k_full, k_end, K, TK, PW,
                                              acc0, acc1, acc2, acc3, TK_B, True, TRANSPOSE, X4)
    # summed over the tile columns: output row 4·tn + r
    y = tl.reshape(_sum_slots(acc0, acc1, acc2, acc3, 1 if TRANSPOSE else 2), (ROWS, BLOCK_N))
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.atomic_add(ws_ptr + offs_m[:, None] * N + offs_n[None, :], y,
                  mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
    if HAS_LORA and stores_share:  # this slice's share of x·Aᵀ, for the finish
        _store_xa_part(x_ptr, a_ptr, parts_ptr, pid_m * ROWS, M, k_start, k_end, R, pid_s, stride_xm, stride_ar,
                       ROWS, BLOCK_R, XA_BLOCK_K, IEEE, UPCAST)
    if ONE_LAUNCH:  # the last program of this block of outputs to arrive adds the LoRA path and the bias
        _finish_if_last(ws_ptr, y_ptr, parts_ptr, b_ptr, bias_ptr, cnt_ptr, offs_n, pid_n, pid_s, pid_m, claimed,
                        tl.num_programs(1), tl.num_programs(0), M, N, R, tl.num_programs(2), s, stride_bn, stride_ym,
                        HAS_LORA, HAS_BIAS, ROWS, BLOCK_R, BLOCK_S)


@on_input_device
def sparse4x4_gemv(x, tensors, meta, lora_A=None, lora_B=None, scaling: float = 1.0, bias=None,
                   rows: int = 1, block_n: int = 128, block_k: int = 256, split: int = 4, num_warps: int = 4,
                   num_stages: int = 2, transpose: bool = False, by_fours: bool = False, one_launch=None):
    """Launch the gathering forward for ``x [M, K]`` (meant for small ``M``) and a sparse4x4
    weight (``tensors``/``meta`` as in ``decode.weight_args``); returns ``y [M, N]`` in
    ``x.dtype``. Each program covers ``rows`` rows of ``x`` (the weights are loaded and decoded
    once for them), ``block_n`` outputs and a ``1/split`` slice of K, walked ``block_k`` inputs at
    a time. ``transpose`` swaps the block's axes (the GATHER_T variant: the same sums, another
    register layout); ``by_fours`` loads each tile column's four inputs once and picks one per
    value in registers (GATHER_X4, GATHER_T_X4) instead of gathering one input per value.
    ``one_launch``: finish in the same launch (None: ``LORAQ_ONE_LAUNCH=1``)."""
    if x.dim() != 2 or x.shape[1] != meta["K"]:
        raise ValueError(f"x must be [M, {meta['K']}], got {tuple(x.shape)}")
    variant = ((GATHER_T_X4 if by_fours else GATHER_T) if transpose else (GATHER_X4 if by_fours else GATHER))
    cfg = (rows, block_n, block_k, split, num_warps, num_stages, variant)
    check_gather_config(cfg)
    x = x.contiguous()
    ptrs, ints, _ = weight_args("sparse4x4", tensors, meta)
    A, B, bias = lora_and_bias_args(x, lora_A, lora_B, bias)
    return launch_gather(x, ptrs, ints, meta["N"], A, B, scaling, bias, cfg, one_launch)


def check_gather_config(cfg, limits=(("rows", 1), ("block_n", 4), ("block_k", 8)), variants=GATHER_FWD) -> None:
    """Raise ValueError unless ``cfg`` is a config the gathering kernel computes correctly:
    ``(rows, output tile, reduction tile, split, num_warps, num_stages, variant)`` with powers of
    two for the first three, each at least its ``limits`` entry (forward: block_n ≥ 4, whole
    tiles; block_k ≥ 8, whole position bytes), and one of ``variants`` last (the forward:
    ``autotune.GATHER_FWD``)."""
    *sizes, split, num_warps, num_stages, variant = cfg
    if variant not in variants:
        raise ValueError(f"config {cfg} is not a gathering GEMV config (its last field must be one of {variants})")
    for (name, low), v in zip(limits, sizes):
        if v < low or v & (v - 1):
            raise ValueError(f"{name} must be a power of two ≥ {low}, got {v}")
    if split < 1:
        raise ValueError(f"split must be ≥ 1, got {split}")


def launch_gather(x, ptrs, ints, N, lora_A, lora_B, scaling, bias, cfg, one_launch=None):
    """The launch on arguments already prepared (``weight_args``'s; ``lora_A``, ``lora_B`` in
    ``x``'s dtype, or None without LoRA); ``cfg`` is an ``autotune.gather_configs`` entry. Two
    launches: the gathers, then ``splitk_finish.finish``; or one, where the last program of each
    block of outputs finishes it (``one_launch``; None: ``splitk_finish.one_launch_offered()``).
    Returns ``y [M, N]`` in x's dtype."""
    x = x.contiguous()  # the bound launch steps K elements a row
    return bind_gather(x.shape, x.dtype, x.device, ptrs, ints, N, lora_A, lora_B, scaling, bias, cfg, one_launch)(x)


def bind_gather(shape, dtype, device, ptrs, ints, N, lora_A, lora_B, scaling, bias, cfg, one_launch=None):
    """:func:`launch_gather` for every contiguous ``x`` of ``shape`` ``[M, K]``, ``dtype`` and
    ``device``, its grid and arguments worked out once: ``run(x) -> y`` (the tensors read at each
    call)."""
    rows, block_n, block_k, split, num_warps, num_stages, _ = cfg
    (values, positions, _), (TK, PW, _, _) = ptrs, ints
    M, K = shape
    has_lora = lora_A is not None
    R = lora_A.shape[0] if has_lora else 1
    split, k_per_split = split_plan(K, block_k, split)
    grid = (cdiv(M, rows), cdiv(N, block_n), split)
    one = one_launch_offered() if one_launch is None else one_launch
    # x is contiguous: its rows K apart (one row: never stepped over). The finish's scalars 0
    # without it: no extra specializations of the two-launch kernel
    scalars = (M, N, K, TK, PW, R, k_per_split, K, lora_A.stride(0) if has_lora else K,
               float(scaling) if one else 0.0, lora_B.stride(0) if has_lora and one else 0)
    meta = dict(HAS_LORA=has_lora, BLOCK_R=block_r(R), IEEE=dtype == torch.float32, UPCAST=interpreter_upcast(dtype),
                ROWS=rows, BLOCK_N=block_n, BLOCK_K=block_k, TRANSPOSE=cfg[6] in (GATHER_T, GATHER_T_X4),
                X4=cfg[6] in (GATHER_X4, GATHER_T_X4), ONE_LAUNCH=one, HAS_BIAS=bias is not None and one,
                BLOCK_S=min(16, next_pow2(split)) if one else 1, num_warps=num_warps, num_stages=num_stages)
    launcher = fast(_sparse4x4_gemv_kernel)

    def launch(x, ws, parts, y=None, counters=None):
        launcher.launch(grid, (
            x, values, positions, lora_A if has_lora else x, parts if has_lora else ws, ws,
            ws if y is None else y, lora_B if has_lora and one else ws, bias if bias is not None and one else ws,
            ws if counters is None else counters, *scalars, 0 if y is None else N), meta)

    if one:  # grid: (groups of rows, blocks of outputs, slices of K)
        return lambda x: run_one_launch(lambda *a: launch(x, *a), M, N, split, grid[1], grid[0], x, lora_B, R)
    return bind_split(launch, M, N, split, lora_B, R, scaling, bias, dtype, device)
