"""The int1 kernels that decode signs two at a time (variant DOT_PAIRS: the forward in pair order,
dX two rows at a time) against loraq.reference: every candidate tile, every scale mode (groups
that do not line up with the 32-bit words included), every dtype, split and unsplit reductions;
and how the launchers offer them."""

import pytest
import torch

pytest.importorskip("triton")

from loraq import reference  # noqa: E402
from loraq.kernels.autotune import (DOT_PAIRS, PAIRS_DX_MID_M, PAIRS_DX_SMALL_M, PAIRS_MAX_M,  # noqa: E402
                                    PAIRS_MID_M, PAIRS_SMALL_M, pairs_configs)
from test_triton_kernels import DEV, DTYPES, _kernel_args, check, f64, problem, tuner_calls  # noqa: E402

HALF_DTYPES = [torch.float16, torch.bfloat16]

INT1_KINDS = ["int1", "int1_g16", "int1_g12", "int1_g64", "int1_onebit"]  # g64: the forward's scale in the decode


def run_pairs(kind, dtype, M, N, K, cfg, lora=True, bias=True, scaling=0.5):
    from loraq.kernels import lora_linear_fwd

    w, x, A, B, b = problem(kind, dtype, M, N, K, r=5, lora=lora, bias=bias)
    tensors, meta = _kernel_args(w)
    y = lora_linear_fwd(x, "int1", tensors, meta, A, B, scaling, b, config=cfg)
    assert y.shape == (M, N) and y.dtype == dtype
    check(y, reference.lora_linear_ref(f64(x), w.to(torch.float64), f64(A), f64(B), scaling, f64(b)),
          reference.lora_linear_ref(x, w, A, B, scaling, b), f"pairs {kind} {dtype} M={M} {cfg}")


def run_pairs_dx(kind, dtype, M, N, K, cfg, lora=True, scaling=0.5):
    from loraq.kernels import lora_linear_dx

    w, _, A, B, _ = problem(kind, dtype, M, N, K, r=5, lora=lora, bias=False)
    tensors, meta = _kernel_args(w)
    dy = torch.randn(M, N, dtype=dtype, device=DEV)
    dyB = dy @ B if lora else None
    dx = lora_linear_dx(dy, "int1", tensors, meta, A, dyB, scaling, config=cfg)
    assert dx.shape == (M, K) and dx.dtype == dtype
    check(dx, reference.lora_linear_dx_ref(dy.double(), w.to(torch.float64), f64(A), f64(dyB), scaling),
          reference.lora_linear_dx_ref(dy, w, A, dyB, scaling), f"pairs dx {kind} {dtype} M={M} {cfg}")


@pytest.mark.parametrize("kind", INT1_KINDS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("cfg", PAIRS_SMALL_M + PAIRS_MID_M, ids=str)
def test_every_pairs_config_matches_reference(kind, dtype, cfg):
    """Odd N and K (a partial last word and tile), M not a multiple of the tile's rows; K = 300
    splits into up to 3 slices of 128 (the split configs' workspace and finish). In the dtypes the
    launcher offers these configs for: fp32's x tiles overflow an H100's shared memory at 3 stages
    (fp32 through the pair decode is covered with small tiles below)."""
    M = 3 if cfg[0] == 16 else 40
    run_pairs(kind, dtype, M, 37, 300, cfg)


@pytest.mark.parametrize("kind", INT1_KINDS)
@pytest.mark.parametrize("split", [1, 3])
def test_pairs_fp32_in_every_scale_mode(kind, split):
    """fp32 (decoded as fp32, not in pairs of halves) in each scale mode, with tiles small enough for
    any GPU's shared memory."""
    run_pairs(kind, torch.float32, 5, 37, 300, (16, 32, 64, split, 4, 2, DOT_PAIRS))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 3, 17, 70])
@pytest.mark.parametrize("lora_bias", [(True, True), (False, False), (True, False), (False, True)],
                         ids=["lora+bias", "plain", "lora", "bias"])
