// The one-launch finish of the CUDA small-batch GEMVs (LORAQ_ONE_LAUNCH=1): no second kernel.
//
// In two launches (the default) a GEMV adds x·Ŵᵀ into the zeroed fp32 workspace ws and its first
// blocks store their shares of x·Aᵀ; then splitk_finish.finish (Triton) writes
// y = ws + s·(x·Aᵀ)·Bᵀ + b and zeroes ws. At 4096² and one row of x that second launch, and the
// gap before it, are a large part of the call. Here the GEMV finishes itself:
//  * x·Aᵀ is cut into items (a slot's K range x a row of x x kXaRanks ranks, xa_lane_partial's),
//    in batches: warp w of the launch claims batch w (a flag, atomicExch), if there is one, and
//    computes it before it copies x, as the first blocks store their shares in two launches. The
//    items are added into xa [M, block_r] (zero, after ws) with atomics; a counter of the items
//    done says when xa is whole.
//  * Each unit of outputs (16 weight rows, all rows of x) has an arrival counter. After its run a
//    warp adds to it the number of its tasks in that unit (the byte-lookup GEMV, whose warps take
//    runs of rows: its rows there, row_arrivals); the warp whose add completes the unit
//    (unit_tasks: its tasks over every K slice) finishes it: it waits for xa, then writes
//    y = ws + s·xa·Bᵀ + b in T and zeroes ws there.
//  * No block schedule can deadlock it: a waiting finisher claims and computes batches that nobody
//    has claimed, and a batch once claimed belongs to a warp that has started and computes it
//    before it waits on anything.
//  * Counters and xa are zero between calls: a unit's finisher zeroes its counter, and the last
//    warp to leave the launch (a counter of exits) zeroes xa, the items done and the flags.
//
// The arithmetic and each output's finish are __host__ __device__: tests/cuda/gemv_finish_emulate.cu
// runs the protocol on the host, warp by warp, in any block order.
#pragma once

#include <stdint.h>

#include "gemv_common.cuh"

