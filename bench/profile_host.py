"""Host (CPU) time per call of loraq's entry points, and where it goes.

At small batches a fused kernel runs for a few microseconds, so the Python between the call and
the launch decides what a user sees outside a CUDA graph. This prints the median host time per
call of each layer of the stack (queued without synchronizing, so the GPU never waits on the
host), then a cProfile of the public entry.

    python bench/profile_host.py [--format int1] [--K 4096 --N 4096 --M 1]
    python bench/profile_host.py --stub                   # the layer's own Python, any CPU (64², see --K)
    python bench/profile_host.py --stub-kernels           # loraq's and Triton's Python, any CPU
    python bench/profile_host.py --stub-kernels --cuda-op mma   # the same with loraq._C's GEMVs picked

``--stub-kernels`` runs the whole stack (``LoraLinear`` down to the launchers) on CPU tensors,
with Triton's launches recorded by a fake driver instead of run and the tuner answering as a GPU's
cache does: the host time before the GPU's launches, measured without a GPU, with Triton's launch
path and with ``kernels.fast_launch`` (only the C launcher, about the same for both, is left out).
``--cuda-op`` does it as if the extension ``loraq._C`` were built and its GEMV picked, its ops
recorded instead of run (their C++ dispatch left out). ``LoraLinear`` rows are its eager
inference: after the first call, through a kept ``ops.forward_plan``; the training row runs a
forward and backward (``x`` and the factors wanting gradients), through kept forward and ``dX``
plans from the third step, and once more for an fp32 layer under autocast (whose plans read
copies of the factors in the autocast dtype). The LoRA factors' gradients are torch matmuls, which with
``--stub-kernels`` run on the CPU (a real cost, unlike on a GPU where each is a launch).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

if "--stub-kernels" in sys.argv:  # the kernels must be defined as JITFunctions (fake_driver.py)
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # fake_driver

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


@contextlib.contextmanager
def environ(**values: str):
    """``os.environ`` with ``values`` set, restored as it was on the way out."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def both_launch_paths(rows) -> None:
    """Print each row's host time per call with Triton's launch path and with
    ``kernels.fast_launch`` (``LORAQ_FAST_LAUNCH=1``), timed alternately so that a slower spell
    of the machine hits both; the best of three turns each."""
    print(f"  {'':<40} {'Triton':>8} {'fast':>8}  µs host per call (fast: LORAQ_FAST_LAUNCH=1)")
    for name, fn in rows:
        times = {"0": [], "1": []}
        for _ in range(3):
            for mode in times:
                with environ(LORAQ_FAST_LAUNCH=mode):
                    times[mode].append(host_us(fn, rounds=3))
        print(f"  {name:<40} {min(times['0']):8.1f} {min(times['1']):8.1f}")


