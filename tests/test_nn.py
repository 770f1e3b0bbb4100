"""nn.LoraLinear: construction from nn.Linear, inits, forward/backward, module plumbing, and peft parity."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loraq.formats import DenseWeight, Int1Weight, Sparse4x4Weight
from loraq.nn import LoraLinear, format_bytes
from loraq.reference import lora_linear_ref

K, N = 45, 23
COMBOS = [  # (compression, init, extra from_linear options)
    ("int1", "gaussian", {}), ("int1", "svd", {}), ("int1", "loftq", {"loftq_iters": 2}),
    ("int1", "svd", {"group_size": 16}), ("int1", "loftq", {"scale": "onebit", "loftq_iters": 2}),
    ("sparse4x4", "gaussian", {}), ("sparse4x4", "svd", {}), ("sparse4x4", "loftq", {"loftq_iters": 2}),
    ("dense", "gaussian", {}),
]
COMBO_IDS = [f"{c}-{i}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for c, i, o in COMBOS]


def make_linear(in_f=K, out_f=N, bias=True, dtype=torch.float32):
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.normal_()  # larger than the default init: compression errors are clearly visible
        if bias:
            lin.bias.normal_()
    return lin


def randomize_adapters(m):
    with torch.no_grad():
        m.lora_A.normal_()
        m.lora_B.normal_()
    return m


def err(W, m):
    return float((W.float() - m.merged_weight().float()).norm())


# ----------------------------------------------------------------------------------------------
# construction and forward
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compression,init,opts", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_forward_equals_reference(compression, init, opts, bias):
    lin = make_linear(bias=bias)
    m = LoraLinear.from_linear(lin, compression, rank=4, alpha=6, init=init, **opts)
    assert m.compression == compression and m.base.kind == compression
    assert (m.in_features, m.out_features, m.rank) == (K, N, 4)
    assert m.scaling == pytest.approx(6 / 4)
    assert m.lora_A.shape == (4, K) and m.lora_B.shape == (N, 4)
    assert (m.bias is None) == (not bias)
    if bias:
        assert torch.equal(m.bias, lin.bias) and m.bias.data_ptr() != lin.bias.data_ptr()
    for xshape in [(3, K), (2, 3, K), (K,), (1, K)]:
        x = torch.randn(*xshape)
        y = m(x)
        assert y.shape == (*xshape[:-1], N) and y.dtype == torch.float32
        expected = lora_linear_ref(x, m.base, m.lora_A, m.lora_B, m.scaling, m.bias)
        torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    # the linear is left untouched
    assert isinstance(lin.weight, nn.Parameter) and lin.weight.requires_grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("compression,init", [("int1", "svd"), ("sparse4x4", "loftq"), ("dense", "gaussian")])
def test_from_low_precision_linear(dtype, compression, init):
    lin = make_linear(dtype=dtype)
    m = LoraLinear.from_linear(lin, compression, rank=4, init=init)
    assert m.base.dtype == m.lora_A.dtype == m.lora_B.dtype == m.bias.dtype == dtype
    x = torch.randn(3, K, dtype=dtype)
    y = m(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, lora_linear_ref(x, m.base, m.lora_A, m.lora_B, m.scaling, m.bias))
    if init != "gaussian":  # the repair helps in low precision too
        W = lin.weight.detach().float()
        assert err(W, m) < float((W - m.base.dequantize().float()).norm())


@pytest.mark.parametrize("compression,cls,init", [
    ("int1", Int1Weight, "gaussian"), ("int1", Int1Weight, "svd"), ("sparse4x4", Sparse4x4Weight, "gaussian"),
    ("sparse4x4", Sparse4x4Weight, "svd"), ("dense", DenseWeight, "gaussian")])
def test_base_is_the_compressed_weight(compression, cls, init):
    lin = make_linear()
    m = LoraLinear.from_linear(lin, compression, rank=3, init=init)
    assert isinstance(m.base, cls)
    assert torch.equal(m.base.dequantize(), cls.from_dense(lin.weight.detach()).dequantize())


@pytest.mark.parametrize("compression", ["int1", "sparse4x4", "dense"])
def test_gaussian_init_starts_at_the_base(compression):
    lin = make_linear()
    r = 5
    m = LoraLinear.from_linear(lin, compression, rank=r, init="gaussian")
    assert torch.count_nonzero(m.lora_B) == 0
    assert torch.count_nonzero(m.lora_A) == m.lora_A.numel()
    assert 0.6 / r < float(m.lora_A.detach().std()) < 1.5 / r  # A ~ N(0, 1/r²)
    x = torch.randn(7, K)
    torch.testing.assert_close(m(x), x @ m.base.dequantize().t() + lin.bias.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.merged_weight(), m.base.dequantize())


def test_gaussian_init_generator_is_deterministic():
    lin = make_linear()
    a = LoraLinear.from_linear(lin, "int1", rank=4, generator=torch.Generator().manual_seed(3))
    b = LoraLinear.from_linear(lin, "int1", rank=4, generator=torch.Generator().manual_seed(3))
    c = LoraLinear.from_linear(lin, "int1", rank=4, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.lora_A, b.lora_A) and not torch.equal(a.lora_A, c.lora_A)


@pytest.mark.parametrize("init", ["svd", "loftq"])
def test_dense_only_gaussian(init):
    with pytest.raises(ValueError, match="use init='gaussian'"):
        LoraLinear.from_linear(make_linear(), "dense", rank=4, init=init)


@pytest.mark.parametrize("compression,opts", [("int1", {}), ("int1", {"group_size": 8}),
                                              ("int1", {"scale": "onebit"}), ("sparse4x4", {})])
@pytest.mark.parametrize("rslora", [False, True])
def test_svd_init_is_best_rank_r_repair(compression, opts, rslora):
    lin = make_linear()
    W = lin.weight.detach()
    r = 6
    g = LoraLinear.from_linear(lin, compression, rank=r, init="gaussian", rslora=rslora, **opts)
    s = LoraLinear.from_linear(lin, compression, rank=r, init="svd", rslora=rslora, alpha=3, **opts)
    e_g, e_s = err(W, g), err(W, s)
    assert e_s < e_g
    # exactly the tail of the residual's singular values (Eckart–Young)
    S = torch.linalg.svdvals((W - s.base.dequantize()).double())
    assert e_s == pytest.approx(float(S[r:].square().sum().sqrt()), rel=1e-4)
    assert e_g == pytest.approx(float(S.square().sum().sqrt()), rel=1e-4)
    # and the forward really computes the merged weight
    x = torch.randn(3, K)
    torch.testing.assert_close(s(x), x @ s.merged_weight().t() + lin.bias.detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("compression,opts", [("int1", {}), ("int1", {"group_size": 16}), ("sparse4x4", {})])
def test_loftq(compression, opts):
    lin = make_linear(70, 13)
    W = lin.weight.detach()
    svd = LoraLinear.from_linear(lin, compression, rank=4, init="svd", **opts)
    l1 = LoraLinear.from_linear(lin, compression, rank=4, init="loftq", loftq_iters=1, **opts)
    l3 = LoraLinear.from_linear(lin, compression, rank=4, init="loftq", loftq_iters=3, **opts)
    # one LoftQ step is the SVD init
    assert torch.equal(l1.lora_A, svd.lora_A) and torch.equal(l1.lora_B, svd.lora_B)
    for n, t in l1.base.tensors().items():
        assert torch.equal(t, svd.base.tensors()[n]), n
    assert err(W, l3) <= err(W, l1) * (1 + 1e-6)


@pytest.mark.parametrize("iters", [0, -1, 1.5, True, "2"])
def test_loftq_bad_iters(iters):
    with pytest.raises(ValueError, match="loftq_iters must be an int >= 1"):
        LoraLinear.from_linear(make_linear(), "int1", rank=4, init="loftq", loftq_iters=iters)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compression", ["int1", "sparse4x4", "dense"])
@pytest.mark.parametrize("rank", [0, -3, 24, 46, 1000])
def test_rank_out_of_range(compression, rank):
    lin = make_linear()  # min(N, K) = 23
    with pytest.raises(ValueError, match=rf"rank must be between 1 and min\(out, in\) = {N}.*got {rank}"):
        LoraLinear.from_linear(lin, compression, rank=rank)
    with pytest.raises(ValueError, match="rank must be between 1 and"):
        LoraLinear(DenseWeight.from_dense(lin.weight.detach()), rank=rank)


@pytest.mark.parametrize("rank", [2.0, "4", True, None])
def test_rank_not_int(rank):
    with pytest.raises(TypeError, match="rank must be an int"):
        LoraLinear.from_linear(make_linear(), "int1", rank=rank)


def test_rank_equal_to_min_dim_is_a_full_repair():
    """rank = min(N, K) is allowed, and the SVD init then reproduces W exactly (up to rounding)."""
    lin = make_linear()
    m = LoraLinear.from_linear(lin, "sparse4x4", rank=N, init="svd")
    torch.testing.assert_close(m.merged_weight(), lin.weight.detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("xshape", [(3, K - 1), (K + 1,), (2, 3, N)])
def test_wrong_input_last_dim(xshape):
    m = LoraLinear.from_linear(make_linear(), "int1", rank=4)
    with pytest.raises(ValueError) as ei:
        m(torch.randn(*xshape))
    msg = str(ei.value)
    assert f"expected last dimension {K}" in msg and f"got {xshape[-1]}" in msg


def test_other_construction_errors():
    lin = make_linear()
    with pytest.raises(ValueError, match="unknown compression 'int4'"):
        LoraLinear.from_linear(lin, "int4")
    with pytest.raises(ValueError, match="init must be one of"):
        LoraLinear.from_linear(lin, "int1", init="kaiming")
    with pytest.raises(TypeError, match="from_linear expects an nn.Linear"):
        LoraLinear.from_linear(nn.Conv1d(3, 3, 1), "int1")
    with pytest.raises(TypeError, match="base must be a loraq format object"):
        LoraLinear(lin.weight.detach(), rank=2)
    for p in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
            LoraLinear.from_linear(lin, "int1", rank=2, dropout=p)
    for a in (0, -2.0):
        with pytest.raises(ValueError, match="alpha must be > 0"):
            LoraLinear(Int1Weight.from_dense(lin.weight.detach()), rank=2, alpha=a)
    with pytest.raises(ValueError, match="lora_A/lora_B must be"):
        LoraLinear(Int1Weight.from_dense(lin.weight.detach()), rank=2, lora_A=torch.randn(3, K),
                   lora_B=torch.randn(N, 2))
    bad = lin.weight.detach().clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        LoraLinear.from_linear(_linear_with_weight(bad), "int1", rank=2)
    m = LoraLinear.from_linear(lin, "int1", rank=2)
    with pytest.raises(ValueError, match="base must be a int1 weight of shape"):
        m.base = Sparse4x4Weight.from_dense(lin.weight.detach())
    with pytest.raises(ValueError, match="base must be a int1 weight of shape"):
        m.base = Int1Weight.from_dense(torch.randn(N, K + 1))


def _linear_with_weight(W):
    lin = nn.Linear(W.shape[1], W.shape[0])
    with torch.no_grad():
        lin.weight.copy_(W)
    return lin


# ----------------------------------------------------------------------------------------------
# behaviour
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compression", ["int1", "sparse4x4", "dense"])
def test_enable_disable_adapter(compression):
    lin = make_linear()
    m = randomize_adapters(LoraLinear.from_linear(lin, compression, rank=4))
    x = torch.randn(5, K)
    base_only = x @ m.base.dequantize().t() + m.bias
    with_adapter = base_only + m.scaling * (x @ m.lora_A.t()) @ m.lora_B.t()
    torch.testing.assert_close(m(x), with_adapter, rtol=1e-5, atol=1e-5)
    m.disable_adapter()
    assert not m.adapter_enabled and "adapter disabled" in repr(m)
    torch.testing.assert_close(m(x), base_only, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.merged_weight(), m.base.dequantize())
    x.requires_grad_()
    m(x).sum().backward()
    assert m.lora_A.grad is None and m.lora_B.grad is None and x.grad is not None
    m.enable_adapter()
    assert m.adapter_enabled and "adapter disabled" not in repr(m)
    torch.testing.assert_close(m(x.detach()), with_adapter, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compression", ["int1", "sparse4x4", "dense"])
@pytest.mark.parametrize("bias", [True, False])
def test_to_linear(compression, bias):
    m = randomize_adapters(LoraLinear.from_linear(make_linear(bias=bias), compression, rank=4, alpha=8))
    lin = m.to_linear()
    assert isinstance(lin, nn.Linear) and (lin.bias is None) == (not bias)
    assert lin.weight.shape == (N, K) and lin.weight.dtype == torch.float32
    x = torch.randn(2, 3, K)
    torch.testing.assert_close(lin(x), m(x), rtol=1e-4, atol=1e-4)
    m.disable_adapter()
    torch.testing.assert_close(m.to_linear()(x), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compression,expected_bytes", [
    ("int1", N * 2 * 4 + N * 4), ("sparse4x4", 6 * 12 * 4 + 6 * 6), ("dense", N * K * 4)])
def test_extra_repr(compression, expected_bytes):
    m = LoraLinear.from_linear(make_linear(), compression, rank=7)
    assert m.base.nbytes == expected_bytes
    text = repr(m)
    assert f"compression={compression}" in text
    assert "rank=7" in text
    assert f"in_features={K}" in text and f"out_features={N}" in text
    assert f"base={format_bytes(expected_bytes)}" in text
    assert f"dense {format_bytes(N * K * 4)}" in text
    assert f"lora={format_bytes((7 * K + N * 7) * 4)}" in text
    assert "bits/weight" in text


def test_format_bytes():
    assert format_bytes(0) == "0 B" and format_bytes(999) == "999 B"
    assert format_bytes(1000) == "1.0 kB" and format_bytes(4140) == "4.1 kB"
    assert format_bytes(2.5e6) == "2.5 MB" and format_bytes(3e9) == "3.0 GB"
    assert format_bytes(5e12) == "5000.0 GB"


@pytest.mark.parametrize("compression,opts", [("int1", {}), ("int1", {"scale": "onebit"}),
                                              ("int1", {"group_size": 16}), ("sparse4x4", {}), ("dense", {})])
@pytest.mark.parametrize("cast", ["half", "bf16"])
def test_dtype_moves_base_buffers(compression, opts, cast):
    m = randomize_adapters(LoraLinear.from_linear(make_linear(), compression, rank=4, **opts))
    packed_before = {n: t.clone() for n, t in m.base.tensors().items() if not t.is_floating_point()}
    W32 = m.base.dequantize()
    dtype = torch.float16 if cast == "half" else torch.bfloat16
    out = m.half() if cast == "half" else m.to(torch.bfloat16)
    assert out is m
    assert m.base.dtype == dtype and m.base.dequantize().dtype == dtype
    assert m.lora_A.dtype == m.lora_B.dtype == m.bias.dtype == dtype
    for n, t in m.base.tensors().items():  # packed bits / positions untouched
        if n in packed_before:
            assert t.dtype == packed_before[n].dtype and torch.equal(t, packed_before[n])
    rtol = 4e-3 if cast == "half" else 3e-2
    torch.testing.assert_close(m.base.dequantize().float(), W32, rtol=rtol, atol=1e-3)
    x = torch.randn(3, K, dtype=dtype)
    y = m(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, lora_linear_ref(x, m.base, m.lora_A, m.lora_B, m.scaling, m.bias))

    # state dict round trip in the new dtype, into a module built from another weight
    sd = m.state_dict()
    assert {f"base_{n}" for n in m.base._tensor_names} <= set(sd)
    m2 = LoraLinear.from_linear(make_linear(), compression, rank=4, **opts)
    m2 = m2.half() if cast == "half" else m2.to(torch.bfloat16)
    m2.load_state_dict(sd)
    for k, v in m2.state_dict().items():
        assert v.dtype == sd[k].dtype and torch.equal(v, sd[k]), k
    assert torch.equal(m2(x), y)


@pytest.mark.parametrize("compression,opts", [("int1", {"group_size": 8}), ("int1", {"scale": "onebit"}),
                                              ("sparse4x4", {}), ("dense", {})])
def test_state_dict_round_trip(compression, opts):
    m = randomize_adapters(LoraLinear.from_linear(make_linear(), compression, rank=3, **opts))
    sd = m.state_dict()
    assert set(sd) == {"lora_A", "lora_B", "bias", "_extra_state"} | {f"base_{n}" for n in m.base._tensor_names}
    m2 = LoraLinear.from_linear(make_linear(), compression, rank=3, **opts)
    x = torch.randn(4, K)
    assert not torch.equal(m2(x), m(x))
    m2.load_state_dict(sd)
    assert torch.equal(m2(x), m(x))
    for n, t in m.base.tensors().items():
        assert torch.equal(m2.base.tensors()[n], t), n
    # strict loading catches a missing base tensor
    bad = dict(sd)
    del bad[f"base_{m.base._tensor_names[0]}"]
    with pytest.raises(RuntimeError, match="Missing key"):
        m2.load_state_dict(bad)


@pytest.mark.parametrize("compression", ["int1", "sparse4x4", "dense"])
def test_dropout_changes_the_lora_path_only(compression):
    p = 0.4
    m = randomize_adapters(LoraLinear.from_linear(make_linear(), compression, rank=4, dropout=p))
    x = torch.randn(6, K)
    base_out = x @ m.base.dequantize().t() + m.bias
    m.eval()
    y_eval1, y_eval2 = m(x), m(x)
    assert torch.equal(y_eval1, y_eval2)
    torch.testing.assert_close(y_eval1, base_out + m.scaling * (x @ m.lora_A.t()) @ m.lora_B.t(),
                               rtol=1e-5, atol=1e-5)
    m.train()
    torch.manual_seed(11)
    y_train = m(x)
    torch.manual_seed(11)
    xd = F.dropout(x, p, training=True)
    assert not torch.equal(xd, x)
    torch.testing.assert_close(y_train, base_out + m.scaling * (xd @ m.lora_A.t()) @ m.lora_B.t(),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y_train, y_eval1)
    assert not torch.equal(m(x), m(x))  # fresh masks
    # the base is not dropped: with the adapter off, train mode output equals eval mode output
    m.disable_adapter()
    torch.testing.assert_close(m(x), base_out, rtol=1e-6, atol=1e-6)

    # gradients in train mode: dX = dY·Ŵ + mask·s·(dY·B)·A/(1−p)
    m.enable_adapter()
    xg = x.clone().requires_grad_()
    torch.manual_seed(12)
    y = m(xg)
    torch.manual_seed(12)
    keep = F.dropout(torch.ones_like(x), p, training=True)
    dy = torch.randn_like(y)
    y.backward(dy)
    A, B, s = m.lora_A.detach(), m.lora_B.detach(), m.scaling
    expected_dx = dy @ m.base.dequantize() + keep * (s * (dy @ B) @ A)
    torch.testing.assert_close(xg.grad, expected_dx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.lora_A.grad, s * (dy @ B).t() @ (x * keep), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank,alpha", [(1, 1.0), (4, 16.0), (9, 3.0), (16, None)])
def test_rslora_scaling(rank, alpha):
    lin = make_linear()
    m = LoraLinear.from_linear(lin, "int1", rank=rank, alpha=alpha, rslora=True)
    a = rank if alpha is None else alpha
    assert m.scaling == pytest.approx(a / math.sqrt(rank))
    assert m.rslora and m.alpha == a
    plain = LoraLinear.from_linear(lin, "int1", rank=rank, alpha=alpha)
    assert plain.scaling == pytest.approx(a / rank)
    randomize_adapters(m)
    x = torch.randn(3, K)
    expected = lora_linear_ref(x, m.base, m.lora_A, m.lora_B, a / math.sqrt(rank), m.bias)
    torch.testing.assert_close(m(x), expected)


@pytest.mark.parametrize("compression", ["int1", "sparse4x4", "dense"])
def test_backward_trains_only_the_adapters(compression):
    m = randomize_adapters(LoraLinear.from_linear(make_linear(), compression, rank=4))
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    assert m.bias is not None and not m.bias.requires_grad
    assert all(not b.requires_grad for b in m.buffers())
    x = torch.randn(2, 5, K)
    m(x).square().sum().backward()
    assert m.lora_A.grad is not None and m.lora_B.grad is not None
    assert torch.count_nonzero(m.lora_A.grad) > 0 and torch.count_nonzero(m.lora_B.grad) > 0
    assert m.bias.grad is None
    assert all(b.grad is None for b in m.buffers())


def test_gaussian_init_gives_zero_A_grad_nonzero_B_grad():
    m = LoraLinear.from_linear(make_linear(), "int1", rank=4)
    m(torch.randn(3, K)).square().sum().backward()
    assert torch.count_nonzero(m.lora_A.grad) == 0  # dA = s·(dY·B)ᵀ·X with B = 0
    assert torch.count_nonzero(m.lora_B.grad) > 0


def test_autocast_runs_in_the_autocast_dtype():
    m = randomize_adapters(LoraLinear.from_linear(make_linear(), "int1", rank=4))
    x = torch.randn(3, K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), m(x), rtol=3e-2, atol=0.3)


# ----------------------------------------------------------------------------------------------
# dense compression against peft's LoRA
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("r,alpha", [(4, 8), (3, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_matches_peft(rslora, bias, r, alpha, dtype):
    peft = pytest.importorskip("peft")
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    lin = make_linear(bias=bias, dtype=dtype)
    ours = LoraLinear.from_linear(lin, "dense", rank=r, alpha=alpha, rslora=rslora)
    seq = nn.Sequential(copy.deepcopy(lin))
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], lora_dropout=0.0, use_rslora=rslora)
    pm = peft.get_peft_model(seq, cfg)
    layer = pm.base_model.model[0]
    assert isinstance(layer, peft.tuners.lora.Linear)
    assert ours.scaling == pytest.approx(layer.scaling["default"])

    assert ours.base.dtype == dtype
    A, B = torch.randn(r, K, dtype=dtype), torch.randn(N, r, dtype=dtype)
    with torch.no_grad():
        ours.lora_A.copy_(A)
        ours.lora_B.copy_(B)
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)

    for xshape in [(3, K), (2, 3, K)]:
        x0 = torch.randn(*xshape, dtype=dtype)
        x1, x2 = x0.clone().requires_grad_(), x0.clone().requires_grad_()
        y1, y2 = ours(x1), pm(x2)
        torch.testing.assert_close(y1, y2, **tol)
        dy = torch.randn_like(y1)
        for p in (ours.lora_A, ours.lora_B, layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            p.grad = None
        y1.backward(dy)
        y2.backward(dy)
        torch.testing.assert_close(x1.grad, x2.grad, **tol)
        torch.testing.assert_close(ours.lora_A.grad, layer.lora_A["default"].weight.grad, **tol)
        torch.testing.assert_close(ours.lora_B.grad, layer.lora_B["default"].weight.grad, **tol)
    # both freeze the base weight and bias
    assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad
    assert ours.bias is None or not ours.bias.requires_grad
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    # merging agrees too (loraq merges in float32: see test_merged_weight_float64_precision)
    torch.testing.assert_close(ours.merged_weight(), layer.get_delta_weight("default") + lin.weight.detach(),
                               rtol=1e-5, atol=1e-4)


def test_merged_weight_float64_precision():
    m = randomize_adapters(LoraLinear.from_linear(make_linear(dtype=torch.float64), "dense", rank=4))
    exact = m.base.dequantize() + m.scaling * m.lora_B.detach() @ m.lora_A.detach()
    assert m.merged_weight().dtype == torch.float64
    torch.testing.assert_close(m.merged_weight(), exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("compression", ["int1", "sparse4x4", "dense"])
def test_base_is_built_once_per_set_of_buffers(compression):
    """``base`` is cached for the forward's host time, and rebuilt whenever a buffer is replaced."""
    m = LoraLinear.from_linear(make_linear(), compression, rank=3)
    first = m.base
    assert m.base is first
    m.half()
    assert m.base is not first and m.base.dtype == torch.float16
    again = m.base
    other = LoraLinear.from_linear(make_linear(), compression, rank=3).half()
    m.base = other.base  # the setter registers other buffers
    assert m.base is not again
    for n, t in other.base.tensors().items():
        assert torch.equal(m.base.tensors()[n], t), n


