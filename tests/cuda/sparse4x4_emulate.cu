// The sparse4x4 CUDA GEMV (csrc/sparse4x4_gemv.cuh) run on the host, block by block, for
// tests/test_sparse4x4_gemv_cuda.py: built with nvcc into a shared library and called with ctypes.
//
// Each block is emulated as the GPU runs it: every thread's share of the copy of x into "shared
// memory", then every lane of every warp's run of tasks (the lanes never talk to each other;
// the device's atomics are plain adds here). The per-thread code is the kernel's own.
#include <stdint.h>

#include <vector>

#include "../../csrc/sparse4x4_gemv.cuh"

// The kernels' arguments as the launcher fills them, for a weight packed by Sparse4x4Weight
// (positions two 4-bit codes a byte) and ws from torch.zeros; the slice plan is set by the caller.
static loraq_sparse::Args emulated_args(const void* x, const uint16_t* values, const uint8_t* positions, float* ws,
                                        int M, int N, int K) {
  loraq_sparse::Args a{};
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
  return a;
}

namespace gather_emu {

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

}  // namespace gather_emu

// ws [M, N] fp32 gets x·Ŵᵀ added. dtype 0: fp16, 1: bf16 (x and values). Returns 0, or 1 for bad
// arguments. The slice plan is the launcher's.
extern "C" int sparse4x4_emulate(int dtype, int rows, int vec, const void* x, const uint16_t* values,
                                 const uint8_t* positions, float* ws, int M, int N, int K, int blocks, int warps,
                                 int k_split) {
  using gather_emu::by_rows;
  loraq_sparse::Args a = emulated_args(x, values, positions, ws, M, N, K);
  a.out4 = N % 4 == 0;  // ws from torch.zeros: aligned
  if (M < 1 || K < 1 || k_split < 1 || blocks < 1 || warps < 1) return 1;
  a.slice_tiles = loraq_sparse::slice_tiles_for(a.TK, k_split < a.TK ? k_split : a.TK);
  if (dtype == 0)
    return vec ? by_rows<__half, true>(rows, a, blocks, warps, k_split) : by_rows<__half, false>(rows, a, blocks, warps, k_split);
  if (dtype == 1)
    return vec ? by_rows<__nv_bfloat16, true>(rows, a, blocks, warps, k_split)
               : by_rows<__nv_bfloat16, false>(rows, a, blocks, warps, k_split);
  return 1;
}

// --- the tensor-core kernel (csrc/sparse4x4_gemv_mma.cuh) -----------------------------------------
//
// A warp's tasks as the kernel runs them: per mma step, every lane builds its A registers
// (a_regs, the kernel's decode) and reads its B registers from the shared copy of x (x_unit,
// the kernel's layout); the mma itself is computed here (mma_emulate.h) from the PTX ISA's fragment
// layout for m16n8k16.

#include "../../csrc/sparse4x4_gemv_mma.cuh"
#include "mma_emulate.h"

