"""Host (CPU) time per call of loraq's entry points, and where it goes.

At small batches a fused kernel runs for a few microseconds, so the Python between the call and
the launch decides what a user sees outside a CUDA graph. This prints the median host time per
call of each layer of the stack (queued without synchronizing, so the GPU never waits on the
host), then a cProfile of the public entry.

    python bench/profile_host.py [--format int1] [--K 4096 --N 4096 --M 1]
    python bench/profile_host.py --stub --K 64 --N 64     # the layer's own Python, any CPU
    python bench/profile_host.py --stub-kernels           # all of loraq's Python, any CPU

``--stub-kernels`` runs the whole stack (``LoraLinear`` down to the launchers) on CPU tensors with
every Triton launch replaced by a no-op and the tuner by the GPU's cached-hit lookup: the host
time loraq adds before the GPU's launches, measured without a GPU (Triton's own launch cost is
not in it).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraq import nn as lnn  # noqa: E402
from loraq import ops  # noqa: E402
from loraq.formats import compress_weight  # noqa: E402


def host_us(fn, calls: int = 300, rounds: int = 5) -> float:
    """Median over ``rounds`` of the mean host time of ``calls`` back-to-back calls."""
    fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t0) / calls * 1e6)
        sync()
    return statistics.median(out)


def without_grad(fn, *args):
    """``fn(*args)`` under ``torch.no_grad()`` (entered once a call, as inference code does)."""
    with torch.no_grad():
        return fn(*args)


def report(rows, profiled, lines: int) -> None:
    """Print each row's host time per call, then the top ``lines`` of a cProfile of ``profiled``
    (by time spent in each function itself)."""
    for name, fn in rows:
        print(f"  {name:<40} {host_us(fn):8.1f} µs host per call")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        profiled()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(lines)
    print(s.getvalue())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--format", default="int1")
    p.add_argument("--K", type=int, default=4096)
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--M", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--stub", action="store_true",
                   help="replace ops.lora_linear by a stub that returns a fixed tensor: what LoraLinear's "
                        "own Python costs (measurable on any CPU)")
    p.add_argument("--stub-kernels", action="store_true",
                   help="run every layer of the stack on the CPU with the Triton launches stubbed out: "
                        "loraq's own Python down to the launch (measurable on any CPU)")
    args = p.parse_args(argv)
    if args.stub:
        return stub_layer(args)
    if args.stub_kernels:
        return stub_kernels(args)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.float16 if dev.type == "cuda" else torch.float32
    W = torch.randn(args.N, args.K) / args.K**0.5
    w = compress_weight(W, args.format).to(dt).to(dev)
    x = torch.randn(args.M, args.K, device=dev, dtype=dt)
    A = torch.randn(args.rank, args.K, device=dev, dtype=dt) / args.K**0.5
    B = torch.randn(args.N, args.rank, device=dev, dtype=dt)
    layer = lnn.LoraLinear(w, rank=args.rank).to(dev, dt)
    Wd = W.to(dev, dt)
    be = "triton" if dev.type == "cuda" else "reference"  # the interpreter would time numpy
    rows = [("torch x @ Wᵀ (cuBLAS)", lambda: x @ Wd.t()),
            (f"ops.lora_linear ({be})", lambda: ops.lora_linear(x, w, A, B, 2.0, backend=be)),
            ("LoraLinear forward, no grad", lambda: without_grad(layer, x)),
            ("LoraLinear forward + autograd graph", lambda: layer(x))]
    if dev.type == "cuda":
        from loraq.kernels import lora_linear_fwd
        from loraq.custom_ops import _meta

        rows.insert(2, ("kernels.lora_linear_fwd (launcher)",
                        lambda: lora_linear_fwd(x, args.format, w.tensors(), _meta(w), A, B, 2.0)))
    print(f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}; {args.format} "
          f"K={args.K} N={args.N} M={args.M}")
    report(rows, lambda: ops.lora_linear(x, w, A, B, 2.0, backend=be), 18)
    return 0


def stub_layer(args) -> int:
    """Host time of ``LoraLinear.forward`` around a stubbed ``ops.lora_linear``: the layer's own
    Python (input checks, autocast, the base object, autograd), without any kernel."""
    from loraq import autograd

    W = torch.randn(args.N, args.K) / args.K**0.5
    layer = lnn.LoraLinear(compress_weight(W, args.format), rank=args.rank)
    x = torch.randn(args.M, args.K)
    out = torch.randn(args.M, args.N)
    real = autograd.ops.lora_linear
    autograd.ops.lora_linear = lambda *a, **k: out
    try:
        print(f"cpu; {args.format} K={args.K} N={args.N} M={args.M}; ops.lora_linear stubbed")
        print(f"  {'torch F.linear (for scale)':<40} {host_us(lambda: torch.nn.functional.linear(x, W)):8.1f} µs")
        print(f"  {'LoraLinear forward, no grad':<40} {host_us(lambda: without_grad(layer, x)):8.1f} µs")
        print(f"  {'LoraLinear forward + autograd graph':<40} {host_us(lambda: layer(x)):8.1f} µs")
    finally:
        autograd.ops.lora_linear = real
    return 0


def stub_kernels(args) -> int:
    """Host time of each layer of the stack on CPU tensors, every Triton launch a no-op (counted)
    and the tuner answering as on a GPU after the first call (one dict lookup): the Python that
    loraq runs before the GPU's launches. The config is the first GEMV candidate at up to 16 rows
    (what the H100 picked), else the first tiled one."""
    import importlib
    import os

    from triton.runtime.jit import JITFunction

    fwd_mod = importlib.import_module("loraq.kernels.lora_linear_fwd")
    launches = []
    # the kernels are JITFunctions, or InterpretedFunctions where TRITON_INTERPRET=1 held at import
    kinds = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        kinds.append(InterpretedFunction)
    except ImportError:
        pass
    real_runs, real_pick = [k.run for k in kinds], fwd_mod.pick_config
    picked = {}

    def pick(op, M, N, K, dtype, device, run, bench=None, extra=None):
        key = (op, M, N, K, dtype, device.index)
        hit = picked.get(key)
        if hit is None:
            more = list((extra() if callable(extra) else extra) or [])
            hit = picked[key] = more[0] if more and M <= 16 else real_pick(op, M, N, K, dtype, device, run)
        return hit

    for kind in kinds:
        kind.run = lambda self, *a, **k: launches.append(self.fn.__name__)
    fwd_mod.pick_config = pick
    was = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # lets the triton backend take CPU tensors; the kernels are JITFunctions
    try:
        dt = torch.float16
        W = torch.randn(args.N, args.K) / args.K**0.5
        w = compress_weight(W, args.format).to(dt)
        x = torch.randn(args.M, args.K, dtype=dt)
        A = torch.randn(args.rank, args.K, dtype=dt) / args.K**0.5
        B = torch.randn(args.N, args.rank, dtype=dt)
        layer = lnn.LoraLinear(w, rank=args.rank, backend="triton").to(dt)
        from loraq.custom_ops import _meta

        rows = [("kernels.lora_linear_fwd (launcher)",
                 lambda: fwd_mod.lora_linear_fwd(x, args.format, w.tensors(), _meta(w), A, B, 2.0)),
                ("ops.lora_linear (triton)", lambda: ops.lora_linear(x, w, A, B, 2.0, backend="triton")),
                ("LoraLinear forward, no grad", lambda: without_grad(layer, x))]
        launches.clear()
        rows[0][1]()
        print(f"cpu; {args.format} K={args.K} N={args.N} M={args.M} fp16; Triton launches stubbed "
              f"({', '.join(launches)}; config {next(iter(picked.values()))})")
        report(rows, lambda: without_grad(layer, x), 14)
    finally:
        for kind, run in zip(kinds, real_runs):
            kind.run = run
        fwd_mod.pick_config = real_pick
        if was is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = was
    return 0


if __name__ == "__main__":
    sys.exit(main())
