"""Tile configurations for the kernels, tuned once per (op, M bucket, N, K, dtype) and GPU.

The winner of a small list of configs is measured under a CUDA graph (``gpu_time``) the first
time a shape is seen and cached in memory and on disk (``$LORAQ_CACHE_DIR``, default
``~/.cache/loraq``) in one JSON file per GPU name and Triton version, so a second process does
not tune again (the file is merged under a lock, so processes sharing the folder keep each
other's winners; with no home folder and no ``$LORAQ_CACHE_DIR``, winners stay in memory).
Off the GPU (the interpreter) the first, smallest config is used untimed. Each tuning is logged
(logger ``loraq.autotune``, INFO); ``LORAQ_AUTOTUNE_VERBOSE=1`` prints every candidate's time
and every failure. A launcher's ``config=`` argument skips tuning. Inside a CUDA graph capture
nothing is timed: an untuned problem gets the first candidate, with a warning.
"""

import contextlib
import importlib
import json
import logging
import os
import re
import tempfile
import threading
import warnings
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from .env import env_is

# BLOCK_M, output tile (BLOCK_N forward / BLOCK_K for dX), reduction tile, split of the
# reduction over programs (fp32 atomics), num_warps, num_stages, variant (below).
Config = Tuple[int, int, int, int, int, int, int]
# The variant, a config's last field: the tiled tl.dot kernel with the decoded weight tile as the
# dot's second operand (DOT) or its first (DOT_SWAP: Hopper's tensor cores read it from
# registers); the int1 lookup-table GEMV (LUT, kernels/int1_gemv_lut.py: the third field is then
# the table's bits); the sparse4x4 gathering GEMV (GATHER, kernels/sparse4x4_gemv.py), and the
# same forward GEMV with its block's axes swapped (GATHER_T: the tile columns across the lanes),
# and both of them loading each tile column's four inputs once instead of gathering one input per
# stored value (GATHER_X4, GATHER_T_X4); large batches: the weight decoded a slab at a time into a
# dense buffer that cuBLAS multiplies (DENSE_SLAB, kernels/dense_slab.py); the int1 forward's
# DOT_SWAP with the signs decoded two at a time in pair order (DOT_PAIRS, decode._int1_sign_pairs);
# the int1 forward for up to 16 rows of x as a CUDA kernel on mma.sync (MMA_GEMV,
# kernels/int1_gemv_mma.py: a candidate only where the extension loraq._C is built), and the
# sparse4x4 forward for up to 16 rows as a CUDA gather (CUDA_GATHER) or on mma.sync with the tiles
# decoded into its registers (SPARSE_MMA; both kernels/sparse4x4_gemv_cuda.py, the same condition);
# the int1 forward for one row of x by table lookup in CUDA, 4 inputs an entry (CUDA_LUT) or 8
# (CUDA_LUT8; both kernels/int1_gemv_mma.py).
(DOT, DOT_SWAP, LUT, GATHER, GATHER_T, GATHER_X4, GATHER_T_X4, DENSE_SLAB, DOT_PAIRS, MMA_GEMV, CUDA_GATHER, SPARSE_MMA,
 CUDA_LUT, CUDA_LUT8) = range(14)
GATHER_FWD = (GATHER, GATHER_T, GATHER_X4, GATHER_T_X4)  # the forward's gathering variants

# Small batches: one 16-row tile of x, wide weight tiles, the reduction split so that a few
# thousand output columns still fill every SM (the weight stream is the cost).
SMALL_M: List[Config] = [(16, 32, 32, 1, 4, 2, 1), (16, 64, 128, 1, 4, 3, 0), (16, 64, 256, 4, 4, 3, 1),
                         (16, 64, 256, 8, 4, 3, 0), (16, 128, 128, 4, 4, 3, 1), (16, 128, 128, 4, 4, 3, 0),
                         (16, 128, 128, 8, 4, 3, 1), (16, 128, 256, 4, 8, 3, 1), (16, 256, 128, 4, 8, 3, 1)]
