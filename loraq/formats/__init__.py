"""Compressed weight formats. See each module's docstring for the exact bit layout."""

from typing import Dict, Type

from .base import CompressedWeight, check_dense_weight
from .dense import DenseWeight
from .int1 import Int1Weight
from .sparse4x4 import Sparse4x4Weight

FORMATS: Dict[str, Type[CompressedWeight]] = {
    "int1": Int1Weight,
    "sparse4x4": Sparse4x4Weight,
    "dense": DenseWeight,
}


def format_class(compression: str) -> Type[CompressedWeight]:
    """The format class for a compression name; a clear error for an unknown one."""
    try:
        return FORMATS[compression]
    except KeyError:
        raise ValueError(f"unknown compression {compression!r}; expected one of {sorted(FORMATS)}") from None


def compress_weight(W, compression: str, group_size=None, scale: str = "mean_abs") -> CompressedWeight:
    """Compress a dense ``[N, K]`` weight with the named format and its options."""
    cls = format_class(compression)
    if compression == "int1":
        return cls.from_dense(W, group_size=group_size, scale=scale)
    if group_size is not None:
        raise ValueError(f"group_size applies to compression='int1' only, not {compression!r}")
    if scale != "mean_abs":
        raise ValueError(f"scale={scale!r} applies to compression='int1' only, not {compression!r}")
    return cls.from_dense(W)


__all__ = [
    "CompressedWeight", "DenseWeight", "Int1Weight", "Sparse4x4Weight", "FORMATS",
    "format_class", "compress_weight", "check_dense_weight",
]
