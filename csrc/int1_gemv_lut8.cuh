// The int1 forward for one row of x by byte lookup: x·Ŵᵀ with a table of the 256 signed sums of
// every 8 inputs, in shared memory, and one lookup for 8 weights.
//
// Device code only (no torch headers); the op is int1_gemv_mma_op.h's (its argument lut = 2), the
// arguments loraq_mma::Args. The table, a lane's sums and the reduction's steps are __host__
// __device__: tests/cuda/int1_lut8_emulate.cu runs them on the CPU, lane by lane.
//
// Why: the lookup GEMV of 4 inputs (int1_gemv_lut.cuh) pays a shift, a LOP3, an LDS and an FADD
// for 4 weights (1.31 instructions a weight a lane with its loop), the mma GEMV 1.80 (it took
// 25.7 µs at 8192→28672 against the 15 µs target; NOTES.md). Here a byte of sign bits picks one
// of 256 sums: a PRMT builds the entry's address from the byte and the lane's column, then an LDS
// and an FADD, 3 instructions for 8 weights. The table is 128 bytes an input, so a block's K slice
// is 1024 inputs (a 128 KiB table, one block an SM): one word of every row a lane.
//
// Layout (bytes): entry e of byte b (0..3) of lane column l is at
//   (b / 2)·64 KiB + 256·e + 128·(b % 2) + 4·l,
// the sum Σ_i (bit i of e ? +x : -x) of inputs k0 + 32·l + 8·b + i, i = 0..7 (bit 8b + i of a
// weight word is the sign of input 32w + 8b + i: loraq/formats/int1.py). Lane l reads only column
// l, bank l: whatever the weights, a warp's lookup is one wavefront. The address without its
// (b / 2)·64 KiB (an immediate of the LDS) is one byte permute of the weight word and the lane's
// low byte 4·l + 128·(b % 2): byte 0 from the lane, byte 1 the word's byte b, bytes 2 and 3 zero.
//
// Work split: a K slice per blockIdx.y (lane l owns word 32·slice + l of every row); the slice's
// N rows cut into equal runs, one per warp of the slice's blocks; a warp takes its rows 8 at a
// time (kRows: the next 8 rows' words load while these are looked up). A lane's 8 row sums are
// then reduced over the warp by a transpose: three steps in which lanes exchange half their
// values (after them lane l holds row (l / 4) % 8 summed over 8 lanes) and two plain shuffles.
// One lane of four adds its row, times the row scale, into the fp32 workspace with an atomic.
// The finish is splitk_finish's second launch, or (ONE, LORAQ_ONE_LAUNCH=1) gemv_finish.cuh's in
// this launch: a warp arrives at each unit of 16 rows with its rows there (finish_row_runs).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <string.h>

#include "gemv_common.cuh"
#include "gemv_finish.cuh"
#include "int1_gemv_lut.cuh"
#include "int1_gemv_mma.cuh"