# Large batches: tensor-core tiles. The 256-row tiles decode each weight tile once for more rows
# of x, and won most large shapes on an H100 although they spill; (256, 64, 64) does not spill.
LARGE_M: List[Config] = [(64, 64, 32, 1, 4, 2, 0), (128, 128, 64, 1, 8, 3, 0), (256, 128, 64, 1, 8, 3, 0),
                         (128, 128, 64, 1, 8, 3, 1), (64, 128, 64, 1, 4, 3, 1), (128, 256, 64, 1, 8, 3, 1),
                         (256, 128, 64, 1, 8, 3, 1), (256, 64, 64, 1, 8, 3, 1)]
# Middle batches (17-256 rows): the large-batch tiles (which won there on an H100, yet at 1.3-10x
# cuBLAS's time) plus narrower x tiles that split the reduction to fill the GPU like small M does
# (these three: not measured yet; none spills on sm_90).
MID_M: List[Config] = LARGE_M + [(32, 128, 128, 4, 4, 3, 1), (64, 128, 128, 4, 4, 3, 1), (32, 128, 128, 8, 4, 3, 1)]
# Up to LUT_MAX_M rows of x, int1 weights: the lookup-table GEMV, timed against SMALL_M.
# (rows of x per program, BLOCK_N, CHUNK_K, table bits, num_warps, num_stages, LUT); rows is 1
# here and the batch's bucket in lut_configs. Nibble tables only: the byte tables (bits 8) measured
# about 2x slower at M = 1 on an H100, and their 512-row config spills.
LUT_M1: List[Config] = [(1, 512, 256, 4, 4, 1, LUT), (1, 1024, 128, 4, 8, 1, LUT), (1, 256, 256, 4, 4, 1, LUT),
                        (1, 1024, 256, 4, 8, 1, LUT), (1, 128, 256, 4, 4, 1, LUT)]
LUT_MAX_M = 4
# Small batches of sparse4x4: the gathering GEMVs, timed against SMALL_M. (rows of x per program,
# output tile, reduction tile, split of the reduction, ...) as for the tiled kernels (forward:
# BLOCK_N, BLOCK_K; dX: BLOCK_K, BLOCK_N): rows is 1 here; gather_configs sets the batch's bucket
# and shrinks the tile to match.
GATHER_SMALL_M: List[Config] = [(1, 128, 256, 4, 4, 2, GATHER), (1, 128, 256, 8, 4, 2, GATHER),
                                (1, 256, 128, 4, 4, 2, GATHER), (1, 64, 512, 8, 4, 2, GATHER),
                                (1, 256, 256, 8, 8, 2, GATHER)]
GATHER_MAX_M = 16
# The int1 kernels with their signs decoded two at a time (DOT_PAIRS) in fp16 and bf16, timed
# against the others up to PAIRS_MAX_M rows: 16-row tiles, and 32- and 64-row tiles for middle
# batches. Compiled for sm_90 by Triton 3.6 (bench/sass_report.py), none spills. The forward's
# 128 x 128 tile takes 266 instructions an iteration where DOT_SWAP's takes 604 (127 registers;
# 255 for 64 rows); dX's, 255 where DOT_SWAP's takes 856.
# On the H100 the forward's M = 16 winner (16, 256, 128, 4, 8, 3) issued in 22% of the cycles:
# 128 registers allow 2 programs of 8 warps an SM, and the grid was 1.7 waves (ncu, NOTES.md v9).
# Split 8 makes 3.4 waves; a 64-wide reduction tile needs 80 registers (Triton 3.6), 24 warps an
# SM instead of 16, for 16% more instructions a weight.
PAIRS_SMALL_M: List[Config] = [(16, 128, 128, 4, 4, 3, DOT_PAIRS), (16, 128, 128, 8, 4, 3, DOT_PAIRS),
                               (16, 256, 128, 4, 8, 3, DOT_PAIRS), (16, 64, 256, 4, 4, 3, DOT_PAIRS),
                               (16, 128, 256, 4, 8, 3, DOT_PAIRS), (16, 256, 128, 8, 8, 3, DOT_PAIRS),
                               (16, 128, 64, 4, 4, 3, DOT_PAIRS), (16, 128, 64, 8, 4, 3, DOT_PAIRS),
                               (16, 256, 64, 4, 8, 3, DOT_PAIRS)]
