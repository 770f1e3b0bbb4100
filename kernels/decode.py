"""Decoding tiles of the packed weights in registers; shared by the forward and ``dX`` kernels.

Layouts: ``loraq/formats/int1.py`` and ``loraq/formats/sparse4x4.py``. Elements outside
``[N, K]`` decode to 0, so padding never reaches a result.

int1 decodes signs only: a ``[BLOCK_N, BLOCK_K // 32]`` tile of words is loaded once and each
word is spread over its 32 bits with one shift and one and per weight. sparse4x4 loads one value
and one nibble per 4x4 tile and spreads them over the tile. The scales are applied by
the kernels where they cost least: per-row ``α`` and onebit ``h`` once per output column in the
epilogue (or on the ``dY`` side for ``dX``), onebit ``g`` as a broadcast vector, and only
per-group scales per weight.
"""

from typing import Dict, Tuple

import torch
import triton
import triton.language as tl

from .host_math import cdiv

SCALE_ROW, SCALE_GROUP, SCALE_ONEBIT = 0, 1, 2
W_FP16, W_BF16, W_FP32 = 0, 1, 2  # the dtype a kernel decodes Ŵ to (that of its tl.dot)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``a·b`` accumulated in fp32: IEEE fp32 for fp32 inputs (no TF32); in the interpreter, bf16
    operands are multiplied as fp32 copies (numpy has no bfloat16 and would use the raw bits)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _rotl(w, r, ASM: tl.constexpr):
    """``w`` rotated left by ``r`` (``0 ≤ r < 32``), uint32. On the GPU one funnel shift
    (``shf.l.wrap``): written as two shifts and an or, LLVM keeps the two shifts, since Triton
    guards each shift against amounts of 32 or more. ``ASM=False`` for the interpreter, which
    runs no PTX."""
    if ASM:
        return tl.inline_asm_elementwise("shf.l.wrap.b32 $0, $1, $1, $2;", "=r,r,r", [w, r], dtype=tl.uint32,
                                         is_pure=True, pack=1)
    else:
        return (w << r) | (w >> ((32 - r) & 31))


