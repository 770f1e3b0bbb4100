"""``dX = dY·Ŵ + s·(dY·B)·A`` for a few rows of ``dY`` and a sparse4x4 ``Ŵ``, by gathering.

The transpose of ``sparse4x4_gemv.py``: a stored value ``v`` at tile ``(tn, tk)`` and position
``p`` has one product, ``dX[m, 4·tk + p % 4] += v · dY[m, 4·tn + p // 4]``. Each program owns
``BLOCK_K`` columns of ``dX`` and a slice of N; it loads a block of values and their positions,
gathers the one ``dY`` element each value needs, and multiply-adds it into one of four
accumulators (the value's column inside its tile), summed over N only at the end. Values and
positions are addressed per row of ``dY`` so that every load shares one register layout (see
``sparse4x4_gemv.py``).

Programs split K (``BLOCK_K`` columns, a multiple of 4), N (``N_PER_SPLIT`` each, walked
``BLOCK_N`` at a time) and M (``ROWS`` rows of ``dY``); split partial sums meet through fp32
atomics. The LoRA term is added by the programs of the first N slice.
"""

import triton
import triton.language as tl

from .autotune import GATHER
from .decode import output_buffer, split_plan, weight_args
from .sparse4x4_gemv import _add_by_slot, _sum_slots, check_gather_config
from .host_math import cdiv, block_r
from .fast_launch import fast
from .device_guard import on_input_device


# (name, least value) of a config's first three fields for dX: whole tiles either way; the
# nibble of each value is picked by its absolute tile column, so any block of columns works
DX_LIMITS = (("rows", 1), ("block_k", 4), ("block_n", 4))


@triton.jit
def _gather_dx_step(dy_rows, values_ptr, pos_ptr, v_off, p_off, shift, rel_n, n0, n_end, TK, PW,
                    acc0, acc1, acc2, acc3, MASKED: tl.constexpr):
    """Add one ``[TN_B, TK_B]`` block of stored values (tile rows from ``n0 / 4``) times the
    ``dY`` elements they select to the four accumulators ``[ROWS, TN_B, TK_B]`` (one per column
    inside a tile). The per-element offsets (``v_off``, ``p_off``, ``shift``, ``rel_n``) are the
    caller's, made once: each step adds only the scalar start of its block. ``MASKED`` only for
    the slice's last block: before it every tile row lies inside N."""
    tn0 = n0 // 4
    v_ptrs = values_ptr + tn0 * TK + v_off
    p_ptrs = pos_ptr + tn0 * PW + p_off
    if MASKED:
        inside = n0 + rel_n < n_end  # the tile row's first row
        vals = tl.load(v_ptrs, mask=inside, other=0.0)
        byte = tl.load(p_ptrs, mask=inside, other=0)
    else:
        vals = tl.load(v_ptrs)
        byte = tl.load(p_ptrs)
    vals = vals.to(tl.float32)
    nib = (byte.to(tl.int32) >> shift) & 15
    col = nib & 3  # the column (inside the tile) it adds to
    row = rel_n + (nib >> 2)  # the element of dY it multiplies, from n0
    if MASKED:  # a position inside the padding must not read past the row of dY
        dyv = tl.load(dy_rows + n0 + row, mask=inside & (n0 + row < n_end), other=0.0)
    else:
        dyv = tl.load(dy_rows + n0 + row)
    return _add_by_slot(col, vals, dyv.to(tl.float32), acc0, acc1, acc2, acc3)


@triton.jit
def _sparse4x4_gemv_dx_kernel(
    dy_ptr, values_ptr, pos_ptr, dyb_ptr, a_ptr, dx_ptr,
    M, N, K, TK, PW, s, R, N_PER_SPLIT,
    stride_dym, stride_dxm, stride_bm, stride_ar,
    HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr,
):
    TK_B: tl.constexpr = BLOCK_K // 4  # tile columns per program
    TN_B: tl.constexpr = BLOCK_N // 4  # tile rows per step
    pid_m = tl.program_id(0)  # fastest: the programs that read the same weights run together
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = tl.arange(0, ROWS)
    offs_m = pid_m * ROWS + rows
    # tile columns past K and rows of dY past M are clamped: in-bounds loads, results not stored.
    # (The clamp hides the values' contiguity, so their loads are not vectorized; masks instead
    # keep Triton from loading and decoding a value once for all rows of dY: more instructions.)
    tk = tl.minimum(pid_k * TK_B + tl.arange(0, TK_B), TK - 1)
    dy_rows = dy_ptr + tl.minimum(offs_m, M - 1)[:, None, None] * stride_dym
    acc0 = tl.zeros((ROWS, TN_B, TK_B), dtype=tl.float32)
    acc1 = tl.zeros((ROWS, TN_B, TK_B), dtype=tl.float32)
    acc2 = tl.zeros((ROWS, TN_B, TK_B), dtype=tl.float32)
    acc3 = tl.zeros((ROWS, TN_B, TK_B), dtype=tl.float32)
    n_start = pid_s * N_PER_SPLIT  # a multiple of BLOCK_N (decode.split_plan)
    n_end = tl.minimum(N, n_start + N_PER_SPLIT)
    # whole blocks of whole tile rows first, unmasked; then the slice's last, partial block
    n_full = n_start + (((n_end // 4) * 4 - n_start) // BLOCK_N) * BLOCK_N
    # per-element offsets from a block's start, [ROWS, TN_B, TK_B]: the same for every row of dY
    # (so that values, positions and dY elements share one register layout; sparse4x4_gemv.py)
    t_row = tl.arange(0, TN_B)[None, :, None] + rows[:, None, None] * 0  # tile row inside the block
    v_off = t_row * TK + tk[None, None, :]
    p_off = t_row * PW + tk[None, None, :] // 2
    shift = (tk[None, None, :] & 1) * 4  # low nibble: even tile column
    rel_n = t_row * 4
    for n0 in range(n_start, n_full, BLOCK_N):
        acc0, acc1, acc2, acc3 = _gather_dx_step(dy_rows, values_ptr, pos_ptr, v_off, p_off, shift, rel_n,
                                                 tl.multiple_of(n0, BLOCK_N), n_end, TK, PW, acc0, acc1, acc2, acc3,
                                                 False)
    if n_full < n_end:
        acc0, acc1, acc2, acc3 = _gather_dx_step(dy_rows, values_ptr, pos_ptr, v_off, p_off, shift, rel_n, n_full,
                                                 n_end, TK, PW, acc0, acc1, acc2, acc3, True)
    dx = tl.reshape(_sum_slots(acc0, acc1, acc2, acc3, 1), (ROWS, BLOCK_K))  # column 4·tk + c
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    if HAS_LORA and pid_s == 0:
        offs_r = tl.arange(0, BLOCK_R)
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :],
                    mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_K]
        for i in tl.static_range(ROWS):
            dyb = tl.load(dyb_ptr + (pid_m * ROWS + i) * stride_bm + offs_r,
                          mask=(offs_r < R) & (pid_m * ROWS + i < M), other=0.0).to(tl.float32)
            dx += tl.where(rows[:, None] == i, (s * tl.sum(a * dyb[:, None], axis=0))[None, :], 0.0)
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :]
    inside = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    if SPLIT_N == 1:
        tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=inside)
    else:
        tl.atomic_add(dx_ptrs, dx, mask=inside)


