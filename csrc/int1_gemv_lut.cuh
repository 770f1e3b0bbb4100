// The int1 forward for one row of x by table lookup: x·Ŵᵀ with a table of sums in shared memory.
//
// Device code only (no torch headers); the op is int1_gemv_mma_op.h's (its argument lut = 1), the
// arguments loraq_mma::Args. The table code is __host__ __device__: tests/cuda/int1_lut_emulate.cu
// runs it, and a lane's sums, on the CPU.
//
// Why: the mma GEMV (int1_gemv_mma.cuh) decodes two weights with a shift and a LOP3 and feeds the
// tensor cores 8 columns of which one row of x uses one: about 1.8 instructions a weight a lane
// (its loop: 462 for a warp's 16 x 512 weights), and it took 25.7 µs at 8192→28672 (target 15).
// Here each block first tabulates, for every group of 4 inputs of its K slice, the 16 sums
// ±x0 ±x1 ±x2 ±x3 (fp32, in shared memory); a weight row's nibble of sign bits then picks its
// group's sum: a shift, a LOP3, an LDS and an FADD for 4 weights; with the loop's own, 1.31
// instructions a weight a lane compiled for sm_90 (bench/sass_cuda.py --kernel lut). The Triton
// lookup GEMV (int1_gemv_lut.py) does the same lookups through warp shuffles and is bound by the
// L1 pipeline; an LDS of a table that the lanes share costs one pass.
//
// Lanes and banks: a task is 16 weight rows x 512 inputs (16 words a row). Lane (r, h) = (lane / 2,
// lane % 2) reads words 4h .. 4h + 3 and 8 + 4h .. 11 + 4h of row r (two 16-byte loads; each load
// of the lane pair is one whole 32-byte sector of the row). At each unrolled step (word j, nibble
// i) the 16 lanes of each h look up the same group's 16 entries (16 consecutive banks; equal
// entries broadcast); the two halves h lie 64 bytes apart
// modulo 128 (the table of h = 1 starts after that of h = 0 and 64 bytes of padding), so a warp's
// lookup never conflicts. Every table base is a multiple of 64 bytes, so a nibble's offset (its
// value times 4, bits 2-5) is ORed into the base with the mask, in one LOP3.
//
// Table layout (bytes): half h, chunk c (512 inputs), word j (0..7) of the half, group i (0..7) of
// the word, entry e: h·half_bytes + (8c + j)·512 + 64i + 4e, half_bytes = 4096·chunks + 64. Entry e
// of group i is Σ_b (bit b of e ? +x : -x) of input 32w + 4i + b, w = 16c + chunk_word(h, j) the
// word of the slice: bit 4i + b of a weight word is that input's sign (loraq/formats/int1.py).
//
// Work split (stream-K, as the mma GEMV): a K slice per blockIdx.y; its tasks (16 weight rows x
// 512 inputs) in row-major order cut into equal runs, one a warp; a lane sums its half row in
// fp32 and, when its 16 rows change, the pair adds up (one shuffle) and adds into the fp32
// workspace with an atomic, times the row scale. The same units (16 rows) as the mma GEMV, so
// its one-launch finish (gemv_finish.cuh) applies unchanged.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "gemv_common.cuh"
#include "gemv_finish.cuh"
#include "int1_gemv_mma.cuh"

