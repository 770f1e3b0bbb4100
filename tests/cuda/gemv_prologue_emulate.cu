// The CUDA GEMVs' prologues run on the host for tests/test_gemv_prologue.py, built with nvcc into
// a shared library and called with ctypes: the int1 mma GEMV's copy of x into shared memory in
// pair order (fill_x, every thread of a block in turn), its offset decode of one register, and
// the shares of x·Aᵀ that the first blocks of every CUDA GEMV store (xa_lane_partial for every
// lane of every item; the warp's shuffle sum is a plain sum here). The code is the kernels' own.
#include <stdint.h>

#include "../../csrc/int1_gemv_mma.cuh"

// xs (uint32 words, 2 a unit, M rows of chunks·(task inputs / 4) + kRowPadUnits units, then
// M·chunks floats) as `threads` threads of one block fill it for the slice starting at input k0.
// dtype 0: fp16, 1: bf16; mode as the op's: 0 (row; group fills the same), 2 (onebit: x·g), 3 and 4
// (0 and 2 with the offset decode: x scaled per register, and the table of C, zeroed first as the
// kernel does); lane_words: the words a lane loads of each of its rows, 4 (tasks of 16 rows x 512
// inputs: the chunks) or 2 (32 x 256).
template <typename T, int LW>
static int fill_all(int mode, const loraq_mma::Args& a, uint32_t* xs, int k0, int chunks, int row_units, int threads) {
  using namespace loraq_mma;
  if (is_offset(mode))
    for (int i = 0; i < a.M * chunks; ++i) offset_c(xs, a.M, row_units, 0, 0)[i] = 0.f;
  for (int tid = 0; tid < threads; ++tid) {
    switch (mode) {
      case kScaleRow: fill_x<T, kScaleRow, LW>(a, xs, k0, chunks, row_units, tid, threads); break;
      case kScaleOnebit: fill_x<T, kScaleOnebit, LW>(a, xs, k0, chunks, row_units, tid, threads); break;
      case kScaleRowOffset: fill_x<T, kScaleRowOffset, LW>(a, xs, k0, chunks, row_units, tid, threads); break;
      case kScaleOnebitOffset: fill_x<T, kScaleOnebitOffset, LW>(a, xs, k0, chunks, row_units, tid, threads); break;
      default: return 1;
    }
  }
  return 0;
}

extern "C" int int1_fill_emulate(int dtype, int mode, const void* x, const void* g, uint32_t* xs, int M, int K,
                                 int k0, int chunks, int threads, int lane_words) {
  using namespace loraq_mma;
  if (lane_words != 4 && lane_words != 2) return 1;
  const int task_inputs = 128 * lane_words;
  if (M < 1 || K < 1 || chunks < 1 || threads < 1 || k0 < 0 || k0 % task_inputs) return 1;
  if (mode != kScaleRow && mode != kScaleOnebit && !is_offset(mode)) return 1;
  if (mode > kScaleOnebitOffset || (is_onebit(mode) && g == nullptr)) return 1;
  Args a{};
  a.x = x;
  a.col = g;
  a.M = M;
  a.K = K;
  const int row_units = chunks * (task_inputs / 4) + kRowPadUnits;
  if (dtype == 0)
    return lane_words == 4 ? fill_all<__half, 4>(mode, a, xs, k0, chunks, row_units, threads)
                           : fill_all<__half, 2>(mode, a, xs, k0, chunks, row_units, threads);
  if (dtype == 1)
    return lane_words == 4 ? fill_all<__nv_bfloat16, 4>(mode, a, xs, k0, chunks, row_units, threads)
                           : fill_all<__nv_bfloat16, 2>(mode, a, xs, k0, chunks, row_units, threads);
  return 1;
}

// Register p (0..15) of `word` under the offset decode, as the kernel builds it (offset_copy, then
// offset_pair with (16, 16) in the dtype). dtype 0: fp16, 1: bf16.
extern "C" uint32_t int1_offset_pair_emulate(int dtype, uint32_t word, int p) {
  using namespace loraq_mma;
  if (dtype == 0) return offset_pair<__half>(offset_copy<__half>(word, p >> 2), p, OffsetDecode<__half>::kSixteens);
  return offset_pair<__nv_bfloat16>(offset_copy<__nv_bfloat16>(word, p >> 2), p, OffsetDecode<__nv_bfloat16>::kSixteens);
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
