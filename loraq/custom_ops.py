"""The Triton kernels as ``torch.library`` custom ops (``loraq::*``), with fake implementations.

Custom ops are opaque to ``torch.compile``: the fake implementations give it output shapes and
dtypes, so a model with ``LoraLinear`` layers compiles without graph breaks and the kernels run
as they are. The forward ops have autograd formulas (``dX`` through the ``_dx`` op, the LoRA and
bias gradients in torch), so ``ops.lora_linear`` is differentiable on every backend. The
adapters at the bottom turn a format object into the ops' tensor arguments; :mod:`loraq.ops`
registers them as the ``triton`` backend.
"""

# No ``from __future__ import annotations`` here: torch.library.custom_op reads these annotations
# as types, and torch 2.4 refuses them as strings ("unsupported type Tensor").
from typing import Optional

import torch
from torch import Tensor

from . import reference
from .tuning_check import dx_check, forward_check

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _int1_parts(packed, scale, col_scale, K, group_size, onebit):
    return ({"packed": packed, "scale": scale, "col_scale": col_scale},
            {"N": packed.shape[0], "K": K, "group_size": group_size or None,
             "scale_mode": "onebit" if onebit else "mean_abs"})


def _launch_fwd(x, fmt, tensors, meta, lora_A, lora_B, scaling, bias):
    """``kernels.lora_linear_fwd``, its tuning checked against the reference (``tuning_check``)."""
    from loraq.kernels import lora_linear_fwd

    check = forward_check(x, fmt, tensors, meta, lora_A, lora_B, scaling, bias)
    return lora_linear_fwd(x, fmt, tensors, meta, lora_A, lora_B, scaling, bias, check=check)


def _launch_dx(dy, fmt, tensors, meta, lora_A, dy_B, scaling, lora_B):
    """``kernels.lora_linear_dx``, its tuning checked against the reference (``tuning_check``)."""
    from loraq.kernels import lora_linear_dx

    check = dx_check(dy, fmt, tensors, meta, lora_A, dy_B, scaling)
    return lora_linear_dx(dy, fmt, tensors, meta, lora_A, dy_B, scaling, lora_B=lora_B, check=check)


@torch.library.custom_op("loraq::int1_lora_linear", mutates_args=())
def int1_lora_linear(x: Tensor, packed: Tensor, scale: Tensor, col_scale: Tensor, K: int, group_size: int,
                     onebit: bool, lora_A: Optional[Tensor], lora_B: Optional[Tensor], scaling: float,
                     bias: Optional[Tensor]) -> Tensor:
    """``x·Ŵᵀ + s·(x·Aᵀ)·Bᵀ + b`` for int1 ``Ŵ`` (``group_size`` 0: one scale per row)."""
    tensors, meta = _int1_parts(packed, scale, col_scale, K, group_size, onebit)
    return _launch_fwd(x, "int1", tensors, meta, lora_A, lora_B, scaling, bias)


@int1_lora_linear.register_fake
def _(x, packed, scale, col_scale, K, group_size, onebit, lora_A, lora_B, scaling, bias):
    return x.new_empty(x.shape[0], packed.shape[0])


@torch.library.custom_op("loraq::int1_lora_linear_dx", mutates_args=())
def int1_lora_linear_dx(dy: Tensor, packed: Tensor, scale: Tensor, col_scale: Tensor, K: int, group_size: int,
                        onebit: bool, lora_A: Optional[Tensor], dy_B: Optional[Tensor], scaling: float,
                        lora_B: Optional[Tensor]) -> Tensor:
    """``dY·Ŵ + s·(dY·B)·A`` for int1 ``Ŵ`` (``dy_B = dY·B``; both LoRA tensors None: ``dY·Ŵ``;
    ``lora_B``, the ``B`` of ``dy_B`` or None, lets large batches merge ``s·B·A`` into ``Ŵ``)."""
    tensors, meta = _int1_parts(packed, scale, col_scale, K, group_size, onebit)
    return _launch_dx(dy, "int1", tensors, meta, lora_A, dy_B, scaling, lora_B)


