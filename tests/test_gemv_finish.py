"""The CUDA GEMVs' one-launch finish (csrc/gemv_finish.cuh, LORAQ_ONE_LAUNCH=1) on the host.

tests/cuda/gemv_finish_emulate.cu runs the int1 mma GEMV's grid (or the byte-lookup GEMV's) block
by block, in the order a test gives, with the kernel's own task split (or row runs), items of x·Aᵀ, counters and finish of each output
(the sums of each task come from a dense W: the protocol is under test, not the mma). Each run must
give y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ + b, leave the sums, x·Aᵀ and every counter zero for the next call,
and never wait forever, whatever the order of the blocks: with blocks that start late, the
finishers compute the batches of x·Aᵀ that nobody has claimed. On the GPU the blocks overlap;
that is tested there (tests/test_int1_gemv_mma.py, marked gpu)."""

import ctypes
import random

import numpy as np
import pytest
import torch

from host_cuda import host_library

TASK_INPUTS, TASK_ROWS, XA_RANKS = 512, 16, 4
LUT8_SLICE_INPUTS = 1024  # the byte-lookup GEMV's K slices (its units are TASK_ROWS rows too)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    so = host_library("gemv_finish_emulate.cu", tmp_path_factory.mktemp("finish"))
    so.int1_finish_emulate.restype = ctypes.c_int
    so.int1_finish_emulate.argtypes = ([ctypes.c_int] + [ctypes.c_void_p] * 6 + [ctypes.c_float]
                                       + [ctypes.c_void_p] * 4 + [ctypes.c_int] * 10 + [ctypes.c_void_p] * 2
                                       + [ctypes.c_int])
    so.row_arrival_counts.restype = ctypes.c_int
    so.row_arrival_counts.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    return so


