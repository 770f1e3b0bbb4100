"""Large batches through cuBLAS: ``Ŵ`` decoded a slab at a time, the LoRA path in the same matmul.

At thousands of rows of x a layer is compute-bound, and the tiled kernel, which decodes every
weight tile again for every tile of x, took 1.4–2.4x cuBLAS's time on an H100 (``h100.md``). Here
each weight is decoded once per call, into a dense slab of at most a few tens of MiB, and cuBLAS
multiplies it. The LoRA path rides in the same cuBLAS call:

* forward, a slab of output rows at a time: ``y[:, n0:n1] = [x | x·Aᵀ | 1]·[Ŵ[n0:n1] | s·B[n0:n1] | b[n0:n1]]ᵀ``
  (the bias as one more column: no pass over ``y`` to add it);
* ``dX``, a slab of input columns at a time: ``dX[:, k0:k1] = [dY | dY·B]·[Ŵ[:, k0:k1]; s·A[:, k0:k1]]``.

Extending the input costs a copy of it; when the input is wider than the output (K > N for the
forward, N > K for dX), the slabs hold ``Ŵ`` alone and one more matmul adds the LoRA path and
bias into the output instead (a pass over the output, the narrower of the two).

The extended width is padded to a multiple of 8 with zeros so that every row of the operands
stays 16-byte aligned for the tensor cores. :func:`decode_slab` writes a slab, its strip and the
zero padding in one launch; a call is then up to four small launches to build the extended x (or
dY) and two a slab. A slab is dense ``Ŵ`` in memory, briefly: this path is an autotune
candidate only past 32 rows of x (``autotune.dense_slab_configs``), never for small batches,
and ``LORAQ_DENSE_SLAB_MIB`` bounds (or, at 0, turns off) its buffer.
"""

import torch
import triton
import triton.language as tl

from .decode import _int1_group_scale, _int1_signs, _sparse4x4_tile, use_asm