@int1_lora_linear_dx.register_fake
def _(dy, packed, scale, col_scale, K, group_size, onebit, lora_A, dy_B, scaling, lora_B):
    return dy.new_empty(dy.shape[0], K)


@torch.library.custom_op("loraq::sparse4x4_lora_linear", mutates_args=())
def sparse4x4_lora_linear(x: Tensor, values: Tensor, positions: Tensor, N: int, K: int, lora_A: Optional[Tensor],
                          lora_B: Optional[Tensor], scaling: float, bias: Optional[Tensor]) -> Tensor:
    """``x·Ŵᵀ + s·(x·Aᵀ)·Bᵀ + b`` for sparse4x4 ``Ŵ``."""
    return _launch_fwd(x, "sparse4x4", {"values": values, "positions": positions}, {"N": N, "K": K},
                       lora_A, lora_B, scaling, bias)


@sparse4x4_lora_linear.register_fake
def _(x, values, positions, N, K, lora_A, lora_B, scaling, bias):
    return x.new_empty(x.shape[0], N)


@torch.library.custom_op("loraq::sparse4x4_lora_linear_dx", mutates_args=())
def sparse4x4_lora_linear_dx(dy: Tensor, values: Tensor, positions: Tensor, N: int, K: int,
                             lora_A: Optional[Tensor], dy_B: Optional[Tensor], scaling: float,
                             lora_B: Optional[Tensor]) -> Tensor:
    """``dY·Ŵ + s·(dY·B)·A`` for sparse4x4 ``Ŵ`` (``lora_B`` as for int1)."""
    return _launch_dx(dy, "sparse4x4", {"values": values, "positions": positions}, {"N": N, "K": K},
                      lora_A, dy_B, scaling, lora_B)


@sparse4x4_lora_linear_dx.register_fake
def _(dy, values, positions, N, K, lora_A, dy_B, scaling, lora_B):
    return dy.new_empty(dy.shape[0], K)


def _save_forward(ctx, x, lora_A, lora_B, scaling, bias, weight_tensors, weight_ints) -> None:
    """What the forward ops' backward needs: the input, the adapter and the (frozen) weight."""
    ctx.save_for_backward(x, lora_A, lora_B, *weight_tensors)
    ctx.scaling, ctx.weight_ints = scaling, weight_ints
    ctx.bias_dtype = None if bias is None else bias.dtype


def _forward_grads(ctx, dy, dx_op):
    """``(dx, dA, dB, db)`` of ``y = x·Ŵᵀ + s·(x·Aᵀ)·Bᵀ + b`` (None where not needed): ``dX`` by
    ``dx_op(dy, A, dY·B, lora_B)`` (the weight read transposed), the rest in torch."""
    x, A, B = ctx.saved_tensors[:3]
    need = ctx.needs_input_grad
    s = ctx.scaling
    dx = dA = dB = db = None
    Ac = Bc = dyB = None
    if A is not None and (need[0] or need[-4] or need[-3]):
        Ac, Bc = A.to(dy.dtype), B.to(dy.dtype)
        dyB = dy @ Bc if need[0] or need[-4] else None  # dX's LoRA term and dA
    if need[0]:
        dx = dx_op(dy, Ac, dyB, Bc)
    if A is not None and (need[-4] or need[-3]):
        dA, dB = reference.lora_factor_grads(dy, x, Ac, dyB, s, need[-4], need[-3], (A.dtype, B.dtype))
    if ctx.bias_dtype is not None and need[-1]:
        db = dy.sum(0).to(ctx.bias_dtype)
    return dx, dA, dB, db


def _int1_setup(ctx, inputs, output):
    x, packed, scale, col_scale, K, group_size, onebit, lora_A, lora_B, scaling, bias = inputs
    _save_forward(ctx, x, lora_A, lora_B, scaling, bias, (packed, scale, col_scale), (K, group_size, onebit))


