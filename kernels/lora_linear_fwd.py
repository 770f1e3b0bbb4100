"""``y = x·Ŵᵀ + s·(x·Aᵀ)·Bᵀ + b`` in one pass over the packed weight (int1 or sparse4x4).

Each program owns a ``[BLOCK_M, BLOCK_N]`` tile of ``y``: it walks K, decodes the matching
``[BLOCK_N, BLOCK_K]`` tile of ``Ŵ`` in registers (no dense ``Ŵ`` in memory) and feeds it to
``tl.dot``; the epilogue adds the LoRA path from ``xa = x·Aᵀ`` (``[M, r]``, computed once
beforehand: it is tiny) and the bias. Small batches use ``BLOCK_M = 16`` tiles and split K:
the programs add their partial sums into a zeroed fp32 workspace, those of the first output tile
also store their slice's share of ``x·Aᵀ``, and ``splitk_finish.finish`` adds the LoRA path and
the bias and casts (two launches a call, ``splitk_finish.py``).

Batches of more than 32 rows also time decoding ``Ŵ`` a slab at a time into a dense buffer
for cuBLAS, the LoRA path and bias in cuBLAS too (``dense_slab.py``), and take it when it is faster.
Small batches also time a GEMV that never decodes a tile, and take it when it is faster: the
table lookup for up to 4 rows of int1 (``int1_gemv_lut.py``), and the gather for up to 16 rows
of sparse4x4 (``sparse4x4_gemv.py``); where the extension ``loraq._C`` is built (and
``LORAQ_CUDA_GEMV`` is not ``0``), also the CUDA GEMVs for up to 16 rows (``int1_gemv_mma.py``,
``sparse4x4_gemv_cuda.py``). int1 in fp16 and bf16 also times, up to 256 rows, this kernel
with its signs decoded two at a time in pair order (``DOT_PAIRS``, ``decode._int1_sign_pairs``).
"""

import torch
import triton
import triton.language as tl

from .autotune import (CUDA_GATHER, CUDA_LUT, CUDA_LUT8, DENSE_SLAB, DENSE_SLAB_MIN_M, DOT, DOT_PAIRS, DOT_SWAP, GATHER_FWD, GATHER_MAX_M, LUT,
                       LUT_MAX_M, MMA_GEMV, SPARSE_MMA, dense_slab_cap_mib, dense_slab_configs, gather_fwd_configs,
                       lut_configs, pairs_configs, pick_config)
from .cuda_ext import cuda_gemv_offered
from .dense_slab import check_slab_config, slab_widths, slab_forward
from .int1_gemv_lut import bind_lut, check_lut_config, lut_supported
from .int1_gemv_mma import (MMA_MAX_M, bind_mma, check_mma_config, cuda_lut8_configs, cuda_lut8_status,
                           cuda_lut_configs, mma_gemv_configs, mma_gemv_status)
from .sparse4x4_gemv import bind_gather, check_gather_config
from .sparse4x4_gemv_cuda import (SPARSE_CUDA_MAX_M, bind_sparse_cuda, check_sparse_cuda_config, sparse_cuda_configs,
                                  sparse_cuda_status)
from .decode import (SCALE_GROUP, _dot, _int1_group_scale, _int1_sign_pairs, _int1_signs, _pair_order, _sparse4x4_tile,
                     decode_dtype, interpreter_upcast, lora_and_bias_args, lora_prologue, output_buffer, pair_ones,
                     split_plan, use_asm, weight_args)
from .splitk_finish import XA_BLOCK_K, _store_xa_part, bind_split, one_launch_offered
from .host_math import block_r, cdiv, in_row_chunks, rows_per_launch
from .autotune import capturing as autotune_capturing, rows_from
from .bound_plan import BoundPlan
from .fast_launch import fast
from .device_guard import on_input_device
from .triton_support import gather_problem

INT1, SPARSE4X4 = 0, 1


