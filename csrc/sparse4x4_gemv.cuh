// The sparse4x4 small-batch forward as CUDA: x·Ŵᵀ for 1 to 16 rows of x, each stored value read once.
//
// Device code only (no torch headers): csrc/sparse4x4_gemv_op.h holds the launcher and the op
// registration. The per-thread code is __host__ __device__, so tests/cuda/sparse4x4_emulate.cu
// can run the kernel block by block on a CPU (where CI has no GPU) against the reference.
//
// Why: a stored value v at tile (tn, tk) with position p = 4·r + c (row r, column c inside the
// 4x4 tile) has one product, y[m, 4·tn + r] += v · x[m, 4·tk + c]. The Triton gather
// (kernels/sparse4x4_gemv.py) is limited by its L1 requests: a position byte and a gathered input
// from global memory for every value (`ncu`, NOTES.md). Here:
// * each lane owns one tile row (4 outputs) and reads 32 consecutive values (64 B, two full
//   sectors, in 16-byte loads) and their 32 positions (16 B) a task: 5 loads for 32 values;
// * the block's K slice of x sits in shared memory as fp32, [input][row of x]; the 32 lanes of a
//   warp walk the same tile columns in step, so a warp's gather reads one 16·ROWS-byte stretch
//   (four addresses: the four columns of a tile), a single wavefront;
// * the value goes to the accumulator of its row inside the tile by predication, no shuffles and
//   no reduction across threads: per value and row of x, one shared load (rows by fours) and four
//   predicated FMAs, of which one adds v·x and three add nothing.
//
// Work split (stream-K, as int1_gemv_mma.cuh): a K slice per blockIdx.y, ROWS rows of x per
// blockIdx.z; within a slice the tasks (32 tile rows x 32 tile columns: a warp's) in row-major
// order are cut into equal runs, one per warp. A lane sums its run in registers and adds it into
// the fp32 workspace (one 16-byte atomic per row of x where N % 4 == 0) whenever its tile row
// changes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <string.h>

#include "gemv_common.cuh"