namespace loraq_lut {

using loraq_mma::Args;
using loraq_mma::kScaleGroup;
using loraq_mma::kScaleOnebit;
using loraq_mma::kScaleRow;

constexpr int kTaskRows = 16;                            // weight rows a task: a lane pair a row
constexpr int kLaneWords = 8;                            // words a lane a task: two 16-byte loads
constexpr int kTaskWords = 2 * kLaneWords;               // words a row a task
constexpr int kTaskInputs = 32 * kTaskWords;             // inputs a task: 512
constexpr int kGroupBytes = 64;                          // 16 fp32 sums a group of 4 inputs
constexpr int kWordBytes = 8 * kGroupBytes;              // a word's 8 groups
constexpr int kChunkHalfBytes = kLaneWords * kWordBytes; // a half's words of a chunk
constexpr int kHalfPad = 64;                             // puts the halves 64 bytes apart modulo 128

// Bytes of one half of the table of a slice of `chunks` chunks, and of the whole table.
__host__ __device__ __forceinline__ int half_bytes(int chunks) { return chunks * kChunkHalfBytes + kHalfPad; }
__host__ __device__ __forceinline__ int table_bytes(int chunks) { return 2 * half_bytes(chunks); }

// Word j (0..7) of lane half h within a task's 16 words: j 0-3 are words 4h .. 4h + 3, j 4-7 words
// 8 + 4h .. 11 + 4h.
__host__ __device__ __forceinline__ int chunk_word(int h, int j) { return (j & 3) | (h << 2) | ((j >> 2) << 3); }

// Byte offset of group i of word w of the slice.
__host__ __device__ __forceinline__ int group_offset(int w, int i, int chunks) {
  const int c = w / kTaskWords, p = w % kTaskWords;
  const int h = (p >> 2) & 1, j = (p & 3) | ((p >> 3) << 2);  // chunk_word's inverse
  return h * half_bytes(chunks) + (kLaneWords * c + j) * kWordBytes + i * kGroupBytes;
}

// Four inputs k .. k + 3 (k a multiple of 4) of the row of x, as fp32: zeros past K; onebit: x·g
// rounded to T as the mma GEMV rounds it.
template <typename T, int MODE>
__host__ __device__ __forceinline__ void load_x4(const Args& a, int k, bool vx, bool vg, float (&v)[4]) {
  const int k8 = k & ~7, e0 = k & 4;
  uint4 q = loraq_gemv::load_x8(a.x, 1, a.K, 0, k8, vx);
  if (MODE == kScaleOnebit) q = loraq_mma::times_g<T>(q, loraq_gemv::load_x8(a.col, 1, a.K, 0, k8, vg));
#pragma unroll
  for (int b = 0; b < 4; ++b) v[b] = loraq_gemv::input_of<T>(q, e0 + b);
}

// Entries 4q .. 4q + 3 of a group whose inputs are v: entry e = Σ_b (bit b of e ? v[b] : -v[b]).
__host__ __device__ __forceinline__ float4 quarter_entries(const float (&v)[4], int q) {
  const float hi = ((q & 1) ? v[2] : -v[2]) + ((q & 2) ? v[3] : -v[3]);
  const float sum01 = v[0] + v[1], diff01 = v[0] - v[1];
  return make_float4(hi - sum01, hi + diff01, hi - diff01, hi + sum01);
}

// Fill the table of this block's K slice (k0 .. k0 + 256·chunks): thread `tid` of `threads`. An
// item is a quarter of a group (4 entries, one 16-byte store); items in order, so that 8 lanes
// store 128 contiguous bytes. Two items a thread a round in flight, as loraq_gemv::staged_copy.
template <typename T, int MODE>
__host__ __device__ void fill_table(const Args& a, unsigned char* table, int k0, int chunks, int tid, int threads) {
  const bool vx = loraq_gemv::rows_aligned16(a.x, a.K), vg = loraq_gemv::rows_aligned16(a.col, a.K);
  const int items = chunks * kTaskInputs;  // 4 quarters of each group of 4 inputs
  struct Inputs {
    float v[4];
  };
  auto load = [&](int item) {
    Inputs in;
    load_x4<T, MODE>(a, k0 + 4 * (item >> 2), vx, vg, in.v);
    return in;
  };
  auto store = [&](int item, const Inputs& in) {
    const int group = item >> 2, q = item & 3;
    *reinterpret_cast<float4*>(table + group_offset(group >> 3, group & 7, chunks) + 16 * q) =
        quarter_entries(in.v, q);
  };
  loraq_gemv::staged_copy<2, Inputs>(items, tid, threads, load, store);
}

// (v & 0x3C) | base in one LOP3: written in C, ptxas turned the OR into an add once it could prove
// the bits apart, and then needed an IADD a lookup to fold the base into the address.
__host__ __device__ __forceinline__ uint32_t or_nibble(uint32_t v, uint32_t base) {
#ifdef __CUDA_ARCH__
  uint32_t d;
  asm("lop3.b32 %0, %1, 0x3C, %2, 0xEA;" : "=r"(d) : "r"(v), "r"(base));
  return d;
#else
  return (v & 0x3Cu) | base;
#endif
}

// Where a table lives for word_sum's lookups: on the GPU its shared-window address (a multiple
// of 128: the table is declared so), to which the offsets are ORed; on the host 0 (offsets from
// the table's pointer).
__host__ __device__ __forceinline__ uint32_t table_address(const unsigned char* table) {
#ifdef __CUDA_ARCH__
  return (uint32_t)__cvta_generic_to_shared(table);
#else
  (void)table;
  return 0u;
#endif
}

// The fp32 at `at` (table_address + offset) of the table: an LDS on the GPU (ptxas folds the
// constant part of `at` into the instruction).
__host__ __device__ __forceinline__ float lookup(const unsigned char* table, uint32_t at) {
#ifdef __CUDA_ARCH__
  (void)table;
  float v;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(at) : "memory");  // reads the table: after its fill
  return v;
#else
  float v;
  memcpy(&v, table + at, 4);
  return v;
#endif
}

