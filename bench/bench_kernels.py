"""Time loraq's compressed matmul + LoRA against cuBLAS and the usual alternatives, in one run.

    python bench/bench_kernels.py                      # the issue's shapes and batches on a GPU
    python bench/bench_kernels.py --csv out.csv --plot out.png --backward
    python bench/bench_kernels.py --backward-lora      # also dX with the LoRA term (the fused input gradient)
    TRITON_INTERPRET=1 python bench/bench_kernels.py   # on a CPU: small shapes, the harness itself

Providers (each skipped with its reason when unavailable):
  cublas       torch fp16 dense ``x·Wᵀ`` (cuBLAS on a GPU)
  cublas_lora  dense + the unfused LoRA path ``s·(x·Aᵀ)·Bᵀ``
  naive        dequantize ``Ŵ`` to dense, then matmul + LoRA (what you get without kernels)
  triton       loraq's fused Triton kernels
  cuda         loraq's CUDA kernels (when the extension registers them)
  triton_one   the forward as ``triton`` with ``LORAQ_ONE_LAUNCH=1`` (the small-batch GEMVs finish
               in their own launch; tuned apart), so that both are timed in one run
  gemlite      GemLite's 1-bit Triton matmul on the same int1 weight + unfused LoRA (when gemlite
               is installed; int1 per-row or per-group scales only)
  bnb_nf4      bitsandbytes NF4 ``matmul_4bit`` + unfused LoRA (when bitsandbytes is installed)

The other libraries' providers live in ``bench/baselines.py``; each checks its output against
``x·Ŵᵀ`` once before it is timed. ``bench/fetch_baselines.sh`` downloads them for a GPU machine
that has no network.

Times are medians: on a GPU from ``triton.testing.do_bench`` (L2 flushed between runs) and, for
launch-bound sizes, also under a CUDA graph; on a CPU from ``time.perf_counter``. Each row gives
the bytes the op must move at least (weights as stored, x, y, LoRA), the achieved GB/s, and the
percentage of the copy bandwidth measured in the same run. "vs cuBLAS" is the cuBLAS row's best
time over the row's, "-" where cuBLAS was not timed. ``--plot`` is skipped, with a message, when
no row was timed.

The ``backward_dx_lora`` bytes count ``A`` and ``dY·B`` (what that op reads). The CSVs in
``bench/results`` (runs up to 2026-11-23) counted ``A`` and ``B`` there instead; their rows are
measured history and stay as written, so their ``backward_dx_lora`` bytes, GB/s and % copy bw use
the old count.

Bad options (an unknown format or provider, a size that is not positive, ``--device cuda``
without a GPU) are refused before anything is measured or written. A run stopped early (a time
limit, ^C, an error) keeps and reports what it measured; it exits 1 if that is nothing. A loraq
kernel whose output is wrong is refused, not timed: the report names its problem and the run
exits 1. ``--from-csv`` refuses to merge runs of different devices, dtypes or ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import re
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import _disagrees, bnb_nf4, gemlite_int1  # noqa: E402
from loraq import ops, reference  # noqa: E402
from loraq.kernels.autotune import describe, picked  # noqa: E402
from loraq.formats import FORMATS, compress_weight  # noqa: E402

GPU_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (512, 1000)]  # (K, N)
GPU_BATCHES = [1, 4, 16, 64, 256, 4096]
CPU_SHAPES = [(96, 80), (45, 37)]
CPU_BATCHES = [1, 3, 17]
# (a new provider goes last: a plot's colour is its index here)
PROVIDERS = ["cublas", "cublas_lora", "naive", "triton", "cuda", "gemlite", "bnb_nf4", "triton_one"]
ONE_LAUNCH = {"LORAQ_ONE_LAUNCH": "1"}  # triton_one's switch, set while its row is checked and timed
COLUMNS = ["device", "op", "format", "K", "N", "M", "rank", "dtype", "provider", "median_us", "graph_us", "bytes",
           "GBps", "pct_copy_bw", "speedup_vs_cublas", "note"]
OPS = ["forward", "backward_dx", "backward_dx_lora"]


def parse_shapes(text: str) -> List[Tuple[int, int]]:
    """``--shapes``: ``KxN,...`` with positive K and N."""
    out = []
    for item in text.split(","):
        try:
            k, n = item.lower().split("x")
            out.append((int(k), int(n)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"shapes are KxN pairs like 4096x14336, got {item!r}") from None
        if min(out[-1]) < 1:
            raise argparse.ArgumentTypeError(f"shapes need K and N of at least 1, got {item!r}")
    return out


def ints(text: str) -> List[int]:
    """``--batches``: comma-separated positive integers, at least one."""
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers of at least 1, got {text!r}")
    return out


def positive(text: str) -> int:
    """An integer option that must be at least 1 (``--reps``, ``--rank``)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {text!r}")
    return value


