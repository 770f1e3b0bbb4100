"""1-bit (binarized) weights: ``Ŵ = α ⊙ sign(W)``, one bit per weight plus scales.

Layout (the contract with the kernels):

* ``packed``: int32 ``[N, ceil(K/32)]``; bit ``j`` of word ``w`` in row ``n`` is the sign of
  ``W[n, 32*w + j]`` (1 means ``+1``, 0 means ``-1``; ``sign(0) = +1``). Padding bits are 0
  and never read back.
* ``scale``: ``[N, G]`` in the weight dtype. With ``scale="mean_abs"`` ``G = ceil(K/group_size)``
  (``G = 1`` per row) and ``scale[n, g] = mean |W[n, group g]|`` over the real elements of the
  group. With ``scale="onebit"`` ``G = 1`` and it holds ``h`` of ``Ŵ = diag(h)·sign(W)·diag(g)``.
* ``col_scale``: ``[K]`` holding ``g`` for ``"onebit"``; empty for ``"mean_abs"``.
"""

from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch

from .base import FLOAT_DTYPES, CompressedWeight, check_dense_weight

SCALE_MODES = ("mean_abs", "onebit")
_BIT_SHIFTS = torch.arange(32, dtype=torch.int64)


def pack_sign_bits(W: torch.Tensor) -> torch.Tensor:
    """Pack ``W >= 0`` along the last dim into int32 words of 32 bits (LSB = lowest k)."""
    N, K = W.shape
    words = (K + 31) // 32
    bits = torch.zeros(N, words * 32, dtype=torch.int64, device=W.device)
    bits[:, :K] = (W >= 0).to(torch.int64)
    values = (bits.view(N, words, 32) << _BIT_SHIFTS.to(W.device)).sum(-1)
    # Wrap the unsigned 32-bit value into int32's range explicitly (no reliance on cast overflow).
    values = torch.where(values >= 2**31, values - 2**32, values)
    return values.to(torch.int32)


def unpack_sign_bits(packed: torch.Tensor, K: int) -> torch.Tensor:
    """Inverse of :func:`pack_sign_bits`: a bool tensor ``[N, K]`` that is True where the sign is +1."""
    N, words = packed.shape
    shifts = _BIT_SHIFTS.to(device=packed.device, dtype=torch.int32)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(N, words * 32)[:, :K].bool()


