"""``y = s·(x·Aᵀ)·Bᵀ + b`` in one launch that reads x once and writes y once.

The dense-slab forward's "output first" placement (``dense_slab.py``) writes the LoRA path and
the bias into the output before the slabs' matmuls add to it. Through cuBLAS that takes ``x·Aᵀ``
(a split-K matmul and its reduction) and then a rank-r matmul with the bias in its epilogue: 21
and 18 µs on an H100 at 4096² with M = 4096 (``bench/results/h100-2026-11-23-v7c/diag.txt``),
where reading x and writing y would take about 22 µs at the copy bandwidth. Here one program
computes ``x·Aᵀ`` for ``BLOCK_M`` rows in registers and writes those rows of y, ``BLOCK_N``
columns at a time. When there are fewer row blocks than SMs, the columns are split over more
programs (each reads its rows of x again). ``reference.lowrank_output_ref`` is the reference.
"""

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .decode import _dot, interpreter_upcast

LOWRANK_BLOCK = (16, 128, 128, 4)  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps: memory-bound, one config


@triton.jit
def _lowrank_output_kernel(
    x_ptr, a_ptr, b_ptr, bias_ptr, y_ptr,
    M, N, K, R, s, stride_xm, stride_ar, stride_bn, stride_ym, N_PER_PROGRAM,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    n_start = tl.program_id(1) * N_PER_PROGRAM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    rows = offs_m < M
    if HAS_LORA:
        xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                         mask=rows[:, None] & (offs_k[None, :] < K), other=0.0)
            at = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :],
                         mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), other=0.0)
            xa += _dot(xt, tl.trans(at), IEEE, UPCAST)
        if not UPCAST:  # rounded to the activation dtype, as a matmul's output would be
            xa = xa.to(y_ptr.dtype.element_ty)
    for n0 in range(n_start, tl.minimum(n_start + N_PER_PROGRAM, N), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        cols = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_LORA:
            bt = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :],
                         mask=cols[:, None] & (offs_r[None, :] < R), other=0.0)
            acc = s * _dot(xa, tl.trans(bt), IEEE, UPCAST)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=cols, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=rows[:, None] & cols[None, :])


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def lowrank_output(y: torch.Tensor, x: torch.Tensor, A: Optional[torch.Tensor], B: Optional[torch.Tensor],
                   scaling: float, bias: Optional[torch.Tensor], n_split: Optional[int] = None) -> torch.Tensor:
    """Write ``s·(x·Aᵀ)·Bᵀ + b`` into ``y [M, N]`` (unit column stride) and return it. ``x [M, K]``,
    ``A [r, K]``, ``B [N, r]`` (both None without LoRA), ``bias [N]`` or None, all in y's dtype.
    ``n_split`` (default: enough to give every SM a program) splits the columns over programs."""
    M, K = x.shape
    N = y.shape[1]
    if A is None and bias is None:
        raise ValueError("lowrank_output needs the LoRA factors, a bias, or both")
    if y.shape[0] != M or y.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"y must be [{M}, N] and y and x unit-stride along their rows, got y {tuple(y.shape)} "
                         f"strides {y.stride()}, x strides {x.stride()}")
    R = A.shape[0] if A is not None else 0
    bm, bn, bk, warps = LOWRANK_BLOCK
    m_programs = triton.cdiv(M, bm)
    if n_split is None:
        n_split = max(1, min(triton.cdiv(N, bn), triton.cdiv(_sm_count(x.device), m_programs)))
    n_per = triton.cdiv(triton.cdiv(N, n_split), bn) * bn
    # fp32 in the interpreter for bf16, which truncates where a GPU rounds; copied back after
    out = torch.empty(M, N, device=y.device, dtype=torch.float32) if interpreter_upcast(y.dtype) else y
    _lowrank_output_kernel[(m_programs, triton.cdiv(N, n_per))](
        x, A if R else x, B if R else x, bias if bias is not None else x, out,
        M, N, K, R, float(scaling), x.stride(0), A.stride(0) if R else 0, B.stride(0) if R else 0, out.stride(0),
        n_per, HAS_LORA=R > 0, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        UPCAST=interpreter_upcast(x.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        BLOCK_R=max(16, triton.next_power_of_2(R)), num_warps=warps,
    )
    if out is not y:
        y.copy_(out)
    return y