@pytest.mark.parametrize("compression", ["int1", "sparse4x4"])
def test_forward_without_a_wanted_gradient_skips_autograd_and_agrees(compression):
    """With nothing needing a gradient the forward runs without the autograd Function (less host
    time a call); the output is the same, and a gradient is still tracked whenever one is wanted."""
    m = randomize_adapters(LoraLinear.from_linear(make_linear(), compression, rank=3))
    x = torch.randn(2, 5, K)
    tracked = m(x)
    assert type(tracked.grad_fn).__name__ == "LoraLinearFunctionBackward"
    with torch.no_grad():
        plain = m(x)
    assert plain.grad_fn is None and torch.equal(plain, tracked.detach())
    m.requires_grad_(False)
    assert m(x).grad_fn is None and torch.equal(m(x), plain)  # frozen adapters: nothing to track
    xg = x.clone().requires_grad_(True)
    m(xg).sum().backward()  # frozen adapters, an input that wants its gradient: tracked
    ref = x.clone().requires_grad_(True)
    lora_linear_ref(ref, m.base, m.lora_A, m.lora_B, m.scaling, m.bias).sum().backward()
    torch.testing.assert_close(xg.grad, ref.grad)
    m.disable_adapter()
    with torch.no_grad():
        torch.testing.assert_close(m(x), lora_linear_ref(x, m.base, None, None, 1.0, m.bias))