// The sum of one weight word's 32 signed inputs: 8 lookups in the table of its word, at
// base + `offset` (base: a multiple of 64, the same for a lane's 8 words of a task; offset a
// constant, folded into the LDS with the group's). The nibble's offset is ORed into the base (one
// LOP3).
__host__ __device__ __forceinline__ float word_sum(const unsigned char* table, uint32_t word, uint32_t base,
                                                   uint32_t offset) {
  float v[8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
    v[i] = lookup(table, or_nibble(i == 0 ? word << 2 : word >> (4 * i - 2), base) + offset + (uint32_t)(i * kGroupBytes));
  // two chains started by their first lookups (0 + v is an instruction: -0 + 0 is not -0)
  return ((v[0] + v[2]) + (v[4] + v[6])) + ((v[1] + v[3]) + (v[5] + v[7]));
}

// α of the group of word `word` of row n (group mode).
template <typename T>
__host__ __device__ __forceinline__ float group_alpha(const Args& a, int n, int word) {
  const T* s = static_cast<const T*>(a.scale);
  const int group = (int)(((float)word + 0.5f) * a.inv_group_words);
  return loraq_gemv::to_float(s[(int64_t)n * a.G + group]);
}

// A lane's 8 words of a task (two 16-byte loads).
struct LaneWords {
  uint4 lo, hi;
};

// Lane (r, h)'s sum over its 8 words of a task, added to acc. base: table_address + the offset of
// its word 0 of the task's chunk c (group_offset(16c + chunk_word(h, 0), 0)); its word j is at
// base + 512 j, a multiple of 64 bytes, the nibbles ORed in. Group mode: n is its row and word_c the row's word
// where the chunk starts.
template <typename T, int MODE>
__host__ __device__ __forceinline__ float lane_task_sum(const Args& a, const unsigned char* table, const LaneWords& u,
                                                        uint32_t base, int n, int word_c, int h, float acc) {
  const uint32_t words[kLaneWords] = {u.lo.x, u.lo.y, u.lo.z, u.lo.w, u.hi.x, u.hi.y, u.hi.z, u.hi.w};
#pragma unroll
  for (int j = 0; j < kLaneWords; ++j) {
    const float s = word_sum(table, words[j], base, (uint32_t)(j * kWordBytes));
    if (MODE == kScaleGroup) {
      const int word = word_c + chunk_word(h, j);
      acc += (n < a.N && word < a.KW) ? group_alpha<T>(a, n, word) * s : 0.f;
    } else {
      acc += s;
    }
  }
  return acc;
}

#ifdef __CUDACC__
// The pair's sum of row n into the workspace, times the row scale (α or onebit h rounded to T, as
// the reference rounds Ŵ; group mode has it already), and zero it.
template <typename T, int MODE>
__device__ __forceinline__ void flush(const Args& a, float& acc, int n, int h) {
  const float pair = acc + __shfl_xor_sync(0xffffffffu, acc, 1);
  acc = 0.f;
  if (h != 0 || n >= a.N) return;
  const T* s = static_cast<const T*>(a.scale);
  const float scale = MODE == kScaleGroup ? 1.f : loraq_gemv::to_float(s[(int64_t)n * a.G]);
  atomicAdd(a.ws + n, pair * scale);
}

// Where a lane is in its run: the task (row group, chunk), its row's words (null past N), the
// row's word where the chunk starts, and the table offset of the lane's word 0 of that chunk.
struct Cursor {
  int rg, c;
  const int32_t* row;
  int word_c;
  uint32_t base;
};

__device__ __forceinline__ const int32_t* row_of(const Args& a, int n) {
  return n < a.N ? a.packed + (int64_t)n * a.KW : nullptr;
}

// The next task: the next chunk, or the next row group's first.
__device__ __forceinline__ void advance(const Args& a, Cursor& t, int chunks, int slice_word0, int r,
                                        uint32_t half_base) {
  if (++t.c < chunks) {
    t.word_c += kTaskWords;
    t.base += kChunkHalfBytes;
  } else {
    t.c = 0;
    ++t.rg;
    t.row = row_of(a, t.rg * kTaskRows + r);
    t.word_c = slice_word0;
    t.base = half_base;
  }
}

// Lane (r, h)'s 8 words of the task (words 4h .. 4h + 3 and 8 + 4h .. 11 + 4h of the chunk); zeros
// past the row or N.
template <bool VEC>
__device__ __forceinline__ LaneWords load_lane(const Args& a, const Cursor& t, int h) {
  LaneWords u{};
  if (t.row == nullptr) return u;
  const int w0 = t.word_c + 4 * h, w1 = w0 + 8;
  if (VEC) {  // KW % 4 == 0: four words from a multiple of 4 lie inside the row or past it
    if (w0 < a.KW) u.lo = loraq_gemv::load_ro(reinterpret_cast<const uint4*>(t.row + w0));
    if (w1 < a.KW) u.hi = loraq_gemv::load_ro(reinterpret_cast<const uint4*>(t.row + w1));
  } else {
    uint32_t* lo = &u.lo.x;
    uint32_t* hi = &u.hi.x;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (w0 + e < a.KW) lo[e] = (uint32_t)loraq_gemv::load_ro(t.row + w0 + e);
      if (w1 + e < a.KW) hi[e] = (uint32_t)loraq_gemv::load_ro(t.row + w1 + e);
    }
  }
  return u;
}

