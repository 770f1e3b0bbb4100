"""The dense-slab path of large batches (kernels/dense_slab.py) against loraq.reference: the slab
decode element by element, the forward and dX a slab at a time with the LoRA path and bias placed
each way, every gradient through a layer, and the candidates the launchers pass to the autotuner."""

import sys

import pytest
import torch

pytest.importorskip("triton")

from loraq import reference  # noqa: E402
from loraq.autograd import LoraLinearFunction  # noqa: E402
from loraq.kernels.autotune import DENSE_SLAB, SLAB_MERGE, SLAB_OUTPUT_FIRST, SLAB_WIDEN  # noqa: E402
from test_triton_kernels import (DEV, DTYPES, FORMATS, _kernel_args, check, f64,  # noqa: E402
                                 problem, tuner_calls)


def _fmt(kind):
    return kind.split("_")[0]


def _bits_close(out, ref):
    """Equal, except that the Triton interpreter truncates fp32 → bf16 where a GPU rounds: onebit's
    ``h·g`` in bf16 may then be one unit in the last place off."""
    if torch.equal(out, ref):
        return True
    return out.dtype == torch.bfloat16 and bool(((out.float() - ref.float()).abs() <= ref.float().abs() / 64).all())


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_slab_writes_the_weight_and_the_lora_strip(kind, dtype):
    """A slab inside the weight, cut at odd edges, both strips (forward: ``s·B`` right of it; dX:
    ``s·A`` below it) and their zero padding; nothing outside ``out``'s slab and strip is written."""
    from loraq.kernels.decode import weight_args
    from loraq.kernels.dense_slab import decode_slab

    N, K = 70, 150
    w, *_ = problem(kind, dtype, 1, N, K, lora=False, bias=False)
    tensors, meta = _kernel_args(w)
    ptrs, ints, mode = weight_args(_fmt(kind), tensors, meta)
    W = reference.dequantize_ref(w, dtype)
    B = torch.randn(N, 5, dtype=dtype, device=DEV)
    A = torch.randn(5, K, dtype=dtype, device=DEV)

    # forward: rows 32..67 (the edge of a tile of 8), columns 32..127, strip of s·B, the bias, 5 zeros
    bias = torch.randn(N, dtype=dtype, device=DEV)
    room = torch.full((36, 120), float("nan"), dtype=dtype, device=DEV)
    out = room[:, :107]
    decode_slab(out, _fmt(kind), ptrs, ints, mode, N, K, 32, 32, 36, 96, B, 0.5, True, bias, (8, 32), 4)
    assert _bits_close(out[:, :96], W[32:68, 32:128])
    assert torch.equal(out[:, 96:101], (0.5 * B[32:68].float()).to(dtype))
    assert torch.equal(out[:, 101], bias[32:68])
    assert not out[:, 102:].any() and room[:, 107:].isnan().all()
    # without LoRA: the bias first, then zeros
    out = room[:, :104]
    decode_slab(out, _fmt(kind), ptrs, ints, mode, N, K, 32, 32, 36, 96, None, 0.5, True, bias, (8, 32), 4)
    assert torch.equal(out[:, 96], bias[32:68]) and not out[:, 97:].any()

    # dX: all rows, columns 128..149 (past K's last whole word), strip of 5 + 5 zeros
    room = torch.full((N + 10, 40), float("nan"), dtype=dtype, device=DEV)
    out = room[:, :22]
    decode_slab(out, _fmt(kind), ptrs, ints, mode, N, K, 0, 128, N, 22, A, 0.5, False, None, (16, 32), 4)
    assert _bits_close(out[:N], W[:, 128:150])
    assert torch.equal(out[N:N + 5], (0.5 * A[:, 128:].float()).to(dtype))
    assert not out[N + 5:].any() and room[:, 22:].isnan().all()


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [5, 16, 37])
def test_decode_slab_merges_the_lora_product_rounded_once(kind, dtype, r):
    """``merge``: ``Ŵ + s·B·A`` for a slab cut at odd edges, summed in fp32 and rounded once: at
    most half a unit in the last place of the dtype from the float64 value, plus fp32's own
    rounding of the terms (ranks within one dot block, past one and past two); nothing outside the
    slab is written."""
    from loraq.kernels.decode import weight_args
    from loraq.kernels.dense_slab import decode_slab

    N, K = 70, 150
    w, *_ = problem(kind, dtype, 1, N, K, lora=False, bias=False)
    ptrs, ints, mode = weight_args(_fmt(kind), *_kernel_args(w))
    A = torch.randn(r, K, dtype=dtype, device=DEV) / r**0.5
    B = torch.randn(N, r, dtype=dtype, device=DEV)
    W = reference.dequantize_ref(w, torch.float64)
    want = W + 0.3 * B.double() @ A.double()
    terms = W.abs() + 0.3 * B.double().abs() @ A.double().abs()
    bound = 0.5 * torch.finfo(dtype).eps * want.abs() + 4 * torch.finfo(torch.float32).eps * terms
    for n0, k0, rows, cols in [(32, 32, 36, 96), (0, 128, N, 22)]:
        room = torch.full((rows, cols + 9), float("nan"), dtype=dtype, device=DEV)
        out = room[:, :cols]
        decode_slab(out, _fmt(kind), ptrs, ints, mode, N, K, n0, k0, rows, cols, scaling=0.3, block=(16, 32),
                    merge=(A, B))
        err = (out.double() - want[n0:n0 + rows, k0:k0 + cols]).abs()
        assert bool((err <= bound[n0:n0 + rows, k0:k0 + cols]).all()), f"{(err / bound[n0:n0 + rows, k0:k0 + cols]).max()}"
        assert room[:, cols:].isnan().all()