@pytest.mark.parametrize("split", [1, 4])
def test_pairs_with_and_without_lora_and_bias(dtype, M, lora_bias, split):
    """Small tiles, so that several programs share the rows, the columns and (split) the reduction."""
    run_pairs("int1_g12", dtype, M, 45, 200, (16, 32, 64, split, 4, 1, DOT_PAIRS), *lora_bias)


@pytest.mark.parametrize("kind", INT1_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", PAIRS_DX_SMALL_M + PAIRS_DX_MID_M, ids=str)
def test_every_pairs_dx_config_matches_reference(kind, dtype, cfg):
    """dX: an odd N (the reduction: a last row pair half past N) and K (a partial last word)."""
    M = 3 if cfg[0] == 16 else 40
    run_pairs_dx(kind, dtype, M, 301, 37, cfg)


@pytest.mark.parametrize("kind", ["int1", "int1_g12", "int1_onebit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 17, 70])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "plain"])
@pytest.mark.parametrize("split", [1, 4])
@pytest.mark.parametrize("stages", [1, 2], ids=["loads in turn", "prefetch"])
def test_pairs_dx_with_and_without_lora(kind, dtype, M, lora, split, stages):
    """Small tiles: several programs along K and M, and (split) along the reduction; with stages 2
    each tile's loads are issued one tile ahead (the last split's last prefetch falls past N)."""
    run_pairs_dx(kind, dtype, M, 151, 45, (16, 32, 32, split, 4, stages, DOT_PAIRS), lora)


def test_pairs_dx_scales_each_row_pair_with_its_own_alpha():
    """Per-row α in the decode (its bits in place of 1.0): rows with very different, and negative,
    scales; one weight at a time through an identity dY."""
    from loraq.formats import Int1Weight
    from loraq.kernels import lora_linear_dx

    N, K = 32, 40
    W = torch.randn(N, K)
    w = Int1Weight.from_dense(W).to(DEV)
    w.scale.copy_(torch.linspace(-3.0, 5.0, N).unsqueeze(1))
    tensors, meta = _kernel_args(w)
    dy = torch.eye(N, dtype=torch.float32, device=DEV)  # dY·Ŵ = Ŵ
    dx = lora_linear_dx(dy, "int1", tensors, meta, config=(16, 32, 32, 1, 4, 1, DOT_PAIRS))
    assert torch.equal(dx.cpu(), w.dequantize().float().cpu())


def test_pairs_order_is_a_permutation_of_each_word():
    """The decode's columns: column 32i + 2q + e of a tile is bit q + 16e of word i, on a pattern
    with one bit set (so a wrong position cannot cancel out)."""
    from loraq.formats import Int1Weight
    from loraq.kernels import lora_linear_fwd

    K, N = 64, 16
    W = -torch.ones(N, K)
    for n in range(N):
        W[n, (7 * n + 3) % K] = 1.0
    w = Int1Weight.from_dense(W).to(DEV)
    tensors, meta = _kernel_args(w)
    x = torch.eye(K, dtype=torch.float32, device=DEV)  # x·Ŵᵀ = Ŵᵀ: every weight on its own
    y = lora_linear_fwd(x, "int1", tensors, meta, config=(16, 16, 64, 1, 4, 1, DOT_PAIRS))
    assert torch.equal(y.cpu(), w.dequantize().float().t().cpu())


def test_pairs_refuses_a_sparse_weight_and_changes_nothing():
    from loraq.kernels import lora_linear_dx, lora_linear_fwd

    w, x, A, B, b = problem("sparse4x4", torch.float16, 3, 16, 64)
    tensors, meta = _kernel_args(w)
    before = {k: v.clone() for k, v in tensors.items()}
    with pytest.raises(ValueError, match="pair order: it takes an int1 weight"):
        lora_linear_fwd(x, "sparse4x4", tensors, meta, A, B, 0.5, b, config=PAIRS_SMALL_M[0])
    dy = torch.randn(3, 16, dtype=torch.float16, device=DEV)
    with pytest.raises(ValueError, match="pair order: it takes an int1 weight"):
        lora_linear_dx(dy, "sparse4x4", tensors, meta, A, dy @ B, 0.5, config=PAIRS_DX_SMALL_M[0])
    assert all(torch.equal(before[k], tensors[k]) for k in tensors)


def test_pairs_configs_cover_small_and_middle_batches_only():
    assert pairs_configs(1) == pairs_configs(16) == PAIRS_SMALL_M
    assert pairs_configs(17) == pairs_configs(PAIRS_MAX_M) == PAIRS_MID_M
    assert pairs_configs(1, "dx") == PAIRS_DX_SMALL_M and pairs_configs(PAIRS_MAX_M, "dx") == PAIRS_DX_MID_M
    assert pairs_configs(PAIRS_MAX_M + 1) == pairs_configs(PAIRS_MAX_M + 1, "dx") == []
    assert all(c[6] == DOT_PAIRS for c in PAIRS_SMALL_M + PAIRS_MID_M + PAIRS_DX_SMALL_M + PAIRS_DX_MID_M)
    with pytest.raises(ValueError, match="'fwd' or 'dx'"):
        pairs_configs(4, "bwd")


def test_the_launcher_offers_pairs_for_16_bit_int1_only():
    """fp16 and bf16 int1 up to PAIRS_MAX_M rows (next to the LUT for a few rows and the dense
    slabs past 32); never fp32, sparse4x4 or more rows."""
    import loraq.kernels as kernels

    cases = [("int1", torch.float16, 1), ("int1_onebit", torch.bfloat16, 3), ("int1", torch.float16, 16),
             ("int1_g16", torch.float16, 40), ("int1", torch.float32, 3), ("sparse4x4", torch.float16, 3),
             ("int1", torch.bfloat16, PAIRS_MAX_M + 1)]
    with tuner_calls(kernels.lora_linear_fwd) as seen:
        for kind, dtype, M in cases:
            w, x, *_ = problem(kind, dtype, M, 16, 48, lora=False, bias=False)
            tensors, meta = _kernel_args(w)
            kernels.lora_linear_fwd(x, kind.split("_")[0], tensors, meta)
    assert [[c for c in call.candidates if c[6] == DOT_PAIRS] for call in seen] == [PAIRS_SMALL_M, PAIRS_SMALL_M, PAIRS_SMALL_M, PAIRS_MID_M, [], [], []]


def test_the_dx_launcher_offers_pairs_for_16_bit_int1_only():
    import loraq.kernels as kernels

    cases = [("int1", torch.float16, 1), ("int1_onebit", torch.bfloat16, 40), ("int1", torch.float32, 3),
             ("sparse4x4", torch.float16, 20), ("int1", torch.float16, PAIRS_MAX_M + 1)]
    with tuner_calls(kernels.lora_linear_dx) as calls:
        for kind, dtype, M in cases:
            w, *_ = problem(kind, dtype, M, 16, 48, lora=False, bias=False)
            tensors, meta = _kernel_args(w)
            kernels.lora_linear_dx(torch.randn(M, 16, dtype=dtype, device=DEV), kind.split("_")[0], tensors, meta)
    seen = [[c for c in call.candidates if c[6] == DOT_PAIRS] for call in calls]
    assert seen == [PAIRS_DX_SMALL_M, PAIRS_DX_MID_M, [], [], []]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", INT1_KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", PAIRS_SMALL_M + PAIRS_MID_M, ids=str)
def test_gpu_every_pairs_config_at_a_large_shape(kind, dtype, cfg):
    """Compiled for the GPU (inline layouts, the LOP3 constant as a register): odd sizes past
    several tiles and splits."""
    M = 13 if cfg[0] == 16 else 100
    run_pairs(kind, dtype, M, 4096 + 40, 2048 + 72, cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", INT1_KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", PAIRS_DX_SMALL_M + PAIRS_DX_MID_M, ids=str)
def test_gpu_every_pairs_dx_config_at_a_large_shape(kind, dtype, cfg):
    M = 13 if cfg[0] == 16 else 100
    run_pairs_dx(kind, dtype, M, 4096 + 42, 2048 + 40, cfg)
