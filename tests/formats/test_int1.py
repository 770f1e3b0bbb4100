"""Int1Weight against an independent, slow, loop-based implementation of DESIGN.md's int1 math.

Ŵ = α ⊙ sign(W) with sign(0) = +1; α = mean |W| per row (group_size=None) or per row and group
(a partial last group averages only its real elements); scale="onebit": Ŵ = diag(h)·sign(W)·diag(g)
with h gᵀ the best rank-1 approximation of |W|. Bits: bit j of int32 word w in row n is W[n, 32w+j] >= 0.
"""

import math

import pytest
import torch

from loraq.formats import Int1Weight
from loraq.formats.int1 import pack_sign_bits, unpack_sign_bits

SHAPES = [(7, 45), (13, 70), (5, 33), (1, 1), (4, 4), (9, 3), (3, 64), (2, 32)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative tolerance for a scale computed in another (higher) precision, then rounded to dtype:
# at most about one unit in the last place of the dtype.
SCALE_RTOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-6}


def _weight_with_zeros(N, K, dtype):
    """A random weight with a few exact zeros (and a negative zero) to pin sign(0) = +1."""
    W = torch.randn(N, K, dtype=torch.float32)
    W[0, 0] = 0.0
    if N * K > 2:
        W[N - 1, K - 1] = -0.0
        W[N // 2, K // 2] = 0.0
    return W.to(dtype)


def loop_int1_mean_abs(W, group_size):
    """(alpha [N][G], What [N][K]) computed with plain Python loops in float64."""
    N, K = W.shape
    gs = K if group_size is None else group_size
    rows = W.double().tolist()
    G = -(-K // gs)
    alpha = [[0.0] * G for _ in range(N)]
    what = [[0.0] * K for _ in range(N)]
    for n in range(N):
        for g in range(G):
            start, stop = g * gs, min((g + 1) * gs, K)
            total = 0.0
            for k in range(start, stop):
                total += abs(rows[n][k])
            a = total / (stop - start)  # only the real elements of the group
            alpha[n][g] = a
            for k in range(start, stop):
                what[n][k] = a * (1.0 if rows[n][k] >= 0 else -1.0)
    return alpha, what


def loop_sign_bits(W):
    """Expected packed words as Python ints in [0, 2**32), one list per row."""
    N, K = W.shape
    rows = W.double().tolist()
    words = -(-K // 32)
    out = []
    for n in range(N):
        row = []
        for w in range(words):
            v = 0
            for j in range(32):
                k = 32 * w + j
                if k < K and rows[n][k] >= 0:
                    v |= 1 << j
            row.append(v)
        out.append(row)
    return out


def loop_unpack(packed, K):
    """Bits of an int32 tensor, read with loops: a nested list of 0/1 ``[N][K]``."""
    rows = packed.tolist()
    out = []
    for n in range(len(rows)):
        bits = []
        for w, word in enumerate(rows[n]):
            for j in range(32):
                if 32 * w + j < K:
                    bits.append((word >> j) & 1)  # Python >> on a negative int is arithmetic: fine for bit j
        out.append(bits)
    return out


# ----------------------------------------------------------------------------------------------
# mean_abs: per row and per group
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group_size", [None, 1, 7, 16, 32, 100])
def test_mean_abs_matches_loop(shape, dtype, group_size):
    N, K = shape
    W = _weight_with_zeros(N, K, dtype)
    q = Int1Weight.from_dense(W, group_size=group_size)
    alpha, what = loop_int1_mean_abs(W, group_size)
    G = len(alpha[0])

    assert q.shape == (N, K)
    assert q.dtype == dtype
    assert q.scale_mode == "mean_abs"
    assert q.group_size == group_size
    assert q.scale.dtype == dtype and tuple(q.scale.shape) == (N, G)
    assert q.col_scale.numel() == 0

    alpha_t = torch.tensor(alpha, dtype=torch.float64)
    torch.testing.assert_close(q.scale.double(), alpha_t, rtol=SCALE_RTOL[dtype], atol=0)

    Wq = q.dequantize()
    assert Wq.dtype == dtype and tuple(Wq.shape) == (N, K)
    # Exactly ±α with the stored scales (α times ±1 is exact in every dtype) ...
    gs = K if group_size is None else group_size
    signs = [[1.0 if v >= 0 else -1.0 for v in row] for row in W.double().tolist()]
    stored = q.scale.double().tolist()
    exact = torch.tensor([[signs[n][k] * stored[n][k // gs] for k in range(K)] for n in range(N)],
                         dtype=torch.float64)
    assert torch.equal(Wq.double(), exact)
    # ... and equal to the loop's α·sign(W) up to the rounding of α.
    torch.testing.assert_close(Wq.double(), torch.tensor(what, dtype=torch.float64),
                               rtol=SCALE_RTOL[dtype], atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sign_of_zero_is_plus_one(dtype):
    W = torch.randn(3, 40).to(dtype)
    W[0, 5] = 0.0
    W[1, 33] = -0.0
    W[2, :] = -W[2, :].abs()  # an all-negative row ...
    W[2, 17] = 0.0  # ... with one zero in it
    q = Int1Weight.from_dense(W)
    Wq = q.dequantize()
    for n, k in [(0, 5), (1, 33), (2, 17)]:
        assert Wq[n, k] > 0, (n, k)
        assert Wq[n, k] == q.scale[n, 0]
    assert (Wq[2] < 0).sum() == 39
    bits = loop_unpack(q.packed, 40)
    assert bits[0][5] == 1 and bits[1][33] == 1 and bits[2][17] == 1
    assert sum(bits[2]) == 1


def test_partial_last_group_averages_only_real_elements():
    K, gs = 45, 16  # groups of 16, 16 and 13
    W = torch.randn(4, K, dtype=torch.float64)
    q = Int1Weight.from_dense(W, group_size=gs)
    assert tuple(q.scale.shape) == (4, 3)
    A = W.abs()
    torch.testing.assert_close(q.scale[:, 0], A[:, :16].mean(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(q.scale[:, 1], A[:, 16:32].mean(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(q.scale[:, 2], A[:, 32:].sum(1) / 13, rtol=1e-6, atol=0)
    # Not divided by the full group size (that would be the padding leaking in).
    assert not torch.allclose(q.scale[:, 2], A[:, 32:].sum(1) / 16, rtol=1e-3)


def test_group_size_larger_than_K_is_per_row():
    W = torch.randn(6, 10)
    a = Int1Weight.from_dense(W, group_size=1000)
    b = Int1Weight.from_dense(W)
    assert tuple(a.scale.shape) == (6, 1)
    # same math; the float32 sums run over differently padded lengths, so allow the last bit
    torch.testing.assert_close(a.dequantize(), b.dequantize(), rtol=1e-6, atol=0)
    assert torch.equal(a.signs(), b.signs())


def test_group_size_one_keeps_magnitudes():
    """With one scale per weight, Ŵ = |W|·sign(W) = W."""
    W = torch.randn(5, 33)
    q = Int1Weight.from_dense(W, group_size=1)
    torch.testing.assert_close(q.dequantize(), W, rtol=1e-6, atol=0)


def test_mean_abs_is_l2_optimal_for_the_sign_pattern():
    """α = mean|W| minimises ‖W − α·sign(W)‖ over α: perturbing it makes the error larger."""
    W = torch.randn(9, 37, dtype=torch.float64)
    q = Int1Weight.from_dense(W)
    S = q.signs()
    err = (W - q.dequantize()).norm(dim=1)
    for f in (0.97, 1.03):
        err2 = (W - S * (q.scale * f)).norm(dim=1)
        assert (err2 > err).all()


# ----------------------------------------------------------------------------------------------
# bit layout
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES + [(3, 31), (2, 33), (2, 96)])
def test_packed_bit_layout(shape):
    N, K = shape
    W = _weight_with_zeros(N, K, torch.float32)
    q = Int1Weight.from_dense(W)
    assert q.packed.dtype == torch.int32
    assert tuple(q.packed.shape) == (N, -(-K // 32))
    expected = loop_sign_bits(W)
    got = [[v & 0xFFFFFFFF for v in row] for row in q.packed.tolist()]  # as unsigned 32-bit
    assert got == expected  # includes: padding bits are 0
    bits = loop_unpack(q.packed, K)
    assert bits == [[1 if v >= 0 else 0 for v in row] for row in W.tolist()]
    # the library's own unpacker agrees with the loop
    assert unpack_sign_bits(q.packed, K).to(torch.int64).tolist() == bits


def test_packed_bit_31_is_the_sign_bit():
    """k = 31 non-negative and the rest negative: the word is exactly 0x80000000 (int32 min)."""
    W = -torch.rand(2, 32) - 0.1
    W[0, 31] = 1.0
    W[1, 0] = 1.0
    p = pack_sign_bits(W)
    assert p[0, 0].item() == -(2**31)
    assert p[1, 0].item() == 1
    W2 = torch.rand(1, 32) + 0.1  # all 32 bits set: -1 in two's complement
    assert pack_sign_bits(W2)[0, 0].item() == -1


@pytest.mark.parametrize("dtype", DTYPES)
def test_signs_helper(dtype):
    W = _weight_with_zeros(5, 33, dtype)
    q = Int1Weight.from_dense(W)
    s = q.signs()
    assert s.dtype == dtype
    expected = torch.tensor([[1.0 if v >= 0 else -1.0 for v in row] for row in W.double().tolist()])
    assert torch.equal(s.double(), expected.double())


# ----------------------------------------------------------------------------------------------
# onebit (SVID)
# ----------------------------------------------------------------------------------------------
ONEBIT_TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (4e-3, 1e-4), torch.bfloat16: (3e-2, 1e-3),
              torch.float64: (1e-5, 1e-6)}


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", [(7, 45), (13, 70), (5, 33), (1, 1), (4, 4), (9, 3)])
def test_onebit_is_rank1_svd_of_abs(shape, dtype):
    N, K = shape
    W = _weight_with_zeros(N, K, dtype)
    if N * K == 1:
        W = torch.randn(1, 1).to(dtype)  # a lone zero has |W| = 0: nothing to approximate
    q = Int1Weight.from_dense(W, scale="onebit")
    assert q.scale_mode == "onebit" and q.group_size is None
    assert tuple(q.scale.shape) == (N, 1) and tuple(q.col_scale.shape) == (K,)
    assert q.scale.dtype == dtype and q.col_scale.dtype == dtype and q.dtype == dtype

    h, g = q.scale[:, 0].double(), q.col_scale.double()
    assert (h >= 0).all() and (g >= 0).all()
    U, S, Vh = torch.linalg.svd(W.double().abs(), full_matrices=False)
    best = S[0] * torch.outer(U[:, 0], Vh[0]).abs()  # Perron vectors: take absolute values
    rtol, atol = ONEBIT_TOL[dtype]
    torch.testing.assert_close(torch.outer(h, g), best, rtol=rtol, atol=atol * float(S[0]))

    # Ŵ = diag(h)·sign(W)·diag(g), element by element.
    Wq = q.dequantize()
    assert Wq.dtype == dtype
    rows = W.double().tolist()
    hl, gl = h.tolist(), g.tolist()
    expected = torch.tensor(
        [[(1.0 if rows[n][k] >= 0 else -1.0) * hl[n] * gl[k] for k in range(K)] for n in range(N)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(Wq.double(), expected, rtol=ONEBIT_TOL[dtype][0], atol=1e-7)
    # sign pattern preserved exactly (sign(0) = +1)
    assert torch.equal(Wq >= 0, W >= 0)


def test_onebit_error_is_optimal_rank1_and_beats_per_row_mean():
    """‖W − Ŵ‖² = ‖|W| − h gᵀ‖² = Σ_{i≥2} σ_i² of |W|.

    Never worse than one mean per row, which is also a rank-1 choice.
    """
    W = torch.randn(13, 70, dtype=torch.float64) * torch.linspace(0.2, 3.0, 70, dtype=torch.float64)
    q1 = Int1Weight.from_dense(W, scale="onebit")
    q0 = Int1Weight.from_dense(W)
    e1 = (W - q1.dequantize()).norm()
    e0 = (W - q0.dequantize()).norm()
    S = torch.linalg.svdvals(W.abs())
    torch.testing.assert_close(e1, S[1:].square().sum().sqrt(), rtol=1e-5, atol=0)
    assert e1 <= e0 * (1 + 1e-9)
    assert e1 < 0.95 * e0  # column magnitudes vary a lot: the column scale must help


def test_onebit_packed_bits_match_mean_abs():
    W = _weight_with_zeros(7, 45, torch.float32)
    assert torch.equal(Int1Weight.from_dense(W, scale="onebit").packed, Int1Weight.from_dense(W).packed)


# ----------------------------------------------------------------------------------------------
# sizes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["row", "g16", "onebit"])
def test_nbytes_formula(shape, dtype, mode):
    N, K = shape
    W = torch.randn(N, K).to(dtype)
    elem = torch.tensor([], dtype=dtype).element_size()
    if mode == "row":
        q, scale_bytes = Int1Weight.from_dense(W), N * elem
    elif mode == "g16":
        q, scale_bytes = Int1Weight.from_dense(W, group_size=16), N * math.ceil(K / 16) * elem
    else:
        q, scale_bytes = Int1Weight.from_dense(W, scale="onebit"), (N + K) * elem
    stored = sum(t.numel() * t.element_size() for t in (q.packed, q.scale, q.col_scale))
    assert q.nbytes == stored
    assert q.nbytes == N * math.ceil(K / 32) * 4 + scale_bytes
    assert q.dense_nbytes == N * K * elem
    assert q.bits_per_weight == pytest.approx(8 * q.nbytes / (N * K))


@pytest.mark.parametrize("K", [64, 256, 4096])
def test_bits_per_weight_fp16_per_row(K):
    q = Int1Weight.from_dense(torch.randn(8, K, dtype=torch.float16))
    assert q.bits_per_weight == pytest.approx(1 + 16 / K, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [0, -1, 2.5, True, False, "8"])
def test_bad_group_size(group_size):
    with pytest.raises(ValueError, match="group_size must be a positive int or None"):
        Int1Weight.from_dense(torch.randn(4, 8), group_size=group_size)


def test_numpy_integer_group_size_is_an_int():
    import numpy as np

    W = torch.randn(4, 16)
    q = Int1Weight.from_dense(W, group_size=np.int64(8))
    assert type(q.group_size) is int and torch.equal(q.dequantize(), Int1Weight.from_dense(W, group_size=8).dequantize())


@pytest.mark.parametrize("scale", ["max", "", None, "MEAN_ABS"])
def test_unknown_scale(scale):
    with pytest.raises(ValueError, match="scale must be one of"):
        Int1Weight.from_dense(torch.randn(4, 8), scale=scale)


def test_group_size_with_onebit():
    with pytest.raises(ValueError, match="group_size applies to scale='mean_abs' only"):
        Int1Weight.from_dense(torch.randn(4, 8), group_size=4, scale="onebit")


def test_from_state_dict_bad_scale_mode_code():
    sd = Int1Weight.from_dense(torch.randn(4, 8)).state_dict()
    sd["scale_mode"] = torch.tensor([7])
    with pytest.raises(ValueError, match="unknown int1 scale mode code 7"):
        Int1Weight.from_state_dict(sd)


def test_from_state_dict_wrong_packed_dtype():
    sd = Int1Weight.from_dense(torch.randn(4, 40)).state_dict()
    sd["packed"] = sd["packed"].to(torch.int64)
    with pytest.raises(ValueError, match="packed must be int32"):
        Int1Weight.from_state_dict(sd)


@pytest.mark.parametrize("group_size,scale", [(None, "mean_abs"), (8, "mean_abs"), (None, "onebit")])
def test_state_dict_meta(group_size, scale):
    q = Int1Weight.from_dense(torch.randn(5, 33), group_size=group_size, scale=scale)
    sd = q.state_dict()
    assert sd["shape"].tolist() == [5, 33]
    assert sd["group_size"].tolist() == [-1 if group_size is None else group_size]
    assert sd["scale_mode"].tolist() == [["mean_abs", "onebit"].index(scale)]
    assert all(t.dtype == torch.int64 for k, t in sd.items() if k in ("shape", "group_size", "scale_mode"))
    r = Int1Weight.from_state_dict(sd)
    assert (r.group_size, r.scale_mode, r.shape) == (group_size, scale, (5, 33))


# ----------------------------------------------------------------------------------------------
# float64: accepted, but the scales only reach float32 accuracy
# ----------------------------------------------------------------------------------------------
def test_float64_is_accepted():
    W = torch.randn(7, 45, dtype=torch.float64)
    for q in (Int1Weight.from_dense(W), Int1Weight.from_dense(W, group_size=8),
              Int1Weight.from_dense(W, scale="onebit")):
        assert q.dtype == torch.float64 and q.dequantize().dtype == torch.float64
        assert torch.equal(q.dequantize() >= 0, W >= 0)


def test_float64_mean_abs_scale_has_float64_accuracy():
    W = torch.randn(7, 45, dtype=torch.float64)
    q = Int1Weight.from_dense(W)
    torch.testing.assert_close(q.scale[:, 0], W.abs().mean(1), rtol=1e-12, atol=0)


def test_float64_onebit_has_float64_accuracy():
    W = torch.randn(7, 45, dtype=torch.float64)
    q = Int1Weight.from_dense(W, scale="onebit")
    U, S, Vh = torch.linalg.svd(W.abs(), full_matrices=False)
    best = S[0] * torch.outer(U[:, 0], Vh[0]).abs()
    torch.testing.assert_close(torch.outer(q.scale[:, 0], q.col_scale), best, rtol=1e-10, atol=0)


@pytest.mark.parametrize("code", [0, -2])
def test_from_state_dict_refuses_a_group_size_below_one(code):
    sd = Int1Weight.from_dense(torch.randn(4, 40), group_size=8).state_dict()
    sd["group_size"] = torch.tensor([code])
    with pytest.raises(ValueError, match="group_size must be ≥ 1"):
        Int1Weight.from_state_dict(sd)


def test_from_state_dict_refuses_onebit_with_a_group_size():
    sd = Int1Weight.from_dense(torch.randn(4, 40), scale="onebit").state_dict()
    sd["group_size"] = torch.tensor([8])
    with pytest.raises(ValueError, match="'onebit' has no group_size"):
        Int1Weight.from_state_dict(sd)
