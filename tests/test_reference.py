"""loraq.reference (the ground truth) against dense float64 math, and the backend choice of loraq.ops."""

import warnings

import pytest
import torch

from loraq import ops, reference
from loraq.formats import Int1Weight
from loraq.reference import lora_linear_bwd_ref, lora_linear_ref
from weights import make_weight

N, K, R = 23, 45, 4
X_SHAPES = [(K,), (1, K), (3, K), (17, K), (2, 3, K)]


KINDS = ["tensor", "dense", "int1", "int1_g8", "int1_onebit", "sparse4x4"]


def dense_of(weight):
    return weight if isinstance(weight, torch.Tensor) else weight.dequantize()


def bcast_matmul(a, b):
    """a[..., k] · b[n, k]ᵀ written as a broadcast multiply and a sum (no matmul kernels involved)."""
    return (a.unsqueeze(-2) * b).sum(-1)


def dense_lora_linear(x, What, A, B, s, b):
    """y[..., n] = Σ_k x[..., k]·Ŵ[n, k] + s·Σ_j B[n, j]·Σ_k A[j, k]·x[..., k] + b[n], in float64."""
    x, What = x.double(), What.double()
    y = bcast_matmul(x, What)
    if A is not None:
        y = y + s * bcast_matmul(bcast_matmul(x, A.double()), B.double())
    if b is not None:
        y = y + b.double()
    return y


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("xshape", X_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_lora", [False, True])
def test_lora_linear_ref_float64(kind, xshape, with_bias, with_lora):
    W = torch.randn(N, K, dtype=torch.float64)
    weight = make_weight(kind, W)
    x = torch.randn(*xshape, dtype=torch.float64)
    A = torch.randn(R, K, dtype=torch.float64) if with_lora else None
    B = torch.randn(N, R, dtype=torch.float64) if with_lora else None
    b = torch.randn(N, dtype=torch.float64) if with_bias else None
    s = 0.37
    y = lora_linear_ref(x, weight, A, B, s, b)
    assert y.dtype == torch.float64 and tuple(y.shape) == (*xshape[:-1], N)
    expected = dense_lora_linear(x, dense_of(weight), A, B, s, b)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    # ops.lora_linear on the reference backend returns exactly what the reference returns
    y2 = ops.lora_linear(x, weight, A, B, s, b, backend="reference")
    assert y2.shape == y.shape
    torch.testing.assert_close(y2, y, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("kind", ["int1", "sparse4x4", "dense"])
def test_lora_linear_ref_explicit_loops(kind):
    """A tiny case written out with scalar loops (no matmul at all)."""
    n_, k_, r_ = 5, 7, 2
    W = torch.randn(n_, k_, dtype=torch.float64)
    weight = make_weight(kind, W)
    What = weight.dequantize().tolist()
    x = torch.randn(3, k_, dtype=torch.float64)
    A, B = torch.randn(r_, k_, dtype=torch.float64), torch.randn(n_, r_, dtype=torch.float64)
    b = torch.randn(n_, dtype=torch.float64)
    s = 1.5
    xl, Al, Bl, bl = x.tolist(), A.tolist(), B.tolist(), b.tolist()
    expected = []
    for m in range(3):
        row = []
        for n in range(n_):
            v = sum(xl[m][k] * What[n][k] for k in range(k_))
            for j in range(r_):
                v += s * Bl[n][j] * sum(Al[j][k] * xl[m][k] for k in range(k_))
            row.append(v + bl[n])
        expected.append(row)
    y = lora_linear_ref(x, weight, A, B, s, b)
    torch.testing.assert_close(y, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_computes_in_x_dtype(dtype):
    """Weight (fp32 base), adapters and bias are cast to x.dtype, like F.linear."""
    W = torch.randn(N, K)
    weight = Int1Weight.from_dense(W)
    x = torch.randn(3, K).to(dtype)
    A, B, b = torch.randn(R, K), torch.randn(N, R), torch.randn(N)
    y = lora_linear_ref(x, weight, A, B, 0.5, b)
    assert y.dtype == dtype
    expected = x @ weight.dequantize().to(dtype).t()
    expected = expected + 0.5 * ((x @ A.to(dtype).t()) @ B.to(dtype).t()) + b.to(dtype)
    assert torch.equal(y, expected)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tensor", "int1", "sparse4x4"])
@pytest.mark.parametrize("xshape", [(44,), (3, 46), (2, 3, 23)])
def test_wrong_last_dim(kind, xshape):
    weight = make_weight(kind, torch.randn(N, K))
    x = torch.randn(*xshape)
    with pytest.raises(ValueError, match=f"expected last dimension {K}") as ei:
        lora_linear_ref(x, weight, None, None, 1.0)
    # the message names the argument, what was expected and what came
    msg = str(ei.value)
    assert msg.startswith("x:") and f"expected last dimension {K}" in msg
    assert f"got {xshape[-1]}" in msg and str(tuple(xshape)) in msg
    with pytest.raises(ValueError, match=f"expected last dimension {K}.*got {xshape[-1]}"):
        ops.lora_linear(x, weight, backend="reference")


def test_scalar_and_integer_x():
    weight = make_weight("int1", torch.randn(N, K))
    with pytest.raises(ValueError, match=f"expected last dimension {K}.*got a scalar"):
        lora_linear_ref(torch.tensor(1.0), weight, None, None, 1.0)
    with pytest.raises(TypeError, match="x must be floating point"):
        lora_linear_ref(torch.ones(3, K, dtype=torch.int64), weight, None, None, 1.0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        lora_linear_ref([[1.0] * K], weight, None, None, 1.0)


@pytest.mark.parametrize("fn", ["ref", "ops"])
def test_lora_shape_errors(fn):
    if fn == "ref":
        call = lora_linear_ref
    else:
        def call(*a):
            return ops.lora_linear(*a, backend="reference")
    weight = make_weight("int1", torch.randn(N, K))
    x = torch.randn(3, K)
    with pytest.raises(ValueError, match=rf"lora_A: expected shape \[r, {K}\], got \(4, 44\)"):
        call(x, weight, torch.randn(4, 44), torch.randn(N, 4), 1.0)
    with pytest.raises(ValueError, match=rf"lora_A: expected shape \[r, {K}\], got \({K},\)"):
        call(x, weight, torch.randn(K), torch.randn(N, 4), 1.0)
    with pytest.raises(ValueError, match=rf"lora_B: expected shape \[{N}, 4\] to match lora_A, "
                                         rf"got \({N}, 5\)"):
        call(x, weight, torch.randn(4, K), torch.randn(N, 5), 1.0)
    with pytest.raises(ValueError, match=rf"lora_B: expected shape \[{N}, 4\].*got \(4, {N}\)"):
        call(x, weight, torch.randn(4, K), torch.randn(4, N), 1.0)
    with pytest.raises(ValueError, match="lora_A and lora_B must be given together"):
        call(x, weight, torch.randn(4, K), None, 1.0)
    with pytest.raises(ValueError, match="lora_A and lora_B must be given together"):
        call(x, weight, None, torch.randn(N, 4), 1.0)


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only backend situation")


@needs_no_cuda
@pytest.mark.parametrize("kind", ["tensor", "int1", "sparse4x4", "dense"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_named_unavailable_backend_raises(monkeypatch, kind, backend):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    weight = make_weight(kind, torch.randn(N, K))
    with pytest.raises(RuntimeError, match=rf"backend '{backend}' is not available: .+"):
        ops.lora_linear(torch.randn(3, K), weight, backend=backend)
    with pytest.raises(RuntimeError, match=rf"backend '{backend}' is not available"):
        ops.base_matmul_t(torch.randn(3, N), weight, backend=backend)
    ok, why = ops.backend_status(torch.device("cpu"))[backend]
    assert ok is False and why


@pytest.mark.parametrize("bad", ["Reference", "cpu", "fast", "triton "])
def test_unknown_backend(bad):
    weight = make_weight("int1", torch.randn(N, K))
    with pytest.raises(ValueError, match=rf"backend must be one of .*got '{bad}'"):
        ops.lora_linear(torch.randn(3, K), weight, backend=bad)


@needs_no_cuda
def test_env_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    weight = make_weight("sparse4x4", torch.randn(N, K))
    x = torch.randn(3, K)
    expected = lora_linear_ref(x, weight, None, None, 1.0)

    monkeypatch.setenv("LORAQ_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="backend 'triton' is not available"):
        ops.lora_linear(x, weight)
    # a per-call argument wins over the environment
    assert torch.equal(ops.lora_linear(x, weight, backend="reference"), expected)

    monkeypatch.setenv("LORAQ_BACKEND", "nonsense")
    with pytest.raises(ValueError, match=r"LORAQ_BACKEND.*got 'nonsense'"):
        ops.lora_linear(x, weight)

    monkeypatch.setenv("LORAQ_BACKEND", "reference")
    assert torch.equal(ops.lora_linear(x, weight), expected)

    monkeypatch.setenv("LORAQ_BACKEND", "auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto on the CPU falls back to reference without a warning
        assert torch.equal(ops.lora_linear(x, weight), expected)
    assert ops.resolve_backend(None, torch.device("cpu"), "int1") == "reference"

    monkeypatch.delenv("LORAQ_BACKEND")
    assert torch.equal(ops.lora_linear(x, weight), expected)


def test_backend_status_reference_always_available():
    st = ops.backend_status(torch.device("cpu"))
    assert set(st) == {"reference", "triton", "cuda"}
    assert st["reference"][0] is True


def test_base_matmul_t():
    W = torch.randn(N, K, dtype=torch.float64)
    for kind in KINDS:
        weight = make_weight(kind, W)
        dy = torch.randn(2, 3, N, dtype=torch.float64)
        dx = ops.base_matmul_t(dy, weight, backend="reference")
        assert dx.shape == (2, 3, K)
        torch.testing.assert_close(dx, bcast_matmul(dy, dense_of(weight).double().t()))
        with pytest.raises(ValueError, match=rf"dy: expected last dimension {N} \(out_features\), got {K}"):
            ops.base_matmul_t(torch.randn(3, K, dtype=torch.float64), weight, backend="reference")


# ----------------------------------------------------------------------------------------------
# reference backward
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("with_lora", [True, False])
def test_lora_linear_bwd_ref_matches_autograd(kind, M, with_lora):
    W = torch.randn(N, K, dtype=torch.float64)
    weight = make_weight(kind, W)
    x = torch.randn(M, K, dtype=torch.float64, requires_grad=True)
    A = torch.randn(R, K, dtype=torch.float64, requires_grad=True) if with_lora else None
    B = torch.randn(N, R, dtype=torch.float64, requires_grad=True) if with_lora else None
    b = torch.randn(N, dtype=torch.float64, requires_grad=True)
    s = 0.7
    y = lora_linear_ref(x, weight, A, B, s, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    dx, dA, dB, db = lora_linear_bwd_ref(dy, x.detach(), weight, None if A is None else A.detach(),
                                         None if B is None else B.detach(), s)
    torch.testing.assert_close(dx, x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(db, b.grad, rtol=1e-12, atol=1e-12)
    if with_lora:
        torch.testing.assert_close(dA, A.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dB, B.grad, rtol=1e-12, atol=1e-12)
    else:
        assert dA is None and dB is None


def test_dequantize_ref():
    W = torch.randn(N, K)
    w = Int1Weight.from_dense(W)
    assert torch.equal(reference.dequantize_ref(w), w.dequantize())
    assert reference.dequantize_ref(w, torch.float16).dtype == torch.float16
    assert reference.dequantize_ref(W) is W
    assert reference.weight_shape(w) == (N, K) == reference.weight_shape(W)


def test_lora_linear_dx_reference_and_its_checks():
    weight = make_weight("int1", torch.randn(N, K, dtype=torch.float64))
    dy = torch.randn(2, 3, N, dtype=torch.float64)
    A = torch.randn(4, K, dtype=torch.float64)
    B = torch.randn(N, 4, dtype=torch.float64)
    dx = ops.lora_linear_dx(dy, weight, A, dy @ B, 0.5, backend="reference")
    expected = dy @ weight.dequantize() + 0.5 * (dy @ B) @ A
    torch.testing.assert_close(dx, expected)
    assert torch.equal(ops.lora_linear_dx(dy, weight, backend="reference"), ops.base_matmul_t(dy, weight, backend="reference"))
    with pytest.raises(ValueError, match="lora_A and dy_B must be given together"):
        ops.lora_linear_dx(dy, weight, A, None)
    with pytest.raises(ValueError, match=r"lora_A must be \[r, "):
        ops.lora_linear_dx(dy, weight, A, torch.randn(2, 3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="dy: expected last dimension"):
        ops.lora_linear_dx(torch.randn(3, N + 1), weight)
    # lora_B, the B of dy_B: the reference needs only dy_B, so the result is the same
    assert torch.equal(ops.lora_linear_dx(dy, weight, A, dy @ B, 0.5, backend="reference", lora_B=B), dx)
    for bad in (B[:, :3], B[:-1], B.t()):
        with pytest.raises(ValueError, match=r"lora_B must be \["):
            ops.lora_linear_dx(dy, weight, A, dy @ B, 0.5, lora_B=bad)
    with pytest.raises(ValueError, match=r"lora_B must be \[.*and lora_A given"):
        ops.lora_linear_dx(dy, weight, lora_B=B)