def check_outputs(p: argparse.ArgumentParser, args) -> None:
    """Refuse (``p.error``, exit 2) an output file that cannot be written: a folder, a path under a
    file, ``--plot`` without matplotlib. The Markdown and the plot are written at the end of a run:
    found there, the run's hours would be lost."""
    for flag in ("csv", "plot", "markdown"):
        path = getattr(args, flag)
        if path is None:
            continue
        if not path or Path(path).is_dir():
            p.error(f"--{flag} {path!r}: expected a file name, got {'a folder' if path else 'nothing'}")
        above = next(a for a in Path(path).absolute().parents if a.exists())
        if not above.is_dir():
            p.error(f"--{flag} {path}: {above} is a file, not a folder")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            p.error(f"--plot needs matplotlib ({e}); pip install matplotlib, or leave --plot out")


def check_run_args(p: argparse.ArgumentParser, args) -> None:
    """Refuse what a run cannot do (``p.error``, exit 2) before it measures or writes anything:
    unknown or repeated formats, providers, shapes or batch sizes, and a device this machine does
    not have."""
    for what, asked, known in (("formats", args.formats, sorted(FORMATS)), ("providers", args.providers, PROVIDERS)):
        unknown = [v for v in asked if v not in known]
        if unknown:
            p.error(f"unknown {what} {unknown}; known: {', '.join(known)}")
    for what, asked in (("formats", args.formats), ("providers", args.providers), ("shapes", args.shapes),
                        ("batches", args.batches)):
        repeated = sorted({v for v in asked or [] if asked.count(v) > 1})
        if repeated:  # a repeat would time the same problem twice and list it twice in the report
            names = ["x".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in repeated]
            p.error(f"--{what} repeats {', '.join(names)}: give each once")
    if args.device == "auto":
        return
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA GPU here (torch.cuda.is_available() is False); use cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        p.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def timer(device: torch.device, reps: int) -> Callable[[Callable], Tuple[float, Optional[float]]]:
    """``time(fn) -> (median µs, CUDA-graph median µs or None)``."""
    if device.type == "cuda":
        import triton.testing

        def run(fn):
            t = triton.testing.do_bench(fn, warmup=10, rep=max(20, reps), return_mode="median")
            try:
                g = triton.testing.do_bench_cudagraph(fn, rep=max(20, reps), return_mode="median")
            except Exception:  # an op that cannot be captured
                g = None
            return 1e3 * t, (None if g is None else 1e3 * g)

        return run

    def run(fn):
        fn()
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return 1e6 * statistics.median(samples), None

    return run


