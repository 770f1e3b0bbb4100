"""What every compressed weight format shares: validation, device/dtype moves, state dicts.

A format object is an immutable container of tensors describing a frozen weight ``Ŵ`` of
shape ``[N, K]`` (out, in). Subclasses declare their tensors in ``_tensor_names`` and their
scalar metadata in ``_meta_names``; everything else (``to``, ``state_dict``, ``nbytes``)
is derived from that, so a format never has to write its own bookkeeping.
"""

from __future__ import annotations

import abc
from typing import Callable, ClassVar, Dict, Tuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_dense_weight(W: torch.Tensor, name: str = "weight") -> None:
    """Raise a clear error unless ``W`` is a finite 2-D floating-point matrix."""
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out_features, in_features], got shape {tuple(W.shape)}")
    if W.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be floating point (float32, float16, bfloat16 or float64), got {W.dtype}; "
            "integer or already-quantized weights cannot be compressed again"
        )
    if W.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(W.shape)})")
    if W.device.type == "meta":  # no values to compress (a model built on the meta device)
        raise ValueError(f"{name} is on the meta device: it has no values to compress; materialize the model "
                         f"first (e.g. model.to_empty(device='cpu') and load its weights)")
    if not bool(torch.isfinite(W).all()):
        bad = int((~torch.isfinite(W)).sum())
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s); refusing to compress a non-finite weight")


class CompressedWeight(abc.ABC):
    """Base class of the weight formats (int1, sparse4x4, dense)."""

    kind: ClassVar[str] = ""
    _tensor_names: ClassVar[Tuple[str, ...]] = ()
    _meta_names: ClassVar[Tuple[str, ...]] = ()

    shape: Tuple[int, int]

    # -- what subclasses implement ---------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def from_dense(cls, W: torch.Tensor, **options) -> "CompressedWeight":
        """Compress a dense ``[N, K]`` weight."""

    @classmethod
    @abc.abstractmethod
    def empty(cls, shape: Tuple[int, int], dtype: torch.dtype, device=None, **options) -> "CompressedWeight":
        """A zero-filled weight with the tensor shapes ``from_dense`` would give (to load into)."""

    @abc.abstractmethod
    def dequantize(self) -> torch.Tensor:
        """The dense ``Ŵ`` ``[N, K]`` in the weight dtype."""

    @property
    @abc.abstractmethod
    def dtype(self) -> torch.dtype:
        """The dtype of ``dequantize()`` (that of the scales / values)."""

    # how many rows a row block of ``rows`` must start at a multiple of (sparse4x4 stores tiles of 4)
    _row_step: ClassVar[int] = 1

    def rows(self, start: int, stop: int) -> "CompressedWeight":
        """Rows ``start .. stop - 1`` of ``Ŵ`` as a weight of their own, sharing this one's storage
        (views, no copy): ``w.rows(a, b).dequantize()`` equals ``w.dequantize()[a:b]``. ``start``
        must be a multiple of the format's row step (4 for sparse4x4, whose tiles span 4 rows)."""
        N = self.shape[0]
        step = self._row_step
        ints = isinstance(start, int) and isinstance(stop, int)
        if not (ints and 0 <= start < stop <= N and start % step == 0):
            raise ValueError(f"{type(self).__name__}.rows: need 0 ≤ start < stop ≤ {N} with start a "
                             f"multiple of {step}, got start={start!r}, stop={stop!r}")
        return self._rows(start, stop)

    @abc.abstractmethod
    def _rows(self, start: int, stop: int) -> "CompressedWeight":
        """``rows`` after its checks: each format slices its own tensors."""

    # -- derived ---------------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self._tensor_names}

    def meta(self) -> Dict[str, object]:
        return {n: getattr(self, n) for n in self._meta_names}

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors().values())).device

    @property
    def nbytes(self) -> int:
        """Bytes really stored for this weight (all packed tensors and scales)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def dense_nbytes(self) -> int:
        """Bytes the same weight takes as a dense matrix in ``self.dtype``."""
        return self.shape[0] * self.shape[1] * torch.tensor([], dtype=self.dtype).element_size()

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "CompressedWeight":
        """A new object with ``fn`` applied to every tensor (what ``nn.Module._apply`` needs)."""
        return type(self)(**{**self.meta(), **{n: fn(t) for n, t in self.tensors().items()}})

    def to(self, device=None, dtype=None) -> "CompressedWeight":
        """Move to ``device`` and/or cast the floating-point tensors (scales, values) to ``dtype``.

        Like ``Tensor.to``, a dtype may be given positionally: ``w.to(torch.float16)``.
        """
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")

        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            return t.to(device) if device is not None else t

        return self._apply(move)

    # -- state dicts: metadata travels as small int64 tensors so safetensors can hold it ----
    def state_dict(self) -> Dict[str, torch.Tensor]:
        sd = {n: t for n, t in self.tensors().items()}
        sd["shape"] = torch.tensor(list(self.shape), dtype=torch.int64)
        for n in self._meta_names:
            if n == "shape":
                continue
            sd[n] = torch.tensor([self._encode_meta(n, getattr(self, n))], dtype=torch.int64)
        return sd

    @classmethod
    def from_state_dict(cls, sd: Dict[str, torch.Tensor]) -> "CompressedWeight":
        expected = set(cls._tensor_names) | set(cls._meta_names) | {"shape"}
        missing = sorted(expected - set(sd))
        unexpected = sorted(set(sd) - expected)
        if missing or unexpected:
            raise ValueError(
                f"{cls.__name__}.from_state_dict: missing keys {missing}, unexpected keys {unexpected}"
            )
        kwargs: Dict[str, object] = {n: sd[n] for n in cls._tensor_names}
        shape = sd["shape"].reshape(-1).tolist()
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"{cls.__name__}.from_state_dict: shape must be [N, K] with N, K ≥ 1, got {shape}")
        kwargs["shape"] = tuple(int(v) for v in shape)
        for n in cls._meta_names:
            if n != "shape":
                kwargs[n] = cls._decode_meta(n, int(sd[n].reshape(-1)[0]))
        obj = cls(**kwargs)
        obj._check_consistent()
        return obj

    @classmethod
    def _encode_meta(cls, name: str, value) -> int:
        return -1 if value is None else int(value)

    @classmethod
    def _decode_meta(cls, name: str, value: int):
        return None if value == -1 else value

    def _check_consistent(self) -> None:
        """Raise if the tensors do not fit the metadata (used on loaded state dicts)."""

    def __repr__(self) -> str:
        N, K = self.shape
        return (
            f"{type(self).__name__}(shape=({N}, {K}), dtype={self.dtype}, "
            f"{self.bits_per_weight:.3g} bits/weight, nbytes={self.nbytes})"
        )