def test_decode_slab_refuses_a_merge_with_a_strip_or_a_thin_tile():
    from loraq.kernels.decode import weight_args
    from loraq.kernels.dense_slab import decode_slab

    w, *_ = problem("int1", torch.float16, 1, 16, 64, lora=False, bias=False)
    ptrs, ints, mode = weight_args("int1", *_kernel_args(w))
    A = torch.randn(3, 64, dtype=torch.float16, device=DEV)
    B = torch.randn(16, 3, dtype=torch.float16, device=DEV)
    out = torch.zeros(16, 40, dtype=torch.float16, device=DEV)
    with pytest.raises(ValueError, match="no strip"):
        decode_slab(out, "int1", ptrs, ints, mode, 16, 64, 0, 0, 16, 32, block=(16, 32), merge=(A, B))
    with pytest.raises(ValueError, match="no strip"):
        decode_slab(out[:, :32], "int1", ptrs, ints, mode, 16, 64, 0, 0, 16, 32, B, block=(16, 32), merge=(A, B))
    with pytest.raises(ValueError, match="at least 16"):
        decode_slab(out[:, :32], "int1", ptrs, ints, mode, 16, 64, 0, 0, 16, 32, block=(8, 32), merge=(A, B))
    with pytest.raises(ValueError, match="merge takes A"):
        decode_slab(out[:, :32], "int1", ptrs, ints, mode, 16, 64, 0, 0, 16, 32, block=(16, 32), merge=(A, B[:8]))
    with pytest.raises(ValueError, match="merge takes A"):
        decode_slab(out[:, :32], "int1", ptrs, ints, mode, 16, 64, 0, 0, 16, 32, block=(16, 32),
                    merge=(A.float(), B))
    assert not out.any()


def test_decode_slab_refuses_unaligned_slabs_and_a_short_strip():
    from loraq.kernels.decode import weight_args
    from loraq.kernels.dense_slab import decode_slab

    w, *_ = problem("int1", torch.float16, 1, 16, 64, lora=False, bias=False)
    ptrs, ints, mode = weight_args("int1", *_kernel_args(w))
    out = torch.zeros(8, 40, dtype=torch.float16, device=DEV)
    with pytest.raises(ValueError, match="multiple of 4 rows and 32 columns"):
        decode_slab(out, "int1", ptrs, ints, mode, 16, 64, 2, 0, 8, 32)
    with pytest.raises(ValueError, match="multiple of 4 rows and 32 columns"):
        decode_slab(out, "int1", ptrs, ints, mode, 16, 64, 0, 16, 8, 32)
    B = torch.randn(16, 8, dtype=torch.float16, device=DEV)
    with pytest.raises(ValueError, match="8 columns past the slab, fewer than the 9"):
        decode_slab(out, "int1", ptrs, ints, mode, 16, 64, 0, 0, 8, 32, B, bias=B[:, 0])
    with pytest.raises(ValueError, match="a bias goes in the forward's strip"):
        decode_slab(out, "int1", ptrs, ints, mode, 16, 64, 0, 0, 8, 32, lora_cols=False, bias=B[:, 0])
    assert not out.any()


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M, r, lora, bias", [(3, 5, True, True), (70, 2, True, False), (17, 16, False, True),
                                              (5, 16, False, False)])
