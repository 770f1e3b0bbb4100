"""The gathering GEMV (a few rows of x, sparse4x4 weights) against loraq.reference: every dtype,
odd shapes, split and unsplit reductions, positions that point into the padding; and how the
forward launcher offers it to the autotuner."""

import faulthandler

import pytest
import torch

pytest.importorskip("triton")

from loraq import reference  # noqa: E402
from loraq.formats import Sparse4x4Weight  # noqa: E402
from loraq.formats.sparse4x4 import pack_nibbles  # noqa: E402
from loraq.kernels.autotune import gather_configs, gather_fwd_configs  # noqa: E402
from test_triton_kernels import (DTYPES, check, f64, interpreter_program_order, problem, tuner_calls,  # noqa: E402
                                 workspaces_clean)


def _refs(x, w, A, B, s, b):
    return (reference.lora_linear_ref(f64(x), w.to(torch.float64), f64(A), f64(B), s, f64(b)),
            reference.lora_linear_ref(x, w, A, B, s, b))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M, rows", [(1, 1), (3, 4), (17, 2), (5, 8)], ids=["M1", "M3-rows4", "M17-rows2", "M5-rows8"])
@pytest.mark.parametrize("lora_bias", [(True, True), (False, False), (True, False)], ids=["lora+bias", "plain", "lora"])
@pytest.mark.parametrize("transpose, by_fours", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["", "swapped", "by-fours", "swapped-by-fours"])
def test_gather_gemv_matches_reference(dtype, M, rows, lora_bias, transpose, by_fours):
    from loraq.kernels.sparse4x4_gemv import sparse4x4_gemv

    # N = 37 and K = 301: a partial last tile row and tile column, a partial last block of rows;
    # split 3 of 301 inputs in blocks of 64: slices of two blocks, the last one partial; M not a
    # multiple of the rows a program takes (or fewer): its last program has rows past M
    w, x, A, B, b = problem("sparse4x4", dtype, M, 37, 301, r=5, lora=lora_bias[0], bias=lora_bias[1])
    y = sparse4x4_gemv(x, w.tensors(), {"N": 37, "K": 301}, A, B, 0.7, b, rows=rows, block_n=16, block_k=64,
                       split=3, transpose=transpose, by_fours=by_fours)
    assert y.shape == (M, 37) and y.dtype == dtype
    check(y, *_refs(x, w, A, B, 0.7, b), f"gather {dtype} M={M} rows={rows} transpose={transpose} x4={by_fours}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lora, bias", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("M, rows, transpose", [(1, 1, False), (5, 2, True)], ids=["M1", "M5-rows2-swapped"])
def test_gather_one_launch_matches_two_and_leaves_its_counters_zero(dtype, lora, bias, M, rows, transpose):
    """The finish in the last program of each block of outputs (several blocks, slices and
    groups of rows): the two-launch answer to the bit, twice in a row, nothing left behind."""
    from loraq.kernels.sparse4x4_gemv import sparse4x4_gemv

    w, x, A, B, b = problem("sparse4x4", dtype, M, 37, 301, r=5, lora=lora, bias=bias)
    kw = dict(rows=rows, block_n=16, block_k=64, split=3, transpose=transpose)
    two = sparse4x4_gemv(x, w.tensors(), {"N": 37, "K": 301}, A, B, 0.7, b, one_launch=False, **kw)
    for _ in range(2):
        one = sparse4x4_gemv(x, w.tensors(), {"N": 37, "K": 301}, A, B, 0.7, b, one_launch=True, **kw)
        assert one.shape == (M, 37) and one.dtype == dtype and workspaces_clean()
        check(one, *_refs(x, w, A, B, 0.7, b), f"gather, one launch, {dtype} M={M}")
    if x.device.type == "cpu":  # the interpreter adds in one order: the same sums, to the bit
        torch.testing.assert_close(one, two, rtol=0, atol=0)
    # (a GPU's fp32 atomics add in any order: there the reference check above is the test)


@pytest.mark.parametrize("seed", [0, 1], ids=["reversed", "shuffled"])
def test_gather_one_launch_in_any_program_order(seed):
    """The shares of x·Aᵀ come from whichever program of a slice claims first, not from the
    first block of outputs: the finish completes with that block last or the grid shuffled."""
    from loraq.kernels.sparse4x4_gemv import sparse4x4_gemv

    w, x, A, B, b = problem("sparse4x4", torch.float16, 5, 37, 301, r=5)
    faulthandler.dump_traceback_later(900, exit=True)  # a protocol that waits forever fails loudly
    try:
        with interpreter_program_order(seed):
            for _ in range(2):
                y = sparse4x4_gemv(x, w.tensors(), {"N": 37, "K": 301}, A, B, 0.7, b, rows=2, block_n=16,
                                   block_k=64, split=3, one_launch=True)
                check(y, *_refs(x, w, A, B, 0.7, b), f"gather, one launch, program order {seed}")
                assert workspaces_clean()
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.mark.parametrize("split", [1, 2, 8])
@pytest.mark.parametrize("shape", [(8, 32), (13, 70), (64, 129)], ids=str)
@pytest.mark.parametrize("transpose, by_fours", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["", "swapped", "by-fours", "swapped-by-fours"])
def test_gather_gemv_shapes_and_splits(split, shape, transpose, by_fours):
    """Sizes that are multiples of 4 and 8 (no padding: only the unmasked blocks) and sizes that
    are not, unsplit and split (2, 5 and 9 blocks of 16 inputs: split 8 exceeds the first two)."""
    from loraq.kernels.sparse4x4_gemv import sparse4x4_gemv

    N, K = shape
    w, x, A, B, b = problem("sparse4x4", torch.float16, 2, N, K, r=3)
    y = sparse4x4_gemv(x, w.tensors(), {"N": N, "K": K}, A, B, 1.5, b, rows=2, block_n=8, block_k=16, split=split,
                       transpose=transpose, by_fours=by_fours)
    check(y, *_refs(x, w, A, B, 1.5, b), f"{shape} split {split} transpose={transpose} x4={by_fours}")


def test_positions_in_the_padding_contribute_nothing():
    """A weight loaded from elsewhere may keep an element of the padding (rows past N, inputs past
    K). dequantize() crops it; the kernel must ignore it too and read nothing past x."""
    from loraq.kernels.sparse4x4_gemv import sparse4x4_gemv

    N, K = 7, 13  # tile rows 2 (rows 4..7, row 7 is padding), tile columns 4 (column 12 real, 13..15 padding)
    torch.manual_seed(5)
    values = torch.randn(2, 4, dtype=torch.float16) + 3.0
    pos = torch.randint(0, 16, (2, 4))
    pos[1, :] = 12 + torch.arange(4) % 4  # the last tile row keeps row 3 of its tile: output row 7, padding
    pos[0, 3] = 3  # the last tile column keeps input 15: padding
    pos[1, 3] = 13  # output row 7 and input 13: both padding
    w = Sparse4x4Weight(values, pack_nibbles(pos), (N, K))
    x = torch.randn(2, K, dtype=torch.float16)
    for transpose in (False, True):
        for by_fours in (False, True):  # by fours: the inputs past K are masked to 0, never read
            y = sparse4x4_gemv(x, w.tensors(), {"N": N, "K": K}, block_n=8, block_k=8, split=1, transpose=transpose,
                               by_fours=by_fours)
            check(y, *_refs(x, w, None, None, 1.0, None), f"padding, transpose={transpose} x4={by_fours}")
    assert (w.dequantize() != 0).sum() == 3  # 5 of the 8 kept elements lie in the padding


@pytest.mark.parametrize("M, cfg", [(M, c) for M in (1, 3, 16) for c in gather_fwd_configs(M)], ids=str)
def test_every_gather_config_through_the_forward_launcher(M, cfg):
    """Each gathering candidate the autotuner may pick, forced through ``lora_linear_fwd``."""
    from loraq.kernels import lora_linear_fwd

    w, x, A, B, b = problem("sparse4x4", torch.float16, M, 300, 530, r=3)
    y = lora_linear_fwd(x, "sparse4x4", w.tensors(), {"N": 300, "K": 530}, A, B, 0.5, b, config=cfg)
    check(y, *_refs(x, w, A, B, 0.5, b), f"{cfg}")


def test_gather_refuses_what_it_cannot_do():
    from loraq.kernels import lora_linear_dx, lora_linear_fwd
    from loraq.kernels.autotune import GATHER, GATHER_SMALL_M, GATHER_T, GATHER_T_X4, GATHER_X4, LUT_M1
    from loraq.kernels.sparse4x4_gemv import sparse4x4_gemv

    w, x, *_ = problem("sparse4x4", torch.float16, 2, 16, 64, lora=False, bias=False)
    meta = {"N": 16, "K": 64}
    with pytest.raises(ValueError, match=r"x must be \[M, 64\]"):
        sparse4x4_gemv(x[:, :60], w.tensors(), meta)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        sparse4x4_gemv(x, w.tensors(), meta, block_n=12)
    with pytest.raises(ValueError, match="block_k must be a power of two ≥ 8"):
        sparse4x4_gemv(x, w.tensors(), meta, block_k=4)
    with pytest.raises(ValueError, match="rows must be a power of two ≥ 1"):
        sparse4x4_gemv(x, w.tensors(), meta, rows=3)
    with pytest.raises(ValueError, match="split must be ≥ 1"):
        sparse4x4_gemv(x, w.tensors(), meta, split=0)
    i1, xi, *_ = problem("int1", torch.float16, 2, 16, 64, lora=False, bias=False)
    i1_meta = {"N": 16, "K": 64, "group_size": None, "scale_mode": "mean_abs"}
    with pytest.raises(ValueError, match="gathering GEMV: it takes a sparse4x4 weight"):
        lora_linear_fwd(xi, "int1", i1.tensors(), i1_meta, config=GATHER_SMALL_M[0])
    # a forced config gets the same checks (a block_k of 4 would split position bytes: wrong sums)
    for cfg, why in [((1, 16, 4, 1, 4, 2, GATHER), "block_k must be a power of two ≥ 8"),
                     ((3, 16, 32, 1, 4, 2, GATHER), "rows must be a power of two"),
                     ((1, 16, 32, 0, 4, 2, GATHER), "split must be ≥ 1"),
                     ((16, 64, 64, 1, 4, 2, 99), "the variant")]:
        with pytest.raises(ValueError, match=why):
            lora_linear_fwd(x, "sparse4x4", w.tensors(), meta, config=cfg)
    # dX has no lookup GEMV, and gathers only for sparse4x4 (its own tests: test_sparse4x4_gemv_dx.py)
    with pytest.raises(ValueError, match="dX takes tiled configs"):
        lora_linear_dx(torch.randn(2, 16, dtype=torch.float16), "sparse4x4", w.tensors(), meta, config=LUT_M1[0])
    with pytest.raises(ValueError, match="dX takes tiled configs"):
        lora_linear_dx(torch.randn(2, 16, dtype=torch.float16), "int1", i1.tensors(), i1_meta,
                       config=GATHER_SMALL_M[0])
    # the swapped gather and the loads by fours are forward kernels: refused for int1 and for dX
    for variant in (GATHER_T, GATHER_X4, GATHER_T_X4):
        other = GATHER_SMALL_M[0][:6] + (variant,)
        with pytest.raises(ValueError, match="gathering GEMV: it takes a sparse4x4 weight"):
            lora_linear_fwd(xi, "int1", i1.tensors(), i1_meta, config=other)
        with pytest.raises(ValueError, match="dX takes tiled configs"):
            lora_linear_dx(torch.randn(2, 16, dtype=torch.float16), "sparse4x4", w.tensors(), meta, config=other)
    with pytest.raises(ValueError, match="block_k must be a power of two ≥ 8"):
        lora_linear_fwd(x, "sparse4x4", w.tensors(), meta, config=(1, 16, 4, 1, 4, 2, GATHER_T))


def test_the_launcher_offers_the_gather_for_small_batches_of_sparse4x4():
    """The gathering candidates join the tuning of sparse4x4 up to GATHER_MAX_M rows under their
    own cache key; int1 and larger batches never see them."""
    from loraq.kernels import autotune, lora_linear_fwd

    int1_meta = {"N": 16, "K": 48, "group_size": None, "scale_mode": "mean_abs"}
    with tuner_calls(lora_linear_fwd) as calls:
        for kind, M in [("sparse4x4", 1), ("sparse4x4", 2), ("sparse4x4", 7), ("sparse4x4", 16), ("sparse4x4", 17),
                        ("int1", 5)]:
            w, x, *_ = problem(kind, torch.float16, M, 16, 48, lora=False, bias=False)
            lora_linear_fwd(x, kind, w.tensors(), {"N": 16, "K": 48} if kind == "sparse4x4" else int1_meta)
    seen = [(c.op.endswith(":gather"), c.M, c.M <= autotune.GATHER_MAX_M and c.candidates == autotune.gather_fwd_configs(c.M))
            for c in calls]
    assert seen == [(True, 1, True), (True, 2, True), (True, 7, True), (True, 16, True), (False, 17, False),
                    (False, 5, False)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 5, 16])
