"""Autograd for a LoRA linear layer on a frozen (compressed) base.

Forward: ``y = x·Ŵᵀ + s·(x_l·Aᵀ)·Bᵀ + b`` where ``x_l`` is ``x`` after LoRA dropout (the same
tensor when dropout is off). With the base frozen the backward is (DESIGN.md)::

    dX   = dY·Ŵ                  (to x; a compressed matmul with the weight transposed)
    dX_l = s·(dY·B)·A            (to x_l; autograd adds it to dX when x_l is x)
    dA   = s·(dY·B)ᵀ·X_l
    dB   = s·dYᵀ·(X_l·Aᵀ)
    db   = Σ_rows dY

Without dropout ``dX`` and ``dX_l`` are one kernel call (``ops.lora_linear_dx``: ``dY·Ŵ`` with the
LoRA term in its epilogue), and ``dY·B`` is computed once for it and ``dA``.
Only ``x_l``, ``A`` and ``B`` are saved (``x_l·Aᵀ`` ``[M, r]`` is recomputed): the dense ``Ŵ`` is
never kept between forward and backward, so at most one layer's ``Ŵ`` exists at a time (and
none with a fused kernel backend).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import ops, reference


def _in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``; ``t`` itself when it already is (a ``.to()`` call costs host time)."""
    return t if t.dtype == dtype else t.to(dtype)


def lora_linear_forward(x, x_lora, lora_A, lora_B, bias, weight, scaling: float, backend: Optional[str]):
    """The forward of :class:`LoraLinearFunction` without autograd (same arguments): what
    ``LoraLinear`` runs when no gradient is wanted, which saves the ``Function`` machinery's
    host time on every call of an inference."""
    N, K = weight.shape
    flat = x.dim() == 2  # then no reshapes (host time)
    x2 = x if flat else x.reshape(-1, K)
    dtype = x.dtype
    b = None if bias is None else _in_dtype(bias, dtype)
    if lora_A is None:
        y = ops.lora_linear(x2, weight, None, None, 1.0, b, backend=backend)
    elif x_lora is None or x_lora is x:  # the fused path: one pass over the packed weight
        y = ops.lora_linear(x2, weight, _in_dtype(lora_A, dtype), _in_dtype(lora_B, dtype), scaling, b,
                            backend=backend)
    else:  # LoRA dropout: the adapter sees another input than the base
        y = add_lora(ops.lora_linear(x2, weight, None, None, 1.0, b, backend=backend), x_lora.reshape(-1, K),
                     lora_A, lora_B, scaling)
    return y if flat else y.reshape(*x.shape[:-1], N)


def add_lora(y, xl2, lora_A, lora_B, scaling: float):
    """``y + s·(x_l·Aᵀ)·Bᵀ`` for a 2-D ``x_l`` (the adapter's input after dropout), the factors
    in ``y``'s dtype: the adapter's path where it does not ride in the kernel."""
    dtype = y.dtype
    return y + scaling * ((xl2 @ lora_A.to(dtype).t()) @ lora_B.to(dtype).t())


def _setup(ctx, x, x_lora, lora_A, lora_B, bias, weight, scaling, backend) -> None:
    """What the backward keeps (shared by the Function classes below)."""
    K = weight.shape[1]
    ctx.same_input = x_lora is None
    if lora_A is not None:
        ctx.save_for_backward((x if x_lora is None else x_lora).reshape(-1, K), lora_A, lora_B)
    ctx.weight, ctx.scaling, ctx.backend, ctx.lead = weight, scaling, backend, x.shape[:-1]
    ctx.has_lora = lora_A is not None
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy):
    N, K = ctx.weight.shape
    dy2 = dy.reshape(-1, N)
    need = ctx.needs_input_grad
    dx = dxl = dA = dB = db = None
    fused_dx = ctx.has_lora and ctx.same_input  # dX = dY·Ŵ + s·(dY·B)·A in one kernel
    if ctx.has_lora and (need[1] or need[2] or need[3] or (fused_dx and need[0])):
        xl2, A, B = ctx.saved_tensors
        s, dtype = ctx.scaling, dy2.dtype
        # the planned forward's copies of A and B in x's dtype; not with create_graph, whose
        # second-order graph must reach A and B through the casts
        read = getattr(ctx, "read", None)
        if read is not None and read[0].dtype == dtype and not torch.is_grad_enabled():
            Ac, Bc = read
        else:
            Ac, Bc = A.to(dtype), B.to(dtype)
        dyB = dy2 @ Bc  # [M, r]: shared by dX and dA
        if need[1]:
            dxl = (s * (dyB @ Ac)).reshape(*ctx.lead, K)
        dA, dB = reference.lora_factor_grads(dy2, xl2, Ac, dyB, s, need[2], need[3], (A.dtype, B.dtype))
    if need[0]:
        # PlannedLoraLinearFunction's kept plans: not with create_graph (the op has a backward);
        # plans.dx takes the full path for factors that are not what its forward plan read
        plans = getattr(ctx, "plans", None)
        if plans is not None and not torch.is_grad_enabled():
            dx = plans.dx(dy2, ctx.weight, Ac, dyB, s, ctx.backend, Bc) if fused_dx else plans.dx(
                dy2, ctx.weight, None, None, 1.0, ctx.backend, None)
        elif fused_dx:
            dx = ops.lora_linear_dx(dy2, ctx.weight, Ac, dyB, s, backend=ctx.backend, lora_B=Bc)
        else:
            dx = ops.base_matmul_t(dy2, ctx.weight, backend=ctx.backend)
        dx = dx.reshape(*ctx.lead, K)
    if ctx.bias_dtype is not None and need[4]:
        db = dy2.sum(0).to(ctx.bias_dtype)
    return dx, dxl, dA, dB, db, None, None, None


