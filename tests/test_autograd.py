"""LoraLinearFunction: gradcheck in float64 and a dense autograd twin in fp32 / fp16 / bf16.

Low-precision rule (DESIGN.md, flash-attention style), for the output and every gradient:
    max|out − ref| <= 2·max|out_torch_lowp − ref| + atol
with ``ref`` the plain-PyTorch computation in float64 and ``out_torch_lowp`` the same plain-PyTorch
computation in the low precision, on the same dequantized base ``Ŵ``.
"""

import pytest
import torch

from loraq.autograd import LoraLinearFunction
from loraq.formats import Int1Weight
from weights import make_weight

KINDS = ["int1", "int1_g8", "int1_onebit", "sparse4x4", "dense"]

make_base = make_weight


def f64(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


# ----------------------------------------------------------------------------------------------
# gradcheck in float64
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_float64_base_from_dense(kind):
    W = torch.randn(7, 13, dtype=torch.float64)
    base = make_base(kind, W)
    assert base.dtype == torch.float64 and base.dequantize().dtype == torch.float64


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("xshape", [(3, 13), (2, 3, 13), (13,)])
def test_gradcheck_lora(kind, with_bias, xshape):
    N, K, r = 7, 13, 3
    base = make_base(kind, torch.randn(N, K, dtype=torch.float64))
    x, A, B = f64(*xshape), f64(r, K), f64(N, r)
    inputs = (x, A, B) + ((f64(N),) if with_bias else ())

    def fn(x, A, B, *b):
        return LoraLinearFunction.apply(x, x, A, B, b[0] if b else None, base, 0.8, "reference")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("same_input", [True, False])
def test_forward_mode_gradcheck(kind, same_input):
    """The torch.func Function's ``jvp`` (forward mode: ``jvp``, ``jacfwd``, ``hessian``) against
    finite differences, with and without a separate dropout input, and with the adapter off."""
    from loraq.autograd import LoraLinearFuncFunction

    N, K, r = 7, 13, 3
    base = make_base(kind, torch.randn(N, K, dtype=torch.float64))
    x, xl, A, B, b = f64(2, 3, K), f64(2, 3, K), f64(r, K), f64(N, r), f64(N)

    def fn(x, xl, A, B, b):
        return LoraLinearFuncFunction.apply(x, None if same_input else xl, A, B, b, base, 0.8, "reference")

    def off(x, b):
        return LoraLinearFuncFunction.apply(x, None, None, None, b, base, 0.8, "reference")

    for f, inputs in ((fn, (x, xl, A, B, b)), (off, (x, b))):
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-6, check_forward_ad=True,
                                        check_backward_ad=False, check_undefined_grad=False)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_adapter_disabled(kind, with_bias):
    N, K = 7, 13
    base = make_base(kind, torch.randn(N, K, dtype=torch.float64))
    inputs = (f64(4, K),) + ((f64(N),) if with_bias else ())

    def fn(x, *b):
        return LoraLinearFunction.apply(x, x, None, None, b[0] if b else None, base, 2.0, "reference")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_separate_x_lora(kind, with_bias):
    """x_lora a different tensor than x (LoRA dropout): gradients to both."""
    N, K, r = 7, 13, 2
    base = make_base(kind, torch.randn(N, K, dtype=torch.float64))
    inputs = (f64(2, 3, K), f64(2, 3, K), f64(r, K), f64(N, r)) + ((f64(N),) if with_bias else ())

    def fn(x, xl, A, B, *b):
        return LoraLinearFunction.apply(x, xl, A, B, b[0] if b else None, base, 0.5, "reference")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("kind", ["int1", "sparse4x4", "dense"])
def test_gradcheck_dropout_mask_of_x(kind):
    """x_lora = mask·x/(1−p) computed from x: the adapter's gradient flows back to x through the mask."""
    N, K, r = 7, 13, 3
    base = make_base(kind, torch.randn(N, K, dtype=torch.float64))
    mask = (torch.rand(5, K) > 0.3).double()

    def fn(x, A, B, b):
        return LoraLinearFunction.apply(x, x * mask / 0.7, A, B, b, base, 1.3, "reference")

    inputs = (f64(5, K), f64(r, K), f64(N, r), f64(N))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("kind", ["int1", "sparse4x4"])
