"""``y = x·Ŵᵀ + s·(x·Aᵀ)·Bᵀ + b`` for a few rows of ``x`` and an int1 ``Ŵ``, by table lookup.

A 1-bit matmul decoded weight by weight spends several instructions per weight, which limits it
well below the memory bandwidth (``bench/results/NOTES.md``). With one row of ``x``, a field of
``BITS`` sign bits (a nibble or a byte) has only ``2^BITS`` possible dot products with its inputs.
Each program takes ``CHUNK_K`` inputs and tabulates all ``2^BITS`` sums of ``±x`` for each group
of ``BITS`` inputs. It then reads one table entry per field of weights: one lookup and one add per
4 or 8 weights. Each table is built from two halves (``lut[b] = lo[low half of b] + hi[high
half]``), and ``tl.gather`` reads it. On an H100 with Triton 3.6 the gather is warp-local
(shuffles), and the 16-entry nibble tables measured about twice as fast as the byte tables.

Programs split K (``CHUNK_K`` each), N (``BLOCK_N`` rows each) and M (``ROWS`` rows of ``x``
each: the weights are loaded and split into fields once, and each row builds its own tables and
does its own lookups, so the work grows with the rows while the weight stream does not). Partial
sums meet through fp32 atomics in a zeroed workspace. The per-row ``α`` (or onebit ``h``)
multiplies each partial sum. Onebit ``g`` is folded into the table, and per-group scales multiply
each field's entry (``group_size`` must be a multiple of 8). The programs of the first block of
outputs also store their chunk's share of ``x·Aᵀ``; ``splitk_finish.finish`` adds the LoRA path
and the bias and casts, in the second and last launch of a call. In the one-launch mode the first
program of each chunk to claim it stores the share, and the last program of each output block to
arrive finishes it (``splitk_finish._finish_if_last``).
"""

import triton
import triton.language as tl

from .autotune import LUT
from .decode import interpreter_upcast, lora_and_bias_args, weight_args
from .host_math import block_r, cdiv, next_pow2
from .fast_launch import fast
from .splitk_finish import XA_BLOCK_K, _claim_share, _finish_if_last, _store_xa_part, bind_split, one_launch_offered, run_one_launch
from .device_guard import on_input_device
from .triton_support import gather_problem


