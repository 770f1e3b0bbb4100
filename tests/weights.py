"""Test helpers: a weight of a named kind from a dense matrix (shared by the op and kernel tests),
and tensors in views whose data pointer is or is not 16-byte aligned."""

import re

import torch

from loraq.formats import DenseWeight, Int1Weight, Sparse4x4Weight


def make_weight(kind: str, W):
    """``tensor`` (W itself), ``dense``, ``int1``, ``int1_g<N>`` (groups of N), ``int1_onebit``, ``sparse4x4``."""
    if kind == "tensor":
        return W.clone()
    if kind == "dense":
        return DenseWeight.from_dense(W)
    if kind == "int1":
        return Int1Weight.from_dense(W)
    group = re.fullmatch(r"int1_g(\d+)", kind)
    if group:
        return Int1Weight.from_dense(W, group_size=int(group.group(1)))
    if kind == "int1_onebit":
        return Int1Weight.from_dense(W, scale="onebit")
    if kind == "sparse4x4":
        return Sparse4x4Weight.from_dense(W)
    raise AssertionError(f"unknown weight kind {kind!r}")


def offset_view(t: torch.Tensor, elems: int) -> torch.Tensor:
    """``t``'s values in a view that starts ``elems`` elements into a larger buffer (as a row slice
    of a bigger tensor, or x[1:], does): its data pointer is not 16-byte aligned."""
    view = torch.empty(t.numel() + elems, dtype=t.dtype, device=t.device)[elems:].view(t.shape)
    view.copy_(t)
    return view


def aligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` whose data starts 16-byte aligned (the 16-byte load path's need)."""
    flat = torch.empty(t.numel() * t.element_size() + 16, dtype=torch.uint8)
    start = (-flat.data_ptr()) % 16
    out = flat[start:start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out
