// Helpers shared by the CUDA small-batch GEMVs (int1_gemv_mma.cuh, sparse4x4_gemv.cuh,
// sparse4x4_gemv_mma.cuh).
//
// Device code only (no torch headers). The conversions are __host__ __device__ so that a kernel's
// per-thread code can also be compiled for the host and run there (tests/cuda/: the sparse4x4
// GEMV is emulated block by block on the CPU, where CI has no GPU).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <string.h>

namespace loraq_gemv {

__host__ __device__ __forceinline__ uint16_t bits16(__half v) { return __half_as_ushort(v); }
__host__ __device__ __forceinline__ uint16_t bits16(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
__host__ __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__host__ __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__host__ __device__ __forceinline__ T from_float(float v);
template <>
__host__ __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Warp `warp` of `total` takes the tasks [first, first + count) of `tasks`: contiguous runs, as
// even as the division makes them (every warp of a launch, in every kernel and in the emulation).
struct WarpRun {
  int64_t first;
  int count;
};
__host__ __device__ __forceinline__ WarpRun warp_run(int64_t warp, int64_t total, int64_t tasks) {
  const int64_t first = warp * tasks / total;
  return {first, (int)((warp + 1) * tasks / total - first)};
}

// A read-only load: through the non-coherent cache on the GPU, a plain read on the host.
template <typename V>
__host__ __device__ __forceinline__ V load_ro(const V* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

// *p += v for a float in shared or global memory that several threads add to: atomicAdd on the GPU,
// a plain add on the host, where the emulations run one thread at a time.
__host__ __device__ __forceinline__ void atomic_add_float(float* p, float v) {
#ifdef __CUDA_ARCH__
  atomicAdd(p, v);
#else
  *p += v;
#endif
}

// Bytes of a (0..3) and b (4..7) picked by the low four nibbles of s (prmt, default mode; the
// selectors of the kernels have bit 3 of those nibbles clear). In PTX: __byte_perm masks the selector with
// 0x7777 first, one more instruction per register.
__host__ __device__ __forceinline__ uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t s) {
#ifdef __CUDA_ARCH__
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(s));
  return d;
#else
  const uint64_t both = ((uint64_t)b << 32) | a;
  uint32_t out = 0;
  for (int i = 0; i < 4; ++i) out |= (uint32_t)((both >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return out;
#endif
}

// A non-negative float truncated to int (__float2int_rz on the GPU; the host's cast does the same).
__host__ __device__ __forceinline__ int trunc_to_int(float v) {
#ifdef __CUDA_ARCH__
  return __float2int_rz(v);
#else
  return (int)v;
#endif
}

// Start the line of `p` on its way into L2 (a hint: nothing waits, no register is written). The
// kernels ask for their first tasks' weights this way before they copy x, so that the loads after
// the copy find them in L2 instead of waiting for memory then. Nothing on the host.
__host__ __device__ __forceinline__ void prefetch_l2(const void* p) {
#ifdef __CUDA_ARCH__
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#else
  (void)p;
#endif
}

#ifdef __CUDACC__
// D += A·B on the tensor cores: mma.sync m16n8k16, fp32 accumulators, A row-major and B column-
// major fragments (the last argument picks fp16 or bf16 operands).
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, __half) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, __nv_bfloat16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Add an mma's accumulator fragments (m16n8, NT tiles of 8 rows of x) into ws [M, N] and zero
// them: lane (g, t) holds rows 2t, 2t + 1 of each tile for weight rows n0 (times s0) and n0 + 8
// (times s1); rows past M or N are dropped.
template <int NT>
__host__ __device__ __forceinline__ void add_fragments(float* ws, int M, int N, float (&acc)[NT][4], int n0, int t,
                                                       float s0, float s1) {
  const int n1 = n0 + 8;
#pragma unroll
  for (int tile = 0; tile < NT; ++tile) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int m = tile * 8 + 2 * t + e;
      if (m < M) {
        if (n0 < N) atomic_add_float(ws + (int64_t)m * N + n0, acc[tile][e] * s0);
        if (n1 < N) atomic_add_float(ws + (int64_t)m * N + n1, acc[tile][2 + e] * s1);
      }
      acc[tile][e] = 0.f;
      acc[tile][2 + e] = 0.f;
    }
  }
}
#endif  // __CUDACC__

// Whether 8 inputs of a row of `base` ([rows, K] 16-bit values) at a multiple of 8 are one
// aligned 16-byte load: K % 8 == 0 and a 16-byte aligned base.
__host__ __device__ __forceinline__ bool rows_aligned16(const void* base, int K) {
  return K % 8 == 0 && (reinterpret_cast<uintptr_t>(base) & 15u) == 0;
}

