"""What every weight format shares: dtypes, sizes, .to(), state dicts, empty(), input validation.

Also DenseWeight itself and the helpers of loraq.formats (format_class, compress_weight).
"""

import io

import pytest
import torch

from loraq.formats import (
    FORMATS, CompressedWeight, DenseWeight, Int1Weight, Sparse4x4Weight, compress_weight, format_class,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(7, 45), (13, 70), (5, 33), (1, 1), (4, 4), (9, 3)]

# name -> (class, from_dense options, empty options)
VARIANTS = {
    "int1": (Int1Weight, {}, {}),
    "int1_g16": (Int1Weight, {"group_size": 16}, {"group_size": 16}),
    "int1_g5": (Int1Weight, {"group_size": 5}, {"group_size": 5}),
    "int1_onebit": (Int1Weight, {"scale": "onebit"}, {"scale": "onebit"}),
    "sparse4x4": (Sparse4x4Weight, {}, {}),
    "dense": (DenseWeight, {}, {}),
}
STORED = {Int1Weight: ("packed", "scale", "col_scale"), Sparse4x4Weight: ("values", "positions"),
          DenseWeight: ("weight",)}


def build(variant, W):
    cls, opts, _ = VARIANTS[variant]
    return cls.from_dense(W, **opts)


def expected_nbytes(variant, N, K, dtype):
    e = torch.tensor([], dtype=dtype).element_size()
    ceil = lambda a, b: -(-a // b)  # noqa: E731
    if variant == "int1":
        return N * ceil(K, 32) * 4 + N * e
    if variant == "int1_g16":
        return N * ceil(K, 32) * 4 + N * ceil(K, 16) * e
    if variant == "int1_g5":
        return N * ceil(K, 32) * 4 + N * ceil(K, 5) * e
    if variant == "int1_onebit":
        return N * ceil(K, 32) * 4 + (N + K) * e
    if variant == "sparse4x4":
        TN, TK = ceil(N, 4), ceil(K, 4)
        return TN * TK * e + TN * ceil(TK, 2)
    return N * K * e


def assert_same_object_state(a, b):
    assert type(a) is type(b)
    assert a.shape == b.shape and a.meta() == b.meta()
    for name in a._tensor_names:
        ta, tb = getattr(a, name), getattr(b, name)
        assert ta.dtype == tb.dtype and ta.shape == tb.shape, name
        assert torch.equal(ta, tb), name


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dtype_shape_nbytes(variant, dtype, shape):
    N, K = shape
    W = torch.randn(N, K).to(dtype)
    w = build(variant, W)
    assert isinstance(w, CompressedWeight)
    assert w.shape == (N, K) and w.out_features == N and w.in_features == K
    assert w.dtype == dtype
    Wq = w.dequantize()
    assert Wq.dtype == dtype and tuple(Wq.shape) == (N, K)
    assert w.device == torch.device("cpu")
    real = sum(getattr(w, n).numel() * getattr(w, n).element_size() for n in STORED[type(w)])
    assert w.nbytes == real == expected_nbytes(variant, N, K, dtype)
    assert w.bits_per_weight == pytest.approx(8 * real / (N * K))
    assert str(w.nbytes) in repr(w) and type(w).__name__ in repr(w)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float64_input_supported(variant):
    W = torch.randn(5, 33, dtype=torch.float64)
    w = build(variant, W)
    assert w.dtype == torch.float64 and w.dequantize().dtype == torch.float64


def test_dense_weight_is_a_copy_and_exact():
    W = torch.randn(7, 45)
    w = DenseWeight.from_dense(W)
    assert torch.equal(w.dequantize(), W)
    assert w.weight.data_ptr() != W.data_ptr()
    W.add_(1.0)
    assert not torch.equal(w.dequantize(), W)
    assert w.kind == "dense" and w.bits_per_weight == 32.0


def test_dense_weight_detaches():
    W = torch.randn(3, 5, requires_grad=True)
    w = DenseWeight.from_dense(W)
    assert not w.weight.requires_grad


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("target", DTYPES + [torch.float64])
def test_to_dtype(variant, target):
    W = torch.randn(7, 45)
    w = build(variant, W)
    before = {n: t.clone() for n, t in w.tensors().items()}
    v = w.to(dtype=target)
    assert v is not w and type(v) is type(w)
    assert v.dtype == target and v.dequantize().dtype == target and v.shape == w.shape
    assert v.meta() == w.meta()
    # integer tensors (bits, positions) untouched
    for n, t in v.tensors().items():
        if not t.is_floating_point():
            assert t.dtype == before[n].dtype and torch.equal(t, before[n])
    # the original is unchanged (format objects are immutable)
    for n, t in w.tensors().items():
        assert t.dtype == before[n].dtype and torch.equal(t, before[n])
    ref = w.dequantize().to(target)
    if variant == "int1_onebit":  # h and g are each rounded, then their product
        tol = {torch.float16: 4e-3, torch.bfloat16: 3e-2}.get(target, 1e-6)
        torch.testing.assert_close(v.dequantize(), ref, rtol=tol, atol=1e-6)
    else:  # α·(±1) and a selection are exact in every dtype
        assert torch.equal(v.dequantize(), ref)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_to_device(variant):
    w = build(variant, torch.randn(5, 33))
    for dev in ("cpu", torch.device("cpu")):
        v = w.to(dev)
        assert v is not w and v.device == torch.device("cpu")
        assert torch.equal(v.dequantize(), w.dequantize())
        assert_same_object_state(v, w)
    v = w.to(device="cpu", dtype=torch.float16)
    assert v.dtype == torch.float16


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("bad", [torch.int32, torch.uint8, torch.bool])
def test_to_non_float_dtype_raises(variant, bad):
    w = build(variant, torch.randn(5, 33))
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype"):
        w.to(dtype=bad)


@pytest.mark.parametrize("variant", ["int1", "int1_onebit", "sparse4x4"])
def test_to_positional_dtype_keeps_packed_integers(variant):
    w = build(variant, torch.randn(5, 33))
    v = w.to(torch.float16)
    assert all(getattr(v, n).dtype == getattr(w, n).dtype
               for n in STORED[type(w)] if not getattr(w, n).is_floating_point())
    torch.testing.assert_close(v.dequantize(), w.dequantize().half(), rtol=4e-3, atol=1e-6)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 45), (1, 1), (13, 70)])