@pytest.mark.parametrize("N, K", [(97, 150), (150, 94)])
@pytest.mark.parametrize("placement", [SLAB_WIDEN, SLAB_OUTPUT_FIRST, SLAB_MERGE])
def test_forward_and_dx_through_slabs_match_reference(kind, dtype, M, r, lora, bias, N, K, placement):
    """Several slabs (the last one short), with and without LoRA and bias, each placement of the
    LoRA path. Widened, x is K plus the rank plus the bias column (100 padded to 104, 96 a
    multiple of 8 already, 95 padded to 96; 151 to 152...) and dY is N plus the rank; output first,
    the LoRA path and bias are written into the output and each slab's matmul adds to it; merged,
    each slab is ``Ŵ + s·B·A`` and the bias rides in its matmul. One slab buffer for the first
    shape, two (taken in turn) for the second."""
    from loraq.kernels import lora_linear_dx, lora_linear_fwd

    w, x, A, B, b = problem(kind, dtype, M, N, K, r=r, lora=lora, bias=bias)
    tensors, meta = _kernel_args(w)
    buffers = 1 if N < K else 2
    cfg = (8 if placement != SLAB_MERGE else 16, 32, 32, placement, 4, buffers, DENSE_SLAB)
    y = lora_linear_fwd(x, _fmt(kind), tensors, meta, A, B, 0.5, b, config=cfg)
    assert y.shape == (M, N) and y.dtype == dtype
    check(y, reference.lora_linear_ref(f64(x), w.to(torch.float64), f64(A), f64(B), 0.5, f64(b)),
          reference.lora_linear_ref(x, w, A, B, 0.5, b), f"fwd {kind}")
    dy = torch.randn(M, N, dtype=dtype, device=DEV)
    dyB = dy @ B if lora else None
    dx = lora_linear_dx(dy, _fmt(kind), tensors, meta, A, dyB, 0.5,
                        config=(16, 64, 64, placement, 4, buffers, DENSE_SLAB), lora_B=B if lora else None)
    assert dx.shape == (M, K) and dx.dtype == dtype
    check(dx, reference.lora_linear_dx_ref(dy.double(), w.to(torch.float64), f64(A), f64(dyB), 0.5),
          reference.lora_linear_dx_ref(dy, w, A, dyB, 0.5), f"dx {kind}")


@pytest.mark.parametrize("kind", ["int1_onebit", "sparse4x4"])
@pytest.mark.parametrize("N, K, placement", [(45, 70, SLAB_WIDEN), (70, 45, SLAB_OUTPUT_FIRST), (45, 70, SLAB_MERGE)])
def test_every_gradient_through_the_slab_path(kind, N, K, placement, monkeypatch):
    """A layer's forward and backward with the autotuner answering the dense slab for both kernels
    (each placement of the LoRA path): output, dX, dA, dB and the bias gradient against the
    float64 reference."""
    from loraq.kernels import lora_linear_dx, lora_linear_fwd

    chosen = []

    def slab(op, M, N, K, dtype, device, run, bench=None, extra=None, variant=(), check=None):
        chosen.append(op)
        return (16, 32, 64, placement, 4, 1, DENSE_SLAB)

    for launcher in (lora_linear_fwd, lora_linear_dx):
        monkeypatch.setattr(sys.modules[launcher.__module__], "pick_config", slab)
    M, dtype = 300, torch.float16
    w, x, A, B, b = problem(kind, dtype, M, N, K, r=4)
    x, A, B, b = (t.clone().requires_grad_() for t in (x, A, B, b))
    y = LoraLinearFunction.apply(x, None, A, B, b, w, 0.5, "triton")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, A, B, b), dy)
    x64, A64, B64, b64 = (t.detach().double().requires_grad_() for t in (x, A, B, b))
    y64 = reference.lora_linear_ref(x64, w.to(torch.float64), A64, B64, 0.5, b64)
    grads64 = torch.autograd.grad(y64, (x64, A64, B64, b64), dy.double())
    xl, Al, Bl, bl = (t.detach().requires_grad_() for t in (x, A, B, b))
    yl = reference.lora_linear_ref(xl, w, Al, Bl, 0.5, bl)
    gradsl = torch.autograd.grad(yl, (xl, Al, Bl, bl), dy)
    check(y.detach(), y64.detach(), yl.detach(), "y")
    for name, g, g64, gl in zip("x A B b".split(), grads, grads64, gradsl):
        check(g, g64, gl, f"d{name}")
    assert any(op.startswith("lora_linear_fwd") for op in chosen)
    assert any(op.startswith("lora_linear_dx") for op in chosen)


