"""``dX = dY·Ŵ + s·(dY·B)·A``: the input gradient of the layer, the packed weight read transposed.

Each program owns a ``[BLOCK_M, BLOCK_K]`` tile of ``dX`` and walks N, decoding the
``[BLOCK_N, BLOCK_K]`` tile of ``Ŵ`` it needs (the same decoders as the forward) and feeding it
to ``tl.dot``; the epilogue adds the LoRA term from ``dY·B`` (``[M, r]``, computed by the caller,
which needs it for ``dA`` too). For up to 16 rows of sparse4x4 the autotuner also times the
gathering GEMV (``sparse4x4_gemv_dx.py``), for more than 32 rows of any format decoding column
slabs of ``Ŵ`` for cuBLAS (``dense_slab.py``), and for up to 256 rows of int1 in fp16 and bf16
this kernel with ``Ŵᵀ`` decoded two rows at a time (``DOT_PAIRS``, ``decode._int1_sign_pairs_t``).
"""

from typing import Tuple

import torch
import triton
import triton.language as tl

from .autotune import (DENSE_SLAB, DENSE_SLAB_MIN_M, DOT, DOT_PAIRS, DOT_SWAP, GATHER, GATHER_MAX_M, SLAB_MERGE,
                       dense_slab_cap_mib, dense_slab_configs, gather_configs, pairs_configs, pick_config)
from .dense_slab import check_slab_config, slab_widths, slab_dx
from .decode import (_dot, _int1_group_scale, _int1_sign_pairs_t, _int1_signs, _int1_words_t, _pair_scales_t,
                     _sparse4x4_tile, decode_dtype, interpreter_upcast, output_buffer, split_plan, use_asm,
                     weight_args)
from .sparse4x4_gemv import check_gather_config
from .sparse4x4_gemv_dx import DX_LIMITS, bind_gather_dx
from .host_math import block_r, cdiv, in_row_chunks, rows_per_launch
from .autotune import capturing as autotune_capturing, rows_from
from .bound_plan import BoundPlan
from .fast_launch import fast
from .device_guard import on_input_device


@triton.jit
def _dy_tile(dy_ptr, offs_m, offs_n, M, n_end, stride_dym):
    """``dY[offs_m, offs_n]`` (0 past ``M`` and past the split's ``n_end``)."""
    return tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :],
                   mask=(offs_m[:, None] < M) & (offs_n[None, :] < n_end), other=0.0)


