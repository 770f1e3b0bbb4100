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
__device__ __forceinline__ void add_fragments(float* ws, int M, int N, float (&acc)[NT][4], int n0, int t,
                                              float s0, float s1) {
  const int n1 = n0 + 8;
#pragma unroll
  for (int tile = 0; tile < NT; ++tile) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int m = tile * 8 + 2 * t + e;
      if (m < M) {
        if (n0 < N) atomicAdd(ws + (int64_t)m * N + n0, acc[tile][e] * s0);
        if (n1 < N) atomicAdd(ws + (int64_t)m * N + n1, acc[tile][2 + e] * s1);
      }
      acc[tile][e] = 0.f;
      acc[tile][2 + e] = 0.f;
    }
  }
}
#endif  // __CUDACC__

// parts[slot] = x[:, ks]·A[:, ks]ᵀ for this block's share ks of K (a.slots blocks share K), zero
// past R (a.R rows of A, a.block_r columns of parts). One warp per (row of x, rank) at a time.
template <typename T, typename Args>
__device__ void store_xa_share(const Args& a, int slot) {
  const T* x = static_cast<const T*>(a.x);
  const T* A = static_cast<const T*>(a.lora_A);
  const int per = (a.K + a.slots - 1) / a.slots;
  const int k0 = slot * per, k1 = min(a.K, k0 + per);
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  for (int idx = threadIdx.x >> 5; idx < a.M * a.block_r; idx += warps) {
    const int m = idx / a.block_r, r = idx % a.block_r;
    float s = 0.f;
    if (r < a.R)
      for (int k = k0 + lane; k < k1; k += 32)
        s += to_float(x[(int64_t)m * a.K + k]) * to_float(A[(int64_t)r * a.K + k]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) a.parts[((int64_t)slot * a.M + m) * a.block_r + r] = s;
  }
}

}  // namespace loraq_gemv