@triton.jit
def _lora_linear_fwd_kernel(
    x_ptr, w0_ptr, w1_ptr, w2_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr, a_ptr, parts_ptr,
    M, N, K, s, K_PER_SPLIT,
    W_A, W_B, W_C, W_D,  # format integers: int1 (KW, G, group_size, -), sparse4x4 (TK, PW, -, -)
    stride_xm, stride_ym, stride_am, stride_bn, stride_ar,
    R, ONE2,
    FORMAT: tl.constexpr, SCALE: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, WDT: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    SWAP: tl.constexpr, PAIRS: tl.constexpr, GROUP32: tl.constexpr, ASM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)  # split-K: each program sums one K slice into the fp32 workspace y
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # SWAP computes yᵀ = Ŵ·xᵀ: the decoded tile is then the dot's first operand, which Hopper's
    # tensor cores (wgmma) read straight from registers; unswapped, it goes through shared memory.
    # PAIRS (int1, swapped) decodes two weights with two instructions straight into that register
    # operand (_int1_sign_pairs), the reduction in pair order on both operands.
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.minimum(K, (pid_s + 1) * K_PER_SPLIT)
    # (nested: Triton before 3.4 refuses a chain of three or more boolean operands)
    if (SPLIT_K > 1 and HAS_LORA) and pid_n == 0:  # this slice's share of x·Aᵀ, for the finish
        # (before the main loop: its registers are free again when the loop's are needed)
        _store_xa_part(x_ptr, a_ptr, parts_ptr, pid_m * BLOCK_M, M, pid_s * K_PER_SPLIT, k_end, R, pid_s,
                       stride_xm, stride_ar, BLOCK_M, BLOCK_R, XA_BLOCK_K, IEEE, UPCAST)
    for k0 in range(pid_s * K_PER_SPLIT, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                     mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_end), other=0.0)
        if PAIRS:  # x's columns and the per-column scales' k in pair order too
            xt = _pair_order(xt, BLOCK_M, BLOCK_K)
            offs_k = tl.reshape(_pair_order(offs_k[None, :], 1, BLOCK_K), (BLOCK_K,))
        if FORMAT == 0:
            if PAIRS and GROUP32:  # a word's weights share one group: its scale in the decode
                offs_w = k0 // 32 + tl.arange(0, BLOCK_K // 32)
                alpha = tl.load(w1_ptr + offs_n[:, None] * W_B + (offs_w * 32 // W_C)[None, :],
                                mask=(offs_n[:, None] < N) & (offs_w[None, :] * 32 < k_end), other=0.0)
                w = _int1_sign_pairs(w0_ptr, offs_n, k0, N, W_A, ONE2, alpha.to(tl.float32), WDT, BLOCK_N, BLOCK_K,
                                     True)
            elif PAIRS:
                w = _int1_sign_pairs(w0_ptr, offs_n, k0, N, W_A, ONE2, 0.0, WDT, BLOCK_N, BLOCK_K, False)
            else:
                w = _int1_signs(w0_ptr, offs_n, k0, N, W_A, WDT, BLOCK_N, BLOCK_K, ASM)
            if SCALE == 1 and not (PAIRS and GROUP32):  # per group: the one scale that varies along K
                w = w * _int1_group_scale(w1_ptr, offs_n, offs_k, N, k_end, W_B, W_C).to(w.dtype)
            elif SCALE == 2:  # onebit: Ŵ = diag(h)·sign·diag(g); g here, h in the epilogue
                w = w * tl.load(w2_ptr + offs_k, mask=offs_k < k_end, other=0.0).to(w.dtype)[None, :]
        else:
            w = _sparse4x4_tile(w0_ptr, w1_ptr, pid_n * BLOCK_N, k0, N, k_end, W_A, W_B, BLOCK_N, BLOCK_K)
        w = w.to(xt.dtype)  # Ŵ in the activation dtype, as the reference
        if SWAP:
            acc += _dot(w, tl.trans(xt), IEEE, UPCAST)
        else:
            acc += _dot(xt, tl.trans(w), IEEE, UPCAST)
    if SWAP:  # the epilogue works on [BLOCK_M, BLOCK_N]
        acc = tl.trans(acc)
    if FORMAT == 0 and SCALE != 1:  # per-row α (or onebit h): once per output column
        acc = acc * tl.load(w1_ptr + offs_n * W_B, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA and SPLIT_K == 1:
        offs_r = tl.arange(0, BLOCK_R)
        xa = tl.load(xa_ptr + offs_m[:, None] * stride_am + offs_r[None, :],
                     mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)
        bt = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :],
                     mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0)
        acc += s * _dot(xa, tl.trans(bt), IEEE, UPCAST)
    if HAS_BIAS and SPLIT_K == 1:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=inside)
    else:  # into the workspace; the finish adds the LoRA path and the bias
        tl.atomic_add(y_ptrs, acc, mask=inside)