namespace loraq_lut8 {

using loraq_mma::Args;
using loraq_mma::kScaleGroup;
using loraq_mma::kScaleOnebit;
using loraq_mma::kScaleRow;

constexpr int kSliceWords = 32;                 // words a row of a K slice: one a lane
constexpr int kSliceInputs = 32 * kSliceWords;  // inputs a K slice: 1024
constexpr int kEntries = 256;                   // sums a byte of 8 inputs
constexpr int kHalfBytes = 65536;               // bytes 0 and 1 of the words in the first half, 2 and 3 in the second
constexpr int kTableBytes = 2 * kHalfBytes;     // 128 KiB: one block an SM
constexpr int kRows = 8;                        // rows a batch: a lane's words in flight
constexpr int kItems = 4 * kEntries / 32;       // items a lane column: 4 bytes x 8 blocks of 32 entries
constexpr int kThreads = 1024;                  // the launch bound
constexpr int kUnitRows = 16;                   // rows a unit of the one-launch finish (the op's kTaskRows)

// Byte offset of entry e of byte b of lane column l.
__host__ __device__ constexpr uint32_t entry_offset(int b, int e, int l) {
  return (uint32_t)((b >> 1) * kHalfBytes + 256 * e + 128 * (b & 1) + 4 * l);
}

// The byte permute's selector for byte b: result byte 0 = the lane's low byte (selector 4, byte 0
// of the second operand), byte 1 = byte b of the word, bytes 2 and 3 = the second operand's byte
// 2, which is zero.
__host__ __device__ constexpr uint32_t selector(int b) { return 0x6604u | ((uint32_t)b << 4); }

// The second operand of the permute for lane l and a byte of parity `odd`: 4·l + 128·odd.
__host__ __device__ constexpr uint32_t lane_low(int l, int odd) { return 4u * (uint32_t)l + 128u * (uint32_t)odd; }

// The entry at `offset` of the table: an LDS on the GPU (the table's shared-window base and a
// constant part of `offset` fold into the instruction).
__host__ __device__ __forceinline__ float lookup(const unsigned char* table, uint32_t offset) {
#ifdef __CUDA_ARCH__
  return *reinterpret_cast<const float*>(table + offset);
#else
  float v;
  memcpy(&v, table + offset, 4);
  return v;
#endif
}

// The sum of a weight word's 32 signed inputs for the lane whose low bytes are low0 (bytes 0 and
// 2) and low1 (bytes 1 and 3): four lookups.
__host__ __device__ __forceinline__ float word_sum(const unsigned char* table, uint32_t word, uint32_t low0,
                                                   uint32_t low1) {
  const float v0 = lookup(table, loraq_gemv::byte_perm(word, low0, selector(0)));
  const float v1 = lookup(table, loraq_gemv::byte_perm(word, low1, selector(1)));
  const float v2 = lookup(table, loraq_gemv::byte_perm(word, low0, selector(2)) + kHalfBytes);
  const float v3 = lookup(table, loraq_gemv::byte_perm(word, low1, selector(3)) + kHalfBytes);
  return (v0 + v1) + (v2 + v3);
}

// Σ_i (bit i of e ? v[i] : -v[i]) over 4 inputs, for the 16 nibbles e.
__host__ __device__ __forceinline__ void nibble_sums(const float* v, float (&s)[16]) {
  const float p[4] = {-v[0] - v[1], v[0] - v[1], v[1] - v[0], v[0] + v[1]};  // bits 0 and 1
  const float q[4] = {-v[2] - v[3], v[2] - v[3], v[3] - v[2], v[2] + v[3]};  // bits 2 and 3
#pragma unroll
  for (int e = 0; e < 16; ++e) s[e] = p[e & 3] + q[e >> 2];
}

// Σ_i (bit i of e ? v[i] : -v[i]) over 4 inputs for one nibble e known at run time (selects: an
// array indexed by a variable would live in local memory).
__host__ __device__ __forceinline__ float nibble_sum(const float* v, int e) {
  return ((e & 1) ? v[0] : -v[0]) + ((e & 2) ? v[1] : -v[1]) + (((e & 4) ? v[2] : -v[2]) + ((e & 8) ? v[3] : -v[3]));
}

// The 8 inputs of a byte: k .. k + 7 of the row of x (k a multiple of 8), fp32, zeros past K;
// onebit: x·g rounded to T, as the mma GEMV rounds it.
struct ByteInputs {
  float v[8];
};

template <typename T, int MODE>
__host__ __device__ __forceinline__ ByteInputs byte_inputs(const Args& a, int k, bool vx, bool vg) {
  uint4 q = loraq_gemv::load_x8(a.x, 1, a.K, 0, k, vx);
  if (MODE == kScaleOnebit) q = loraq_mma::times_g<T>(q, loraq_gemv::load_x8(a.col, 1, a.K, 0, k, vg));
  ByteInputs in;
#pragma unroll
  for (int e = 0; e < 8; ++e) in.v[e] = loraq_gemv::input_of<T>(q, e);
  return in;
}

// Fill the table of the K slice from k0: thread `tid` of `threads`. A unit is (item, lane column
// l): unit bits 0-4 are l, so a warp's store of one entry is 128 contiguous bytes (one wavefront);
// item = byte b (bits 0-1) and a block of 32 entries (bits 2-4): its 32 sums are the nibble sums of
// inputs 0-3 (all 16) plus one of inputs 4-7 for each of its two high nibbles. Two units a round in flight.
template <typename T, int MODE>
__host__ __device__ void fill_table(const Args& a, unsigned char* table, int k0, int tid, int threads) {
  const bool vx = loraq_gemv::rows_aligned16(a.x, a.K), vg = loraq_gemv::rows_aligned16(a.col, a.K);
  auto load = [&](int unit) {
    const int l = unit & 31, b = (unit >> 5) & 3;
    return byte_inputs<T, MODE>(a, k0 + 32 * l + 8 * b, vx, vg);
  };
  auto store = [&](int unit, const ByteInputs& in) {
    const int l = unit & 31, b = (unit >> 5) & 3, block = unit >> 7;
    float lo[16];
    nibble_sums(in.v, lo);
    const float hi[2] = {nibble_sum(in.v + 4, 2 * block), nibble_sum(in.v + 4, 2 * block + 1)};
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const float h = hi[j >> 4];
      float* at = reinterpret_cast<float*>(table + entry_offset(b, 32 * block + j, l));
      *at = lo[j & 15] + h;
    }
  };
  loraq_gemv::staged_copy<2, ByteInputs>(kItems * 32, tid, threads, load, store);
}

