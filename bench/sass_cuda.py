"""Compile loraq's CUDA GEMVs for Hopper with nvcc and summarise them, no GPU needed.

Every instantiation a launcher can pick is compiled for sm_90 in one nvcc call (seconds: the
headers have no torch in them):
* ``mma``: the int1 mma GEMV (csrc/int1_gemv_mma.cuh): dtype x scale mode x 16-byte loads x tiles
  of x x finish (two launches, or ``one``: the one-launch finish, csrc/gemv_finish.cuh) x row
  groups a task (``rg``: 16-row x 512-input tasks, or 32 x 256, two launches only); its loop is the
  one that holds the mma (one task);
* ``sparse``: the sparse4x4 gather (csrc/sparse4x4_gemv.cuh): dtype x rows of x x 16-byte loads;
  its loop is the one with the most FFMA (one task: a lane's 32 stored values);
* ``sparse_mma``: the sparse4x4 tensor-core kernel (csrc/sparse4x4_gemv_mma.cuh): dtype x 16-byte
  loads x tiles of x x finish (two launches or one); its loop is the one that holds the mma (one task: 16 weight rows x 128 tile
  columns, 512 stored values);
* ``lut``: the int1 lookup GEMV for one row of x (csrc/int1_gemv_lut.cuh): dtype x scale mode (row,
  group, onebit) x 16-byte loads x finish; its loop is the one with the most LDS (one task: a
  lane's 2 x 256 weights, 128 lookups);
* ``lut8``: the int1 byte-lookup GEMV for one row of x (csrc/int1_gemv_lut8.cuh): dtype x scale mode
  x finish; its loop is the one with the most LDS (a batch: 8 rows, 32 lookups of 8 weights a lane).
Per kernel: the registers, the spills, and the opcodes of that loop.

    python bench/sass_cuda.py                    # one line each, both kernels
    python bench/sass_cuda.py --kernel sparse --top 20   # and the loop's most frequent opcodes
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
_interpret = os.environ.get("TRITON_INTERPRET")
from sass_report import cuobjdump, loops  # noqa: E402  (it unsets TRITON_INTERPRET: it compiles Triton kernels)

if _interpret is not None:  # nothing here compiles Triton: leave the caller's setting (a test process's) as it was
    os.environ["TRITON_INTERPRET"] = _interpret

CSRC = Path(__file__).resolve().parents[1] / "csrc"
DTYPES = {"fp16": "__half", "bf16": "__nv_bfloat16"}
MODES = {0: "row", 1: "group", 2: "onebit", 3: "row+offset", 4: "onebit+offset"}  # 3, 4: the offset decode
KERNELS = ("mma", "sparse", "sparse_mma", "lut", "lut8")
HEADERS = {"mma": "int1_gemv_mma.cuh", "sparse": "sparse4x4_gemv.cuh", "sparse_mma": "sparse4x4_gemv_mma.cuh",
           "lut": "int1_gemv_lut.cuh", "lut8": "int1_gemv_lut8.cuh"}


def nvcc() -> Optional[str]:
    """nvcc on PATH, or under $CUDA_HOME or /usr/local/cuda; None if there is none."""
    for path in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if path and os.path.isfile(path):
            return path
    return None


def instantiations(kernel: str = "mma") -> List[Dict]:
    if kernel == "mma":
        # rg: row groups a task (2: 32-row tasks, two launches only)
        return [dict(kernel=kernel, dtype=d, mode=m, vec=v, tiles=nt, one=one, rg=rg)
                for d, m, v, nt, one, rg in itertools.product(DTYPES, MODES, (True, False), (1, 2), (False, True), (1, 2))
                if not (one and rg == 2)]
    if kernel == "sparse":
        return [dict(kernel=kernel, dtype=d, rows=r, vec=v) for d, r, v in itertools.product(DTYPES, (1, 2, 4, 8),
                                                                                               (True, False))]
    if kernel == "sparse_mma":
        return [dict(kernel=kernel, dtype=d, vec=v, tiles=nt, one=one)
                for d, v, nt, one in itertools.product(DTYPES, (True, False), (1, 2), (False, True))]
    if kernel == "lut":
        return [dict(kernel=kernel, dtype=d, mode=m, vec=v, one=one)
                for d, m, v, one in itertools.product(DTYPES, (0, 1, 2), (True, False), (False, True))]
    if kernel == "lut8":  # 32-bit loads only: no vec
        return [dict(kernel=kernel, dtype=d, mode=m, vec=True, one=one)
                for d, m, one in itertools.product(DTYPES, (0, 1, 2), (False, True))]
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def _template(inst) -> str:
    """The explicit instantiation's line and the template arguments as the Itanium ABI mangles
    them (to find each kernel's SASS)."""
    t, vec = DTYPES[inst["dtype"]], str(inst["vec"]).lower()
    mangled_t = "6__half" if inst["dtype"] == "fp16" else "13__nv_bfloat16"
    if inst["kernel"] == "mma":
        one = str(inst["one"]).lower()
        line = (f"template __global__ void loraq_mma::int1_gemv_mma_kernel<{t}, {inst['mode']}, {vec}, "
                f"{inst['tiles']}, {one}, {inst['rg']}>(const loraq_mma::Args);")
        return line, (f"I{mangled_t}Li{inst['mode']}ELb{int(inst['vec'])}ELi{inst['tiles']}ELb{int(inst['one'])}E"
                      f"Li{inst['rg']}EE")
    if inst["kernel"] == "lut":
        one = str(inst["one"]).lower()
        line = (f"template __global__ void loraq_lut::int1_gemv_lut_kernel<{t}, {inst['mode']}, {vec}, {one}>"
                "(const loraq_mma::Args);")
        return line, f"I{mangled_t}Li{inst['mode']}ELb{int(inst['vec'])}ELb{int(inst['one'])}EE"
    if inst["kernel"] == "lut8":
        one = str(inst["one"]).lower()
        line = (f"template __global__ void loraq_lut8::int1_gemv_lut8_kernel<{t}, {inst['mode']}, {one}>"
                "(const loraq_mma::Args);")
        return line, f"I{mangled_t}Li{inst['mode']}ELb{int(inst['one'])}EE"
    if inst["kernel"] == "sparse_mma":
        args = "loraq_sparse_mma::MmaArgs" if inst["one"] else "loraq_sparse::Args"
        line = (f"template __global__ void loraq_sparse_mma::sparse4x4_gemv_mma_kernel<{t}, {vec}, {inst['tiles']}, "
                f"{str(inst['one']).lower()}>(const {args});")
        return line, f"I{mangled_t}Lb{int(inst['vec'])}ELi{inst['tiles']}ELb{int(inst['one'])}EE"
    line = (f"template __global__ void loraq_sparse::sparse4x4_gemv_kernel<{t}, {inst['rows']}, {vec}>"
            "(const loraq_sparse::Args);")
    return line, f"I{mangled_t}Li{inst['rows']}ELb{int(inst['vec'])}EE"


def compile_all(arch: int = 90, kernel: str = "mma") -> List[Dict]:
    """Compile every instantiation of ``kernel`` (one of ``KERNELS``); returns one dict each:
    the instantiation, ``registers``, ``spill_bytes`` and ``loop`` (opcode Counter of its main
    loop, or None). Raises RuntimeError with nvcc's output if it fails."""
    compiler = nvcc()
    if compiler is None:
        raise RuntimeError("no nvcc (set CUDA_HOME or put nvcc on PATH)")
    insts = instantiations(kernel)
    header = CSRC / HEADERS[kernel]
    lines = [f'#include "{header}"'] + [_template(i)[0] for i in insts]
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "inst.cu", Path(tmp) / "inst.cubin"
        src.write_text("\n".join(lines) + "\n")
        done = subprocess.run([compiler, "-O3", f"-arch=sm_{arch}", "-cubin", "-o", str(cubin), str(src),
                               "-Xptxas", "-v"], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"nvcc failed:\n{done.stdout}\n{done.stderr}")
        sass = subprocess.run([cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    # ptxas -v: "Compiling entry function '<name>'", "Function properties for <name>", then "... N bytes
    # spill stores ..." and "Used N registers". A device function called by a kernel (not inlined)
    # gets its own "Function properties": its spills are not the kernel's (call_spill_bytes, added to
    # the kernel that calls it: one such function a kernel here).
    usage, name, callee = {}, None, None
    for line in done.stderr.splitlines():
        m = re.search(r"entry function '(\w+)'", line)
        if m:
            name, callee = m.group(1), None
            usage[name] = {"spill_bytes": 0, "call_spill_bytes": 0}
        m = re.search(r"Function properties for (\w+)", line)
        if m:
            callee = None if m.group(1) in usage else m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            usage[name]["call_spill_bytes" if callee else "spill_bytes"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            usage[name]["registers"] = int(m.group(1))
    functions = re.split(r"\n\s*Function : ", sass)
    key_op = {"sparse": "FFMA", "lut": "LDS", "lut8": "LDS"}.get(kernel, "HMMA")
    out = []
    for inst in insts:
        key = _template(inst)[1]
        names = [n for n in usage if key in n]
        if len(names) != 1:
            raise RuntimeError(f"could not find the kernel {key} in ptxas's report")
        body = next(f for f in functions if f.startswith(names[0]))
        main_loops = [c for _, _, c in loops(body) if c.get(key_op)]
        loop = max(main_loops, key=lambda c: c[key_op]) if main_loops else None
        out.append(dict(inst, **usage[names[0]], loop=loop))
    return out


def describe(r: Dict) -> str:
    """One line for a compiled instantiation."""
    loop = r["loop"] or {}
    total = sum(loop.values())
    loads = "16-byte" if r["vec"] else "scalar "
    if r["kernel"] == "mma":
        what = (f"int1 mma {r['dtype']} {MODES[r['mode']]:13s} {loads} loads, {r['tiles']} tile(s) of x, "
                f"{16 * r['rg']}-row tasks" + (", one launch" if r["one"] else ""))
        # a task is 16 x 512 or 32 x 256 weights either way: instructions and LDS compare directly
        ops = f"{loop.get('HMMA', 0)} HMMA, {loop.get('LOP3', 0)} LOP3, {loop.get('LDS', 0)} LDS"
    elif r["kernel"] == "lut":
        what = (f"int1 lookup {r['dtype']} {MODES[r['mode']]:13s} {loads} loads"
                + (", one launch" if r["one"] else ""))
        # a lookup (an LDS) is 4 weights of a lane; the loop holds two tasks of 256
        ops = f"{total / max(1, 4 * loop.get('LDS', 0)):.2f} a weight; {loop.get('LDS', 0)} LDS, {loop.get('LOP3', 0)} LOP3, {loop.get('FADD', 0)} FADD"
    elif r["kernel"] == "lut8":
        what = (f"int1 byte lookup {r['dtype']} {MODES[r['mode']]:13s} 4-byte loads"
                + (", one launch" if r["one"] else ""))
        # a lookup (an LDS) is 8 weights of a lane; the loop is one batch of 8 rows (32 LDS)
        ops = (f"{total / max(1, 8 * loop.get('LDS', 0)):.3f} a weight; {loop.get('LDS', 0)} LDS, "
               f"{loop.get('PRMT', 0)} PRMT, {loop.get('FADD', 0)} FADD, {loop.get('SHFL', 0)} SHFL")
    elif r["kernel"] == "sparse_mma":
        what = (f"sparse4x4 mma {r['dtype']} {loads} loads, {r['tiles']} tile(s) of x"
                + (", one launch" if r["one"] else ""))
        # a task: 16 weight rows (4 tile rows) x 32 mma steps of 4 tile columns = 512 stored values
        ops = f"{total / 512:.2f} a stored value; {loop.get('HMMA', 0)} HMMA, {loop.get('PRMT', 0)} PRMT"
    else:
        what = f"sparse4x4 gather {r['dtype']} {r['rows']} row(s) of x a block, {loads} loads"
        ops = f"{total / 32:.1f} a stored value; {loop.get('FFMA', 0)} FFMA, {loop.get('LDS', 0)} LDS"
    return (f"{what}: {r['registers']} registers, {r['spill_bytes']} bytes spilled, loop {total} instructions "
            f"({ops})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--kernel", choices=KERNELS + ("all",), default="all")
    p.add_argument("--top", type=int, default=0, help="also print the loop's N most frequent opcodes")
    args = p.parse_args(argv)
    for kernel in (KERNELS if args.kernel == "all" else (args.kernel,)):
        for r in compile_all(args.arch, kernel):
            print(describe(r))
            if args.top and r["loop"]:
                print("   " + ", ".join(f"{op} {n}" for op, n in r["loop"].most_common(args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