def copy_bandwidth(device: torch.device, reps: int) -> float:
    """Bytes per second of a device-to-device copy (read + write), the roofline for memory-bound ops."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)  # 512 MiB / 32 MiB of fp16
    src = torch.empty(n, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    us, _ = timer(device, reps)(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (us * 1e-6)


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def providers_for(fmt: str, weight, W16, x, A, B, s, device, op: str,
                  wanted=PROVIDERS) -> Dict[str, Tuple[Optional[Callable], int, str]]:
    """``{provider: (fn or None, bytes moved, note)}`` for one problem: ``op`` is ``forward``,
    ``backward_dx`` (``dY·Ŵ``) or ``backward_dx_lora`` (``dY·Ŵ + s·(dY·B)·A``, with ``dY·B``
    given, as the layer's backward has it for ``dA`` anyway; cuBLAS's row is the plain ``dY·W``).
    Of the providers that run something to be built or checked (loraq's kernels, the other
    libraries), only those ``wanted``: an unasked one costs no autotuning and cannot stop the run."""
    M, K = x.shape
    N = W16.shape[0]
    act = _nbytes(x) + M * N * x.element_size()
    lora = _nbytes(A, B)
    out: Dict[str, Tuple[Optional[Callable], int, str]] = {}
    status = ops.backend_status(device)
    if op == "backward_dx_lora":
        dy = torch.randn(M, N, dtype=x.dtype, device=device)
        dyB = dy @ B
        lora = _nbytes(A, dyB)  # what the op reads: A and the given dY·B, not B
        out["cublas"] = (lambda: dy @ W16, _nbytes(W16) + act, "")
        out["cublas_lora"] = (lambda: dy @ W16 + s * (dyB @ A), _nbytes(W16) + act + lora, "dY·B given")
        ref = lambda: reference.lora_linear_dx_ref(dy, weight, A, dyB, s)  # noqa: E731
        out["naive"] = (ref, weight.nbytes + act + lora, "dequantize, then matmul + LoRA; dY·B given")
        for name in (n for n in ("triton", "cuda") if n in wanted):
            ok, why = _status(status, name, device)
            fn = (lambda b=name: ops.lora_linear_dx(dy, weight, A, dyB, s, backend=b, lora_B=B)) if ok else None
            out[name] = _checked(fn, ref, weight.nbytes + act + lora, why or "dY·B given", device)
        return out
    if op == "backward_dx":
        dy = torch.randn(M, N, dtype=x.dtype, device=device)
        out["cublas"] = (lambda: dy @ W16, _nbytes(W16) + act, "")
        out["naive"] = (lambda: dy @ weight.dequantize().to(x.dtype), weight.nbytes + act, "dequantize, then matmul")
        ref = lambda: dy @ weight.dequantize().to(x.dtype)  # noqa: E731
        for name in (n for n in ("triton", "cuda") if n in wanted):
            ok, why = _status(status, name, device)
            out[name] = _checked((lambda b=name: ops.base_matmul_t(dy, weight, backend=b)) if ok else None,
                                 ref, weight.nbytes + act, why, device)
        return out
    out["cublas"] = (lambda: x @ W16.t(), _nbytes(W16) + act, "")
    out["cublas_lora"] = (lambda: x @ W16.t() + s * ((x @ A.t()) @ B.t()), _nbytes(W16) + act + lora, "")
    out["naive"] = (lambda: reference.lora_linear_ref(x, weight, A, B, s), weight.nbytes + act + lora,
                    "dequantize, then matmul + LoRA")
    ref = lambda: reference.lora_linear_ref(x, weight, A, B, s)  # noqa: E731
    for name in (n for n in ("triton", "cuda") if n in wanted):
        ok, why = _status(status, name, device)
        out[name] = _checked((lambda b=name: ops.lora_linear(x, weight, A, B, s, backend=b)) if ok else None,
                             ref, weight.nbytes + act + lora, why, device)
    if "triton_one" in wanted:
        ok, why = _status(status, "triton", device)
        fn = _with_env(lambda: ops.lora_linear(x, weight, A, B, s, backend="triton"), ONE_LAUNCH) if ok else None
        out["triton_one"] = _checked(fn, ref, weight.nbytes + act + lora,
                                     "; ".join(n for n in (why, "LORAQ_ONE_LAUNCH=1") if n), device)
    for name, make, w in (("gemlite", gemlite_int1, weight), ("bnb_nf4", bnb_nf4, W16)):
        if name in wanted:
            try:  # another library's failure is its row's note, not the end of loraq's benchmark
                out[name] = make(w, x, A, B, s, act + lora, device)
            except Exception as e:
                out[name] = (None, 0, f"{name} failed: {type(e).__name__}: {e}")
    return out


def _with_env(fn: Callable, env: Dict[str, str]) -> Callable:
    """``fn``, marked to run with the environment variables ``env`` set (``_environment``): set
    around its check and its whole timing, not each call (whose Python would then be timed)."""
    fn.env = env
    return fn


@contextlib.contextmanager
def _environment(env: Dict[str, str]):
    """``env`` set in ``os.environ`` inside the block, the previous values back after."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _checked(fn: Optional[Callable], ref: Callable, nbytes: int, note: str, device) -> Tuple[Optional[Callable], int, str]:
    """``fn`` only if its output agrees with the reference (checked once, which also runs any
    autotuning before the timing): a wrong kernel is reported, never timed."""
    if fn is None:
        return fn, nbytes, note
    with _environment(getattr(fn, "env", {})):
        out = fn()
    wrong = _disagrees(out, ref())
    return (None, nbytes, f"REFUSED, output disagrees with loraq.reference: {wrong}") if wrong else (fn, nbytes, note)


def _status(status, name: str, device) -> Tuple[bool, str]:
    ok, why = status[name]
    if not ok:
        return False, why
    return True, "" if device.type == "cuda" else "Triton interpreter on the CPU: correctness only, not a speed"


