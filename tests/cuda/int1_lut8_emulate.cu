// The int1 byte-lookup GEMV (csrc/int1_gemv_lut8.cuh) on the host for
// tests/test_int1_gemv_lut8_cuda.py, built with nvcc into a shared library and called with
// ctypes. The table fill (every thread of a block in turn), a lane's loads and sums of a batch of
// rows with the next batch's loads (lane_batch), the transpose's steps (sent, kept: each lane's half
// of every exchange), the row each lane ends with, whether it adds it, and its scale are the
// kernel's own code; the walk over slices, blocks, warps and batches follows the kernel's
// (loraq_gemv::warp_run, batches_for, the copy of the next batch's words). Device-only and not run here:
// the LDS, the shuffles themselves and the atomics.
#include <stdint.h>

#include <algorithm>
#include <vector>

#include "../../csrc/int1_gemv_lut8.cuh"
#include "int1_one_row_args.h"

using namespace loraq_lut8;

// entry_offset(b, e, l) and the permute's offset for (word, lane, byte), for the layout tests.
extern "C" int int1_lut8_entry_offset(int b, int e, int l) { return (int)entry_offset(b, e, l); }
extern "C" int int1_lut8_permuted_offset(uint32_t word, int l, int b) {
  return (int)(loraq_gemv::byte_perm(word, lane_low(l, b & 1), selector(b)) + (b >> 1) * kHalfBytes);
}
extern "C" int int1_lut8_table_bytes() { return kTableBytes; }

// One step of the transpose over the warp: lane l receives what lane l ^ bit sends.
template <int P>
static void step(float (&s)[32][kRows], int bit) {
  float out[32][P];
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < P; ++i) out[l][i] = sent<P>(s[l], (l & bit) != 0, i);
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < P; ++i) s[l][i] = kept<P>(s[l], (l & bit) != 0, i, out[l ^ bit][i]);
}

template <typename T, int MODE>
static void run(const loraq_mma::Args& a, int blocks, int warps, float* ws) {
  const int slices = (a.K + kSliceInputs - 1) / kSliceInputs;
  const int64_t total = (int64_t)blocks * warps;
  std::vector<unsigned char> table(kTableBytes);
  for (int slice = 0; slice < slices; ++slice) {
    // unwritten bytes would be NaN: every entry must be written by the fill
    std::fill(table.begin(), table.end(), (unsigned char)0xFF);
    for (int tid = 0; tid < 32 * warps; ++tid) fill_table<T, MODE>(a, table.data(), slice * kSliceInputs, tid, 32 * warps);
    for (int64_t warp = 0; warp < total; ++warp) {
      const loraq_gemv::WarpRun run = loraq_gemv::warp_run(warp, total, a.N);
      const int end = (int)run.first + run.count;
      uint32_t words[32][kRows];  // each lane's w0, loaded before the table as the kernel does
      for (int l = 0; l < 32; ++l)
        load_rows(a.packed + std::min(slice * kSliceWords + l, a.KW - 1), a.KW, (int)run.first, run.count, words[l]);
      int n0 = (int)run.first;
      for (int left = batches_for(a.N, total); left > 0; n0 += kRows) {
        float s[32][kRows];
        uint32_t next[32][kRows] = {};
        for (int l = 0; l < 32; ++l) {
          const int word_c = std::min(slice * kSliceWords + l, a.KW - 1);
          lane_batch<T, MODE>(a, table.data(), a.packed + word_c, words[l], next[l], n0, end, left, word_c, l, s[l]);
        }
        step<4>(s, 16);
        step<2>(s, 8);
        step<1>(s, 4);
        float t[32];
        for (int l = 0; l < 32; ++l) t[l] = s[l][0] + s[l ^ 2][0];  // reduce_rows's two plain shuffles
        for (int l = 0; l < 32; ++l) {
          const float sum = t[l] + t[l ^ 1];
          const int n = n0 + row_of_lane(l);
          if (adds_row(l, n, end)) ws[n] += sum * row_scale<T, MODE>(a, n);
        }
        if (--left == 0) break;
        for (int l = 0; l < 32; ++l)
          for (int r = 0; r < kRows; ++r) words[l][r] = next[l][r];
      }
    }
  }
}

template <typename T>
static void run_mode(int mode, const loraq_mma::Args& a, int blocks, int warps, float* ws) {
  if (mode == kScaleRow) run<T, kScaleRow>(a, blocks, warps, ws);
  else if (mode == kScaleGroup) run<T, kScaleGroup>(a, blocks, warps, ws);
  else run<T, kScaleOnebit>(a, blocks, warps, ws);
}

// ws [N] (fp32, added into) = x·Ŵᵀ for one row of x, as `blocks` blocks a K slice of `warps`
// warps compute it. dtype 0: fp16, 1: bf16; mode 0 (row α), 1 (group α, group_size a multiple of
// 32), 2 (onebit: h in scale, g in col). Returns 1 (and computes nothing) for bad arguments.
extern "C" int int1_lut8_emulate(int dtype, int mode, const void* x, const void* g, const int32_t* packed,
                                 const void* scale, int N, int K, int G, int group_size, int blocks, int warps,
                                 float* ws) {
  if (!one_row_args_ok(dtype, mode, g, N, K, group_size, blocks, warps)) return 1;
  const loraq_mma::Args a = one_row_args(mode, x, g, packed, scale, N, K, G, group_size, kSliceInputs);
  if (dtype == 0) run_mode<__half>(mode, a, blocks, warps, ws);
  else run_mode<__nv_bfloat16>(mode, a, blocks, warps, ws);
  return 0;
}