def _int1_backward(ctx, dy):
    packed, scale, col_scale = ctx.saved_tensors[3:]
    K, group_size, onebit = ctx.weight_ints
    dx, dA, dB, db = _forward_grads(ctx, dy, lambda dy, A, dyB, B: _call(
        "int1_lora_linear_dx", dy, packed, scale, col_scale, K, group_size, onebit, A, dyB, ctx.scaling, B))
    return dx, None, None, None, None, None, None, dA, dB, None, db


def _sparse4x4_setup(ctx, inputs, output):
    x, values, positions, N, K, lora_A, lora_B, scaling, bias = inputs
    _save_forward(ctx, x, lora_A, lora_B, scaling, bias, (values, positions), (N, K))


def _sparse4x4_backward(ctx, dy):
    values, positions = ctx.saved_tensors[3:]
    N, K = ctx.weight_ints
    dx, dA, dB, db = _forward_grads(ctx, dy, lambda dy, A, dyB, B: _call(
        "sparse4x4_lora_linear_dx", dy, values, positions, N, K, A, dyB, ctx.scaling, B))
    return dx, None, None, None, None, dA, dB, None, db


int1_lora_linear.register_autograd(_int1_backward, setup_context=_int1_setup)
sparse4x4_lora_linear.register_autograd(_sparse4x4_backward, setup_context=_sparse4x4_setup)


# The dX ops are differentiable too, so a gradient of a gradient (create_graph=True: gradient
# penalties, Hessian-vector products) works with the kernels as with the reference. The op is
# linear: out = dY·Ŵ + s·dY_B·A, so d/d(dY) = G·Ŵᵀ (the forward op without LoRA),
# dA = s·dY_Bᵀ·G and d(dY_B) = s·G·Aᵀ. lora_B only lets the op regroup the sum: no gradient.
def _dx_setup(ctx, inputs, output, weight_at, lora_at):
    A, dyB = inputs[lora_at], inputs[lora_at + 1]
    ctx.save_for_backward(A, dyB, *inputs[weight_at[0]:weight_at[1]])
    ctx.scaling, ctx.weight_ints = inputs[lora_at + 2], inputs[weight_at[1]:lora_at]


def _dx_grads(ctx, g, forward_base):
    A, dyB = ctx.saved_tensors[:2]
    need = ctx.needs_input_grad
    lora_at = len(need) - 4
    dg = forward_base(g) if need[0] else None
    dA = ctx.scaling * (dyB.t() @ g) if A is not None and need[lora_at] else None
    d_dyB = ctx.scaling * (g @ A.t()) if A is not None and need[lora_at + 1] else None
    grads = [None] * len(need)
    grads[0], grads[lora_at], grads[lora_at + 1] = dg, dA, d_dyB
    return tuple(grads)


def _int1_dx_backward(ctx, g):
    packed, scale, col_scale = ctx.saved_tensors[2:]
    return _dx_grads(ctx, g, lambda g: _call(
        "int1_lora_linear", g, packed, scale, col_scale, *ctx.weight_ints, None, None, 1.0, None))


def _sparse4x4_dx_backward(ctx, g):
    values, positions = ctx.saved_tensors[2:]
    return _dx_grads(ctx, g, lambda g: _call(
        "sparse4x4_lora_linear", g, values, positions, *ctx.weight_ints, None, None, 1.0, None))


int1_lora_linear_dx.register_autograd(
    _int1_dx_backward, setup_context=lambda ctx, inputs, output: _dx_setup(ctx, inputs, output, (1, 4), 7))
sparse4x4_lora_linear_dx.register_autograd(
    _sparse4x4_dx_backward, setup_context=lambda ctx, inputs, output: _dx_setup(ctx, inputs, output, (1, 3), 5))