namespace loraq_sparse {

constexpr int kChunkTiles = 32;                  // tile columns a task (a lane's 32 values)
constexpr int kTaskInputs = 4 * kChunkTiles;     // inputs a task: 128
constexpr int kWarpTileRows = 32;                // tile rows a task: one a lane
constexpr int kMaxRows = 16;                     // rows of x a call (ROWS a block, blockIdx.z blocks)
constexpr int kThreads = 512;                    // the launch bound: threads a block at most

using loraq_gemv::load_ro;
using loraq_gemv::to_float;

struct Args {
  const void* x;             // [M, K] in T, contiguous
  const uint16_t* values;    // [TN, TK]: the stored values, T's bits
  const uint8_t* positions;  // [TN, PW]: two 4-bit positions a byte, the low nibble the even tile column
  const void* lora_A;        // [R, K] in T, or null
  float* ws;                 // [M, N] fp32, zeroed: the sums are added in
  float* parts;              // [slots, M, block_r] fp32: each LoRA slot's share of x·Aᵀ, or null
  int M, N, K, TN, TK, PW, R, block_r, slots;
  int slice_tiles;           // tile columns a K slice (a multiple of the kernel's task): blockIdx.y's
  int out4;                  // 1 where N % 4 == 0 and ws is 16-byte aligned: 16-byte atomics
};

// The value in half `h` (0: low, 1: high) of a 32-bit pair, as fp32.
template <typename T>
__host__ __device__ __forceinline__ float value_at(uint32_t pair, int h);
template <>
__host__ __device__ __forceinline__ float value_at<__half>(uint32_t pair, int h) {
  return __half2float(__ushort_as_half((unsigned short)(h ? pair >> 16 : pair & 0xFFFFu)));
}
template <>
__host__ __device__ __forceinline__ float value_at<__nv_bfloat16>(uint32_t pair, int h) {
  const uint32_t bits = h ? pair & 0xFFFF0000u : pair << 16;  // bf16 is the top half of an fp32
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// Copy inputs [k0, k0 + inputs) of rows row0 .. row0 + ROWS - 1 of x into xs[k][m] as fp32, zeros
// past K and past M (a position in the padding of the last tile reads a zero). Thread `tid` of
// `threads`. An item is 8 inputs of one row (one 16-byte load where x's rows are aligned), two
// items a round in flight; items of a row are consecutive, so a warp reads whole lines.
template <typename T, int ROWS>
__host__ __device__ void fill_x(const Args& a, float* xs, int k0, int inputs, int row0, int tid, int threads) {
  const bool vx = loraq_gemv::rows_aligned16(a.x, a.K);
  const int per_row = inputs / 8;  // inputs is a multiple of kTaskInputs
  auto load = [&](int item) {
    return loraq_gemv::load_x8(a.x, a.M, a.K, row0 + item / per_row, k0 + 8 * (item % per_row), vx);
  };
  auto store = [&](int item, const uint4& q) {
    const int m = item / per_row, k = 8 * (item % per_row);
    float v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = loraq_gemv::input_of<T>(q, e);
    if (ROWS == 1) {  // 32 contiguous bytes at a multiple of 32
      float4* out = reinterpret_cast<float4*>(xs + k);
      out[0] = make_float4(v[0], v[1], v[2], v[3]);
      out[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) xs[(k + e) * ROWS + m] = v[e];
    }
  };
  loraq_gemv::staged_copy<2, uint4>(ROWS * per_row, tid, threads, load, store);
}

// The lines of a lane's task (tile row tn, tile columns tk .. tk + 31: 64 bytes of values, 16 of
// positions) on their way into L2.
__host__ __device__ __forceinline__ void prefetch_task(const Args& a, int tn, int tk) {
  if (tn >= a.TN || tk >= a.TK) return;
  const uint16_t* vrow = a.values + (int64_t)tn * a.TK + tk;
  loraq_gemv::prefetch_l2(vrow);
  if (tk + 16 < a.TK) loraq_gemv::prefetch_l2(vrow + 16);
  loraq_gemv::prefetch_l2(a.positions + (int64_t)tn * a.PW + tk / 2);
}

// Lane data of one task: tile row tn, tile columns tk .. tk + 31. val[i] holds values 2i (low
// half) and 2i + 1; pos[q] the positions of values 8q .. 8q + 7, 4 bits each. Zeros past TN and
// TK (a zero value adds nothing wherever its position points).
template <bool VEC>
__host__ __device__ __forceinline__ void load_task(const Args& a, int tn, int tk, uint32_t (&val)[16],
                                                   uint32_t (&pos)[4]) {
#pragma unroll
  for (int i = 0; i < 16; ++i) val[i] = 0u;
#pragma unroll
  for (int q = 0; q < 4; ++q) pos[q] = 0u;
  if (tn >= a.TN || tk >= a.TK) return;
  const uint16_t* vrow = a.values + (int64_t)tn * a.TK;
  const uint8_t* prow = a.positions + (int64_t)tn * a.PW;
  if (VEC) {  // TK % 32 == 0 and PW % 16 == 0 with 16-byte aligned bases: the task lies inside the row
    const uint4* v4 = reinterpret_cast<const uint4*>(vrow + tk);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint4 u = load_ro(v4 + i);
      val[4 * i] = u.x;
      val[4 * i + 1] = u.y;
      val[4 * i + 2] = u.z;
      val[4 * i + 3] = u.w;
    }
    const uint4 p = load_ro(reinterpret_cast<const uint4*>(prow + tk / 2));
    pos[0] = p.x;
    pos[1] = p.y;
    pos[2] = p.z;
    pos[3] = p.w;
  } else {
#pragma unroll
    for (int j = 0; j < kChunkTiles; ++j)
      if (tk + j < a.TK) val[j >> 1] |= (uint32_t)load_ro(vrow + tk + j) << (16 * (j & 1));
#pragma unroll
    for (int b = 0; b < kChunkTiles / 2; ++b)  // byte b: tile columns tk + 2b (low) and tk + 2b + 1
      if (tk + 2 * b < a.TK) pos[b >> 2] |= (uint32_t)load_ro(prow + tk / 2 + b) << (8 * (b & 3));
  }
}

// ROWS consecutive floats of shared memory (rows of x at one input): 16- or 8-byte loads.
template <int ROWS>
__host__ __device__ __forceinline__ void load_rows(const float* p, float (&out)[ROWS]) {
  if constexpr (ROWS % 4 == 0) {
#pragma unroll
    for (int i = 0; i < ROWS / 4; ++i) {
      const float4 f = reinterpret_cast<const float4*>(p)[i];
      out[4 * i] = f.x;
      out[4 * i + 1] = f.y;
      out[4 * i + 2] = f.z;
      out[4 * i + 3] = f.w;
    }
  } else if constexpr (ROWS == 2) {
    const float2 f = *reinterpret_cast<const float2*>(p);
    out[0] = f.x;
    out[1] = f.y;
  } else {
    out[0] = p[0];
  }
}

// (v, 0) if bit `mask` of `word` is clear, else (0, v). On the GPU in PTX: as C, LLVM turns the
// test into a shift, an and and a compare (three instructions) where one LOP3 with a predicate
// output does.
__host__ __device__ __forceinline__ void split_by_bit(uint32_t word, uint32_t mask, float v, float& clear,
                                                      float& set) {
#ifdef __CUDA_ARCH__
  asm("{\n\t.reg .pred p;\n\t.reg .b32 t;\n\tand.b32 t, %2, %3;\n\tsetp.ne.b32 p, t, 0;\n\t"
      "selp.f32 %0, 0f00000000, %4, p;\n\tselp.f32 %1, %4, 0f00000000, p;\n\t}"
      : "=f"(clear), "=f"(set)
      : "r"(word), "r"(mask), "f"(v));
#else
  clear = (word & mask) ? 0.f : v;
  set = (word & mask) ? v : 0.f;
#endif
}

// One task's products: acc[r][m] += v·x[m, 4·tk + c] for each of the lane's 32 values. xc: the
// task's first input in shared memory (xs + chunk · 128 · ROWS).
template <typename T, int ROWS>
__host__ __device__ __forceinline__ void task_fma(float (&acc)[4][ROWS], const uint32_t (&val)[16],
                                                  const uint32_t (&pos)[4], const float* xc) {
  constexpr int kRowBytes = ROWS == 1 ? 2 : ROWS == 2 ? 3 : ROWS == 4 ? 4 : ROWS == 8 ? 5 : 6;  // log2(4·ROWS)
  static_assert((1 << kRowBytes) == 4 * ROWS, "ROWS is 1, 2, 4, 8 or 16");
  const char* xb = reinterpret_cast<const char*>(xc);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint32_t pw = pos[q];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int j = 8 * q + e;
      const float v = value_at<T>(val[j >> 1], j & 1);
      float xv[ROWS];
      // the column c of position e, scaled to bytes (c · 4 · ROWS): one shift (either way; the
      // shift is a constant once unrolled) and one and
      const int to_bytes = 4 * e - kRowBytes;
      const uint32_t off = (to_bytes >= 0 ? pw >> to_bytes : pw << -to_bytes) & (3u << kRowBytes);
      load_rows<ROWS>(reinterpret_cast<const float*>(xb + off) + 4 * j * ROWS, xv);
      // row 2·hi + lo inside the tile: hi picks the value or a zero for rows {0, 1} and {2, 3},
      // lo the pair of accumulators (predicated FMAs, no select per row of x)
      float v01, v23;
      split_by_bit(pw, 8u << (4 * e), v, v01, v23);
      const bool lo = pw & (4u << (4 * e));
#pragma unroll
      for (int m = 0; m < ROWS; ++m) {
        if (lo) {
          acc[1][m] = fmaf(v01, xv[m], acc[1][m]);
          acc[3][m] = fmaf(v23, xv[m], acc[3][m]);
        } else {
          acc[0][m] = fmaf(v01, xv[m], acc[0][m]);
          acc[2][m] = fmaf(v23, xv[m], acc[2][m]);
        }
      }
    }
  }
}

