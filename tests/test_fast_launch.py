"""``kernels.fast_launch``: launches from its cache must be Triton's launches, argument for argument."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraq.kernels import fast_launch
from loraq.kernels.decode import INTERPRETED

REPO = Path(__file__).resolve().parents[1]
KERNELS = ("_int1_gemv_lut_kernel", "_sparse4x4_gemv_kernel", "_splitk_finish_kernel", "_lora_linear_fwd_kernel",
           "_lora_linear_dx_kernel", "_sparse4x4_gemv_dx_kernel", "_decode_slab_kernel")


def test_fast_path_passes_the_launcher_what_triton_passes(needs_fake_driver):
    """tests/fast_launch_check.py, in a process where the kernels are JITFunctions (no interpreter)
    and Triton's launches are recorded by a fake driver: every kernel, many specializations."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(REPO / "tests" / "fast_launch_check.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in KERNELS:
        line = next(line for line in out.stdout.splitlines() if line.startswith(name + ":"))
        assert int(line.split(": ")[1].split()[0]) > 0, line  # launches from the cache
    assert "fallbacks:" in out.stdout


def test_key_separates_what_triton_specializes_on():
    buf = torch.zeros(64, dtype=torch.float16)
    aligned, shifted = buf[:32], buf[1:33]
    key = lambda *args, **kw: fast_launch._key(0, kw, args)  # noqa: E731
    assert key(aligned, 5) == key(buf[8:40], 5)  # 16 bytes further: the same specialization
    assert key(aligned, 5) != key(shifted, 5)  # 2 bytes: not a multiple of 16
    assert key(aligned, 5) != key(aligned.float(), 5)
    assert key(aligned, 1) != key(aligned, 2) and key(aligned, 16) != key(aligned, 32)
    assert key(aligned, 0.5) == key(aligned, 2.0)  # floats are passed, never specialized on
    assert key(aligned, 5, BLOCK=16) != key(aligned, 5, BLOCK=32)
    assert key(torch.nn.Parameter(aligned.float())) == key(aligned.float())
    assert key(aligned, None) != key(aligned, 0)


@pytest.mark.skipif(not INTERPRETED, reason="the kernels were defined for a GPU (TRITON_INTERPRET unset)")
def test_interpreted_kernels_are_launched_by_the_interpreter(monkeypatch):
    """Under TRITON_INTERPRET=1 (the CPU's tests) the fast path steps aside: same results, nothing kept."""
    from loraq.kernels import lora_linear_fwd
    from loraq.formats import compress_weight
    from loraq.reference import lora_linear_ref

    monkeypatch.setenv("LORAQ_FAST_LAUNCH", "1")
    fast_launch.forget()
    w = compress_weight(torch.randn(24, 40), "int1")
    x = torch.randn(3, 40)
    meta = {"N": 24, "K": 40, "group_size": None, "scale_mode": w.scale_mode}
    y = lora_linear_fwd(x, "int1", w.tensors(), meta)
    torch.testing.assert_close(y, lora_linear_ref(x, w, None, None, 1.0, None), rtol=1e-4, atol=1e-4)
    assert not any(launcher.entries for launcher in fast_launch._LAUNCHERS.values())


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int1", "sparse4x4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_fast_launch_gives_the_results_of_triton_launches(monkeypatch, fmt, dtype):
    """On a GPU: the forward and dX with LORAQ_FAST_LAUNCH=1 equal those of Triton's own launches
    (to the order of the split sums' atomic adds), at the batch sizes of every kernel family and
    at M = 1 for every GEMV config; the second time every launch comes from the fast path's
    cache, on the default stream, on a side stream and captured in a CUDA graph."""
    import importlib

    from loraq.formats import compress_weight
    from loraq.kernels import autotune

    fwd_mod = importlib.import_module("loraq.kernels.lora_linear_fwd")
    dx_mod = importlib.import_module("loraq.kernels.lora_linear_dx")
    dev = torch.device("cuda")
    N, K, R = 1000, 4096, 16
    w = compress_weight(torch.randn(N, K), fmt).to(dtype).to(dev)
    tensors = w.tensors()
    meta = {"N": N, "K": K}
    if fmt == "int1":
        meta.update(group_size=w.group_size or None, scale_mode=w.scale_mode)
    A = (torch.randn(R, K, device=dev) / K**0.5).to(dtype)
    B = torch.randn(N, R, device=dev).to(dtype)
    bias = torch.randn(N, device=dev).to(dtype)
    gemv = autotune.lut_configs(1) if fmt == "int1" else autotune.gather_fwd_configs(1)
    misses = []
    first = fast_launch.FastLauncher._first
    monkeypatch.setattr(fast_launch.FastLauncher, "_first",
                        lambda self, *a: (misses.append(self.fn.fn.__name__), first(self, *a))[1])

    def check(got, expected):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-3 * e.abs().max().item())

    for M, cfg in [(M, None) for M in (1, 4, 16, 64, 300)] + [(1, cfg) for cfg in gemv]:
        x = torch.randn(M, K, device=dev).to(dtype)
        dy = torch.randn(M, N, device=dev).to(dtype)
        dyB = dy @ B

        def calls():
            return (fwd_mod.lora_linear_fwd(x, fmt, tensors, meta, A, B, 0.5, bias, config=cfg),
                    dx_mod.lora_linear_dx(dy, fmt, tensors, meta, A, dyB, 0.5, lora_B=B))

        monkeypatch.delenv("LORAQ_FAST_LAUNCH", raising=False)
        expected = calls()
        monkeypatch.setenv("LORAQ_FAST_LAUNCH", "1")
        fast_launch.forget()
        check(calls(), expected)  # through Triton, kept
        misses.clear()
        check(calls(), expected)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            on_side = calls()
        torch.cuda.current_stream().wait_stream(side)
        check(on_side, expected)
        assert not misses, f"M={M}, config {cfg}: launched through Triton again: {misses}"
    if M <= 16:  # a graph of the last GEMV config, captured from the fast path's cache
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = calls()
        graph.replay()
        torch.cuda.synchronize()
        check(captured, expected)
        assert not misses