def test_state_dict_round_trip(variant, dtype, shape):
    w = build(variant, torch.randn(*shape).to(dtype))
    sd = w.state_dict()
    assert set(sd) == set(w._tensor_names) | set(w._meta_names) | {"shape"}
    assert all(isinstance(t, torch.Tensor) for t in sd.values())
    r = type(w).from_state_dict(sd)
    assert_same_object_state(r, w)
    assert torch.equal(r.dequantize(), w.dequantize())
    # through safetensors too (the metadata is stored as int64 tensors for that reason)
    safetensors_torch = pytest.importorskip("safetensors.torch")
    blob = safetensors_torch.save({k: v.contiguous() for k, v in sd.items()})
    r2 = type(w).from_state_dict(safetensors_torch.load(blob))
    assert_same_object_state(r2, w)
    # and torch.save
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    assert_same_object_state(type(w).from_state_dict(torch.load(buf)), w)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_from_state_dict_missing_key(variant):
    w = build(variant, torch.randn(7, 45))
    for key in list(w.state_dict()):
        sd = w.state_dict()
        del sd[key]
        with pytest.raises(ValueError, match=rf"missing keys \['{key}'\]"):
            type(w).from_state_dict(sd)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_from_state_dict_extra_key(variant):
    w = build(variant, torch.randn(7, 45))
    sd = w.state_dict()
    sd["bogus"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected keys \['bogus'\]"):
        type(w).from_state_dict(sd)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_from_state_dict_wrong_shape(variant):
    w = build(variant, torch.randn(7, 45))
    for name in w._tensor_names:
        sd = w.state_dict()
        t = sd[name]
        sd[name] = torch.zeros(t.shape[0] + 1, *t.shape[1:], dtype=t.dtype)
        with pytest.raises(ValueError, match=name):
            type(w).from_state_dict(sd)
    sd = w.state_dict()
    sd["shape"] = torch.tensor([11, 45])  # the metadata no longer fits the tensors (one more tile row)
    with pytest.raises(ValueError):
        type(w).from_state_dict(sd)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_empty_matches_from_dense(variant, dtype, shape):
    cls, _, empty_opts = VARIANTS[variant]
    w = build(variant, torch.randn(*shape).to(dtype))
    e = cls.empty(shape, dtype, **empty_opts)
    assert type(e) is cls and e.shape == w.shape and e.dtype == w.dtype and e.meta() == w.meta()
    for n in cls._tensor_names:
        assert getattr(e, n).shape == getattr(w, n).shape, n
        assert getattr(e, n).dtype == getattr(w, n).dtype, n
    assert e.nbytes == w.nbytes
    # a state dict of a real weight loads into the shapes of empty()
    assert_same_object_state(cls.from_state_dict(w.state_dict()), w)
    assert {k: tuple(v.shape) for k, v in e.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in w.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# bad inputs, every format
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight(variant, bad):
    W = torch.randn(5, 33)
    W[2, 7] = bad
    with pytest.raises(ValueError, match=r"contains 1 NaN/Inf value"):
        build(variant, W)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.int64, torch.bool])