namespace mma_emu {

using namespace loraq_sparse_mma;

using mma_emulate::mma;

template <typename T, bool VEC, int NT>
void emulate(const Args& a, int blocks, int warps) {
  const int slices = (a.TK + a.slice_tiles - 1) / a.slice_tiles;
  for (int sl = 0; sl < slices; ++sl) {
    const int tile0 = sl * a.slice_tiles;
    const int tiles = a.TK - tile0 < a.slice_tiles ? a.TK - tile0 : a.slice_tiles;
    const int chunks = (tiles + kTaskTiles - 1) / kTaskTiles;
    const int row_units = chunks * kSteps * 4 + kRowPadUnits;
    std::vector<uint32_t> xs((size_t)2 * NT * kTileRows * row_units, 0xFFFFFFFFu);  // NaNs where nothing is filled
    for (int b = 0; b < blocks; ++b) {
      for (int tid = 0; tid < 32 * warps; ++tid)
        fill_x<T>(a, xs.data(), 4 * tile0, chunks * kTaskInputs, row_units, NT * kTileRows, tid, 32 * warps);
      for (int w = 0; w < warps; ++w) {
        const int64_t warp = (int64_t)b * warps + w, total = (int64_t)blocks * warps;
        const int64_t tasks = (int64_t)((a.N + kTaskRows - 1) / kTaskRows) * chunks;
        const auto [first, count] = loraq_gemv::warp_run(warp, total, tasks);
        float acc[NT][32][4] = {};
        for (int i = 0; i < count; ++i) {
          const int rg = (int)((first + i) / chunks), c = (int)((first + i) % chunks);
          uint32_t fa[kSteps][32][4];
          for (int lane = 0; lane < 32; ++lane) {
            const int g = lane >> 2, t = lane & 3;
            uint32_t val[2][kSteps / 2], pos[2][kSteps / 8], pwx[2][kSteps / 8];
            load_task<VEC>(a, 4 * rg + g / 4, tile0 + kSteps * t + c * kTaskTiles, val, pos);
            for (int j = 0; j < 2; ++j)
              for (int q = 0; q < kSteps / 8; ++q) pwx[j][q] = pos[j][q] ^ row_mask(g);
            for (int s = 0; s < kSteps; ++s) a_regs(val, pwx, s, fa[s][lane]);
          }
          for (int s = 0; s < kSteps; ++s)
            for (int tile = 0; tile < NT; ++tile) {
              uint32_t fb[32][2];
              for (int lane = 0; lane < 32; ++lane) {
                const int g = lane >> 2, t = lane & 3;
                const uint32_t* u = xs.data() + 2 * x_unit(tile * kTileRows + g, row_units, c, s, t);
                fb[lane][0] = u[0];
                fb[lane][1] = u[1];
              }
              mma<T>(acc[tile], fa[s], fb);
            }
          const bool last = i == count - 1 || (first + i + 1) / chunks != rg;
          if (!last) continue;
          for (int lane = 0; lane < 32; ++lane) {  // the kernel's flush
            const int g = lane >> 2, t = lane & 3, n0 = rg * kTaskRows + g, n1 = n0 + 8;
            for (int tile = 0; tile < NT; ++tile)
              for (int e = 0; e < 2; ++e) {
                const int m = tile * kTileRows + 2 * t + e;
                if (m < a.M) {
                  if (n0 < a.N) a.ws[(int64_t)m * a.N + n0] += acc[tile][lane][e];
                  if (n1 < a.N) a.ws[(int64_t)m * a.N + n1] += acc[tile][lane][2 + e];
                }
                acc[tile][lane][e] = acc[tile][lane][2 + e] = 0.f;
              }
          }
        }
      }
    }
  }
}

}  // namespace mma_emu

// The tensor-core kernel's sums added into ws [M, N] (M ≤ 16). dtype 0: fp16, 1: bf16.
extern "C" int sparse4x4_mma_emulate(int dtype, int vec, const void* x, const uint16_t* values,
                                     const uint8_t* positions, float* ws, int M, int N, int K, int blocks, int warps,
                                     int k_split) {
  loraq_sparse::Args a = emulated_args(x, values, positions, ws, M, N, K);
  if (M < 1 || M > loraq_sparse_mma::kMaxRows || K < 1 || k_split < 1 || blocks < 1 || warps < 1) return 1;
  a.slice_tiles = loraq_sparse_mma::slice_tiles_for(a.TK, k_split < a.TK ? k_split : a.TK);
  const bool two = M > loraq_sparse_mma::kTileRows;
  if (dtype == 0) {
    if (vec) two ? mma_emu::emulate<__half, true, 2>(a, blocks, warps) : mma_emu::emulate<__half, true, 1>(a, blocks, warps);
    else two ? mma_emu::emulate<__half, false, 2>(a, blocks, warps) : mma_emu::emulate<__half, false, 1>(a, blocks, warps);
    return 0;
  }
  if (dtype == 1) {
    if (vec) two ? mma_emu::emulate<__nv_bfloat16, true, 2>(a, blocks, warps)
                 : mma_emu::emulate<__nv_bfloat16, true, 1>(a, blocks, warps);
    else two ? mma_emu::emulate<__nv_bfloat16, false, 2>(a, blocks, warps)
             : mma_emu::emulate<__nv_bfloat16, false, 1>(a, blocks, warps);
    return 0;
  }
  return 1;
}