@triton.jit
def _int1_signs(packed_ptr, offs_n, k0, N, KW, WDT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                ASM: tl.constexpr):
    """±1 for ``Ŵ[offs_n, k0:k0+BLOCK_K]`` in the dot's dtype (``WDT``: ``W_FP16``, ``W_BF16`` or
    ``W_FP32``); ``k0`` is a multiple of 32.

    Each sign is built from its bit in two instructions instead of shift, compare, select and
    convert: a rotate (one funnel shift, ``_rotl``) brings bit ``j`` of the word onto the sign bit
    of the constant 1.0, and one and-or keeps it. The decode, not the weight stream, is what limits a
    1-bit matmul. Rows past ``N`` and bits past ``K`` decode to ±1, not 0: the kernels zero ``x``
    (``dY``) there, and never store those rows.
    """
    offs_w = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    words = tl.load(packed_ptr + offs_n[:, None] * KW + offs_w[None, :],
                    mask=(offs_n[:, None] < N) & (offs_w[None, :] < KW), other=0)
    w = words.to(tl.uint32, bitcast=True)[:, :, None]
    j = tl.arange(0, 32).to(tl.uint32)[None, None, :]
    # rotate left so that bit j lands on the sign bit; a set bit is +1, a clear sign bit, hence
    # the xor (ptxas folds and, xor and or into one LOP3)
    r = ((31 if WDT == 2 else 15) - j) & 31
    rot = _rotl(tl.broadcast_to(w, (BLOCK_N, BLOCK_K // 32, 32)), tl.broadcast_to(r, (BLOCK_N, BLOCK_K // 32, 32)), ASM)
    if WDT == 2:  # fp32: 1.0 = 0x3F800000, sign bit 31
        signs = (((rot & 0x80000000) ^ 0x80000000) | 0x3F800000).to(tl.float32, bitcast=True)
    else:  # 16-bit: 1.0 = 0x3C00 (fp16) or 0x3F80 (bf16), sign bit 15
        bits = (((rot & 0x8000) ^ 0x8000) | (0x3C00 if WDT == 0 else 0x3F80)).to(tl.uint16)
        signs = bits.to(tl.float16, bitcast=True) if WDT == 0 else bits.to(tl.bfloat16, bitcast=True)
    return tl.reshape(signs, (BLOCK_N, BLOCK_K))  # bit j of word w is k = 32w + j


@triton.jit
def _signed_pairs(v, s, mag2, mag_lo, mag_hi, WDT: tl.constexpr):
    """``(lo, hi)``: the signs of bits ``15 - s`` and ``31 - s`` of ``v`` (uint32) times the
    magnitudes, a set bit ``+``. 16-bit dtypes: ``mag2`` holds both magnitudes' bits in one word
    (one shift and one LOP3 for the pair); fp32: ``mag_lo`` and ``mag_hi`` (bits), each half on
    its own. The xor flips a magnitude's sign for a clear bit: exactly ``±mag``."""
    if WDT == 2:
        lo = ((((v << (s + 16)) & 0x80000000) ^ 0x80000000) ^ mag_lo).to(tl.float32, bitcast=True)
        hi = ((((v << s) & 0x80000000) ^ 0x80000000) ^ mag_hi).to(tl.float32, bitcast=True)
    else:
        u = (((v << s) & 0x80008000) ^ 0x80008000) ^ mag2
        lo16 = (u & 0xFFFF).to(tl.uint16)
        hi16 = (u >> 16).to(tl.uint16)
        if WDT == 0:
            lo, hi = lo16.to(tl.float16, bitcast=True), hi16.to(tl.float16, bitcast=True)
        else:
            lo, hi = lo16.to(tl.bfloat16, bitcast=True), hi16.to(tl.bfloat16, bitcast=True)
    return lo, hi


@triton.jit
def _bits16(a, WDT: tl.constexpr):
    """fp32 ``a`` rounded to the decode's 16-bit dtype (``WDT`` 0 or 1), its bits as uint32."""
    if WDT == 0:
        return a.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    else:
        return a.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)


@triton.jit
def _int1_sign_pairs(packed_ptr, offs_n, k0, N, KW, ONE2, alpha, WDT: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, ALPHA: tl.constexpr):
    """±1 for ``Ŵ[offs_n, k0:k0+BLOCK_K]`` with its columns in pair order (``_pair_order``): column
    ``32i + 2q + e`` holds bit ``q + 16e`` of word ``i``. ``k0`` is a multiple of 32.

    Bits ``q`` and ``q + 16`` of a word are two adjacent 16-bit values after one shift, which puts
    them on the two sign bits of a pair of 1.0s: one shift and one and-xor-or (LOP3) decode two
    weights into the 32-bit register that a tensor-core fragment holds them in (compiled for sm_90
    with Triton 3.6: 65 shifts and 64 LOP3 a thread for a 128 x 128 tile, straight into ``wgmma``'s
    register operand; ``_int1_signs`` takes about 3 instructions a weight and a trip through shared
    memory). ``ONE2`` is the pair of 1.0s (``0x3C003C00`` fp16, ``0x3F803F80`` bf16) passed at run
    time: as a register, ptxas folds the and, xor and or into one LOP3 (with two immediates it
    needs two). fp32 (``WDT == W_FP32``) decodes each half on its own, in the same order.
    ``ALPHA``: ``alpha`` (fp32 ``[BLOCK_N, BLOCK_K // 32]``, one scale a word: groups of a multiple
    of 32) takes the place of the 1.0s, ``±alpha`` at no cost per weight (as in
    ``_int1_sign_pairs_t``); otherwise ``alpha`` is unused.
    """
    offs_w = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    words = tl.load(packed_ptr + offs_n[:, None] * KW + offs_w[None, :],
                    mask=(offs_n[:, None] < N) & (offs_w[None, :] < KW), other=0)
    w = words.to(tl.uint32, bitcast=True)[:, :, None]
    q = tl.arange(0, 16).to(tl.uint32)[None, None, :]
    if ALPHA:  # one magnitude a word, for both of each pair
        one = alpha.to(tl.uint32, bitcast=True)[:, :, None]
        one2 = one
        if WDT != 2:
            a16 = _bits16(alpha, WDT)
            one2 = (a16 | (a16 << 16))[:, :, None]
    else:
        one, one2 = 0x3F800000, ONE2
    lo, hi = _signed_pairs(w, 15 - q, one2, one, one, WDT)
    return tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))