@triton.jit
def _decode_slab_kernel(
    w0_ptr, w1_ptr, w2_ptr, lora_ptr, bias_ptr, out_ptr,
    n0, k0, ROWS, COLS, N, K, R, EXT, s,
    W_A, W_B, W_C, stride_out, stride_lora,
    FORMAT: tl.constexpr, SCALE: tl.constexpr, LORA_COLS: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """``out[i, j] = Ŵ[n0 + i, k0 + j]`` for ``i < ROWS``, ``j < COLS``, in ``out``'s dtype, plus the
    LoRA strip of ``EXT`` columns to its right (``LORA_COLS``: ``s·B[n0 + i, e]`` for ``e < R``, then
    the bias ``b[n0 + i]`` if ``HAS_BIAS``, then 0) or rows below it (``s·A[e, k0 + j]``, then 0),
    written by the grid's last column (row) of programs."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_i = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # rows of the slab
    offs_j = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # its columns
    offs_e = tl.arange(0, BLOCK_E)
    strip = (pid_k * BLOCK_K >= COLS) if LORA_COLS else (pid_n * BLOCK_N >= ROWS)
    if strip:
        if LORA_COLS:  # the strip of s·B right of Ŵ (forward)
            b = s * tl.load(lora_ptr + (n0 + offs_i)[:, None] * stride_lora + offs_e[None, :],
                            mask=(offs_i[:, None] < ROWS) & (offs_e[None, :] < R), other=0.0).to(tl.float32)
            if HAS_BIAS:  # the column after B's (x's extension holds ones there)
                bias = tl.load(bias_ptr + n0 + offs_i, mask=offs_i < ROWS, other=0.0).to(tl.float32)
                b = tl.where(offs_e[None, :] == R, bias[:, None], b)
            tl.store(out_ptr + offs_i[:, None] * stride_out + (COLS + offs_e)[None, :],
                     b.to(out_ptr.dtype.element_ty), mask=(offs_i[:, None] < ROWS) & (offs_e[None, :] < EXT))
        else:  # the strip of s·A below Ŵ (dX)
            a = tl.load(lora_ptr + offs_e[:, None] * stride_lora + (k0 + offs_j)[None, :],
                        mask=(offs_e[:, None] < R) & (offs_j[None, :] < COLS), other=0.0).to(tl.float32)
            tl.store(out_ptr + (ROWS + offs_e)[:, None] * stride_out + offs_j[None, :],
                     (s * a).to(out_ptr.dtype.element_ty), mask=(offs_e[:, None] < EXT) & (offs_j[None, :] < COLS))
    else:
        nn0 = n0 + pid_n * BLOCK_N
        kk0 = k0 + pid_k * BLOCK_K
        offs_n = nn0 + tl.arange(0, BLOCK_N)
        offs_k = kk0 + tl.arange(0, BLOCK_K)
        if FORMAT == 0:
            w = _int1_signs(w0_ptr, offs_n, kk0, N, W_A, 2, BLOCK_N, BLOCK_K, ASM)  # ±1.0 in fp32
            if SCALE == 1:  # per row and group of inputs
                w = w * _int1_group_scale(w1_ptr, offs_n, offs_k, N, K, W_B, W_C)
            elif SCALE == 2:  # onebit: sign·(h·g), h·g in fp32 as Int1Weight.dequantize
                h = tl.load(w1_ptr + offs_n * W_B, mask=offs_n < N, other=0.0).to(tl.float32)
                g = tl.load(w2_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
                w = w * (h[:, None] * g[None, :])
            else:  # per row
                w = w * tl.load(w1_ptr + offs_n * W_B, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
        else:
            w = _sparse4x4_tile(w0_ptr, w1_ptr, nn0, kk0, N, K, W_A, W_B, BLOCK_N, BLOCK_K)
        tl.store(out_ptr + offs_i[:, None] * stride_out + offs_j[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=(offs_i[:, None] < ROWS) & (offs_j[None, :] < COLS))


def padded_extension(used: int, base: int) -> int:
    """Columns (forward) or rows (dX) added to a width of ``base`` for ``used`` of them (the rank,
    plus one for a forward's bias): ``used`` and the zeros that round ``base + used`` up to a
    multiple of 8 (0 when ``used`` is 0)."""
    return 0 if used == 0 else -(-(base + used) // 8) * 8 - base


def decode_slab(out, fmt: str, ptrs, ints, scale_mode: int, N: int, K: int, n0: int, k0: int, rows: int, cols: int,
                lora=None, scaling: float = 1.0, lora_cols: bool = True, bias=None, block=(32, 256),
                num_warps: int = 4):
    """Write ``Ŵ[n0:n0+rows, k0:k0+cols]`` into ``out[:rows, :cols]`` (any row stride, unit column
    stride) and the strip past it: for ``lora_cols``, ``out[:rows, cols:]`` = ``s·B[n0:n0+rows]``
    (``lora`` is ``B [N, r]``, or None), then ``bias[n0:n0+rows]`` as one column, then zeros; else
    ``out[rows:, :cols]`` = ``s·A[:, k0:k0+cols]`` (``lora`` is ``A [r, K]``), then zeros.
    ``ptrs``/``ints``/``scale_mode`` are ``decode.weight_args``'s; ``n0`` is a multiple of 4 and
    ``k0`` of 32 (a sparse4x4 tile row, an int1 word)."""
    bn, bk = block
    if n0 % 4 or k0 % 32:
        raise ValueError(f"a slab starts at a multiple of 4 rows and 32 columns, got ({n0}, {k0})")
    ext = (out.shape[1] - cols) if lora_cols else (out.shape[0] - rows)
    R = lora.shape[0 if not lora_cols else 1] if lora is not None else 0
    if bias is not None and not lora_cols:
        raise ValueError("a bias goes in the forward's strip of columns (lora_cols=True)")
    if ext < R + (bias is not None):
        raise ValueError(f"out has {ext} {'columns' if lora_cols else 'rows'} past the slab, fewer than the "
                         f"{R + (bias is not None)} that the LoRA factor and bias need")
    grid = (triton.cdiv(rows, bn) + (1 if ext and not lora_cols else 0),
            triton.cdiv(cols, bk) + (1 if ext and lora_cols else 0))
    _decode_slab_kernel[grid](
        *ptrs, lora if lora is not None else out, bias if bias is not None else out, out, n0, k0, rows, cols, N, K,
        R, ext, float(scaling), *ints[:3], out.stride(0), lora.stride(0) if lora is not None else 0,
        FORMAT=0 if fmt == "int1" else 1, SCALE=scale_mode, LORA_COLS=lora_cols, HAS_BIAS=bias is not None,
        ASM=use_asm(),
        BLOCK_N=bn, BLOCK_K=bk, BLOCK_E=max(16, triton.next_power_of_2(max(ext, 1))), num_warps=num_warps,
    )
    return out


def check_slab_config(config) -> None:
    """Raise ``ValueError`` unless ``config`` is a valid dense-slab config: ``(decode tile rows,
    decode tile columns, slab length, 1, num_warps, 1, DENSE_SLAB)``."""
    bn, bk, length, _, warps, _, _ = config
    if bn < 4 or bn & (bn - 1) or bk < 32 or bk & (bk - 1):
        raise ValueError(f"config {config}: the decode tile must be a power of two of at least 4 rows and 32 "
                         f"columns, got {bn}x{bk}")
    if length < 32 or length % 32:
        raise ValueError(f"config {config}: the slab length (third field) must be a positive multiple of 32, "
                         f"got {length}")
    if warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"config {config}: num_warps must be a power of two up to 16, got {warps}")


def _extend(reduction: int, outputs: int) -> bool:
    """Whether the LoRA path (and bias) rides in the slabs' matmuls as extra columns of the input,
    which costs a copy of the input (``reduction`` wide), or is added after them in one more
    matmul into the output, which costs a pass over the output (``outputs`` wide): the narrower."""
    return reduction <= outputs


def _widened(t, ext: int, fill):
    """``[t | tail]``, ``ext`` columns wider: ``fill(tail)`` writes the tail's first columns and
    returns how many; the rest are zeros."""
    rows, width = t.shape
    out = torch.empty(rows, width + ext, device=t.device, dtype=t.dtype)
    out[:, :width].copy_(t)
    used = fill(out[:, width:])
    if ext > used:
        out[:, width + used:].zero_()
    return out


def _lora_inputs(out, x, A, ones: bool) -> int:
    """Write ``x·Aᵀ`` (none without LoRA), then a column of ones if ``ones`` (the bias's), into
    ``out``'s first columns; returns how many."""
    r = A.shape[0] if A is not None else 0
    if r:
        torch.mm(x, A.t(), out=out[:, :r])
    if ones:
        out[:, r].fill_(1.0)
    return r + ones


def slab_forward(x, fmt, ptrs, ints, scale_mode, N, A, B, scaling, bias, config):
    """``y = x·Ŵᵀ + s·(x·Aᵀ)·Bᵀ + b`` a slab of ``config[2]`` output rows at a time (module doc)."""
    M, K = x.shape
    r = A.shape[0] if A is not None else 0
    used = r + (bias is not None)
    extend = used and _extend(K, N)
    ext = padded_extension(used, K) if extend else 0
    # [x | x·Aᵀ | 1 | 0]: built once, read by every slab's matmul
    xe = _widened(x, ext, lambda tail: _lora_inputs(tail, x, A, bias is not None)) if extend else x
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    length = min(config[2], -(-N // 4) * 4)
    slab = torch.empty(length, K + ext, device=x.device, dtype=x.dtype)
    b = bias.contiguous() if bias is not None and extend else None
    for n0 in range(0, N, length):
        rows = min(length, N - n0)
        w = decode_slab(slab[:rows], fmt, ptrs, ints, scale_mode, N, K, n0, 0, rows, K, B if extend else None,
                        scaling, True, b, config[:2], config[4])
        torch.mm(xe, w.t(), out=y[:, n0:n0 + rows])
    if used and not extend:  # y += [x·Aᵀ | 1]·[s·B | b]ᵀ: one pass over y
        left = torch.empty(M, used, device=x.device, dtype=x.dtype)
        _lora_inputs(left, x, A, bias is not None)
        right = torch.empty(N, used, device=x.device, dtype=x.dtype)
        if r:
            torch.mul(B, scaling, out=right[:, :r])
        if bias is not None:
            right[:, r].copy_(bias)
        y.addmm_(left, right.t())
    return y


def slab_dx(dy, fmt, ptrs, ints, scale_mode, K, A, dyb, scaling, config):
    """``dX = dY·Ŵ + s·(dY·B)·A`` a slab of ``config[2]`` columns of ``dX`` at a time (module doc)."""
    M, N = dy.shape
    r = A.shape[0] if A is not None else 0
    extend = r and _extend(N, K)
    ext = padded_extension(r, N) if extend else 0
    dye = _widened(dy, ext, lambda tail: tail[:, :r].copy_(dyb).shape[1]) if extend else dy  # [dY | dY·B | 0]
    dx = torch.empty(M, K, device=dy.device, dtype=dy.dtype)
    length = min(config[2], -(-K // 32) * 32)
    slab = torch.empty(N + ext, length, device=dy.device, dtype=dy.dtype)
    for k0 in range(0, K, length):
        cols = min(length, K - k0)
        w = decode_slab(slab[:, :cols], fmt, ptrs, ints, scale_mode, N, K, 0, k0, N, cols, A if extend else None,
                        scaling, False, None, config[:2], config[4])
        torch.mm(dye, w, out=dx[:, k0:k0 + cols])
    if r and not extend:  # dX += (dY·B)·(s·A): one pass over dX
        dx.addmm_(dyb, A, alpha=scaling)
    return dx
