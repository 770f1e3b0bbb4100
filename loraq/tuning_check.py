"""The autotuner's check of each candidate's output against the reference, before it is timed.

A kernel config that is wrong on some GPU or compiler (one sparse4x4 ``dX`` tile gave errors of
17 to 34 on an H100 and only there) would otherwise win the tuning by its speed and give wrong
answers from then on. When the tuner times the candidates of a call, it first runs each one and
hands its output to the check made here, which compares a few rows of it with
:mod:`loraq.reference`'s answer on the call's own inputs: a config that fails is left out, with a
warning (``kernels/autotune.py``). Only tuning runs this; a cached winner is not checked again.

The reference rows are computed once a tuning, in fp32, with ``Ŵ`` dequantized a block of rows at
a time (``CompressedWeight.rows``): a few tens of MB, whatever the layer. The bound is loose on
purpose (``RTOL`` of the largest reference value of those rows): it must never refuse a correct
kernel for its rounding (the autotuner raises when every candidate is refused), only catch one
that computes something else.
"""

from __future__ import annotations

import abc
import logging
from typing import Dict, List, Optional

import torch

from .formats import CompressedWeight, format_class

# |out − ref| allowed, as a fraction of the largest |ref| in the rows checked: a correct fp16
# kernel is within about 1e-3 of it (its output's own rounding), a broken one off by O(1)
RTOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 4e-2}
ROWS_CHECKED = 4  # rows of the batch compared: the first, the last and two between
CHUNK_ELEMENTS = 1 << 22  # weight elements dequantized at a time (16 MB in fp32)

_LOG = logging.getLogger("loraq")