@triton.jit
def _int1_words_t(packed_ptr, offs_n, k0, N, KW, BLOCK_K: tl.constexpr):
    """The packed words of ``Ŵ[offs_n, k0:k0+BLOCK_K]`` (``[BLOCK_N, BLOCK_K // 32]`` int32; 0 past
    ``N`` and past the last word), for ``_int1_sign_pairs_t``: a load of its own, so that dX can
    issue the next tile's before it decodes this one."""
    offs_w = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    return tl.load(packed_ptr + offs_n[:, None] * KW + offs_w[None, :],
                   mask=(offs_n[:, None] < N) & (offs_w[None, :] < KW), other=0)


@triton.jit
def _pair_scales_t(alpha, WDT: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(a2, a_lo, a_hi)`` (uint32 ``[BLOCK_N // 2]``) for ``_int1_sign_pairs_t`` from the per-row
    scales ``alpha`` (``[BLOCK_N]``, any float dtype): the bits of rows ``2p`` and ``2p + 1``, each as
    fp32 and (``a2``, 16-bit dtypes) both rounded to the decode's dtype in one word."""
    a_even, a_odd = tl.split(tl.reshape(alpha.to(tl.float32), (BLOCK_N // 2, 2)))
    a_lo = a_even.to(tl.uint32, bitcast=True)
    a_hi = a_odd.to(tl.uint32, bitcast=True)
    a2 = a_lo
    if WDT != 2:  # the two rows' magnitudes in one word
        a2 = _bits16(a_even, WDT) | (_bits16(a_odd, WDT) << 16)
    return a2, a_lo, a_hi


@triton.jit
def _int1_sign_pairs_t(words, a2, a_lo, a_hi, WDT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``±alpha[n]`` for ``Ŵ[n, k0:k0+BLOCK_K]ᵀ`` from its ``words`` (``[BLOCK_K, BLOCK_N]``, both
    in natural order) for ``dX``, where the reduction runs over rows: the pairs a tensor-core
    register holds are rows ``n`` and ``n + 1`` at one column. Each half of the two rows' words is
    put side by side in one word (low halves, then high halves), so that bit ``j`` of row ``n`` and
    of row ``n + 1`` sit 16 bits apart and decode as in ``_int1_sign_pairs``: one shift and one
    LOP3 a pair. The per-row scale (``a2, a_lo, a_hi`` from ``_pair_scales_t``: α, or ones) costs
    nothing per weight: its two rows' bits, in the decode's dtype, take the place of the pair of
    1.0s, and the set bit flips their signs (``-α`` for a clear bit: an xor, which for ``α ≥ 0`` is
    the or of 1.0's case). ``words`` (``_int1_words_t``) start at an even row; ``BLOCK_N`` is even."""
    words = words.to(tl.uint32, bitcast=True)
    # [BLOCK_N/2, BLOCK_K/32, 2]: the words of rows 2p and 2p + 1 side by side
    even, odd = tl.split(tl.permute(tl.reshape(words, (BLOCK_N // 2, 2, BLOCK_K // 32)), (0, 2, 1)))
    low = (even & 0xFFFF) | (odd << 16)  # bits 0-15 of both rows
    high = (even >> 16) | (odd & 0xFFFF0000)  # bits 16-31
    halves = tl.join(low, high)[:, :, :, None]  # [p, word, half, 1]
    j = tl.arange(0, 16).to(tl.uint32)[None, None, None, :]
    lo, hi = _signed_pairs(halves, 15 - j, a2[:, None, None, None], a_lo[:, None, None, None],
                           a_hi[:, None, None, None], WDT)
    # [p, word, half, j, row of the pair] -> [k = 32·word + 16·half + j, n = 2p + row]
    pairs = tl.permute(tl.join(lo, hi), (1, 2, 3, 0, 4))
    return tl.reshape(pairs, (BLOCK_K, BLOCK_N))


@triton.jit
def _pair_order(t, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """The columns of ``t [ROWS, BLOCK_K]`` in the order ``_int1_sign_pairs`` decodes: in each
    32-column block, ``q + 16e`` moves to ``2q + e``. The reduction runs in that order on both
    operands, so the product is unchanged."""
    return tl.reshape(tl.permute(tl.reshape(t, (ROWS, BLOCK_K // 32, 2, 16)), (0, 1, 3, 2)), (ROWS, BLOCK_K))


def pair_ones(dtype: torch.dtype) -> int:
    """``ONE2`` of ``_int1_sign_pairs`` for activations of ``dtype``: two 1.0s in one 32-bit word
    (0 where the decode is fp32 and takes none)."""
    wdt = decode_dtype(dtype)
    return 0x3C003C00 if wdt == W_FP16 else (0x3F803F80 if wdt == W_BF16 else 0)


@triton.jit
def _int1_group_scale(scale_ptr, offs_n, offs_k, N, K, G, group_size):
    """``α[n, k // group_size]`` as fp32 ``[BLOCK_N, BLOCK_K]`` (the per-group mode only)."""
    n = offs_n[:, None]
    k = offs_k[None, :]
    return tl.load(scale_ptr + n * G + k // group_size, mask=(n < N) & (k < K), other=0.0).to(tl.float32)


@triton.jit
def _sparse4x4_tile(values_ptr, pos_ptr, n0, k0, N, K, TK, PW, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The kept value of each 4x4 tile at its position, 0 elsewhere, ``[BLOCK_N, BLOCK_K]`` in the
    values' dtype.

    ``n0`` and ``k0`` are multiples of 4 and 8: the ``[BLOCK_N/4, BLOCK_K/4]`` values and
    ``[BLOCK_N/4, BLOCK_K/8]`` position bytes are loaded once and spread over their tiles. Tiles
    past the edge decode to 0; inside an edge tile, elements past ``N``/``K`` are not masked (the
    kernels zero ``x``/``dY`` there and never store those rows).
    """
    TN_B: tl.constexpr = BLOCK_N // 4
    TK_B: tl.constexpr = BLOCK_K // 4
    tn = n0 // 4 + tl.arange(0, TN_B)
    tk = k0 // 4 + tl.arange(0, TK_B)
    vals = tl.load(values_ptr + tn[:, None] * TK + tk[None, :],
                   mask=(tn[:, None] * 4 < N) & (tk[None, :] * 4 < K), other=0.0)
    pb = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    byte = tl.load(pos_ptr + tn[:, None] * PW + pb[None, :], mask=(tn[:, None] * 4 < N) & (pb[None, :] * 8 < K),
                   other=0).to(tl.int32)
    nib = (byte[:, :, None] >> (tl.arange(0, 2) * 4)[None, None, :]) & 15  # low nibble: even tile column
    nib = tl.reshape(nib, (TN_B, TK_B))
    # spread each tile's value and position over its 4x4 elements
    vals4 = tl.reshape(tl.broadcast_to(vals[:, None, :, None], (TN_B, 4, TK_B, 4)), (BLOCK_N, BLOCK_K))
    nib4 = tl.reshape(tl.broadcast_to(nib[:, None, :, None], (TN_B, 4, TK_B, 4)), (BLOCK_N, BLOCK_K))
    # row-major flat position inside the tile: loop-invariant, so computed once per program
    flat = (tl.arange(0, BLOCK_N) % 4)[:, None] * 4 + (tl.arange(0, BLOCK_K) % 4)[None, :]
    return tl.where(nib4 == flat, vals4, 0.0)


def decode_dtype(dtype: torch.dtype) -> int:
    """``W_FP16``/``W_BF16``/``W_FP32``: what the kernels decode Ŵ to for activations of ``dtype``
    (fp32 for bf16 under the interpreter, which cannot multiply bf16)."""
    if dtype == torch.float16:
        return W_FP16
    if dtype == torch.bfloat16 and not interpreter_upcast(dtype):
        return W_BF16
    return W_FP32


# Whether the kernels were defined for Triton's interpreter (TRITON_INTERPRET=1 when they were
# made): fixed from then on, and read on every launch, so not looked up in the environment each time
INTERPRETED = type(_dot).__name__ == "InterpretedFunction"


def use_asm() -> bool:
    """Whether the kernels may use inline PTX (``_rotl``): everywhere but Triton's interpreter."""
    return not INTERPRETED


def interpreter_upcast(dtype: torch.dtype) -> bool:
    """Whether the kernels must feed ``tl.dot`` fp32 copies of bf16 tiles: the Triton interpreter
    (numpy, which has no bfloat16) multiplies bf16 operands as raw bits. Never on a GPU."""
    return INTERPRETED and dtype == torch.bfloat16


def weight_args(fmt: str, tensors: Dict[str, torch.Tensor], meta: Dict) -> Tuple[list, list, int]:
    """The kernel's three weight pointers, four format integers and the int1 scale mode
    (``decode.SCALE_ROW``, ``SCALE_GROUP`` or ``SCALE_ONEBIT``; 0 for sparse4x4).

    int1: ``packed [N, KW]``, ``scale [N, G]``, ``col_scale [K]`` (onebit) and
    ``(KW, G, group_size, 0)``; sparse4x4: ``values [TN, TK]``, ``positions [TN, PW]`` and
    ``(TK, PW, 0, 0)``.
    """
    if fmt == "int1":
        packed, scale = tensors["packed"].contiguous(), tensors["scale"].contiguous()
        onebit = meta["scale_mode"] == "onebit"
        col = tensors["col_scale"].contiguous() if onebit else scale
        K = meta["K"]
        group = meta.get("group_size") or K
        mode = SCALE_ONEBIT if onebit else (SCALE_ROW if scale.shape[1] == 1 else SCALE_GROUP)
        return [packed, scale, col], [packed.shape[1], scale.shape[1], group, 0], mode
    if fmt == "sparse4x4":
        values, positions = tensors["values"].contiguous(), tensors["positions"].contiguous()
        return [values, positions, values], [values.shape[1], positions.shape[1], 0, 0], 0
    raise ValueError(f"no Triton kernel for weight format {fmt!r}")


def lora_prologue(x: torch.Tensor, lora_A, lora_B):
    """``(xa = x·Aᵀ [M, r], B [N, r], r)`` in ``x``'s dtype, contiguous, for the forward kernels'
    epilogue (tiny next to the weight stream); ``(None, None, 1)`` without LoRA."""
    if lora_A is None:
        return None, None, 1
    return (x @ lora_A.to(x.dtype).t()).contiguous(), lora_B.to(x.dtype).contiguous(), lora_A.shape[0]


def lora_and_bias_args(x: torch.Tensor, lora_A, lora_B, bias):
    """``(A, B, bias)`` as the kernels read them: in ``x``'s dtype (as the reference adds them;
    the dense-slab path hands the bias to cuBLAS, which refuses a mix), all three contiguous (the
    kernels step along A's inputs, B's rank and the bias with stride 1); the same tensors when
    they already are, None where None."""
    if bias is not None:
        bias = (bias if bias.dtype == x.dtype else bias.to(x.dtype)).contiguous()
    if lora_A is None:
        return None, None, bias
    dt = x.dtype
    if lora_A.dtype == dt and lora_B.dtype == dt:  # the usual case: skip two .to() calls (host time)
        return lora_A.contiguous(), lora_B.contiguous(), bias
    return lora_A.to(dt).contiguous(), lora_B.to(dt).contiguous(), bias


def split_plan(total: int, block: int, split: int) -> Tuple[int, int]:
    """``(programs, length per program)`` to split a reduction of ``total`` into at most ``split``
    slices of whole ``block``s (slice starts stay aligned to the block, hence to int1 words)."""
    split = max(1, min(split, cdiv(total, block)))
    per = cdiv(cdiv(total, split), block) * block
    return cdiv(total, per), per


def output_buffer(rows: int, cols: int, like: torch.Tensor, split: int) -> torch.Tensor:
    """Where a kernel writes: zeros in fp32 when split partial sums meet through atomics, fp32 in
    the interpreter for bf16 (it truncates fp32 → bf16 where a GPU rounds), else the input dtype."""
    fp32 = split > 1 or interpreter_upcast(like.dtype)
    make = torch.zeros if split > 1 else torch.empty
    return make(rows, cols, device=like.device, dtype=torch.float32 if fp32 else like.dtype)