class LoraLinearFunction(torch.autograd.Function):
    """``LoraLinearFunction.apply(x, x_lora, lora_A, lora_B, bias, weight, scaling, backend)``.

    ``x_lora`` is the adapter's input after dropout, or ``None`` when it is ``x`` itself (the fused
    path; passing ``x`` twice works too, but ``torch.compile`` cannot trace a tensor given twice).
    ``lora_A``/``lora_B`` may be ``None`` (adapter disabled) and ``bias`` may be ``None``.
    ``x`` has any leading shape ``[..., K]``; the computation runs in ``x.dtype`` and the
    gradients of the parameters come back in the parameters' own dtypes.

    The forward takes ``ctx`` (the old style): ``apply`` then binds no signature per call, about
    70 µs of host time less than the ``setup_context`` style. Under ``torch.func`` transforms,
    which need that style, use :func:`lora_linear_function`'s choice, :class:`LoraLinearFuncFunction`.
    """

    @staticmethod
    def forward(ctx, x, x_lora, lora_A, lora_B, bias, weight, scaling: float, backend: Optional[str]):
        _setup(ctx, x, x_lora, lora_A, lora_B, bias, weight, scaling, backend)
        return lora_linear_forward(x, x_lora, lora_A, lora_B, bias, weight, scaling, backend)

    backward = staticmethod(_backward)


class LoraLinearFuncFunction(torch.autograd.Function):
    """:class:`LoraLinearFunction` for ``torch.func`` (``grad``, ``vmap``: per-sample gradients),
    which needs a forward without ``ctx``, a ``setup_context`` and a vmap rule (generated from
    the ops inside; the kernels' custom ops have their own)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, x_lora, lora_A, lora_B, bias, weight, scaling: float, backend: Optional[str]):
        return lora_linear_forward(x, x_lora, lora_A, lora_B, bias, weight, scaling, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup(ctx, *inputs)
        x, x_lora, lora_A, lora_B = inputs[:4]
        ctx.save_for_forward(x if x_lora is None else x_lora, lora_A, lora_B)

    backward = staticmethod(_backward)

    @staticmethod
    def jvp(ctx, tx, txl, tA, tB, tb, *_):
        """Forward mode (``torch.func.jvp``, ``jacfwd``, ``hessian``): the tangent
        ``ẋ·Ŵᵀ + s·(ẋ_l·Aᵀ)·Bᵀ + s·(x_l·Ȧᵀ)·Bᵀ + s·(x_l·Aᵀ)·Ḃᵀ + ḃ`` (``ẋ_l = ẋ`` without dropout)."""
        x_l, A, B = ctx.saved_tensors  # x_l: x (or x after dropout) in its own shape [..., K]
        s, dtype = ctx.scaling, x_l.dtype
        fused = A is not None and ctx.same_input  # ẋ_l = ẋ: the adapter's ẋ term rides in the op call
        out = lora_linear_forward(torch.zeros_like(x_l) if tx is None else tx, None, A if fused else None,
                                  B if fused else None, tb, ctx.weight, s, ctx.backend)
        if A is None:
            return out
        extra = []
        if txl is not None and not ctx.same_input:
            extra.append((txl @ A.to(dtype).t()) @ B.to(dtype).t())
        if tA is not None:
            extra.append((x_l @ tA.to(dtype).t()) @ B.to(dtype).t())
        if tB is not None:
            extra.append((x_l @ A.to(dtype).t()) @ tB.to(dtype).t())
        return out + s * sum(extra) if extra else out


def _same_memory(t: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether ``t`` reads what ``ref`` holds: the same tensor, or a view of the same memory in
    the same layout (a saved tensor unpacked by ``detach()``, as non-reentrant checkpointing
    does)."""
    return t is ref or (t.data_ptr() == ref.data_ptr() and t.dtype == ref.dtype and t.shape == ref.shape
                        and t.stride() == ref.stride() and t.device == ref.device)


