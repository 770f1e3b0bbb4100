"""The end of a split reduction for the small-batch forwards: LoRA, bias and the cast in one launch.

A small batch gives too few output tiles to fill a GPU, so the small-batch kernels (the lookup
and gathering GEMVs, the tiled kernel when it splits K) split the reduction over programs whose
partial sums meet through fp32 atomics. Done plainly, a call is four launches besides the
kernel's: ``x·Aᵀ`` (cuBLAS), zeros for the atomics, and a cast to the activation dtype after. At
4096² the int1 weight is 2 MB, less than a microsecond of memory time, so those launches are most
of the call, on the GPU and on the host. Here a call is two launches:

1. the split kernel adds its partial sums into a **workspace** of fp32 that is all zeros between
   calls (:func:`zeroed_workspace`: one per thread, device and stream, kept), and the programs of the
   first output tile also store their K slice's share of ``x·Aᵀ`` (:func:`_store_xa_part`) into
   a slot of their own: no atomics, nothing to zero;
2. :func:`finish` (one program per ``BLOCK_N`` outputs and row of x) reads the sums and writes
   zeros back, so the workspace is ready for the next call; it sums the slots into ``x·Aᵀ`` and
   writes ``sum + s·(x·Aᵀ)·Bᵀ + b`` in the activation dtype.

:func:`bind_split` makes the two launches; if anything between them raises, it zeroes the
workspace again before it re-raises. ``reference.splitk_finish_ref`` is the reference.
"""

import threading
from typing import Callable, Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .decode import _dot, interpreter_upcast
from .host_math import cdiv, next_pow2, block_r
from .fast_launch import fast
from .env import env_is

XA_BLOCK_K = tl.constexpr(64)  # inputs per step of the x·Aᵀ share (a constexpr global: kernels read it)
FINISH_BLOCK_N = 256  # outputs per program of the finish kernel

# per thread, (device, stream) -> flat fp32 zeros: the workspace of the split kernels that this
# thread launches onto that stream (two threads launching onto one stream interleave their calls)
_LOCAL = threading.local()


def workspaces() -> Dict[Tuple[torch.device, Optional[int]], torch.Tensor]:
    """This thread's workspaces, by ``(device, stream)`` (``stream`` None off CUDA)."""
    table = getattr(_LOCAL, "workspaces", None)
    if table is None:
        table = _LOCAL.workspaces = {}
    return table


def retired_workspaces() -> List[torch.Tensor]:
    """This thread's workspaces that a larger one replaced, kept alive for the CUDA graphs that
    may have captured them (:func:`zeroed_workspace`)."""
    kept = getattr(_LOCAL, "retired", None)
    if kept is None:
        kept = _LOCAL.retired = []
    return kept