def _slices(K, k_split, task_inputs=TASK_INPUTS):
    per = -(-K // k_split)
    inputs = -(-per // task_inputs) * task_inputs
    return -(-K // inputs)


def _items(slots, M, R):
    """Items of x·Aᵀ (csrc/gemv_finish.cuh: xa_items): a slot, a row of x, four ranks."""
    return slots * M * -(-R // XA_RANKS)


def _counters(N, M, R, slots, launch_warps):
    items = _items(slots, M, R)
    batch = max(1, -(-items // launch_warps))
    return -(-N // TASK_ROWS) + 2 + -(-items // batch)


class Problem:
    """One call's inputs and the buffers the kernel shares between calls."""

    def __init__(self, dtype, M, N, K, R, bias, blocks, warps, k_split, slots=None, seed=0, split=0):
        """split 0: the mma GEMV's tasks; 1: the byte-lookup GEMV's row runs (one row of x,
        K slices of 1024: k_split at least ceil(K / 1024))."""
        g = torch.Generator().manual_seed(seed)
        self.dtype, self.M, self.N, self.K, self.R = dtype, M, N, K, R
        self.blocks, self.warps, self.k_split, self.split = blocks, warps, k_split, split
        self.slices = _slices(K, k_split, LUT8_SLICE_INPUTS if split else TASK_INPUTS)
        self.x = torch.randn(M, K, generator=g).to(dtype)
        self.W = torch.randn(N, K, generator=g).sign()  # int1's values; any would do
        self.A = (torch.randn(R, K, generator=g) / K ** 0.5).to(dtype) if R else None
        self.B = torch.randn(N, R, generator=g).to(dtype) if R else None
        self.bias = torch.randn(N, generator=g).to(dtype) if bias else None
        self.scaling = 0.75
        self.block_r = max(16, 1 << (R - 1).bit_length()) if R else 16
        self.slots = min(32, blocks * self.slices) if slots is None else slots
        self.ws = torch.zeros(M, N)
        self.xa = torch.zeros(M, self.block_r)
        self.n_counters = _counters(N, M, R, self.slots, blocks * warps * self.slices)
        self.counters = torch.zeros(self.n_counters, dtype=torch.int32)

    def expected(self):
        x = self.x.double()
        y = x @ self.W.double().T
        if self.A is not None:
            y += self.scaling * (x @ self.A.double().T) @ self.B.double().T
        if self.bias is not None:
            y += self.bias.double()
        return y

    def run(self, lib, order):
        y = torch.full((self.M, self.N), float("nan")).to(self.dtype)
        xf = self.x.float().contiguous()
        stats = np.zeros(3, dtype=np.int32)
        order = np.ascontiguousarray(order, dtype=np.int32)
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        rc = lib.int1_finish_emulate(0 if self.dtype == torch.float16 else 1, ptr(self.x), ptr(xf), ptr(self.W),
                                     ptr(self.A), ptr(self.B), ptr(self.bias), self.scaling, ptr(y), ptr(self.ws),
                                     ptr(self.xa), ptr(self.counters), self.n_counters, self.M, self.N, self.K,
                                     self.R, self.block_r, self.slots, self.blocks, self.warps, self.k_split,
                                     order.ctypes.data, stats.ctypes.data, self.split)
        return rc, y, stats

    def orders(self):
        n = self.blocks * self.slices
        shuffled = list(range(n))
        random.Random(n).shuffle(shuffled)
        return {"in order": list(range(n)), "reversed": list(range(n))[::-1], "shuffled": shuffled}

    def assert_left_zero(self):
        assert not self.ws.any(), "the sums were not all zeroed"
        assert not self.xa.any(), "x·Aᵀ was not zeroed"
        assert not self.counters.any(), f"counters left: {self.counters.nonzero().flatten().tolist()}"


def _close(y, expected, dtype):
    tol = 1e-2 if dtype == torch.float16 else 4e-2  # the cast of y to the dtype, on values up to ~100
    np.testing.assert_allclose(y.double().numpy(), expected.numpy(), rtol=tol, atol=tol * expected.abs().max().item())


SHAPES = [  # M, N, K, R, bias, blocks, warps, k_split
    (1, 37, 1000, 16, True, 3, 2, 1),
    (1, 16, 512, 0, True, 2, 2, 1),
    (3, 100, 1500, 5, False, 4, 3, 3),
    (16, 48, 2100, 33, True, 2, 4, 2),
    (9, 17, 45, 1, False, 1, 1, 1),
    (5, 300, 3000, 8, True, 8, 2, 4),
    (2, 64, 700, 16, False, 5, 8, 1),  # more warps than tasks: some warps have no run
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-N{}-K{}-R{}-b{}-{}x{}-s{}".format(*s))
def test_one_launch_finish_in_any_block_order(lib, dtype, shape):
    M, N, K, R, bias, blocks, warps, k_split = shape
    _right_in_every_order(lib, Problem(dtype, M, N, K, R, bias, blocks, warps, k_split))


def _right_in_every_order(lib, p):
    """p's call in every block order, twice each (the second call finds what the first left:
    zeros): y right, everything zero after, every unit finished once, every item of x·Aᵀ
    computed once."""
    for name, order in p.orders().items():
        for call in range(2):
            rc, y, stats = p.run(lib, order)
            assert rc == 0, (name, call, rc)
            _close(y, p.expected(), p.dtype)
            p.assert_left_zero()
            assert stats[0] == -(-p.N // TASK_ROWS), "every unit is finished once"
            if p.R:
                assert stats[1] + stats[2] == _items(p.slots, p.M, p.R), "every item of x·Aᵀ is computed once"


LUT8_SHAPES = [  # N, K, R, bias, blocks, warps, k_split (one row of x)
    (37, 1000, 16, True, 3, 2, 1),
    (16, 1024, 0, True, 2, 2, 1),
    (100, 3000, 5, False, 4, 3, 3),
    (300, 2100, 33, True, 2, 4, 5),  # more slices asked for than K needs: three of 1024
    (5, 45, 1, False, 3, 4, 1),  # more warps than rows: most warps have no run, the last one pads
    (64, 4096, 8, True, 1, 7, 4),  # N a multiple of 16: nothing to pad
    (17, 2048, 4, False, 5, 8, 2),
    (5, 3000, 4, True, 3, 4, 3),  # several slices, more warps than rows
    (1000, 2048, 16, True, 1, 1, 2),  # one warp a slice: all 63 units
    (3, 5000, 9, True, 2, 8, 7),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", LUT8_SHAPES, ids=lambda s: "N{}-K{}-R{}-b{}-{}x{}-s{}".format(*s))
def test_byte_lookup_one_launch_finish_in_any_block_order(lib, dtype, shape):
    """The byte-lookup GEMV's split (csrc/int1_gemv_lut8.cuh): each K slice's warps take runs of
    the N rows and arrive at their units by rows (row_arrivals), a unit whole at 16 rows a slice."""
    N, K, R, bias, blocks, warps, k_split = shape
    p = Problem(dtype, 1, N, K, R, bias, blocks, warps, k_split, split=1)
    assert p.slices == -(-K // LUT8_SLICE_INPUTS)
    _right_in_every_order(lib, p)


def test_row_runs_bring_each_unit_16_rows_a_slice(lib):
    """row_arrivals over every warp of a slice: each unit gets exactly 16 (the slice's last run
    pads the last unit past N), and no warp arrives at a unit past the last, for every N and
    number of warps, with runs that are empty."""
    for N in range(1, 70):
        for total in (1, 2, 3, 5, 16, 31, 64, 100):
            counts = np.zeros(8, dtype=np.int32)
            units = lib.row_arrival_counts(N, total, counts.ctypes.data, 8)
            assert units == -(-N // TASK_ROWS), (N, total)
            assert counts[:units].tolist() == [TASK_ROWS] * units and not counts[units:].any(), (N, total)


def test_the_byte_lookup_split_refuses_more_rows_and_too_few_slices(lib):
    p = Problem(torch.float16, 2, 40, 600, 4, False, 2, 2, 1, split=1)
    assert p.run(lib, [0, 1])[0] == 1
    p = Problem(torch.float16, 1, 40, 2100, 4, False, 2, 2, 2, split=1)  # 3 slices of 1024 needed
    assert p.run(lib, list(range(2 * p.slices)))[0] == 1


def test_finishers_compute_the_batches_of_blocks_that_have_not_started(lib):
    """Reversed, the warps that own the first batches run last: the finishers before them must
    compute those batches themselves (on a GPU: blocks that never got an SM while others wait).
    (Here warps run one at a time, to their end: even in order, a finisher of K slice 1 may find
    batches of later warps unclaimed. On a GPU every resident warp claims before it sums.)"""
    p = Problem(torch.float16, 4, 200, 2048, 16, True, 6, 4, 2)
    rc, y, stats = p.run(lib, p.orders()["reversed"])
    assert rc == 0 and stats[1] > 0
    _close(y, p.expected(), torch.float16)
    p.assert_left_zero()


def test_every_slot_count_and_a_single_warp(lib):
    for slots in (1, 2, 7, 12):
        p = Problem(torch.bfloat16, 2, 40, 1800, 6, True, 3, 2, 4, slots=slots)
        for order in p.orders().values():
            rc, y, _ = p.run(lib, order)
            assert rc == 0
            _close(y, p.expected(), torch.bfloat16)
            p.assert_left_zero()
    p = Problem(torch.float16, 1, 33, 1100, 3, True, 1, 1, 1)  # one warp does everything
    rc, y, stats = p.run(lib, [0])
    assert rc == 0 and stats[0] == 3
    _close(y, p.expected(), torch.float16)


def test_too_few_counters_and_bad_arguments_are_refused(lib):
    p = Problem(torch.float16, 2, 40, 600, 4, False, 2, 2, 1)
    p.n_counters -= 1
    assert p.run(lib, [0, 1])[0] == 2
    p = Problem(torch.float16, 2, 40, 600, 4, False, 2, 2, 1, slots=5)  # more slots than blocks
    assert p.run(lib, [0, 1])[0] == 1


def test_the_python_launcher_hands_zeroed_buffers_and_cleans_up_after_an_error():
    """kernels/splitk_finish.run_cuda_one_launch (both CUDA GEMVs' one-launch path): the sums,
    x·Aᵀ and counters it hands the kernel are zero and as large as csrc/gemv_finish.cuh needs; a
    launch that raises leaves the workspace zero again for the next call."""
    from loraq.kernels import splitk_finish

    x = torch.randn(3, 100, dtype=torch.float16)
    M, N, R, slots = 3, 70, 5, 6
    seen = {}

    def launch(ws, xa, y, counters):
        seen.update(ws=ws.shape, xa=None if xa is None else xa.shape, y=(y.shape, y.dtype), n=counters.numel())
        assert not ws.any() and (xa is None or not xa.any()) and not counters.any()
        y.fill_(1)

    y = splitk_finish.run_cuda_one_launch(launch, M, N, R, slots, x)
    assert torch.equal(y, torch.ones(M, N, dtype=torch.float16))
    assert seen["ws"] == (M, N) and seen["xa"] == (1, M, 16) and seen["y"] == ((M, N), torch.float16)
    assert seen["n"] >= -(-N // TASK_ROWS) + 2 + _items(slots, M, R)
    splitk_finish.run_cuda_one_launch(launch, M, N, None, slots, x)
    assert seen["xa"] is None and seen["n"] >= -(-N // TASK_ROWS) + 2

    def fails(ws, xa, y, counters):
        ws.fill_(3)
        counters.fill_(7)
        raise RuntimeError("launch failed")

    with pytest.raises(RuntimeError, match="launch failed"):
        splitk_finish.run_cuda_one_launch(fails, M, N, R, slots, x)
    assert all(not ws.any() for ws in splitk_finish.workspaces().values())
