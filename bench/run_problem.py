"""Run one problem through ``ops.lora_linear`` (or the dX op) a few times: the program a kernel
profiler wraps. The first call tunes (or reads the autotune cache: point ``LORAQ_CACHE_DIR`` at an
earlier run's winners); the others repeat it, the last inside the NVTX range ``loraq_call``, so
that a profiler can take that call's kernels alone, whichever the tuner chose. Tune first, without
the profiler: under it the tuning's timings are the profiler's.

    python bench/run_problem.py --format sparse4x4 --K 8192 --N 28672 --M 1      # tunes, caches
    ncu --nvtx --nvtx-include "loraq_call/" --section SpeedOfLight --section WarpStateStats \\
        python bench/run_problem.py --format sparse4x4 --K 8192 --N 28672 --M 1
    TRITON_INTERPRET=1 python bench/run_problem.py --K 40 --N 24 --M 3   # on a CPU: the harness only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraq import ops  # noqa: E402
from loraq.formats import compress_weight  # noqa: E402
from loraq.kernels.autotune import describe, picked  # noqa: E402


NVTX_RANGE = "loraq_call"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--format", choices=["int1", "sparse4x4"], default="int1")
    p.add_argument("--K", type=int, default=4096)
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--M", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    p.add_argument("--op", choices=["forward", "dx"], default="forward")
    p.add_argument("--reps", type=int, default=3, help="calls after the first (default 3)")
    args = p.parse_args(argv)
    if min(args.K, args.N, args.M, args.rank, args.reps) < 1:
        p.error("K, N, M, rank and reps must be positive")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    gen = torch.Generator().manual_seed(0)
    weight = compress_weight(torch.randn(args.N, args.K, generator=gen) / args.K**0.5, args.format)
    weight = weight.to(dtype).to(device)
    x = torch.randn(args.M, args.K, generator=gen).to(device, dtype)
    A = (torch.randn(args.rank, args.K, generator=gen) / args.K**0.5).to(device, dtype)
    B = (torch.randn(args.N, args.rank, generator=gen) / args.rank**0.5).to(device, dtype)
    dy = torch.randn(args.M, args.N, generator=gen).to(device, dtype)
    if args.op == "forward":
        def call():
            return ops.lora_linear(x, weight, A, B, 2.0, backend="triton")
    else:
        def call():
            return ops.base_matmul_t(dy, weight, backend="triton")
    for _ in range(args.reps):
        out = call()
    if device.type == "cuda":  # the call a profiler filters on (ncu --nvtx --nvtx-include "loraq_call/")
        with torch.cuda.nvtx.range(NVTX_RANGE):
            out = call()
    else:
        out = call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    op = "fwd" if args.op == "forward" else "dx"
    chosen = "; ".join(describe(c) for _, c in picked(f"lora_linear_{op}:{args.format}:", args.M, args.N, args.K,
                                                      dtype)) or "not tuned (no GPU)"
    print(f"{args.op} {args.format} {args.K}→{args.N} M={args.M} {args.dtype} on {device}: {1 + args.reps} calls, "
          f"output {tuple(out.shape)}; kernel: {chosen}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