// A warp's run of tasks [first, first + count) of its K slice: two tasks a pass, their words in
// two buffers (one loading while the other is looked up; no copy between them).
template <typename T, int MODE, bool VEC>
__device__ __forceinline__ void run_tasks(const Args& a, const unsigned char* table, int64_t first, int count,
                                          int chunks, int slice_word0, int r, int h) {
  float acc = 0.f;
  Cursor cur;
  cur.rg = (int)(first / chunks);
  cur.c = (int)(first % chunks);
  cur.row = row_of(a, cur.rg * kTaskRows + r);
  cur.word_c = slice_word0 + cur.c * kTaskWords;
  const uint32_t half_base = table_address(table) + (uint32_t)(h * half_bytes(chunks));
  cur.base = half_base + (uint32_t)(cur.c * kChunkHalfBytes);
  Cursor nxt = cur;
  LaneWords w0 = load_lane<VEC>(a, cur, h), w1;
  int left = count;
  // one task: look up `now`, while the next task's words load into `later`; false after the last
  auto step = [&](const LaneWords& now, LaneWords& later) {
    advance(a, nxt, chunks, slice_word0, r, half_base);
    if (left > 1) later = load_lane<VEC>(a, nxt, h);
    const int n = cur.rg * kTaskRows + r;
    acc = lane_task_sum<T, MODE>(a, table, now, cur.base, n, cur.word_c, h, acc);
    if (left == 1 || nxt.rg != cur.rg) loraq_lut::flush<T, MODE>(a, acc, n, h);
    cur = nxt;
    return --left > 0;
  };
  while (step(w0, w1) && step(w1, w0)) {
  }
}