def _capturing(t: torch.Tensor) -> bool:
    """Whether ``t``'s stream is capturing a CUDA graph (where no new plan is made)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class StepPlans:
    """The kept plans of one input signature of a ``LoraLinear`` (its shape, dtype and device):
    ``forward`` (an ``ops.forward_plan``, made for ``lora = (A, B)``: the layer's factors, or
    their copies in the autocast dtype) and, made on the first backward that can use one, the
    ``dX`` plans (``ops.dx_plan``, with and without the LoRA term). ``LoraLinear`` checks that
    its tensors are the ones the plans were made with before each call."""

    __slots__ = ("forward", "_lora", "_dx")
    runs = True  # (LoraLinear also keeps "no plan" answers, whose runs is False)

    def __init__(self, forward, lora=(None, None)):
        self.forward, self._lora, self._dx = forward, lora, {}

    def current(self) -> bool:
        """Whether the ``LORAQ_*`` switches the forward plan was made under still hold."""
        return self.forward.current()

    def dx(self, dy, weight, lora_A, dy_B, scaling: float, backend, lora_B):
        """``ops.lora_linear_dx(dy, weight, lora_A, dy_B, scaling, backend, lora_B)`` (2-D ``dy``),
        through a kept plan where ``lora_A`` and ``lora_B`` hold what the forward plan read (a
        saved-tensor hook that unpacks them elsewhere, such as ``save_on_cpu``, means the full
        path, without a plan kept for memory that the next step will not have). The first call of
        a new key takes the full path (tuning the problem if it is new) and then makes the plan."""
        full = lambda: ops.lora_linear_dx(dy, weight, lora_A, dy_B, scaling, backend=backend,  # noqa: E731
                                          lora_B=lora_B)
        A, B = self._lora
        if lora_A is not None and (A is None or not _same_memory(lora_A, A) or not _same_memory(lora_B, B)):
            return full()
        key = (dy.shape, dy.dtype, dy.device, lora_A is not None)
        plan = self._dx.get(key)
        if plan is not None and plan.current():
            return plan(dy, dy_B) if plan.runs else full()
        out = full()
        # a plan reads A and B where the forward plan does
        made = ops.dx_plan(dy, weight, A if lora_A is not None else None, dy_B, scaling, backend,
                           B if lora_A is not None else None)
        if made is not None or not _capturing(dy):
            self._dx[key] = ops.NoPlan() if made is None else made  # (none in a capture: asked again after it)
        return out


class PlannedLoraLinearFunction(torch.autograd.Function):
    """:class:`LoraLinearFunction` (the same arguments, then ``plans``, a :class:`StepPlans`, and
    ``read``) whose forward launches ``plans.forward`` on ``x`` (2-D, of the plan's signature) and
    whose backward computes ``dX`` through ``plans.dx`` (but with ``create_graph``): a
    ``LoraLinear`` training step through kept plans, without the per-call checks, backend choice
    and tuner lookup. The caller (``LoraLinear``) guarantees that the plan was made for these
    tensors, in ``x``'s dtype, or for ``read = (A, B)``: copies of the factors in ``x``'s dtype
    (under autocast), which the backward reads too instead of casting the factors again (but with
    ``create_graph``, where the second-order graph must reach the factors through the casts).
    With ``x_lora`` (LoRA dropout) the plan is the base's alone and the adapter's path is added
    after it."""

    @staticmethod
    def forward(ctx, x, x_lora, lora_A, lora_B, bias, weight, scaling: float, backend: Optional[str], plans,
                read=None):
        _setup(ctx, x, x_lora, lora_A, lora_B, bias, weight, scaling, backend)
        # The copies are not saved tensors: a layer called again before this backward (a shared
        # encoder) copies into them again, the same values unless A or B changed, which
        # autograd's check of the saved A and B refuses as for the full path. A write through
        # .data between this forward and its backward moves no version counter: the backward
        # then reads the copies as the forward read them, where the full path casts A and B again.
        ctx.plans, ctx.read = plans, read
        y = plans.forward(x)
        if x_lora is None:
            return y
        A, B = (lora_A, lora_B) if read is None else read  # dropout: the base's plan, then the adapter's path
        return add_lora(y, x_lora.reshape(-1, x.shape[-1]), A, B, scaling)

    @staticmethod
    def backward(ctx, dy):
        return _backward(ctx, dy) + (None, None)


def lora_linear_function():
    """The Function class for this call: under a ``torch.func`` transform or forward-mode AD, the
    one with ``setup_context``, ``jvp`` and a vmap rule."""
    return LoraLinearFuncFunction if reference.transform_or_forward_ad_active() else LoraLinearFunction