@triton.jit
def _int1_gemv_lut_kernel(
    x_ptr, packed_ptr, scale_ptr, col_ptr, a_ptr, parts_ptr, ws_ptr,
    y_ptr, b_ptr, bias_ptr, cnt_ptr,  # the one-launch finish's (placeholders without ONE_LAUNCH)
    M, N, K, KW, G, group_size, R, stride_xm, stride_ar, s, stride_bn, stride_ym,
    SCALE: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_K: tl.constexpr, BITS: tl.constexpr,
    ONE_LAUNCH: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    ENTRIES: tl.constexpr = 1 << BITS  # table entries per group: 256 (bytes) or 16 (nibbles)
    GROUPS: tl.constexpr = CHUNK_K // BITS
    PER_WORD: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = BITS // 2
    HALF_ENTRIES: tl.constexpr = 1 << HALF
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    k0 = pid_k * CHUNK_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

    # the weights, transposed to [group, row] so that each thread sums whole rows of lookups in
    # registers: [CHUNK_K / 32, BLOCK_N] words, loaded once for all the rows of x this program
    # takes. Everything larger (the fields, the scales, B) is made or loaded again for each row,
    # from registers or L1: held across rows, it would not fit in the registers.
    offs_w = k0 // 32 + tl.arange(0, CHUNK_K // 32)
    words = tl.load(packed_ptr + offs_n[None, :] * KW + offs_w[:, None],
                    mask=(offs_n[None, :] < N) & (offs_w[:, None] < KW), other=0)
    if ONE_LAUNCH:  # whichever program of this slice claims first stores its share of x·Aᵀ
        claimed = _claim_share(cnt_ptr, pid_k, pid_m, tl.num_programs(0), tl.num_programs(2), tl.num_programs(1),
                               HAS_LORA)
        stores_share = claimed == 0
    else:
        stores_share = pid_n == 0
    # the table's inputs: for each group of BITS inputs, two halves of BITS/2
    offs_k = k0 + tl.arange(0, GROUPS)[:, None] * BITS + tl.arange(0, HALF)[None, :]  # [GROUPS, HALF]
    pat = tl.arange(0, HALF_ENTRIES)
    sign = tl.where(((pat[:, None] >> tl.arange(0, HALF)[None, :]) & 1) != 0, 1.0, -1.0)  # [2^HALF, HALF]

    for i in tl.static_range(ROWS):
        m = pid_m * ROWS + i
        live = m < M
        # the table: for each group and each pattern b, Σ_i (bit i of b ? +x : −x), built from two
        # halves (a byte's entry is lo[b & 15] + hi[b >> 4])
        x_lo = tl.load(x_ptr + m * stride_xm + offs_k, mask=(offs_k < K) & live, other=0.0).to(tl.float32)
        x_hi = tl.load(x_ptr + m * stride_xm + offs_k + HALF, mask=(offs_k + HALF < K) & live, other=0.0).to(tl.float32)
        if SCALE == 2:  # onebit: Ŵ = diag(h)·sign·diag(g); g goes into the table
            x_lo = x_lo * tl.load(col_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            x_hi = x_hi * tl.load(col_ptr + offs_k + HALF, mask=offs_k + HALF < K, other=0.0).to(tl.float32)
        lo = tl.sum(x_lo[:, None, :] * sign[None, :, :], axis=2)  # [GROUPS, 2^HALF]
        hi = tl.sum(x_hi[:, None, :] * sign[None, :, :], axis=2)
        lut = tl.reshape(hi[:, :, None] + lo[:, None, :], (GROUPS, ENTRIES))  # pattern = hi·2^HALF + lo
        # field j of word w is group PER_WORD·w + j
        field = (words[:, None, :] >> (tl.arange(0, PER_WORD) * BITS)[None, :, None]) & (ENTRIES - 1)
        field = tl.reshape(field, (GROUPS, BLOCK_N))
        part = tl.gather(lut, field, 1)  # [GROUPS, BLOCK_N]: lut[g, field[g, n]]
        if SCALE == 1:  # per group: one scale per field (group_size is a multiple of 8)
            gk = (k0 + tl.arange(0, GROUPS) * BITS) // group_size
            part = part * tl.load(scale_ptr + offs_n[None, :] * G + gk[:, None],
                                  mask=(offs_n[None, :] < N) & (gk[:, None] < G), other=0.0).to(tl.float32)
        acc = tl.sum(part, axis=0)  # [BLOCK_N]
        if SCALE != 1:  # per-row α (or onebit h)
            acc = acc * tl.load(scale_ptr + offs_n * G, mask=offs_n < N, other=0.0).to(tl.float32)
        tl.atomic_add(ws_ptr + m * N + offs_n, acc, mask=(offs_n < N) & live)
    if HAS_LORA and stores_share:  # this chunk's share of x·Aᵀ, for the finish
        _store_xa_part(x_ptr, a_ptr, parts_ptr, pid_m * ROWS, M, k0, tl.minimum(K, k0 + CHUNK_K), R, pid_k,
                       stride_xm, stride_ar, ROWS, BLOCK_R, XA_BLOCK_K, False, UPCAST)
    if ONE_LAUNCH:  # the last program of this tile to arrive adds the LoRA path and the bias
        _finish_if_last(ws_ptr, y_ptr, parts_ptr, b_ptr, bias_ptr, cnt_ptr, offs_n, pid_n, pid_k, pid_m, claimed,
                        tl.num_programs(0), tl.num_programs(2), M, N, R, tl.num_programs(1), s, stride_bn,
                        stride_ym, HAS_LORA, HAS_BIAS, ROWS, BLOCK_R, BLOCK_S)


def lut_supported(meta) -> bool:
    """Whether the lookup kernel handles this int1 weight (per-group scales need groups of 8k)."""
    group = meta.get("group_size")
    return meta.get("scale_mode") == "onebit" or not group or group % 8 == 0


@on_input_device
def int1_gemv_lut(x, tensors, meta, lora_A=None, lora_B=None, scaling: float = 1.0, bias=None, rows: int = 1,
                  block_n: int = 512, chunk_k: int = 256, bits: int = 8, num_warps: int = 4, num_stages: int = 1,
                  one_launch=None):
    """Launch the lookup GEMV for ``x [M, K]`` (meant for ``M`` of 1 to 4); returns ``y [M, N]``
    in ``x.dtype``. Each program covers ``rows`` rows of ``x`` (the weights are read once for
    them; each row builds its own tables), ``block_n`` outputs and ``chunk_k`` inputs; ``bits``
    is 8 (a table entry per byte of weights) or 4 (per nibble: smaller tables, twice the
    lookups). ``one_launch``: finish in the same launch (None: ``LORAQ_ONE_LAUNCH=1``)."""
    if x.dim() != 2 or x.shape[1] != meta["K"]:
        raise ValueError(f"x must be [M, {meta['K']}], got {tuple(x.shape)}")
    if not lut_supported(meta):
        raise ValueError(f"int1_gemv_lut needs a group size that is a multiple of 8, got {meta.get('group_size')}")
    cfg = (rows, block_n, chunk_k, bits, num_warps, num_stages, LUT)
    check_lut_config(cfg)
    x = x.contiguous()
    ptrs, ints, mode = weight_args("int1", tensors, meta)
    A, B, bias = lora_and_bias_args(x, lora_A, lora_B, bias)
    return launch_lut(x, ptrs, ints, mode, meta["N"], A, B, scaling, bias, cfg, one_launch)


def check_lut_config(cfg) -> None:
    """Raise ValueError unless ``cfg`` is a config the lookup kernel computes correctly:
    ``(rows, block_n, chunk_k, bits, num_warps, num_stages, LUT)``."""
    rows, block_n, chunk_k, bits, num_warps, num_stages, variant = cfg
    if variant != LUT:
        raise ValueError(f"config {cfg} is not a lookup GEMV config (its last field must be {LUT})")
    if rows < 1:
        raise ValueError(f"rows must be ≥ 1, got {rows}")
    if block_n < 1 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two, got {block_n}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if chunk_k % 32 or chunk_k & (chunk_k - 1):
        raise ValueError(f"chunk_k must be a power of two and a multiple of 32, got {chunk_k}")
    if gather_problem():
        raise ValueError(f"config {cfg} cannot run here: {gather_problem()}")


def launch_lut(x, ptrs, ints, mode, N, lora_A, lora_B, scaling, bias, cfg, one_launch=None):
    """The launch on arguments already prepared (``weight_args``'s; ``lora_A``, ``lora_B`` in
    ``x``'s dtype, or None without LoRA) and checked; ``cfg`` is an ``autotune.lut_configs``
    entry (``lora_linear_fwd`` binds it, :func:`bind_lut`, so that a plan prepares it once).
    Two launches: the lookups, then ``splitk_finish.finish``; or one, where the last program of
    each output tile finishes it (``one_launch``; None: ``splitk_finish.one_launch_offered()``).
    Returns ``y [M, N]`` in x's dtype."""
    x = x.contiguous()  # the bound launch steps K elements a row
    return bind_lut(x.shape, x.dtype, x.device, ptrs, ints, mode, N, lora_A, lora_B, scaling, bias, cfg,
                    one_launch)(x)


def bind_lut(shape, dtype, device, ptrs, ints, mode, N, lora_A, lora_B, scaling, bias, cfg, one_launch=None):
    """:func:`launch_lut` for every contiguous ``x`` of ``shape`` ``[M, K]``, ``dtype`` and
    ``device``, its grid and arguments worked out once: ``run(x) -> y`` (the tensors read at each
    call)."""
    rows, block_n, chunk_k, bits, num_warps, num_stages, _ = cfg
    (packed, scale, col), (KW, G, group, _) = ptrs, ints
    M, K = shape
    has_lora = lora_A is not None
    R = lora_A.shape[0] if has_lora else 1
    grid = (cdiv(N, block_n), cdiv(K, chunk_k), cdiv(M, rows))
    one = one_launch_offered() if one_launch is None else one_launch
    # x is contiguous: its rows K apart (one row: never stepped over). The finish's scalars 0
    # without it: no extra specializations of the two-launch kernel
    scalars = (M, N, K, KW, G, group, R, K, lora_A.stride(0) if has_lora else K, float(scaling) if one else 0.0,
               lora_B.stride(0) if has_lora and one else 0)
    meta = dict(SCALE=mode, HAS_LORA=has_lora, BLOCK_R=block_r(R), UPCAST=interpreter_upcast(dtype), ROWS=rows,
                BLOCK_N=block_n, CHUNK_K=chunk_k, BITS=bits, ONE_LAUNCH=one, HAS_BIAS=bias is not None and one,
                BLOCK_S=min(16, next_pow2(grid[1])) if one else 1, num_warps=num_warps, num_stages=num_stages)
    launcher = fast(_int1_gemv_lut_kernel)

    def launch(x, ws, parts, y=None, counters=None):
        launcher.launch(grid, (
            x, packed, scale, col, lora_A if has_lora else x, parts if has_lora else ws, ws,
            ws if y is None else y, lora_B if has_lora and one else ws, bias if bias is not None and one else ws,
            ws if counters is None else counters, *scalars, 0 if y is None else N), meta)

    if one:
        return lambda x: run_one_launch(lambda *a: launch(x, *a), M, N, grid[1], grid[0], grid[2], x, lora_B, R)
    return bind_split(launch, M, N, grid[1], lora_B, R, scaling, bias, dtype, device)
