// torch.ops.loraq.sparse4x4_gemv: the launcher of sparse4x4_gemv.cuh's gather and of
// sparse4x4_gemv_mma.cuh's tensor-core kernel (CUDA only; `rows` picks the kernel).
//
// It adds x·Ŵᵀ (fp32, rows of x ≤ 16) into a zeroed workspace and, with LoRA, stores each slot's
// share of x·Aᵀ; kernels/sparse4x4_gemv_cuda.py calls it inside splitk_finish.run_split, whose
// finish adds the LoRA path and the bias, casts, and zeroes the workspace again. Given y, the
// tensor-core kernel finishes in the same launch instead (gemv_finish.cuh; LORAQ_ONE_LAUNCH=1).
// Included once, by gemv_ops.cu (one translation unit for the GEMV ops: each costs minutes to compile).
#pragma once

#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "finish_op.h"
#include "op_checks.h"
#include "sparse4x4_gemv.cuh"
#include "sparse4x4_gemv_mma.cuh"

namespace loraq_sparse_op {

using loraq_sparse::Args;

using loraq_ops::launch_kernel;

template <typename T, bool VEC>
void launch_rows(int64_t rows, int64_t M, const loraq_sparse_mma::MmaArgs& one_args, dim3 grid, int threads,
                 size_t smem, int max_smem, cudaStream_t stream) {
  const Args& a = one_args;  // every kernel but the one-launch tensor-core kernel takes the base
  if (rows == 1) launch_kernel(loraq_sparse::sparse4x4_gemv_kernel<T, 1, VEC>, a, grid, threads, smem, max_smem, stream);
  else if (rows == 2) launch_kernel(loraq_sparse::sparse4x4_gemv_kernel<T, 2, VEC>, a, grid, threads, smem, max_smem, stream);
  else if (rows == 4) launch_kernel(loraq_sparse::sparse4x4_gemv_kernel<T, 4, VEC>, a, grid, threads, smem, max_smem, stream);
  else if (rows == 8) launch_kernel(loraq_sparse::sparse4x4_gemv_kernel<T, 8, VEC>, a, grid, threads, smem, max_smem, stream);
  else if (one_args.fin.y != nullptr) {  // the tensor-core kernel with its finish in the same launch
    if (M <= loraq_sparse_mma::kTileRows)
      launch_kernel(loraq_sparse_mma::sparse4x4_gemv_mma_kernel<T, VEC, 1, true>, one_args, grid, threads, smem, max_smem,
                    stream);
    else launch_kernel(loraq_sparse_mma::sparse4x4_gemv_mma_kernel<T, VEC, 2, true>, one_args, grid, threads, smem,
                       max_smem, stream);
  } else if (M <= loraq_sparse_mma::kTileRows)
    launch_kernel(loraq_sparse_mma::sparse4x4_gemv_mma_kernel<T, VEC, 1, false>, a, grid, threads, smem, max_smem, stream);
  else launch_kernel(loraq_sparse_mma::sparse4x4_gemv_mma_kernel<T, VEC, 2, false>, a, grid, threads, smem, max_smem, stream);
}

// Adds x·Ŵᵀ into ws [M, N] (fp32, zeroed) and, when lora_A is given, stores parts[s] = this
// slot's share of x·Aᵀ (parts [slots, M, block_r], fp32; r past R gets 0).
// rows: rows of x a block: 1, 2, 4 or 8 for the gather (blockIdx.z covers M), 16 for the
// tensor-core kernel (all of them); blocks: blocks per K slice; warps: warps a block; k_split:
// K slices (blockIdx.y).
// With y (the tensor-core kernel only), the one-launch finish (gemv_finish.cuh): the kernel also
// writes y = ws + s·(x·Aᵀ)·Bᵀ + b and leaves ws zero; parts is then xa [1, M, block_r] (zero),
// `slots` the slots x·Aᵀ is cut into, and counters the zeroed int32 counters
// (loraq_gemv::finish_counters of them), left zero.
void sparse4x4_gemv(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& positions,
                    const c10::optional<torch::Tensor>& lora_A, torch::Tensor ws,
                    const c10::optional<torch::Tensor>& parts, int64_t N, int64_t rows, int64_t blocks, int64_t warps,
                    int64_t k_split, const c10::optional<torch::Tensor>& y, const c10::optional<torch::Tensor>& counters,
                    const c10::optional<torch::Tensor>& lora_B, const c10::optional<torch::Tensor>& bias,
                    double scaling, int64_t slots) {
  const char* op = "sparse4x4_gemv";
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "sparse4x4_gemv: x must be float16 or bfloat16, got ", x.scalar_type());
  loraq_ops::check_cuda_tensor(op, x, "x", x.scalar_type(), 2);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M >= 1 && M <= loraq_sparse::kMaxRows, "sparse4x4_gemv: x must have 1 to ", loraq_sparse::kMaxRows,
              " rows, got ", M);
  loraq_ops::check_cuda_tensor(op, values, "values", x.scalar_type(), 2);
  loraq_ops::check_cuda_tensor(op, positions, "positions", at::kByte, 2);
  const int64_t TN = values.size(0), TK = values.size(1);
  TORCH_CHECK(TK == (K + 3) / 4 && TN == (N + 3) / 4, "sparse4x4_gemv: values must be [ceil(N/4), ceil(K/4)] = [",
              (N + 3) / 4, ", ", (K + 3) / 4, "], got ", values.sizes());
  TORCH_CHECK(positions.size(0) == TN && positions.size(1) == (TK + 1) / 2,
              "sparse4x4_gemv: positions must be [", TN, ", ", (TK + 1) / 2, "], got ", positions.sizes());
  loraq_ops::check_cuda_tensor(op, ws, "ws", at::kFloat, 2);
  TORCH_CHECK(ws.size(0) == M && ws.size(1) == N, "sparse4x4_gemv: ws must be [M, N] = [", M, ", ", N, "], got ",
              ws.sizes());
  const bool mma = rows == 16;
  TORCH_CHECK(rows == 1 || rows == 2 || rows == 4 || rows == 8 || mma,
              "sparse4x4_gemv: rows must be 1, 2, 4 or 8 (the gather) or 16 (the tensor-core kernel), got ", rows);
  TORCH_CHECK(blocks >= 1 && blocks < (int64_t(1) << 30) && k_split >= 1 && warps >= 1 &&
                  warps * 32 <= loraq_sparse::kThreads,
              "sparse4x4_gemv: blocks must be 1 to 2^30 - 1, k_split ≥ 1 and warps 1 to ", loraq_sparse::kThreads / 32);
  TORCH_CHECK(lora_A.has_value() == parts.has_value(), "sparse4x4_gemv: lora_A and parts come together");
  TORCH_CHECK(x.device() == values.device() && x.device() == positions.device() && x.device() == ws.device(),
              "sparse4x4_gemv: tensors on one device");
  TORCH_CHECK(K < (int64_t(1) << 30) && N < (int64_t(1) << 30), "sparse4x4_gemv: N and K must be below 2^30");

  loraq_sparse_mma::MmaArgs a{};  // the gather and the two-launch tensor-core kernel take its base
  a.x = x.data_ptr();
  a.values = reinterpret_cast<const uint16_t*>(values.data_ptr());
  a.positions = positions.data_ptr<uint8_t>();
  a.ws = ws.data_ptr<float>();
  a.M = (int)M;
  a.N = (int)N;
  a.K = (int)K;
  a.TN = (int)TN;
  a.TK = (int)TK;
  a.PW = (int)positions.size(1);
  a.out4 = N % 4 == 0 && reinterpret_cast<uintptr_t>(a.ws) % 16 == 0;
  // K slices of whole tasks (32 tile columns for the gather, 64 for the tensor-core kernel; none when K = 0)
  int64_t slices = 0;
  if (K > 0) {
    const int split = (int)std::min<int64_t>(k_split, a.TK);
    a.slice_tiles = mma ? loraq_sparse_mma::slice_tiles_for(a.TK, split) : loraq_sparse::slice_tiles_for(a.TK, split);
    slices = (TK + a.slice_tiles - 1) / a.slice_tiles;
  }
  const bool one = y.has_value();
  TORCH_CHECK(one || (!counters.has_value() && !lora_B.has_value() && !bias.has_value()),
              "sparse4x4_gemv: counters, lora_B and bias are the one-launch finish's: they come with y");
  TORCH_CHECK(!one || mma, "sparse4x4_gemv: the one-launch finish (y) is the tensor-core kernel's (rows 16), got rows ",
              rows);
  if (lora_A.has_value()) {
    const torch::Tensor& A = *lora_A;
    loraq_ops::check_cuda_tensor(op, A, "lora_A", x.scalar_type(), 2);
    TORCH_CHECK(A.size(1) == K, "sparse4x4_gemv: lora_A must be [R, K]");
    loraq_ops::check_cuda_tensor(op, *parts, "parts", at::kFloat, 3);
    TORCH_CHECK(A.device() == x.device() && parts->device() == x.device(), "sparse4x4_gemv: tensors on one device");
    TORCH_CHECK(parts->size(1) == M && parts->size(2) >= A.size(0) && parts->size(2) % 4 == 0 && parts->size(0) >= 1 &&
                    (K == 0 || parts->size(0) <= blocks * slices),
                "sparse4x4_gemv: parts must be [slots ≤ blocks·slices, M, ≥ R and a multiple of 4], got ", parts->sizes());
    a.lora_A = A.data_ptr();
    a.parts = parts->data_ptr<float>();
    a.R = (int)A.size(0);
    a.block_r = (int)parts->size(2);
    a.slots = (int)parts->size(0);
    if (one) {  // parts is xa [1, M, block_r]; the slots are the argument's
      TORCH_CHECK(parts->size(0) == 1 && slots >= 1 && (K == 0 || slots <= blocks * slices),
                  "sparse4x4_gemv: with y, parts must be xa [1, M, block_r] and 1 ≤ slots ≤ blocks·slices, got ",
                  parts->sizes(), " and ", slots, " slots");
      a.slots = (int)slots;
    }
  }
  if (one)
    loraq_ops::set_finish(op, a, x, ws, parts, *y, counters, lora_A, lora_B, bias, scaling,
                          blocks * std::max<int64_t>(slices, 1) * warps, loraq_sparse_mma::kTaskRows,
                          (TK + loraq_sparse_mma::kTaskTiles - 1) / loraq_sparse_mma::kTaskTiles);
  if (K == 0) {  // x·Ŵᵀ = 0 (the workspace stays zero) and so are the shares of x·Aᵀ; validated above
    if (one) {
      loraq_ops::finish_without_inputs(*y, bias);
    } else if (parts.has_value()) {
      parts->zero_();
    }
    return;
  }
  if (N == 0) return;
  // the gather: rows of x in fp32; the tensor-core kernel: 8 or 16 rows in 16 bits, padded
  const int64_t tile_rows = M <= loraq_sparse_mma::kTileRows ? 8 : 16;
  const size_t smem = mma ? (size_t)tile_rows * (a.slice_tiles * 4 * 2 + loraq_sparse_mma::kRowPadUnits * 8)
                          : (size_t)a.slice_tiles * 4 * rows * sizeof(float);
  const c10::cuda::CUDAGuard guard(x.device());
  int max_smem = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.device().index()));
  TORCH_CHECK(smem <= (size_t)max_smem, "sparse4x4_gemv: x's slice needs ", smem, " bytes of shared memory (",
              max_smem, " available): split K more");
  // 16-byte loads where every task lies inside its row and rows start 16-byte aligned
  const bool aligned = reinterpret_cast<uintptr_t>(a.values) % 16 == 0 && reinterpret_cast<uintptr_t>(a.positions) % 16 == 0;
  const bool vec = aligned && (mma ? TK % loraq_sparse_mma::kTaskTiles == 0
                                   : TK % loraq_sparse::kChunkTiles == 0 && a.PW % 16 == 0);
  TORCH_CHECK(slices <= 65535, "sparse4x4_gemv: ", slices, " K slices exceed the grid's 65535: split K less");
  const dim3 grid((unsigned)blocks, (unsigned)slices, (unsigned)(mma ? 1 : (M + rows - 1) / rows));
  const int threads = (int)warps * 32;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (x.scalar_type() == at::kHalf) {
    if (vec) launch_rows<__half, true>(rows, M, a, grid, threads, smem, max_smem, stream);
    else launch_rows<__half, false>(rows, M, a, grid, threads, smem, max_smem, stream);
  } else {
    if (vec) launch_rows<__nv_bfloat16, true>(rows, M, a, grid, threads, smem, max_smem, stream);
    else launch_rows<__nv_bfloat16, false>(rows, M, a, grid, threads, smem, max_smem, stream);
  }
}

