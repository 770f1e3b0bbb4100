"""Pure-PyTorch ground truth for every loraq op. Runs anywhere; kernels are tested against it.

Shapes: ``x [..., K]``, weight ``[N, K]`` (dense tensor or a compressed format),
``lora_A [r, K]``, ``lora_B [N, r]``, ``bias [N]``. Everything is computed in ``x.dtype``
(the dequantized weight and the adapters are cast to it), like ``torch.nn.functional.linear``.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .compat import trace_constant
from .formats import CompressedWeight

Weight = Union[torch.Tensor, CompressedWeight]


#: Whether a ``torch.func`` transform (``grad``, ``vmap``) is active: the autograd Function and the
#: custom ops' fast path choose by it (one C call).
transforms_active = trace_constant(getattr(torch._C, "_are_functorch_transforms_active", lambda: False))


def transform_or_forward_ad_active() -> bool:
    """A ``torch.func`` transform or forward-mode AD (``torch.autograd.forward_ad`` dual tensors)
    is active: then the autograd Functions with ``setup_context``, ``jvp`` and vmap rules apply."""
    return transforms_active() or getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def weight_shape(weight: Weight) -> Tuple[int, int]:
    return tuple(weight.shape)  # both tensors and formats expose .shape


def dequantize_ref(weight: Weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dense ``Ŵ`` ``[N, K]`` of a compressed or dense weight, optionally cast to ``dtype``."""
    W = weight.dequantize() if isinstance(weight, CompressedWeight) else weight
    return W if dtype is None else W.to(dtype)


def check_input(x: torch.Tensor, K: int, name: str = "x", what: str = "in_features") -> None:
    """Raise a clear error unless ``x`` is a floating tensor whose last dimension is ``K``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):  # (a method call: torch.compile < 2.5 refuses it in a backward)
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != K:
        got = "a scalar" if x.dim() == 0 else f"{x.shape[-1]} (shape {tuple(x.shape)})"
        raise ValueError(f"{name}: expected last dimension {K} ({what}), got {got}")


def check_lora(lora_A: Optional[torch.Tensor], lora_B: Optional[torch.Tensor], N: int, K: int) -> None:
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must be given together (or both None)")
    if lora_A is None:
        return
    if lora_A.dim() != 2 or lora_A.shape[1] != K:
        raise ValueError(f"lora_A: expected shape [r, {K}], got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B: expected shape [{N}, {r}] to match lora_A, got {tuple(lora_B.shape)}")


def check_bias(bias: Optional[torch.Tensor], N: int) -> None:
    """Raise a clear error unless ``bias`` is None or a floating tensor of shape ``[N]``."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point tensor, got "
                        f"{bias.dtype if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    if tuple(bias.shape) != (N,):
        raise ValueError(f"bias: expected shape [{N}] (out_features), got {tuple(bias.shape)}")


def check_devices(x: torch.Tensor, name: str = "x", **others: Optional[torch.Tensor]) -> None:
    """Raise a clear error naming the tensor of ``others`` (None skipped) not on ``x``'s device."""
    for other, t in others.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{other} is on {t.device} but {name} is on {x.device}; move them to one device")


def base_matmul_ref(x: torch.Tensor, weight: Weight) -> torch.Tensor:
    """``x·Ŵᵀ``: ``[..., K]`` → ``[..., N]``."""
    return x @ dequantize_ref(weight, x.dtype).t()


def base_matmul_t_ref(dy: torch.Tensor, weight: Weight) -> torch.Tensor:
    """``dy·Ŵ`` (the weight read transposed): ``[..., N]`` → ``[..., K]``."""
    return dy @ dequantize_ref(weight, dy.dtype)


def lora_linear_dx_ref(
    dy: torch.Tensor,
    weight: Weight,
    lora_A: Optional[torch.Tensor] = None,
    dy_B: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
) -> torch.Tensor:
    """``dX = dY·Ŵ + s·(dY·B)·A`` given ``dY·B`` (``[..., r]``, which ``dA`` needs too); ``dY·Ŵ`` alone
    when ``lora_A`` is None."""
    dx = base_matmul_t_ref(dy, weight)
    if lora_A is not None:
        dx = dx + scaling * (dy_B @ lora_A.to(dy.dtype))
    return dx