def zeroed_workspace(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """A ``[rows, cols]`` fp32 view of the zeroed workspace of this thread, ``device`` and its
    current stream.

    One thread's kernels on one stream run one after another, so one workspace for them is enough:
    each :func:`finish` leaves it zero for the next call. Two streams or two threads never share
    one. It grows (a new ``torch.zeros``) when a call needs more; during a CUDA graph capture that
    first allocation is captured too (a memset in the graph, harmless). The workspace it replaces
    is kept (:func:`retired_workspaces`): a graph captured with it still adds into it when
    replayed, and freed, that memory could belong to other tensors by then. Each growth at least
    doubles the size, so those kept take less memory than the current one. One graph replayed on
    two streams at once would share its workspace: replay a graph on one stream at a time."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    # the [rows, cols] views made so far, per thread: slicing and viewing cost host time per call
    views = getattr(_LOCAL, "views", None)
    if views is None:
        views = _LOCAL.views = {}
    key = (device, stream, rows, cols)
    table = workspaces()
    ws = table.get((device, stream))
    made = views.get(key)
    if made is not None and made[0] is ws:  # a view of the current workspace
        return made[1]
    if ws is None or ws.numel() < rows * cols:
        if ws is not None:  # graphs captured with it replay into it: never free it
            retired_workspaces().append(ws)
        ws = torch.zeros(max(rows * cols, 2 * (0 if ws is None else ws.numel())), device=device,
                         dtype=torch.float32)
        table[(device, stream)] = ws
        views.clear()  # the views of the old workspace would keep it alive
    view = ws[: rows * cols].view(rows, cols)
    if len(views) >= 64:  # many shapes (batches of varying size): start again rather than grow
        views.clear()
    views[key] = (ws, view)
    return view


def xa_slots(slots: int, M: int, R: int, device: torch.device) -> Tuple[torch.Tensor, int]:
    """``(parts [slots, M, BLOCK_R] fp32, BLOCK_R)``: where the split kernel's programs store
    their shares of ``x·Aᵀ`` (every slot is written, so it is not zeroed)."""
    width = block_r(R)
    return torch.empty(slots, M, width, device=device, dtype=torch.float32), width


@triton.jit
def _store_xa_part(x_ptr, a_ptr, parts_ptr, m0, M, k_start, k_end, R, slot, stride_xm, stride_ar,
                   ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                   UPCAST: tl.constexpr):
    """``parts[slot, m, :] = x[m, k_start:k_end]·A[:, k_start:k_end]ᵀ`` in fp32 for the ``ROWS``
    rows of x from ``m0`` (rows past ``M`` are skipped; ``r`` past ``R`` is 0). ``A`` is in x's
    dtype. From 16 rows on it is a ``tl.dot``; below, multiply-adds row by row."""
    offs_r = tl.arange(0, BLOCK_R)
    if ROWS >= 16:
        offs_m = m0 + tl.arange(0, ROWS)
        acc = tl.zeros((ROWS, BLOCK_R), dtype=tl.float32)
        for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=1):  # not pipelined: registers
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                         mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_end), other=0.0)
            at = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :],
                         mask=(offs_r[:, None] < R) & (offs_k[None, :] < k_end), other=0.0)
            acc += _dot(xt, tl.trans(at), IEEE, UPCAST)
        tl.store(parts_ptr + (slot * M + offs_m[:, None]) * BLOCK_R + offs_r[None, :], acc,
                 mask=offs_m[:, None] < M)
    else:
        for i in range(0, tl.minimum(ROWS, M - m0)):
            acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)  # reduced over K once, at the end
            for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=1):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                xk = tl.load(x_ptr + (m0 + i) * stride_xm + offs_k, mask=offs_k < k_end, other=0.0)
                at = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :],
                             mask=(offs_r[:, None] < R) & (offs_k[None, :] < k_end), other=0.0)
                acc += at.to(tl.float32) * xk.to(tl.float32)[None, :]
            tl.store(parts_ptr + (slot * M + m0 + i) * BLOCK_R + offs_r, tl.sum(acc, axis=1))


@triton.jit
def _finish_row(ws_ptr, y_ptr, parts_ptr, b_ptr, bias_ptr, m, offs_n, M, N, R, S, s, stride_bn, stride_ym,
                HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """``y[m, offs_n] = ws + s·(Σ_slots parts[:, m])·B[offs_n]ᵀ + b``, and those sums zeroed.
    The sums and shares are read at L2 (``.cg``): other programs of the same launch may have
    made them (the one-launch finish)."""
    inside = offs_n < N
    acc = tl.load(ws_ptr + m * N + offs_n, mask=inside, other=0.0, cache_modifier=".cg")
    # The zeros below may be stored by other threads than the ones that loaded these sums (the
    # compiler picks each access's layout: on an H100, with N not a multiple of 16, it did, and
    # up to half of a block read back zeros). The barrier orders every load before every store.
    tl.debug_barrier()
    tl.store(ws_ptr + m * N + offs_n, tl.zeros_like(acc), mask=inside)  # ready for the next call
    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        xa = tl.zeros((BLOCK_R,), dtype=tl.float32)
        # x·Aᵀ: the sum of the K slices' shares; never pipelined (a pipelined copy could be
        # cached in L1) since other programs of the same launch may have written them
        for s0 in tl.range(0, S, BLOCK_S, num_stages=1):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            part = tl.load(parts_ptr + (offs_s[:, None] * M + m) * BLOCK_R + offs_r[None, :],
                           mask=offs_s[:, None] < S, other=0.0, cache_modifier=".cg")
            xa += tl.sum(part, axis=0)
        bt = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :],
                     mask=inside[:, None] & (offs_r[None, :] < R), other=0.0).to(tl.float32)
        acc += s * tl.sum(bt * xa[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=inside, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _splitk_finish_kernel(
    ws_ptr, y_ptr, parts_ptr, b_ptr, bias_ptr,
    M, N, R, S, s, stride_bn, stride_ym,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    _finish_row(ws_ptr, y_ptr, parts_ptr, b_ptr, bias_ptr, tl.program_id(1), offs_n, M, N, R, S, s, stride_bn,
                stride_ym, HAS_LORA, HAS_BIAS, BLOCK_R, BLOCK_S)


@triton.jit
def _claim_share(cnt_ptr, pid_k, pid_m, T, G, S, HAS_LORA: tl.constexpr):
    """The one-launch finish's claim on storing this program's slice's share of x·Aᵀ (slice
    ``pid_k`` of ``S``, group of rows ``pid_m`` of ``G``): the first of the slice's ``T``
    programs (one per output tile) to claim it stores it. Returns the claim's count (0: this
    program stores it; passed on to :func:`_finish_if_last`), -1 without LoRA. Where the kernel
    can, call it right after issuing its first weight loads: the atomic's round trip (and the
    barrier that hands its answer to every thread) then overlaps them."""
    if HAS_LORA:
        claimed = tl.atomic_add(cnt_ptr + G * (T + 2) + pid_m * S + pid_k, 1, sem="relaxed")
    else:
        claimed = -1
    return claimed


@triton.jit
def _finish_if_last(ws_ptr, y_ptr, parts_ptr, b_ptr, bias_ptr, cnt_ptr, offs_n, pid_n, pid_k, pid_m, claimed, T, G,
                    M, N, R, S, s, stride_bn, stride_ym, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """The one-launch finish, at the end of each program of a split kernel whose grid has ``T``
    output tiles (``pid_n``), ``S`` slices of K (``pid_k``) and ``G`` groups of ``ROWS`` rows of x
    (``pid_m``), after it added its sums into ``ws`` and, if its claim (:func:`_claim_share`)
    was the first of its slice, stored the slice's share of x·Aᵀ: the last program of each
    (tile, group) to arrive finishes that tile's rows.

    ``cnt`` (int32, zero before the launch and left zero after it): ``[G, T]`` arrivals, ``[G]``
    shares stored, ``[G]`` tiles finished, then (with LoRA) ``[G, S]`` claims. The last arrival
    of a tile waits until the group's ``S`` shares are stored. It cannot wait forever, whatever
    order the GPU starts blocks in: each of the tile's ``S`` programs claimed its slice before it
    arrived, so every slice's share was claimed by a program that has started, and a claimer
    stores its share without waiting on anyone."""
    tl.debug_barrier()  # every thread's sums and share of this program before the release below
    if HAS_LORA:
        if claimed == 0:
            tl.atomic_add(cnt_ptr + G * T + pid_m, 1, sem="release")
        if claimed == T - 1:  # the slice's last claim: the claims start again from zero next call
            tl.atomic_xchg(cnt_ptr + G * (T + 2) + pid_m * S + pid_k, 0, sem="relaxed")
    arrived = tl.atomic_add(cnt_ptr + pid_m * T + pid_n, 1, sem="acq_rel")
    if arrived == S - 1:
        if HAS_LORA:
            while tl.atomic_add(cnt_ptr + G * T + pid_m, 0, sem="acquire") < S:
                pass
        for i in tl.static_range(ROWS):
            m = pid_m * ROWS + i
            if m < M:
                _finish_row(ws_ptr, y_ptr, parts_ptr, b_ptr, bias_ptr, m, offs_n, M, N, R, S, s, stride_bn,
                            stride_ym, HAS_LORA, HAS_BIAS, BLOCK_R, BLOCK_S)
        tl.atomic_xchg(cnt_ptr + pid_m * T + pid_n, 0)
        if HAS_LORA:  # the last tile of the group to finish resets the group's share counters
            finished = tl.atomic_add(cnt_ptr + G * T + G + pid_m, 1, sem="acq_rel")
            if finished == T - 1:
                tl.atomic_xchg(cnt_ptr + G * T + pid_m, 0)
                tl.atomic_xchg(cnt_ptr + G * T + G + pid_m, 0)


def finish(ws: torch.Tensor, parts: Optional[torch.Tensor], lora_B: Optional[torch.Tensor], R: int,
           scaling: float, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``y = ws + s·(Σ_slots parts)·Bᵀ + b`` ``[M, N]`` in ``dtype``, and ``ws`` zeroed.
    ``parts [slots, M, BLOCK_R]`` (from :func:`xa_slots`) and ``lora_B [N, R]`` (in ``dtype``)
    are None without LoRA; ``bias [N]`` may be None."""
    if (parts is None) != (lora_B is None):
        given = lambda t: "None" if t is None else "given"  # noqa: E731
        raise ValueError("finish takes parts and lora_B together (with LoRA) or neither (without): got "
                         f"parts {given(parts)}, lora_B {given(lora_B)}")
    M, N = ws.shape
    slots, width = (parts.shape[0], parts.shape[2]) if parts is not None else (1, 16)
    return bind_finish(M, N, slots, width, lora_B, R, scaling, bias, dtype, ws.device)(ws, parts)


