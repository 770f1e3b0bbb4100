"""The CUDA GEMVs' prologues, run on the host (CI has no GPU): the int1 mma GEMV's copy of x into
shared memory in pair order (``fill_x`` in csrc/int1_gemv_mma.cuh; with the offset decode, x
scaled per register and the table of constants C, one a row of x and chunk), the offset decode itself (its registers, and
that the sums it gives, less C, are Ŵ·xᵀ), and the shares of x·Aᵀ that the first blocks of every
CUDA GEMV store (``xa_lane_partial`` in csrc/gemv_common.cuh).

Both are the kernels' own per-thread code, compiled for the host with nvcc
(tests/cuda/gemv_prologue_emulate.cu) and run thread by thread: every thread's share of a block's
copy, every lane of every item of every slot. The copy must be, word for word, the layout that
``x_unit`` gives (and that tests/test_int1_gemv_mma.py's fragment test multiplies); the shares
must be each slot's slice of x·Aᵀ, zero past the rank. Both load paths are covered: 16-byte loads
where x's rows are aligned, one input at a time where K % 8 ≠ 0 or a pointer is not aligned.
"""

import ctypes

import numpy as np
import pytest
import torch

from host_cuda import host_library
from weights import aligned, offset_view

ROW_PAD_UNITS = 4  # kRowPadUnits
XA_RANKS = 4  # csrc/gemv_common.cuh: kXaRanks
GUARD = 64  # words past what a fill may write, checked untouched


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """tests/cuda/gemv_prologue_emulate.cu built into a shared library (nvcc, host code only)."""
    so = host_library("gemv_prologue_emulate.cu", tmp_path_factory.mktemp("prologue"))
    so.int1_fill_emulate.restype = ctypes.c_int
    so.int1_fill_emulate.argtypes = [ctypes.c_int] * 2 + [ctypes.c_void_p] * 3 + [ctypes.c_int] * 6
    so.int1_offset_pair_emulate.restype = ctypes.c_uint32
    so.int1_offset_pair_emulate.argtypes = [ctypes.c_int, ctypes.c_uint32, ctypes.c_int]
    so.xa_share_emulate.restype = ctypes.c_int
    so.xa_share_emulate.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int] * 5
    return so


def bits(t: torch.Tensor) -> np.ndarray:
    """The 16-bit patterns of an fp16/bf16 tensor, as uint32."""
    return t.contiguous().view(torch.int16).numpy().astype(np.uint16).astype(np.uint32)


def pair_order(x: torch.Tensor, k0: int, chunks: int, g=None, offset=False, lw=4):
    """The shared copy the kernel must leave, built from its definition: unit (m, c, j, i, t) =
    ``m·row_units + ((LW·c + j)·8 + i)·4 + t`` holds, for word w = 4·LW·c + LW·t + j of the slice
    (``lw``: the words a lane loads of each row, 4 for tasks of 512 inputs, 2 for 256), the pairs
    (x[32w + p], x[32w + p + 16]) for p = 2i, 2i + 1 (low half first); zeros past K; the padding
    units untouched (all ones). The offset decode: each input times 2^-(p & 3) (rounded to x's
    dtype), and C = Σ (32 + 2^(p & 3))·x' of each row and chunk (a task's inputs) in a table after
    the rows (chunk-major). Returns ``(xs without the table, C [M, chunks] or None, Σ|terms| of
    each C or None)``."""
    M, K = x.shape
    vals = (x.float() * g.float()).to(x.dtype) if g is not None else x  # onebit: x·g rounded to x's dtype
    chunk_words = 4 * lw
    row_units = chunks * 32 * chunk_words // 4 + ROW_PAD_UNITS
    xs = np.full(M * row_units * 2, 0xFFFFFFFF, dtype=np.uint32)
    C = np.zeros((M, chunks)) if offset else None
    C_abs = np.zeros((M, chunks)) if offset else None
    p_of_k = torch.arange(K) % 32 % 16  # the register an input goes to
    if offset:
        vals = (vals.float() * 2.0 ** -(p_of_k % 4).float()).to(x.dtype)
    b = bits(vals)
    for m in range(M):
        for w in range(chunks * chunk_words):
            c, t, j = w // chunk_words, (w // lw) % 4, w % lw
            for p in range(16):
                lo_k, hi_k = k0 + 32 * w + p, k0 + 32 * w + p + 16
                lo = b[m, lo_k] if lo_k < K else 0
                hi = b[m, hi_k] if hi_k < K else 0
                unit = m * row_units + ((c * lw + j) * 8 + (p >> 1)) * 4 + t
                xs[2 * unit + (p & 1)] = lo | (hi << 16)
                if offset:
                    terms = [(32 + 2 ** (p % 4)) * float(vals[m, k]) for k in (lo_k, hi_k) if k < K]
                    C[m, c] += sum(terms)
                    C_abs[m, c] += sum(map(abs, terms))
    return xs, C, C_abs