PAIRS_MID_M: List[Config] = [(32, 128, 128, 4, 4, 3, DOT_PAIRS), (64, 256, 128, 1, 8, 3, DOT_PAIRS)]
# dX runs without Triton's pipeliner: with it, Triton splits the dot in two and ptxas waits for
# each wgmma before the next. There num_stages 2 means the kernel's own prefetch: the next tile's
# dY, words and scales are loaded before this tile's decode (on the H100, unpipelined dX waited on
# its loads half its cycles). Prefetching, a 64-column tile over 128 rows of the reduction
# (16, 64, 128, ..., 2) needs 96 registers (Triton 3.6), 128 x 128 132 and 64 x 256 168.
PAIRS_DX_SMALL_M: List[Config] = [(16, 128, 128, 4, 4, 1, DOT_PAIRS), (16, 128, 128, 8, 4, 1, DOT_PAIRS),
                                  (16, 64, 256, 4, 4, 1, DOT_PAIRS), (16, 64, 256, 4, 4, 2, DOT_PAIRS),
                                  (16, 128, 128, 4, 4, 2, DOT_PAIRS), (16, 64, 128, 4, 4, 2, DOT_PAIRS),
                                  (16, 64, 128, 8, 4, 2, DOT_PAIRS)]
PAIRS_DX_MID_M: List[Config] = [(32, 128, 128, 4, 4, 1, DOT_PAIRS), (64, 128, 128, 2, 4, 1, DOT_PAIRS),
                                (32, 128, 128, 4, 4, 2, DOT_PAIRS)]
PAIRS_MAX_M = 256
# More than 32 rows: the dense-slab path, (decode tile rows, decode tile columns, slab length,
# placement of the LoRA path and bias, num_warps, slab buffers, DENSE_SLAB), at two sizes in MiB
# of all its buffers together (dense_slab_configs); LORAQ_DENSE_SLAB_MIB caps them (0: never this
# path). Two buffers of half the size let the next slab be decoded during the current slab's
# matmul (more, shorter slabs); one buffer decodes and multiplies in turn. The placement:
# SLAB_WIDEN, as extra columns of the input in the slabs' own matmuls (a copy of the input), or
# SLAB_OUTPUT_FIRST, written into the output by one low-rank matmul that the slabs' matmuls then
# add to (a write of the output, read back in cuBLAS's epilogue), or SLAB_MERGE, the LoRA product
# added to the slab as it is decoded (Ŵ + s·B·A, one matmul a slab, the bias in its epilogue).
DENSE_SLAB_MIN_M = 33
DENSE_SLAB_MIB = (32, 128)
DENSE_SLAB_TILE = (32, 256, 4)  # decode tile rows, columns, num_warps: the decode is a few % of a call
# The merged decode's tile: the rank-16 product's operands and fp32 result double the registers a
# thread (compiled for sm_90 by Triton 3.6: 198 at 4 warps, 120 at 8, none spilled; the plain
# decode, 54), so the same tile runs on twice the warps.
DENSE_SLAB_MERGE_TILE = (32, 256, 8)
SLAB_WIDEN, SLAB_OUTPUT_FIRST, SLAB_MERGE = 1, 2, 3
# bumped when Config changes meaning or winners are timed another way: old files are not read
# (4: timed under a CUDA graph; version 3's eager timings picked by host time at small batches)
CACHE_VERSION = 4

_LOG = logging.getLogger("loraq.autotune")
_MEMORY: Dict[str, Dict[str, Config]] = {}
# (op, M bucket, N, K, dtype, device index, variant) -> config: the per-call path, no file or string work
_PICKED: Dict[tuple, Config] = {}
# cache files already warned about (damaged, or not writable): one warning a file and process
_WARNED: set = set()  # (path, "read" or "write")
# problems first met inside a CUDA graph capture, warned about once each (_untuned_in_capture)
_CAPTURE_WARNED: set = set()


def m_bucket(M: int) -> int:
    """Batch sizes that share a config: powers of two up to 4096."""
    return min(4096, 1 << max(0, (M - 1).bit_length()))


def configs_for(M: int) -> List[Config]:
    return SMALL_M if M <= 16 else (MID_M if M <= 256 else LARGE_M)


