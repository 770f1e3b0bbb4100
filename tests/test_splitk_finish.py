"""The split-K finish (kernels/splitk_finish.py) against loraq.reference, and the workspace it
keeps: all zeros between calls, one per device and stream, zeroed again when a call fails."""

import threading

import pytest
import torch

pytest.importorskip("triton")

from loraq import reference  # noqa: E402
from test_triton_kernels import (DEV, DTYPES, SLACK, _kernel_args, problem, with_gather_marks,  # noqa: E402
                                 workspaces_clean)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lora, bias", [(True, True), (False, False), (True, False), (False, True)])
@pytest.mark.parametrize("M, N, slots, r", [(1, 300, 1, 5), (3, 37, 20, 16), (2, 513, 17, 33)])
def test_finish_matches_reference_and_zeroes_the_sums(dtype, lora, bias, M, N, slots, r):
    """Odd N over more than one program, more slots than one step of the slot loop (16), ranks
    below, at and above a power of two."""
    from loraq.kernels.splitk_finish import finish, xa_slots, zeroed_workspace

    ws = zeroed_workspace(M, N, DEV)
    ws.copy_(torch.randn(M, N, device=DEV) * 10)
    sums = ws.clone()
    parts = B = None
    if lora:
        parts, block_r = xa_slots(slots, M, r, DEV)
        parts.copy_(torch.randn(slots, M, block_r, device=DEV))
        parts[:, :, r:] = 0.0  # the kernels store zeros past r
        B = torch.randn(N, r, device=DEV, dtype=dtype)
    b = torch.randn(N, device=DEV, dtype=dtype) if bias else None
    y = finish(ws, parts, B, r, 0.7, b, dtype)
    assert y.shape == (M, N) and y.dtype == dtype
    ref = reference.splitk_finish_ref(sums, parts, B, 0.7, b, torch.float64)
    # one rounding to dtype on top of fp32 sums: within dtype's resolution of the result
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert (y.double() - ref).abs().max().item() <= tol * ref.abs().max().item() + SLACK[dtype]
    assert not ws.any(), "the finish must leave the workspace zeroed for the next call"


def test_finish_workspace_grows_keeps_zeros_and_is_per_thread_device_and_stream():
    from loraq.kernels import splitk_finish

    a = splitk_finish.zeroed_workspace(2, 8, DEV)
    assert a.shape == (2, 8) and a.dtype == torch.float32 and not a.any()
    b = splitk_finish.zeroed_workspace(4, 100, DEV)  # more than there is: a new, larger one
    assert b.shape == (4, 100) and not b.any()
    c = splitk_finish.zeroed_workspace(1, 3, DEV)  # a smaller request reuses it
    assert c.data_ptr() == b.data_ptr()
    stream = torch.cuda.current_stream(DEV).cuda_stream if DEV.type == "cuda" else None
    assert (torch.device(DEV), stream) in splitk_finish.workspaces()
    other = []
    thread = threading.Thread(target=lambda: other.append(splitk_finish.zeroed_workspace(1, 3, DEV)))
    thread.start()
    thread.join()
    assert other[0].data_ptr() != c.data_ptr()  # another thread, another workspace


def test_workspace_views_are_reused_and_follow_a_grown_workspace():
    """The same view object comes back for the same shape (no slicing per call: host time), and
    a grown workspace drops the views of the old one (which they would keep alive)."""
    from loraq.kernels import splitk_finish

    a = splitk_finish.zeroed_workspace(3, 5, DEV)
    assert splitk_finish.zeroed_workspace(3, 5, DEV) is a
    stream = torch.cuda.current_stream(DEV).cuda_stream if DEV.type == "cuda" else None
    old = splitk_finish.workspaces()[(torch.device(DEV), stream)]
    big = splitk_finish.zeroed_workspace(old.numel() + 1, 1, DEV)  # more than there is: it grows
    current = splitk_finish.workspaces()[(torch.device(DEV), stream)]
    assert current is not old and big.data_ptr() == current.data_ptr()
    a2 = splitk_finish.zeroed_workspace(3, 5, DEV)
    assert a2 is not a and a2.data_ptr() == current.data_ptr() and a2.shape == (3, 5) and not a2.any()
    assert all(ws is current for ws, _ in splitk_finish._LOCAL.views.values())


def test_a_replaced_workspace_is_kept_for_the_graphs_that_captured_it():
    """A CUDA graph captured before the workspace grew still adds into the old one when replayed:
    the old one must stay allocated (zero), or the replay would write into freed memory."""
    import gc
    import weakref

    from loraq.kernels import splitk_finish

    splitk_finish.zeroed_workspace(2, 3, DEV)
    stream = torch.cuda.current_stream(DEV).cuda_stream if DEV.type == "cuda" else None
    old = splitk_finish.workspaces()[(torch.device(DEV), stream)]
    alive = weakref.ref(old)
    kept_before = len(splitk_finish.retired_workspaces())
    splitk_finish.zeroed_workspace(old.numel() + 7, 1, DEV)  # grows
    del old
    gc.collect()
    assert alive() is not None and not alive().any()
    assert len(splitk_finish.retired_workspaces()) == kept_before + 1
    assert splitk_finish.retired_workspaces()[-1] is alive()


def test_finish_workspace_is_zeroed_again_after_a_failed_call():
    from loraq.kernels.splitk_finish import bind_split, zeroed_workspace

    x = torch.randn(2, 8, device=DEV)

    def launch(x, ws, parts):
        ws += 1.0  # a kernel that ran, then something failed before its finish
        raise RuntimeError("boom")

    for B in (None, torch.randn(8, 3, device=DEV)):
        with pytest.raises(RuntimeError, match="boom"):
            bind_split(launch, 2, 8, 1, B, 3, 1.0, None, x.dtype, x.device)(x)
        assert not zeroed_workspace(2, 8, DEV).any()


