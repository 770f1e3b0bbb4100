"""Other libraries' low-bit matmuls as benchmark providers, each with the unfused LoRA path added.

* ``gemlite``: GemLite's 1-bit Triton matmul (``GemLiteLinear(W_nbits=1)``) on the same int1
  weight. GemLite dequantizes ``(W_q − zero)·scale``; with ``W_q = [sign ≥ 0]``, ``zero = 0.5``
  and ``scale = 2α`` that is exactly ``Ŵ = α·sign`` (per row or per group of ≥ 16 inputs).
* ``bnb_nf4``: bitsandbytes' 4-bit NF4 ``matmul_4bit`` (a different, 4-bit weight: the usual
  low-bit baseline, not the same ``Ŵ``).

Each constructor returns ``(fn or None, bytes moved, note)``: None with the reason when the
library, the device or the weight does not allow it. A provider whose output disagrees with
``x·Ŵᵀ`` is refused rather than timed (the check runs once, and also triggers any autotuning
before the timing starts).
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional, Tuple

import torch

Provider = Tuple[Optional[Callable], int, str]


def gemlite_pack_args(weight) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(W_q uint8 [N, K] of 0/1, scales [N, G], zeros [N, G], group_size)`` such that
    ``(W_q − zeros)·scales``, each scale repeated over its group, is the int1 weight's ``Ŵ``.
    Raises ValueError for what GemLite cannot hold (onebit's column scales; groups of fewer than
    16 inputs or that do not divide K; K not a multiple of 32)."""
    kind = getattr(weight, "kind", "dense")
    if kind != "int1":
        raise ValueError(f"the GemLite provider takes int1 weights only, got {kind}"
                         + (" (GemLite has no 1:16 sparse format)" if kind == "sparse4x4" else ""))
    if weight.scale_mode == "onebit":
        raise ValueError("GemLite cannot apply onebit's per-input scales g")
    N, K = weight.shape
    group = min(weight.group_size or K, K)  # a group wider than K is one scale per row
    if K % 32 or K % group or group < 16:
        raise ValueError(f"GemLite needs K a multiple of 32 and groups of ≥ 16 that divide it (K={K}, group {group})")
    deq = weight.dequantize()
    W_q = (deq >= 0).to(torch.uint8)  # sign(0) = +1, as loraq's
    scales = (2 * weight.scale.float()).to(deq.dtype).reshape(N, K // group)
    zeros = torch.full_like(scales, 0.5)
    return W_q, scales, zeros, group


def gemlite_int1(weight, x, A, B, s, act_bytes: int, device) -> Provider:
    """GemLite's 1-bit matmul of ``x`` with the int1 ``weight`` + ``s·(x·Aᵀ)·Bᵀ``."""
    if device.type != "cuda":
        return None, 0, "GemLite needs a CUDA device"
    gemlite, why = _import("gemlite", "gemlite")
    if gemlite is None:
        return None, 0, why
    try:
        W_q, scales, zeros, group = gemlite_pack_args(weight)
    except ValueError as e:
        return None, 0, str(e)
    dtypes = {torch.float16: gemlite.DType.FP16, torch.bfloat16: gemlite.DType.BF16}
    if x.dtype not in dtypes:
        return None, 0, f"GemLite's 1-bit path takes fp16 or bf16, not {x.dtype}"
    N, K = weight.shape
    layer = gemlite.GemLiteLinear(1, group_size=group, in_features=K, out_features=N,
                                  input_dtype=dtypes[x.dtype], output_dtype=dtypes[x.dtype])
    layer.pack(W_q, scales, zeros, None)
    nbytes = sum(t.numel() * t.element_size() for t in (layer.W_q, layer.scales, layer.zeros)) + act_bytes

    def fn():
        return layer(x) + s * ((x @ A.t()) @ B.t())

    refused = _disagrees(layer(x), x @ weight.dequantize().to(x.dtype).t())
    return (None, 0, f"gemlite refused: {refused}") if refused else (fn, nbytes, f"GemLite {gemlite.__version__}")


def bnb_nf4(W16, x, A, B, s, act_bytes: int, device) -> Provider:
    """bitsandbytes' NF4 matmul of ``x`` with ``W16`` quantized to 4 bits + ``s·(x·Aᵀ)·Bᵀ``."""
    if device.type != "cuda":
        return None, 0, "bitsandbytes NF4 needs a CUDA device"
    bnb, why = _import("bitsandbytes", "bitsandbytes")
    bf, why = _import("bitsandbytes.functional", "bitsandbytes") if bnb is not None else (None, why)
    if bf is None:
        return None, 0, why
    packed, state = bf.quantize_4bit(W16, quant_type="nf4")

    def fn():
        return bnb.matmul_4bit(x, packed.t(), quant_state=state) + s * ((x @ A.t()) @ B.t())

    refused = _disagrees(bnb.matmul_4bit(x, packed.t(), quant_state=state),
                         x @ bf.dequantize_4bit(packed, state).to(x.dtype).t())
    # the weight as stored: the 4-bit codes and the quant state's per-block scales (absmax: 1/8 of
    # the codes' bytes at the default 64-value blocks), and the nested statistics' when there are
    stats = [state.absmax, state.code] + ([state.offset, state.state2.absmax, state.state2.code]
                                          if getattr(state, "nested", False) else [])
    stored = [t for t in [packed, *stats] if isinstance(t, torch.Tensor)]
    nbytes = sum(t.numel() * t.element_size() for t in stored) + act_bytes
    return (None, 0, f"bnb_nf4 refused: {refused}") if refused else (fn, nbytes, f"bitsandbytes {bnb.__version__}")


def _import(module: str, package: str):
    """``(module, "")``, or ``(None, why)``: "not installed" only when ``package`` itself is missing
    (``fetch_baselines.sh`` installs without dependencies: a missing dependency, or a build that
    does not load, is named as such)."""
    try:
        return importlib.import_module(module), ""
    except Exception as e:
        if isinstance(e, ModuleNotFoundError) and e.name in (package, module):
            return None, f"{package} not installed (pip install {package}, or bench/fetch_baselines.sh)"
        return None, f"{package} is installed but failed to import: {type(e).__name__}: {e}"


def _disagrees(out: torch.Tensor, ref: torch.Tensor) -> str:
    """Why ``out`` is not ``ref`` (the same matmul by torch), or "" when they agree to within a
    few units of the dtype's rounding."""
    if out.shape != ref.shape:
        return f"shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    err = (out.float() - ref.float()).abs().max().item()
    tol = 0.02 * ref.float().abs().max().item() + 1e-3
    return "" if err <= tol else f"max error {err:.3g} against torch's {tol:.3g} allowance"