def _group_mean_abs(W: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[N, G]`` mean of ``|W|`` per group; a partial last group averages only its real elements."""
    N, K = W.shape
    G = (K + group_size - 1) // group_size
    acc = torch.promote_types(W.dtype, torch.float32)  # float64 weights keep float64 accuracy
    A = torch.zeros(N, G * group_size, dtype=acc, device=W.device)
    A[:, :K] = W.abs().to(acc)
    counts = torch.full((G,), float(group_size), dtype=acc, device=W.device)
    counts[-1] = K - (G - 1) * group_size
    return A.view(N, G, group_size).sum(-1) / counts


def _rank1_nonnegative(M: torch.Tensor, iters: int = 500, tol: float = 1e-13) -> Tuple[torch.Tensor, torch.Tensor]:
    """``h, g`` with ``h gᵀ`` the best rank-1 approximation of a non-negative matrix (SVID).

    Power iteration from the all-ones vector: for a non-negative matrix the leading singular
    vectors are non-negative (Perron-Frobenius), so no sign fix-up is needed and the result is
    deterministic.
    """
    v = torch.ones(M.shape[1], dtype=torch.float64, device=M.device)
    v = v / v.norm()
    Md = M.double()
    for _ in range(iters):
        u = Md @ v
        v_new = Md.t() @ u
        norm = v_new.norm()
        if norm == 0:
            break
        v_new = v_new / norm
        done = (v_new - v).abs().max() < tol
        v = v_new
        if done:
            break
    sigma_u = Md @ v  # = sigma * u
    sigma = sigma_u.norm()
    if sigma == 0:
        return torch.zeros(M.shape[0], dtype=Md.dtype, device=M.device), torch.zeros(M.shape[1], dtype=Md.dtype, device=M.device)
    u = sigma_u / sigma
    root = sigma.sqrt()
    return u * root, v * root  # float64: the caller rounds once to the weight dtype


class Int1Weight(CompressedWeight):
    """A binarized weight: 1 bit per weight plus per-row / per-group / SVID scales."""

    kind = "int1"
    _tensor_names = ("packed", "scale", "col_scale")
    _meta_names = ("shape", "group_size", "scale_mode")

    def __init__(
        self,
        packed: torch.Tensor,
        scale: torch.Tensor,
        col_scale: torch.Tensor,
        shape: Tuple[int, int],
        group_size: Optional[int] = None,
        scale_mode: str = "mean_abs",
    ):
        self.packed = packed
        self.scale = scale
        self.col_scale = col_scale
        self.shape = (int(shape[0]), int(shape[1]))
        self.group_size = None if group_size is None else int(group_size)
        self.scale_mode = scale_mode

    @classmethod
    def from_dense(
        cls, W: torch.Tensor, group_size: Optional[int] = None, scale: str = "mean_abs"
    ) -> "Int1Weight":
        """Binarize ``W`` ``[N, K]``.

        Args:
            W: the dense weight (float32, float16, bfloat16 or float64, finite).
            group_size: inputs sharing one scale per row; ``None`` for one scale per row.
            scale: ``"mean_abs"`` (L2-optimal scale per row/group for the sign pattern) or
                ``"onebit"`` (``Ŵ = diag(h)·sign(W)·diag(g)``, ``h gᵀ`` the rank-1 SVD of ``|W|``).
        """
        check_dense_weight(W)
        W = W.detach()  # the compressed weight is frozen data, never part of W's autograd graph
        if scale not in SCALE_MODES:
            raise ValueError(f"scale must be one of {SCALE_MODES}, got {scale!r}")
        N, K = W.shape
        if group_size is not None:
            if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1:
                raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
            group_size = int(group_size)  # a numpy integer too
            if scale == "onebit":
                raise ValueError("group_size applies to scale='mean_abs' only; 'onebit' has one scale per row and column")
        packed = pack_sign_bits(W)
        if scale == "mean_abs":
            s = _group_mean_abs(W, group_size or K)
            col = torch.empty(0, dtype=W.dtype, device=W.device)
        else:
            h, g = _rank1_nonnegative(W.abs())
            s, col = h.unsqueeze(1), g.to(W.dtype)
        return cls(packed, s.to(W.dtype), col, (N, K), group_size, scale)

    @classmethod
    def empty(cls, shape, dtype, device=None, group_size=None, scale="mean_abs") -> "Int1Weight":
        N, K = shape
        G = 1 if group_size is None else -(-K // group_size)
        col = torch.zeros(K if scale == "onebit" else 0, dtype=dtype, device=device)
        return cls(torch.zeros(N, (K + 31) // 32, dtype=torch.int32, device=device),
                   torch.zeros(N, G, dtype=dtype, device=device), col, (N, K), group_size, scale)

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    def signs(self) -> torch.Tensor:
        """``sign(W)`` as ±1 in the weight dtype, ``[N, K]``."""
        pos = unpack_sign_bits(self.packed, self.shape[1])
        one = torch.ones((), dtype=self.dtype, device=self.packed.device)
        return torch.where(pos, one, -one)

    def dequantize(self) -> torch.Tensor:
        """The dense ``Ŵ`` ``[N, K]`` in the weight dtype."""
        N, K = self.shape
        signs = self.signs()
        if self.scale_mode == "onebit":
            # One rounding to the target dtype: h·g computed in float32 (float64 for float64 weights).
            acc = torch.promote_types(self.dtype, torch.float32)
            outer = self.scale.to(acc) * self.col_scale.to(acc).unsqueeze(0)
            return (signs.to(acc) * outer).to(self.dtype)
        gs = self.group_size or K
        alpha = self.scale.repeat_interleave(gs, dim=1)[:, :K]
        return signs * alpha  # exact: α times ±1

    def _rows(self, start: int, stop: int) -> "Int1Weight":
        # packed and scale have a row per weight row; onebit's g (col_scale) is per input
        return Int1Weight(self.packed[start:stop], self.scale[start:stop], self.col_scale,
                          (stop - start, self.shape[1]), self.group_size, self.scale_mode)

    @classmethod
    def _encode_meta(cls, name, value):
        if name == "scale_mode":
            return SCALE_MODES.index(value)
        return super()._encode_meta(name, value)

    @classmethod
    def _decode_meta(cls, name, value):
        if name == "scale_mode":
            if not 0 <= value < len(SCALE_MODES):
                raise ValueError(f"unknown int1 scale mode code {value}")
            return SCALE_MODES[value]
        if name == "group_size" and value != -1 and value < 1:
            raise ValueError(f"Int1Weight: group_size must be ≥ 1 (or -1 for none), got {value}")
        return super()._decode_meta(name, value)

    def _check_consistent(self) -> None:
        N, K = self.shape
        if self.scale_mode == "onebit" and self.group_size is not None:
            raise ValueError("Int1Weight: scale mode 'onebit' has no group_size")
        if self.scale.dtype not in FLOAT_DTYPES or self.col_scale.dtype != self.scale.dtype:
            raise ValueError(f"Int1Weight: scale and col_scale must share one floating dtype, got "
                             f"{self.scale.dtype} and {self.col_scale.dtype}")
        G = 1 if (self.group_size is None or self.scale_mode == "onebit") else -(-K // self.group_size)
        expect = {"packed": (N, (K + 31) // 32), "scale": (N, G),
                  "col_scale": (K,) if self.scale_mode == "onebit" else (0,)}
        for n, shp in expect.items():
            if tuple(getattr(self, n).shape) != shp:
                raise ValueError(f"Int1Weight: {n} has shape {tuple(getattr(self, n).shape)}, expected {shp}")
        if self.packed.dtype != torch.int32:
            raise ValueError(f"Int1Weight: packed must be int32, got {self.packed.dtype}")

    def __repr__(self) -> str:
        base = super().__repr__()[:-1]
        return f"{base}, scale={self.scale_mode!r}, group_size={self.group_size})"