def fill(lib, x, k0, chunks, threads, g=None, offset=False, lw=4):
    """``(xs without the table, C [M, chunks] or None)`` from the kernel's fill_x run thread by
    thread (xs with room for the offset decode's table of C after the rows of x); ``lw`` as in
    :func:`pair_order`."""
    M, K = x.shape
    row_units = chunks * 32 * 4 * lw // 4 + ROW_PAD_UNITS
    rows_words = M * row_units * 2
    xs = np.full(rows_words + M * chunks + GUARD, 0xFFFFFFFF, dtype=np.uint32)
    dtype = 0 if x.dtype == torch.float16 else 1
    mode = {(False, False): 0, (True, False): 2, (False, True): 3, (True, True): 4}[(g is not None, offset)]
    rc = lib.int1_fill_emulate(dtype, mode, x.data_ptr(), g.data_ptr() if g is not None else None,
                               xs.ctypes.data, M, K, k0, chunks, threads, lw)
    assert rc == 0
    table = xs[rows_words:rows_words + M * chunks]
    assert (xs[rows_words + M * chunks:] == 0xFFFFFFFF).all()  # nothing written past the table
    if not offset:
        assert (table == 0xFFFFFFFF).all()  # no table without the offset decode
        return xs[:rows_words], None
    return xs[:rows_words], table.view(np.float32).astype(np.float64).reshape(chunks, M).T  # offset_c: c·M + m


def same_copy(got, want):
    assert np.array_equal(got[0], want[0])
    if want[1] is not None:
        # the kernel sums in fp32 (a tree of partial sums), the reference in float64: a rounding
        # error of at most 1e-6·Σ|terms| (16 roundings of 2^-24); a term missing or wrong is off
        # by (32 + 2^(p & 3))·|x|, about 1/512 of Σ|terms| for a typical x of a 512-input chunk
        assert (np.abs(got[1] - want[1]) <= 1e-6 * want[2]).all(), np.abs(got[1] - want[1]).max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M, K, k0, chunks", [(1, 1024, 0, 2), (3, 1000, 512, 1), (16, 4096 + 3, 3584, 2),
                                              (5, 45, 0, 1), (9, 130, 0, 1), (16, 2048, 1024, 2)])
@pytest.mark.parametrize("threads", [32, 96, 1024])
@pytest.mark.parametrize("where", ["aligned", "unaligned"])
@pytest.mark.parametrize("offset", [False, True], ids=["pair order", "offset decode"])
@pytest.mark.parametrize("lw", [4, 2], ids=["16-row tasks", "32-row tasks"])
def test_int1_fill_is_the_pair_order(lib, dtype, M, K, k0, chunks, threads, where, offset, lw):
    """Slices of 512-input chunks (16-row tasks), or the same inputs in twice the chunks of 256
    (32-row tasks: their lanes own 2 words a chunk instead of 4)."""
    torch.manual_seed(M * 7919 + K + k0 + threads)
    x = torch.randn(M, K, dtype=dtype)
    x = aligned(x) if where == "aligned" else offset_view(x, 1)
    chunks = chunks * 4 // lw
    same_copy(fill(lib, x, k0, chunks, threads, offset=offset, lw=lw), pair_order(x, k0, chunks, offset=offset, lw=lw))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M, K", [(2, 1024), (16, 1000), (3, 77)])