@triton.jit
def _row_scale(scale_ptr, offs_n, n_end, stride, SCALE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The pair decode's per-row scale ``[BLOCK_N]``: α (or onebit's ``h``) of rows ``offs_n`` in
    its stored dtype, 0 past ``n_end``; ones in the per-group mode, whose scale multiplies
    afterwards. Kept in the stored dtype across the loop (``PREFETCH``): converted to fp32 and back
    in one iteration, ptxas drops the two conversions; carried as fp32, it keeps them."""
    if SCALE == 1:  # one return at the end: Triton's compiler refuses a return inside an if
        scale = tl.full((BLOCK_N,), 1.0, tl.float32)
    else:
        scale = tl.load(scale_ptr + offs_n * stride, mask=offs_n < n_end, other=0.0)
    return scale


@triton.jit
def _lora_linear_dx_kernel(
    dy_ptr, w0_ptr, w1_ptr, w2_ptr, dyb_ptr, a_ptr, dx_ptr,
    M, N, K, N_PER_SPLIT, s,
    W_A, W_B, W_C, W_D,
    stride_dym, stride_dxm, stride_bm, stride_ar,
    R,
    FORMAT: tl.constexpr, SCALE: tl.constexpr, HAS_LORA: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, WDT: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr,
    SWAP: tl.constexpr, PAIRS: tl.constexpr, PREFETCH: tl.constexpr, ASM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)  # split of the N reduction; fp32 atomics join the partial sums
    k0 = pid_k * BLOCK_K
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    # SWAP computes dXᵀ = Ŵᵀ·dYᵀ, the decoded tile as the dot's first (register) operand
    if SWAP:
        acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    n_start = pid_s * N_PER_SPLIT
    n_end = tl.minimum(N, (pid_s + 1) * N_PER_SPLIT)
    if PREFETCH:  # (PAIRS) the first tile's dY, words and scales, loaded ahead as every later tile's is
        g_next = _dy_tile(dy_ptr, offs_m, n_start + tl.arange(0, BLOCK_N), M, n_end, stride_dym)
        words_next = _int1_words_t(w0_ptr, n_start + tl.arange(0, BLOCK_N), k0, n_end, W_A, BLOCK_K)
        alpha_next = _row_scale(w1_ptr, n_start + tl.arange(0, BLOCK_N), n_end, W_B, SCALE, BLOCK_N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if PREFETCH:  # Triton's pipeliner is off (it serializes the register-operand wgmma): the
            # next tile's loads are issued here, and run during this tile's decode and dot
            g, words, alpha = g_next, words_next, alpha_next
            g_next = _dy_tile(dy_ptr, offs_m, offs_n + BLOCK_N, M, n_end, stride_dym)
            words_next = _int1_words_t(w0_ptr, offs_n + BLOCK_N, k0, n_end, W_A, BLOCK_K)
            alpha_next = _row_scale(w1_ptr, offs_n + BLOCK_N, n_end, W_B, SCALE, BLOCK_N)
        else:
            g = _dy_tile(dy_ptr, offs_m, offs_n, M, n_end, stride_dym)
            if PAIRS:
                words = _int1_words_t(w0_ptr, offs_n, k0, n_end, W_A, BLOCK_K)
                alpha = _row_scale(w1_ptr, offs_n, n_end, W_B, SCALE, BLOCK_N)
        if PAIRS:  # int1, swapped: Ŵᵀ decoded two rows at a time, α or h in the decode (_int1_sign_pairs_t)
            a2, a_lo, a_hi = _pair_scales_t(alpha, WDT, BLOCK_N)
            wt = _int1_sign_pairs_t(words, a2, a_lo, a_hi, WDT, BLOCK_N, BLOCK_K)
            if SCALE == 1:
                wt = wt * tl.trans(_int1_group_scale(w1_ptr, offs_n, offs_k, n_end, K, W_B, W_C)).to(wt.dtype)
            w = tl.trans(wt)
        elif FORMAT == 0:
            w = _int1_signs(w0_ptr, offs_n, k0, N, W_A, WDT, BLOCK_N, BLOCK_K, ASM)
            if SCALE == 1:  # per group
                w = w * _int1_group_scale(w1_ptr, offs_n, offs_k, n_end, K, W_B, W_C).to(w.dtype)
            else:  # per-row α or onebit h: a vector along N (onebit g goes in the epilogue)
                w = w * tl.load(w1_ptr + offs_n * W_B, mask=offs_n < n_end, other=0.0).to(w.dtype)[:, None]
        else:
            w = _sparse4x4_tile(w0_ptr, w1_ptr, n0, k0, n_end, K, W_A, W_B, BLOCK_N, BLOCK_K)
        w = w.to(g.dtype)  # Ŵ in the activation dtype, as the reference
        if SWAP:
            acc += _dot(tl.trans(w), tl.trans(g), IEEE, UPCAST)
        else:
            acc += _dot(g, w, IEEE, UPCAST)
    if SWAP:
        acc = tl.trans(acc)
    if FORMAT == 0 and SCALE == 2:  # onebit g: once per output column of dX
        acc = acc * tl.load(w2_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA and pid_s == 0:
        offs_r = tl.arange(0, BLOCK_R)
        dyb = tl.load(dyb_ptr + offs_m[:, None] * stride_bm + offs_r[None, :],
                      mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :],
                    mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), other=0.0)
        acc += s * _dot(dyb, a, IEEE, UPCAST)
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :]
    inside = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    if SPLIT_N == 1:
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=inside)
    else:
        tl.atomic_add(dx_ptrs, acc, mask=inside)


def dx_pipelining(config) -> Tuple[int, bool]:
    """``(num_stages, PREFETCH)`` that a tiled dX ``config`` launches with: its stages for Triton's
    pipeliner, except the pair decode's (``DOT_PAIRS``), which runs without it (it serializes the
    register-operand wgmma) and where stages 2 is the kernel's own prefetch of the next tile."""
    stages, variant = config[5], config[6]
    if variant == DOT_PAIRS:
        return 1, stages == 2
    return stages, False