def test_integer_weight(variant, dtype):
    with pytest.raises(TypeError, match="must be floating point"):
        build(variant, torch.ones(5, 33, dtype=dtype))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", [(33,), (2, 3, 4), ()])
def test_not_2d_weight(variant, shape):
    with pytest.raises(ValueError, match=r"must be 2-D"):
        build(variant, torch.randn(shape) if shape else torch.tensor(1.5))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)])
def test_empty_weight(variant, shape):
    with pytest.raises(ValueError, match=r"is empty"):
        build(variant, torch.randn(*shape))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_not_a_tensor(variant):
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        build(variant, [[1.0, 2.0]])


# ----------------------------------------------------------------------------------------------
# loraq.formats helpers
# ----------------------------------------------------------------------------------------------
def test_format_class():
    assert FORMATS == {"int1": Int1Weight, "sparse4x4": Sparse4x4Weight, "dense": DenseWeight}
    for name, cls in FORMATS.items():
        assert format_class(name) is cls and cls.kind == name
    with pytest.raises(ValueError, match=r"unknown compression 'int2'; expected one of"):
        format_class("int2")


def test_compress_weight():
    W = torch.randn(7, 45)
    assert torch.equal(compress_weight(W, "int1", group_size=8).dequantize(),
                       Int1Weight.from_dense(W, group_size=8).dequantize())
    assert torch.equal(compress_weight(W, "int1", scale="onebit").dequantize(),
                       Int1Weight.from_dense(W, scale="onebit").dequantize())
    assert torch.equal(compress_weight(W, "sparse4x4").dequantize(),
                       Sparse4x4Weight.from_dense(W).dequantize())
    assert torch.equal(compress_weight(W, "dense").dequantize(), W)
    for name in ("sparse4x4", "dense"):
        with pytest.raises(ValueError, match="group_size applies to compression='int1' only"):
            compress_weight(W, name, group_size=8)
        with pytest.raises(ValueError, match="applies to compression='int1' only"):
            compress_weight(W, name, scale="onebit")
    with pytest.raises(ValueError, match="unknown compression"):
        compress_weight(W, "int4")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_from_dense_is_detached_from_the_weights_graph(variant):
    """Compressing a trainable weight (an nn.Linear's) gives frozen data: no tensor keeps W's
    autograd graph, so the base gets no gradient, a second backward works, and deepcopy works."""
    W = torch.randn(7, 45, requires_grad=True)
    w = build(variant, W)
    assert not any(t.requires_grad for t in w.tensors().values())
    x, p = torch.randn(3, 45), torch.randn(7, requires_grad=True)  # p: a trainable part downstream
    for _ in range(2):  # a second step would fail with "backward through the graph a second time"
        (x @ w.dequantize().t() * p).sum().backward()
    assert W.grad is None and p.grad is not None
    import copy
    copy.deepcopy(w)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", [[7], [7, 45, 1], [0, 45], [7, -45]])
def test_from_state_dict_refuses_a_bad_shape_entry(variant, shape):
    w = build(variant, torch.randn(7, 45))
    sd = w.state_dict()
    sd["shape"] = torch.tensor(shape)
    with pytest.raises(ValueError, match="shape"):
        type(w).from_state_dict(sd)


@pytest.mark.parametrize("variant,name", [("int1", "scale"), ("int1_onebit", "col_scale"),
                                          ("sparse4x4", "values")])
def test_from_state_dict_refuses_integer_scales_or_values(variant, name):
    """An integer ``scale``/``values`` would dequantize to an integer Ŵ: refused on load."""
    w = build(variant, torch.randn(7, 45))
    sd = w.state_dict()
    sd[name] = sd[name].to(torch.int16)
    with pytest.raises(ValueError, match="floating"):
        type(w).from_state_dict(sd)