@pytest.mark.parametrize("g_where", ["aligned", "unaligned"])
@pytest.mark.parametrize("offset", [False, True], ids=["pair order", "offset decode"])
def test_int1_fill_onebit_multiplies_by_g(lib, dtype, M, K, g_where, offset):
    torch.manual_seed(M + K)
    x = aligned(torch.randn(M, K, dtype=dtype))
    g = torch.rand(K, dtype=dtype) + 0.5
    g = aligned(g) if g_where == "aligned" else offset_view(g, 3)
    for lw in (4, 2):  # chunks of 512 and of 256 inputs
        chunks = -(-K // (128 * lw))
        got = fill(lib, x, 0, chunks, 64, g, offset, lw)
        same_copy(got, pair_order(x, 0, chunks, g, offset, lw))
        assert not np.array_equal(got[0], pair_order(x, 0, chunks, offset=offset, lw=lw)[0])  # g was applied


def test_int1_fill_refuses_bad_arguments(lib):
    x = torch.randn(2, 64, dtype=torch.float16)
    xs = np.zeros(2 * (128 + ROW_PAD_UNITS) * 2, dtype=np.uint32)
    for args in [(2, 0, 0, 1, 32, 4), (2, 64, 100, 1, 32, 4), (2, 64, 0, 0, 32, 4), (2, 64, 0, 1, 0, 4),
                 (0, 64, 0, 1, 32, 4), (2, 64, 256, 1, 32, 4), (2, 64, 128, 1, 32, 2), (2, 64, 0, 1, 32, 3),
                 (2, 64, 0, 1, 32, 1)]:  # k0 a whole chunk (512 or 256 inputs); 4 or 2 words a lane
        M, K, k0, chunks, threads, lw = args
        assert lib.int1_fill_emulate(0, 0, x.data_ptr(), None, xs.ctypes.data, M, K, k0, chunks, threads, lw) == 1
    for dtype, mode in [(2, 0), (0, 1), (0, 5), (0, -1), (0, 2), (0, 4)]:  # group fills as row; onebit needs g
        assert lib.int1_fill_emulate(dtype, mode, x.data_ptr(), None, xs.ctypes.data, 2, 64, 0, 1, 32, 4) == 1
    assert not xs.any()  # nothing written
    assert lib.int1_fill_emulate(0, 0, x.data_ptr(), None, xs.ctypes.data, 2, 64, 256, 1, 32, 2) == 0  # 256: a chunk of 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_offset_decode_sums_less_c_are_the_product(lib, dtype):
    """The offset decode (modes 3 and 4), the kernel's own register for every word and p: each half
    must read as 16 + b·2^(p & 3) in the dtype (b the weight's bit p or p + 16). With x stored times
    2^-(p & 3) (as fill_x stores it), doubling the sums an mma of those registers gives and
    subtracting C = Σ (32 + 2^(p & 3))·x' must give Ŵ·xᵀ exactly (here in float64; the lanes'
    fragments are the pair-order ones, tested in test_int1_gemv_mma.py)."""
    code = 0 if dtype == torch.float16 else 1
    rng = np.random.default_rng(1)
    M = 9
    words = rng.integers(0, 2**32, size=(16, 16), dtype=np.uint64)  # 16 rows x 512 inputs
    x = torch.randn(M, 512).to(dtype)
    halves = torch.empty(16, 16, 16, 2, dtype=torch.int32)  # row, word, register p, (low, high)
    for row in range(16):
        for w in range(16):
            for p in range(16):
                reg = lib.int1_offset_pair_emulate(code, int(words[row, w]), p)
                halves[row, w, p, 0], halves[row, w, p, 1] = reg & 0xFFFF, reg >> 16
    values = halves.to(torch.int16).view(dtype).double()  # as the tensor cores read them
    bit = torch.from_numpy(((words[:, :, None] >> np.arange(32, dtype=np.uint64)) & 1).astype(np.float64))
    p = torch.arange(16)
    assert torch.equal(values[..., 0], 16 + bit[:, :, :16] * 2.0 ** (p % 4))
    assert torch.equal(values[..., 1], 16 + bit[:, :, 16:] * 2.0 ** (p % 4))
    # register p holds inputs 32w + p (low) and 32w + p + 16 (high): the weights in input order
    a = torch.cat([values[..., 0], values[..., 1]], dim=2).reshape(16, 512)
    p_of_k = torch.arange(512) % 32 % 16
    xp = (x.double() * 2.0 ** -(p_of_k % 4).double())
    assert torch.equal(xp.to(dtype).double(), xp)  # x' is exact in the dtype
    C = (xp * (32 + 2.0 ** (p_of_k % 4).double())).sum(1)
    signs = 2 * bit.reshape(16, 512) - 1
    torch.testing.assert_close(2 * (a @ xp.t()) - C, signs @ x.double().t(), rtol=1e-12, atol=1e-9)


def xa_shares(lib, x, A, block_r, slots):
    M, K = x.shape
    R = A.shape[0]
    parts = torch.full((slots, M, block_r), float("nan"), dtype=torch.float32)
    rc = lib.xa_share_emulate(0 if x.dtype == torch.float16 else 1, x.data_ptr(), A.data_ptr(), parts.data_ptr(),
                              M, K, R, block_r, slots)
    assert rc == 0
    return parts


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M, K, R, block_r, slots", [(1, 8192, 16, 16, 32), (16, 4096, 16, 16, 32),
                                                     (3, 1000, 5, 16, 7), (2, 45, 8, 16, 32), (4, 4103, 33, 64, 13),
                                                     (1, 300, 1, 16, 1)])