@on_input_device
def lora_linear_dx(dy, fmt: str, tensors, meta, lora_A=None, dy_B=None, scaling: float = 1.0, config=None,
                   lora_B=None, check=None):
    """Launch ``dY·Ŵ (+ s·dy_B·A)`` for ``dy [M, N]`` (fp16/bf16/fp32) and ``dy_B [M, r]``; returns
    ``[M, K]`` in ``dy.dtype``. ``config`` forces a tile config (``autotune.Config``). ``lora_B``
    (``[N, r]``, the ``B`` of ``dy_B = dY·B``), when given, adds the merged dense slab
    ``dY·(Ŵ + s·B·A)`` to the large-batch candidates. ``check(dx) -> None or why``
    (``loraq.tuning_check.dx_check``) judges each candidate's output when the tuner times them."""
    M, N = dy.shape
    K = meta["K"]
    dy = dy.contiguous()
    if M == 0:
        return torch.empty(M, K, device=dy.device, dtype=dy.dtype)
    rows = rows_per_launch(M, max(K, N))
    if rows < M:  # offsets past 32 bits: a launch per block of rows
        return in_row_chunks(lambda i, j: lora_linear_dx(dy[i:j], fmt, tensors, meta, lora_A,
                                                         None if dy_B is None else dy_B[i:j], scaling, config,
                                                         lora_B, rows_from(check, i)),
                             M, rows, K, dy)
    dyb = None if lora_A is None else dy_B.to(dy.dtype).contiguous()
    bind, cfg, _ = _prepared_dx(dy, dyb, fmt, tensors, meta, lora_A, scaling, lora_B, config, check)
    return bind(cfg)(dy, dyb)


class DxPlan(BoundPlan):
    """:func:`lora_linear_dx` prepared once for every ``dy`` (and ``dy_B``) of one shape, dtype
    and device: calling it launches the config the tuner picked, on the weight, ``A`` and ``B``
    tensors it was made with (their values at the call), skipping the per-call work (arguments,
    cache lookup). ``current()``: whether the switches it was made under still hold."""

    __slots__ = ("_rank",)

    def __init__(self, run, cfg, dy, rank: int):
        super().__init__(run, cfg, dy)
        self._rank = rank  # r of the LoRA term's dy_B [M, r], 0 for a plan without it

    def __call__(self, dy, dy_B=None):
        self._check(dy, "dy")
        if (dy_B is not None) != bool(self._rank):
            raise ValueError("this plan was made " + ("with" if self._rank else "without") + " the LoRA term: "
                             + ("pass dy_B" if self._rank else "dy_B must be None"))
        if dy_B is not None and (dy_B.shape != (dy.shape[0], self._rank) or dy_B.dtype != dy.dtype
                                 or dy_B.device != dy.device):
            raise ValueError(f"dy_B must be [{dy.shape[0]}, {self._rank}] in dy's dtype on its device, got "
                             f"{tuple(dy_B.shape)}, {dy_B.dtype} on {dy_B.device}")
        return self._run(dy.contiguous(), None if dy_B is None else dy_B.contiguous())


@on_input_device
def dx_plan(dy, fmt: str, tensors, meta, lora_A=None, dy_B=None, scaling: float = 1.0, lora_B=None, check=None):
    """A :class:`DxPlan` of :func:`lora_linear_dx` for ``dy`` (and ``dy_B``) shaped like these
    (the same arguments), tuned first if the problem is new; None where a plan would not stay
    right: no rows, a batch split into launches, ``lora_A``/``lora_B`` that the launcher would
    cast or copy (a plan reads the caller's tensors at each call), a CUDA graph being captured."""
    M, N = dy.shape
    K = meta["K"]
    if M == 0 or rows_per_launch(M, max(K, N)) < M or autotune_capturing():
        return None
    dy = dy.contiguous()
    dyb = None if lora_A is None else dy_B.to(dy.dtype).contiguous()
    bind, cfg, (A, B) = _prepared_dx(dy, dyb, fmt, tensors, meta, lora_A, scaling, lora_B, None, check)
    if lora_A is not None and (A is not lora_A or (lora_B is not None and B is not lora_B)):
        return None
    return DxPlan(bind(cfg), cfg, dy, 0 if lora_A is None else lora_A.shape[0])


