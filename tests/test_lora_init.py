"""loraq.lora_init: scaling validation, the randomized SVD's RNG hygiene, adapters that can train."""

import math

import pytest
import torch
from torch import nn

import loraq.lora_init as lora_init
from loraq import LoraLinear
from loraq.lora_init import init_lora, lora_scaling, truncated_svd


@pytest.mark.parametrize("alpha", [math.inf, 0, -1.0, math.nan])
def test_alpha_must_be_finite_and_positive(alpha):
    with pytest.raises(ValueError, match="alpha must be > 0 and finite"):
        lora_scaling(4, alpha)
    # alpha=inf used to build a layer with scaling inf, whose outputs were all NaN
    with pytest.raises(ValueError, match="alpha must be > 0 and finite"):
        LoraLinear.from_linear(nn.Linear(13, 9), "int1", rank=4, alpha=alpha, init="svd")


@pytest.mark.parametrize("rank", [0, -2, 1.5, True])
def test_scaling_rank_must_be_a_positive_int(rank):
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        lora_scaling(rank)


def test_randomized_svd_is_deterministic_and_reseeds_no_generator(monkeypatch):
    monkeypatch.setattr(lora_init, "_FULL_SVD_MAX_DIM", 8)  # the randomized path on a tiny matrix
    seeded = []
    # torch.manual_seed reseeds every device's generator; the CUDA one (lazily, even without a GPU)
    # was left at seed 0 after every big layer's init: runs with different seeds shared dropout masks
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(seed))
    g = torch.Generator().manual_seed(0)
    R = torch.randn(37, 41, generator=g)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    seeded.clear()
    B, A = truncated_svd(R, 3, 0.5)
    assert seeded == [] and torch.equal(torch.get_rng_state(), state)
    B2, A2 = truncated_svd(R, 3, 0.5)
    assert torch.equal(A, A2) and torch.equal(B, B2)
    S = torch.linalg.svdvals(R.double())
    got = (R.double() - 0.5 * B.double() @ A.double()).norm()
    assert got <= 1.01 * S[3:].pow(2).sum().sqrt()


@pytest.mark.parametrize("init", ["svd", "loftq"])
@pytest.mark.parametrize("case", ["one-input", "group_size-1", "zero-weight"])
def test_exact_compression_leaves_trainable_adapters(init, case):
    """int1 is exact here (W − Ŵ = 0): the SVD gave A = 0 and B = 0, whose gradients are zero forever."""
    torch.manual_seed(0)
    lin = nn.Linear(1 if case == "one-input" else 8, 6)
    opts = {"group_size": 1} if case == "group_size-1" else {}
    if case == "zero-weight":
        nn.init.zeros_(lin.weight)
    r = 1
    m = LoraLinear.from_linear(lin, "int1", rank=r, init=init, loftq_iters=2,
                               generator=torch.Generator().manual_seed(5), **opts)
    torch.testing.assert_close(m.merged_weight(), lin.weight.detach())  # the start is unchanged
    assert torch.count_nonzero(m.lora_B) == 0 and torch.count_nonzero(m.lora_A) == m.lora_A.numel()
    m(torch.randn(4, lin.in_features)).pow(2).sum().backward()
    assert m.lora_B.grad.abs().max() > 0
    again = LoraLinear.from_linear(lin, "int1", rank=r, init=init, loftq_iters=2,
                                   generator=torch.Generator().manual_seed(5), **opts)
    assert torch.equal(again.lora_A, m.lora_A)


def test_partly_exact_residual_keeps_the_best_repair():
    """sparse4x4 of a weight with one extra value outside the kept ones: W − Ŵ has rank 1, rank 3 asked."""
    W = torch.zeros(8, 12)
    W[::4, ::4] = torch.tensor([[3.0, -2.0, 4.0], [5.0, 1.5, -6.0]])  # one value per 4x4 tile: kept exactly
    W[1, 2] = 0.5  # smaller than its tile's kept value: the whole residual
    base, A, B = init_lora(W, "sparse4x4", 3, 0.5, "svd", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(base.dequantize() + 0.5 * B @ A, W)  # the best rank-3 repair is exact
    assert torch.count_nonzero(B[:, 0]) == 1 and torch.count_nonzero(B[:, 1:]) == 0
    assert bool((A.abs().sum(1) > 0).all())  # every rank-1 pair can train