def checked_rows(start: int, stop: int) -> List[int]:
    """The rows of ``[start, stop)`` compared: the first, the last, and ``ROWS_CHECKED - 2`` spread
    between them (edges are where tiling and masking go wrong)."""
    n = stop - start
    picks = {0, n - 1} | {n * (i + 1) // (ROWS_CHECKED - 1) for i in range(ROWS_CHECKED - 2)}
    return sorted(start + i for i in picks if 0 <= i < n)


def weight_from_args(fmt: str, tensors: Dict[str, torch.Tensor], meta: Dict) -> CompressedWeight:
    """The format object for a launcher's ``tensors``/``meta`` (``kernels.decode.weight_args``'s
    inputs)."""
    options = {}
    if fmt == "int1":
        options = {"group_size": meta.get("group_size"), "scale_mode": meta.get("scale_mode", "mean_abs")}
    return format_class(fmt)(**tensors, shape=(meta["N"], meta["K"]), **options)


def _row_blocks(weight: CompressedWeight):
    """``(start, stop, Ŵ[start:stop] in fp32)`` covering every row, about ``CHUNK_ELEMENTS`` each."""
    N, K = weight.shape
    step = weight._row_step
    rows = max(step, CHUNK_ELEMENTS // max(K, 1) // step * step)
    for start in range(0, N, rows):
        stop = min(N, start + rows)
        yield start, stop, weight.rows(start, stop).dequantize().float()


def _verdict(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> Optional[str]:
    """None when ``out`` (the kernel's rows) matches ``ref`` (fp32) within ``RTOL``, else why not.
    Outputs whose reference is not finite (an inf or NaN input) are not judged."""
    got = out.float()
    finite = torch.isfinite(ref)
    lost = finite & ~torch.isfinite(got)
    if bool(lost.any()):
        return f"{int(lost.sum())} outputs are inf or NaN where the reference is finite"
    if not bool(finite.any()):
        return None
    err = float((got - ref).abs()[finite].max())
    scale = float(ref.abs()[finite].max())
    allowed = RTOL.get(dtype, RTOL[torch.float32]) * scale
    if err > allowed:
        return (f"max |error| {err:.4g} against {allowed:.4g} allowed "
                f"({RTOL.get(dtype, 1e-3):g} of max |reference| {scale:.4g})")
    return None


class _ReferenceCheck(abc.ABC):
    """A check (``check(out) -> None or why``) of ``out``, a launcher's output for the rows of its
    input from ``row0``, against reference rows computed once a tuning (``_reference``). Made on
    every call that may tune, so it only stores its arguments until it is called."""

    __slots__ = ("_args", "row0", "_refs")

    def __init__(self, args: tuple, row0: int = 0, refs: Optional[dict] = None):
        self._args = args
        self.row0 = row0
        self._refs = refs  # reference rows by the rows checked (shared with from_row's copies)

    def from_row(self, row0: int) -> "_ReferenceCheck":
        """The check of the outputs for the rows from ``row0`` of the rows this one checks (a
        launcher that splits its batch passes each block its own)."""
        if self._refs is None:
            self._refs = {}
        return type(self)(self._args, self.row0 + row0, self._refs)

    @abc.abstractmethod
    def _reference(self, rows: List[int]) -> torch.Tensor:
        """The reference rows ``rows`` of the output, fp32."""

    def __call__(self, out: torch.Tensor) -> Optional[str]:
        if self._refs is None:
            self._refs = {}
        if self._refs.get("failed") or out.dim() != 2 or out.shape[0] == 0:
            return None
        rows = checked_rows(self.row0, self.row0 + out.shape[0])
        key = tuple(rows)
        if key not in self._refs:
            try:
                self._refs[key] = self._reference(rows)
            except Exception as e:  # out of memory, say: tune without the check rather than fail the call
                self._refs["failed"] = True
                _LOG.warning("loraq autotune: the reference check could not run (%s: %s); tuning unchecked",
                             type(e).__name__, e)
                return None
        return _verdict(out[[r - self.row0 for r in rows]], self._refs[key], self._args[0].dtype)


class _ForwardCheck(_ReferenceCheck):
    __slots__ = ()

    def _reference(self, rows: List[int]) -> torch.Tensor:
        x, fmt, tensors, meta, lora_A, lora_B, scaling, bias = self._args
        xs = x[rows].float()
        weight = weight_from_args(fmt, tensors, meta)
        y = torch.cat([xs @ W.t() for _, _, W in _row_blocks(weight)], dim=1)
        if lora_A is not None:
            y += scaling * ((xs @ lora_A.float().t()) @ lora_B.float().t())
        if bias is not None:
            y += bias.float()
        return y


class _DxCheck(_ReferenceCheck):
    __slots__ = ()

    def _reference(self, rows: List[int]) -> torch.Tensor:
        dy, fmt, tensors, meta, lora_A, dy_B, scaling = self._args
        dys = dy[rows].float()
        weight = weight_from_args(fmt, tensors, meta)
        dx = torch.zeros(len(rows), meta["K"], dtype=torch.float32, device=dy.device)
        for start, stop, W in _row_blocks(weight):
            dx += dys[:, start:stop] @ W
        if lora_A is not None:
            dx += scaling * (dy_B[rows].float() @ lora_A.float())
        return dx


def forward_check(x: torch.Tensor, fmt: str, tensors, meta, lora_A=None, lora_B=None, scaling: float = 1.0,
                  bias=None) -> _ReferenceCheck:
    """The check of ``kernels.lora_linear_fwd``'s outputs for these arguments (the launcher's own):
    ``y = x·Ŵᵀ + s·(x·Aᵀ)·Bᵀ + b`` on the rows ``checked_rows`` picks."""
    return _ForwardCheck((x, fmt, tensors, meta, lora_A, lora_B, scaling, bias))


def dx_check(dy: torch.Tensor, fmt: str, tensors, meta, lora_A=None, dy_B=None, scaling: float = 1.0
             ) -> _ReferenceCheck:
    """The check of ``kernels.lora_linear_dx``'s outputs: ``dX = dY·Ŵ + s·(dY·B)·A`` on the rows
    ``checked_rows`` picks."""
    return _DxCheck((dy, fmt, tensors, meta, lora_A, dy_B, scaling))


__all__ = ["forward_check", "dx_check", "checked_rows", "weight_from_args", "RTOL", "ROWS_CHECKED"]
