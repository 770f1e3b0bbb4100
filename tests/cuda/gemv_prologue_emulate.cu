// The CUDA GEMVs' prologues run on the host for tests/test_gemv_prologue.py, built with nvcc into
// a shared library and called with ctypes: the int1 mma GEMV's copy of x into shared memory in
// pair order (fill_x, every thread of a block in turn) and the shares of x·Aᵀ that the first
// blocks of every CUDA GEMV store (xa_lane_partial for every lane of every item; the warp's
// shuffle sum is a plain sum here). The per-thread code is the kernels' own.
#include <stdint.h>

#include "../../csrc/int1_gemv_mma.cuh"

// xs (uint32 words, 2 a unit, M rows of chunks·128 + kRowPadUnits units) as `threads` threads of
// one block fill it for the slice starting at input k0. dtype 0: fp16, 1: bf16; onebit: x·g.
extern "C" int int1_fill_emulate(int dtype, int onebit, const void* x, const void* g, uint32_t* xs, int M, int K,
                                 int k0, int chunks, int threads) {
  using namespace loraq_mma;
  if (M < 1 || K < 1 || chunks < 1 || threads < 1 || k0 < 0 || k0 % kTaskInputs) return 1;
  Args a{};
  a.x = x;
  a.col = g;
  a.M = M;
  a.K = K;
  const int row_units = chunks * (kTaskInputs / 4) + kRowPadUnits;
  for (int tid = 0; tid < threads; ++tid) {
    if (dtype == 0 && !onebit) fill_x<__half, kScaleRow>(a, xs, k0, chunks, row_units, tid, threads);
    else if (dtype == 0) fill_x<__half, kScaleOnebit>(a, xs, k0, chunks, row_units, tid, threads);
    else if (dtype == 1 && !onebit) fill_x<__nv_bfloat16, kScaleRow>(a, xs, k0, chunks, row_units, tid, threads);
    else if (dtype == 1) fill_x<__nv_bfloat16, kScaleOnebit>(a, xs, k0, chunks, row_units, tid, threads);
    else return 1;
  }
  return 0;
}

// parts [slots, M, block_r] fp32 as the kernels' store_xa_share writes it, every slot.
extern "C" int xa_share_emulate(int dtype, const void* x, const void* A, float* parts, int M, int K, int R,
                                int block_r, int slots) {
  using namespace loraq_gemv;
  if (dtype < 0 || dtype > 1 || M < 1 || K < 1 || R < 1 || block_r < R || block_r % kXaRanks || slots < 1)
    return 1;
  loraq_mma::Args a{};
  a.x = x;
  a.lora_A = A;
  a.M = M;
  a.K = K;
  a.R = R;
  a.block_r = block_r;
  a.slots = slots;
  for (int slot = 0; slot < slots; ++slot)
    for (int m = 0; m < M; ++m)
      for (int r0 = 0; r0 < block_r; r0 += kXaRanks) {
        float sum[kXaRanks] = {};
        for (int lane = 0; lane < 32; ++lane) {
          float s[kXaRanks];
          if (dtype == 0) xa_lane_partial<__half>(a, slot, m, r0, lane, s);
          else xa_lane_partial<__nv_bfloat16>(a, slot, m, r0, lane, s);
          for (int q = 0; q < kXaRanks; ++q) sum[q] += s[q];
        }
        for (int q = 0; q < kXaRanks; ++q) parts[((int64_t)slot * M + m) * block_r + r0 + q] = sum[q];
      }
  return 0;
}