def report(rows, profiled=None, lines: int = 0) -> None:
    """Print each row's host time per call, then the top ``lines`` of a cProfile of ``profiled``
    (by time spent in each function itself), if given."""
    for name, fn in rows:
        print(f"  {name:<40} {host_us(fn):8.1f} µs host per call")
    if profiled is None:
        return
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
    p.add_argument("--format", choices=["int1", "sparse4x4"], default="int1")
    # --stub times F.linear on the CPU as a scale for the layer's Python: at 4096² that is a real
    # matmul of milliseconds, at 64² a call's own overhead, comparable with the layer's
    p.add_argument("--K", type=int, help="in features (default 4096; 64 with --stub)")
    p.add_argument("--N", type=int, help="out features (default 4096; 64 with --stub)")
    p.add_argument("--M", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--stub", action="store_true",
                   help="replace ops.lora_linear by a stub that returns a fixed tensor: what LoraLinear's "
                        "own Python costs (measurable on any CPU)")
    p.add_argument("--stub-kernels", action="store_true",
                   help="run every layer of the stack on the CPU, Triton's launches recorded by a fake driver "
                        "instead of run: the Python before the GPU works (measurable on any CPU)")
    p.add_argument("--cuda-op", choices=["mma", "lut", "lut8"],
                   help="with --stub-kernels: as if the CUDA extension were built, its GEMV picked at up to 16 rows "
                        "(mma: the tensor-core GEMVs of both formats; lut, lut8: int1's lookup GEMVs of 4 and 8 "
                        "inputs an entry, one row), its ops "
                        "recorded instead of run")
    args = p.parse_args(argv)
    default = 64 if args.stub else 4096
    args.K, args.N = (default if v is None else v for v in (args.K, args.N))
    if args.stub:
        return stub_layer(args)
    if args.stub_kernels:
        return stub_kernels(args)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.float16 if dev.type == "cuda" else torch.float32
    W = torch.randn(args.N, args.K) / args.K**0.5
    w = compress_weight(W, args.format).to(dt).to(dev)
    x = torch.randn(args.M, args.K, device=dev, dtype=dt)
    xg, dy = x.clone().requires_grad_(), torch.randn(args.M, args.N, device=dev, dtype=dt)  # a training step
    A = torch.randn(args.rank, args.K, device=dev, dtype=dt) / args.K**0.5
    B = torch.randn(args.N, args.rank, device=dev, dtype=dt)
    layer = lnn.LoraLinear(w, rank=args.rank).to(dev, dt)
    Wd = W.to(dev, dt)
    be = "triton" if dev.type == "cuda" else "reference"  # the interpreter would time numpy
    rows = [("torch x @ Wᵀ (cuBLAS)", lambda: x @ Wd.t()),
            (f"ops.lora_linear ({be})", lambda: ops.lora_linear(x, w, A, B, 2.0, backend=be)),
            ("LoraLinear forward, no grad", lambda: without_grad(layer, x)),
            ("LoraLinear forward + autograd graph", lambda: layer(x)),
            ("LoraLinear forward + backward (training)", lambda: layer(xg).backward(dy))]
    layer32 = lnn.LoraLinear(compress_weight(W, args.format), rank=args.rank).to(dev)  # as loraq train runs it
    rows.append(("the same, fp32 layer under bf16 autocast",
                 lambda: autocast_step(layer32, xg.float(), dy, dev.type, torch.bfloat16)))
    if dev.type == "cuda":
        from loraq.kernels import lora_linear_fwd
        from loraq.custom_ops import _meta

        rows.insert(2, ("kernels.lora_linear_fwd (launcher)",
                        lambda: lora_linear_fwd(x, args.format, w.tensors(), _meta(w), A, B, 2.0)))
    print(f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}; {args.format} "
          f"K={args.K} N={args.N} M={args.M}")
    report(rows[:1])
    both_launch_paths(rows[1:])
    print("cProfile of ops.lora_linear, LORAQ_FAST_LAUNCH as set:")
    report([], lambda: ops.lora_linear(x, w, A, B, 2.0, backend=be), 18)
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