@on_input_device
def sparse4x4_gemv_dx(dy, tensors, meta, lora_A=None, dy_B=None, scaling: float = 1.0, rows: int = 1,
                      block_k: int = 128, block_n: int = 256, split: int = 4, num_warps: int = 4, num_stages: int = 2):
    """Launch the gathering ``dX`` for ``dy [M, N]`` (meant for small ``M``) and a sparse4x4 weight
    (``tensors``/``meta`` as in ``decode.weight_args``), with ``dy_B = dY·B`` ``[M, r]`` and
    ``lora_A`` ``[r, K]`` for the LoRA term (both None: ``dY·Ŵ``); returns ``[M, K]`` in
    ``dy.dtype``. Each program covers ``rows`` rows of ``dY``, ``block_k`` columns of ``dX`` and a
    ``1/split`` slice of N, walked ``block_n`` rows of ``Ŵ`` at a time."""
    if dy.dim() != 2 or dy.shape[1] != meta["N"]:
        raise ValueError(f"dy must be [M, {meta['N']}], got {tuple(dy.shape)}")
    cfg = (rows, block_k, block_n, split, num_warps, num_stages, GATHER)
    check_gather_config(cfg, DX_LIMITS, variants=(GATHER,))
    dy = dy.contiguous()
    ptrs, ints, _ = weight_args("sparse4x4", tensors, meta)
    if lora_A is not None:
        A = lora_A.to(dy.dtype).contiguous()
        dyb = dy_B.to(dy.dtype).contiguous()
        R = A.shape[0]
    else:
        A = dyb = None
        R = 1
    return launch_gather_dx(dy, ptrs, ints, meta["K"], A, dyb, R, scaling, cfg).to(dy.dtype)


def launch_gather_dx(dy, ptrs, ints, K, A, dyb, R, scaling, cfg):
    """The launch on arguments already prepared (``weight_args``'s; ``A`` and ``dyb`` in ``dy``'s
    dtype, or None without LoRA); ``cfg`` is an ``autotune.gather_configs`` entry read as
    (rows, BLOCK_K, BLOCK_N, split, ...). Returns the output buffer (fp32 when N is split)."""
    return bind_gather_dx(dy.shape, ptrs, ints, K, A, R, scaling, cfg)(dy, dyb)


def bind_gather_dx(shape, ptrs, ints, K, A, R, scaling, cfg):
    """:func:`launch_gather_dx` worked out once for ``dy`` of ``shape [M, N]``: returns
    ``run(dy, dyb)`` (``dyb`` None without LoRA), which launches on each call's ``dy`` and ``dyb``
    (their row strides read at each call)."""
    rows, block_k, block_n, split, num_warps, num_stages, _ = cfg
    (values, positions, _), (TK, PW, _, _) = ptrs, ints
    M, N = shape
    has_lora = A is not None
    split, n_per_split = split_plan(N, block_n, split)
    grid = (cdiv(M, rows), cdiv(K, block_k), split)
    scalars = (M, N, K, TK, PW, float(scaling), R, n_per_split)
    meta = dict(HAS_LORA=has_lora, BLOCK_R=block_r(R), ROWS=rows, BLOCK_K=block_k, BLOCK_N=block_n, SPLIT_N=split,
                num_warps=num_warps, num_stages=num_stages)
    launcher = fast(_sparse4x4_gemv_dx_kernel)

    def run(dy, dyb):
        dx = output_buffer(M, K, dy, split)
        # without LoRA, dy stands in for dyb and A (unused)
        a_arg, dyb_arg = (A, dyb) if has_lora else (dy, dy)
        launcher.launch(grid, (dy, values, positions, dyb_arg, a_arg, dx, *scalars,
                               dy.stride(0), dx.stride(0), dyb_arg.stride(0), a_arg.stride(0)), meta)
        return dx

    return run
