// The one-launch finish of the CUDA GEMVs (csrc/gemv_finish.cuh) run on the host for
// tests/test_gemv_finish.py, built with nvcc into a shared library and called with ctypes: the
// int1 mma GEMV's blocks (or the byte-lookup GEMV's), in any order given, each of its warps in turn. A warp claims its batch of
// x·Aᵀ's items, adds its run of tasks into ws (the sums of a dense W, not the mma: the protocol is
// what is under test), arrives at its row groups and finishes those it completes (computing the
// batches nobody has claimed while it waits), then leaves. The task split, the items, the counters
// and each output's finish are the kernel's own functions; the warp's collectives are loops here.
#include <stdint.h>

#include <algorithm>

#include "../../csrc/int1_gemv_lut8.cuh"
#include "../../csrc/int1_gemv_mma.cuh"

using loraq_gemv::XaItem;

// Items [first, end): each lane's partial sums (xa_lane_partial) added in lane order, into xa.
template <typename T>
static void add_items(const loraq_mma::Args& a, int first, int end, int* computed) {
  using namespace loraq_gemv;
  for (int i = first; i < end; ++i) {
    const XaItem it = xa_item(a, i);
    float sum[kXaRanks] = {};
    for (int lane = 0; lane < 32; ++lane) {
      float s[kXaRanks];
      xa_lane_partial<T>(a, it.slot, it.m, it.r0, lane, s);
      for (int q = 0; q < kXaRanks; ++q) sum[q] += s[q];
    }
    for (int q = 0; q < kXaRanks && it.r0 + q < a.R; ++q) a.parts[(int64_t)it.m * a.block_r + it.r0 + q] += sum[q];
  }
  *done_of(a.fin) += end - first;
  *computed += end - first;
}

// Rows [n0, n1) x inputs [kb, ke) of every row of x, added into ws.
static void add_sums(const loraq_mma::Args& a, const float* W, const float* xf, int n0, int n1, int kb, int ke) {
  for (int n = n0; n < std::min(a.N, n1); ++n)
    for (int m = 0; m < a.M; ++m) {
      float s = 0.f;
      for (int k = kb; k < ke; ++k) s += W[(int64_t)n * a.K + k] * xf[(int64_t)m * a.K + k];
      a.ws[(int64_t)m * a.N + n] += s;
    }
}

// Warp `warp` of `total` in K slice `by`: its sums into ws, then its arrivals, lane by lane as
// arrive_and_finish takes them: units [*u0, *u1), arrive(u) tasks each. split 0: the mma GEMV's
// stream-K run of 16-row x 512-input tasks (finish_row_groups's); 1: the byte-lookup GEMV's run of
// the N rows over its slice of 1024 inputs (finish_row_runs's).
struct Arrivals {
  int u0, u1;
  int64_t first;
  int count, per_unit;  // run_tasks_in_group(first, count, per_unit, u)
};
static Arrivals warp_work(const loraq_mma::Args& a, const float* W, const float* xf, int split, int by, int64_t warp,
                          int64_t total) {
  using namespace loraq_gemv;
  const int k0 = by * a.slice_inputs, k1 = std::min(a.K, k0 + a.slice_inputs);
  if (split == 1) {
    const WarpRun r = warp_run(warp, total, a.N);  // the kernel's rows
    add_sums(a, W, xf, (int)r.first, (int)r.first + r.count, k0, k1);
    const RowArrivals ra = warp_row_arrivals(warp, total, a.N, loraq_lut8::kUnitRows);  // finish_row_runs's
    return {ra.u0, ra.u1, ra.first, ra.count, loraq_lut8::kUnitRows};
  }
  using loraq_mma::kTaskInputs;
  using loraq_mma::kTaskRows;
  const int chunks = (k1 - k0 + kTaskInputs - 1) / kTaskInputs;
  const int rgs = (a.N + kTaskRows - 1) / kTaskRows;
  const WarpRun r = warp_run(warp, total, (int64_t)rgs * chunks);
  for (int64_t task = r.first; task < r.first + r.count; ++task) {  // each task's sums, as flush adds them
    const int rg = (int)(task / chunks), kb = k0 + (int)(task % chunks) * kTaskInputs;
    add_sums(a, W, xf, rg * kTaskRows, (rg + 1) * kTaskRows, kb, std::min(a.K, kb + kTaskInputs));
  }
  if (r.count == 0) return {0, 0, r.first, 0, chunks};
  return {(int)(r.first / chunks), (int)((r.first + r.count - 1) / chunks) + 1, r.first, r.count, chunks};
}