def _vmap_over_rows(op, row_args):
    """Register ``op``'s rule for ``torch.func.vmap`` (per-sample gradients): when only the
    row-indexed arguments (``x``/``dy`` ``[M, ·]``, ``dy_B``) carry the vmapped dimension, it is
    folded into the rows (one kernel call on ``B·M`` rows); otherwise one call per batch entry."""

    def rule(info, in_dims, *args):
        B = info.batch_size
        batched = [i for i, d in enumerate(in_dims) if d is not None]
        if all(i in row_args for i in batched):
            new = list(args)
            for i in row_args:
                if args[i] is None:
                    continue
                t = args[i].movedim(in_dims[i], 0) if in_dims[i] is not None else args[i].expand(B, *args[i].shape)
                new[i] = t.reshape(B * t.shape[1], *t.shape[2:])
            out = op(*new)
            return out.reshape(B, -1, out.shape[-1]), 0
        outs = [op(*[a.select(d, b) if d is not None else a for a, d in zip(args, in_dims)]) for b in range(B)]
        return torch.stack(outs), 0

    if hasattr(torch.library, "register_vmap"):  # torch >= 2.5
        torch.library.register_vmap(op, rule)


_vmap_over_rows(int1_lora_linear, (0,))
_vmap_over_rows(sparse4x4_lora_linear, (0,))
_vmap_over_rows(int1_lora_linear_dx, (0, 8))
_vmap_over_rows(sparse4x4_lora_linear_dx, (0, 6))


# torch.func (grad, jacrev, jvp, hessian) and forward-mode AD (torch.autograd.forward_ad). The
# ops' autograd formulas above serve the eager backward only: under a torch.func transform a
# custom op whose input needs a gradient fails inside torch (its generated Function has no
# setup_context), and a forward-mode tangent is dropped silently (the ops have no forward
# formula). Where either is active the ops run through the Functions below, which have both, and
# a generated vmap rule (the forward under vmap meets the ops' own rules: vmap still folds the
# batch into the rows).
_other_ad_active = reference.transform_or_forward_ad_active


def _fwd_jvp(op, inputs, tangents):
    """The tangent of ``y = x·Ŵᵀ + s·(x·Aᵀ)·Bᵀ + b``: ``ẋ·Ŵᵀ + s·(ẋ·Aᵀ)·Bᵀ + ḃ`` (one op call)
    ``+ s·(x·Ȧᵀ)·Bᵀ + s·(x·Aᵀ)·Ḃᵀ``."""
    la = len(inputs) - 4  # lora_A, lora_B, scaling, bias
    x, A, B, s = inputs[0], inputs[la], inputs[la + 1], inputs[la + 2]
    tx, tA, tB, tb = tangents[0], tangents[la], tangents[la + 1], tangents[-1]
    args = list(inputs)
    args[0], args[-1] = torch.zeros_like(x) if tx is None else tx, tb
    out = op(*args)
    if A is not None and tA is not None:
        out = out + s * ((x @ tA.to(x.dtype).t()) @ B.to(x.dtype).t())
    if A is not None and tB is not None:
        out = out + s * ((x @ A.to(x.dtype).t()) @ tB.to(x.dtype).t())
    return out


def _dx_jvp(op, inputs, tangents):
    """The tangent of ``dY·Ŵ + s·dY_B·A``: ``ḋY·Ŵ`` (one op call) ``+ s·ḋY_B·A + s·dY_B·Ȧ``."""
    la = len(inputs) - 4  # lora_A, dy_B, scaling, lora_B
    dy, A, dyB, s = inputs[0], inputs[la], inputs[la + 1], inputs[la + 2]
    tdy, tA, tdyB = tangents[0], tangents[la], tangents[la + 1]
    args = list(inputs)
    args[0] = torch.zeros_like(dy) if tdy is None else tdy
    args[la] = args[la + 1] = args[-1] = None
    out = op(*args)
    if A is not None and tdyB is not None:
        out = out + s * (tdyB.to(dy.dtype) @ A.to(dy.dtype))
    if A is not None and tA is not None:
        out = out + s * (dyB.to(dy.dtype) @ tA.to(dy.dtype))
    return out