def run(args, rows: List[Dict], info: Dict) -> str:
    """Time every (shape, format, M, op, provider) of ``args``, appending to ``rows`` as it goes
    (so an interrupted run keeps what it measured); returns the report header (also
    ``info["header"]``, set before the first row)."""
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    shapes = args.shapes or (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    batches = args.batches or (GPU_BATCHES if device.type == "cuda" else CPU_BATCHES)
    measure = timer(device, args.reps)
    bw = copy_bandwidth(device, args.reps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    import triton

    header = (f"device {name}; torch {torch.__version__}; triton {triton.__version__}; measured copy bandwidth "
              f"{bw / 1e9:.1f} GB/s; dtype {args.dtype}; rank {args.rank}; {time.strftime('%Y-%m-%d')}")
    print(header)
    info["header"] = header
    ops_to_run = ["forward"] + (["backward_dx"] if args.backward else []) + (
        ["backward_dx_lora"] if args.backward_lora else [])
    for K, N in shapes:
        gen = torch.Generator().manual_seed(0)
        W = torch.randn(N, K, generator=gen) / K**0.5
        W16 = W.to(device, dtype)
        A = (torch.randn(args.rank, K, generator=gen) / K**0.5).to(device, dtype)
        B = (torch.randn(N, args.rank, generator=gen) / args.rank**0.5).to(device, dtype)
        for fmt in args.formats:
            weight = compress_weight(W, fmt).to(dtype).to(device)
            for M in batches:
                x = torch.randn(M, K, device=device, dtype=dtype)
                for op in ops_to_run:
                    provs = providers_for(fmt, weight, W16, x, A, B, 2.0, device, op, args.providers)
                    problem: List[Tuple[Dict, Optional[float]]] = []  # (row, best µs) of each provider
                    try:
                        for p in (p for p in args.providers if p in provs):
                            row = {"device": name, "op": op, "format": fmt, "K": K, "N": N, "M": M,
                                   "rank": args.rank, "dtype": args.dtype, "provider": p}
                            problem.append((row, _measure_row(row, *provs[p], measure, bw, dtype)))
                            rows.append(row)
                    finally:  # vs cuBLAS needs every provider's time, whatever --providers' order
                        _speedups(problem)
                        for row, _ in problem:
                            if info.get("on_row"):
                                info["on_row"](row)
                            if not args.quiet:
                                print(format_row(row))
    return header


def _measure_row(row: Dict, fn: Optional[Callable], nbytes: int, note: str, measure, bw: float,
                 dtype) -> Optional[float]:
    """Fill ``row`` with ``fn``'s times, bytes and note; returns its best time (µs), None if not run."""
    row.update(bytes=nbytes, note=note)
    if fn is None:
        return None
    with _environment(getattr(fn, "env", {})):
        us, g = measure(fn)
    best = min(us, g) if g is not None else us
    row.update(median_us=round(us, 2), graph_us=None if g is None else round(g, 2),
               GBps=round(nbytes / (best * 1e-6) / 1e9, 1), pct_copy_bw=round(100 * nbytes / (best * 1e-6) / bw, 1))
    if row["provider"] in ("triton", "triton_one"):  # which kernel the autotuner chose
        op, fmt, one = row["op"], row["format"], row["provider"] == "triton_one"
        every = picked(f"lora_linear_{'fwd' if op == 'forward' else 'dx'}:{fmt}:", row["M"], row["N"], row["K"], dtype)
        # the one-launch switch keys the tuner apart where it changes a kernel (small batches); elsewhere
        # both rows ran the same key
        chosen = [(key, c) for key, c in every if key.endswith(":one") == one] or every
        row["note"] = "; ".join([note] * bool(note) + [describe(c) for _, c in chosen])
    return best


def _speedups(problem: List[Tuple[Dict, Optional[float]]]) -> None:
    """Each timed row's ``speedup_vs_cublas`` (cuBLAS's best time over its own), where cuBLAS was timed."""
    base = next((best for row, best in problem if row["provider"] == "cublas"), None)
    for row, best in problem:
        if base is not None and best is not None:
            row["speedup_vs_cublas"] = round(base / best, 2)


def format_row(r: Dict) -> str:
    """One row as the run prints it (what ``--from-log`` reads back)."""
    t = f"{r['median_us']:>10.1f}" if r.get("median_us") is not None else f"{'-':>10}"
    g = f"{r['graph_us']:>9.1f}" if r.get("graph_us") is not None else f"{'-':>9}"
    speedup = r.get("speedup_vs_cublas")
    x = "-" if speedup is None else f"{speedup:.2f}"
    extra = (f"{r['GBps']:>8.1f} GB/s {r['pct_copy_bw']:>5.1f}% bw  x{x:>5} "
             f"{r['bytes']:>11d} B" if r.get("median_us") is not None else "")
    return (f"{r['op']:<11} {r['format']:<9} K={r['K']:<6} N={r['N']:<6} M={r['M']:<5} {r['provider']:<12} {t} µs "
            f"{g} µs(graph) {extra} {r['note']}")


# The targets (H100, fp16, rank 16): (what, check(rows) -> (measured text, met?) or None).
def _best(rows, **key) -> Optional[float]:
    """The row's best time (plain or CUDA graph); GPU rows of the targets' fp16 and rank 16 only
    (interpreter times mean nothing; a bf16 or rank-64 run is not the targets' problem)."""
    for r in rows:
        if (r["device"] != "cpu" and r.get("dtype") == "fp16" and r.get("rank") == 16
                and all(r.get(k) == v for k, v in key.items())
                and r.get("median_us") is not None):
            return min(v for v in (r["median_us"], r.get("graph_us")) if v is not None)
    return None


def targets(rows: List[Dict]) -> List[Tuple[str, str]]:
    """Each performance target with what this run measured ("not measured" where it did not): the
    per-shape ones at the issue's shapes and at any other shape measured on a GPU."""
    out = []

    def limit(what, us, bound):
        out.append((what, "not measured" if us is None or bound is None else
                    f"{us:.1f} µs: {'met' if us <= bound else f'missed by {us / bound:.2f}x'}"))

    def times(a, b) -> Optional[float]:
        return None if a is None else b * a

    def at(us) -> str:  # the reference time in the target's name, where measured
        return "" if us is None else f" ({us:.1f} µs)"

    fwd = dict(op="forward", provider="triton")
    limit("int1 + LoRA, M=1, 8192→28672 ≤ 15 µs", _best(rows, format="int1", K=8192, N=28672, M=1, **fwd), 15)
    limit("int1 + LoRA, M=1, 4096² ≤ 6 µs", _best(rows, format="int1", K=4096, N=4096, M=1, **fwd), 6)
    limit("sparse4x4 + LoRA, M=1, 8192→28672 ≤ 20 µs",
          _best(rows, format="sparse4x4", K=8192, N=28672, M=1, **fwd), 20)
    shapes = sorted(set(GPU_SHAPES) | {(r["K"], r["N"]) for r in rows if r["device"] != "cpu"})
    for fmt in ("int1", "sparse4x4"):
        for K, N in shapes:
            one, sixteen = (_best(rows, format=fmt, K=K, N=N, M=m, **fwd) for m in (1, 16))
            limit(f"{fmt} {K}→{N}: M=16 ≤ 1.5x M=1{at(one)}", sixteen, times(one, 1.5))
            for op in OPS:
                mine = _best(rows, op=op, format=fmt, K=K, N=N, M=4096, provider="triton")
                ref = _best(rows, op=op, format=fmt, K=K, N=N, M=4096, provider="cublas")
                limit(f"{fmt} {K}→{N} {op}, M=4096 ≤ 1.25x cuBLAS{at(ref)}", mine, times(ref, 1.25))
    return out


def markdown(rows: List[Dict], path: str, header: str) -> None:
    """The run as a Markdown report: the targets, then every measured row."""
    lines = ["# Kernel benchmark", "", header, "", "## Targets", "",
             "On a GPU, fp16, rank 16 (rows of other dtypes or ranks are not judged).", "",
             "| target | measured |", "|---|---|"]
    lines += [f"| {what} | {got} |" for what, got in targets(rows)]
    lines += ["", "## All rows (median µs; graph = under a CUDA graph)", "",
              "| op | format | K→N | M | provider | µs | graph µs | GB/s | % copy bw | vs cuBLAS |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("median_us") is None:
            continue
        lines.append(f"| {r['op']} | {r['format']} | {r['K']}→{r['N']} | {r['M']} | {r['provider']} | "
                     f"{r['median_us']} | {_or_dash(r.get('graph_us'))} | {r['GBps']} | {r['pct_copy_bw']} | "
                     f"{_or_dash(r.get('speedup_vs_cublas'))} |")
    skipped = sorted({(r["provider"], r["note"]) for r in rows
                      if r.get("median_us") is None and not (r.get("note") or "").startswith("REFUSED")})
    if skipped:
        lines += ["", "Not run: " + "; ".join(f"{p} ({n})" for p, n in skipped)]
    if _refused(rows):  # named with their problem: which kernel is wrong where
        lines += ["", "Refused (output disagrees with loraq.reference, not timed): "
                  + "; ".join(_refused(rows))]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")
    print(f"markdown: {path}")


def _refused(rows: List[Dict]) -> List[str]:
    """The rows whose kernel was refused for a wrong output, each as ``op format K→N M=m provider: why``."""
    return [f"{r['op']} {r['format']} {r['K']}→{r['N']} M={r['M']} {r['provider']}: "
            f"{r['note'].split(': ', 1)[-1]}" for r in rows if (r.get("note") or "").startswith("REFUSED")]


def _or_dash(v) -> str:
    return "-" if v is None else str(v)


def _timed(rows: List[Dict]) -> List[Dict]:
    return [r for r in rows if r.get("median_us") is not None]


def plot(rows: List[Dict], path: str) -> None:
    """Time vs M per provider: one row of panels per (op, format), one column per shape (of the
    timed rows; no plot, and a message, if there are none)."""
    rows = _timed(rows)
    if not rows:
        print(f"plot: skipped, no timed rows to draw ({path} not written)")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({(r["op"], r["format"]) for r in rows}, key=lambda k: (k[0] != "forward", k[1]))
    shapes = sorted({(r["K"], r["N"]) for r in rows}, key=lambda kn: kn[0] * kn[1])
    fig, axes = plt.subplots(len(kinds), len(shapes), figsize=(3.6 * len(shapes), 3.0 * len(kinds)), squeeze=False)
    for i, (op, fmt) in enumerate(kinds):
        for j, (K, N) in enumerate(shapes):
            ax = axes[i][j]
            for p in PROVIDERS:
                pts = sorted((int(r["M"]), min(float(v) for v in (r.get("median_us"), r.get("graph_us"))
                                                 if v not in (None, "")))
                             for r in rows if (r["op"], r["format"], r["K"], r["N"], r["provider"]) ==
                             (op, fmt, K, N, p) and r.get("median_us") not in (None, ""))
                if pts:
                    ax.plot([a for a, _ in pts], [b for _, b in pts], "-o", markersize=3, label=p,
                            color=f"C{PROVIDERS.index(p)}")  # one colour per provider in every panel
            ax.set(xscale="log", yscale="log", title=f"{op} {fmt} {K}→{N}")
            ax.title.set_fontsize(9)
            if i == len(kinds) - 1:
                ax.set_xlabel("M (batch)")
            if j == 0:
                ax.set_ylabel("µs (best of plain / graph)")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


def read_csv(path: str) -> List[Dict]:
    """Rows written by ``--csv`` (numbers parsed back, empty cells as None), to redraw a GPU run's
    plot or report anywhere; a missing file, one without the columns or with a bad number is
    refused (SystemExit naming it)."""
    ints_ = {"K", "N", "M", "rank", "bytes"}
    floats = {"median_us", "graph_us", "GBps", "pct_copy_bw", "speedup_vs_cublas"}
    out = []
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise SystemExit(f"bench_kernels: {path} is not a CSV of bench_kernels.py --csv: it has no "
                                 f"column {', '.join(missing)}")
            for r in reader:
                if None in r or None in r.values():  # csv's restkey / restval: a short or long line
                    raise ValueError(f"not {len(reader.fieldnames)} cells, as in the header")
                row = {k: (None if v in ("", None) and k in ints_ | floats else int(v) if k in ints_
                           else float(v) if k in floats else v) for k, v in r.items() if k in COLUMNS}
                for k in ("median_us", "graph_us"):  # a NaN, zero or negative time would be reported as met
                    if row[k] is not None and not (math.isfinite(row[k]) and row[k] > 0):
                        raise ValueError(f"{k} {row[k]} is not a time (a positive, finite number of µs)")
                out.append(row)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SystemExit(f"bench_kernels: cannot read {path}: {e}") from None
    except ValueError as e:
        raise SystemExit(f"bench_kernels: {path} line {reader.line_num}: {e}") from None
    return out


def merge_runs(paths: List[str]) -> Tuple[List[Dict], str]:
    """The rows of several runs' CSVs, a later run's replacing an earlier one's for the same op,
    format, shape and M (all providers together: each comparison stays within one run), and a
    header naming which run gave how many of those groups."""
    group = lambda r: (r["op"], r["format"], r["K"], r["N"], r["M"])  # noqa: E731
    kept: Dict[tuple, List[Dict]] = {}
    source: Dict[tuple, str] = {}
    setups: Dict[tuple, str] = {}  # (device, dtype, rank) -> the first file that has it
    for path in paths:
        rows = read_csv(path)
        for r in rows:
            setups.setdefault((r["device"], r["dtype"], r["rank"]), path)
        for key in dict.fromkeys(group(r) for r in rows):
            kept[key] = [r for r in rows if group(r) == key]
            source[key] = path
    if not kept:
        raise SystemExit(f"bench_kernels: no benchmark rows in {', '.join(paths)}")
    if len(setups) > 1:  # a report has one device, dtype and rank: its targets and rows are compared as one
        raise SystemExit("bench_kernels: --from-csv merges runs of one device, dtype and rank; these differ: "
                         + "; ".join(f"{p}: device {d}, dtype {t}, rank {r}"
                                     for (d, t, r), p in setups.items()))
    (device, dtype, rank), = setups
    order = sorted(kept, key=_group_order)
    counts = {p: sum(1 for k in order if source[k] == p) for p in paths}
    header = (f"device {device}; dtype {dtype}; rank {rank}; merged from: "
              + "; ".join(f"{p} ({n} groups of op, format, shape and M)" for p, n in counts.items()))
    return [r for k in order for r in sorted(kept[k], key=lambda r: _rank(PROVIDERS, r["provider"]))], header


def _rank(known: List[str], name: str) -> Tuple[int, str]:
    """``name``'s place in ``known``, names not in it after them, alphabetically."""
    return (known.index(name), "") if name in known else (len(known), name)


def _group_order(k: tuple) -> tuple:
    """A total order on (op, format, K, N, M): by size, then format, M and op (forward, dX, dX with
    LoRA), so that a merge writes the same bytes every time."""
    op, fmt, K, N, M = k
    return K * N, K, N, fmt, M, _rank(OPS, op)


_LOG_ROW = re.compile(
    r"^(?P<op>forward|backward_dx_lora|backward_dx)\s+(?P<format>\S+)\s+K=(?P<K>\d+)\s+N=(?P<N>\d+)\s+M=(?P<M>\d+)\s+"
    r"(?P<provider>\S+)\s+(?P<us>[\d.]+|-) µs\s+(?P<g>[\d.]+|-) µs\(graph\)\s*"
    r"(?:(?P<GBps>[\d.]+) GB/s\s+(?P<pct>[\d.]+)% bw\s+x\s*(?P<x>[\d.]+|-)(?:\s+(?P<bytes>\d+) B)?)?\s*(?P<note>.*)$")


def measure(args) -> Tuple[List[Dict], str]:
    """Run the benchmark: ``(rows, report header)``. The CSV (``--csv``) is rewritten after every
    row, so a run killed outright keeps what it measured; a time limit (SIGTERM), ^C or an error
    ends the run early, and the report says so. Options are checked before (``check_run_args``):
    what stops a run here is the machine, hours into a GPU run, not a typo."""
    rows: List[Dict] = []
    info: Dict = {"on_row": (lambda _: write_csv(rows, args.csv, quiet=True)) if args.csv else None}
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return rows, run(args, rows, info)
    except (KeyboardInterrupt, Exception) as e:  # keep what was measured
        why = "INTERRUPTED" if isinstance(e, KeyboardInterrupt) else f"STOPPED by {type(e).__name__}: {e}"
        header = f"{info.get('header', '')}; {why} after {len(rows)} rows (this report is partial)"
        print(header)
        return rows, header
    finally:
        signal.signal(signal.SIGTERM, previous)


def read_log(path: str) -> Tuple[List[Dict], str]:
    """``(rows, header)`` from the printed output of a run (``bench.txt``): the report of a run
    that was killed before it wrote its CSV. Times are those printed (0.1 µs); a log from before
    rows printed their bytes gives bytes as GB/s × time (to the printed 0.1 GB/s)."""
    rows, header, meta, device = [], "", {}, ""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"bench_kernels: cannot read {path}: {e}") from None
    for line in text.splitlines():
        if line.startswith("device ") and not header:  # the run's header, printed before any row
            header = line
            meta = dict(re.findall(r"(dtype|rank) (\S+?)(?:;|$)", header))
            device = header.split(";")[0][len("device "):]
        m = _LOG_ROW.match(line)
        if not m:
            continue
        d = m.groupdict()
        row = {"device": device, "op": d["op"], "format": d["format"],
               "K": int(d["K"]), "N": int(d["N"]), "M": int(d["M"]), "rank": int(meta.get("rank", 0)),
               "dtype": meta.get("dtype", ""), "provider": d["provider"], "note": d["note"].strip()}
        if d["us"] != "-":
            us, g = float(d["us"]), (None if d["g"] == "-" else float(d["g"]))
            best = min(us, g) if g is not None else us
            row.update(median_us=us, graph_us=g, GBps=float(d["GBps"]), pct_copy_bw=float(d["pct"]),
                       bytes=int(d["bytes"]) if d["bytes"] else round(float(d["GBps"]) * 1e3 * best))
            if d["x"] != "-" and float(d["x"]):  # "-" (0.00 in older logs): no cuBLAS row to compare with
                row["speedup_vs_cublas"] = float(d["x"])
        rows.append(row)
    if not rows:
        raise SystemExit(f"bench_kernels: no benchmark rows in {path}")
    return rows, header + "; rebuilt from the printed log"


def write_csv(rows: List[Dict], path: str, quiet: bool = False) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    if not quiet:
        print(f"csv: {path}")


def main(argv=None) -> int:
    """The command line (``--help``): 0 when it wrote its reports, 1 when a run timed no row, a
    loraq kernel's output was wrong (the reports are still written) or an input file is refused,
    2 for bad options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=parse_shapes, help="KxN,... (default: the issue's on a GPU, tiny on a CPU)")
    p.add_argument("--batches", type=ints, help="M values (default: 1,4,16,64,256,4096 on a GPU)")
    p.add_argument("--formats", type=lambda t: t.split(","), default=["int1", "sparse4x4"],
                   help=f"comma-separated, of {', '.join(sorted(FORMATS))} (default: int1,sparse4x4)")
    p.add_argument("--providers", type=lambda t: t.split(","), default=PROVIDERS,
                   help=f"comma-separated, of {', '.join(PROVIDERS)} (default: all)")
    p.add_argument("--rank", type=positive, default=16)
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.add_argument("--backward", action="store_true", help="also time dX = dY·Ŵ")
    p.add_argument("--backward-lora", action="store_true",
                   help="also time dX = dY·Ŵ + s·(dY·B)·A (dY·B given), the layer's fused input gradient")
    p.add_argument("--device", default="auto", help="auto (cuda if there is one), cpu, cuda or cuda:N")
    p.add_argument("--reps", type=positive, default=50)
    p.add_argument("--csv", help="write every row here")
    p.add_argument("--plot", help="draw time vs M per shape here (PNG)")
    p.add_argument("--markdown", help="write the targets and every row as a Markdown report here")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--from-csv", help="measure nothing: rebuild --plot / --csv / --markdown from the CSVs earlier "
                                      "runs wrote (comma-separated; a later run's rows replace an earlier one's for "
                                      "the same op, format, shape and M)")
    p.add_argument("--from-log", help="measure nothing: rebuild --csv / --plot / --markdown from the printed "
                                      "output of a run that was killed before it wrote them")
    args = p.parse_args(argv)
    # "is not None": an empty --from-csv "$UNSET" must not start a (GPU-hours) measuring run
    if args.from_csv is not None and args.from_log is not None:
        p.error("--from-csv and --from-log: give one of them")
    check_outputs(p, args)
    if args.from_csv is not None:
        if not (args.plot or args.csv or args.markdown):
            p.error("--from-csv needs --plot, --csv or --markdown")
        if not all(args.from_csv.split(",")):
            p.error(f"--from-csv {args.from_csv!r}: expected comma-separated CSV files")
        rows, header = merge_runs(args.from_csv.split(","))
    elif args.from_log is not None:
        if not (args.csv or args.plot or args.markdown):
            p.error("--from-log needs --csv, --plot or --markdown")
        if not args.from_log:
            p.error("--from-log '': expected the printed output of a run")
        rows, header = read_log(args.from_log)
    else:
        check_run_args(p, args)
        rows, header = measure(args)
        if not rows:  # stopped before its first row: no report to write
            print("bench_kernels: no row was measured", file=sys.stderr)
            return 1
    if args.csv:
        write_csv(rows, args.csv)
    if args.plot:
        plot(rows, args.plot)
    if args.markdown:
        markdown(rows, args.markdown, header)
    if args.from_csv is not None or args.from_log is not None:
        return 0
    if not _timed(rows):
        print("bench_kernels: no row was timed (each row's note says why)", file=sys.stderr)
        return 1
    wrong = _refused(rows)
    if wrong:  # a wrong kernel fails the run (CI), though the other rows are reported
        print(f"bench_kernels: {len(wrong)} kernel output(s) disagree with loraq.reference, not timed: "
              + "; ".join(wrong), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
