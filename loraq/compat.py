"""What differs between the torch versions loraq supports (torch >= 2.4), in one place."""

import functools
import os
from typing import Callable, Optional, TypeVar

import torch

F = TypeVar("F", bound=Callable)

#: torch.compile (Dynamo) before torch 2.5 breaks the graph on some calls that later versions
#: read once, when tracing, as constants (``torch._C._are_functorch_transforms_active``:
#: pytorch/pytorch#134889; ``os.environ.get``).
OLD_DYNAMO = torch.__version__ < (2, 5)


def trace_constant(fn: F) -> F:
    """``fn``, which torch.compile calls once when tracing and takes the answer of as a constant,
    as it does on its own from torch 2.5 (marked only before: the mark imports Dynamo)."""
    if not OLD_DYNAMO:
        return fn

    def call(*args, **kwargs):  # a Python function: a C function cannot carry Dynamo's mark
        return fn(*args, **kwargs)

    return torch.compiler.assume_constant_result(functools.wraps(fn)(call))


@trace_constant
def getenv(name: str, default: Optional[str] = None) -> Optional[str]:
    """``os.environ.get(name, default)``, readable inside a traced forward on every torch."""
    return os.environ.get(name, default)