def _transform_function(name, setup, backward, jvp):
    """The op ``loraq::<name>`` as an ``autograd.Function`` that torch.func and forward-mode AD can use."""
    op = getattr(torch.ops.loraq, name)

    def setup_context(ctx, inputs, output):
        setup(ctx, inputs, output)
        ctx.save_for_forward(*(a if isinstance(a, Tensor) else None for a in inputs))
        ctx.constants = tuple(None if isinstance(a, Tensor) else a for a in inputs)

    def jvp_(ctx, *tangents):
        # the tangent's op call goes through this Function too: under a nested transform
        # (hessian) its inputs may need gradients, and before torch 2.5 the op's own autograd
        # (a Function without setup_context) refuses every torch.func transform
        inputs = [c if t is None else t for c, t in zip(ctx.constants, ctx.saved_tensors)]
        return jvp(function.apply, inputs, tangents)

    function = type(f"{name}_function", (torch.autograd.Function,), {
        "generate_vmap_rule": True, "forward": staticmethod(lambda *inputs: op(*inputs)),
        "setup_context": staticmethod(setup_context), "backward": staticmethod(backward),
        "jvp": staticmethod(jvp_)})
    return function


_TRANSFORM_FUNCTIONS = {
    "int1_lora_linear": _transform_function("int1_lora_linear", _int1_setup, _int1_backward, _fwd_jvp),
    "sparse4x4_lora_linear": _transform_function(
        "sparse4x4_lora_linear", _sparse4x4_setup, _sparse4x4_backward, _fwd_jvp),
    "int1_lora_linear_dx": _transform_function(
        "int1_lora_linear_dx", lambda ctx, inputs, output: _dx_setup(ctx, inputs, output, (1, 4), 7),
        _int1_dx_backward, _dx_jvp),
    "sparse4x4_lora_linear_dx": _transform_function(
        "sparse4x4_lora_linear_dx", lambda ctx, inputs, output: _dx_setup(ctx, inputs, output, (1, 3), 5),
        _sparse4x4_dx_backward, _dx_jvp),
}


def _call(name: str, *args):
    """``torch.ops.loraq.<name>(*args)``; through its Function above under torch.func or forward AD."""
    if _other_ad_active():
        return _TRANSFORM_FUNCTIONS[name].apply(*args)
    return getattr(torch.ops.loraq, name)(*args)


def _meta(weight) -> dict:
    N, K = weight.shape
    if weight.kind == "int1":
        return {"N": N, "K": K, "group_size": weight.group_size or None, "scale_mode": weight.scale_mode}
    return {"N": N, "K": K}


def _check_device(t: Tensor, weight, name: str) -> None:
    for field, v in (weight.tensors() if hasattr(weight, "tensors") else {"tensor": weight}).items():
        if v.device != t.device:
            raise ValueError(f"{name} is on {t.device} but the weight's {field} is on {v.device}; move them together")


def _direct(*tensors) -> bool:
    """Whether to launch the kernel without the custom op's dispatch (about 10 µs of host time a
    call): in eager mode when no input needs a gradient (``LoraLinear``'s autograd function calls
    in here without grad tracking). Under ``torch.compile``, on meta tensors, or when a gradient
    is wanted, the custom op is called: compile needs it, its fake gives meta tensors their
    shape, and its autograd formula (below) gives the gradients."""
    if torch.compiler.is_compiling() or tensors[0].device.type == "meta":  # meta: the fake's shapes
        return False
    if _other_ad_active():  # torch.func (vmap, grad) or forward-mode AD: the op's rules apply
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in tensors)