@contextlib.contextmanager
def fake_extension(on, calls):
    """With ``on``, the CUDA extension's GEMVs as if built and usable on an H100 (132 SMs, 227 KiB
    of shared memory a block): each ``torch.ops.loraq`` op a Python function that records its call
    into ``calls``. The op's own dispatch (torch's C++ dispatcher, about as long as a torch call)
    is left out, as Triton's C launcher is."""
    if not on:
        yield
        return
    import importlib

    # modules, not the functions of the same names that loraq.kernels exports
    int1_gemv_mma, lora_linear_fwd, sparse4x4_gemv_cuda = (importlib.import_module(f"loraq.kernels.{m}") for m in (
        "int1_gemv_mma", "lora_linear_fwd", "sparse4x4_gemv_cuda"))

    ok = lambda *a: (True, "")  # noqa: E731
    patches = [(lora_linear_fwd, "mma_gemv_status", ok), (lora_linear_fwd, "sparse_cuda_status", ok),
               (lora_linear_fwd, "cuda_lut8_status", ok),
               (lora_linear_fwd, "cuda_gemv_offered", lambda: True)]
    for mod in (int1_gemv_mma, sparse4x4_gemv_cuda):
        patches += [(mod, "sm_count", lambda index: 132), (mod, "smem_limits", lambda index: (232448, 233472))]
    ops_ns = torch.ops.loraq
    for name in ("int1_gemv_mma", "sparse4x4_gemv"):
        patches.append((ops_ns, name, lambda *a, name=name, **k: calls.append((name,))))
    saved = [(obj, name, obj.__dict__.get(name, _MISSING)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in saved:
            if value is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


_MISSING = object()


def autocast_step(layer, x, dy, device="cpu", dtype=torch.float16):
    """A training step's forward under autocast (``loraq train`` runs bf16 autocast on CUDA) and
    its backward outside it."""
    with torch.autocast(device, dtype=dtype):
        y = layer(x)
    y.backward(dy.to(y.dtype))


def stub_kernels(args) -> int:
    """Host time of each layer of the stack on CPU tensors, Triton's launches recorded instead of
    run (``fake_driver.fake_cuda``: all of Triton's per-call Python runs, its C launcher does not)
    and the tuner answering as on a GPU after the first call (one dict lookup): the Python that
    a call runs before the GPU works. Each layer is timed with Triton's launch path and with
    ``kernels.fast_launch`` (``LORAQ_FAST_LAUNCH=1``), alternately. The config is the first GEMV
    candidate at up to 16 rows (what the H100 picked), else the first tiled one."""
    import importlib

    from fake_driver import fake_cuda, unsupported

    if unsupported():
        print(f"profile_host: --stub-kernels cannot run here: {unsupported()}", file=sys.stderr)
        return 2
    from loraq.kernels.autotune import CUDA_GATHER, CUDA_LUT, CUDA_LUT8, MMA_GEMV, SPARSE_MMA

    fwd_mod = importlib.import_module("loraq.kernels.lora_linear_fwd")
    real_pick = fwd_mod.pick_config
    picked = {}
    cuda = (MMA_GEMV, CUDA_LUT, CUDA_LUT8, CUDA_GATHER, SPARSE_MMA)
    lookups = {"lut": CUDA_LUT, "lut8": CUDA_LUT8}

    def pick(op, M, N, K, dtype, device, run, bench=None, extra=None, variant=(), check=None):
        key = (op, M, N, K, dtype, device.index, variant)
        hit = picked.get(key)
        if hit is None:
            more = list((extra() if callable(extra) else extra) or [])
            if args.cuda_op:  # the extension's GEMV, as the H100 picked at 1 and 16 rows
                want = lookups.get(args.cuda_op)  # None: the tensor-core GEMVs
                more = [c for c in more if c[6] in cuda and (c[6] == want if want else c[6] not in lookups.values())]
            hit = picked[key] = more[0] if more and M <= 16 else real_pick(op, M, N, K, dtype, device, run)
        return hit

    dx_mod = importlib.import_module("loraq.kernels.lora_linear_dx")
    fwd_mod.pick_config = dx_mod.pick_config = pick
    # TRITON_INTERPRET=1 lets the triton backend take CPU tensors; the kernels are JITFunctions
    ops.load_backends()  # before the switch below, which loading the kernels would reset
    plans_on_cpu = ops._PLANS_ON_CPU
    ops._PLANS_ON_CPU = True  # LoraLinear's plans on CPU tensors, as for the interpreter's kernels
    try:
        with environ(TRITON_INTERPRET="1"), fake_cuda() as (calls, _, _), fake_extension(args.cuda_op, calls):
            dt = torch.float16
            W = torch.randn(args.N, args.K) / args.K**0.5
            w = compress_weight(W, args.format).to(dt)
            x = torch.randn(args.M, args.K, dtype=dt)
            xg, dy = x.clone().requires_grad_(), torch.randn(args.M, args.N, dtype=dt)  # a training step
            A = torch.randn(args.rank, args.K, dtype=dt) / args.K**0.5
            B = torch.randn(args.N, args.rank, dtype=dt)
            layer = lnn.LoraLinear(w, rank=args.rank, backend="triton").to(dt)
            layer32 = lnn.LoraLinear(compress_weight(W, args.format), rank=args.rank, backend="triton")  # fp32, as loraq train has it
            from loraq.custom_ops import _meta

            rows = [("kernels.lora_linear_fwd (launcher)",
                     lambda: fwd_mod.lora_linear_fwd(x, args.format, w.tensors(), _meta(w), A, B, 2.0)),
                    ("ops.lora_linear (triton)", lambda: ops.lora_linear(x, w, A, B, 2.0, backend="triton")),
                    ("LoraLinear forward, no grad", lambda: without_grad(layer, x)),
                    ("LoraLinear forward + backward (training)", lambda: layer(xg).backward(dy)),
                    ("the same, fp32 layer under fp16 autocast", lambda: autocast_step(layer32, xg.float(), dy))]
            calls.clear()
            rows[0][1]()
            print(f"cpu; {args.format} K={args.K} N={args.N} M={args.M} fp16; Triton's launches recorded, not run "
                  f"({', '.join(c[0] for c in calls)}; config {next(iter(picked.values()))})")
            for i, (name, fn) in enumerate(rows):  # the record of launches must not grow without end
                rows[i] = (name, lambda fn=fn: (fn(), calls.clear()))
            both_launch_paths(rows)
            with environ(LORAQ_FAST_LAUNCH="1"):
                report([], lambda: (without_grad(layer, x), calls.clear()), 14)
    finally:
        fwd_mod.pick_config = dx_mod.pick_config = real_pick
        ops._PLANS_ON_CPU = plans_on_cpu
    return 0


if __name__ == "__main__":
    sys.exit(main())