def bind_finish(M: int, N: int, slots: int, width: int, lora_B: Optional[torch.Tensor], R: int, scaling: float,
                bias: Optional[torch.Tensor], dtype: torch.dtype, device: torch.device):
    """:func:`finish` with everything but ``ws [M, N]`` and ``parts [slots, M, width]`` (None
    without LoRA: ``lora_B`` None) worked out once: ``run(ws, parts) -> y``. A prepared launch
    (``lora_linear_fwd.ForwardPlan``) keeps one, so a call builds no grid or arguments; it reads
    ``lora_B`` and ``bias`` (whose layouts the plan's owner checks) at each call."""
    has_lora = lora_B is not None
    # fp32 in the interpreter for bf16, which truncates where a GPU rounds; torch casts after
    out = torch.float32 if interpreter_upcast(dtype) else dtype
    grid = (cdiv(N, FINISH_BLOCK_N), M)
    tail = (M, N, R, slots, float(scaling), lora_B.stride(0) if has_lora else 0, N)  # y: [M, N], contiguous
    meta = dict(HAS_LORA=has_lora, HAS_BIAS=bias is not None, BLOCK_R=width, BLOCK_N=FINISH_BLOCK_N,
                BLOCK_S=min(16, next_pow2(slots)), num_warps=4)
    launcher = fast(_splitk_finish_kernel)

    def run(ws, parts):
        y = torch.empty(M, N, device=device, dtype=out)
        launcher.launch(grid, (ws, y, parts if has_lora else ws, lora_B if has_lora else ws,
                               bias if bias is not None else ws, *tail), meta)
        return y if out is dtype else y.to(dtype)

    return run