// Inputs k .. k + 7 (k a multiple of 8) of row m of `base` ([rows, K] 16-bit values), the bits
// two to a word (input k in the low half of .x); zeros past K and for m ≥ rows. `vec`:
// rows_aligned16, and then eight inputs inside the row are one 16-byte load.
__host__ __device__ __forceinline__ uint4 load_x8(const void* base, int rows, int K, int m, int k, bool vec) {
  if (m >= rows || k >= K) return make_uint4(0u, 0u, 0u, 0u);
  const uint16_t* row = static_cast<const uint16_t*>(base) + (int64_t)m * K;
  if (vec && k + 8 <= K) return load_ro(reinterpret_cast<const uint4*>(row + k));
  uint32_t w[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const uint32_t lo = k + 2 * e < K ? load_ro(row + k + 2 * e) : 0u;
    const uint32_t hi = k + 2 * e + 1 < K ? load_ro(row + k + 2 * e + 1) : 0u;
    w[e] = lo | (hi << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Input e (0..7) of a load_x8 result, as fp32.
template <typename T>
__host__ __device__ __forceinline__ float input_of(const uint4& q, int e) {
  const uint32_t w = e < 2 ? q.x : e < 4 ? q.y : e < 6 ? q.z : q.w;
  const uint16_t bits = (uint16_t)((e & 1) ? w >> 16 : w & 0xFFFFu);
  T v;
  memcpy(&v, &bits, 2);
  return to_float(v);
}

// A copy into shared memory, `items` of them, thread `tid` of `threads`: `load(item)` for U items
// a round, then `store(item, data)` for each. A thread's loads of a round are in flight together:
// one memory latency a round, where a loop that stores each load before the next waits for each.
template <int U, typename D, typename Load, typename Store>
__host__ __device__ __forceinline__ void staged_copy(int items, int tid, int threads, Load load, Store store) {
  for (int base = tid; base < items; base += U * threads) {
    D d[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (base + u * threads < items) d[u] = load(base + u * threads);
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (base + u * threads < items) store(base + u * threads, d[u]);
  }
}

// The shares of x·Aᵀ: slot s of a.slots sums inputs [s·per, (s + 1)·per) of K, per a multiple of
// 8 (xa_share_per), into parts[s] [M, block_r] (zero past R). One warp an item: a row m of x and
// kXaRanks ranks r0 .. r0 + 3; lane l takes inputs k0 + 8·l + 256·i, eight a load.
constexpr int kXaRanks = 4;

__host__ __device__ __forceinline__ int xa_share_per(int K, int slots) { return ((K + slots - 1) / slots + 7) / 8 * 8; }

// Lane `lane`'s partial sums of the item (m, r0) of slot `slot`: the warp's sums are these added
// over its 32 lanes. Where x's and A's rows are 16-byte aligned, a round is five 16-byte loads
// (x and four rows of A) in flight together; else one input a round.
template <typename T, typename Args>
__host__ __device__ __forceinline__ void xa_lane_partial(const Args& a, int slot, int m, int r0, int lane,
                                                         float (&s)[kXaRanks]) {
  const int per = xa_share_per(a.K, a.slots);
  const int k0 = slot * per, k1 = min(a.K, k0 + per);  // k1 is a multiple of 8 or K
  const uint16_t* x = static_cast<const uint16_t*>(a.x) + (int64_t)m * a.K;
  const uint16_t* A = static_cast<const uint16_t*>(a.lora_A);
#pragma unroll
  for (int q = 0; q < kXaRanks; ++q) s[q] = 0.f;
  if (rows_aligned16(a.x, a.K) && rows_aligned16(a.lora_A, a.K)) {  // K % 8 == 0: k + 8 ≤ k1
#pragma unroll 1  // one round of loads at a time: unrolled, ptxas held 20 registers more
    for (int k = k0 + 8 * lane; k < k1; k += 256) {
      const uint4 xv = load_ro(reinterpret_cast<const uint4*>(x + k));
      uint4 av[kXaRanks];
#pragma unroll
      for (int q = 0; q < kXaRanks; ++q)
        av[q] = r0 + q < a.R ? load_ro(reinterpret_cast<const uint4*>(A + (int64_t)(r0 + q) * a.K + k))
                             : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float xe = input_of<T>(xv, e);
#pragma unroll
        for (int q = 0; q < kXaRanks; ++q)  // past R nothing is added: an inf or NaN x must leave those 0
          if (r0 + q < a.R) s[q] += xe * input_of<T>(av[q], e);
      }
    }
  } else {
#pragma unroll 1
    for (int k = k0 + lane; k < k1; k += 32) {
      const float xe = input_of<T>(make_uint4(load_ro(x + k), 0u, 0u, 0u), 0);
#pragma unroll
      for (int q = 0; q < kXaRanks; ++q)
        if (r0 + q < a.R) s[q] += xe * input_of<T>(make_uint4(load_ro(A + (int64_t)(r0 + q) * a.K + k), 0u, 0u, 0u), 0);
    }
  }
}

// s[lane] for lanes 0 .. kXaRanks - 1 (a select: indexing a register array by a variable would
// put it in local memory).
__host__ __device__ __forceinline__ float pick_rank(const float (&s)[kXaRanks], int lane) {
  float v = s[0];
#pragma unroll
  for (int q = 1; q < kXaRanks; ++q)
    if (lane == q) v = s[q];
  return v;
}

#ifdef __CUDACC__
// The warp's sums of the item (m, r0) of `slot`, in every lane.
template <typename T, typename Args>
__device__ __forceinline__ void xa_warp_sums(const Args& a, int slot, int m, int r0, int lane, float (&s)[kXaRanks]) {
  xa_lane_partial<T>(a, slot, m, r0, lane, s);
#pragma unroll
  for (int q = 0; q < kXaRanks; ++q)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s[q] += __shfl_xor_sync(0xffffffffu, s[q], off);
}

// parts[slot] for this block's slot (a.R rows of A, a.block_r columns of parts, a multiple of
// kXaRanks): every warp of the block takes items in turn.
template <typename T, typename Args>
__device__ void store_xa_share(const Args& a, int slot) {
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const int groups = a.block_r / kXaRanks;
  for (int idx = threadIdx.x >> 5; idx < a.M * groups; idx += warps) {
    const int m = idx / groups, r0 = (idx % groups) * kXaRanks;
    float s[kXaRanks];
    xa_warp_sums<T>(a, slot, m, r0, lane, s);
    if (lane < kXaRanks) a.parts[((int64_t)slot * a.M + m) * a.block_r + r0 + lane] = pick_rank(s, lane);
  }
}
#endif  // __CUDACC__

}  // namespace loraq_gemv
