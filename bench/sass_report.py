"""Compile a loraq kernel for Hopper (sm_90) on any machine and summarise its SASS, no GPU needed.

Answers "did the config get wgmma (HGMMA) or mma.sync (HMMA)?", "does it spill (LDL/STL)?",
"how much shared memory?" and "which instructions dominate?" before any device time is spent.

    python bench/sass_report.py fwd int1 "(16, 128, 128, 4, 4, 3, 1)"
    python bench/sass_report.py fwd int1 "(16, 128, 128, 4, 4, 3, 8)"    # signs decoded in pair order
    python bench/sass_report.py dx sparse4x4 "(128, 128, 64, 1, 8, 3, 1)" --dtype bf16
    python bench/sass_report.py fwd int1 lut          # every lookup-GEMV candidate, one line each
    python bench/sass_report.py dx sparse4x4 tiled    # every tiled candidate (small, middle, large batches)
    python bench/sass_report.py fwd int1 "(32, 256, 4096, 1, 4, 1, 7)"   # the dense-slab decode
    python bench/sass_report.py fwd int1 "(32, 256, 4096, 3, 4, 1, 7)"   # merged: Ŵ + s·B·A
    python bench/sass_report.py dx int1 "(16, 64, 128, 4, 4, 2, 8)" --scale 1   # per-group scales
    python bench/sass_report.py check     # every kernel, variant and scale mode compiles (exit 1 if not)
    python bench/sass_report.py check --arch 80    # the same for the A100
"""

from __future__ import annotations

import argparse
import ast
import collections
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.pop("TRITON_INTERPRET", None)  # this compiles (never runs) kernels: the interpreter has no compiler

SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]+)")


def cuobjdump() -> str:
    """The cuobjdump Triton ships (or the one on PATH)."""
    import shutil

    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found = str(bundled) if bundled.is_file() else shutil.which("cuobjdump")
    if not found:
        raise SystemExit("sass_report: no cuobjdump (neither Triton's bundled one nor on PATH)")
    return found


def ast_source(fn, sig, constexprs, divisible_by_16):
    """Triton's ``ASTSource`` for ``fn``: ``sig`` maps every argument to its type (``"constexpr"``
    for those in ``constexprs``, name to value), ``divisible_by_16`` the indices of arguments known
    to be multiples of 16. Its arguments changed twice: Triton 3.0-3.2 take the constexprs'
    values as ``constants`` and their signature without them, and their own ``AttrsDescriptor``
    (3.2: built from a dict); 3.3 and later take ``constexprs`` and a dict of attributes."""
    from triton.compiler import ASTSource

    if "constexprs" in inspect.signature(ASTSource).parameters:
        attrs = {(i,): [["tt.divisibility", 16]] for i in divisible_by_16}
        return ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    try:
        from triton.compiler import AttrsDescriptor  # 3.0, 3.1
    except ImportError:
        from triton.backends.compiler import AttrsDescriptor  # 3.2

    if "divisible_by_16" in inspect.signature(AttrsDescriptor).parameters:  # 3.0, 3.1
        attrs = AttrsDescriptor(divisible_by_16=set(divisible_by_16), equal_to_1=set())
    else:  # 3.2
        attrs = AttrsDescriptor.from_dict({"arg_properties": {"tt.divisibility": list(divisible_by_16)},
                                           "cls": AttrsDescriptor.__name__})
    plain = {name: ty for name, ty in sig.items() if name not in constexprs}
    return ASTSource(fn, plain, dict(constexprs), attrs)