def lora_linear_ref(
    x: torch.Tensor,
    weight: Weight,
    lora_A: Optional[torch.Tensor],
    lora_B: Optional[torch.Tensor],
    scaling: float,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``y = x·Ŵᵀ + s·(x·Aᵀ)·Bᵀ + b`` for a compressed or dense weight; x of any leading shape."""
    N, K = weight_shape(weight)
    check_input(x, K)
    check_lora(lora_A, lora_B, N, K)
    check_bias(bias, N)
    y = base_matmul_ref(x, weight)
    if lora_A is not None:
        y = y + scaling * ((x @ lora_A.to(x.dtype).t()) @ lora_B.to(x.dtype).t())
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y


def lora_linear_bwd_ref(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Weight,
    lora_A: Optional[torch.Tensor],
    lora_B: Optional[torch.Tensor],
    scaling: float,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    """The gradients of DESIGN.md with the base frozen, for 2-D ``x [M, K]`` and ``dy [M, N]``.

    ``dX = dY·Ŵ + s·(dY·B)·A``, ``dA = s·(dY·B)ᵀ·X``, ``dB = s·dYᵀ·(X·Aᵀ)``, ``db = Σ dY``.
    """
    dx = base_matmul_t_ref(dy, weight)
    dA = dB = None
    if lora_A is not None:
        A, B = lora_A.to(dy.dtype), lora_B.to(dy.dtype)
        dyB = dy @ B
        dx = dx + scaling * (dyB @ A)
        dA, dB = lora_factor_grads(dy, x, A, dyB, scaling)
    return dx, dA, dB, dy.sum(0)


def lora_factor_grads(
    dy: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    dy_B: Optional[torch.Tensor],
    scaling: float,
    need_A: bool = True,
    need_B: bool = True,
    dtypes: Optional[Tuple[torch.dtype, torch.dtype]] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``dA = s·(dY·B)ᵀ·X`` and ``dB = s·dYᵀ·(X·Aᵀ)`` (``None`` where not needed).

    ``lora_A`` is already in ``dy``'s dtype and ``dy_B = dY·B`` is given because ``dX`` needs it
    too; ``X·Aᵀ`` (``[M, r]``) is recomputed rather than saved. The results are in ``dy``'s dtype,
    or cast to ``dtypes = (A's, B's)`` (the parameters' own). Every backend's backward uses this.
    """
    dA = scaling * (dy_B.t() @ x) if need_A else None
    dB = scaling * (dy.t() @ (x @ lora_A.t())) if need_B else None
    if dtypes is not None:
        dA = None if dA is None else dA.to(dtypes[0])
        dB = None if dB is None else dB.to(dtypes[1])
    return dA, dB


def splitk_finish_ref(
    sums: torch.Tensor,
    xa_parts: Optional[torch.Tensor],
    lora_B: Optional[torch.Tensor],
    scaling: float,
    bias: Optional[torch.Tensor],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The last step of the small-batch forwards (``kernels/splitk_finish.py``): the fp32 partial
    sums of ``x·Ŵᵀ`` ``[M, N]`` plus ``s·(Σ_slots xa_parts)·Bᵀ`` plus ``bias``, in ``dtype``.
    ``xa_parts [slots, M, ≥ r]`` holds the K slices' shares of ``x·Aᵀ`` (columns past r unused),
    ``lora_B [N, r]``; both None without LoRA. Computed in float64, rounded once."""
    y = sums.double()
    if xa_parts is not None:
        r = lora_B.shape[1]
        y = y + scaling * (xa_parts.double().sum(0)[:, :r] @ lora_B.double().t())
    if bias is not None:
        y = y + bias.double()
    return y.to(dtype)
