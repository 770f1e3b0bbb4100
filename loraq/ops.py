"""Public functional ops and the choice of backend (``cuda`` | ``triton`` | ``reference``).

Backends register implementations of two primitives per weight format:

* ``lora_linear_fwd(x2d, weight, lora_A, lora_B, scaling, bias) -> y2d``
* ``lora_linear_dx(dy2d, weight, lora_A, dy_B, scaling, lora_B=None) -> dx2d``: ``dY·Ŵ + s·(dY·B)·A``
  (the weight read transposed; ``dY·B`` comes computed, the LoRA weight gradient needs it too;
  ``lora_A`` None: ``dY·Ŵ`` alone; ``lora_B``, when the caller has it, lets an implementation
  compute ``dY·(Ŵ + s·B·A)`` instead)

``reference`` implements both for every format and is always available. The kernel packages
(``loraq.kernels`` for Triton, ``loraq._C`` for CUDA) add theirs through :func:`register`;
callers never change. ``LORAQ_BACKEND`` (``auto`` by default) or a per-call ``backend=``
picks one; ``auto`` takes the fastest available for the device and dtype and falls back to
``reference`` with one warning on CUDA.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

from . import extension, reference
from .compat import getenv, trace_constant
from .formats import CompressedWeight

BACKENDS = ("auto", "cuda", "triton", "reference")
_PRIMITIVES = ("lora_linear_fwd", "lora_linear_dx")
# _IMPLS[backend][primitive][format kind] = callable
_IMPLS: Dict[str, Dict[str, Dict[str, Callable]]] = {b: {p: {} for p in _PRIMITIVES} for b in BACKENDS[1:]}
_WARNED = set()
# backend -> the maker of its prepared forwards (forward_plan); a backend without one has none
_PLANS: Dict[str, Callable] = {}
_DX_PLANS: Dict[str, Callable] = {}  # and of its prepared dX (dx_plan)
# CPU tensors can have plans: the Triton kernels were defined for the interpreter (tests), or a
# harness records their launches (bench/profile_host.py --stub-kernels)
_PLANS_ON_CPU = False


def plan_switches() -> tuple:
    """The environment switches that plans depend on, as they are now (``kernels.env.switches``;
    empty without the Triton kernels)."""
    return _SWITCHES() if _SWITCHES is not None else ()


_SWITCHES: Optional[Callable[[], tuple]] = None
# why Triton's interpreter would compute wrong here, "" where it runs right (kernels.triton_support;
# a string read once: the versions it depends on do not change, and a traced forward reads it)
_INTERPRETER_PROBLEM = ""


class NoPlan:
    """A kept answer "no plan for this input" (the reference backend, a factor the kernels would
    cast), asked again when a ``LORAQ_*`` switch changes."""

    __slots__ = ("_switches",)
    runs = False

    def __init__(self):
        self._switches = plan_switches()

    def current(self) -> bool:
        return plan_switches() == self._switches


def plans_possible(x: torch.Tensor) -> bool:
    """Whether :func:`forward_plan` can give ``x`` a plan at all: a CUDA tensor, or a CPU one when
    the Triton kernels run in the interpreter (tests). A cheap filter before anything else."""
    return x.is_cuda or _PLANS_ON_CPU
_RESOLVED: Dict[tuple, str] = {}  # (backend, device type, kind, interpreter) -> concrete backend


def register(backend: str, primitive: str, kind: str, fn: Callable) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``primitive`` for weights of ``kind``."""
    if backend not in _IMPLS or primitive not in _PRIMITIVES:
        raise ValueError(f"unknown backend/primitive {backend!r}/{primitive!r}")
    _IMPLS[backend][primitive][kind] = fn
    _RESOLVED.clear()


def _check_weight_device(t: torch.Tensor, weight, name: str) -> None:
    # torch's matmul refuses most mixes itself, but multiplies a CPU tensor by a meta one into garbage
    if weight.device != t.device:
        raise ValueError(f"{name} is on {t.device} but the weight is on {weight.device}; "
                         "move them to one device")


def _reference_fwd(x, weight, lora_A, lora_B, scaling, bias):
    _check_weight_device(x, weight, "x")
    return reference.lora_linear_ref(x, weight, lora_A, lora_B, scaling, bias)


def _reference_dx(dy, weight, lora_A, dy_B, scaling, lora_B=None):
    _check_weight_device(dy, weight, "dy")
    return reference.lora_linear_dx_ref(dy, weight, lora_A, dy_B, scaling)  # B is in dy_B already


for _kind in ("int1", "sparse4x4", "dense"):
    register("reference", "lora_linear_fwd", _kind, _reference_fwd)
    register("reference", "lora_linear_dx", _kind, _reference_dx)