template <typename T>
static int run(loraq_mma::Args& a, const float* W, const float* xf, int split, int blocks, int warps, int slices,
               const int* order, int* stats) {
  using namespace loraq_gemv;
  using loraq_mma::kTaskRows;
  const int64_t total = (int64_t)blocks * warps;
  const int launch_warps = (int)(total * slices);
  const int batch = xa_batch(a, launch_warps), items = xa_items(a), batches = items ? xa_batches(a, batch) : 0;
  int* flags = flags_of(a.fin);
  for (int b = 0; b < blocks * slices; ++b) {
    const int by = order[b] / blocks, bx = order[b] % blocks;
    for (int wi = 0; wi < warps; ++wi) {
      const int64_t warp = (int64_t)bx * warps + wi, w = (int64_t)by * total + warp;
      if (a.parts != nullptr && w < batches && atomic_add_int(flags + w, 1) == 0)  // own_xa_batch
        add_items<T>(a, (int)w * batch, std::min((int)w * batch + batch, items), &stats[2]);
      const Arrivals r = warp_work(a, W, xf, split, by, warp, total);
      for (int u = r.u0; u < r.u1; ++u) {  // arrive_and_finish
        const int n = run_tasks_in_group(r.first, r.count, r.per_unit, u);
        if (n == 0 || atomic_add_int(a.fin.counters + u, n) + n != a.fin.unit_tasks) continue;
        ++stats[0];
        while (a.parts != nullptr && *done_of(a.fin) < items) {  // wait_for_xa
          bool any = false;
          for (int bb = 0; bb < batches; ++bb)
            if (flags[bb] == 0 && atomic_add_int(flags + bb, 1) == 0) {
              add_items<T>(a, bb * batch, std::min(bb * batch + batch, items), &stats[1]);
              any = true;
            }
          if (!any) return 3;  // on the host nothing else runs: waiting would never end
        }
        for (int m = 0; m < a.M; ++m)
          for (int nn = u * kTaskRows; nn < std::min(a.N, (u + 1) * kTaskRows); ++nn) finish_output<T>(a, m, nn);
        a.fin.counters[u] = 0;
      }
      // leave
      if (a.parts != nullptr && atomic_add_int(exits_of(a.fin), 1) == launch_warps - 1) {
        for (int i = 0; i < a.M * a.block_r; ++i) a.parts[i] = 0.f;
        for (int bb = 0; bb < batches; ++bb) flags[bb] = 0;
        *done_of(a.fin) = 0;
        *exits_of(a.fin) = 0;
      }
    }
  }
  return 0;
}

// y [M, N] in T (dtype 0: fp16, 1: bf16) from x [M, K] (T, and xf: x as fp32), W [N, K] (fp32),
// A [R, K] and B [N, R] in T (or null: no LoRA), bias [N] in T (or null); ws [M, N] and xa
// [M, block_r] fp32 and counters int32 (n_counters), zero before and, if the protocol holds, after.
// The grid as the op's: `blocks` a K slice, `warps` a block, K cut as k_split asks, the work split
// as the mma GEMV's (split 0) or the byte-lookup GEMV's (1: one row of x); `order` lists
// the blocks (blockIdx.y · blocks + blockIdx.x) in the order they run. stats: [0] units finished,
// [1] items computed by waiting finishers, [2] items computed by their own warps. Returns 0, or 1
// for bad arguments, 2 if n_counters is too few, 3 if a finisher would wait forever.
extern "C" int int1_finish_emulate(int dtype, const void* x, const float* xf, const float* W, const void* A,
                                   const void* B, const void* bias, float scaling, void* y, float* ws, float* xa,
                                   int* counters, int n_counters, int M, int N, int K, int R, int block_r, int slots,
                                   int blocks, int warps, int k_split, const int* order, int* stats, int split) {
  using namespace loraq_mma;
  if (dtype < 0 || dtype > 1 || M < 1 || M > kMaxRows || N < 1 || K < 1 || blocks < 1 || warps < 1 || k_split < 1 ||
      split < 0 || split > 1)
    return 1;
  // the byte-lookup GEMV: one row of x, K in slices of 1024 (the op refuses fewer)
  const int task_inputs = split == 1 ? loraq_lut8::kSliceInputs : kTaskInputs;
  if (split == 1 && (M != 1 || k_split < (K + task_inputs - 1) / task_inputs)) return 1;
  Args a{};
  a.x = x;
  a.ws = ws;
  a.M = M;
  a.N = N;
  a.K = K;
  a.slice_inputs = (int)slice_inputs_for(K, k_split, task_inputs);
  const int slices = (K + a.slice_inputs - 1) / a.slice_inputs;
  if (A != nullptr) {
    if (R < 1 || block_r < R || block_r % loraq_gemv::kXaRanks || slots < 1 || slots > blocks * slices) return 1;
    a.lora_A = A;
    a.parts = xa;
    a.R = R;
    a.block_r = block_r;
    a.slots = slots;
  }
  a.fin.y = y;
  a.fin.lora_B = B;
  a.fin.bias = bias;
  a.fin.scaling = scaling;
  a.fin.counters = counters;
  a.fin.units = (N + kTaskRows - 1) / kTaskRows;
  a.fin.unit_tasks = split == 1 ? kTaskRows * slices : (K + kTaskInputs - 1) / kTaskInputs;  // the op's
  const int launch_warps = blocks * warps * slices;
  if (n_counters < loraq_gemv::finish_counters(a.fin.units, loraq_gemv::xa_items(a), launch_warps)) return 2;
  for (int i = 0; i < 3; ++i) stats[i] = 0;
  if (dtype == 0) return run<__half>(a, W, xf, split, blocks, warps, slices, order, stats);
  return run<__nv_bfloat16>(a, W, xf, split, blocks, warps, slices, order, stats);
}

// The arrivals at each unit from one K slice's `total` warps of the byte-lookup GEMV's split (row
// runs over N, row_arrivals): per_unit[u] += the rows warp w brings to unit u, for u below
// `capacity` (a unit past it: returns -1). Returns the number of units.
extern "C" int row_arrival_counts(int N, int total, int* per_unit, int capacity) {
  using namespace loraq_gemv;
  const int units = (N + loraq_lut8::kUnitRows - 1) / loraq_lut8::kUnitRows;
  for (int w = 0; w < total; ++w) {
    const RowArrivals ra = warp_row_arrivals(w, total, N, loraq_lut8::kUnitRows);
    for (int u = ra.u0; u < ra.u1; ++u) {
      if (u < 0 || u >= capacity) return -1;
      per_unit[u] += run_tasks_in_group(ra.first, ra.count, loraq_lut8::kUnitRows, u);
    }
  }
  return units;
}
