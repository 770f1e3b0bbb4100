"""The uncompressed base: plain LoRA on a frozen dense weight, through the same code path."""

from __future__ import annotations

from typing import Tuple

import torch

from .base import CompressedWeight, check_dense_weight


class DenseWeight(CompressedWeight):
    """A frozen dense weight ``[N, K]`` stored as is (the plain-LoRA baseline)."""

    kind = "dense"
    _tensor_names = ("weight",)
    _meta_names = ("shape",)

    def __init__(self, weight: torch.Tensor, shape: Tuple[int, int] = None):
        self.weight = weight
        self.shape = tuple(weight.shape) if shape is None else (int(shape[0]), int(shape[1]))

    @classmethod
    def from_dense(cls, W: torch.Tensor) -> "DenseWeight":
        check_dense_weight(W)
        return cls(W.detach().clone(), tuple(W.shape))

    @classmethod
    def empty(cls, shape, dtype, device=None) -> "DenseWeight":
        return cls(torch.zeros(*shape, dtype=dtype, device=device), shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def dequantize(self) -> torch.Tensor:
        return self.weight

    def _rows(self, start: int, stop: int) -> "DenseWeight":
        return DenseWeight(self.weight[start:stop], (stop - start, self.shape[1]))

    def _check_consistent(self) -> None:
        if tuple(self.weight.shape) != self.shape:
            raise ValueError(f"DenseWeight: weight has shape {tuple(self.weight.shape)}, expected {self.shape}")