@pytest.mark.parametrize("first,second", [
    ({"group_size": 32}, {"group_size": 24}),  # K = 48: two groups either way, same tensor shapes
    ({}, {"scale": "onebit"}),
])
def test_state_dict_of_another_int1_layout_is_refused_and_changes_nothing(first, second):
    m1 = randomize_adapters(LoraLinear.from_linear(make_linear(48, 8), "int1", rank=2, **first))
    m2 = LoraLinear.from_linear(make_linear(48, 8), "int1", rank=2, **second)
    before = {k: v.clone() for k, v in m2.state_dict().items()}
    sd = m1.state_dict()
    if "scale" in second:  # make the tensor shapes agree so that only the metadata tells them apart
        sd["base_col_scale"] = m2.base_col_scale.clone()
    with pytest.raises(RuntimeError, match="was compressed with"):
        m2.load_state_dict(sd)
    assert all(torch.equal(v, before[k]) for k, v in m2.state_dict().items())


def test_state_dict_of_another_shape_within_the_same_tiles_is_refused():
    """N = 7 and N = 8 give the same sparse4x4 tensors (two tile rows): the metadata tells them apart."""
    a = LoraLinear.from_linear(make_linear(16, 7), "sparse4x4", rank=2)
    b_sd = LoraLinear.from_linear(make_linear(16, 8), "sparse4x4", rank=2).state_dict()
    b_sd = {k: (v[:7] if k in ("lora_B", "bias") else v) for k, v in b_sd.items()}
    with pytest.raises(RuntimeError, match="out_features=8"):
        a.load_state_dict(b_sd)