// Lane l's words of rows n0 .. n0 + kRows - 1: `col` points at its word of row 0, clamped to the
// row (a lane past the last word reads that word: its table column is all zeros, inputs past K);
// `valid` of the rows are the warp's, the others read as zeros. Full batches test nothing.
__host__ __device__ __forceinline__ void load_rows(const int32_t* col, int KW, int n0, int valid,
                                                   uint32_t (&w)[kRows]) {
  const int32_t* p = col + (int64_t)n0 * KW;
  if (valid >= kRows) {
#pragma unroll
    for (int r = 0; r < kRows; ++r, p += KW) w[r] = (uint32_t)loraq_gemv::load_ro(p);
  } else {
#pragma unroll
    for (int r = 0; r < kRows; ++r, p += KW) w[r] = r < valid ? (uint32_t)loraq_gemv::load_ro(p) : 0u;
  }
}

// Lane l's sums of its word (word_c, clamped as load_rows's) of rows n0 .. n0 + kRows - 1: s[r];
// group mode: times the word's α (a group is a multiple of 32 inputs: a word lies in one), for
// the `valid` rows that are the warp's.
template <typename T, int MODE>
__host__ __device__ __forceinline__ void lane_sums(const Args& a, const unsigned char* table, const uint32_t (&w)[kRows],
                                                   int n0, int valid, int word_c, int l, float (&s)[kRows]) {
  const uint32_t low0 = lane_low(l, 0), low1 = lane_low(l, 1);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    s[r] = word_sum(table, w[r], low0, low1);
    if (MODE == kScaleGroup) s[r] *= r < valid ? loraq_lut::group_alpha<T>(a, n0 + r, word_c) : 0.f;
  }
}

// One lane's part of a batch (rows n0 .. n0 + kRows - 1 of the warp's rows up to `end`) before the
// warp's reduction: the next batch's words into `later` while batches are left after this one,
// then its sums of `now` (the words load_rows gave it).
template <typename T, int MODE>
__host__ __device__ __forceinline__ void lane_batch(const Args& a, const unsigned char* table, const int32_t* col,
                                                    const uint32_t (&now)[kRows], uint32_t (&later)[kRows], int n0,
                                                    int end, int left, int word_c, int l, float (&s)[kRows]) {
  if (left > 1) load_rows(col, a.KW, n0 + kRows, end - n0 - kRows, later);
  lane_sums<T, MODE>(a, table, now, n0, end - n0, word_c, l, s);
}

// A step of the transpose: lanes l and l ^ bit (bit = 16, 8, 4) each hold P pairs (v[i], v[i + P]);
// the lane with the bit set keeps the second of each pair and sends the first, the other the
// reverse, and each adds what it receives to what it keeps (v[i] after the step).
template <int P>
__host__ __device__ __forceinline__ float sent(const float* v, bool upper, int i) {
  return upper ? v[i] : v[i + P];
}
template <int P>
__host__ __device__ __forceinline__ float kept(const float* v, bool upper, int i, float received) {
  return (upper ? v[i + P] : v[i]) + received;
}

// The row whose sum lane l holds after the transpose's three steps (bits 4, 3, 2 of l pick halves).
__host__ __device__ constexpr int row_of_lane(int l) { return (l >> 2) & (kRows - 1); }

// Whether lane l adds its row n into the workspace: one lane of the four that hold it, for the
// warp's rows (up to `end`) only.
__host__ __device__ constexpr bool adds_row(int l, int n, int end) { return (l & 3) == 0 && n < end; }

// The scale row n's sum is multiplied by: α or onebit h, rounded to T as the reference rounds Ŵ
// (group mode: 1, lane_sums applied α).
template <typename T, int MODE>
__host__ __device__ __forceinline__ float row_scale(const Args& a, int n) {
  if (MODE == kScaleGroup) return 1.f;
  return loraq_gemv::to_float(static_cast<const T*>(a.scale)[(int64_t)n * a.G]);
}

