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

import os
from typing import Dict, Tuple

import torch
import triton
import triton.language as tl

SCALE_ROW, SCALE_GROUP, SCALE_ONEBIT = 0, 1, 2


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
def _int1_signs(packed_ptr, offs_n, k0, N, K, KW, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """±1.0 (fp32) for ``Ŵ[offs_n, k0:k0+BLOCK_K]``'s signs; ``k0`` is a multiple of 32."""
    offs_w = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    words = tl.load(packed_ptr + offs_n[:, None] * KW + offs_w[None, :],
                    mask=(offs_n[:, None] < N) & (offs_w[None, :] * 32 < K), other=0)
    bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1  # bit j of word w is k = 32w + j
    bits = tl.reshape(bits, (BLOCK_N, BLOCK_K))
    offs_k = k0 + tl.arange(0, BLOCK_K)
    inside = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    return tl.where(inside, tl.where(bits != 0, 1.0, -1.0), 0.0)


@triton.jit
def _int1_group_scale(scale_ptr, offs_n, offs_k, N, K, G, group_size):
    """``α[n, k // group_size]`` as fp32 ``[BLOCK_N, BLOCK_K]`` (the per-group mode only)."""
    n = offs_n[:, None]
    k = offs_k[None, :]
    return tl.load(scale_ptr + n * G + k // group_size, mask=(n < N) & (k < K), other=0.0).to(tl.float32)


@triton.jit
def _sparse4x4_tile(values_ptr, pos_ptr, n0, k0, N, K, TK, PW, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The kept value of each 4x4 tile at its position, 0 elsewhere, as fp32 ``[BLOCK_N, BLOCK_K]``.

    ``n0`` and ``k0`` are multiples of 4 and 8: the ``[BLOCK_N/4, BLOCK_K/4]`` values and
    ``[BLOCK_N/4, BLOCK_K/8]`` position bytes are loaded once and spread over their tiles.
    """
    TN_B: tl.constexpr = BLOCK_N // 4
    TK_B: tl.constexpr = BLOCK_K // 4
    tn = n0 // 4 + tl.arange(0, TN_B)
    tk = k0 // 4 + tl.arange(0, TK_B)
    tiles_in = (tn[:, None] * 4 < N) & (tk[None, :] * 4 < K)
    vals = tl.load(values_ptr + tn[:, None] * TK + tk[None, :], mask=tiles_in, other=0.0).to(tl.float32)
    pb = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    byte = tl.load(pos_ptr + tn[:, None] * PW + pb[None, :], mask=(tn[:, None] * 4 < N) & (pb[None, :] * 8 < K),
                   other=0).to(tl.int32)
    nib = (byte[:, :, None] >> (tl.arange(0, 2) * 4)[None, None, :]) & 15  # low nibble: even tile column
    nib = tl.reshape(nib, (TN_B, TK_B))
    # spread each tile's value and position over its 4x4 elements
    vals4 = tl.reshape(tl.broadcast_to(vals[:, None, :, None], (TN_B, 4, TK_B, 4)), (BLOCK_N, BLOCK_K))
    nib4 = tl.reshape(tl.broadcast_to(nib[:, None, :, None], (TN_B, 4, TK_B, 4)), (BLOCK_N, BLOCK_K))
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    here = nib4 == (offs_n[:, None] % 4) * 4 + (offs_k[None, :] % 4)  # row-major flat position in the tile
    inside = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    return tl.where(here & inside, vals4, 0.0)


def interpreter_upcast(dtype: torch.dtype) -> bool:
    """Whether the kernels must feed ``tl.dot`` fp32 copies of bf16 tiles: the Triton interpreter
    (numpy, which has no bfloat16) multiplies bf16 operands as raw bits. Never on a GPU."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


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


def split_plan(total: int, block: int, split: int) -> Tuple[int, int]:
    """``(programs, length per program)`` to split a reduction of ``total`` into at most ``split``
    slices of whole ``block``s (slice starts stay aligned to the block, hence to int1 words)."""
    split = max(1, min(split, triton.cdiv(total, block)))
    per = triton.cdiv(triton.cdiv(total, split), block) * block
    return triton.cdiv(total, per), per


def output_buffer(rows: int, cols: int, like: torch.Tensor, split: int) -> torch.Tensor:
    """Where a kernel writes: zeros in fp32 when split partial sums meet through atomics, fp32 in
    the interpreter for bf16 (it truncates fp32 → bf16 where a GPU rounds), else the input dtype."""
    fp32 = split > 1 or interpreter_upcast(like.dtype)
    make = torch.zeros if split > 1 else torch.empty
    return make(rows, cols, device=like.device, dtype=torch.float32 if fp32 else like.dtype)