namespace loraq_gemv {

struct Finish {
  void* y;             // [M, N] in T (row stride N): the output; null in two-launch mode
  const void* lora_B;  // [N, R] in T, contiguous, or null (then also no x·Aᵀ: parts is null)
  const void* bias;    // [N] in T, or null
  float scaling;       // s of the LoRA path
  int* counters;       // int32, zero between calls: units arrivals, items done, exits, batch flags
  int units;           // units of outputs, each with an arrival counter
  int unit_tasks;      // tasks a unit receives over all K slices
};
constexpr int kFinishCounters = 2;  // after the arrivals: items done, warps left; then a flag a batch

__host__ __device__ __forceinline__ int* done_of(const Finish& f) { return f.counters + f.units; }
__host__ __device__ __forceinline__ int* exits_of(const Finish& f) { return f.counters + f.units + 1; }
__host__ __device__ __forceinline__ int* flags_of(const Finish& f) { return f.counters + f.units + kFinishCounters; }

// Items of x·Aᵀ: a slot's items are (row m of x, ranks r0 .. r0 + kXaRanks - 1), slot-major; none
// past R (the two-launch shares cover block_r, as the finish kernel reads them).
template <typename Args>
__host__ __device__ __forceinline__ int xa_groups(const Args& a) {
  return (a.R + kXaRanks - 1) / kXaRanks;
}
template <typename Args>
__host__ __device__ __forceinline__ int xa_items_per_slot(const Args& a) {
  return a.M * xa_groups(a);
}
template <typename Args>
__host__ __device__ __forceinline__ int xa_items(const Args& a) {
  return a.parts == nullptr ? 0 : a.slots * xa_items_per_slot(a);
}
// Items a batch: the items spread over every warp of the launch (batch w is warp w's). In 32 bits
// (the op checks that the warps of a launch and the items are below 2^30, so that their sums here
// fit too): a 64-bit division is a call, and the registers live across it were spilled.
__host__ __device__ __forceinline__ int xa_batch_of(int items, int total_warps) {
  const int b = (int)(((unsigned)items + (unsigned)total_warps - 1u) / (unsigned)total_warps);
  return b < 1 ? 1 : b;
}
template <typename Args>
__host__ __device__ __forceinline__ int xa_batch(const Args& a, int total_warps) {
  return xa_batch_of(xa_items(a), total_warps);
}
template <typename Args>
__host__ __device__ __forceinline__ int xa_batches(const Args& a, int batch) {
  return (xa_items(a) + batch - 1) / batch;
}
// The int32 counters a launch needs: `units` arrivals, kFinishCounters, a flag a batch of `items`.
__host__ __device__ __forceinline__ int64_t finish_counters(int64_t units, int items, int total_warps) {
  return units + kFinishCounters + (items + xa_batch_of(items, total_warps) - 1) / xa_batch_of(items, total_warps);
}
struct XaItem {
  int slot, m, r0;
};
template <typename Args>
__host__ __device__ __forceinline__ XaItem xa_item(const Args& a, int i) {
  const int per = xa_items_per_slot(a), groups = xa_groups(a), idx = i % per;
  return {i / per, idx / groups, (idx % groups) * kXaRanks};
}

// Tasks of a run [first, first + count) (row-major: `chunks` tasks a row group) in row group rg.
__host__ __device__ __forceinline__ int run_tasks_in_group(int64_t first, int count, int chunks, int rg) {
  const int64_t lo = first > (int64_t)rg * chunks ? first : (int64_t)rg * chunks;
  const int64_t hi = first + count < (int64_t)(rg + 1) * chunks ? first + count : (int64_t)(rg + 1) * chunks;
  return hi > lo ? (int)(hi - lo) : 0;
}

// A warp's arrivals when warps take runs of rows, not tasks (the byte-lookup GEMV: warp_run over
// the N rows, in every K slice): the units are `rows` weight rows and each receives rows x slices,
// a row a slice. The run that ends at N (the slice's last warp: only its run can) also brings the
// rows past N up to the end of the last unit, so that a short last unit is complete at the same
// count. Units [u0, u1) get run_tasks_in_group(first, count, rows, u) each.
struct RowArrivals {
  int64_t first;
  int count, u0, u1;
};
__host__ __device__ __forceinline__ RowArrivals row_arrivals(int64_t first, int count, int N, int rows) {
  const int units = (N + rows - 1) / rows;
  if (first + count == N) count = (int)((int64_t)units * rows - first);
  if (count <= 0) return {first, 0, 0, 0};
  return {first, count, (int)(first / rows), (int)((first + count - 1) / rows) + 1};
}
// Warp `warp` of the `total` of a K slice: its run of the N rows (warp_run) as arrivals.
__host__ __device__ __forceinline__ RowArrivals warp_row_arrivals(int64_t warp, int64_t total, int N, int rows) {
  const WarpRun run = warp_run(warp, total, N);
  return row_arrivals(run.first, run.count, N, rows);
}

// L2 reads of what other warps of the launch wrote (their atomics are performed in L2; L1 is not
// coherent), and the int atomics, as plain accesses on the host where warps run one at a time.
__host__ __device__ __forceinline__ float load_l2(const float* p) {
#ifdef __CUDA_ARCH__
  return __ldcg(p);
#else
  return *p;
#endif
}
__host__ __device__ __forceinline__ int atomic_add_int(int* p, int v) {
#ifdef __CUDA_ARCH__
  return atomicAdd(p, v);
#else
  const int old = *p;
  *p += v;
  return old;
#endif
}

// Output (m, n) once its unit has every task's sums: y = ws + s·xa·Bᵀ + b in T (fp32 until the
// cast, the order of splitk_finish.finish), and ws back to zero for the next call. The rank is
// taken 8 at a time, every load of a round issued before its first use: one L2 round trip a round,
// where a loop of dependent loads would wait R times.
template <typename T, typename Args>
__host__ __device__ __forceinline__ void finish_output(const Args& a, int m, int n) {
  float* w = a.ws + (int64_t)m * a.N + n;
  float v = load_l2(w);
  *w = 0.f;
  if (a.parts != nullptr) {
    const float* xa = a.parts + (int64_t)m * a.block_r;
    const bool b_vec = rows_aligned16(a.fin.lora_B, a.R);
    float s = 0.f;
    for (int r0 = 0; r0 < a.R; r0 += 8) {
      const uint4 b = load_x8(a.fin.lora_B, a.N, a.R, n, r0, b_vec);  // zeros past R
      float xv[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) xv[e] = r0 + e < a.R ? load_l2(xa + r0 + e) : 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) s += xv[e] * input_of<T>(b, e);
    }
    v += a.fin.scaling * s;
  }
  if (a.fin.bias != nullptr) v += to_float(load_ro(static_cast<const T*>(a.fin.bias) + n));
  static_cast<T*>(a.fin.y)[(int64_t)m * a.N + n] = from_float<T>(v);
}

