"""Large batches through cuBLAS: ``Ŵ`` decoded a slab at a time, the LoRA path in cuBLAS too.

At thousands of rows of x a layer is compute-bound, and the tiled kernel, which decodes every
weight tile again for every tile of x, took 1.4–2.4x cuBLAS's time on an H100 (``h100.md``). Here
each weight is decoded once per call, into a dense slab of at most a few tens of MiB, and cuBLAS
multiplies it: a slab of output rows at a time for the forward, of input columns for ``dX``.
The LoRA path and the bias never take a pass of their own over the output; the config's
placement (``autotune.SLAB_WIDEN``, ``SLAB_OUTPUT_FIRST`` or ``SLAB_MERGE``) says where they go,
and the autotuner times each:

* **widen**: as extra columns of the input in the slabs' own matmuls,
  ``y[:, n0:n1] = [x | x·Aᵀ | 1]·[Ŵ[n0:n1] | s·B[n0:n1] | b[n0:n1]]ᵀ`` and
  ``dX[:, k0:k1] = [dY | dY·B]·[Ŵ[:, k0:k1]; s·A[:, k0:k1]]``. Costs a copy of the input; the
  extended width is padded to a multiple of 8 with zeros so that every row stays 16-byte aligned
  for the tensor cores, and :func:`decode_slab` writes the strip of ``s·B``/``b`` (or ``s·A``) and
  the padding with the slab.
* **output first**: one low-rank matmul writes ``s·(x·Aᵀ)·Bᵀ + b`` (or ``s·(dY·B)·A``) into the
  output, and each slab's matmul adds to it (``beta = 1``: cuBLAS reads it back in its
  epilogue, hidden under a compute-bound matmul). Costs a write of the output; the reduction keeps
  its width (4096 stays a multiple of cuBLAS's tiles).
* **merge**: the decode adds the rank-r product to each tile it writes, ``Ŵ + s·B·A`` (``tl.dot``,
  summed in fp32 and rounded once), so each slab is one plain matmul,
  ``y[:, n0:n1] = x·(Ŵ + s·B·A)[n0:n1]ᵀ + b[n0:n1]`` (the bias in cuBLASLt's epilogue when there
  is one slab) and ``dX[:, k0:k1] = dY·(Ŵ + s·B·A)[:, k0:k1]`` (which needs ``B``, not ``dY·B``).
  Costs nothing beyond the decode's few extra instructions: no ``x·Aᵀ``, no pass over the input
  or output. Its rounding differs from the unmerged sum (``Ŵ`` and ``s·B·A`` added before one
  rounding, not their products), within the tolerance rule of DESIGN.md.

The slabs are decoded on a side stream (:func:`_pipeline`): the first while the current stream
builds the widened input or writes the output first (both memory-bound and independent), and,
with two buffers (the config's sixth field), each next slab while the current slab's matmul runs
(memory-bound beside compute-bound). With one buffer a decode waits for the matmul before it.

A slab is dense ``Ŵ`` in memory, briefly: this path is an autotune candidate only past 32 rows of
x (``autotune.dense_slab_configs``), never for small batches, and ``LORAQ_DENSE_SLAB_MIB`` bounds
(or, at 0, turns off) its buffer.
"""

from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from .autotune import SLAB_MERGE, SLAB_OUTPUT_FIRST, SLAB_WIDEN
from .decode import _dot, _int1_group_scale, _int1_signs, _sparse4x4_tile, interpreter_upcast, use_asm
from .host_math import cdiv, next_pow2
from .fast_launch import fast