// For torch.compile's tracing (FakeTensor/Meta): the op only writes its outputs in place.
void sparse4x4_gemv_meta(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                         const c10::optional<torch::Tensor>&, torch::Tensor, const c10::optional<torch::Tensor>&,
                         int64_t, int64_t, int64_t, int64_t, int64_t, const c10::optional<torch::Tensor>&,
                         const c10::optional<torch::Tensor>&, const c10::optional<torch::Tensor>&,
                         const c10::optional<torch::Tensor>&, double, int64_t) {}

}  // namespace loraq_sparse_op

TORCH_LIBRARY_FRAGMENT(loraq, m) {
  m.def(
      "sparse4x4_gemv(Tensor x, Tensor values, Tensor positions, Tensor? lora_A, Tensor(a!) ws, Tensor(b!)? parts, "
      "int N, int rows, int blocks, int warps, int k_split, Tensor(c!)? y=None, Tensor(d!)? counters=None, "
      "Tensor? lora_B=None, Tensor? bias=None, float scaling=1.0, int slots=0) -> ()");
}

TORCH_LIBRARY_IMPL(loraq, CUDA, m) { m.impl("sparse4x4_gemv", &loraq_sparse_op::sparse4x4_gemv); }

TORCH_LIBRARY_IMPL(loraq, Meta, m) { m.impl("sparse4x4_gemv", &loraq_sparse_op::sparse4x4_gemv_meta); }