def test_gpu_every_gather_config_at_a_large_shape(dtype, M):
    from loraq.kernels import lora_linear_fwd

    w, x, A, B, b = problem("sparse4x4", dtype, M, 3001, 4099, r=16)
    ref, low = _refs(x, w, A, B, 2.0, b)
    for cfg in gather_fwd_configs(M):
        y = lora_linear_fwd(x, "sparse4x4", w.tensors(), {"N": 3001, "K": 4099}, A, B, 2.0, b, config=cfg)
        check(y, ref, low, f"{cfg}")


def test_gather_configs_take_the_whole_batch_on_smaller_tiles():
    """A program takes the batch's bucket of rows; its tile shrinks so the accumulators fit (the
    registers a thread needs stay those of one row on the full tile)."""
    from loraq.kernels.autotune import GATHER_SMALL_M, m_bucket

    base = {c[3:]: c[1] * c[2] for c in GATHER_SMALL_M}
    for M in range(1, 17):
        configs = gather_configs(M)
        assert configs and len(set(configs)) == len(configs)
        for rows, bn, bk, *rest in configs:
            assert rows == m_bucket(M) and bn % 4 == 0 and bk >= 32
            assert rows * bn * bk <= base[tuple(rest)]
    for bad in (0, 17):
        with pytest.raises(ValueError, match="1 to 16 rows"):
            gather_configs(bad)