def triton_lora_linear_fwd(x, weight, lora_A, lora_B, scaling, bias):
    """The ``triton`` backend's ``lora_linear_fwd``: the fused kernels for int1 and sparse4x4,
    cuBLAS through torch for a dense weight, the reference for dtypes the kernels lack (fp64)."""
    kind = getattr(weight, "kind", "dense")
    _check_device(x, weight, "x")
    if kind == "dense" or x.dtype not in KERNEL_DTYPES:
        return reference.lora_linear_ref(x, weight, lora_A, lora_B, scaling, bias)
    N, K = weight.shape
    if _direct(x, lora_A, lora_B, bias):
        return _launch_fwd(x, kind, weight.tensors(), _meta(weight), lora_A, lora_B, float(scaling), bias)
    if kind == "int1":
        return _call("int1_lora_linear", x, weight.packed, weight.scale, weight.col_scale, K,
                                                weight.group_size or 0, weight.scale_mode == "onebit",
                                                lora_A, lora_B, float(scaling), bias)
    return _call("sparse4x4_lora_linear", x, weight.values, weight.positions, N, K, lora_A, lora_B,
                                                 float(scaling), bias)


def triton_forward_plan(x, weight, lora_A, lora_B, scaling, bias):
    """The ``triton`` backend's prepared forward (``kernels.lora_linear_fwd.forward_plan``) for
    inputs shaped like ``x [M, K]``, or None where calls must take the full path: a dense weight,
    a dtype the kernels lack, or a call that needs the custom op (``_direct``: a gradient wanted,
    ``torch.compile``, meta tensors, torch.func)."""
    kind = getattr(weight, "kind", "dense")
    if kind == "dense" or x.dtype not in KERNEL_DTYPES or not _direct(x, lora_A, lora_B, bias):
        return None
    _check_device(x, weight, "x")
    from loraq.kernels.lora_linear_fwd import forward_plan

    tensors, meta = weight.tensors(), _meta(weight)
    check = forward_check(x, kind, tensors, meta, lora_A, lora_B, float(scaling), bias)
    return forward_plan(x, kind, tensors, meta, lora_A, lora_B, float(scaling), bias, check=check)


def triton_dx_plan(dy, weight, lora_A, dy_B, scaling, lora_B=None):
    """The ``triton`` backend's prepared ``dX`` (``kernels.lora_linear_dx.dx_plan``) for ``dy``
    (and ``dy_B``) shaped like these, or None where calls must take the full path: a dense weight,
    a dtype the kernels lack, or a call that needs the custom op (``_direct``)."""
    kind = getattr(weight, "kind", "dense")
    if kind == "dense" or dy.dtype not in KERNEL_DTYPES or not _direct(dy, lora_A, dy_B, lora_B):
        return None
    _check_device(dy, weight, "dy")
    from loraq.kernels.lora_linear_dx import dx_plan

    tensors, meta = weight.tensors(), _meta(weight)
    check = dx_check(dy, kind, tensors, meta, lora_A, dy_B, float(scaling))
    return dx_plan(dy, kind, tensors, meta, lora_A, dy_B, float(scaling), lora_B, check=check)


def triton_lora_linear_dx(dy, weight, lora_A, dy_B, scaling, lora_B=None):
    """The ``triton`` backend's ``lora_linear_dx`` (``dY·Ŵ + s·(dY·B)·A``; ``lora_B``, when given,
    lets large batches merge ``s·B·A`` into the decoded weight)."""
    kind = getattr(weight, "kind", "dense")
    _check_device(dy, weight, "dy")
    if kind == "dense" or dy.dtype not in KERNEL_DTYPES:
        return reference.lora_linear_dx_ref(dy, weight, lora_A, dy_B, scaling)
    N, K = weight.shape
    if _direct(dy, lora_A, dy_B, lora_B):
        return _launch_dx(dy, kind, weight.tensors(), _meta(weight), lora_A, dy_B, float(scaling), lora_B)
    if kind == "int1":
        return _call("int1_lora_linear_dx", dy, weight.packed, weight.scale, weight.col_scale, K,
                                                   weight.group_size or 0, weight.scale_mode == "onebit",
                                                   lora_A, dy_B, float(scaling), lora_B)
    return _call("sparse4x4_lora_linear_dx", dy, weight.values, weight.positions, N, K, lora_A, dy_B,
                                                    float(scaling), lora_B)