#ifdef __CUDACC__
// The thread's and block's indices, read from their special registers by volatile asm, so that the
// compiler cannot reuse values it computed from them before a kernel's main loop (held across it,
// they would take the loop's registers).
struct Indices {
  int thread, threads, block_x, blocks_x, block_y, blocks_y, block_z, blocks_z;
};
__device__ __forceinline__ Indices fresh_indices() {
  Indices at;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(at.thread));
  asm volatile("mov.u32 %0, %%ntid.x;" : "=r"(at.threads));
  asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(at.block_x));
  asm volatile("mov.u32 %0, %%nctaid.x;" : "=r"(at.blocks_x));
  asm volatile("mov.u32 %0, %%ctaid.y;" : "=r"(at.block_y));
  asm volatile("mov.u32 %0, %%nctaid.y;" : "=r"(at.blocks_y));
  asm volatile("mov.u32 %0, %%ctaid.z;" : "=r"(at.block_z));
  asm volatile("mov.u32 %0, %%nctaid.z;" : "=r"(at.blocks_z));
  return at;
}

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ int load_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Items [first, end) of x·Aᵀ, by one warp, added into xa (a.parts [M, block_r]); then counted
// done (after a fence: whoever reads the count then sees the sums).
template <typename T, typename Args>
__device__ __forceinline__ void add_xa_items(const Args& a, int first, int end, int lane) {
  for (int i = first; i < end; ++i) {
    const XaItem it = xa_item(a, i);
    float s[kXaRanks];
    xa_warp_sums<T>(a, it.slot, it.m, it.r0, lane, s);
    if (lane < kXaRanks && it.r0 + lane < a.R) atomicAdd(a.parts + (int64_t)it.m * a.block_r + it.r0 + lane, pick_rank(s, lane));
  }
  if (end > first) {
    __threadfence();
    __syncwarp();
    if (lane == 0) atomicAdd(done_of(a.fin), end - first);
  }
}

// Warp `w` of the launch, before it copies x: batch w of x·Aᵀ's items, if there is one and a
// waiting finisher has not claimed it first.
template <typename T, typename Args>
__device__ __forceinline__ void own_xa_batch(const Args& a, int w, int batch, int lane) {
  if (w >= xa_batches(a, batch)) return;
  const int mine = __shfl_sync(0xffffffffu, lane == 0 ? atomicExch(flags_of(a.fin) + w, 1) : 1, 0) == 0;
  if (mine) add_xa_items<T>(a, w * batch, min(w * batch + batch, xa_items(a)), lane);
}

