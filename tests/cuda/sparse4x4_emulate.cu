// The sparse4x4 CUDA GEMV (csrc/sparse4x4_gemv.cuh) run on the host, block by block, for
// tests/test_sparse4x4_gemv_cuda.py: built with nvcc into a shared library and called with ctypes.
//
// Each block is emulated as the GPU runs it: every thread's share of the copy of x into "shared
// memory", then every lane of every warp's run of tasks (the lanes never talk to each other;
// the device's atomics are plain adds here). The per-thread code is the kernel's own.
#include <stdint.h>

#include <vector>

#include "../../csrc/sparse4x4_gemv.cuh"

using namespace loraq_sparse;

template <typename T, int ROWS, bool VEC>
static void emulate(const Args& a, int blocks, int warps, int k_split) {
  const int threads = 32 * warps;
  const int slices = (a.TK + a.slice_tiles - 1) / a.slice_tiles;
  for (int z = 0; z * ROWS < a.M; ++z)
    for (int s = 0; s < slices; ++s) {
      const int tile0 = s * a.slice_tiles, chunks = slice_chunks(a, tile0);
      std::vector<float> xs((size_t)chunks * kTaskInputs * ROWS + 4, -1e30f);  // garbage where nothing is filled
      for (int b = 0; b < blocks; ++b) {
        for (int tid = 0; tid < threads; ++tid)
          fill_x<T, ROWS>(a, xs.data(), 4 * tile0, chunks * kTaskInputs, z * ROWS, tid, threads);
        for (int w = 0; w < warps; ++w)
          for (int lane = 0; lane < 32; ++lane)
            run_lane<T, ROWS, VEC>(a, xs.data(), tile0, chunks, z * ROWS, (int64_t)b * warps + w,
                                   (int64_t)blocks * warps, lane);
      }
    }
}

template <typename T, bool VEC>
static int by_rows(int rows, const Args& a, int blocks, int warps, int k_split) {
  switch (rows) {
    case 1: emulate<T, 1, VEC>(a, blocks, warps, k_split); return 0;
    case 2: emulate<T, 2, VEC>(a, blocks, warps, k_split); return 0;
    case 4: emulate<T, 4, VEC>(a, blocks, warps, k_split); return 0;
    case 8: emulate<T, 8, VEC>(a, blocks, warps, k_split); return 0;
  }
  return 1;
}

// ws [M, N] fp32 gets x·Ŵᵀ added. dtype 0: fp16, 1: bf16 (x and values). Returns 0, or 1 for bad
// arguments. The slice plan is the launcher's.
extern "C" int sparse4x4_emulate(int dtype, int rows, int vec, const void* x, const uint16_t* values,
                                 const uint8_t* positions, float* ws, int M, int N, int K, int blocks, int warps,
                                 int k_split) {
  Args a{};
  a.x = x;
  a.values = values;
  a.positions = positions;
  a.ws = ws;
  a.M = M;
  a.N = N;
  a.K = K;
  a.TN = (N + 3) / 4;
  a.TK = (K + 3) / 4;
  a.PW = (a.TK + 1) / 2;
  if (M < 1 || K < 1 || k_split < 1 || blocks < 1 || warps < 1) return 1;
  a.slice_tiles = slice_tiles_for(a.TK, k_split < a.TK ? k_split : a.TK);
  if (dtype == 0)
    return vec ? by_rows<__half, true>(rows, a, blocks, warps, k_split) : by_rows<__half, false>(rows, a, blocks, warps, k_split);
  if (dtype == 1)
    return vec ? by_rows<__nv_bfloat16, true>(rows, a, blocks, warps, k_split)
               : by_rows<__nv_bfloat16, false>(rows, a, blocks, warps, k_split);
  return 1;
}
