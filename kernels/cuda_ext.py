"""What the CUDA GEMVs of ``loraq._C`` share: finding the compiled op, whether the tuner offers
them, the GPU's SM count, and how K is cut into slices whose copy of ``x`` fits shared memory.

The kernels themselves are CUDA C++ in ``csrc/`` (``int1_gemv_mma.cuh``, ``sparse4x4_gemv.cuh``);
their launchers are ``int1_gemv_mma.py`` and ``sparse4x4_gemv_cuda.py``.
"""

from functools import lru_cache
from typing import Callable, Optional, Tuple

import torch

# absolute: other packages' probes (transformers looks for a package named `kernels`) may import
# this folder as a top-level package, where a relative import past it fails
from loraq import extension  # loraq._C, or `loraq build-ext`'s build (the csrc layer)
from .env import env_is

SMEM_BUDGET = 200 * 1024  # bytes of x an SM may hold for its blocks (an H100 has 228 KiB)
MAX_SLOTS = 32  # blocks that store a share of x·Aᵀ (the finish sums the shares)


_FOUND = set()  # ops found: asked again only while missing (a build in this process may add them)


def extension_problem(op: str, capability: Optional[Tuple[int, int]] = None) -> str:
    """Why ``torch.ops.loraq.<op>`` is missing, or cannot run on a GPU of compute ``capability``
    (a build of ``loraq build-ext`` for other GPUs); "" when it can."""
    if op not in _FOUND:
        problem = extension.load()
        if problem:
            return problem
        if not hasattr(torch.ops.loraq, op):
            return f"this build of loraq's extension has no {op} (build it again: `loraq build-ext --force`)"
        _FOUND.add(op)
    return "" if capability is None else extension.arch_problem(capability)


def cuda_gemv_offered() -> bool:
    """Whether the tuner times the CUDA GEMVs: yes unless ``LORAQ_CUDA_GEMV=0`` (their GPU tests
    passed on an H100, compute-sanitizer clean, and they won the forward at M = 1 there)."""
    return not env_is("LORAQ_CUDA_GEMV", "0")


@lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@lru_cache(maxsize=None)
def smem_limits(index: int) -> Tuple[int, int]:
    """``(bytes a block may opt in to, bytes of x an SM's blocks may hold)`` on CUDA device
    ``index``: the GPU's own limits (an H100: 227 KiB and 228 KiB; an A100: 163 KiB and 164 KiB;
    sm_86/89: 99 KiB and 100 KiB), the SM's less 16 KiB left to L1. ``(SMEM_BUDGET,
    SMEM_BUDGET)`` where torch does not report them."""
    props = torch.cuda.get_device_properties(index)
    per_block = getattr(props, "shared_memory_per_block_optin", SMEM_BUDGET)
    per_sm = getattr(props, "shared_memory_per_multiprocessor", SMEM_BUDGET + 16 * 1024) - 16 * 1024
    return per_block, per_sm


def fit_slices(K: int, task_inputs: int, slice_bytes: Callable[[int], int], blocks_per_sm: int,
               at_least: int = 1, what: str = "the rows of x",
               limits: Tuple[int, int] = (SMEM_BUDGET, SMEM_BUDGET)) -> int:
    """K slices (about ``at_least`` or more) of whole tasks of ``task_inputs`` inputs, equal but
    the last, such that a block's copy of ``x`` (``slice_bytes(inputs of a slice)``) fits
    ``limits[0]`` and ``blocks_per_sm`` of them (with 1 KiB each the GPU reserves) fit
    ``limits[1]`` (``smem_limits``). Returns the count the kernel launches (asked for 3 slices of
    2 tasks, it makes 2); raises ValueError when one task a slice does not fit."""
    per_block, per_sm = limits
    tasks = max(1, -(-K // task_inputs))
    for slices in range(max(1, min(at_least, tasks)), tasks + 1):
        per = -(-tasks // slices)  # tasks a slice
        need = slice_bytes(per * task_inputs)
        if need <= per_block and blocks_per_sm * (need + 1024) <= per_sm:
            return -(-tasks // per)
    raise ValueError(f"{what} do not fit the shared memory with {blocks_per_sm} blocks an SM")


__all__ = ["extension_problem", "cuda_gemv_offered", "sm_count", "smem_limits", "fit_slices", "SMEM_BUDGET",
           "MAX_SLOTS"]