def test_dense_slab_configs_fit_the_buffer_in_equal_slabs_and_start_past_32_rows(monkeypatch):
    from loraq.kernels.autotune import DENSE_SLAB_MIB, dense_slab_configs

    monkeypatch.delenv("LORAQ_DENSE_SLAB_MIB", raising=False)
    widths = {SLAB_WIDEN: 8208, SLAB_OUTPUT_FIRST: 8192}
    assert dense_slab_configs(32, 28672, widths, 2) == []
    configs = dense_slab_configs(33, 28672, widths, 2)
    # every size and placement, each with one buffer and two (28672 rows never fit one slab)
    assert [(c[3], c[5]) for c in configs] == [(p, b) for _ in DENSE_SLAB_MIB for p in widths for b in (1, 2)]
    assert all(c[6] == DENSE_SLAB for c in configs)
    for (_, _, length, placement, _, buffers, _), mib in zip(configs, [m for m in DENSE_SLAB_MIB for _ in range(4)]):
        width, room = widths[placement], (mib << 20) // buffers
        slabs = -(-28672 // length)
        assert length % 256 == 0 and length * width * 2 <= room  # all the buffers fit the size
        assert (slabs - 1) * width * 2 * -(-28672 // (slabs - 1) // 256) * 256 > room if slabs > 1 else True
        assert (length - 256) * slabs < 28672  # as equal as whole 256s allow: no shorter length covers it
    # 128 MiB of 8208-wide rows: 7936 rows fit, so four slabs of 7168 (not 7936 x3 + 4864); two
    # buffers of 64 MiB: 3968 rows fit, so eight slabs of 3584
    assert [c[2] for c in configs[4:6]] == [7168, 3584]
    # a small weight fits one slab at either size: one candidate a placement, N rounded up to 256
    assert [c[2:4] + c[5:6] for c in dense_slab_configs(4096, 1000, {SLAB_WIDEN: 520, SLAB_OUTPUT_FIRST: 512}, 2)] \
        == [(1024, SLAB_WIDEN, 1), (1024, SLAB_OUTPUT_FIRST, 1)]
    # 4096 x 4096 in fp16 is 32 MiB: one slab in one buffer, or two slabs of 2048 in two of 16 MiB
    assert [c[2:4] + c[5:6] for c in dense_slab_configs(4096, 4096, {SLAB_MERGE: 4096}, 2)] == \
        [(4096, SLAB_MERGE, 1), (2048, SLAB_MERGE, 2)]
    # nothing to place: one placement
    assert [c[3] for c in dense_slab_configs(4096, 1000, {SLAB_OUTPUT_FIRST: 512}, 2)] == [SLAB_OUTPUT_FIRST]
    # a very wide one still gets 256 rows a slab
    assert {c[2] for c in dense_slab_configs(4096, 4096, {SLAB_WIDEN: 1 << 20}, 4)} == {256}
    monkeypatch.setenv("LORAQ_DENSE_SLAB_MIB", "16")
    fits = [(16 << 20) // buffers // (8208 * 2) // 256 * 256 for buffers in (1, 2)]
    assert [c[2] for c in dense_slab_configs(4096, 28672, {SLAB_WIDEN: 8208}, 2)] == \
        [-(-28672 // (-(-28672 // fit) * 256)) * 256 for fit in fits]
    monkeypatch.setenv("LORAQ_DENSE_SLAB_MIB", "0")
    assert dense_slab_configs(4096, 28672, widths, 2) == []
    for bad in ("lots", "-1"):
        monkeypatch.setenv("LORAQ_DENSE_SLAB_MIB", bad)
        with pytest.raises(ValueError, match="LORAQ_DENSE_SLAB_MIB"):
            dense_slab_configs(4096, 28672, widths, 2)


@pytest.mark.parametrize("launcher_name", ["lora_linear_fwd", "lora_linear_dx"])
def test_launchers_offer_the_slabs_past_32_rows_only(launcher_name):
    """Every placement; widened, the width counts the rank, the bias and the padding: K + r + 1
    rounded up to 8 (forward), N + r (dX). dX offers the merged slab only when given ``lora_B``."""
    import loraq.kernels as kernels
    from loraq.kernels.autotune import dense_slab_configs, pairs_configs

    launcher = getattr(kernels, launcher_name)
    N, K, r = 20, 50, 3
    with tuner_calls(launcher) as calls:
        for M in (32, 33):
            w, x, A, B, b = problem("int1", torch.float16, M, N, K, r=r)
            tensors, meta = _kernel_args(w)
            if launcher_name == "lora_linear_fwd":
                launcher(x, "int1", tensors, meta, A, B, 0.5, b)
            else:
                dy = torch.randn(M, N, dtype=torch.float16, device=DEV)
                launcher(dy, "int1", tensors, meta, A, dy @ B, 0.5)
                launcher(dy, "int1", tensors, meta, A, dy @ B, 0.5, lora_B=B)
    seen = [(c.M, c.candidates) for c in calls]
    ops_seen = [c.op for c in calls]
    if launcher_name == "lora_linear_fwd":  # after int1's pair-order tiles (tests/test_int1_pairs.py)
        want = dense_slab_configs(33, N, {SLAB_WIDEN: 56, SLAB_OUTPUT_FIRST: 50, SLAB_MERGE: 50}, 2)
        assert seen == [(32, pairs_configs(32)), (33, pairs_configs(33) + want)] and want
    else:
        want = dense_slab_configs(33, K, {SLAB_WIDEN: 24, SLAB_OUTPUT_FIRST: 20}, 2)
        merged = dense_slab_configs(33, K, {SLAB_WIDEN: 24, SLAB_OUTPUT_FIRST: 20, SLAB_MERGE: 20}, 2)
        p32, p33 = pairs_configs(32, "dx"), pairs_configs(33, "dx")
        assert seen == [(32, p32), (32, p32), (33, p33 + want), (33, p33 + merged)] and want and len(merged) > len(want)
        # tuned under keys of their own: a merged winner (which needs B) is never picked for a call without B
        assert ops_seen[2] != ops_seen[3] and ops_seen[3].endswith(":B") and ops_seen[3].startswith(ops_seen[2])


def test_a_bad_slab_config_is_refused():
    from loraq.kernels import lora_linear_dx, lora_linear_fwd

    w, x, *_ = problem("sparse4x4", torch.float16, 3, 16, 64, lora=False, bias=False)
    tensors, meta = _kernel_args(w)
    for bad, match in [((6, 32, 32, 1, 4, 1, DENSE_SLAB), "decode tile"), ((8, 16, 32, 1, 4, 1, DENSE_SLAB), "decode tile"),
                       ((8, 32, 40, 1, 4, 1, DENSE_SLAB), "slab length"), ((8, 32, 32, 1, 3, 1, DENSE_SLAB), "num_warps"),
                       ((8, 32, 32, 4, 4, 1, DENSE_SLAB), "places the LoRA path"),
                       ((8, 32, 32, SLAB_MERGE, 4, 1, DENSE_SLAB), "at least 16 rows"),
                       ((8, 32, 32, 1, 4, 3, DENSE_SLAB), "number of slab buffers")]:
        with pytest.raises(ValueError, match=match):
            lora_linear_fwd(x, "sparse4x4", tensors, meta, config=bad)
        with pytest.raises(ValueError, match=match):
            lora_linear_dx(torch.randn(3, 16, dtype=torch.float16, device=DEV), "sparse4x4", tensors, meta, config=bad)
    A = torch.randn(2, 64, dtype=torch.float16, device=DEV)
    dy = torch.randn(3, 16, dtype=torch.float16, device=DEV)
    with pytest.raises(ValueError, match="pass lora_B"):  # merging s·B·A into dX's slab needs B
        lora_linear_dx(dy, "sparse4x4", tensors, meta, A, dy[:, :2], 0.5, config=(16, 32, 32, SLAB_MERGE, 4, 1, DENSE_SLAB))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_slab_path_at_a_large_shape(kind, dtype):
    """Every tuned slab candidate, several slabs, at 1024 rows, in one buffer and two; and a CUDA
    graph replays each placement (the side stream's decodes and their events captured)."""
    from loraq.kernels import lora_linear_dx, lora_linear_fwd
    from loraq.kernels.autotune import dense_slab_configs

    M, N, K, r = 1024, 3001, 4099, 16
    w, x, A, B, b = problem(kind, dtype, M, N, K, r=r)
    tensors, meta = _kernel_args(w)
    ref = reference.lora_linear_ref(f64(x), w.to(torch.float64), f64(A), f64(B), 2.0, f64(b))
    low = reference.lora_linear_ref(x, w, A, B, 2.0, b)
    dy = torch.randn(M, N, dtype=dtype, device=DEV)
    dyB = dy @ B
    dref = reference.lora_linear_dx_ref(dy.double(), w.to(torch.float64), f64(A), f64(dyB), 2.0)
    dlow = reference.lora_linear_dx_ref(dy, w, A, dyB, 2.0)
    for cfg in dense_slab_configs(M, N, {SLAB_WIDEN: K + 21, SLAB_OUTPUT_FIRST: K, SLAB_MERGE: K}, 2) + \
            [(32, 256, 512, p, 4, n, DENSE_SLAB) for p in (SLAB_WIDEN, SLAB_OUTPUT_FIRST, SLAB_MERGE) for n in (1, 2)]:
        check(lora_linear_fwd(x, _fmt(kind), tensors, meta, A, B, 2.0, b, config=cfg), ref, low, f"fwd {cfg}")
        check(lora_linear_dx(dy, _fmt(kind), tensors, meta, A, dyB, 2.0, config=cfg, lora_B=B), dref, dlow, f"dx {cfg}")
    for placement, buffers in [(SLAB_WIDEN, 1), (SLAB_OUTPUT_FIRST, 2), (SLAB_MERGE, 1), (SLAB_MERGE, 2)]:
        cfg = (32, 256, 512, placement, 4, buffers, DENSE_SLAB)
        lora_linear_fwd(x, _fmt(kind), tensors, meta, A, B, 2.0, b, config=cfg)  # compiled before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = lora_linear_fwd(x, _fmt(kind), tensors, meta, A, B, 2.0, b, config=cfg)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        check(y, reference.lora_linear_ref(f64(x), w.to(torch.float64), f64(A), f64(B), 2.0, f64(b)),
              reference.lora_linear_ref(x, w, A, B, 2.0, b), f"graph replay {cfg}")


class _Recorder:
    """Fake CUDA streams and events that log what ``_pipeline`` queues, so the order it sets up
    between the decode stream and the matmul stream can be checked without a GPU."""

    def __init__(self):
        self.log = []  # (stream, what, detail), in the order the host queues them
        self.main = self.Stream("main")
        self.current = self.main

    def Stream(self, name="side"):  # noqa: N802 (torch.cuda.Stream)
        rec = self

        class S:
            def __init__(self):
                self.name = name

            def wait_stream(self, other):
                rec.log.append((self.name, "wait_stream", other.name))

            def wait_event(self, ev):
                rec.log.append((self.name, "wait_event", ev.id))

        return S()

    def Event(self):  # noqa: N802 (torch.cuda.Event)
        rec = self

        class E:
            def __init__(self):
                self.id = len([e for e in rec.log if e[1] == "record"]) + id(self)

            def record(self, stream):
                rec.log.append((stream.name, "record", self.id))

        return E()

    def stream(self, s):
        rec = self

        class Ctx:
            def __enter__(self):
                self.before, rec.current = rec.current, s

            def __exit__(self, *exc):
                rec.current = self.before

        return Ctx()

    def happens_before(self):
        """``before(a, b)``: whether queued op ``a`` must finish before ``b`` starts (stream order,
        events, stream waits), by reachability over the log."""
        edges = {i: set() for i in range(len(self.log))}
        last = {}  # stream -> its last op
        recorded = {}
        for i, (stream, what, detail) in enumerate(self.log):
            if stream in last:
                edges[last[stream]].add(i)
            if what == "record":
                recorded[detail] = i
            elif what == "wait_event":
                edges[recorded[detail]].add(i)
            elif what == "wait_stream" and detail in last:
                edges[last[detail]].add(i)
            last[stream] = i

        def before(a, b):
            seen, todo = set(), [a]
            while todo:
                n = todo.pop()
                if n == b:
                    return True
                for m in edges[n] - seen:
                    seen.add(m)
                    todo.append(m)
            return False

        return before


@pytest.mark.parametrize("with_prologue", [True, False], ids=["prologue", "none"])
@pytest.mark.parametrize("buffers, slabs", [(1, 1), (1, 4), (2, 2), (2, 5)])
def test_pipeline_orders_each_decode_after_the_matmul_that_read_its_buffer(buffers, slabs, with_prologue,
                                                                          monkeypatch):
    """The CUDA path of ``_pipeline`` with streams and events faked: every slab's matmul waits for
    its decode; a decode into a buffer waits for the matmul that last read it; the prologue runs
    on the current stream; and the current stream ends after everything on the side stream.
    With one buffer and no prologue (a merged slab) nothing can overlap: no side stream at all."""
    import loraq.kernels.dense_slab as ds

    rec = _Recorder()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: rec.main)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: rec.Stream("side"))
    monkeypatch.setattr(torch.cuda, "Event", rec.Event)
    monkeypatch.setattr(torch.cuda, "stream", rec.stream)
    monkeypatch.setattr(ds, "_SIDE_STREAMS", {})

    def decode(start, buf):
        rec.log.append((rec.current.name, "decode", (start, buf)))
        return start

    def multiply(start, w, before):
        assert w == start and before == ("prologue's" if with_prologue else None)
        rec.log.append((rec.current.name, "multiply", start))

    def prologue():
        rec.log.append((rec.current.name, "prologue", None))
        return "prologue's"

    starts = range(0, 10 * slabs, 10)
    ds._pipeline(starts, decode, multiply, prologue if with_prologue else None, buffers, torch.device("cuda"))
    if not with_prologue and buffers == 1:
        assert rec.log == [e for s in starts for e in (("main", "decode", (s, 0)), ("main", "multiply", s))]
        return
    before = rec.happens_before()
    at = {(what, detail): i for i, (_, what, detail) in enumerate(rec.log) if what in ("decode", "multiply")}
    decodes = [next(i for (what, d), i in at.items() if what == "decode" and d[0] == s) for s in starts]
    assert [rec.log[i][2][1] for i in decodes] == [i % buffers for i in range(slabs)]  # buffers taken in turn
    assert all(rec.log[i][0] == "side" for i in decodes)
    pro = next((i for i, e in enumerate(rec.log) if e[1] == "prologue"), None)
    assert (pro is not None) == with_prologue and (pro is None or rec.log[pro][0] == "main")
    for i, s in enumerate(starts):
        mul = at[("multiply", s)]
        assert rec.log[mul][0] == "main" and before(decodes[i], mul) and (pro is None or before(pro, mul))
        if i >= buffers:  # the buffer's previous reader is done before it is written again
            assert before(at[("multiply", starts[i - buffers])], decodes[i])
        if i + 1 < slabs and buffers == 2:  # the next decode is free to run beside this matmul
            assert not before(mul, decodes[i + 1]) and not before(decodes[i + 1], mul)
    end = len(rec.log) - 1
    assert rec.log[end][:2] == ("main", "wait_stream") and all(before(d, end) for d in decodes)
    if pro is not None:  # the first decode beside the prologue
        assert not before(decodes[0], pro) and not before(pro, decodes[0])