def test_state_dict_without_the_metadata_still_loads():
    """State dicts saved before the metadata (``_extra_state``) existed."""
    m1 = randomize_adapters(LoraLinear.from_linear(make_linear(), "int1", rank=3, group_size=16))
    sd = {k: v for k, v in m1.state_dict().items() if k != "_extra_state"}
    m2 = LoraLinear.from_linear(make_linear(), "int1", rank=3, group_size=16)
    m2.load_state_dict(sd, strict=True)
    x = torch.randn(2, K)
    assert torch.equal(m1(x), m2(x))


def test_moving_the_layer_drops_the_cached_base():
    """``.half()``/``.to()``/``.cpu()`` replace the buffers; the cached format object must not keep
    the old ones alive (on the old device, and in a pickle of the module)."""
    import weakref
    m = LoraLinear.from_linear(make_linear(), "int1", rank=2)
    m(torch.randn(2, K))
    old = weakref.ref(m.base_scale)
    m.half()
    assert "_base_cache" not in m.__dict__ and old() is None
    assert m(torch.randn(2, K, dtype=torch.float16)).dtype == torch.float16


@pytest.mark.parametrize("backend", ["torch", "TRITON", "bogus"])
def test_unknown_backend_is_refused_when_built(backend):
    with pytest.raises(ValueError, match="backend must be one of"):
        LoraLinear.from_linear(make_linear(), "int1", rank=2, backend=backend)