def compile_kernel(op: str, fmt: str, cfg, dtype: str = "fp16", arch: int = 90, aligned: bool = True,
                   scale: int = 0, group32: bool = False):
    """``(compiled kernel, SASS text)`` for the forward (``fwd``) or ``dx`` kernel with LoRA on;
    a forward config whose variant is ``LUT`` or one of ``GATHER_FWD`` compiles that GEMV. ``aligned``:
    compile as for the large shapes, whose pointers and sizes Triton knows to be multiples of 16.
    ``scale``: int1's scale mode (0 per row, 1 per group, 2 onebit); ``group32``: per-group scales
    whose group size is a multiple of 32 (the forward's pair decode takes them in place of 1.0)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from kernels.autotune import (DENSE_SLAB, DOT_PAIRS, DOT_SWAP, GATHER, GATHER_FWD, GATHER_T, GATHER_T_X4,
                                  GATHER_X4, LUT, SLAB_MERGE)
    from kernels.dense_slab import _decode_slab_kernel
    from kernels.int1_gemv_lut import _int1_gemv_lut_kernel
    from kernels.lora_linear_dx import _lora_linear_dx_kernel, dx_pipelining
    from kernels.lora_linear_fwd import _lora_linear_fwd_kernel
    from kernels.sparse4x4_gemv import _sparse4x4_gemv_kernel
    from kernels.sparse4x4_gemv_dx import _sparse4x4_gemv_dx_kernel
    from kernels.splitk_finish import one_launch_offered

    bm, out_tile, red_tile, split, warps, stages, swap = cfg  # a dense slab's: stages = its buffers
    F = 0 if fmt == "int1" else 1
    if scale not in (0, 1, 2) or (scale and F) or (group32 and scale != 1):
        raise SystemExit(f"sass_report: scale mode {scale} (group32 {group32}) does not fit {fmt}: int1 takes "
                         f"0, 1 (per group; group32 only there) or 2, sparse4x4 only 0")
    act, w0, w1 = f"*{dtype}", ("*i32" if F == 0 else f"*{dtype}"), (f"*{dtype}" if F == 0 else "*u8")
    out = act if split == 1 else "*fp32"
    wdt = {"fp16": 0, "bf16": 1, "fp32": 2}[dtype]
    if swap == LUT and (op != "fwd" or fmt != "int1"):
        raise SystemExit(f"sass_report: config {cfg} is a forward GEMV of int1")
    if swap in GATHER_FWD and swap != GATHER and op != "fwd":
        raise SystemExit(f"sass_report: config {cfg} is a forward GEMV (dX has only the plain gather)")
    if swap in GATHER_FWD and fmt != "sparse4x4":
        raise SystemExit(f"sass_report: config {cfg} is a GEMV of sparse4x4")
    if swap == DENSE_SLAB:  # the slab decode (either op: the forward's strip of B on the right), merged or not
        fn = _decode_slab_kernel
        ptrs = [("w0_ptr", w0), ("w1_ptr", w1), ("w2_ptr", act), ("lora_ptr", act), ("bias_ptr", act), ("out_ptr", act),
                ("mb_ptr", act), ("ma_ptr", act)]
        scalars = ["n0", "k0", "ROWS", "COLS", "N", "K", "R", "EXT", "s", "W_A", "W_B", "W_C", "stride_out",
                   "stride_lora", "stride_mb", "stride_ma"]
        cx = dict(FORMAT=F, SCALE=scale, LORA_COLS=op == "fwd", HAS_BIAS=op == "fwd", ASM=True, MERGE=split == SLAB_MERGE,
                  IEEE=dtype == "fp32", UPCAST=False, BLOCK_N=bm, BLOCK_K=out_tile, BLOCK_E=16, BLOCK_R=16)
    elif swap == LUT:
        fn = _int1_gemv_lut_kernel
        ptrs = [("x_ptr", act), ("packed_ptr", "*i32"), ("scale_ptr", act), ("col_ptr", act), ("a_ptr", act),
                ("parts_ptr", "*fp32"), ("ws_ptr", "*fp32"), ("y_ptr", act), ("b_ptr", act), ("bias_ptr", act),
                ("cnt_ptr", "*i32")]
        scalars = ["M", "N", "K", "KW", "G", "group_size", "R", "stride_xm", "stride_ar", "s", "stride_bn",
                   "stride_ym"]
        # LORAQ_ONE_LAUNCH=1: the finish in the same launch, as a call would run it
        one = one_launch_offered()
        cx = dict(SCALE=scale, HAS_LORA=True, BLOCK_R=16, UPCAST=False, ROWS=bm, BLOCK_N=out_tile, CHUNK_K=red_tile,
                  BITS=split, ONE_LAUNCH=one, HAS_BIAS=one, BLOCK_S=16)
    elif swap == GATHER and op == "dx":
        fn = _sparse4x4_gemv_dx_kernel
        ptrs = [("dy_ptr", act), ("values_ptr", act), ("pos_ptr", "*u8"), ("dyb_ptr", act), ("a_ptr", act),
                ("dx_ptr", out)]
        scalars = ["M", "N", "K", "TK", "PW", "s", "R", "N_PER_SPLIT", "stride_dym", "stride_dxm", "stride_bm",
                   "stride_ar"]
        cx = dict(HAS_LORA=True, BLOCK_R=16, ROWS=bm, BLOCK_K=out_tile, BLOCK_N=red_tile, SPLIT_N=split)
    elif swap in GATHER_FWD:
        fn = _sparse4x4_gemv_kernel
        ptrs = [("x_ptr", act), ("values_ptr", act), ("pos_ptr", "*u8"), ("a_ptr", act), ("parts_ptr", "*fp32"),
                ("ws_ptr", "*fp32"), ("y_ptr", act), ("b_ptr", act), ("bias_ptr", act), ("cnt_ptr", "*i32")]
        scalars = ["M", "N", "K", "TK", "PW", "R", "K_PER_SPLIT", "stride_xm", "stride_ar", "s", "stride_bn",
                   "stride_ym"]
        one = one_launch_offered()  # LORAQ_ONE_LAUNCH=1, as for the lookup GEMV
        cx = dict(HAS_LORA=True, BLOCK_R=16, IEEE=dtype == "fp32", UPCAST=False, ROWS=bm, BLOCK_N=out_tile,
                  BLOCK_K=red_tile, TRANSPOSE=swap in (GATHER_T, GATHER_T_X4), X4=swap in (GATHER_X4, GATHER_T_X4),
                  ONE_LAUNCH=one, HAS_BIAS=one, BLOCK_S=16)
    elif op == "fwd":
        fn = _lora_linear_fwd_kernel
        ptrs = [("x_ptr", act), ("w0_ptr", w0), ("w1_ptr", w1), ("w2_ptr", act), ("xa_ptr", act), ("b_ptr", act),
                ("bias_ptr", act), ("y_ptr", out), ("a_ptr", act), ("parts_ptr", "*fp32")]
        scalars = ["M", "N", "K", "s", "K_PER_SPLIT", "W_A", "W_B", "W_C", "W_D", "stride_xm", "stride_ym",
                   "stride_am", "stride_bn", "stride_ar", "R", "ONE2"]
        if swap == DOT_PAIRS and fmt != "int1":
            raise SystemExit(f"sass_report: config {cfg} decodes int1 signs in pair order")
        cx = dict(FORMAT=F, SCALE=scale, HAS_LORA=True, HAS_BIAS=False, IEEE=dtype == "fp32", UPCAST=False, WDT=wdt,
                  BLOCK_R=16, BLOCK_M=bm, BLOCK_N=out_tile, BLOCK_K=red_tile, SPLIT_K=split,
                  SWAP=swap in (DOT_SWAP, DOT_PAIRS), PAIRS=swap == DOT_PAIRS, GROUP32=group32, ASM=True)
    elif op == "dx":
        fn = _lora_linear_dx_kernel
        ptrs = [("dy_ptr", act), ("w0_ptr", w0), ("w1_ptr", w1), ("w2_ptr", act), ("dyb_ptr", act), ("a_ptr", act),
                ("dx_ptr", out)]
        scalars = ["M", "N", "K", "N_PER_SPLIT", "s", "W_A", "W_B", "W_C", "W_D", "stride_dym", "stride_dxm",
                   "stride_bm", "stride_ar", "R"]
        if swap == DOT_PAIRS and fmt != "int1":
            raise SystemExit(f"sass_report: config {cfg} decodes int1 signs in pair order")
        cx = dict(FORMAT=F, SCALE=scale, HAS_LORA=True, IEEE=dtype == "fp32", UPCAST=False, WDT=wdt, BLOCK_R=16,
                  BLOCK_M=bm, BLOCK_K=out_tile, BLOCK_N=red_tile, SPLIT_N=split, SWAP=swap in (DOT_SWAP, DOT_PAIRS),
                  PAIRS=swap == DOT_PAIRS, PREFETCH=dx_pipelining(cfg)[1], ASM=True)
        stages = dx_pipelining(cfg)[0]
    else:
        raise SystemExit(f"sass_report: op is fwd or dx, got {op!r}")
    sig = dict(ptrs)
    sig.update({n: ("fp32" if n == "s" else "i32") for n in scalars})
    sig.update({k: "constexpr" for k in cx})
    # as Triton specializes a launch at the large shapes: 16-byte aligned pointers, and sizes and
    # strides that are multiples of 16 (what lets it vectorize loads); M is the batch, so left out
    names = list(fn.arg_names)
    aligned = [n for n, _ in ptrs] + [n for n in scalars if n not in ("s", "M")] if aligned else []
    source = ast_source(fn, sig, cx, [names.index(n) for n in aligned])
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=warps, num_stages=1 if swap == DENSE_SLAB else stages))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([cuobjdump(), "-sass", str(path)], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([cuobjdump(), "-res-usage", str(path)], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    kernel.registers = int(regs.group(1)) if regs else None  # per thread: with num_warps, the occupancy
    return kernel, sass


def summarise(sass: str) -> collections.Counter:
    """Static count of each SASS opcode (modifiers dropped)."""
    return collections.Counter(SASS_OP.findall(sass))


SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
SASS_TARGET = re.compile(r"BRA\b.*?0x([0-9a-f]+)")


def loops(sass: str):
    """``[(start, end, Counter)]`` for each loop in the SASS (a branch back to an earlier
    address): what one iteration executes, the count that matters for a streaming kernel."""
    body = [(int(a, 16), text) for a, text in SASS_LINE.findall(sass)]
    found = []
    for addr, text in body:
        target = SASS_TARGET.search(text)
        if target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            found.append((start, addr, summarise("\n".join(f"/*{a:04x}*/ {t};" for a, t in body if start <= a <= addr))))
    return found


def candidates(name: str, fmt: str = "int1", op: str = "fwd"):
    """``(format, config)`` for every candidate the autotuner may time: of a GEMV, ``lut`` (int1,
    for each batch bucket it covers) or ``gather`` (sparse4x4; the forward's both axis orders
    when ``op`` is fwd), or ``tiled``: the tiled kernels' small-, middle- and large-batch lists
    for ``fmt`` (int1: with the pair decode's)."""
    from kernels.autotune import (GATHER_MAX_M, LARGE_M, LUT_MAX_M, MID_M, PAIRS_MAX_M, SMALL_M, gather_configs,
                                  gather_fwd_configs, lut_configs, m_bucket, pairs_configs)

    if name == "tiled":  # int1: the pair decode's too
        pairs = pairs_configs(1, op) + pairs_configs(PAIRS_MAX_M, op) if fmt == "int1" else []
        return [(fmt, c) for c in dict.fromkeys(SMALL_M + MID_M + LARGE_M + pairs)]
    gathers = gather_fwd_configs if op == "fwd" else gather_configs
    fmt, configs, top = ("int1", lut_configs, LUT_MAX_M) if name == "lut" else ("sparse4x4", gathers, GATHER_MAX_M)
    return [(fmt, c) for m in sorted({m_bucket(m) for m in range(1, top + 1)}) for c in configs(m)]


def check_matrix():
    """``(op, format, config, dtype, scale, group32)``: each kernel once for each branch its
    constexprs select (the tiled kernels' orientations and pair decode with and without dX's
    prefetch, int1's three scale modes, the GEMVs' variants, the slab decode merged or not), in
    fp16, and bf16 / fp32 where the decode differs. The interpreter runs Python, so a construct
    that only the compiler refuses (a return inside an if, in Triton 3.6) passes every CPU test."""
    from kernels.autotune import (DENSE_SLAB, DOT, DOT_PAIRS, DOT_SWAP, GATHER, GATHER_FWD, LUT, SLAB_MERGE,
                                  SLAB_WIDEN)
    from kernels.triton_support import gather_problem

    int1_modes = [(0, False), (1, False), (2, False)]
    combos = []
    for op in ("fwd", "dx"):
        for variant in (DOT, DOT_SWAP):
            combos += [(op, "int1", (16, 64, 64, 1, 4, 2, variant), "fp16", sc, g) for sc, g in int1_modes]
            combos.append((op, "sparse4x4", (16, 64, 64, 1, 4, 2, variant), "fp16", 0, False))
        pairs = [(16, 128, 64, 4, 4, 3, DOT_PAIRS)] if op == "fwd" else [(16, 64, 128, 4, 4, stages, DOT_PAIRS)
                                                                          for stages in (1, 2)]
        modes = int1_modes + [(1, True)] if op == "fwd" else int1_modes
        combos += [(op, "int1", c, dt, sc, g) for c in pairs for dt in ("fp16", "bf16") for sc, g in modes]
        combos.append((op, "int1", (16, 32, 64, 1, 4, 2, DOT_PAIRS), "fp32", 0, False))
        for placement in (SLAB_WIDEN, SLAB_MERGE):
            warps = 8 if placement == SLAB_MERGE else 4
            combos += [(op, "int1", (32, 256, 4096, placement, warps, 1, DENSE_SLAB), "fp16", sc, g)
                       for sc, g in int1_modes]
            combos.append((op, "sparse4x4", (32, 256, 4096, placement, warps, 1, DENSE_SLAB), "fp16", 0, False))
    if not gather_problem():  # where it is missing the tuner never offers the lookup GEMV
        combos += [("fwd", "int1", (1, 256, 256, 4, 4, 1, LUT), "fp16", sc, g) for sc, g in int1_modes]
    combos += [("fwd", "sparse4x4", (1, 64, 128, 4, 4, 2, v), "fp16", 0, False) for v in GATHER_FWD]
    combos.append(("dx", "sparse4x4", (1, 64, 128, 4, 4, 2, GATHER), "fp16", 0, False))
    return combos


def check(arch: int = 90) -> int:
    """Compile every :func:`check_matrix` combination for ``sm_{arch}``, one line each; returns the
    number that failed to compile (spills are reported, not counted)."""
    import triton

    failed = 0
    for op, fmt, cfg, dtype, scale, group32 in check_matrix():
        name = f"{op} {fmt} {cfg} {dtype} scale {scale}{' group32' if group32 else ''}"
        try:
            kernel, sass = compile_kernel(op, fmt, cfg, dtype, arch, scale=scale, group32=group32)
        except Exception as e:  # noqa: BLE001 -- any compiler error is the finding
            failed += 1
            print(f"FAILED {name}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}", flush=True)
            continue
        ops = summarise(sass)
        print(f"ok {name}: {kernel.registers} registers, spills {ops['LDL'] + ops['STL']}", flush=True)
    from kernels.triton_support import gather_problem

    if gather_problem():
        print(f"not compiled: {gather_problem()}")
    print(f"{failed} of {len(check_matrix())} failed to compile for sm_{arch} (Triton {triton.__version__})")
    return failed


def report(op: str, fmt: str, cfg, dtype: str, aligned: bool, top: int, scale: int = 0, group32: bool = False) -> int:
    """Print the summary of one config; returns its spill instructions."""
    kernel, sass = compile_kernel(op, fmt, cfg, dtype, aligned=aligned, scale=scale, group32=group32)
    ops = summarise(sass)
    mma = "HGMMA (wgmma)" if ops["HGMMA"] else ("HMMA (mma.sync)" if ops["HMMA"] else "none")
    spills = ops["LDL"] + ops["STL"]
    import triton

    print(f"{op} {fmt} {cfg} {dtype} (Triton {triton.__version__}): tensor cores {mma}; shared memory "
          f"{kernel.metadata.shared} B; {kernel.registers} registers a thread; local-memory instructions (spills) {spills}; "
          f"{sum(ops.values())} instructions")
    if top:
        print("  " + " ".join(f"{k}:{v}" for k, v in ops.most_common(top)))
    for start, end, body in loops(sass):
        print(f"  loop {start:#x}-{end:#x}, one iteration: {sum(body.values())} instructions; "
              + " ".join(f"{k}:{v}" for k, v in body.most_common(top or 8)))
    return spills


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("op", choices=["fwd", "dx", "check"],
                   help="check: compile every kernel in each scale mode and variant (exit 1 if one fails)")
    p.add_argument("format", nargs="?", choices=["int1", "sparse4x4"])
    p.add_argument("config", nargs="?", help="an autotune Config tuple, e.g. \"(16, 128, 128, 4, 4, 3, 1)\", or \"lut\" / "
                                  "\"gather\" / \"tiled\": every candidate of that kernel, one line each (exit 1 if "
                                  "one spills)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.add_argument("--top", type=int, default=24)
    p.add_argument("--unaligned", action="store_true",
                   help="compile without the multiple-of-16 hints of large shapes (as for odd sizes)")
    p.add_argument("--scale", type=int, choices=[0, 1, 2], default=0,
                   help="int1's scale mode: 0 per row, 1 per group, 2 onebit (default 0)")
    p.add_argument("--group32", action="store_true",
                   help="with --scale 1: a group size that is a multiple of 32 (the forward's pair decode)")
    p.add_argument("--arch", type=int, default=90, help="with check: the GPU architecture, e.g. 80 for the A100 "
                   "(default 90, Hopper)")
    args = p.parse_args(argv)
    if args.op == "check":
        if args.format or args.config:
            p.error("check takes no format or config")
        return 1 if check(args.arch) else 0
    if args.arch != 90:
        p.error("--arch goes with check (the single reports are for sm_90)")
    if not args.format or not args.config:
        p.error("fwd and dx take a format and a config")
    if args.config in ("lut", "gather", "tiled"):
        want = {"lut": "int1", "gather": "sparse4x4"}.get(args.config, args.format)
        if args.format != want or (args.config == "lut" and args.op != "fwd"):
            p.error(f"{args.config} is a {'forward ' if args.config == 'lut' else ''}GEMV of {want}")
        spilled = [cfg for fmt, cfg in candidates(args.config, args.format, args.op)
                   if report(args.op, fmt, cfg, args.dtype, not args.unaligned, 0)]
        if spilled:
            print(f"these candidates spill: {spilled}")
        return 1 if spilled else 0
    try:
        cfg = tuple(ast.literal_eval(args.config))
        assert len(cfg) == 7 and all(isinstance(v, int) for v in cfg)
    except Exception:
        p.error(f"config must be a tuple of 7 integers (or lut / gather), got {args.config!r}")
    report(args.op, args.format, cfg, args.dtype, not args.unaligned, args.top, args.scale, args.group32)
    return 0


if __name__ == "__main__":
    sys.exit(main())
