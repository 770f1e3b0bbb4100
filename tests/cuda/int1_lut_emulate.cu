// The int1 lookup GEMV (csrc/int1_gemv_lut.cuh) on the host for tests/test_int1_gemv_lut_cuda.py,
// built with nvcc into a shared library and called with ctypes. The table fill (every thread of a
// block in turn), the group offsets and a lane's sum of a task (its 64 lookups, the group scales)
// are the kernel's own code; the walk over blocks, warps and tasks follows the kernel's split
// (loraq_gemv::warp_run) and its flush (the lane pair's sums added, times the row scale). The
// device-only parts (the loads, the shuffle, the atomics, the LDS) are not run here.
#include <stdint.h>

#include <algorithm>
#include <vector>

#include "../../csrc/int1_gemv_lut.cuh"
#include "int1_one_row_args.h"

// group_offset(w, i, chunks) and table_bytes(chunks), for the layout tests.
extern "C" int int1_lut_group_offset(int w, int i, int chunks) { return loraq_lut::group_offset(w, i, chunks); }
extern "C" int int1_lut_table_bytes(int chunks) { return loraq_lut::table_bytes(chunks); }

template <typename T>
static void fill(int mode, const loraq_mma::Args& a, unsigned char* table, int k0, int chunks, int threads) {
  using namespace loraq_lut;
  for (int tid = 0; tid < threads; ++tid) {
    if (mode == kScaleRow) fill_table<T, kScaleRow>(a, table, k0, chunks, tid, threads);
    else if (mode == kScaleGroup) fill_table<T, kScaleGroup>(a, table, k0, chunks, tid, threads);
    else fill_table<T, kScaleOnebit>(a, table, k0, chunks, tid, threads);
  }
}

template <typename T>
static float task_sum(int mode, const loraq_mma::Args& a, const unsigned char* table, const loraq_lut::LaneWords& u,
                      uint32_t base, int n, int word_c, int h) {
  using namespace loraq_lut;
  if (mode == kScaleRow) return lane_task_sum<T, kScaleRow>(a, table, u, base, n, word_c, h, 0.f);
  if (mode == kScaleGroup) return lane_task_sum<T, kScaleGroup>(a, table, u, base, n, word_c, h, 0.f);
  return lane_task_sum<T, kScaleOnebit>(a, table, u, base, n, word_c, h, 0.f);
}

// Word w of row n, 0 past the row or N (as the kernel's loads).
static uint32_t word_at(const loraq_mma::Args& a, int n, int w) {
  return n < a.N && w < a.KW ? (uint32_t)a.packed[(int64_t)n * a.KW + w] : 0u;
}

template <typename T>
static int run(int mode, loraq_mma::Args& a, int blocks, int warps, float* ws) {
  using namespace loraq_lut;
  const int slices = (a.K + a.slice_inputs - 1) / a.slice_inputs;
  const T* scale = static_cast<const T*>(a.scale);
  for (int slice = 0; slice < slices; ++slice) {
    const int k0 = slice * a.slice_inputs;
    const int chunks = (std::min(a.K - k0, a.slice_inputs) + kTaskInputs - 1) / kTaskInputs;
    const int slice_word0 = k0 / 32;
    std::vector<unsigned char> table(table_bytes(chunks), 0xFF);  // unwritten bytes: NaN, never read
    fill<T>(mode, a, table.data(), k0, chunks, warps * 32);
    const int64_t tasks = (int64_t)((a.N + kTaskRows - 1) / kTaskRows) * chunks, total = (int64_t)blocks * warps;
    for (int64_t warp = 0; warp < total; ++warp) {
      const loraq_gemv::WarpRun run = loraq_gemv::warp_run(warp, total, tasks);
      float acc[32] = {};
      for (int t = 0; t < run.count; ++t) {
        const int64_t task = run.first + t;
        const int rg = (int)(task / chunks), c = (int)(task % chunks);
        const int word_c = slice_word0 + c * kTaskWords;
        for (int lane = 0; lane < 32; ++lane) {
          const int r = lane >> 1, h = lane & 1, n = rg * kTaskRows + r;
          LaneWords u{};
          uint32_t* lo = &u.lo.x;
          uint32_t* hi = &u.hi.x;
          for (int e = 0; e < 4; ++e) {
            lo[e] = word_at(a, n, word_c + chunk_word(h, e));
            hi[e] = word_at(a, n, word_c + chunk_word(h, 4 + e));
          }
          const uint32_t base = table_address(table.data()) + (uint32_t)group_offset(c * kTaskWords + chunk_word(h, 0), 0, chunks);
          acc[lane] += task_sum<T>(mode, a, table.data(), u, base, n, word_c, h);
        }
        const bool last = t + 1 == run.count, moves = (task + 1) / chunks != rg;
        if (last || moves) {  // the flush: the pair's sums, times the row scale
          for (int r = 0; r < kTaskRows; ++r) {
            const int n = rg * kTaskRows + r;
            const float pair = acc[2 * r] + acc[2 * r + 1];
            acc[2 * r] = acc[2 * r + 1] = 0.f;
            if (n >= a.N) continue;
            const float s = mode == kScaleGroup ? 1.f : loraq_gemv::to_float(scale[(int64_t)n * a.G]);
            ws[n] += pair * s;
          }
        }
      }
    }
  }
  return 0;
}

// ws [N] (fp32, added into) = x·Ŵᵀ for one row of x, as `blocks` blocks of `warps` warps a K slice
// of `slice_inputs` inputs compute it. dtype 0: fp16, 1: bf16; mode 0 (row α), 1 (group α,
// group_size a multiple of 32), 2 (onebit: h in scale, g in col).
extern "C" int int1_lut_emulate(int dtype, int mode, const void* x, const void* g, const int32_t* packed,
                                const void* scale, int N, int K, int G, int group_size, int slice_inputs, int blocks,
                                int warps, float* ws) {
  using namespace loraq_lut;
  if (!one_row_args_ok(dtype, mode, g, N, K, group_size, blocks, warps) || slice_inputs < 1 ||
      slice_inputs % kTaskInputs)
    return 1;
  loraq_mma::Args a = one_row_args(mode, x, g, packed, scale, N, K, G, group_size, slice_inputs);
  if (dtype == 0) return run<__half>(mode, a, blocks, warps, ws);
  return run<__nv_bfloat16>(mode, a, blocks, warps, ws);
}
