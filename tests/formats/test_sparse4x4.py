"""Sparse4x4Weight against an independent loop over 4x4 tiles (DESIGN.md's sparse4x4 math).

In every 4x4 tile keep the element of largest |w| (ties: lowest row-major flat index inside the
tile), zero the rest. Sizes not multiples of 4 are padded internally and never leak. Positions are
packed two per byte, the low nibble belonging to the even tile column.
"""

import math

import pytest
import torch

from loraq.formats import Sparse4x4Weight
from loraq.formats.sparse4x4 import pack_nibbles, unpack_nibbles

SHAPES = [(7, 45), (13, 70), (5, 33), (1, 1), (4, 4), (9, 3), (8, 16), (4, 12), (3, 4)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def loop_sparse(W):
    """(positions [TN][TK], values [TN][TK], dense Ŵ [N][K]) with plain loops over real elements only."""
    N, K = W.shape
    rows = W.double().tolist()
    TN, TK = -(-N // 4), -(-K // 4)
    pos = [[0] * TK for _ in range(TN)]
    val = [[0.0] * TK for _ in range(TN)]
    dense = [[0.0] * K for _ in range(N)]
    for ti in range(TN):
        for tj in range(TK):
            best_p, best_abs = None, -1.0
            for p in range(16):
                r, c = 4 * ti + p // 4, 4 * tj + p % 4
                if r >= N or c >= K:
                    continue
                a = abs(rows[r][c])
                if a > best_abs:  # strictly greater: a tie keeps the lower flat index
                    best_p, best_abs = p, a
            r, c = 4 * ti + best_p // 4, 4 * tj + best_p % 4
            pos[ti][tj] = best_p
            val[ti][tj] = rows[r][c]
            dense[r][c] = rows[r][c]
    return pos, val, dense


def loop_nibbles(packed, TK):
    """Positions read back from the packed bytes with a loop: low nibble = even tile column."""
    rows = packed.tolist()
    out = []
    for row in rows:
        out.append([(row[tj // 2] & 15) if tj % 2 == 0 else (row[tj // 2] >> 4) for tj in range(TK)])
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_loop(shape, dtype):
    N, K = shape
    W = torch.randn(N, K).to(dtype)
    q = Sparse4x4Weight.from_dense(W)
    pos, val, dense = loop_sparse(W)
    TN, TK = -(-N // 4), -(-K // 4)

    assert q.shape == (N, K) and q.dtype == dtype
    assert tuple(q.values.shape) == (TN, TK) and q.values.dtype == dtype
    assert tuple(q.positions.shape) == (TN, -(-TK // 2)) and q.positions.dtype == torch.uint8
    assert q.tile_positions().tolist() == pos
    assert loop_nibbles(q.positions, TK) == pos
    assert torch.equal(q.values.double(), torch.tensor(val, dtype=torch.float64))
    Wq = q.dequantize()
    assert Wq.dtype == dtype and tuple(Wq.shape) == (N, K)
    assert torch.equal(Wq.double(), torch.tensor(dense, dtype=torch.float64))  # a selection: exact


@pytest.mark.parametrize("shape", [(5, 33), (7, 45), (9, 3), (1, 1), (13, 70), (2, 6)])
def test_padding_never_leaks(shape):
    """Every tile keeps a real element: as many nonzeros as tiles, all inside [N, K]."""
    N, K = shape
    W = torch.randn(N, K)
    # Small values in the partial tiles: padding zeros must still never be chosen over them.
    W[4 * (N // 4):, :] *= 1e-6
    W[:, 4 * (K // 4):] *= 1e-6
    q = Sparse4x4Weight.from_dense(W)
    Wq = q.dequantize()
    TN, TK = -(-N // 4), -(-K // 4)
    assert tuple(Wq.shape) == (N, K)
    assert int((Wq != 0).sum()) == TN * TK
    # every kept element is a real W entry at its own position
    nz = Wq != 0
    assert torch.equal(Wq[nz], W[nz])
    # every position decodes to a real (row, col)
    P = q.tile_positions()
    for ti in range(TN):
        for tj in range(TK):
            p = int(P[ti, tj])
            assert 4 * ti + p // 4 < N and 4 * tj + p % 4 < K


def test_all_zero_partial_tile_picks_a_real_element():
    """A partial tile of exact zeros: position 0 (always real), value 0, nothing outside [N, K]."""
    W = torch.randn(5, 6)
    W[4, 4:] = 0.0  # the bottom-right partial tile holds only these two real elements
    q = Sparse4x4Weight.from_dense(W)
    assert int(q.tile_positions()[1, 1]) == 0
    assert float(q.values[1, 1]) == 0.0
    assert tuple(q.dequantize().shape) == (5, 6)


def _tile(values_at):
    """A 4x4 tile of small random values with given {flat index: value}."""
    T = torch.rand(16) * 0.1
    for p, v in values_at.items():
        T[p] = v
    return T.view(4, 4)


@pytest.mark.parametrize(
    "winners, expected",
    [
        ({3: 1.0, 9: 1.0}, 3),
        ({9: 1.0, 3: -1.0}, 3),  # equal |w|, opposite signs: still the lower index
        ({15: -2.0, 14: 2.0, 12: 2.0}, 12),
        ({1: 0.5, 2: -0.5, 0: 0.5}, 0),
        ({7: -3.0, 8: 3.0}, 7),
        ({5: 1.0, 10: -1.0001}, 10),  # not a tie: the larger magnitude wins
    ],
)
def test_ties_go_to_lowest_flat_index(winners, expected):
    T = _tile(winners)
    q = Sparse4x4Weight.from_dense(T)
    assert int(q.tile_positions()[0, 0]) == expected
    assert float(q.values[0, 0]) == float(T.view(-1)[expected])
    pos, _, _ = loop_sparse(T)
    assert pos[0][0] == expected


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_magnitude_tiles(dtype):
    """Every |w| equal in every tile (signs random): position 0 everywhere, including partial tiles."""
    W = (torch.randint(0, 2, (7, 10)) * 2 - 1).to(dtype) * 0.75
    q = Sparse4x4Weight.from_dense(W)
    assert (q.tile_positions() == 0).all()
    pos, _, dense = loop_sparse(W)
    assert pos == [[0] * 3 for _ in range(2)]
    assert torch.equal(q.dequantize().double(), torch.tensor(dense, dtype=torch.float64))


def test_ties_in_many_tiles_against_loop():
    """Heavy ties everywhere (values from a tiny set): the loop and the library agree on all tiles."""
    W = torch.randint(-2, 3, (13, 70)).float() * 0.5
    W[W == 0] = 0.25
    q = Sparse4x4Weight.from_dense(W)
    pos, val, dense = loop_sparse(W)
    assert q.tile_positions().tolist() == pos
    assert torch.equal(q.dequantize().double(), torch.tensor(dense, dtype=torch.float64))


def test_position_layout_in_a_tile():
    """Flat index p is tile row p // 4, tile column p % 4 (row-major)."""
    for p in range(16):
        W = torch.full((8, 8), 0.01)
        r, c = p // 4, p % 4
        W[4 + r, 4 + c] = 5.0  # tile (1, 1)
        q = Sparse4x4Weight.from_dense(W)
        assert int(q.tile_positions()[1, 1]) == p
        assert float(q.dequantize()[4 + r, 4 + c]) == 5.0


@pytest.mark.parametrize("TK", [1, 2, 3, 8, 9])
def test_nibble_layout(TK):
    """Low nibble = even tile column, high nibble = odd; an odd TK leaves a zero high nibble."""
    pos = torch.randint(0, 16, (3, TK))
    packed = pack_nibbles(pos)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (3, -(-TK // 2))
    rows = packed.tolist()
    for i in range(3):
        for tj in range(TK):
            byte = rows[i][tj // 2]
            nib = byte & 0xF if tj % 2 == 0 else byte >> 4
            assert nib == int(pos[i, tj])
        if TK % 2:
            assert rows[i][-1] >> 4 == 0
    assert torch.equal(unpack_nibbles(packed, TK), pos)


def test_nibble_layout_in_from_dense():
    """Build W whose tiles pick known positions: the bytes are (odd << 4) | even."""
    TN, TK = 2, 5
    want = torch.randint(0, 16, (TN, TK))
    W = torch.rand(4 * TN, 4 * TK) * 0.1
    for ti in range(TN):
        for tj in range(TK):
            p = int(want[ti, tj])
            W[4 * ti + p // 4, 4 * tj + p % 4] = 1.0 + ti + tj
    q = Sparse4x4Weight.from_dense(W)
    rows = q.positions.tolist()
    for ti in range(TN):
        for b in range(3):
            lo = int(want[ti, 2 * b])
            hi = int(want[ti, 2 * b + 1]) if 2 * b + 1 < TK else 0
            assert rows[ti][b] == lo | (hi << 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_nbytes_formula(shape, dtype):
    N, K = shape
    q = Sparse4x4Weight.from_dense(torch.randn(N, K).to(dtype))
    TN, TK = math.ceil(N / 4), math.ceil(K / 4)
    elem = torch.tensor([], dtype=dtype).element_size()
    assert q.nbytes == q.values.numel() * q.values.element_size() + q.positions.numel()
    assert q.nbytes == TN * TK * elem + TN * math.ceil(TK / 2)
    assert q.dense_nbytes == N * K * elem


def test_bits_per_weight_fp16_64x64():
    q = Sparse4x4Weight.from_dense(torch.randn(64, 64, dtype=torch.float16))
    assert q.bits_per_weight == pytest.approx(1.25)
    q32 = Sparse4x4Weight.from_dense(torch.randn(64, 64))
    assert q32.bits_per_weight == pytest.approx(2.25)


def test_dequantize_keeps_the_largest_and_is_idempotent():
    W = torch.randn(13, 70)
    q = Sparse4x4Weight.from_dense(W)
    Wq = q.dequantize()
    q2 = Sparse4x4Weight.from_dense(Wq)
    assert torch.equal(q2.dequantize(), Wq)
    assert torch.equal(q2.tile_positions(), q.tile_positions())
    # the kept value is the tile max of |W|
    P = torch.zeros(16, 72)
    P[:13, :70] = W.abs()
    tile_max = P.view(4, 4, 18, 4).permute(0, 2, 1, 3).reshape(4, 18, 16).amax(-1)
    assert torch.equal(q.values.abs(), tile_max)


def test_from_state_dict_wrong_positions_dtype():
    sd = Sparse4x4Weight.from_dense(torch.randn(5, 33)).state_dict()
    sd["positions"] = sd["positions"].to(torch.int32)
    with pytest.raises(ValueError, match="positions must be uint8"):
        Sparse4x4Weight.from_state_dict(sd)


def test_float64_magnitudes_are_compared_unrounded():
    """A float64 tile is compared in float64: 1 + 1e-12 beats 1, 1e39 does not beat -1e300 (both
    would round to float32's 1 and inf), and 1e-50 beats 0 (it would underflow)."""
    W = torch.zeros(4, 12, dtype=torch.float64)
    W[0, 0], W[1, 1] = 1.0, 1.0 + 1e-12
    W[0, 4], W[2, 5] = 1e39, -1e300
    W[3, 11] = 1e-50
    q = Sparse4x4Weight.from_dense(W)
    assert q.tile_positions().tolist() == [[5, 9, 15]]
    assert q.values.tolist() == [[1.0 + 1e-12, -1e300, 1e-50]]
    kept = torch.zeros_like(W)
    kept[1, 1], kept[2, 5], kept[3, 11] = W[1, 1], W[2, 5], W[3, 11]
    assert torch.equal(q.dequantize(), kept)