@pytest.mark.parametrize("fmt, cfg", with_gather_marks([
    ("int1", (1, 32, 64, 4, 4, 1, 2)), ("sparse4x4", (1, 16, 32, 4, 4, 2, 3)), ("sparse4x4", (4, 16, 32, 2, 4, 2, 4)),
    ("int1", (16, 32, 32, 4, 4, 2, 1)), ("sparse4x4", (16, 64, 128, 2, 4, 3, 0))]))
def test_finish_of_each_split_kernel_gives_the_same_answer_twice_and_leaves_zeros(fmt, cfg):
    """The lookup GEMV, both gathering orders and the split tiled kernel: a second call sees a
    clean workspace (same output, bit for bit) and leaves one."""
    from loraq.kernels import lora_linear_fwd

    w, x, A, B, b = problem(fmt, torch.float16, 3, 37, 300, r=5)
    tensors, meta = _kernel_args(w)
    y1 = lora_linear_fwd(x, fmt, tensors, meta, A, B, 0.5, b, config=cfg)
    assert workspaces_clean()
    y2 = lora_linear_fwd(x, fmt, tensors, meta, A, B, 0.5, b, config=cfg)
    assert torch.equal(y1, y2)
    assert workspaces_clean()
    # another shape and no LoRA on the same workspace: still the reference's answer
    w2, x2, _, _, _ = problem(fmt, torch.float16, 2, 21, 96, lora=False, bias=False)
    t2, m2 = _kernel_args(w2)
    y3 = lora_linear_fwd(x2, fmt, t2, m2, config=cfg)
    ref = reference.lora_linear_ref(x2.double(), w2.to(torch.float64), None, None, 1.0)
    low = reference.lora_linear_ref(x2, w2, None, None, 1.0)
    assert (y3.double() - ref).abs().max() <= 2 * (low.double() - ref).abs().max() + 1e-3 * ref.abs().max()
    assert workspaces_clean()


@pytest.mark.gpu
@pytest.mark.parametrize("one_launch", ["0", "1"])
@pytest.mark.parametrize("fmt", ["int1", "sparse4x4"])
def test_gpu_a_graph_captured_before_the_workspace_grew_still_replays(fmt, one_launch, monkeypatch):
    """Two graphs captured on the same capture stream, the second needing a larger workspace:
    the first still replays into the workspace it captured (kept, not freed and reused by the
    tensors allocated since), and every workspace stays zero."""
    from loraq.kernels import lora_linear_fwd

    monkeypatch.setenv("LORAQ_ONE_LAUNCH", one_launch)
    graphs, outputs, expected = [], [], []
    for N in (512, 8192):  # the second grows the capture stream's workspace
        w, x, A, B, b = problem(fmt, torch.float16, 1, N, 4096, r=16)
        tensors, meta = _kernel_args(w)
        expected.append(lora_linear_fwd(x, fmt, tensors, meta, A, B, 0.5, b))  # tunes, compiles
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs.append(lora_linear_fwd(x, fmt, tensors, meta, A, B, 0.5, b))
        graphs.append(graph)
    clutter = [torch.randn(1 << 20, device="cuda") for _ in range(8)]  # would reuse freed memory
    for _ in range(3):
        for graph, out in zip(graphs, outputs):
            out.zero_()
            graph.replay()
    torch.cuda.synchronize()
    for out, want in zip(outputs, expected):
        torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)
    assert workspaces_clean() and all(c.abs().max() < 100 for c in clutter)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int1", "sparse4x4"])
def test_gpu_finish_under_cuda_graph_replay_and_on_a_side_stream(fmt):
    """Captured in a CUDA graph (its workspace is allocated during the capture), replayed twice,
    and run eagerly on another stream: the eager answer each time, and the workspaces stay zero."""
    from loraq.kernels import lora_linear_fwd

    w, x, A, B, b = problem(fmt, torch.float16, 1, 4096, 4096, r=16)
    tensors, meta = _kernel_args(w)
    expect = lora_linear_fwd(x, fmt, tensors, meta, A, B, 0.5, b)  # tunes, compiles
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = lora_linear_fwd(x, fmt, tensors, meta, A, B, 0.5, b)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = lora_linear_fwd(x, fmt, tensors, meta, A, B, 0.5, b)
    for _ in range(2):
        captured.zero_()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(captured, expect, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(on_side, expect, rtol=1e-3, atol=1e-3)
    assert workspaces_clean()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_finish_reads_every_sum_before_zeroing_it(dtype):
    """Regression: without a barrier between the finish's loads and its zeroing stores, up to half
    of a block read back zeros on an H100 when N was not a multiple of 16 (45% of calls). Many calls
    at such widths: every sum comes back, every call."""
    from loraq.kernels.splitk_finish import finish, zeroed_workspace

    for M, N in [(2, 513), (4, 4097), (1, 300), (3, 1000)]:
        for _ in range(25):
            ws = zeroed_workspace(M, N, DEV)
            ws.copy_(torch.randn(M, N, device=DEV) * 10)
            sums = ws.clone()
            b = torch.randn(N, device=DEV, dtype=dtype)
            y = finish(ws, None, None, 0, 1.0, b, dtype)
            ref = sums.double() + b.double()
            assert (y.double() - ref).abs().max().item() <= 8e-3 * ref.abs().max().item() + SLACK[dtype], (M, N)
            assert not ws.any()