def one_launch_offered() -> bool:
    """Whether split GEMVs finish in their own launch (``_finish_if_last``) instead of a second
    kernel: opt-in with ``LORAQ_ONE_LAUNCH=1`` until the GPU tests of it have passed."""
    return env_is("LORAQ_ONE_LAUNCH", "1")


def one_launch_workspace(M: int, N: int, floats: int, counters: int, device: torch.device):
    """``(flat, ws [M, N], extra [floats], counters [counters] int32)``: views of one zeroed
    workspace (:func:`zeroed_workspace`) for a split kernel that finishes in its own launch: the
    sums, ``floats`` more fp32 zeros, then the counters (fp32 zeros are int32 zeros). The kernel
    leaves them all zero; zero ``flat`` if it may not have."""
    flat = zeroed_workspace(M * N + floats + counters, 1, device)
    ws = flat[: M * N].view(M, N)
    extra = flat[M * N: M * N + floats].view(-1)
    return flat, ws, extra, flat[M * N + floats:].view(-1).view(torch.int32)


def run_one_launch(launch: Callable[..., None], M: int, N: int, slots: int, tiles: int, groups: int,
                   x: torch.Tensor, lora_B: Optional[torch.Tensor], R: int) -> torch.Tensor:
    """Run a split kernel that finishes in the same launch: ``launch(ws, parts, y, counters)``
    with the zeroed ``ws [M, N]``, ``parts`` (with LoRA: ``lora_B`` given) for ``slots`` shares of
    x·Aᵀ, ``y [M, N]`` and the zeroed int32 ``counters`` (:func:`_finish_if_last`: ``tiles`` output
    tiles, ``groups`` groups of rows of x, with LoRA a claim per slice and group); the kernel
    leaves ``ws`` and ``counters`` zero. Returns ``y`` in ``x.dtype``."""
    n_counters = groups * (tiles + 2 + (slots if lora_B is not None else 0))
    flat, ws, _, counters = one_launch_workspace(M, N, 0, n_counters, x.device)
    parts = xa_slots(slots, M, R, x.device)[0] if lora_B is not None else None
    y = torch.empty(M, N, device=x.device, dtype=torch.float32 if interpreter_upcast(x.dtype) else x.dtype)
    try:
        launch(ws, parts, y, counters)
    except BaseException:
        flat.zero_()
        raise
    return y if y.dtype == x.dtype else y.to(x.dtype)