@on_input_device
def lora_linear_fwd(x, fmt: str, tensors, meta, lora_A=None, lora_B=None, scaling: float = 1.0, bias=None,
                    config=None, check=None):
    """Launch the fused forward. ``x [M, K]`` (fp16/bf16/fp32); ``tensors``/``meta`` are the
    format's (``weight_args`` explains them); returns ``y [M, N]`` in ``x.dtype``. ``config``
    forces a tile config (``autotune.Config``) instead of the tuned one. ``check(y) -> None
    or why`` (``loraq.tuning_check.forward_check``) judges each candidate's output when the tuner
    times them."""
    M, K = x.shape
    N = meta["N"]
    x = x.contiguous()
    if M == 0:
        return torch.empty(M, N, device=x.device, dtype=x.dtype)
    rows = rows_per_launch(M, max(K, N))
    if rows < M:  # offsets past 32 bits: a launch per block of rows
        return in_row_chunks(lambda i, j: lora_linear_fwd(x[i:j], fmt, tensors, meta, lora_A, lora_B, scaling, bias,
                                                          config, rows_from(check, i)), M, rows, N, x)
    bind, cfg, _ = _prepared(x, fmt, tensors, meta, lora_A, lora_B, scaling, bias, config, check)
    return bind(cfg)(x)


class ForwardPlan(BoundPlan):
    """The fused forward prepared once for every ``x`` of one shape, dtype and device: calling it
    with such an ``x`` launches the config the tuner picked, on the weight, LoRA and bias tensors
    it was made with (their values as they are at the call), skipping the per-call work of
    :func:`lora_linear_fwd` (its arguments' preparation, the cache lookup, the candidate checks).
    ``current()``: whether the switches it was made under (``env.switches``) still hold."""

    __slots__ = ()

    def __call__(self, x):
        self._check(x, "x")
        return self._run(x.contiguous())


@on_input_device
def forward_plan(x, fmt: str, tensors, meta, lora_A=None, lora_B=None, scaling: float = 1.0, bias=None,
                 check=None):
    """A :class:`ForwardPlan` of :func:`lora_linear_fwd` for inputs shaped like ``x`` (the same
    arguments), tuned first if the problem is new; None where a plan would not stay right:
    no rows, a batch split into launches, an argument the launcher would cast or copy (a plan must
    read the caller's tensors at each call, never a copy made once), or a CUDA graph being
    captured (where a new problem gets an untuned config that must not be kept)."""
    M, K = x.shape
    if M == 0 or rows_per_launch(M, max(K, meta["N"])) < M or autotune_capturing():
        return None
    x = x.contiguous()
    bind, cfg, bound = _prepared(x, fmt, tensors, meta, lora_A, lora_B, scaling, bias, None, check)
    ptrs, A, B, b = bound
    own = list(tensors.values())
    if not all(any(p is t for t in own) for p in ptrs) or A is not lora_A or B is not lora_B or b is not bias:
        return None
    return ForwardPlan(bind(cfg), cfg, x)