// Batches every warp runs when `total` warps share N rows: enough for the longest run.
__host__ __device__ __forceinline__ int batches_for(int N, int64_t total) {
  return (int)((((int64_t)N + total - 1) / total + kRows - 1) / kRows);
}

#ifdef __CUDACC__
template <int P>
__device__ __forceinline__ void transpose_step(float* v, int lane, int bit) {
  const bool upper = (lane & bit) != 0;
  float out[P];
#pragma unroll
  for (int i = 0; i < P; ++i) out[i] = __shfl_xor_sync(0xffffffffu, sent<P>(v, upper, i), bit);
#pragma unroll
  for (int i = 0; i < P; ++i) v[i] = kept<P>(v, upper, i, out[i]);
}

// The warp's sum of row row_of_lane(lane), in every lane.
__device__ __forceinline__ float reduce_rows(float (&s)[kRows], int lane) {
  static_assert(kRows == 8, "three halving steps for 8 rows");
  transpose_step<4>(s, lane, 16);
  transpose_step<2>(s, lane, 8);
  transpose_step<1>(s, lane, 4);
  float t = s[0];
  t += __shfl_xor_sync(0xffffffffu, t, 2);
  t += __shfl_xor_sync(0xffffffffu, t, 1);
  return t;
}

// One row of x (a.M == 1). ONE: the one-launch finish (gemv_finish.cuh; a.fin.y set; units of
// kUnitRows rows arrived at by rows, unit_tasks = kUnitRows x slices), a separate instantiation;
// else two launches (the finish is splitk_finish's).
template <typename T, int MODE, bool ONE>
__global__ void __launch_bounds__(kThreads, 1) int1_gemv_lut8_kernel(const Args a) {
  extern __shared__ __align__(128) unsigned char lut8_table[];
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const int word_c = min(blockIdx.y * kSliceWords + lane, a.KW - 1);
  const int32_t* col = a.packed + word_c;
  const int64_t warp = (int64_t)blockIdx.x * warps + (threadIdx.x >> 5), total = (int64_t)gridDim.x * warps;
  const loraq_gemv::WarpRun run = loraq_gemv::warp_run(warp, total, a.N);
  const int end = (int)run.first + run.count;
  uint32_t w0[kRows];
  load_rows(col, a.KW, (int)run.first, run.count, w0);  // the first rows' words load while the table is built
  const int block = blockIdx.y * gridDim.x + blockIdx.x;
  if (ONE && a.parts != nullptr)  // this warp's batch of x·Aᵀ's items
    loraq_gemv::own_xa_batch<T>(a, (int)(blockIdx.y * total + warp), loraq_gemv::xa_batch(a, (int)(total * gridDim.y)), lane);
  if (!ONE && a.parts != nullptr && block < a.slots) loraq_gemv::store_xa_share<T>(a, block);
  fill_table<T, MODE>(a, lut8_table, blockIdx.y * kSliceInputs, threadIdx.x, blockDim.x);
  __syncthreads();
  // every warp runs the same number of batches, the most any warp needs (its last rows past `end`
  // look up zeros and add nothing): a trip count ptxas can see is uniform lets it keep the
  // table's shared-window base in a uniform register, folded into each LDS (else an IADD a lookup)
  int left = batches_for(a.N, total);
  int n0 = (int)run.first;
  // one batch: look up `now` while the next batch's words load into `later`; false after the last
  auto step = [&](const uint32_t (&now)[kRows], uint32_t (&later)[kRows]) {
    const int n = n0 + row_of_lane(lane);
    const float scale = n < end ? row_scale<T, MODE>(a, n) : 0.f;  // its load issued early
    float s[kRows];
    lane_batch<T, MODE>(a, lut8_table, col, now, later, n0, end, left, word_c, lane, s);
    const float sum = reduce_rows(s, lane);
    if (adds_row(lane, n, end)) atomicAdd(a.ws + n, sum * scale);
    n0 += kRows;
    return --left > 0;
  };
  // one buffer and a copy (eight moves a batch): with two buffers in turn (a loop of two
  // batches), ptxas added the table's base to each lookup's address with an IADD instead
  while (left > 0) {
    uint32_t next[kRows];
    if (!step(w0, next)) break;  // the last batch loads nothing into next
#pragma unroll
    for (int r = 0; r < kRows; ++r) w0[r] = next[r];
  }
  // the wait for x·Aᵀ inlined: out of line, what lives across its call went to the stack (188 bytes)
  if (ONE) loraq_gemv::finish_row_runs<T, true>(a, kUnitRows);
}
#endif  // __CUDACC__

}  // namespace loraq_lut8