def test_gradcheck_subsets(kind):
    """Only some inputs need gradients (a frozen x, a frozen A): the others still check out."""
    N, K, r = 7, 13, 3
    base = make_base(kind, torch.randn(N, K, dtype=torch.float64))
    x = torch.randn(4, K, dtype=torch.float64)
    A = torch.randn(r, K, dtype=torch.float64)

    def fn_b(B, b):
        return LoraLinearFunction.apply(x, x, A, B, b, base, 0.9, "reference")

    assert torch.autograd.gradcheck(fn_b, (f64(N, r), f64(N)), eps=1e-6, atol=1e-7, rtol=1e-6)

    B_fixed = torch.randn(N, r, dtype=torch.float64)

    def fn_x2(x):
        return LoraLinearFunction.apply(x, x, A, B_fixed, None, base, 0.9, "reference")

    assert torch.autograd.gradcheck(fn_x2, (f64(4, K),), eps=1e-6, atol=1e-7, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# explicit gradient formulas (DESIGN.md) in float64
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["int1", "int1_onebit", "sparse4x4", "dense"])
def test_gradients_equal_design_formulas(kind):
    N, K, r, M, s = 23, 45, 4, 17, 0.6
    base = make_base(kind, torch.randn(N, K, dtype=torch.float64))
    What = base.dequantize()
    x, A, B, b = f64(M, K), f64(r, K), f64(N, r), f64(N)
    y = LoraLinearFunction.apply(x, x, A, B, b, base, s, "reference")
    dY = torch.randn_like(y)
    y.backward(dY)
    X, Ad, Bd = x.detach(), A.detach(), B.detach()
    torch.testing.assert_close(y.detach(), X @ What.t() + s * (X @ Ad.t()) @ Bd.t() + b.detach())
    torch.testing.assert_close(x.grad, dY @ What + s * (dY @ Bd) @ Ad)
    torch.testing.assert_close(B.grad, s * dY.t() @ (X @ Ad.t()))
    torch.testing.assert_close(A.grad, s * (dY @ Bd).t() @ X)
    torch.testing.assert_close(b.grad, dY.sum(0))


