"""Unusual but valid inputs through every CPU backend (``reference``; ``triton`` in the
interpreter): strided, expanded and empty activations, frozen adapters, mixed dtypes, and the
ways of differentiating other than ``.backward()`` (torch.func, forward-mode AD). Each result is
compared with the plain float64 computation on the same dequantized base."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import grad, hessian, jacrev, jvp, vmap

from loraq import LoraLinear, ops
from weights import make_weight

BACKENDS = ["reference", "triton"]
N, K, R = 7, 13, 3


def problem(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = make_weight(kind, torch.randn(N, K, generator=g))
    A, B, b = (torch.randn(*s, generator=g) for s in ((R, K), (N, R), (N,)))
    return w, A, B, b


def dense64(x, w, A, B, s, b):
    """``y`` in float64 on the same ``Ŵ``, differentiable in every argument."""
    y = x.double() @ w.dequantize().double().t()
    if A is not None:
        y = y + s * (x.double() @ A.double().t()) @ B.double().t()
    return y if b is None else y + b.double()


def close(got, want, atol=1e-5):
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["int1_g8", "sparse4x4"])
@pytest.mark.parametrize("layout", ["transposed", "step", "expanded", "permuted_4d", "empty_3d"])
def test_strided_expanded_and_empty_activations_with_every_gradient(backend, kind, layout):
    w, A, B, b = problem(kind)
    x = {"transposed": lambda: torch.randn(K, 5).t(), "step": lambda: torch.randn(10, K)[::2],
         "expanded": lambda: torch.randn(1, 3, K).expand(2, 3, K),
         "permuted_4d": lambda: torch.randn(2, K, 3, 2).permute(0, 2, 3, 1),
         "empty_3d": lambda: torch.randn(0, 3, K)}[layout]()
    assert not x.is_contiguous() or x.numel() == 0
    inputs = [x.requires_grad_()] + [t.clone().requires_grad_() for t in (A, B, b)]
    y = ops.lora_linear(inputs[0], w, *inputs[1:3], 0.5, inputs[3], backend=backend)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, inputs, g)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    y64 = dense64(inputs64[0], w, *inputs64[1:3], 0.5, inputs64[3])
    close(y, y64.detach())
    for a, c in zip(got, torch.autograd.grad(y64, inputs64, g.double())):
        close(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["int1", "sparse4x4"])
def test_torch_func_grad_jacrev_and_hessian_through_the_functional_op(backend, kind):
    """``torch.func.grad`` over ``ops.lora_linear`` itself (not through ``LoraLinear``): the custom
    ops' own autograd formulas failed inside torch under a transform ("must override the
    setup_context staticmethod"), on the kernels only."""
    w, A, B, b = problem(kind)
    x = torch.randn(4, K)

    def loss(x, A, B, b):
        return ops.lora_linear(x, w, A, B, 0.5, b, backend=backend).square().sum()

    got = grad(loss, argnums=(0, 1, 2, 3))(x, A, B, b)
    want = grad(lambda *a: dense64(a[0], w, *a[1:3], 0.5, a[3]).square().sum(), argnums=(0, 1, 2, 3))(
        *(t.double() for t in (x, A, B, b)))
    for a, c in zip(got, want):
        close(a, c, atol=1e-4)
    jac = jacrev(lambda x: ops.lora_linear(x, w, A, B, 0.5, b, backend=backend))(x[:2])
    close(jac, jacrev(lambda x: dense64(x, w, A, B, 0.5, b))(x[:2].double()))
    hes = hessian(lambda A: loss(x, A, B, b))(A)  # forward over reverse: the dX op's tangent too
    x64, B64, b64 = x.double(), B.double(), b.double()
    want = hessian(lambda A: dense64(x64, w, A, B64, 0.5, b64).square().sum())(A.double())
    close(hes, want, atol=1e-3)
    per_sample = vmap(grad(lambda A, xi: loss(xi[None], A, B, b)), in_dims=(None, 0))(A, x)
    for i in range(4):
        close(per_sample[i], grad(lambda A: loss(x[i:i + 1], A, B, b))(A), atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["int1_onebit", "sparse4x4"])