# Candidates that compute wrong answers on a GPU, by kernel: never offered there. The sparse4x4 dX
# with a 128 x 256 tile, swapped, 8 warps, 3 stages gave errors of 17-34 (allowance 0.25) on an
# H100 with Triton 3.6 at M = 128-300, N = 1024-4096, K = 2048-14336, without LoRA, every time
# (not a race; right at 64 x 256; int1 right with it); the benchmark had refused it at
# 14336→4096, M = 256. Cause not found yet (NOTES.md).
WRONG_ON_GPU: Dict[str, Tuple[Config, ...]] = {"lora_linear_dx:sparse4x4": ((128, 256, 64, 1, 8, 3, DOT_SWAP),)}


def wrong_on_gpu(op: str) -> Tuple[Config, ...]:
    """The configs never offered to ``op`` (``"lora_linear_dx:sparse4x4:..."``) on a GPU."""
    return next((bad for prefix, bad in WRONG_ON_GPU.items() if op.startswith(prefix + ":")), ())


def lut_configs(M: int) -> List[Config]:
    """The lookup GEMV's candidates for ``1 ≤ M ≤ LUT_MAX_M`` rows of x: one program takes them
    all (the batch's bucket), so the weights are read once. With ``rows`` rows a program covers
    ``1/rows`` as many outputs (at least 128): compiled for sm_90, the wider ones spill."""
    if not 1 <= M <= LUT_MAX_M:
        raise ValueError(f"the lookup GEMV is tuned for 1 to {LUT_MAX_M} rows of x, got {M}")
    rows = m_bucket(M)
    return list(dict.fromkeys((rows, max(128, c[1] // rows)) + c[2:] for c in LUT_M1))  # distinct, in order


def pairs_configs(M: int, op: str = "fwd") -> List[Config]:
    """The candidates of the int1 kernels that decode signs two at a time, for ``M`` rows of x
    (of ``dY`` for ``op="dx"``); none past ``PAIRS_MAX_M``."""
    if op not in ("fwd", "dx"):
        raise ValueError(f"op is 'fwd' or 'dx', got {op!r}")
    small, mid = (PAIRS_SMALL_M, PAIRS_MID_M) if op == "fwd" else (PAIRS_DX_SMALL_M, PAIRS_DX_MID_M)
    if M <= 16:
        return list(small)
    return list(mid) if M <= PAIRS_MAX_M else []


def gather_configs(M: int, variant: int = GATHER) -> List[Config]:
    """The gathering GEMV's candidates for ``1 ≤ M ≤ GATHER_MAX_M`` rows of x: one program takes
    them all (the batch's bucket: the weights are loaded and decoded once), on a tile that many
    times smaller (the reduction tile first, down to 32, then the output tile, down to 16), so
    that the four accumulators of every row still fit in the registers. ``variant``: GATHER, or
    one of the forward's other orders and loads (``GATHER_FWD``; the same tiles)."""
    if not 1 <= M <= GATHER_MAX_M:
        raise ValueError(f"the gathering GEMV is tuned for 1 to {GATHER_MAX_M} rows of x, got {M}")
    rows = m_bucket(M)
    out = []
    for _, bn, bk, split, warps, stages, _ in GATHER_SMALL_M:
        shrink = rows
        while shrink > 1 and bk > 32:
            bk, shrink = bk // 2, shrink // 2
        while shrink > 1 and bn > 16:
            bn, shrink = bn // 2, shrink // 2
        out.append((rows, bn, bk, split, warps, stages, variant))
    return list(dict.fromkeys(out))  # distinct, in order


def gather_fwd_configs(M: int) -> List[Config]:
    """The forward's gathering candidates: both axis orders, and the swapped one with x loaded by
    fours. Which Triton lays out well depends on its version (``bench/results/NOTES.md``: 3.6 and
    3.8 swap), so all three are timed. GATHER_X4 is left out: compiled for sm_90 by Triton 3.6
    and 3.8, its loop moves data through shared memory (about 2x the instructions)."""
    return gather_configs(M) + gather_configs(M, GATHER_T) + gather_configs(M, GATHER_T_X4)


def dense_slab_cap_mib() -> int:
    """``LORAQ_DENSE_SLAB_MIB`` (default 128): the largest dense slab buffer, 0 to turn the path off."""
    raw = os.environ.get("LORAQ_DENSE_SLAB_MIB", "128")
    try:
        cap = int(raw)
    except ValueError:
        raise ValueError(f"LORAQ_DENSE_SLAB_MIB must be a whole number of MiB (0 turns the dense-slab path off), "
                         f"got {raw!r}") from None
    if cap < 0:
        raise ValueError(f"LORAQ_DENSE_SLAB_MIB must be at least 0, got {cap}")
    return cap


def dense_slab_configs(M: int, length: int, widths: Dict[int, int], itemsize: int) -> List[Config]:
    """The dense-slab candidates for ``M`` rows of x: none up to 32 rows (there the weight stream
    is the cost, and a dense slab would multiply it) or with ``LORAQ_DENSE_SLAB_MIB=0``. From 33
    rows they are timed against the tiled kernel, which took 1.6–4.8x cuBLAS's time at 256 rows
    on an H100 (``h100.md``).

    ``length`` is what the slabs divide (N for the forward, K for dX), ``widths`` a slab's other
    side for each placement of the LoRA path to time (``dense_slab.slab_widths``) and ``itemsize``
    the activation's bytes. For each size of ``DENSE_SLAB_MIB`` (at most the cap), the fewest
    slabs that fit one buffer of it, and, where half of it holds less than the whole, the fewest
    that fit two buffers of half of it (decoded beside the matmuls); slabs of equal lengths in
    whole 256s (at least 256): a short last slab would leave most of the GPU idle in its matmul."""
    cap = dense_slab_cap_mib()
    if M < DENSE_SLAB_MIN_M or cap == 0:
        return []
    out = []
    for mib in DENSE_SLAB_MIB:
        for placement, width in widths.items():
            bn, bk, warps = DENSE_SLAB_MERGE_TILE if placement == SLAB_MERGE else DENSE_SLAB_TILE
            for buffers in (1, 2):
                fit = max(256, (min(mib, cap) << 20) // buffers // (width * itemsize) // 256 * 256)
                slabs = -(-length // fit)
                if buffers == 2 and slabs == 1:
                    continue  # one slab: nothing to decode beside a matmul
                out.append((bn, bk, -(-length // (slabs * 256)) * 256, placement, warps, buffers, DENSE_SLAB))
    return list(dict.fromkeys(out))  # distinct, in order


def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def cache_file(device: torch.device) -> Optional[Path]:
    """``$LORAQ_CACHE_DIR/autotune/<GPU name>-triton<version>-v<CACHE_VERSION>.json`` (default
    ``~/.cache/loraq``); None, winners kept in memory only, where neither is set nor known."""
    import triton

    name = re.sub(r"[^A-Za-z0-9]+", "_", gpu_name(device)).strip("_")
    root = importlib.import_module("loraq.extension").cache_root()  # the compiled extension's builds live there too
    if root is None:
        return None
    return root / "autotune" / f"{name}-triton{triton.__version__}-v{CACHE_VERSION}.json"


def _is_config(value) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == len(Config.__args__)
            and all(type(v) is int for v in value))


def _warn_once(path: Path, what: str, message: str) -> None:
    if (path, what) not in _WARNED:
        _WARNED.add((path, what))
        warnings.warn(f"loraq autotune: {message}", RuntimeWarning, stacklevel=3)


def _read(path: Path) -> Dict[str, Config]:
    """The file's well-formed entries (a missing file: none). An unreadable or damaged file (a
    truncated write, an edit by hand) is warned about once: its shapes are tuned again and the
    next winner's write replaces it."""
    why = None
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):  # not written yet (or no such folder)
        return {}
    except (OSError, ValueError) as e:
        data, why = {}, f"{type(e).__name__}: {e}"
    if not isinstance(data, dict):
        data, why = {}, f"a JSON {type(data).__name__}, not an object"
    entries = {k: tuple(v) for k, v in data.items() if isinstance(k, str) and _is_config(v)}
    if len(entries) < len(data):
        why = f"{len(data) - len(entries)} of its {len(data)} entries malformed"
    if why is not None:
        _warn_once(path, "read", f"ignoring what cannot be used in the cache file {path} ({why}); "
                                 f"those shapes are tuned again and the file rewritten")
    return entries


def _load(path: Optional[Path]) -> Dict[str, Config]:
    key = str(path)
    if key not in _MEMORY:
        _MEMORY[key] = {} if path is None else _read(path)
    return _MEMORY[key]


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock on ``path`` + ``.lock`` between processes (where ``fcntl`` exists), so
    that two processes merging their winners into one file do not drop each other's."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the last writer wins, the file still parses
        yield
        return
    try:
        f = open(f"{path}.lock", "a")
    except OSError:
        try:  # another user's lock file (0644 under the usual umask): flock needs only reading
            f = open(f"{path}.lock")
        except OSError:  # a read-only folder without one: write unlocked
            yield
            return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # no locks on this file system (NFS without lockd): write unlocked
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _store(path: Optional[Path], table: Dict[str, Config]) -> None:
    """Merge ``table`` into the file (another process may have added shapes) via a temporary
    file, under the file's lock; readable by the other users of a shared cache folder."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(path):
            merged = {k: list(v) for k, v in _read(path).items()}
            merged.update({k: list(v) for k, v in table.items()})
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(merged, f, indent=1, sort_keys=True)
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
    except OSError as e:  # a read-only or full cache folder: keep the in-memory table
        _warn_once(path, "write", f"cannot write the cache file {path} ({type(e).__name__}: {e}); "
                         f"tuned configs are kept in this process only "
                         f"(set LORAQ_CACHE_DIR to a writable folder)")


RETIME_TOP = 3  # the fastest candidates are timed twice (time_candidates)


def gpu_time(fn: Callable[[], object]) -> float:
    """Milliseconds a call of ``fn`` takes on the GPU: the median replay of a CUDA graph of many
    calls (``triton.testing.do_bench_cudagraph``). Timed eagerly, a launcher's 100–200 µs of
    Python (``bench/profile_host.py``) hide a 10 µs kernel: on the H100 the eager tuner picked
    configs 2–4x slower on the GPU at M = 1 (``bench/results/NOTES.md``, v9b). A call that cannot
    be captured is timed eagerly (``do_bench``), host time included."""
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
    except Exception:  # not capturable: eager, so that the candidate is still timed (slower)
        return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


def _progress(items: List[Config], desc: Optional[str]):
    """``items``, with a progress bar on a terminal when ``desc`` is given and the timing lasts
    over two seconds (a first call compiles each config: a large model's first step can take
    minutes)."""
    if desc is None:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, delay=2.0, leave=False, disable=None, unit="config")


class WrongOutput(RuntimeError):
    """A candidate config whose output failed the tuning check (``check`` of :func:`pick_config`)."""


def time_candidates(candidates: List[Config], run: Callable[[Config], None], bench: Callable,
                    failures: Optional[Dict[Config, BaseException]] = None,
                    desc: Optional[str] = None, check: Optional[Callable[[object], Optional[str]]] = None
                    ) -> Dict[Config, float]:
    """Each candidate's time, ``bench(fn) -> ms``; a config that fails to run (more shared memory
    or registers than this GPU has) is left out, and its exception put in ``failures``. With
    ``check``, each candidate first runs once and ``check(its output)`` must return None: one that
    returns a reason is left out untimed, a :class:`WrongOutput` in ``failures``. The
    fastest ``RETIME_TOP`` are timed again and keep the lower of their two times: one slow timing
    (the same dense-slab config took 323 µs in one H100 tuning and 226–235 µs in three others)
    should not decide the winner; one that fails the second time is left out too. ``desc``:
    the label of a progress bar (shown on a terminal when the timing lasts)."""
    failures = {} if failures is None else failures
    timings = {}
    for c in _progress(candidates, desc):
        try:
            why = None if check is None else check(run(c))
            if why:
                failures[c] = WrongOutput(f"wrong output: {why}")
                continue
            timings[c] = bench(lambda: run(c))
        except Exception as e:  # a config this GPU cannot hold (shared memory, registers)
            failures[c] = e
    for c in sorted(timings, key=timings.get)[:RETIME_TOP]:
        try:
            timings[c] = min(timings[c], bench(lambda: run(c)))
        except Exception as e:  # ran once, not twice (memory taken meanwhile): not to be relied on
            failures[c] = e
            del timings[c]
    return timings


def rows_from(check, row0: int):
    """A launcher's ``check`` as seen by a call on the rows of its input from ``row0`` (a batch
    split into launches): ``check.from_row(row0)`` (``loraq.tuning_check``'s checks have it; a
    plain function is dropped: it cannot know which rows it is shown). None stays None."""
    from_row = getattr(check, "from_row", None)
    return None if from_row is None else from_row(row0)


# pick_config's tuning: one at a time in a process (threads would time each other's kernels)
_TUNING = threading.RLock()
# Tests set this: every in-memory hit is also checked against the candidate list it stands for,
# which catches a caller whose ``variant`` misses something its candidates depend on.
CHECK_HITS = False


def pick_config(op: str, M: int, N: int, K: int, dtype: torch.dtype, device: torch.device,
                run: Callable[[Config], None], bench: Optional[Callable] = None,
                extra: Optional[Union[List[Config], Callable[[], List[Config]]]] = None,
                variant: tuple = (), check: Optional[Callable[[object], Optional[str]]] = None) -> Config:
    """The config for this problem: cached, or the fastest of :func:`configs_for` plus ``extra``
    (a list, or a function that makes it: called only when the answer is not cached in memory;
    timed with ``bench(fn) -> ms``, by default :func:`gpu_time`). Off CUDA: the first
    of :func:`configs_for`, untimed.

    ``check(output) -> None or why`` (``loraq.tuning_check``): when tuning, each candidate's
    ``run(c)`` output must pass it before it is timed; those that fail are left out with a
    warning, so that a config that is fast and wrong on this GPU never wins.

    A problem first met while the stream is capturing a CUDA graph is not tuned (that would
    record the candidates into the graph and synchronize inside the capture): it gets a cached
    winner (memory or disk) or, with a warning, the first candidate, untimed and not cached.

    ``op`` names the kernel and ``variant`` (hashable) holds whatever else ``extra`` depends on
    (the rank, a setting): with the batch bucket, N, K, dtype and device they key the in-memory
    answer, the per-call path that never builds the candidate list. On disk the key holds a
    checksum of the candidates instead, so that a changed list is tuned again."""
    if device.type != "cuda":
        return configs_for(M)[0]
    fast = (op, m_bucket(M), N, K, dtype, device.index, variant)
    hit = _PICKED.get(fast)  # every call after the first: a dict lookup (host time)
    if hit is not None and not CHECK_HITS:
        return hit
    wrong = wrong_on_gpu(op)
    candidates = [c for c in configs_for(M) + list((extra() if callable(extra) else extra) or []) if c not in wrong]
    if hit is not None:
        if hit not in candidates:
            raise AssertionError(f"autotune: the remembered {op} config {hit} is not among this call's candidates: "
                                 f"the caller's variant {variant} misses something they depend on")
        return hit
    with _TUNING:
        path = cache_file(device)
        table = _load(path)
        # the candidate set is part of the key: a winner cached from another list is not reused
        key = (f"{op}|M{m_bucket(M)}|N{N}|K{K}|{str(dtype).replace('torch.', '')}"
               f"|c{zlib.crc32(repr(candidates).encode()):08x}")
        if table.get(key) not in candidates:  # not tuned yet (or a damaged entry)
            if capturing():  # nothing can be timed or checked inside a capture: remember nothing
                return _untuned_in_capture(op, M, N, K, dtype, candidates)
            table[key] = _tune(op, key, M, N, K, dtype, candidates, run, bench or gpu_time, check)
            _store(path, table)
        _PICKED[fast] = table[key]
        return table[key]


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a CUDA graph: a tuning there would record its
    candidates into the user's graph, and its timing and checking synchronize, which a capture
    forbids (the capture would be invalidated)."""
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except Exception:  # no CUDA runtime: nothing captures
        return False


def _untuned_in_capture(op, M, N, K, dtype, candidates) -> Config:
    """The config of a problem first met inside a CUDA graph capture: the first candidate (the
    first of :func:`configs_for`, the small tiled kernel that runs every problem), untimed and not
    remembered, so that the next call outside a capture tunes it. Warns once per problem."""
    cfg = candidates[0]
    problem = (op, m_bucket(M), N, K, dtype)
    if problem not in _CAPTURE_WARNED:
        _CAPTURE_WARNED.add(problem)
        message = (f"loraq autotune: {op} (M={M}, N={N}, K={K}, {str(dtype).replace('torch.', '')}) was first "
                   f"called while a CUDA graph was being captured, where its kernel configs cannot be timed; "
                   f"the graph gets the untuned {describe(cfg)}, which may be several times slower. "
                   "Call the model once with this batch size before capturing (a warm-up; "
                   "torch.compile's mode='reduce-overhead' makes one) so that it is tuned first.")
        _LOG.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    return cfg


def _tune(op, key, M, N, K, dtype, candidates, run, bench, check=None) -> Config:
    """The fastest of ``candidates`` (``time_candidates``), logged; warns about those whose output
    failed ``check``; raises, naming why each failed, if none runs."""
    _LOG.info("loraq autotune: timing %d configs of %s (M=%d, N=%d, K=%d, %s), once per shape and GPU",
              len(candidates), op, M, N, K, dtype)
    failures: Dict[Config, BaseException] = {}
    timings = time_candidates(candidates, run, bench, failures, desc=f"loraq autotune {op} M={M} N={N} K={K}",
                              check=check)
    wrong = {c: e for c, e in failures.items() if isinstance(e, WrongOutput)}
    if wrong:
        message = (f"loraq autotune: {len(wrong)} of {len(candidates)} configs of {op} (M={M}, N={N}, K={K}, "
                   f"{dtype}) gave wrong results on this GPU and were left out: "
                   + "; ".join(f"{describe(c)}: {e}" for c, e in list(wrong.items())[:3])
                   + ". Please report it with `python -m loraq info`.")
        _LOG.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    if env_is("LORAQ_AUTOTUNE_VERBOSE", "1"):
        ranked = sorted(timings.items(), key=lambda kv: kv[1])
        print(f"loraq autotune {key}: " + ", ".join(f"{c}={1e3 * t:.1f}µs" for c, t in ranked)
              + "".join(f"; {c} failed: {type(e).__name__}: {e}" for c, e in failures.items()), flush=True)
    if not timings:
        reasons = "; ".join(f"{c}: {type(e).__name__}: {e}" for c, e in list(failures.items())[:3])
        raise RuntimeError(f"no kernel config of {op} runs for M={M}, N={N}, K={K}, {dtype} "
                           f"({len(failures)} failed; {reasons})") from next(iter(failures.values()), None)
    return min(timings, key=timings.get)


VARIANT_NAMES = {DOT: "tiled", DOT_SWAP: "tiled, swapped", LUT: "lookup GEMV", GATHER: "gather GEMV",
                 GATHER_T: "gather GEMV, swapped", GATHER_X4: "gather GEMV, x by fours",
                 GATHER_T_X4: "gather GEMV, swapped, x by fours", DENSE_SLAB: "dense slab + cuBLAS",
                 DOT_PAIRS: "tiled, swapped, pair-order signs", MMA_GEMV: "CUDA mma GEMV (loraq._C)",
                 CUDA_GATHER: "CUDA gather GEMV (loraq._C)", SPARSE_MMA: "CUDA sparse mma GEMV (loraq._C)",
                 CUDA_LUT: "CUDA lookup GEMV (loraq._C)", CUDA_LUT8: "CUDA byte-lookup GEMV (loraq._C)"}


def describe(cfg: Config) -> str:
    """``cfg`` with the name of its kernel, e.g. ``"lookup GEMV (1, 256, 256, 4, 4, 1, 2)"``."""
    # the mma GEMV's tasks of 32 rows x 256 inputs (int1_gemv_mma.MMA_TASK32_INPUTS; that module imports this one)
    tall = ", 32-row tasks" if cfg[6] == MMA_GEMV and cfg[2] == 256 else ""
    return f"{VARIANT_NAMES.get(cfg[6], 'variant ' + str(cfg[6]))}{tall} {tuple(cfg)}"


def picked(op_prefix: str, M: int, N: int, K: int, dtype: torch.dtype) -> List[Tuple[str, Config]]:
    """The configs this process picked (tuned or read from the cache) for ops whose name starts
    with ``op_prefix`` at this batch bucket, N, K and dtype: how a benchmark reports which kernel
    ran. Read-only; empty off the GPU (nothing is tuned there)."""
    return [(key[0], cfg) for key, cfg in _PICKED.items()
            if key[0].startswith(op_prefix) and key[1:5] == (m_bucket(M), N, K, dtype)]
