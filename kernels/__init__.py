"""Triton kernels of loraq, installed as ``loraq.kernels``.

One file per op holds the ``@triton.jit`` kernel and its launcher; the launchers take plain
tensors (the format's fields) and know nothing of autograd, ``nn`` or the backend registry:
``loraq.custom_ops`` wraps them as ``torch.library`` custom ops and ``loraq.ops`` registers those.

* :func:`lora_linear_fwd`: ``y = x·Ŵᵀ + s·(x·Aᵀ)·Bᵀ + b`` (int1, sparse4x4)
* :func:`base_matmul_t`: ``dX = dY·Ŵ`` (int1, sparse4x4)
"""

from .base_matmul_t import base_matmul_t
from .lora_linear_fwd import lora_linear_fwd

FORMATS = ("int1", "sparse4x4")

__all__ = ["lora_linear_fwd", "base_matmul_t", "FORMATS"]