@triton.jit
def _rounded(w, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """``w`` in ``dtype``, rounded to nearest even. ``UPCAST`` (the interpreter, bf16): it truncates
    fp32 → bf16 where a GPU rounds, so half a bf16 unit (ties to even) is added to the bits of
    normal numbers first (its conversion of fp32 subnormals is not bitwise: zeros are left alone)."""
    if UPCAST:
        bits = w.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = tl.where((bits & 0x7F800000) != 0, bits + 0x7FFF + ((bits >> 16) & 1), bits)
        w = bits.to(tl.float32, bitcast=True)
    return w.to(dtype)


@triton.jit
def _decode_slab_kernel(
    w0_ptr, w1_ptr, w2_ptr, lora_ptr, bias_ptr, out_ptr, mb_ptr, ma_ptr,
    n0, k0, ROWS, COLS, N, K, R, EXT, s,
    W_A, W_B, W_C, stride_out, stride_lora, stride_mb, stride_ma,
    FORMAT: tl.constexpr, SCALE: tl.constexpr, LORA_COLS: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
    MERGE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``out[i, j] = Ŵ[n0 + i, k0 + j]`` for ``i < ROWS``, ``j < COLS``, in ``out``'s dtype, plus the
    LoRA strip of ``EXT`` columns to its right (``LORA_COLS``: ``s·B[n0 + i, e]`` for ``e < R``, then
    the bias ``b[n0 + i]`` if ``HAS_BIAS``, then 0) or rows below it (``s·A[e, k0 + j]``, then 0),
    written by the grid's last column (row) of programs. ``MERGE`` (no strip then): ``Ŵ + s·B·A``
    instead of ``Ŵ`` (``B`` at ``mb_ptr`` ``[N, R]``, ``A`` at ``ma_ptr`` ``[R, K]``), summed in fp32
    and rounded once."""
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
        if MERGE:  # the rank-R product of this tile on the tensor cores, BLOCK_R of the rank at a time
            offs_r = tl.arange(0, BLOCK_R)
            lora = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for e0 in range(0, R, BLOCK_R):
                e = e0 + offs_r
                bt = tl.load(mb_ptr + offs_n[:, None] * stride_mb + e[None, :],
                             mask=(offs_n[:, None] < N) & (e[None, :] < R), other=0.0)
                at = tl.load(ma_ptr + e[:, None] * stride_ma + offs_k[None, :],
                             mask=(e[:, None] < R) & (offs_k[None, :] < K), other=0.0)
                lora += _dot(bt, at, IEEE, UPCAST)
            # Ŵ as the reference has it (in the activation dtype: onebit's h·g is rounded), plus s·B·A
            w = _rounded(w, out_ptr.dtype.element_ty, UPCAST).to(tl.float32) + s * lora
        tl.store(out_ptr + offs_i[:, None] * stride_out + offs_j[None, :], _rounded(w, out_ptr.dtype.element_ty, UPCAST),
                 mask=(offs_i[:, None] < ROWS) & (offs_j[None, :] < COLS))


def padded_extension(used: int, base: int) -> int:
    """Columns (forward) or rows (dX) added to a width of ``base`` for ``used`` of them (the rank,
    plus one for a forward's bias): ``used`` and the zeros that round ``base + used`` up to a
    multiple of 8 (0 when ``used`` is 0)."""
    return 0 if used == 0 else -(-(base + used) // 8) * 8 - base


def decode_slab(out, fmt: str, ptrs, ints, scale_mode: int, N: int, K: int, n0: int, k0: int, rows: int, cols: int,
                lora=None, scaling: float = 1.0, lora_cols: bool = True, bias=None, block=(32, 256),
                num_warps: int = 4, merge=None):
    """Write ``Ŵ[n0:n0+rows, k0:k0+cols]`` into ``out[:rows, :cols]`` (any row stride, unit column
    stride) and the strip past it: for ``lora_cols``, ``out[:rows, cols:]`` = ``s·B[n0:n0+rows]``
    (``lora`` is ``B [N, r]``, or None), then ``bias[n0:n0+rows]`` as one column, then zeros; else
    ``out[rows:, :cols]`` = ``s·A[:, k0:k0+cols]`` (``lora`` is ``A [r, K]``), then zeros.
    ``merge = (A [r, K], B [N, r])`` (in ``out``'s dtype) writes ``Ŵ + s·B·A`` instead, with no
    strip: ``out`` is then exactly ``rows × cols`` and the decode tile at least 16 rows (``tl.dot``).
    ``ptrs``/``ints``/``scale_mode`` are ``decode.weight_args``'s; ``n0`` is a multiple of 4 and
    ``k0`` of 32 (a sparse4x4 tile row, an int1 word)."""
    bn, bk = block
    if n0 % 4 or k0 % 32:
        raise ValueError(f"a slab starts at a multiple of 4 rows and 32 columns, got ({n0}, {k0})")
    if merge is not None:
        if lora is not None or bias is not None or tuple(out.shape) != (rows, cols):
            raise ValueError(f"a merged slab (Ŵ + s·B·A) has no strip: out must be {rows}x{cols} with no lora or "
                             f"bias strip, got {tuple(out.shape)}")
        if bn < 16:
            raise ValueError(f"a merged slab multiplies B·A on the tensor cores: the decode tile needs at least 16 "
                             f"rows, got {bn}")
        mA, mB = merge
        if mA.shape[1] != K or mB.shape[0] != N or mA.shape[0] != mB.shape[1] or mA.stride(1) != 1 \
                or mB.stride(1) != 1 or mA.dtype != out.dtype or mB.dtype != out.dtype:
            raise ValueError(f"merge takes A [r, {K}] and B [{N}, r] in {out.dtype} with unit column strides, got "
                             f"A {tuple(mA.shape)} {mA.dtype}, B {tuple(mB.shape)} {mB.dtype}")
    ext = (out.shape[1] - cols) if lora_cols else (out.shape[0] - rows)
    R = lora.shape[0 if not lora_cols else 1] if lora is not None else 0
    if bias is not None and not lora_cols:
        raise ValueError("a bias goes in the forward's strip of columns (lora_cols=True)")
    if ext < R + (bias is not None):
        raise ValueError(f"out has {ext} {'columns' if lora_cols else 'rows'} past the slab, fewer than the "
                         f"{R + (bias is not None)} that the LoRA factor and bias need")
    grid = (cdiv(rows, bn) + (1 if ext and not lora_cols else 0),
            cdiv(cols, bk) + (1 if ext and lora_cols else 0))
    if merge is None:
        mA = mB = out  # placeholders
    else:
        R = mA.shape[0]  # the rank of the merged product (no strip)
    fast(_decode_slab_kernel)[grid](
        *ptrs, lora if lora is not None else out, bias if bias is not None else out, out, mB, mA, n0, k0, rows, cols,
        N, K, R, ext, float(scaling), *ints[:3], out.stride(0), lora.stride(0) if lora is not None else 0,
        mB.stride(0), mA.stride(0),
        FORMAT=0 if fmt == "int1" else 1, SCALE=scale_mode, LORA_COLS=lora_cols, HAS_BIAS=bias is not None,
        ASM=use_asm(), MERGE=merge is not None, IEEE=out.dtype == torch.float32,
        UPCAST=interpreter_upcast(out.dtype), BLOCK_N=bn, BLOCK_K=bk,
        BLOCK_E=max(16, next_pow2(max(ext, 1))), BLOCK_R=16 if R <= 16 else 32, num_warps=num_warps,
    )
    return out


def check_slab_config(config) -> None:
    """Raise ``ValueError`` unless ``config`` is a valid dense-slab config: ``(decode tile rows,
    decode tile columns, slab length, placement, num_warps, buffers, DENSE_SLAB)``."""
    bn, bk, length, placement, warps, buffers, _ = config
    if bn < 4 or bn & (bn - 1) or bk < 32 or bk & (bk - 1):
        raise ValueError(f"config {config}: the decode tile must be a power of two of at least 4 rows and 32 "
                         f"columns, got {bn}x{bk}")
    if length < 32 or length % 32:
        raise ValueError(f"config {config}: the slab length (third field) must be a positive multiple of 32, "
                         f"got {length}")
    if placement not in (SLAB_WIDEN, SLAB_OUTPUT_FIRST, SLAB_MERGE):
        raise ValueError(f"config {config}: the fourth field places the LoRA path: {SLAB_WIDEN} (widen the input), "
                         f"{SLAB_OUTPUT_FIRST} (into the output first) or {SLAB_MERGE} (merged into the slab), "
                         f"got {placement}")
    if placement == SLAB_MERGE and bn < 16:
        raise ValueError(f"config {config}: a merged slab multiplies B·A on the tensor cores, so its decode tile "
                         f"needs at least 16 rows, got {bn}")
    if warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"config {config}: num_warps must be a power of two up to 16, got {warps}")
    if buffers not in (1, 2):
        raise ValueError(f"config {config}: the sixth field is the number of slab buffers, 1 (decode, then "
                         f"multiply) or 2 (the next slab decoded during the current matmul), got {buffers}")


def slab_widths(base: int, used: int, merge: bool = True):
    """``{placement: a slab's width}`` to time for a reduction of ``base`` with ``used`` extra
    inputs (the rank, plus one for a forward's bias): without any, one placement (nothing to place);
    ``merge``: the merged slab too (the forward's)."""
    if not used:
        return {SLAB_OUTPUT_FIRST: base}
    widths = {SLAB_WIDEN: base + padded_extension(used, base), SLAB_OUTPUT_FIRST: base}
    if merge:
        widths[SLAB_MERGE] = base
    return widths


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


_SIDE_STREAMS = {}  # device -> the stream that decodes the slabs beside the matmuls


def _side_stream(device: torch.device):
    side = _SIDE_STREAMS.get(device)
    if side is None:
        side = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return side


def _pipeline(starts, decode: Callable, multiply: Callable, prologue: Optional[Callable], buffers: int,
              device: torch.device):
    """``before = prologue()`` (None without one), then for each slab ``i``:
    ``multiply(starts[i], decode(starts[i], i % buffers), before)``. On CUDA the decodes
    (memory-bound) run on a side stream, each after the matmul that last read its buffer: the
    first beside the prologue (also memory-bound and independent of it), and with two buffers each
    next one beside the current slab's matmul (compute-bound). Events order the two streams, and
    the current stream waits for the side one at the end: a fork and join that a CUDA graph
    captures too. With one buffer and no prologue nothing could overlap: all on the current stream."""
    if device.type != "cuda" or (prologue is None and buffers == 1):
        before = prologue() if prologue is not None else None
        for i, start in enumerate(starts):
            multiply(start, decode(start, i % buffers), before)
        return
    main, side = torch.cuda.current_stream(device), _side_stream(device)
    side.wait_stream(main)  # the buffers, weights and inputs are ready
    decoded, multiplied = [], []

    def queue_decode(i):
        with torch.cuda.stream(side):
            if i >= buffers:  # its buffer is free once the matmul that read it is done
                side.wait_event(multiplied[i - buffers])
            w = decode(starts[i], i % buffers)
            done = torch.cuda.Event()
            done.record(side)
        decoded.append((w, done))

    queue_decode(0)
    before = prologue() if prologue is not None else None
    for i, start in enumerate(starts):
        w, done = decoded[i]
        main.wait_event(done)
        multiply(start, w, before)
        finished = torch.cuda.Event()
        finished.record(main)
        multiplied.append(finished)
        if i + 1 < len(starts):
            queue_decode(i + 1)
    main.wait_stream(side)


def slab_forward(x, fmt, ptrs, ints, scale_mode, N, A, B, scaling, bias, config):
    """``y = x·Ŵᵀ + s·(x·Aᵀ)·Bᵀ + b`` a slab of ``config[2]`` output rows at a time, in
    ``config[5]`` buffers (module doc)."""
    M, K = x.shape
    r = A.shape[0] if A is not None else 0
    used = r + (bias is not None)
    widen = used and config[3] == SLAB_WIDEN
    merge = used and config[3] == SLAB_MERGE
    ext = padded_extension(used, K) if widen else 0
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    length = min(config[2], -(-N // 4) * 4)
    starts = range(0, N, length)
    buffers = min(config[5], len(starts))
    slabs = torch.empty(buffers, length, K + ext, device=x.device, dtype=x.dtype)
    b = bias.contiguous() if bias is not None and (widen or merge) else None
    factors = (A.contiguous(), B.contiguous()) if merge and r else None

    def decode(n0, i):
        rows = min(length, N - n0)
        return decode_slab(slabs[i, :rows], fmt, ptrs, ints, scale_mode, N, K, n0, 0, rows, K, B if widen else None,
                           scaling, True, b if widen else None, config[:2], config[4], factors)

    def prologue():
        if widen:  # [x | x·Aᵀ | 1 | 0]: built once, read by every slab's matmul
            return _widened(x, ext, lambda tail: _lora_inputs(tail, x, A, bias is not None))
        # y = s·(x·Aᵀ)·Bᵀ + b first: two launches (the bias in cuBLASLt's epilogue)
        if not r:
            y.copy_(bias.expand(M, N))
        elif bias is None:
            y.addmm_(torch.mm(x, A.t()), B.t(), beta=0, alpha=scaling)
        else:
            torch.addmm(bias, torch.mm(x, A.t()), B.t(), alpha=scaling, out=y)
        return None

    def multiply(n0, w, xe):
        out = y[:, n0:n0 + w.shape[0]]
        if widen:
            torch.mm(xe, w.t(), out=out)
        elif merge and b is not None:  # x·(Ŵ + s·B·A)ᵀ + b: the bias in cuBLASLt's epilogue (when out is all of y)
            torch.addmm(b[n0:n0 + w.shape[0]], x, w.t(), out=out)
        elif used and not merge:  # onto the output written first
            out.addmm_(x, w.t())
        else:  # merged without a bias, or nothing to place
            torch.mm(x, w.t(), out=out)

    _pipeline(starts, decode, multiply, prologue if used and not merge else None, buffers, x.device)
    return y


def slab_dx(dy, fmt, ptrs, ints, scale_mode, K, A, dyb, scaling, config, B=None):
    """``dX = dY·Ŵ + s·(dY·B)·A`` a slab of ``config[2]`` columns of ``dX`` at a time, in
    ``config[5]`` buffers (module doc); the merged placement needs ``B`` (``[N, r]``, the ``B``
    of ``dyb``)."""
    M, N = dy.shape
    r = A.shape[0] if A is not None else 0
    widen = r and config[3] == SLAB_WIDEN
    merge = r and config[3] == SLAB_MERGE
    if merge and B is None:
        raise ValueError(f"config {config} merges s·B·A into the slab: it needs B")
    ext = padded_extension(r, N) if widen else 0
    dx = torch.empty(M, K, device=dy.device, dtype=dy.dtype)
    length = min(config[2], -(-K // 32) * 32)
    starts = range(0, K, length)
    buffers = min(config[5], len(starts))
    slabs = torch.empty(buffers, N + ext, length, device=dy.device, dtype=dy.dtype)

    def decode(k0, i):
        cols = min(length, K - k0)
        return decode_slab(slabs[i, :, :cols], fmt, ptrs, ints, scale_mode, N, K, 0, k0, N, cols,
                           A if widen else None, scaling, False, None, config[:2], config[4],
                           (A, B) if merge else None)

    def prologue():
        if widen:  # [dY | dY·B | 0]
            return _widened(dy, ext, lambda tail: tail[:, :r].copy_(dyb).shape[1])
        dx.addmm_(dyb, A, beta=0, alpha=scaling)  # dX = (dY·B)·(s·A) first (beta 0: the empty buffer is not read)
        return None

    def multiply(k0, w, dye):
        out = dx[:, k0:k0 + w.shape[1]]
        if widen:
            torch.mm(dye, w, out=out)
        elif r and not merge:  # onto dX written first
            out.addmm_(dy, w)
        else:  # merged (dY·B unused) or without LoRA
            torch.mm(dy, w, out=out)

    _pipeline(starts, decode, multiply, prologue if r and not merge else None, buffers, dy.device)
    return dx
