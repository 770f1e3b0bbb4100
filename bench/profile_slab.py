"""Where a dense-slab call's GPU time goes: each kernel's time per call, by placement of the LoRA path.

For each shape, the plain cuBLAS matmul ``x·Wᵀ``, the same with ``beta = 1`` (what the slabs'
matmuls cost when the output is written first) and with the bias in its epilogue (a merged slab's
matmul) are timed for reference; then one forward through
the dense-slab path (``kernels/dense_slab.py``) per placement runs under ``torch.profiler`` and
each kernel's GPU time per call is printed, longest first. Needs a CUDA GPU.

    python bench/profile_slab.py [--shapes 4096x4096,4096x14336] [--M 4096] [--format int1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="4096x4096,4096x14336", help="KxN,...")
    p.add_argument("--M", type=int, default=4096)
    p.add_argument("--format", default="int1", choices=["int1", "sparse4x4"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--calls", type=int, default=10, help="calls profiled per placement")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("profile_slab needs a CUDA GPU")
    from torch.profiler import ProfilerActivity, profile
    from triton.testing import do_bench

    from loraq.custom_ops import _meta
    from loraq.formats import compress_weight
    from loraq.kernels import lora_linear_fwd
    from loraq.kernels.autotune import (DENSE_SLAB, DENSE_SLAB_MERGE_TILE, DENSE_SLAB_TILE, SLAB_MERGE,
                                        SLAB_OUTPUT_FIRST, SLAB_WIDEN)

    dev, dt = torch.device("cuda"), torch.float16
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.lower().split("x"))
        x = torch.randn(args.M, K, device=dev, dtype=dt)
        W = torch.randn(N, K, device=dev, dtype=dt) / K**0.5
        y = torch.empty(args.M, N, device=dev, dtype=dt)
        b = torch.randn(N, device=dev, dtype=dt)
        mm = do_bench(lambda: torch.mm(x, W.t(), out=y), return_mode="median")
        addmm = do_bench(lambda: y.addmm_(x, W.t()), return_mode="median")
        biased = do_bench(lambda: torch.addmm(b, x, W.t(), out=y), return_mode="median")
        print(f"{args.format} K={K} N={N} M={args.M}: cuBLAS x·Wᵀ {mm * 1e3:.1f} µs, with beta=1 {addmm * 1e3:.1f} µs, "
              f"+ bias (merge's matmul) {biased * 1e3:.1f} µs")
        w = compress_weight(W.float().cpu(), args.format).to(dt).to(dev)
        W = None  # only the compressed weight from here
        tensors, meta = w.tensors(), _meta(w)
        A = torch.randn(args.rank, K, device=dev, dtype=dt) / K**0.5
        B = torch.randn(N, args.rank, device=dev, dtype=dt)
        for placement, name in [(SLAB_WIDEN, "widen"), (SLAB_OUTPUT_FIRST, "output first"), (SLAB_MERGE, "merge")]:
            bn, bk, warps = DENSE_SLAB_MERGE_TILE if placement == SLAB_MERGE else DENSE_SLAB_TILE
            cfg = (bn, bk, -(-N // 256) * 256, placement, warps, 1, DENSE_SLAB)  # one slab

            def call():
                return lora_linear_fwd(x, args.format, tensors, meta, A, B, 2.0, b, config=cfg)

            call()
            total = do_bench(call, return_mode="median")
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.calls):
                    call()
                torch.cuda.synchronize()
            print(f"  {name} {cfg}: {total * 1e3:.1f} µs a call (do_bench)")
            for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
                if e.device_time_total > 0:
                    print(f"    {e.device_time_total / args.calls:8.1f} µs  x{e.count // args.calls}  {e.key[:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
