"""Decoding a tile of the packed weight ``Ŵ[offs_n, offs_k]`` into fp32 registers.

Shared by the forward (``x·Ŵᵀ``) and backward (``dY·Ŵ``) kernels; both layouts are the ones
documented in ``loraq/formats/int1.py`` and ``loraq/formats/sparse4x4.py``. Elements outside
``[N, K]`` decode to 0, so padding never reaches a result.
"""

import triton
import triton.language as tl


@triton.jit
def _int1_tile(packed_ptr, scale_ptr, col_ptr, offs_n, offs_k, N, K, KW, G, group_size, ONEBIT: tl.constexpr):
    """``α · sign`` (or ``h_n · sign · g_k`` for onebit, in fp32) as fp32 ``[BN, BK]``."""
    n = offs_n[:, None]
    k = offs_k[None, :]
    inside = (n < N) & (k < K)
    words = tl.load(packed_ptr + n * KW + k // 32, mask=inside, other=0)
    bit = (words >> (k % 32)) & 1
    sign = tl.where(bit != 0, 1.0, -1.0)
    if ONEBIT:
        h = tl.load(scale_ptr + n, mask=n < N, other=0.0).to(tl.float32)
        g = tl.load(col_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        w = sign * (h * g)  # the caller rounds it once, to the activation dtype

    else:
        a = tl.load(scale_ptr + n * G + k // group_size, mask=inside, other=0.0).to(tl.float32)
        w = sign * a
    return tl.where(inside, w, 0.0)


@triton.jit
def _sparse4x4_tile(values_ptr, pos_ptr, offs_n, offs_k, N, K, TK, PW):
    """The kept value of each 4x4 tile at its position, 0 elsewhere, as fp32 ``[BN, BK]``."""
    n = offs_n[:, None]
    k = offs_k[None, :]
    inside = (n < N) & (k < K)
    tn = n // 4
    tk = k // 4
    byte = tl.load(pos_ptr + tn * PW + tk // 2, mask=inside, other=0).to(tl.int32)
    nibble = (byte >> ((tk % 2) * 4)) & 15  # low nibble: even tile column
    here = nibble == (n % 4) * 4 + (k % 4)  # row-major flat position inside the tile
    v = tl.load(values_ptr + tn * TK + tk, mask=inside & here, other=0.0).to(tl.float32)
    return tl.where(inside & here, v, 0.0)
