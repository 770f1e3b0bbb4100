"""The gathering dX GEMV (a few rows of dY, sparse4x4 weights) against loraq.reference: every
dtype, odd shapes, split and unsplit reductions over N, positions that point into the padding;
and how lora_linear_dx offers it to the autotuner."""

import pytest
import torch

pytest.importorskip("triton")

from loraq import reference  # noqa: E402
from loraq.formats import Sparse4x4Weight  # noqa: E402
from loraq.formats.sparse4x4 import pack_nibbles  # noqa: E402
from loraq.kernels.autotune import gather_configs  # noqa: E402
from test_triton_kernels import DTYPES, check, problem, tuner_calls  # noqa: E402


def _refs(dy, w, A, dyB, s):
    f64 = (lambda t: None if t is None else t.double())
    return (reference.lora_linear_dx_ref(dy.double(), w.to(torch.float64), f64(A), f64(dyB), s),
            reference.lora_linear_dx_ref(dy, w, A, dyB, s))


def _dy(M, N, B, dtype, device=None):
    dy = torch.randn(M, N, dtype=dtype, device=device if B is None else B.device)
    return dy, (dy @ B if B is not None else None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M, rows", [(1, 1), (3, 4), (17, 2), (5, 8)], ids=["M1", "M3-rows4", "M17-rows2", "M5-rows8"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "plain"])
def test_gather_dx_matches_reference(dtype, M, rows, lora):
    from loraq.kernels.sparse4x4_gemv_dx import sparse4x4_gemv_dx

    # N = 37, K = 301: a partial last tile row and tile column, a partial last block of columns;
    # split 3 of 37 rows in blocks of 8: slices of two blocks, the last one partial
    w, _, A, B, _ = problem("sparse4x4", dtype, M, 37, 301, r=5, lora=lora, bias=False)
    dy, dyB = _dy(M, 37, B, dtype)
    dx = sparse4x4_gemv_dx(dy, w.tensors(), {"N": 37, "K": 301}, A, dyB, 0.7, rows=rows, block_k=16, block_n=8,
                           split=3)
    assert dx.shape == (M, 301) and dx.dtype == dtype
    check(dx, *_refs(dy, w, A, dyB, 0.7), f"gather dx {dtype} M={M} rows={rows}")


@pytest.mark.parametrize("split", [1, 2, 8])
@pytest.mark.parametrize("shape", [(32, 8), (70, 13), (129, 64)], ids=str)
def test_gather_dx_shapes_and_splits(split, shape):
    """N and K multiples of 4 and 8 (no padding) and not, unsplit and split (2, 5 and 9 blocks of
    16 rows of Ŵ: split 8 exceeds the first two)."""
    from loraq.kernels.sparse4x4_gemv_dx import sparse4x4_gemv_dx

    N, K = shape
    w, _, A, B, _ = problem("sparse4x4", torch.float16, 2, N, K, r=3, bias=False)
    dy, dyB = _dy(2, N, B, torch.float16)
    dx = sparse4x4_gemv_dx(dy, w.tensors(), {"N": N, "K": K}, A, dyB, 1.5, rows=2, block_k=8, block_n=16, split=split)
    check(dx, *_refs(dy, w, A, dyB, 1.5), f"{shape} split {split}")


def test_positions_in_the_padding_contribute_nothing():
    """Elements kept in the padding (rows past N, columns past K) are cropped by dequantize(); the
    kernel ignores them too and reads nothing past a row of dY."""
    from loraq.kernels.sparse4x4_gemv_dx import sparse4x4_gemv_dx

    N, K = 7, 13  # 2 tile rows (row 7 is padding), 4 tile columns (columns 13..15 are padding)
    torch.manual_seed(6)
    values = torch.randn(2, 4, dtype=torch.float16) + 3.0
    pos = torch.randint(0, 16, (2, 4))
    pos[1, :] = 12 + torch.arange(4) % 4  # row 3 of the last tile row: row 7, padding
    pos[0, 3] = 3  # column 15: padding
    w = Sparse4x4Weight(values, pack_nibbles(pos), (N, K))
    assert (w.dequantize() != 0).sum() == 3  # 5 of the 8 kept elements lie in the padding
    dy = torch.randn(3, N, dtype=torch.float16)
    dx = sparse4x4_gemv_dx(dy, w.tensors(), {"N": N, "K": K}, rows=4, block_k=8, block_n=4, split=1)
    check(dx, *_refs(dy, w, None, None, 1.0), "padding")


@pytest.mark.parametrize("M, cfg", [(M, c) for M in (1, 3, 16) for c in gather_configs(M)], ids=str)
def test_every_gather_config_through_lora_linear_dx(M, cfg):
    """Each gathering candidate the autotuner may pick for dX, forced through ``lora_linear_dx``."""
    from loraq.kernels import lora_linear_dx

    w, _, A, B, _ = problem("sparse4x4", torch.float16, M, 530, 300, r=3, bias=False)
    dy, dyB = _dy(M, 530, B, torch.float16)
    dx = lora_linear_dx(dy, "sparse4x4", w.tensors(), {"N": 530, "K": 300}, A, dyB, 0.5, config=cfg)
    check(dx, *_refs(dy, w, A, dyB, 0.5), f"{cfg}")


def test_gather_dx_refuses_what_it_cannot_do():
    from loraq.kernels import lora_linear_dx
    from loraq.kernels.autotune import GATHER
    from loraq.kernels.sparse4x4_gemv_dx import sparse4x4_gemv_dx

    w, *_ = problem("sparse4x4", torch.float16, 2, 16, 64, lora=False, bias=False)
    meta = {"N": 16, "K": 64}
    dy = torch.randn(2, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"dy must be \[M, 16\]"):
        sparse4x4_gemv_dx(dy[:, :15], w.tensors(), meta)
    for kwargs, why in [(dict(block_k=2), "block_k must be a power of two ≥ 4"),
                        (dict(block_n=12), "block_n must be a power of two ≥ 4"),
                        (dict(rows=3), "rows must be a power of two ≥ 1"), (dict(split=0), "split must be ≥ 1")]:
        with pytest.raises(ValueError, match=why):
            sparse4x4_gemv_dx(dy, w.tensors(), meta, **kwargs)
    # a forced config gets the same checks
    with pytest.raises(ValueError, match="block_k must be a power of two ≥ 4"):
        lora_linear_dx(dy, "sparse4x4", w.tensors(), meta, config=(1, 2, 16, 1, 4, 2, GATHER))


def test_lora_linear_dx_offers_the_gather_for_small_batches_of_sparse4x4():
    from loraq.kernels import autotune, lora_linear_dx

    int1_meta = {"N": 16, "K": 48, "group_size": None, "scale_mode": "mean_abs"}
    with tuner_calls(lora_linear_dx) as calls:
        for kind, M in [("sparse4x4", 1), ("sparse4x4", 9), ("sparse4x4", 17), ("int1", 2)]:
            w, *_ = problem(kind, torch.float16, M, 16, 48, lora=False, bias=False)
            lora_linear_dx(torch.randn(M, 16, dtype=torch.float16), kind, w.tensors(),
                           {"N": 16, "K": 48} if kind == "sparse4x4" else int1_meta)
    seen = [(c.op.endswith(":gather"), c.M, c.M <= autotune.GATHER_MAX_M and c.candidates == autotune.gather_configs(c.M))
            for c in calls]
    assert seen == [(True, 1, True), (True, 9, True), (False, 17, False), (False, 2, False)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 5, 16])
def test_gpu_every_gather_dx_config_at_a_large_shape(dtype, M):
    from loraq.kernels import lora_linear_dx

    w, _, A, B, _ = problem("sparse4x4", dtype, M, 3001, 4099, r=16, bias=False)
    dy = torch.randn(M, 3001, dtype=dtype, device=A.device)
    dyB = dy @ B
    ref, low = _refs(dy, w, A, dyB, 2.0)
    for cfg in gather_configs(M):
        dx = lora_linear_dx(dy, "sparse4x4", w.tensors(), {"N": 3001, "K": 4099}, A, dyB, 2.0, config=cfg)
        check(dx, ref, low, f"{cfg}")
