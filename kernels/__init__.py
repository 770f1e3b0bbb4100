"""Triton kernels of loraq, installed as ``loraq.kernels``.

One file per op holds the ``@triton.jit`` kernel and its launcher; the launchers take plain
tensors (the format's fields) and know nothing of autograd, ``nn`` or the backend registry:
``loraq.custom_ops`` wraps them as ``torch.library`` custom ops and ``loraq.ops`` registers those.

* :func:`lora_linear_fwd`: ``y = x·Ŵᵀ + s·(x·Aᵀ)·Bᵀ + b`` (int1, sparse4x4)
* :func:`lora_linear_dx`: ``dX = dY·Ŵ + s·(dY·B)·A`` (int1, sparse4x4)
* :func:`int1_gemv_lut`: the forward for up to 4 rows of ``x`` and an int1 weight, by table lookup
  (an autotune candidate of :func:`lora_linear_fwd` for up to 4 rows)
* :func:`int1_gemv_mma`: the forward for up to 16 rows of ``x`` and an int1 weight on tensor cores,
  a CUDA kernel in ``loraq._C`` (``csrc/int1_gemv_mma.cuh``); an autotune candidate of
  :func:`lora_linear_fwd` where the extension is built (``LORAQ_CUDA_GEMV=0`` leaves it out)
* :func:`sparse4x4_gemv_cuda`: the forward for up to 16 rows of ``x`` and a sparse4x4 weight, a
  CUDA gather in ``loraq._C`` (``csrc/sparse4x4_gemv.cuh``); a candidate under the same conditions
* :func:`sparse4x4_gemv`: the forward for up to 16 rows of ``x`` and a sparse4x4 weight, by
  gathering one input per stored value (an autotune candidate of :func:`lora_linear_fwd`)
* :func:`sparse4x4_gemv_dx`: its transpose, ``dX`` for up to 16 rows of ``dY`` (an autotune
  candidate of :func:`lora_linear_dx`)

Batches of more than 32 rows also time ``dense_slab``: ``Ŵ`` decoded a slab at a time into
a dense buffer for cuBLAS, with the LoRA path and bias in the same matmul.

The small-batch forwards split K and end in ``splitk_finish.finish`` (LoRA path, bias, cast):
two launches a call, on a zeroed fp32 workspace kept per thread, device and stream.

Every Triton launch goes through ``fast_launch.fast``: with ``LORAQ_FAST_LAUNCH=1`` a kernel that
has launched with the same specialization is launched again without Triton's per-call Python.
"""

from .int1_gemv_lut import int1_gemv_lut
from .int1_gemv_mma import int1_gemv_mma
from .lora_linear_dx import lora_linear_dx
from .lora_linear_fwd import lora_linear_fwd
from .sparse4x4_gemv import sparse4x4_gemv
from .sparse4x4_gemv_cuda import sparse4x4_gemv_cuda
from .sparse4x4_gemv_dx import sparse4x4_gemv_dx

FORMATS = ("int1", "sparse4x4")

__all__ = ["lora_linear_fwd", "lora_linear_dx", "int1_gemv_lut", "int1_gemv_mma", "sparse4x4_gemv",
           "sparse4x4_gemv_cuda", "sparse4x4_gemv_dx", "FORMATS"]