// One row of x (a.M == 1). ONE: the one-launch finish (a.fin.y set), as the mma GEMV's.
template <typename T, int MODE, bool VEC, bool ONE>
__global__ void __launch_bounds__(1024) int1_gemv_lut_kernel(const Args a) {
  extern __shared__ __align__(128) unsigned char lut_table[];
  const int k0 = blockIdx.y * a.slice_inputs;
  const int chunks = (min(a.K - k0, a.slice_inputs) + kTaskInputs - 1) / kTaskInputs;
  const int lane = threadIdx.x & 31, r = lane >> 1, h = lane & 1;
  const int warps = blockDim.x >> 5;
  const int64_t warp = (int64_t)blockIdx.x * warps + (threadIdx.x >> 5), total = (int64_t)gridDim.x * warps;
  const int64_t tasks = (int64_t)((a.N + kTaskRows - 1) / kTaskRows) * chunks;
  const int slice_word0 = k0 / 32;
  {  // the first two tasks' weights on their way into L2 while the table is built
    const auto [first, count] = loraq_gemv::warp_run(warp, total, tasks);
    for (int i = 0; i < 2 && i < count; ++i) {
      const int rg = (int)((first + i) / chunks);
      const int word = slice_word0 + (int)((first + i) % chunks) * kTaskWords + 8 * h;  // the row's 64 bytes
      const int n = rg * kTaskRows + r;
      if (n < a.N && word < a.KW) loraq_gemv::prefetch_l2(a.packed + (int64_t)n * a.KW + word);
    }
  }
  const int block = blockIdx.y * gridDim.x + blockIdx.x;
  if (ONE && a.parts != nullptr)
    loraq_gemv::own_xa_batch<T>(a, (int)(blockIdx.y * total + warp), loraq_gemv::xa_batch(a, (int)(total * gridDim.y)), lane);
  if (!ONE && a.parts != nullptr && block < a.slots) loraq_gemv::store_xa_share<T>(a, block);
  fill_table<T, MODE>(a, lut_table, k0, chunks, threadIdx.x, blockDim.x);
  // the OR of a nibble's offset into a base needs the table 64-byte aligned: ptxas honours the
  // declaration's 128 (the CUDA guide does not promise it for dynamic shared memory), so a
  // toolchain that did not must fail here, not give wrong sums
  if (table_address(lut_table) & 63u) __trap();
  __syncthreads();
  const loraq_gemv::WarpRun run = loraq_gemv::warp_run(warp, total, tasks);
  const int64_t first = run.first;
  const int count = run.count;
  if (count > 0) loraq_lut::run_tasks<T, MODE, VEC>(a, lut_table, first, count, chunks, slice_word0, r, h);
  // the wait for x·Aᵀ inlined: out of line, what lived across its call went to the stack (240 bytes)
  if (ONE) loraq_gemv::finish_input_slices<T, true>(a, kTaskInputs, kTaskRows);
}
#endif  // __CUDACC__

}  // namespace loraq_lut