// Until xa is whole: claim and compute the batches nobody has claimed, else wait for the others'.
// The counters must be zero at the launch (the launchers' workspace is): with a stale flag and
// too few items done it would wait forever, so after 20 s it traps instead (the global timer, in
// ns: a warp may resume on another SM, whose cycle counter is another).
template <typename T, typename Args>
__device__ __forceinline__ void wait_for_xa_inline(const Args& a, int batch, int lane) {
  const int items = xa_items(a), batches = xa_batches(a, batch);
  int* flags = flags_of(a.fin);
  const uint64_t start = global_ns();
  for (;;) {
    const int done = __shfl_sync(0xffffffffu, lane == 0 ? load_acquire(done_of(a.fin)) : 0, 0);
    if (done >= items) break;
    bool computed = false;
    for (int base = 0; base < batches; base += 32) {
      const int b = base + lane;
      const bool won = b < batches && load_acquire(flags + b) == 0 && atomicExch(flags + b, 1) == 0;
      for (unsigned mask = __ballot_sync(0xffffffffu, won); mask; mask &= mask - 1) {
        const int first = (base + __ffs(mask) - 1) * batch;
        add_xa_items<T>(a, first, min(first + batch, items), lane);
        computed = true;
      }
    }
    if (!computed) {
      __nanosleep(100);
      if (global_ns() - start > 20000000000ull) __trap();  // state that was not zero at the launch
    }
  }
  __threadfence();
  __syncwarp();
}

// What the out-of-line wait reads, passed by value: a function that takes a kernel's arguments
// by reference takes their address, and every read of them in the kernel becomes a generic load.
struct XaArgs {
  const void* x;
  const void* lora_A;
  float* parts;
  Finish fin;
  int M, K, R, block_r, slots;
};
template <typename Args>
__device__ __forceinline__ XaArgs xa_args(const Args& a) {
  return {a.x, a.lora_A, a.parts, a.fin, a.M, a.K, a.R, a.block_r, a.slots};
}

// wait_for_xa_inline out of line: inlined into the int1 kernel, capped at 64 registers by its
// launch bound, its nested loops spilled 200 to 300 bytes. Kernels allowed more registers inline it.
template <typename T>
__device__ __noinline__ void wait_for_xa(const XaArgs a, int batch, int lane) {
  wait_for_xa_inline<T>(a, batch, lane);
}

// After a warp's run of tasks: lane i adds tasks(u) to the arrivals of unit u = u0 + i (and + 32,
// ...) for u < u1; the warp finishes each unit that an add completes: outputs(u) gives its rows of
// x [m0, m0 + rows) and weight rows [n0, n0 + cols). INLINE_WAIT: the wait for x·Aᵀ inlined.
struct Outputs {
  int m0, rows, n0, cols;
};
template <typename T, bool INLINE_WAIT = false, typename Args, typename Tasks, typename Out>
__device__ void arrive_and_finish(const Args& a, int u0, int u1, Tasks tasks, Out outputs, int batch, int lane) {
  __threadfence();  // this warp's sums (atomics into ws) before its arrivals
  __syncwarp();
  bool xa_whole = a.parts == nullptr;
  for (int base = u0; base < u1; base += 32) {
    const int u = base + lane;
    bool last = false;
    if (u < u1) {
      const int n = tasks(u);
      last = n > 0 && atomicAdd(a.fin.counters + u, n) + n == a.fin.unit_tasks;
    }
    unsigned finishing = __ballot_sync(0xffffffffu, last);
    if (finishing == 0) continue;
    __threadfence();  // the other warps' sums, released by their arrivals, before the reads below
    __syncwarp();
    if (!xa_whole) {
      if (INLINE_WAIT) wait_for_xa_inline<T>(a, batch, lane);
      else wait_for_xa<T>(xa_args(a), batch, lane);
      xa_whole = true;
    }
    while (finishing) {
      const int j = __ffs(finishing) - 1;
      finishing &= finishing - 1;
      const Outputs o = outputs(base + j);
      for (int idx = lane; idx < o.rows * o.cols; idx += 32) finish_output<T>(a, o.m0 + idx / o.cols, o.n0 + idx % o.cols);
      if (lane == j) a.fin.counters[base + j] = 0;  // nobody adds to it again in this launch
    }
  }
}