def test_forward_mode_ad_carries_every_tangent(backend, kind):
    """``torch.func.jvp`` and ``forward_ad`` dual tensors: the kernels dropped the tangent (zeros,
    or None) where the reference carried it."""
    w, A, B, b = problem(kind)
    x = torch.randn(4, K)
    primals, tangents = (x, A, B, b), tuple(torch.randn_like(t) for t in (x, A, B, b))
    _, got = jvp(lambda x, A, B, b: ops.lora_linear(x, w, A, B, 0.5, b, backend=backend), primals, tangents)
    _, want = jvp(lambda x, A, B, b: dense64(x, w, A, B, 0.5, b), tuple(t.double() for t in primals),
                  tuple(t.double() for t in tangents))
    close(got, want)
    with fwAD.dual_level():
        y = ops.lora_linear(fwAD.make_dual(x, tangents[0]), w, A, B, 0.5, b, backend=backend)
        tangent = fwAD.unpack_dual(y).tangent
    assert tangent is not None
    close(tangent, jvp(lambda x: dense64(x, w, A, B, 0.5, b), (x.double(),), (tangents[0].double(),))[1])
    # the dX op: dY·Ŵ + s·dY_B·A, in dY, A and dY_B
    dy, dyB = torch.randn(4, N), torch.randn(4, R)
    t = (torch.randn_like(dy), torch.randn_like(A), torch.randn_like(dyB))
    _, got = jvp(lambda dy, A, dyB: ops.lora_linear_dx(dy, w, A, dyB, 0.5, backend=backend), (dy, A, dyB), t)
    W = w.dequantize().double()
    close(got, t[0].double() @ W + 0.5 * (t[2].double() @ A.double() + dyB.double() @ t[1].double()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["tensor", "dense", "int1", "sparse4x4"])
def test_a_weight_on_another_device_is_refused(backend, kind):
    """A weight left on the meta device: torch multiplies a CPU tensor by it into uninitialized
    memory, so the reference backend returned garbage instead of an error."""
    w = make_weight(kind, torch.randn(N, K)).to("meta")
    with pytest.raises(ValueError, match="x is on cpu but the weight"):
        ops.lora_linear(torch.randn(2, K), w, backend=backend)
    with pytest.raises(ValueError, match="dy is on cpu but the weight"):
        ops.base_matmul_t(torch.randn(2, N), w, backend=backend)
    assert ops.lora_linear(torch.randn(2, K, device="meta"), w, backend=backend).shape == (2, N)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_with_mixed_dtypes_frozen_adapters_and_no_grad_modes(backend):
    """fp16 activations on an fp32 layer, frozen adapters, ``no_grad``/``inference_mode``, and two
    backward passes over one graph: each as the float64 computation says."""
    w, A, B, b = problem("int1")
    layer = LoraLinear(w, rank=R, lora_A=A, lora_B=B, bias=b, backend=backend)
    x = torch.randn(2, 3, K)
    want = dense64(x, w, A, B, layer.scaling, b)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            close(layer(x), want)
    y = layer(x.half())
    assert y.dtype == torch.float16
    close(y, dense64(x.half(), w, A, B, layer.scaling, b), atol=2e-2)
    xg = x.clone().requires_grad_()
    y = layer(xg)
    y.sum().backward(retain_graph=True)
    first = (xg.grad.clone(), layer.lora_A.grad.clone())
    y.sum().backward()
    close(xg.grad, 2 * first[0])
    close(layer.lora_A.grad, 2 * first[1])
    layer.lora_A.requires_grad_(False)
    layer.lora_B.requires_grad_(False)
    xg = x.clone().requires_grad_()
    layer(xg).square().sum().backward()
    x64 = x.double().requires_grad_()
    dense64(x64, w, A, B, layer.scaling, b).square().sum().backward()
    close(xg.grad, x64.grad, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["int1", "sparse4x4"])
def test_forward_mode_through_the_layer(backend, kind):
    """``torch.func.jvp`` and ``hessian`` through ``LoraLinear`` with trainable adapters: its
    Function had no ``jvp`` (NotImplementedError on every backend)."""
    from torch.func import functional_call

    w, A, B, b = problem(kind)
    layer = LoraLinear(w, rank=R, lora_A=A, lora_B=B, bias=b, backend=backend)
    s = layer.scaling
    x, tx = torch.randn(2, 3, K), torch.randn(2, 3, K)
    params = {n: p.detach() for n, p in layer.named_parameters()}
    tangents = {n: torch.randn_like(p) for n, p in params.items()}

    def out(p, x):
        return functional_call(layer, p, (x,))

    _, got = jvp(out, (params, x), (tangents, tx))
    _, want = jvp(lambda p, x: dense64(x, w, p["lora_A"], p["lora_B"], s, p["bias"]),
                  ({n: p.double() for n, p in params.items()}, x.double()),
                  ({n: t.double() for n, t in tangents.items()}, tx.double()))
    close(got, want)

    def loss(A, f):
        return f({**params, "lora_A": A}, x).square().sum()

    got = hessian(loss)(params["lora_A"], out)
    want = hessian(loss)(params["lora_A"].double(),
                         lambda p, x: dense64(x, w, p["lora_A"], p["lora_B"].double(), s, p["bias"].double()))
    close(got, want, atol=1e-4)
