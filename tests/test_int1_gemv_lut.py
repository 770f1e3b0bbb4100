"""The lookup-table GEMV (a few rows of x, int1 weights) against loraq.reference, every scale
mode, both table widths, every dtype; and how the forward launcher offers it to the autotuner."""

import faulthandler

import pytest
import torch

pytest.importorskip("triton")

from loraq import reference  # noqa: E402
from loraq.kernels.autotune import lut_configs  # noqa: E402
from test_triton_kernels import (DTYPES, check, f64, interpreter_program_order, needs_gather, problem,  # noqa: E402
                                 tuner_calls, workspaces_clean)

INT1_KINDS = ["int1", "int1_g16", "int1_onebit"]


def _meta(w):
    return {"N": w.shape[0], "K": w.shape[1], "group_size": w.group_size, "scale_mode": w.scale_mode}


@needs_gather
@pytest.mark.parametrize("kind", INT1_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("lora_bias", [(True, True), (False, False)], ids=["lora+bias", "plain"])
@pytest.mark.parametrize("M, rows", [(1, 1), (3, 4), (5, 2)], ids=["M1", "M3-rows4", "M5-rows2"])
def test_lut_gemv_matches_reference(kind, dtype, bits, lora_bias, M, rows):
    from loraq.kernels.int1_gemv_lut import int1_gemv_lut

    # odd N and K: a partial last block of rows, a partial last word and a partial last chunk;
    # M not a multiple of the rows a program takes: its last program has rows past M
    w, x, A, B, b = problem(kind, dtype, M, 37, 300, r=5, lora=lora_bias[0], bias=lora_bias[1])
    y = int1_gemv_lut(x, w.tensors(), _meta(w), A, B, 0.7, b, rows=rows, block_n=32, chunk_k=64, bits=bits)
    assert y.shape == (M, 37) and y.dtype == dtype
    check(y, reference.lora_linear_ref(f64(x), w.to(torch.float64), f64(A), f64(B), 0.7, f64(b)),
          reference.lora_linear_ref(x, w, A, B, 0.7, b), f"lut{bits} {kind} {dtype} M={M} rows={rows}")


@needs_gather
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lora, bias", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("M, rows, block_n", [(1, 1, 16), (3, 1, 32), (5, 2, 16)], ids=["M1", "M3", "M5-rows2"])
def test_lut_one_launch_matches_two_and_leaves_its_counters_zero(dtype, lora, bias, M, rows, block_n):
    """The finish in the last program of each tile (several tiles, slices and groups of rows):
    the two-launch answer, twice in a row (its counters reset themselves), nothing left behind."""
    from loraq.kernels.int1_gemv_lut import int1_gemv_lut

    w, x, A, B, b = problem("int1", dtype, M, 70, 600, r=5, lora=lora, bias=bias)
    kw = dict(rows=rows, block_n=block_n, chunk_k=64, bits=4)
    two = int1_gemv_lut(x, w.tensors(), _meta(w), A, B, 0.7, b, one_launch=False, **kw)
    for _ in range(2):
        one = int1_gemv_lut(x, w.tensors(), _meta(w), A, B, 0.7, b, one_launch=True, **kw)
        assert one.shape == (M, 70) and one.dtype == dtype and workspaces_clean()
        check(one, reference.lora_linear_ref(f64(x), w.to(torch.float64), f64(A), f64(B), 0.7, f64(b)),
              reference.lora_linear_ref(x, w, A, B, 0.7, b), f"one launch {dtype} M={M}")
    if x.device.type == "cpu":  # the interpreter adds in one order: the same sums, to the bit
        torch.testing.assert_close(one, two, rtol=0, atol=0)
    # (a GPU's fp32 atomics add in any order: there the reference check above is the test)


@needs_gather
@pytest.mark.parametrize("seed", [0, 1, 2], ids=["reversed", "shuffled1", "shuffled2"])
@pytest.mark.parametrize("M, rows", [(1, 1), (5, 2)], ids=["M1", "M5-rows2"])
def test_lut_one_launch_in_any_program_order(seed, M, rows):
    """The one-launch protocol does not rely on the order programs start in: with tile 0 last
    (which would leave an earlier protocol waiting forever on its shares) or shuffled, the
    slices' shares are stored by whichever program claims them first, every tile is finished,
    and the counters are zero for the next call."""
    from loraq.kernels.int1_gemv_lut import int1_gemv_lut

    dtype = torch.float16
    w, x, A, B, b = problem("int1", dtype, M, 70, 600, r=5)
    kw = dict(rows=rows, block_n=16, chunk_k=64, bits=4)
    ref = reference.lora_linear_ref(f64(x), w.to(torch.float64), f64(A), f64(B), 0.7, f64(b))
    low = reference.lora_linear_ref(x, w, A, B, 0.7, b)
    faulthandler.dump_traceback_later(900, exit=True)  # a protocol that waits forever fails loudly
    try:
        with interpreter_program_order(seed):
            for _ in range(2):
                y = int1_gemv_lut(x, w.tensors(), _meta(w), A, B, 0.7, b, one_launch=True, **kw)
                check(y, ref, low, f"one launch, program order {seed}, M={M}")
                assert workspaces_clean()
    finally:
        faulthandler.cancel_dump_traceback_later()


@needs_gather
def test_lut_one_launch_is_opt_in(monkeypatch):
    from loraq.kernels.splitk_finish import one_launch_offered

    monkeypatch.delenv("LORAQ_ONE_LAUNCH", raising=False)
    assert not one_launch_offered()
    monkeypatch.setenv("LORAQ_ONE_LAUNCH", "1")
    assert one_launch_offered()
    from loraq.kernels import lora_linear_fwd

    w, x, A, B, b = problem("int1", torch.float16, 2, 40, 200, r=3)
    y = lora_linear_fwd(x, "int1", w.tensors(), _meta(w), A, B, 0.5, b, config=(1, 16, 64, 4, 4, 1, 2))
    check(y, reference.lora_linear_ref(f64(x), w.to(torch.float64), f64(A), f64(B), 0.5, f64(b)),
          reference.lora_linear_ref(x, w, A, B, 0.5, b), "LORAQ_ONE_LAUNCH=1 through the launcher")
    assert workspaces_clean()


@needs_gather
@pytest.mark.parametrize("M, cfg", [(M, c) for M in (1, 3) for c in lut_configs(M)], ids=str)
def test_every_lut_config_through_the_forward_launcher(M, cfg):
    """Each LUT candidate the autotuner may pick, forced through ``lora_linear_fwd``."""
    from loraq.kernels import lora_linear_fwd

    w, x, A, B, b = problem("int1", torch.float16, M, 600, 520, r=3)
    y = lora_linear_fwd(x, "int1", w.tensors(), _meta(w), A, B, 0.5, b, config=cfg)
    check(y, reference.lora_linear_ref(f64(x), w.to(torch.float64), f64(A), f64(B), 0.5, f64(b)),
          reference.lora_linear_ref(x, w, A, B, 0.5, b), f"{cfg}")


def test_lut_refuses_what_it_cannot_do():
    from loraq.kernels.int1_gemv_lut import int1_gemv_lut, lut_supported

    w, x, *_ = problem("int1", torch.float16, 2, 16, 64, lora=False, bias=False)
    with pytest.raises(ValueError, match=r"x must be \[M, 64\]"):
        int1_gemv_lut(x[:, :63], w.tensors(), _meta(w))
    with pytest.raises(ValueError, match="rows must be ≥ 1"):
        int1_gemv_lut(x, w.tensors(), _meta(w), rows=0)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        int1_gemv_lut(x[:1], w.tensors(), _meta(w), bits=2)
    with pytest.raises(ValueError, match="power of two"):
        int1_gemv_lut(x[:1], w.tensors(), _meta(w), chunk_k=96)
    g12, x12, *_ = problem("int1_g12", torch.float16, 1, 16, 48, lora=False, bias=False)
    assert not lut_supported(_meta(g12)) and lut_supported(_meta(w))
    with pytest.raises(ValueError, match="multiple of 8"):
        int1_gemv_lut(x12, g12.tensors(), _meta(g12))
    # the same limits hold when a lookup config is forced through the forward launcher
    from loraq.kernels import lora_linear_fwd
    from loraq.kernels.autotune import LUT, LUT_M1

    with pytest.raises(ValueError, match="lookup GEMV: it takes an int1 weight whose group size"):
        lora_linear_fwd(x12, "int1", g12.tensors(), _meta(g12), config=LUT_M1[0])
    # a forced lookup config gets the checks int1_gemv_lut makes
    for cfg, why in [((0, 256, 256, 4, 4, 1, LUT), "rows must be ≥ 1"), ((1, 256, 48, 4, 4, 1, LUT), "chunk_k"),
                     ((1, 96, 256, 4, 4, 1, LUT), "block_n must be a power of two"),
                     ((1, 256, 256, 2, 4, 1, LUT), "bits must be 4 or 8")]:
        with pytest.raises(ValueError, match=why):
            lora_linear_fwd(x, "int1", w.tensors(), _meta(w), config=cfg)
    s4, xs, *_ = problem("sparse4x4", torch.float16, 1, 16, 48, lora=False, bias=False)
    with pytest.raises(ValueError, match="lookup GEMV: it takes an int1 weight"):
        lora_linear_fwd(xs, "sparse4x4", s4.tensors(), {"N": 16, "K": 48}, config=LUT_M1[0])


@needs_gather
def test_the_launcher_offers_the_lut_only_for_a_few_rows_of_int1():
    """The LUT candidates join the tuning for M ≤ 4 int1 (supported scales) under their own cache
    key, never for more rows, sparse4x4 or groups the table cannot scale."""
    from loraq.kernels import autotune, lora_linear_fwd

    with tuner_calls(lora_linear_fwd) as seen:
        for kind, M in [("int1", 1), ("int1", 5), ("int1_g12", 1), ("int1_onebit", 3), ("sparse4x4", 1), ("int1", 2)]:
            w, x, *_ = problem(kind, torch.float16, M, 16, 48, lora=False, bias=False)
            meta = _meta(w) if kind.startswith("int1") else {"N": 16, "K": 48}
            lora_linear_fwd(x, kind.split("_")[0], w.tensors(), meta)
    # sparse4x4 gets the gathering GEMV instead (tests/test_sparse4x4_gemv.py)
    assert [(c.op.endswith(":lut"), c.M, any(cfg[6] == autotune.LUT for cfg in c.candidates)) for c in seen] == [
        (True, 1, True), (False, 5, False), (False, 1, False), (True, 3, True), (False, 1, False), (True, 2, True)]


@needs_gather
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 3])
def test_gpu_every_lut_config_at_a_large_shape(dtype, M):
    from loraq.kernels import lora_linear_fwd
    from loraq.kernels.autotune import lut_configs

    w, x, A, B, b = problem("int1", dtype, M, 3000, 4100, r=16)
    ref = reference.lora_linear_ref(f64(x), w.to(torch.float64), f64(A), f64(B), 2.0, f64(b))
    low = reference.lora_linear_ref(x, w, A, B, 2.0, b)
    for cfg in lut_configs(M):
        check(lora_linear_fwd(x, "int1", w.tensors(), _meta(w), A, B, 2.0, b, config=cfg), ref, low, f"{cfg}")