@pytest.mark.parametrize("where", ["aligned", "x unaligned", "A unaligned"])
def test_xa_shares_are_each_slots_slice(lib, dtype, M, K, R, block_r, slots, where):
    torch.manual_seed(M * 31 + K + R + slots)
    x = torch.randn(M, K, dtype=dtype)
    A = torch.randn(R, K, dtype=dtype) / K ** 0.5
    x = offset_view(x, 1) if where == "x unaligned" else aligned(x)
    A = offset_view(A, 1) if where == "A unaligned" else aligned(A)
    parts = xa_shares(lib, x, A, block_r, slots)
    per = (-(-K // slots) + 7) // 8 * 8  # xa_share_per: a multiple of 8, so 16-byte loads stay inside a share
    for s in range(slots):
        ks = slice(min(K, s * per), min(K, (s + 1) * per))
        want = x[:, ks].double() @ A[:, ks].double().t()
        torch.testing.assert_close(parts[s, :, :R].double(), want, rtol=1e-5, atol=1e-5)
        assert (parts[s, :, R:] == 0).all()  # past the rank
    torch.testing.assert_close(parts.sum(0)[:, :R].double(), x.double() @ A.double().t(), rtol=1e-5, atol=1e-4)


def test_xa_share_refuses_bad_arguments(lib):
    x = torch.randn(2, 64, dtype=torch.float16)
    A = torch.randn(4, 64, dtype=torch.float16)
    parts = torch.zeros(2, 2, 16)
    for dtype, R, block_r, slots in [(2, 4, 16, 2), (0, 4, 2, 2), (0, 4, 18, 2), (0, 4, 16, 0), (0, 0, 16, 2)]:
        assert lib.xa_share_emulate(dtype, x.data_ptr(), A.data_ptr(), parts.data_ptr(), 2, 64, R, block_r, slots) == 1
    assert not parts.any()