def run_cuda_one_launch(launch: Callable[..., None], M: int, N: int, R: Optional[int], slots: int,
                        x: torch.Tensor, rows: int = 16) -> torch.Tensor:
    """Run a CUDA GEMV that finishes in its own launch (``csrc/gemv_finish.cuh``):
    ``launch(ws, xa, y, counters)`` with the zeroed ``ws [M, N]``, ``xa [1, M, block_r]`` (zero;
    None without LoRA: ``R`` None), ``y [M, N]`` in ``x.dtype`` and the zeroed int32 counters (an
    arrival a group of ``rows`` outputs, two, and at most a flag an item of x·Aᵀ: ``slots`` × M ×
    ceil(R / 4)); the kernel leaves them zero. Returns ``y``."""
    width = block_r(R) if R is not None else 0
    items = slots * M * cdiv(R, 4) if R is not None else 0  # gemv_finish.cuh: xa_items
    flat, ws, xa, counters = one_launch_workspace(M, N, M * width, cdiv(N, rows) + 2 + items, x.device)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    try:
        launch(ws, xa.view(1, M, width) if R is not None else None, y, counters)
    except BaseException:
        flat.zero_()
        raise
    return y


def bind_split(launch: Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], None], M: int, N: int,
               slots: int, lora_B: Optional[torch.Tensor], R: int, scaling: float, bias: Optional[torch.Tensor],
               dtype: torch.dtype, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Run a split kernel and its finish, for every ``x [M, K]`` in ``dtype`` on ``device``:
    ``run(x) -> y [M, N]`` (in ``dtype``) calls ``launch(x, ws, parts)``, which adds the partial
    sums of ``x·Ŵᵀ`` into the zeroed ``ws [M, N]`` and, with LoRA (``lora_B`` given), stores the
    ``slots`` shares of ``x·Aᵀ`` into ``parts``, then the finish (:func:`bind_finish`). Everything
    but the workspace lookup and the allocations is worked out here, once."""
    has_lora = lora_B is not None
    width = block_r(R) if has_lora else 16
    # without LoRA the finish reads no slots: one, as finish() says (the same specialization)
    fin = bind_finish(M, N, slots if has_lora else 1, width, lora_B, R, scaling, bias, dtype, device)
    f32 = torch.float32

    def run(x):
        ws = zeroed_workspace(M, N, device)
        # every slot is written by the kernel: not zeroed (xa_slots)
        parts = torch.empty(slots, M, width, device=device, dtype=f32) if has_lora else None
        try:
            launch(x, ws, parts)
            return fin(ws, parts)
        except BaseException:
            ws.zero_()  # a kernel that ran but was not finished would leave its sums for the next call
            raise

    return run