def test_gather_one_launch_through_the_launcher(monkeypatch):
    """LORAQ_ONE_LAUNCH=1 reaches the gathering GEMV through the forward launcher."""
    from loraq.kernels import lora_linear_fwd

    monkeypatch.setenv("LORAQ_ONE_LAUNCH", "1")
    w, x, A, B, b = problem("sparse4x4", torch.float16, 3, 40, 200, r=3)
    y = lora_linear_fwd(x, "sparse4x4", w.tensors(), {"N": 40, "K": 200}, A, B, 0.5, b,
                        config=(1, 16, 64, 2, 4, 1, gather_fwd_configs(1)[0][6]))
    check(y, *_refs(x, w, A, B, 0.5, b), "LORAQ_ONE_LAUNCH=1 through the launcher")
    assert workspaces_clean()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M, N, K", [(1, 28672, 8192), (5, 4096, 4096), (16, 1000, 512)])
@pytest.mark.parametrize("lora", [True, False])
def test_gpu_gather_one_launch_at_large_shapes(dtype, M, N, K, lora):
    """Thousands of programs running at once: blocks finished by whichever program arrives last,
    the claimed shares waited for, the counters reset (ten calls, and a CUDA graph's replays)."""
    w, x, A, B, b = problem("sparse4x4", dtype, M, N, K, r=16, lora=lora)
    ref, low = _refs(x, w, A, B, 2.0, b)
    meta = {"N": N, "K": K}
    for cfg in gather_fwd_configs(M):
        for _ in range(10):
            y = sparse4x4_one(x, w, meta, A, B, b, cfg)
        check(y, ref, low, f"one launch {cfg}")
        assert workspaces_clean()
    cfg = gather_fwd_configs(M)[0]
    sparse4x4_one(x, w, meta, A, B, b, cfg)  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = sparse4x4_one(x, w, meta, A, B, b, cfg)
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    check(y, ref, low, "one launch under graph replay")
    assert workspaces_clean()


def sparse4x4_one(x, w, meta, A, B, b, cfg):
    """The gathering GEMV with config ``cfg``, finished in one launch."""
    from loraq.kernels.autotune import GATHER_T, GATHER_T_X4, GATHER_X4
    from loraq.kernels.sparse4x4_gemv import sparse4x4_gemv

    rows, block_n, block_k, split, warps, stages, variant = cfg
    return sparse4x4_gemv(x, w.tensors(), meta, A, B, 2.0, b, rows=rows, block_n=block_n, block_k=block_k,
                          split=split, num_warps=warps, num_stages=stages, transpose=variant in (GATHER_T, GATHER_T_X4),
                          by_fours=variant in (GATHER_X4, GATHER_T_X4), one_launch=True)