// Every warp of the launch, last: the last to leave zeroes xa, the count of items done and the
// flags of the batches (every finisher, the only reader of xa, has left by then). Without LoRA
// there is nothing to zero.
template <typename Args>
__device__ void leave(const Args& a, int total_warps, int batch, int lane) {
  if (a.parts == nullptr) return;
  __threadfence();
  __syncwarp();
  const int left = __shfl_sync(0xffffffffu, lane == 0 ? atomicAdd(exits_of(a.fin), 1) : 0, 0);
  if (left != total_warps - 1) return;
  __threadfence();
  for (int i = lane; i < a.M * a.block_r; i += 32) a.parts[i] = 0.f;
  for (int b = lane; b < xa_batches(a, batch); b += 32) flags_of(a.fin)[b] = 0;
  if (lane == 0) {
    *done_of(a.fin) = 0;
    *exits_of(a.fin) = 0;
  }
}
// The one-launch finish after a warp's run, for the stream-K kernels whose units are row groups of
// `rows` weight rows (every row of x) and whose K slice (blockIdx.y) has `chunks` tasks a row group:
// arrive at the row groups the run added to, finish those it completes, then leave. The caller
// reads its indices afresh (fresh_indices): reused from before its loop, they would be held across
// it, in registers the loop needs (ptxas spilled 150-200 bytes in int1's per-row modes).
template <typename T, bool INLINE_WAIT, typename Args>
__device__ __forceinline__ void finish_row_groups(const Args& a, const Indices& at, int chunks, int rows) {
  const int lane = at.thread & 31, warps = at.threads >> 5;
  const int64_t warp = (int64_t)at.block_x * warps + (at.thread >> 5), total = (int64_t)at.blocks_x * warps;
  const int rgs = (a.N + rows - 1) / rows;
  const WarpRun run = warp_run(warp, total, (int64_t)rgs * chunks);
  const int64_t first = run.first;
  const int count = run.count;
  const int rg0 = count > 0 ? (int)(first / chunks) : 0, rg1 = count > 0 ? (int)((first + count - 1) / chunks) + 1 : 0;
  const int launch_warps = (int)(total * at.blocks_y);  // below 2^30: the ops check
  const int batch = xa_batch(a, launch_warps);
  arrive_and_finish<T, INLINE_WAIT>(
      a, rg0, rg1, [&](int rg) { return run_tasks_in_group(first, count, chunks, rg); },
      [&](int rg) { return Outputs{0, a.M, rg * rows, min(rows, a.N - rg * rows)}; }, batch, lane);
  leave(a, launch_warps, batch, lane);
}

// The finish after a warp's run for a kernel whose K slices are a.slice_inputs inputs cut into
// tasks of task_inputs (the int1 GEMVs): the slice's chunks, then finish_row_groups.
template <typename T, bool INLINE_WAIT, typename Args>
__device__ __forceinline__ void finish_input_slices(const Args& a, int task_inputs, int rows) {
  const Indices at = fresh_indices();
  const int k0 = at.block_y * a.slice_inputs;
  const int chunks = (min(a.K - k0, a.slice_inputs) + task_inputs - 1) / task_inputs;
  finish_row_groups<T, INLINE_WAIT>(a, at, chunks, rows);
}

// The finish after a warp's run for a kernel whose warps take runs of the N rows (blockIdx.x and
// the warp: warp_run over N, in each K slice blockIdx.y): units of `rows` weight rows (every row of
// x) arrived at by rows (row_arrivals; unit_tasks = rows x slices), then leave.
template <typename T, bool INLINE_WAIT, typename Args>
__device__ __forceinline__ void finish_row_runs(const Args& a, int rows) {
  const Indices at = fresh_indices();
  const int lane = at.thread & 31, warps = at.threads >> 5;
  const int64_t warp = (int64_t)at.block_x * warps + (at.thread >> 5), total = (int64_t)at.blocks_x * warps;
  const RowArrivals r = warp_row_arrivals(warp, total, a.N, rows);
  const int launch_warps = (int)(total * at.blocks_y);  // below 2^30: the ops check
  const int batch = xa_batch(a, launch_warps);
  arrive_and_finish<T, INLINE_WAIT>(
      a, r.u0, r.u1, [&](int u) { return run_tasks_in_group(r.first, r.count, rows, u); },
      [&](int u) { return Outputs{0, a.M, u * rows, min(rows, a.N - u * rows)}; }, batch, lane);
  leave(a, launch_warps, batch, lane);
}
#endif  // __CUDACC__

}  // namespace loraq_gemv