@needs_gather
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M, N, K", [(1, 28672, 8192), (3, 4096, 4096), (4, 1000, 512)])
@pytest.mark.parametrize("lora", [True, False])
def test_gpu_lut_one_launch_at_large_shapes(dtype, M, N, K, lora):
    """Thousands of programs: tiles finished by whichever program arrives last, the claimed
    shares of x·Aᵀ waited for, the counters reset for the next call (ten calls, one stream, and a CUDA graph)."""
    from loraq.kernels.int1_gemv_lut import int1_gemv_lut

    w, x, A, B, b = problem("int1", dtype, M, N, K, r=16, lora=lora)
    ref = reference.lora_linear_ref(f64(x), w.to(torch.float64), f64(A), f64(B), 2.0, f64(b))
    low = reference.lora_linear_ref(x, w, A, B, 2.0, b)
    for cfg in lut_configs(M):
        kw = dict(rows=cfg[0], block_n=cfg[1], chunk_k=cfg[2], bits=cfg[3], num_warps=cfg[4], one_launch=True)
        for _ in range(10):
            y = int1_gemv_lut(x, w.tensors(), _meta(w), A, B, 2.0, b, **kw)
        check(y, ref, low, f"one launch {cfg}")
        assert workspaces_clean()
    int1_gemv_lut(x, w.tensors(), _meta(w), A, B, 2.0, b, one_launch=True)  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = int1_gemv_lut(x, w.tensors(), _meta(w), A, B, 2.0, b, one_launch=True)
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    check(y, ref, low, "one launch under graph replay")
    assert workspaces_clean()