def _load_kernel_packages() -> Dict[str, str]:
    """Import the optional kernel packages (they call :func:`register`); why each is missing."""
    why: Dict[str, str] = {}
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        why["triton"] = f"triton is not importable ({type(e).__name__}: {e}); pip install 'loraq[triton]'"
    else:
        try:
            importlib.import_module("loraq.kernels")
            custom = importlib.import_module("loraq.custom_ops")
        except Exception as e:
            why["triton"] = f"loraq.kernels failed to import ({type(e).__name__}: {e})"
        else:
            for kind in ("int1", "sparse4x4", "dense"):
                register("triton", "lora_linear_fwd", kind, custom.triton_lora_linear_fwd)
                register("triton", "lora_linear_dx", kind, custom.triton_lora_linear_dx)
            _PLANS["triton"] = custom.triton_forward_plan
            _DX_PLANS["triton"] = custom.triton_dx_plan
            global _PLANS_ON_CPU, _SWITCHES, _INTERPRETER_PROBLEM
            _PLANS_ON_CPU = importlib.import_module("loraq.kernels.decode").INTERPRETED
            _SWITCHES = importlib.import_module("loraq.kernels.env").switches
            _INTERPRETER_PROBLEM = importlib.import_module("loraq.kernels.triton_support").interpreter_problem()
    extension.load()  # loraq._C, or the build of `loraq build-ext` (backend_status asks it why not)
    return why


_IMPORT_PROBLEMS: Optional[Dict[str, str]] = None


def _import_problems() -> Dict[str, str]:
    global _IMPORT_PROBLEMS
    if _IMPORT_PROBLEMS is None:
        _IMPORT_PROBLEMS = _load_kernel_packages()
    return _IMPORT_PROBLEMS


def load_backends() -> None:
    """Import the kernel packages now (once per process). ``LoraLinear`` calls it on construction
    so that ``torch.compile`` never meets the import inside a traced forward."""
    _import_problems()


def backend_status(device: Optional[torch.device] = None) -> Dict[str, Tuple[bool, str]]:
    """``{backend: (available, reason)}`` for ``device`` (CUDA if present, else CPU)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    problems = dict(_import_problems())
    cuda_problem = extension.load()  # asked each time: a build of `loraq build-ext` in this process loads it
    if cuda_problem:
        problems["cuda"] = cuda_problem
    status: Dict[str, Tuple[bool, str]] = {"reference": (True, "pure PyTorch, runs on every device")}
    for name in ("triton", "cuda"):
        if name in problems:
            status[name] = (False, problems[name])
        elif not any(_IMPLS[name][p] for p in _PRIMITIVES):
            have = (" (the compiled extension is loaded: with Triton, its CUDA GEMVs are candidates of the "
                    "triton backend's tuner)") if name == "cuda" else ""
            status[name] = (False, f"this build of loraq registers no fused {name} matmul kernels yet{have}")
        elif name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            status[name] = (False, "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on the CPU)")
        elif name == "triton" and device.type != "cuda" and _INTERPRETER_PROBLEM:
            status[name] = (False, _INTERPRETER_PROBLEM)
        elif name == "cuda" and device.type != "cuda":
            status[name] = (False, f"CUDA kernels need a CUDA device, got {device}")
        else:
            kinds = sorted({k for p in _PRIMITIVES for k in _IMPLS[name][p]})  # (Dynamo 2.6 fails set().union(*...))
            status[name] = (True, f"kernels for {', '.join(kinds)}")
    return status


def resolve_backend(backend: Optional[str], device: torch.device, kind: str) -> str:
    """The concrete backend to run ``kind`` weights on ``device``; errors name what is missing.

    Remembered per (asked backend, device type, kind), so a layer's forward pays a dict lookup."""
    backend = backend or getenv("LORAQ_BACKEND", "auto")
    key = (backend, torch.device(device).type, kind, getenv("TRITON_INTERPRET"))
    found = _RESOLVED.get(key)
    if found is None:
        found = _resolve(backend, device, kind)
        if not torch.compiler.is_compiling():  # no global side effect inside a traced autograd.Function
            _RESOLVED[key] = found
    return found