__host__ __device__ __forceinline__ void add_to(float* p, float v) {
#ifdef __CUDA_ARCH__
  atomicAdd(p, v);
#else
  *p += v;
#endif
}

// Four adjacent sums (16-byte aligned): one vector atomic on Hopper, four before it.
__host__ __device__ __forceinline__ void add4_to(float* p, float v0, float v1, float v2, float v3) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(p), make_float4(v0, v1, v2, v3));
#else
  add_to(p, v0);
  add_to(p + 1, v1);
  add_to(p + 2, v2);
  add_to(p + 3, v3);
#endif
}

// Add a lane's sums for outputs 4·tn .. 4·tn + 3 and rows row0 .. row0 + ROWS - 1 into the
// workspace, then zero them.
template <int ROWS>
__host__ __device__ __forceinline__ void flush(const Args& a, float (&acc)[4][ROWS], int tn, int row0) {
  const int n = 4 * tn;
  if (tn < a.TN) {
#pragma unroll
    for (int m = 0; m < ROWS; ++m) {
      if (row0 + m >= a.M) break;
      float* out = a.ws + (int64_t)(row0 + m) * a.N + n;
      if (a.out4) {  // n + 3 < N, and a 16-byte aligned row
        add4_to(out, acc[0][m], acc[1][m], acc[2][m], acc[3][m]);
      } else {
#pragma unroll
        for (int r = 0; r < 4; ++r)
          if (n + r < a.N) add_to(out + r, acc[r][m]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int m = 0; m < ROWS; ++m) acc[r][m] = 0.f;
}

// One lane's run of tasks in its block's K slice (tile columns tile0 .. tile0 + 32·chunks - 1,
// xs its copy of x): warp `warp` of the slice's `total` warps takes tasks [first, next first).
template <typename T, int ROWS, bool VEC>
__host__ __device__ void run_lane(const Args& a, const float* xs, int tile0, int chunks, int row0, int64_t warp,
                                  int64_t total, int lane) {
  const int64_t tasks = (int64_t)((a.TN + kWarpTileRows - 1) / kWarpTileRows) * chunks;
  const auto [first, count] = loraq_gemv::warp_run(warp, total, tasks);
  if (count <= 0) return;
  int rg = (int)(first / chunks), c = (int)(first % chunks);  // the task: tile-row group, chunk
  uint32_t val[16], pos[4];
  load_task<VEC>(a, rg * kWarpTileRows + lane, tile0 + c * kChunkTiles, val, pos);
  float acc[4][ROWS];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int m = 0; m < ROWS; ++m) acc[r][m] = 0.f;
  for (int left = count; left > 0; --left) {
    int nc = c + 1, nrg = rg;
    if (nc == chunks) {
      nc = 0;
      ++nrg;
    }
    // the next task's loads first: they fly while this task computes
    uint32_t nval[16], npos[4];
    load_task<VEC>(a, left > 1 ? nrg * kWarpTileRows + lane : a.TN, tile0 + nc * kChunkTiles, nval, npos);
    task_fma<T, ROWS>(acc, val, pos, xs + (int64_t)c * kTaskInputs * ROWS);
    if (left == 1 || nrg != rg) flush<ROWS>(a, acc, rg * kWarpTileRows + lane, row0);
    rg = nrg;
    c = nc;
#pragma unroll
    for (int i = 0; i < 16; ++i) val[i] = nval[i];
#pragma unroll
    for (int q = 0; q < 4; ++q) pos[q] = npos[q];
  }
}

// Tile columns a K slice for at most k_split slices of whole tasks (the launcher's plan, and the
// host emulation's).
__host__ __device__ __forceinline__ int slice_tiles_for(int TK, int k_split) {
  const int per = (TK + k_split - 1) / k_split;
  return (per + kChunkTiles - 1) / kChunkTiles * kChunkTiles;
}

// Inputs of the shared copy of x for the slice that starts at tile column tile0: whole tasks.
__host__ __device__ __forceinline__ int slice_chunks(const Args& a, int tile0) {
  const int tiles = a.TK - tile0 < a.slice_tiles ? a.TK - tile0 : a.slice_tiles;
  return (tiles + kChunkTiles - 1) / kChunkTiles;
}

template <typename T, int ROWS, bool VEC>
__global__ void __launch_bounds__(kThreads, 1) sparse4x4_gemv_kernel(const Args a) {
  extern __shared__ float4 smem_f4[];
  float* xs = reinterpret_cast<float*>(smem_f4);
  const int tile0 = blockIdx.y * a.slice_tiles, row0 = blockIdx.z * ROWS;
  const int chunks = slice_chunks(a, tile0);
  const int warps = blockDim.x >> 5, lane = threadIdx.x & 31;
  const int64_t warp = (int64_t)blockIdx.x * warps + (threadIdx.x >> 5), total = (int64_t)gridDim.x * warps;
  {  // the first two tasks of this lane's run start for L2 before the copy of x (run_lane's plan)
    const auto [first, count] = loraq_gemv::warp_run(warp, total, (int64_t)((a.TN + kWarpTileRows - 1) / kWarpTileRows) * chunks);
    for (int i = 0; i < 2 && i < count; ++i)
      prefetch_task(a, (int)((first + i) / chunks) * kWarpTileRows + lane, tile0 + (int)((first + i) % chunks) * kChunkTiles);
  }
  const int block = blockIdx.y * gridDim.x + blockIdx.x;
  if (a.parts != nullptr && blockIdx.z == 0 && block < a.slots) loraq_gemv::store_xa_share<T>(a, block);
  fill_x<T, ROWS>(a, xs, 4 * tile0, chunks * kTaskInputs, row0, threadIdx.x, blockDim.x);
  __syncthreads();
  run_lane<T, ROWS, VEC>(a, xs, tile0, chunks, row0, warp, total, lane);
}

}  // namespace loraq_sparse
