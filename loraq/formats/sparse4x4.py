"""1:16 block-sparse weights: in each 4x4 tile keep only the element of largest ``|w|``.

Layout (the contract with the kernels), with ``TN = ceil(N/4)`` tile rows and
``TK = ceil(K/4)`` tile columns (``W`` is zero-padded to multiples of 4 internally):

* ``values``: ``[TN, TK]`` in the weight dtype, the kept element of each tile.
* ``positions``: uint8 ``[TN, ceil(TK/2)]``, two 4-bit positions per byte: the low nibble
  belongs to the even tile column, the high nibble to the odd one. A position ``p`` is the
  flat index inside the tile, row-major: tile row ``p // 4``, tile column ``p % 4``.

Ties in ``|w|`` go to the lowest flat index. That is about 1.25 bits per weight in fp16
(16 value bits + 4 position bits per 16 weights).
"""

from __future__ import annotations

from typing import Tuple

import torch

from .base import FLOAT_DTYPES, CompressedWeight, check_dense_weight


def _to_tiles(W: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` → ``[TN, TK, 16]`` (zero-padded), flat index row-major inside each tile."""
    N, K = W.shape
    TN, TK = -(-N // 4), -(-K // 4)
    P = torch.zeros(TN * 4, TK * 4, dtype=W.dtype, device=W.device)
    P[:N, :K] = W
    return P.view(TN, 4, TK, 4).permute(0, 2, 1, 3).reshape(TN, TK, 16)


def _from_tiles(T: torch.Tensor, N: int, K: int) -> torch.Tensor:
    TN, TK, _ = T.shape
    return T.view(TN, TK, 4, 4).permute(0, 2, 1, 3).reshape(TN * 4, TK * 4)[:N, :K]


def pack_nibbles(pos: torch.Tensor) -> torch.Tensor:
    """``[TN, TK]`` values in 0..15 → uint8 ``[TN, ceil(TK/2)]`` (low nibble = even column)."""
    TN, TK = pos.shape
    padded = torch.zeros(TN, TK + (TK % 2), dtype=torch.int32, device=pos.device)
    padded[:, :TK] = pos.to(torch.int32)
    pairs = padded.view(TN, -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor, TK: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: int64 ``[TN, TK]``."""
    b = packed.to(torch.int64)
    return torch.stack((b & 15, b >> 4), dim=-1).reshape(packed.shape[0], -1)[:, :TK]


class Sparse4x4Weight(CompressedWeight):
    """A 1:16 block-sparse weight: one value and a 4-bit position per 4x4 tile."""

    kind = "sparse4x4"
    _tensor_names = ("values", "positions")
    _meta_names = ("shape",)

    def __init__(self, values: torch.Tensor, positions: torch.Tensor, shape: Tuple[int, int]):
        self.values = values
        self.positions = positions
        self.shape = (int(shape[0]), int(shape[1]))

    @classmethod
    def from_dense(cls, W: torch.Tensor) -> "Sparse4x4Weight":
        """Keep the largest-magnitude element of every 4x4 tile of ``W`` ``[N, K]``."""
        check_dense_weight(W)
        tiles = _to_tiles(W.detach())  # frozen data, never part of W's autograd graph
        # argmax returns the first maximal index, which is the documented tie rule. Magnitudes are
        # compared in W's dtype (16-bit ones widened exactly to float32), never rounded.
        mag = tiles.abs()
        pos = (mag.float() if W.element_size() < 4 else mag).argmax(dim=-1)
        values = tiles.gather(-1, pos.unsqueeze(-1)).squeeze(-1)
        return cls(values.contiguous(), pack_nibbles(pos), W.shape)

    @classmethod
    def empty(cls, shape, dtype, device=None) -> "Sparse4x4Weight":
        TN, TK = -(-shape[0] // 4), -(-shape[1] // 4)
        return cls(torch.zeros(TN, TK, dtype=dtype, device=device),
                   torch.zeros(TN, -(-TK // 2), dtype=torch.uint8, device=device), shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def tile_positions(self) -> torch.Tensor:
        """The flat position (0..15) of the kept element of every tile, int64 ``[TN, TK]``."""
        return unpack_nibbles(self.positions, self.values.shape[1])

    def dequantize(self) -> torch.Tensor:
        """The dense ``Ŵ`` ``[N, K]`` in the weight dtype (zeros except one element per tile)."""
        TN, TK = self.values.shape
        tiles = torch.zeros(TN, TK, 16, dtype=self.dtype, device=self.values.device)
        tiles.scatter_(-1, self.tile_positions().unsqueeze(-1), self.values.unsqueeze(-1))
        return _from_tiles(tiles, *self.shape)

    _row_step = 4  # a tile row holds 4 weight rows

    def _rows(self, start: int, stop: int) -> "Sparse4x4Weight":
        t0, t1 = start // 4, -(-stop // 4)  # the tile rows holding them (the last one cropped)
        return Sparse4x4Weight(self.values[t0:t1], self.positions[t0:t1], (stop - start, self.shape[1]))

    def _check_consistent(self) -> None:
        N, K = self.shape
        TN, TK = -(-N // 4), -(-K // 4)
        if self.values.dtype not in FLOAT_DTYPES:
            raise ValueError(f"Sparse4x4Weight: values must be floating point, got {self.values.dtype}")
        if tuple(self.values.shape) != (TN, TK):
            raise ValueError(f"Sparse4x4Weight: values has shape {tuple(self.values.shape)}, expected {(TN, TK)}")
        if tuple(self.positions.shape) != (TN, -(-TK // 2)) or self.positions.dtype != torch.uint8:
            raise ValueError(
                f"Sparse4x4Weight: positions must be uint8 {(TN, -(-TK // 2))}, "
                f"got {self.positions.dtype} {tuple(self.positions.shape)}"
            )