@trace_constant  # a choice made once when tracing (torch.compile < 2.5 cannot trace its checks)
def _resolve(backend: str, device: torch.device, kind: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (or LORAQ_BACKEND), got {backend!r}")
    if backend == "reference":
        return backend
    status = backend_status(device)
    if backend != "auto":
        ok, why = status[backend]
        if not ok:
            raise RuntimeError(f"backend {backend!r} is not available: {why}")
        if not all(kind in _IMPLS[backend][p] for p in _PRIMITIVES):
            raise RuntimeError(f"backend {backend!r} has no kernels for {kind!r} weights")
        return backend
    for name in ("cuda", "triton"):
        # On the CPU the Triton interpreter is a test tool, never faster than the reference.
        if torch.device(device).type == "cuda" and status[name][0] and all(kind in _IMPLS[name][p] for p in _PRIMITIVES):
            return name
    if torch.device(device).type == "cuda" and kind not in _WARNED:
        _WARNED.add(kind)
        reasons = "; ".join(f"{n}: {status[n][1]}" for n in ("cuda", "triton"))
        warnings.warn(f"loraq: no fused kernel for {kind!r} weights on CUDA, using the reference backend ({reasons})")
    return "reference"


def _kind(weight) -> str:
    return weight.kind if isinstance(weight, CompressedWeight) else "dense"


def _impl(primitive: str, weight, device, backend: Optional[str]) -> Callable:
    kind = _kind(weight)
    return _IMPLS[resolve_backend(backend, device, kind)][primitive][kind]


def lora_linear(
    x: torch.Tensor,
    weight,
    lora_A: Optional[torch.Tensor] = None,
    lora_B: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``y = x·Ŵᵀ + s·(x·Aᵀ)·Bᵀ + b`` for ``x [..., K]`` and a compressed or dense ``[N, K]`` weight.

    The public functional entry: ``backend`` (or ``LORAQ_BACKEND``) picks the implementation;
    every backend returns what :func:`loraq.reference.lora_linear_ref` returns, and gradients
    flow to ``x``, ``lora_A``, ``lora_B`` and ``bias`` (the weight is frozen).

    Args:
        x: ``[..., K]`` activations (fp16, bf16 or fp32 for the kernels; others via the reference).
        weight: a :class:`~loraq.formats.CompressedWeight` or a dense ``[N, K]`` tensor.
        lora_A, lora_B: the adapter, ``[r, K]`` and ``[N, r]`` (both or neither), cast to ``x.dtype``.
        scaling: ``s`` multiplying the adapter's path.
        bias: ``[N]`` or None.
        backend: ``"auto"``, ``"cuda"``, ``"triton"`` or ``"reference"`` (None: ``LORAQ_BACKEND``).
    """
    N, K = reference.weight_shape(weight)
    reference.check_input(x, K)
    reference.check_lora(lora_A, lora_B, N, K)
    reference.check_bias(bias, N)
    reference.check_devices(x, lora_A=lora_A, lora_B=lora_B, bias=bias)
    fn = _impl("lora_linear_fwd", weight, x.device, backend)
    if x.dim() == 2:  # no reshapes (each costs host time)
        return fn(x, weight, lora_A, lora_B, float(scaling), bias)
    y = fn(x.reshape(-1, K), weight, lora_A, lora_B, float(scaling), bias)
    return y.reshape(*x.shape[:-1], N)


def forward_plan(x: torch.Tensor, weight, lora_A: Optional[torch.Tensor] = None,
                 lora_B: Optional[torch.Tensor] = None, scaling: float = 1.0,
                 bias: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> Optional[Callable]:
    """:func:`lora_linear` prepared for every ``x`` of this 2-D ``x``'s shape, dtype and device:
    ``plan(x) -> y``, the same kernel on the same ``weight``, ``lora_A``, ``lora_B`` and ``bias``
    tensors (their values at each call; their storages, shapes and strides as they were when the
    plan was made: after replacing or reshaping one in place, make a new plan; ``LoraLinear``
    checks this itself) without the per-call checks, backend choice and tuner
    lookup, which cost more host time than a small batch's kernel takes on the GPU. Raises as
    :func:`lora_linear` does for bad arguments; returns None where the backend has no plan (the
    reference; a gradient wanted; an argument the kernels would cast, such as a LoRA factor in
    another dtype). ``plan.current()`` says whether the environment switches it was made under
    (``LORAQ_*``) still hold: make a new one when they do not. ``LoraLinear`` keeps its plans
    itself; this is the functional form."""
    N, K = reference.weight_shape(weight)
    reference.check_input(x, K)
    if x.dim() != 2:
        raise ValueError(f"forward_plan takes a 2-D x [M, {K}], got shape {tuple(x.shape)}")
    reference.check_lora(lora_A, lora_B, N, K)
    reference.check_bias(bias, N)
    reference.check_devices(x, lora_A=lora_A, lora_B=lora_B, bias=bias)
    make = _PLANS.get(resolve_backend(backend, x.device, _kind(weight)))
    return None if make is None else make(x, weight, lora_A, lora_B, float(scaling), bias)


def dx_plan(dy: torch.Tensor, weight, lora_A: Optional[torch.Tensor] = None, dy_B: Optional[torch.Tensor] = None,
            scaling: float = 1.0, backend: Optional[str] = None,
            lora_B: Optional[torch.Tensor] = None) -> Optional[Callable]:
    """:func:`lora_linear_dx` prepared for every ``dy`` (and ``dy_B``) of these 2-D shapes, dtype
    and device: ``plan(dy, dy_B) -> dX`` (``dy_B`` None for a plan made without ``lora_A``), the
    same kernel on the same ``weight``, ``lora_A`` and ``lora_B`` tensors (their values at each
    call; make a new plan after replacing or reshaping one). What :func:`forward_plan` is for the
    forward, for the backward: ``LoraLinear`` keeps one per shape while training. Raises as
    :func:`lora_linear_dx` does for bad arguments; returns None where the backend has no plan (the
    reference, a gradient wanted through ``dX`` itself, a factor the kernels would cast).
    ``plan.current()`` says whether the ``LORAQ_*`` switches it was made under still hold."""
    N, K = reference.weight_shape(weight)
    if dy.dim() != 2 or (dy_B is not None and dy_B.dim() != 2):
        raise ValueError(f"dx_plan takes a 2-D dy [M, {N}] and dy_B [M, r], got shapes {tuple(dy.shape)}"
                         + ("" if dy_B is None else f" and {tuple(dy_B.shape)}"))
    check_dx_args(dy, weight, lora_A, dy_B, lora_B)
    make = _DX_PLANS.get(resolve_backend(backend, dy.device, _kind(weight)))
    return None if make is None else make(dy, weight, lora_A, dy_B, float(scaling), lora_B)


def base_matmul_t(dy: torch.Tensor, weight, backend: Optional[str] = None) -> torch.Tensor:
    """``dy·Ŵ``: ``[..., N]`` → ``[..., K]``, the base part of ``dX`` in the backward pass."""
    return lora_linear_dx(dy, weight, None, None, 1.0, backend)


def lora_linear_dx(dy: torch.Tensor, weight, lora_A: Optional[torch.Tensor] = None,
                   dy_B: Optional[torch.Tensor] = None, scaling: float = 1.0,
                   backend: Optional[str] = None, lora_B: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dX = dy·Ŵ + s·dy_B·A`` for ``dy [..., N]`` and ``dy_B = dy·B`` ``[..., r]``, in one pass.

    ``lora_B`` (optional): the ``B [N, r]`` that ``dy_B`` came from. With it a backend may compute
    ``dy·(Ŵ + s·B·A)`` instead (for large batches the Triton backend times that too); the result
    is the same to rounding."""
    N, K = reference.weight_shape(weight)
    check_dx_args(dy, weight, lora_A, dy_B, lora_B)
    fn = _impl("lora_linear_dx", weight, dy.device, backend)
    r = None if dy_B is None else dy_B.reshape(-1, dy_B.shape[-1])
    out = fn(dy.reshape(-1, N), weight, lora_A, r, float(scaling), lora_B=lora_B)
    return out.reshape(*dy.shape[:-1], K)


def check_dx_args(dy, weight, lora_A, dy_B, lora_B) -> None:
    """:func:`lora_linear_dx`'s checks of its arguments (and :func:`dx_plan`'s)."""
    N, K = reference.weight_shape(weight)
    reference.check_input(dy, N, name="dy", what="out_features")
    if (lora_A is None) != (dy_B is None):
        raise ValueError("lora_A and dy_B must be given together (or both None)")
    if lora_A is not None and (lora_A.dim() != 2 or lora_A.shape[1] != K or dy_B.shape[:-1] != dy.shape[:-1]
                               or dy_B.shape[-1] != lora_A.shape[0]):
        raise ValueError(f"lora_A must be [r, {K}] and dy_B [..., r] with dy's leading shape; got "
                         f"{tuple(lora_A.shape)} and {tuple(dy_B.shape)}")
    if lora_B is not None and (lora_A is None or lora_B.dim() != 2 or tuple(lora_B.shape) != (N, lora_A.shape[0])):
        raise ValueError(f"lora_B must be [{N}, r] with lora_A's rank (and lora_A given); got "
                         f"{tuple(lora_B.shape)}" + ("" if lora_A is None else f" for r = {lora_A.shape[0]}"))
    if dy_B is not None and not torch.is_floating_point(dy_B):
        raise TypeError(f"dy_B must be floating point, got {dy_B.dtype}")
    reference.check_devices(dy, "dy", lora_A=lora_A, dy_B=dy_B, lora_B=lora_B)