def test_saves_no_dense_weight():
    """Only x_l, A and B are kept for the backward: nothing of shape [N, K]."""
    N, K, r = 23, 45, 4
    base = make_base("int1", torch.randn(N, K))
    x = torch.randn(3, K, requires_grad=True)
    A, B = torch.randn(r, K, requires_grad=True), torch.randn(N, r, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = LoraLinearFunction.apply(x, x, A, B, None, base, 1.0, "reference")
    assert (N, K) not in saved and (K, N) not in saved
    assert sorted(saved) == sorted([(3, K), (r, K), (N, r)])
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only backend situation")
def test_backend_argument_is_used(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    base = make_base("int1", torch.randn(5, 9))
    with pytest.raises(RuntimeError, match="backend 'triton' is not available"):
        LoraLinearFunction.apply(torch.randn(2, 9), None, None, None, None, base, 1.0, "triton")


# ----------------------------------------------------------------------------------------------
# low precision against a dense autograd twin
# ----------------------------------------------------------------------------------------------
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SHAPES = [(1, 45, 23, 4), (3, 45, 23, 4), (17, 70, 13, 5), (5, 33, 7, 1)]


def twin(x, xl, What, A, B, b, s):
    """Plain PyTorch ops, in x.dtype (parameters cast inside the graph, like the Function does)."""
    dt = x.dtype
    y = x @ What.to(dt).t()
    if A is not None:
        y = y + s * ((xl @ A.to(dt).t()) @ B.to(dt).t())
    if b is not None:
        y = y + b.to(dt)
    return y


def run(mode, x0, A0, B0, b0, base, s, mask, dy, cast):
    """Forward + backward from fresh leaves cast by ``cast``; mode is 'loraq' or 'torch'."""
    def leaf(kind, t):
        return None if t is None else cast[kind](t).detach().clone().requires_grad_()

    x, A, B, b = leaf("x", x0), leaf("p", A0), leaf("p", B0), leaf("p", b0)
    xl = x if mask is None else x * mask.to(x.dtype)
    if mode == "loraq":
        y = LoraLinearFunction.apply(x, xl, A, B, b, base, s, "reference")
    else:
        y = twin(x, xl, base.dequantize().to(cast["w"]), A, B, b, s)
    y.backward(dy.to(y.dtype))
    grads = {"out": y.detach(), "dx": x.grad}
    if A is not None:
        grads.update(dA=A.grad, dB=B.grad)
    if b is not None:
        grads["db"] = b.grad
    return grads


@pytest.mark.parametrize("kind", ["int1", "int1_onebit", "sparse4x4", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("param_dtype", ["same", "fp32"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["lora_bias", "lora", "dropout_bias", "disabled_bias"])
def test_low_precision_against_twin(kind, dtype, param_dtype, shape, variant):
    M, K, N, r = shape
    pdt = dtype if param_dtype == "same" else torch.float32
    s = 2.0 / r
    base = make_base(kind, torch.randn(N, K).to(pdt))  # the frozen base lives in the parameters' dtype
    x0 = torch.randn(M, K)
    A0, B0 = (None, None) if variant.startswith("disabled") else (torch.randn(r, K) / r, torch.randn(N, r))
    b0 = torch.randn(N) if variant.endswith("bias") else None
    mask = (torch.rand(M, K) > 0.25).float() / 0.75 if variant.startswith("dropout") else None
    dy = torch.randn(M, N)

    low = {"x": lambda t: t.to(dtype), "p": lambda t: t.to(pdt), "w": pdt}
    f64 = {"x": lambda t: t.to(dtype).double(), "p": lambda t: t.to(pdt).double(), "w": torch.float64}
    ours = run("loraq", x0, A0, B0, b0, base, s, mask, dy, low)
    lowp = run("torch", x0, A0, B0, b0, base, s, mask, dy, low)
    ref = run("torch", x0, A0, B0, b0, base, s, None if mask is None else mask.to(dtype), dy.to(dtype), f64)

    assert set(ours) == set(lowp) == set(ref)
    assert ours["out"].dtype == dtype and ours["dx"].dtype == dtype
    for name in ("dA", "dB", "db"):
        if name in ours:
            assert ours[name].dtype == pdt, name  # parameter gradients in the parameters' dtype
    for name, t in ours.items():
        assert t.shape == ref[name].shape, name
        assert torch.isfinite(t).all(), name
        err = (t.double() - ref[name]).abs().max().item()
        err_pt = (lowp[name].double() - ref[name]).abs().max().item()
        atol = ATOL[dtype] * max(1.0, ref[name].abs().max().item())
        assert err <= 2 * err_pt + atol, f"{name}: {err} > 2·{err_pt} + {atol}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_params_with_low_precision_x(dtype):
    """fp32 adapters and bias with fp16/bf16 activations: output in x's dtype, grads in fp32."""
    N, K, r = 23, 45, 4
    base = Int1Weight.from_dense(torch.randn(N, K))
    x = torch.randn(3, K, dtype=dtype, requires_grad=True)
    A, B, b = (torch.randn(r, K, requires_grad=True), torch.randn(N, r, requires_grad=True),
               torch.randn(N, requires_grad=True))
    y = LoraLinearFunction.apply(x, x, A, B, b, base, 0.5, "reference")
    assert y.dtype == dtype and y.shape == (3, N)
    y.float().square().sum().backward()
    assert x.grad.dtype == dtype
    assert A.grad.dtype == B.grad.dtype == b.grad.dtype == torch.float32
    assert all(torch.isfinite(g).all() for g in (x.grad, A.grad, B.grad, b.grad))


def test_leading_dims_preserved():
    N, K, r = 7, 13, 2
    base = make_base("sparse4x4", torch.randn(N, K))
    x = torch.randn(2, 3, 4, K, requires_grad=True)
    A, B = torch.randn(r, K, requires_grad=True), torch.randn(N, r, requires_grad=True)
    y = LoraLinearFunction.apply(x, x, A, B, None, base, 1.0, "reference")
    assert y.shape == (2, 3, 4, N)
    y.sum().backward()
    assert x.grad.shape == x.shape and A.grad.shape == A.shape and B.grad.shape == B.shape
    y2 = LoraLinearFunction.apply(x.reshape(-1, K), x.reshape(-1, K), A, B, None, base, 1.0, "reference")
    torch.testing.assert_close(y.reshape(-1, N), y2)