def _prepared(x, fmt, tensors, meta, lora_A, lora_B, scaling, bias, config, check):
    """``(bind(cfg) -> run, the config, (weight pointers, A, B, bias) as the kernels read them)``
    for a contiguous ``x [M, K]`` that one launch covers; tunes the config if it is new.
    ``run(x) -> y`` launches ``cfg`` for any contiguous x of this x's shape, dtype and device."""
    M, K = x.shape
    N = meta["N"]
    ptrs, ints, scale_mode = weight_args(fmt, tensors, meta)
    has_lora = lora_A is not None
    A, B, bias = lora_and_bias_args(x, lora_A, lora_B, bias)
    R = A.shape[0] if has_lora else 1

    def bind(cfg):  # run(x) for this call's x and every x like it (a plan keeps it)
        # the GEMVs of small batches, on the arguments prepared above
        if cfg[6] == LUT:
            return bind_lut(x.shape, x.dtype, x.device, ptrs, ints, scale_mode, N, A, B, scaling, bias, cfg)
        if cfg[6] in (MMA_GEMV, CUDA_LUT, CUDA_LUT8):
            return bind_mma(x.shape, x.dtype, x.device, ptrs, ints, scale_mode, N, A, B, scaling, bias, cfg)
        if cfg[6] in GATHER_FWD:
            return bind_gather(x.shape, x.dtype, x.device, ptrs, ints, N, A, B, scaling, bias, cfg)
        if cfg[6] in (CUDA_GATHER, SPARSE_MMA):
            return bind_sparse_cuda(x.shape, x.dtype, x.device, ptrs, N, A, B, scaling, bias, cfg)
        if cfg[6] == DENSE_SLAB:  # large batches: decoded slabs through cuBLAS
            return lambda x: slab_forward(x, fmt, ptrs, ints, scale_mode, N, A, B, scaling, bias, cfg)
        bm, bn, bk, split, warps, stages, swap = cfg
        split, k_per_split = split_plan(K, bk, split)
        grid = (cdiv(M, bm), cdiv(N, bn), split)
        # x is contiguous: its rows K apart (one row: never stepped over)
        scalars = (M, N, K, float(scaling), k_per_split, *ints)
        meta = dict(FORMAT=INT1 if fmt == "int1" else SPARSE4X4, SCALE=scale_mode, HAS_LORA=has_lora,
                    HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, UPCAST=interpreter_upcast(x.dtype),
                    WDT=decode_dtype(x.dtype), BLOCK_R=block_r(R), BLOCK_M=bm, BLOCK_N=bn,
                    BLOCK_K=bk, SPLIT_K=split, SWAP=swap in (DOT_SWAP, DOT_PAIRS), PAIRS=swap == DOT_PAIRS,
                    GROUP32=scale_mode == SCALE_GROUP and ints[2] % 32 == 0, ASM=use_asm(),
                    num_warps=warps, num_stages=stages)
        launcher = fast(_lora_linear_fwd_kernel)
        one2 = pair_ones(x.dtype)
        a_stride = A.stride(0) if has_lora else K

        def launch(x, y, parts, xa=None):
            # without LoRA, x stands in for xa, B and A (unused) with its row stride, K
            xa_arg, b_arg, a_arg = (xa, B, A) if xa is not None else (x, x, A if has_lora else x)
            strides = (xa.stride(0), B.stride(0)) if xa is not None else (K, K)
            launcher.launch(grid, (
                x, *ptrs, xa_arg, b_arg, bias if bias is not None else x, y, a_arg, parts if parts is not None else y,
                *scalars, K, y.stride(0), *strides, a_stride, R, one2), meta)

        if split > 1:  # partial sums into the workspace; the finish adds LoRA and bias
            return bind_split(launch, M, N, split, B, R, scaling, bias, x.dtype, x.device)

        def unsplit(x):  # large batches: x·Aᵀ whole beforehand (cuBLAS), the LoRA path in the epilogue
            y = output_buffer(M, N, x, 1)
            launch(x, y, None, lora_prologue(x, A, B)[0] if has_lora else None)
            return y.to(x.dtype)

        return unsplit

    # tuned per format, scale mode and LoRA on/off: each compiles to a different kernel. Small
    # batches also time a GEMV, under their own cache key.
    lut = M <= LUT_MAX_M and fmt == "int1" and lut_supported(meta) and not gather_problem()
    gather = M <= GATHER_MAX_M and fmt == "sparse4x4"
    if config is not None and config[6] == LUT and not (fmt == "int1" and lut_supported(meta)):
        raise ValueError(f"config {config} is the lookup GEMV: it takes an int1 weight whose group size is a "
                         f"multiple of 8 (got {fmt}, group {meta.get('group_size')})")
    if config is not None and config[6] in GATHER_FWD and fmt != "sparse4x4":
        raise ValueError(f"config {config} is the gathering GEMV: it takes a sparse4x4 weight, got {fmt}")
    if config is not None and config[6] == DOT_PAIRS and fmt != "int1":
        raise ValueError(f"config {config} decodes int1 signs in pair order: it takes an int1 weight, got {fmt}")
    def mma_problem():  # the CUDA mma GEMV (int1, up to 16 rows, fp16/bf16, loraq._C built): why not, or ""
        return f"it takes an int1 weight, got {fmt}" if fmt != "int1" else mma_gemv_status(x, meta)[1]

    def sparse_cuda_problem():  # the sparse4x4 CUDA GEMVs (up to 16 rows, fp16/bf16, loraq._C built)
        return f"it takes a sparse4x4 weight, got {fmt}" if fmt != "sparse4x4" else sparse_cuda_status(x)[1]
    variants = (DOT, DOT_SWAP, LUT, DENSE_SLAB, DOT_PAIRS, MMA_GEMV, CUDA_GATHER, SPARSE_MMA, CUDA_LUT,
                CUDA_LUT8) + GATHER_FWD
    if config is not None:  # a forced GEMV config gets the checks its public launcher makes
        if config[6] not in variants:
            raise ValueError(f"config {config}: its last field (the variant) must be one of {variants} "
                             "(kernels/autotune.py)")
        if config[6] in (MMA_GEMV, CUDA_LUT, CUDA_LUT8):
            check_mma_config(config)
            problem = mma_problem() or (f"the lookup GEMV takes one row of x, got {M}"
                                        if config[6] != MMA_GEMV and M != 1 else "")
            if not problem and config[6] == CUDA_LUT8:
                problem = cuda_lut8_status(x, meta)[1]
            if problem:
                raise ValueError(f"config {config} is a CUDA int1 GEMV, which cannot run here: {problem}")
        if config[6] in (CUDA_GATHER, SPARSE_MMA):
            check_sparse_cuda_config(config)
            if sparse_cuda_problem():
                raise ValueError(f"config {config} is a sparse4x4 CUDA GEMV, which cannot run here: "
                                 f"{sparse_cuda_problem()}")
        if config[6] == DENSE_SLAB:
            check_slab_config(config)
        elif config[6] == LUT:
            check_lut_config(config)
        elif config[6] in GATHER_FWD:
            check_gather_config(config)
    op = f"lora_linear_fwd:{fmt}:{scale_mode}:{int(has_lora)}" + (":lut" if lut else "") + (":gather" if gather else "")
    # the GEMVs' times differ with their finish in one launch (the int1 CUDA GEMV's too, up to 16 rows)
    if (lut or gather or (fmt == "int1" and M <= MMA_MAX_M)) and one_launch_offered():
        op += ":one"
    # int1 in fp16 and bf16 up to PAIRS_MAX_M rows: the pair-order decode too (in fp32 its dot is
    # plain FMAs, as the others': not worth the tuning time)
    pairs = fmt == "int1" and x.dtype in (torch.float16, torch.bfloat16)
    def mma():  # offered (LORAQ_CUDA_GEMV not 0) and able to run here; one row: the lookup GEMVs too
        if M > MMA_MAX_M or not cuda_gemv_offered() or mma_problem():
            return []
        if M != 1:
            return mma_gemv_configs(M)
        return mma_gemv_configs(M) + cuda_lut_configs(M) + (cuda_lut8_configs(M) if cuda_lut8_status(x, meta)[0] else [])

    def sparse_cuda():  # the same for the sparse4x4 CUDA GEMVs
        if M > SPARSE_CUDA_MAX_M or not cuda_gemv_offered() or sparse_cuda_problem():
            return []
        return sparse_cuda_configs(M)
    if lut:
        extra = lambda: lut_configs(M) + (pairs_configs(M) if pairs else []) + mma()  # noqa: E731
    elif gather:
        extra = lambda: gather_fwd_configs(M) + sparse_cuda()  # noqa: E731
    else:  # past 32 rows, the dense slabs too (none before)
        def extra():  # built only when the answer is not cached (a hit is the per-call path)
            used = (R if has_lora else 0) + (bias is not None)
            return ((pairs_configs(M) if pairs else []) + mma()
                    + dense_slab_configs(M, N, slab_widths(K, used), x.element_size()))
    # what else the candidates depend on: whether the CUDA GEMVs may run (up to 16 rows), the
    # slabs' widths and size cap (past 32 rows)
    if M <= 16:
        variant = (cuda_gemv_offered() and not (mma_problem() if fmt == "int1" else sparse_cuda_problem()),)
    elif M >= DENSE_SLAB_MIN_M:
        variant = ((R if has_lora else 0) + (bias is not None), dense_slab_cap_mib())
    else:
        variant = ()
    cfg = config or pick_config(op, M, N, K, x.dtype, x.device, lambda cfg: bind(cfg)(x), extra=extra,
                                variant=variant, check=check)
    return bind, cfg, (ptrs, A, B, bias)