def _prepared_dx(dy, dyb, fmt, tensors, meta, lora_A, scaling, lora_B, config, check):
    """``(bind(cfg) -> run, the config, (A, B) as the kernels read them)`` for a contiguous
    ``dy [M, N]`` that one launch covers and ``dyb`` (``dY·B`` in dy's dtype, contiguous, or None
    without LoRA); tunes the config if it is new. ``run(dy, dyb) -> dx`` launches ``cfg`` for any
    contiguous ``dy`` and ``dyb`` of these shapes, dtypes and device."""
    M, N = dy.shape
    K = meta["K"]
    ptrs, ints, scale_mode = weight_args(fmt, tensors, meta)
    has_lora = lora_A is not None
    if has_lora:
        A = lora_A.to(dy.dtype).contiguous()
        R = A.shape[0]
    else:
        A = None
        R = 1
    B = lora_B.to(dy.dtype).contiguous() if has_lora and lora_B is not None else None

    gather = M <= GATHER_MAX_M and fmt == "sparse4x4"
    if config is not None:
        if config[6] == GATHER and fmt == "sparse4x4":
            check_gather_config(config, DX_LIMITS, variants=(GATHER,))
        elif config[6] == DENSE_SLAB:
            check_slab_config(config)
            if config[3] == SLAB_MERGE and has_lora and B is None:
                raise ValueError(f"config {config} merges s·B·A into the slab: pass lora_B")
        elif config[6] == DOT_PAIRS and fmt != "int1":
            raise ValueError(f"config {config} decodes int1 signs in pair order: it takes an int1 weight, got {fmt}")
        elif config[6] not in (DOT, DOT_SWAP, DOT_PAIRS):
            raise ValueError(f"config {config}: dX takes tiled configs (variant DOT, DOT_SWAP or for int1 DOT_PAIRS), "
                             f"dense-slab configs (DENSE_SLAB), or for sparse4x4 the gathering GEMV's (GATHER)")

    def bind(cfg):  # run(dy, dyb) for this call's dy and every dy like it (a plan keeps it)
        if cfg[6] == GATHER:  # small batches of sparse4x4, on the arguments prepared above
            gather_run = bind_gather_dx(dy.shape, ptrs, ints, K, A, R, scaling, cfg)
            return lambda dy, dyb: gather_run(dy, dyb).to(dy.dtype)
        if cfg[6] == DENSE_SLAB:  # large batches: decoded column slabs through cuBLAS
            return lambda dy, dyb: slab_dx(dy, fmt, ptrs, ints, scale_mode, K, A, dyb, scaling, cfg, B)
        bm, bk, bn, split, warps, stages, swap = cfg
        pipelining = dx_pipelining(cfg)
        split, n_per_split = split_plan(N, bn, split)
        grid = (cdiv(M, bm), cdiv(K, bk), split)
        scalars = (M, N, K, n_per_split, float(scaling), *ints)
        kw = dict(FORMAT=0 if fmt == "int1" else 1, SCALE=scale_mode, HAS_LORA=has_lora, IEEE=dy.dtype == torch.float32,
                  UPCAST=interpreter_upcast(dy.dtype), WDT=decode_dtype(dy.dtype), BLOCK_R=block_r(R),
                  BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn, SPLIT_N=split, SWAP=swap in (DOT_SWAP, DOT_PAIRS),
                  PAIRS=swap == DOT_PAIRS, PREFETCH=pipelining[1], ASM=use_asm(),
                  num_warps=warps, num_stages=pipelining[0])
        launcher = fast(_lora_linear_dx_kernel)

        def run(dy, dyb):
            dx = output_buffer(M, K, dy, split)
            # without LoRA, dy stands in for dyb and A (unused)
            dyb_arg, a_arg = (dyb, A) if has_lora else (dy, dy)
            launcher.launch(grid, (dy, *ptrs, dyb_arg, a_arg, dx, *scalars,
                                   dy.stride(0), dx.stride(0), dyb_arg.stride(0), a_arg.stride(0), R), kw)
            return dx if dx.dtype == dy.dtype else dx.to(dy.dtype)

        return run

    # tuned per format, scale mode and LoRA on/off: each compiles to a different kernel. Small
    # batches of sparse4x4 also time the gathering GEMV, under their own cache key.
    # with B the merged slab is a candidate: its own key, so that a call without B never gets it
    op = f"lora_linear_dx:{fmt}:{scale_mode}:{int(has_lora)}" + (":gather" if gather else "") + (
        ":B" if B is not None else "")
    if gather:
        extra = lambda: gather_configs(M)  # noqa: E731
    else:  # int1 in fp16 and bf16: the pair decode too; past 32 rows, the dense slabs (none before)
        def extra():  # built only when the answer is not cached (a hit is the per-call path)
            pairs = pairs_configs(M, "dx") if fmt == "int1" and dy.dtype in (torch.float16, torch.bfloat16) else []
            return pairs + dense_slab_configs(M, K, slab_widths(N, R if has_lora else 0, merge=B is not None),
                                              dy.element_size())
    # what else the candidates depend on: the slabs' widths and size cap (past 32 rows)
    variant = (R if has_lora else 0, dense_slab_cap_mib()) if M >= DENSE_SLAB_MIN_M and not gather else ()
    cfg = config or pick_config(op, M, N, K, dy.dtype, dy.device, lambda cfg: bind(cfg)(dy, dyb), extra=extra,
                                variant=variant, check=check)
    return bind, cfg, (A, B)
