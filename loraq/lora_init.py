"""LoRA scaling and initialisation: ``gaussian``, ``svd`` and ``loftq`` (DESIGN.md).

Every init returns ``(base, A, B)``: the compressed base and adapters with
``Ŵ + s·B·A`` as the starting weight. The linear algebra runs in float32 on the weight's device.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .formats import CompressedWeight, compress_weight

INITS = ("gaussian", "svd", "loftq")
# Above this size a randomized SVD (a few power iterations) replaces the full one.
_FULL_SVD_MAX_DIM = 2048


def lora_scaling(rank: int, alpha: Optional[float] = None, rslora: bool = False) -> float:
    """``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); ``alpha`` defaults to ``r``."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not (math.isfinite(alpha) and alpha > 0):  # inf: NaN outputs; 0 or < 0: inf/NaN adapters
        raise ValueError(f"alpha must be > 0 and finite, got {alpha!r}")
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def truncated_svd(R: torch.Tensor, rank: int, scaling: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``s·B·A`` the best rank-``rank`` approximation of ``R`` (split evenly).
    Components whose singular value is zero (to rounding) come back as zero rows of ``A`` and
    zero columns of ``B``."""
    R = R.float()
    if min(R.shape) > _FULL_SVD_MAX_DIM and rank < min(R.shape) // 4:
        cuda = R.device.type == "cuda"
        # deterministic, and leaves the caller's RNG alone: only the generator that svd_lowrank
        # draws from is seeded (torch.manual_seed would reseed every device's and keep it so)
        with torch.random.fork_rng(devices=[R.device] if cuda else []):
            if cuda:
                with torch.cuda.device(R.device):
                    torch.cuda.manual_seed(0)
            else:
                torch.default_generator.manual_seed(0)
            U, S, V = torch.svd_lowrank(R, q=min(rank + 16, min(R.shape)), niter=6)
        Vh = V.t()
    else:
        U, S, Vh = torch.linalg.svd(R, full_matrices=False)
    S = S[:rank]
    if S.numel():  # rounding noise of a zero component would otherwise become a tiny, barely-trainable pair
        S = torch.where(S > S.max() * max(R.shape) * torch.finfo(S.dtype).eps, S, torch.zeros_like(S))
    root = (S / scaling).sqrt()
    return U[:, :rank] * root, root.unsqueeze(1) * Vh[:rank]


def reconstruction_error(W: torch.Tensor, base: CompressedWeight, A: torch.Tensor, B: torch.Tensor,
                         scaling: float) -> float:
    """``‖W − (Ŵ + s·B·A)‖_F``."""
    approx = base.dequantize().float() + scaling * (B.float() @ A.float())
    return float((W.float() - approx).norm())


def init_lora(
    W: torch.Tensor,
    compression: str,
    rank: int,
    scaling: float,
    init: str = "gaussian",
    loftq_iters: int = 1,
    group_size: Optional[int] = None,
    scale: str = "mean_abs",
    generator: Optional[torch.Generator] = None,
) -> Tuple[CompressedWeight, torch.Tensor, torch.Tensor]:
    """Compress ``W`` ``[N, K]`` and initialise the adapters; returns ``(base, A [r, K], B [N, r])``.

    * ``gaussian``: ``A ~ N(0, 1/r²)``, ``B = 0`` (peft's gaussian init): the output starts equal
      to the compressed base.
    * ``svd``: ``(B, A)`` from the rank-r SVD of ``W − Ŵ`` divided by ``s``: the best rank-r repair.
    * ``loftq``: alternate ``Ŵ_t = compress(W − s·B·A)`` and ``(B, A) = SVD_r(W − Ŵ_t)/s`` for
      ``loftq_iters`` steps, keeping the iterate with the smallest ``‖W − (Ŵ + s·B·A)‖``.

    With ``svd``/``loftq``, rank-r components the residual does not have (it is zero when the
    compression is exact, e.g. int1 of a weight with one input or ``group_size=1``) get a gaussian
    row of ``A`` and a zero column of ``B``: the start is the same, and the adapter can still train
    (an all-zero pair has zero gradients forever).
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init != "gaussian" and compression == "dense":
        raise ValueError(
            f"init={init!r} fits the adapters to the compression residual, which is zero for "
            "compression='dense' (the adapters would start at zero and never train); use init='gaussian'"
        )
    if isinstance(loftq_iters, bool) or not isinstance(loftq_iters, int) or loftq_iters < 1:
        raise ValueError(f"loftq_iters must be an int >= 1, got {loftq_iters!r}")
    N, K = W.shape
    Wf = W.detach().float()
    base = compress_weight(W.detach(), compression, group_size=group_size, scale=scale)
    if init == "gaussian":
        A = torch.randn(rank, K, generator=generator, device="cpu").to(W.device) / rank
        return base, A.to(W.dtype), torch.zeros(N, rank, dtype=W.dtype, device=W.device)

    B, A = truncated_svd(Wf - base.dequantize().float(), rank, scaling)
    if init == "loftq":
        best = (reconstruction_error(Wf, base, A, B, scaling), base, A, B)
        for _ in range(loftq_iters - 1):
            target = (Wf - scaling * (B @ A)).to(W.dtype)
            base = compress_weight(target, compression, group_size=group_size, scale=scale)
            B, A = truncated_svd(Wf - base.dequantize().float(), rank, scaling)
            err = reconstruction_error(Wf, base, A, B, scaling)
            if err < best[0]:
                best = (err, base, A, B)
        _, base, A, B = best
    dead = (B == 0).all(0) & (A == 0).all(1)
    if bool(dead.any()):
        A = A.clone()
        A[dead] = (torch.randn(int(dead.sum()), K, generator=generator, device="cpu") / rank).to(A.device)
    return base, A.to(W.dtype), B.to(W.dtype)
