"""Compile the CUDA mma GEMV (csrc/int1_gemv_mma.cuh) for Hopper with nvcc and summarise it, no GPU needed.

Every instantiation the launcher can pick (dtype x scale mode x 16-byte loads x tiles of x) is
compiled for sm_90 in one nvcc call (seconds: the header has no torch in it). Per kernel: the
registers, the spills, and the opcodes of the loop that holds the mma (one 16-row x 512-input task).

    python bench/sass_cuda.py              # one line each
    python bench/sass_cuda.py --top 20     # and the loop's most frequent opcodes
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

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "int1_gemv_mma.cuh"
DTYPES = {"fp16": "__half", "bf16": "__nv_bfloat16"}
MODES = {0: "row", 1: "group", 2: "onebit"}


def nvcc() -> Optional[str]:
    """nvcc on PATH, or under $CUDA_HOME or /usr/local/cuda; None if there is none."""
    for path in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if path and os.path.isfile(path):
            return path
    return None


def instantiations() -> List[Dict]:
    return [dict(dtype=d, mode=m, vec=v, tiles=nt)
            for d, m, v, nt in itertools.product(DTYPES, MODES, (True, False), (1, 2))]


def _mangled_args(inst) -> str:
    """The template arguments as the Itanium ABI mangles them, to find each kernel's SASS."""
    t = "6__half" if inst["dtype"] == "fp16" else "13__nv_bfloat16"
    return f"I{t}Li{inst['mode']}ELb{int(inst['vec'])}ELi{inst['tiles']}EE"


def compile_all(arch: int = 90) -> List[Dict]:
    """Compile every instantiation; returns one dict each: the instantiation, ``registers``,
    ``spill_bytes`` and ``loop`` (opcode Counter of the mma loop). Raises RuntimeError with
    nvcc's output if it fails."""
    compiler = nvcc()
    if compiler is None:
        raise RuntimeError("no nvcc (set CUDA_HOME or put nvcc on PATH)")
    insts = instantiations()
    lines = [f'#include "{HEADER}"']
    for i in insts:
        lines.append(f"template __global__ void loraq_mma::int1_gemv_mma_kernel<{DTYPES[i['dtype']]}, {i['mode']}, "
                     f"{str(i['vec']).lower()}, {i['tiles']}>(const loraq_mma::Args);")
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "inst.cu", Path(tmp) / "inst.cubin"
        src.write_text("\n".join(lines) + "\n")
        done = subprocess.run([compiler, "-O3", f"-arch=sm_{arch}", "-cubin", "-o", str(cubin), str(src),
                               "-Xptxas", "-v"], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"nvcc failed:\n{done.stdout}\n{done.stderr}")
        sass = subprocess.run([cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    # ptxas -v: "Compiling entry function '<name>'", then "... N bytes spill stores ..." and "Used N registers"
    usage, name = {}, None
    for line in done.stderr.splitlines():
        m = re.search(r"entry function '(\w+)'", line)
        if m:
            name = m.group(1)
            usage[name] = {"spill_bytes": 0}
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            usage[name]["spill_bytes"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            usage[name]["registers"] = int(m.group(1))
    functions = re.split(r"\n\s*Function : ", sass)
    out = []
    for inst in insts:
        key = _mangled_args(inst)
        names = [n for n in usage if key in n]
        if len(names) != 1:
            raise RuntimeError(f"could not find the kernel {key} in ptxas's report")
        body = next(f for f in functions if f.startswith(names[0]))
        mma_loops = [c for _, _, c in loops(body) if c.get("HMMA")]
        loop = max(mma_loops, key=lambda c: c["HMMA"]) if mma_loops else None
        out.append(dict(inst, **usage[names[0]], loop=loop))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--top", type=int, default=0, help="also print the loop's N most frequent opcodes")
    args = p.parse_args(argv)
    for r in compile_all(args.arch):
        loop = r["loop"]
        total = sum(loop.values()) if loop else 0
        print(f"{r['dtype']} {MODES[r['mode']]:6s} {'16-byte' if r['vec'] else 'word   '} loads, {r['tiles']} tile(s) "
              f"of x: {r['registers']} registers, {r['spill_bytes']} bytes spilled, loop {total} instructions "
              f"({loop.get('HMMA', 0) if loop else 0} HMMA, {loop.get('LOP3', 0) if loop else 0} LOP3)")
        if args.top and loop:
            print("   " + ", ".join(f"{op} {n}" for op, n in loop.most_common(args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
