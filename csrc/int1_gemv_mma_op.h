// torch.ops.loraq.int1_gemv_mma: the launcher of int1_gemv_mma.cuh's kernel (CUDA only).
//
// It adds x·Ŵᵀ (fp32, rows of x ≤ 16) into a zeroed workspace and, with LoRA, stores each slot's
// share of x·Aᵀ; kernels/int1_gemv_mma.py calls it inside splitk_finish.run_split, whose finish
// adds the LoRA path and the bias, casts, and zeroes the workspace again. Given y, it finishes in
// the same launch instead (gemv_finish.cuh; LORAQ_ONE_LAUNCH=1).
// Included once, by gemv_ops.cu (one translation unit for the GEMV ops: each costs minutes to compile).
#pragma once

#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "finish_op.h"
#include "op_checks.h"
#include "int1_gemv_lut.cuh"
#include "int1_gemv_lut8.cuh"
#include "int1_gemv_mma.cuh"

namespace loraq_mma_op {

using loraq_mma::Args;

// Where and how a call launches (the dynamic shared memory limit: the device's opt-in maximum,
// loraq_ops::launch_kernel).
struct Launch {
  dim3 grid;
  int threads;
  size_t smem;
  int max_smem;
  cudaStream_t stream;
};

template <typename T, bool VEC, int NT, bool ONE, int RG>
void launch_mode(int64_t mode, const Args& a, const Launch& l) {
  using namespace loraq_mma;
  auto go = [&](auto kernel) { loraq_ops::launch_kernel(kernel, a, l.grid, l.threads, l.smem, l.max_smem, l.stream); };
  if (mode == kScaleRow) go(int1_gemv_mma_kernel<T, kScaleRow, VEC, NT, ONE, RG>);
  else if (mode == kScaleGroup) go(int1_gemv_mma_kernel<T, kScaleGroup, VEC, NT, ONE, RG>);
  else if (mode == kScaleOnebit) go(int1_gemv_mma_kernel<T, kScaleOnebit, VEC, NT, ONE, RG>);
  else if (mode == kScaleRowOffset) go(int1_gemv_mma_kernel<T, kScaleRowOffset, VEC, NT, ONE, RG>);
  else go(int1_gemv_mma_kernel<T, kScaleOnebitOffset, VEC, NT, ONE, RG>);
}

// One or two tiles of x; the one-launch finish (a.fin.y set, one row group a task), or two launches
// with tasks of one or two row groups.
template <typename T, bool VEC, int NT>
void launch_task_shape(int64_t mode, int64_t row_groups, const Args& a, const Launch& l) {
  if (a.fin.y != nullptr) launch_mode<T, VEC, NT, true, 1>(mode, a, l);
  else if (row_groups == 2) launch_mode<T, VEC, NT, false, 2>(mode, a, l);
  else launch_mode<T, VEC, NT, false, 1>(mode, a, l);
}

template <typename T, bool VEC>
void launch_tiles(int64_t mode, int64_t row_groups, const Args& a, const Launch& l) {
  if (a.M <= loraq_mma::kTileRows) launch_task_shape<T, VEC, 1>(mode, row_groups, a, l);
  else launch_task_shape<T, VEC, 2>(mode, row_groups, a, l);
}

// The lookup GEMV (one row of x; modes 0 to 2), two launches or one.
template <typename T, bool VEC, bool ONE>
void launch_lut_mode(int64_t mode, const Args& a, const Launch& l) {
  using namespace loraq_mma;
  auto go = [&](auto kernel) { loraq_ops::launch_kernel(kernel, a, l.grid, l.threads, l.smem, l.max_smem, l.stream); };
  if (mode == kScaleRow) go(loraq_lut::int1_gemv_lut_kernel<T, kScaleRow, VEC, ONE>);
  else if (mode == kScaleGroup) go(loraq_lut::int1_gemv_lut_kernel<T, kScaleGroup, VEC, ONE>);
  else go(loraq_lut::int1_gemv_lut_kernel<T, kScaleOnebit, VEC, ONE>);
}

// The byte-lookup GEMV (one row of x; modes 0 to 2; 32-bit loads: no VEC), two launches or one.
template <typename T, bool ONE>
void launch_lut8_mode(int64_t mode, const Args& a, const Launch& l) {
  using namespace loraq_mma;
  auto go = [&](auto kernel) { loraq_ops::launch_kernel(kernel, a, l.grid, l.threads, l.smem, l.max_smem, l.stream); };
  if (mode == kScaleRow) go(loraq_lut8::int1_gemv_lut8_kernel<T, kScaleRow, ONE>);
  else if (mode == kScaleGroup) go(loraq_lut8::int1_gemv_lut8_kernel<T, kScaleGroup, ONE>);
  else go(loraq_lut8::int1_gemv_lut8_kernel<T, kScaleOnebit, ONE>);
}

template <typename T, bool VEC>
void launch_kernels(int64_t lut, int64_t mode, int64_t row_groups, const Args& a, const Launch& l) {
  if (lut == 0) launch_tiles<T, VEC>(mode, row_groups, a, l);
  else if (lut == 2 && a.fin.y != nullptr) launch_lut8_mode<T, true>(mode, a, l);
  else if (lut == 2) launch_lut8_mode<T, false>(mode, a, l);
  else if (a.fin.y != nullptr) launch_lut_mode<T, VEC, true>(mode, a, l);
  else launch_lut_mode<T, VEC, false>(mode, a, l);
}

// Adds x·Ŵᵀ into ws [M, N] (fp32, zeroed) and, when lora_A is given, stores parts[s] = this
// slot's share of x·Aᵀ (parts [slots, M, block_r], fp32; r past R gets 0).
// mode: 0 per-row α, 1 per-group α (group_size a multiple of 32), 2 onebit (h in scale, g in col); 3 and 4:
// 0 and 2 with the offset decode (int1_gemv_mma.cuh).
// blocks: blocks per K slice; warps: warps a block; k_split: K slices (blockIdx.y).
// With y, the one-launch finish (gemv_finish.cuh): the kernel also writes y = ws + s·(x·Aᵀ)·Bᵀ + b
// and leaves ws zero; parts is then xa [1, M, block_r] (zero), `slots` the slots x·Aᵀ is cut into,
// and counters the zeroed int32 counters (loraq_gemv::finish_counters of them), left zero.
// lut = 1: the lookup GEMV (int1_gemv_lut.cuh) instead, for one row of x and modes 0 to 2; its
// K slices are whole tasks of 512 inputs and its shared memory the slice's table.
// lut = 2: the byte-lookup GEMV (int1_gemv_lut8.cuh) instead, for one row of x and modes 0 to 2;
// its K slices are 1024 inputs (k_split at least ceil(K / 1024)), its shared memory a 128 KiB
// table, and with y its units' arrivals are counted by rows (16 a unit a K slice).
// row_groups = 2: the mma GEMV's tasks of 32 weight rows x 256 inputs (two launches only; its K
// slices are whole tasks of 256 inputs); 1: 16 x 512.
void int1_gemv_mma(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale,
                   const torch::Tensor& col, const c10::optional<torch::Tensor>& lora_A, torch::Tensor ws,
                   const c10::optional<torch::Tensor>& parts, int64_t mode, int64_t group_size, int64_t blocks,
                   int64_t warps, int64_t k_split, const c10::optional<torch::Tensor>& y,
                   const c10::optional<torch::Tensor>& counters, const c10::optional<torch::Tensor>& lora_B,
                   const c10::optional<torch::Tensor>& bias, double scaling, int64_t slots, int64_t lut,
                   int64_t row_groups) {
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "int1_gemv_mma: x must be float16 or bfloat16, got ", x.scalar_type());
  loraq_ops::check_cuda_tensor("int1_gemv_mma", x, "x", x.scalar_type(), 2);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M >= 1 && M <= loraq_mma::kMaxRows, "int1_gemv_mma: x must have 1 to ", loraq_mma::kMaxRows,
              " rows, got ", M);
  loraq_ops::check_cuda_tensor("int1_gemv_mma", packed, "packed", at::kInt, 2);
  const int64_t N = packed.size(0), KW = packed.size(1);
  TORCH_CHECK(KW == (K + 31) / 32, "int1_gemv_mma: packed must be [N, ceil(K/32)] = [N, ", (K + 31) / 32, "], got ",
              packed.sizes());
  loraq_ops::check_cuda_tensor("int1_gemv_mma", scale, "scale", x.scalar_type(), 2);
  TORCH_CHECK(scale.size(0) == N, "int1_gemv_mma: scale must have N = ", N, " rows, got ", scale.sizes());
  TORCH_CHECK(mode >= 0 && mode <= 4,
              "int1_gemv_mma: mode must be 0 (row), 1 (group), 2 (onebit), 3 (row) or 4 (onebit) with the offset "
              "decode, got ", mode);
  TORCH_CHECK(lut >= 0 && lut <= 2,
              "int1_gemv_mma: lut must be 0 (the mma GEMV), 1 (the lookup GEMV) or 2 (the byte-lookup GEMV), got ", lut);
  TORCH_CHECK(lut == 0 || (M == 1 && mode <= 2), "int1_gemv_mma: the lookup GEMV (lut = ", lut,
              ") takes one row of x and modes 0 to 2, got ", M, " rows and mode ", mode);
  TORCH_CHECK(lut != 2 || k_split >= (K + loraq_lut8::kSliceInputs - 1) / loraq_lut8::kSliceInputs,
              "int1_gemv_mma: the byte-lookup GEMV's K slices are ", loraq_lut8::kSliceInputs,
              " inputs: k_split must be at least ceil(K / ", loraq_lut8::kSliceInputs, ") = ",
              (K + loraq_lut8::kSliceInputs - 1) / loraq_lut8::kSliceInputs, ", got ", k_split);
  TORCH_CHECK(row_groups == 1 || (row_groups == 2 && lut == 0 && !y.has_value()),
              "int1_gemv_mma: row_groups must be 1, or 2 for the mma GEMV in two launches (no y), got ", row_groups,
              lut ? " with a lookup GEMV (lut = 1 or 2)" : (y.has_value() ? " with y" : ""));
  TORCH_CHECK(row_groups == 1 || warps <= 24,
              "int1_gemv_mma: row_groups = 2 takes 1 to 24 warps a block (its launch bound: 768 threads), got ", warps);
  const int64_t task_inputs = lut == 2 ? loraq_lut8::kSliceInputs
                              : lut ? loraq_lut::kTaskInputs : loraq_mma::kTaskInputs / row_groups;
  const bool onebit = mode == 2 || mode == 4;
  TORCH_CHECK(mode != 1 || (group_size > 0 && group_size % 32 == 0 && scale.size(1) == (K + group_size - 1) / group_size),
              "int1_gemv_mma: per-group scales need a group size that is a multiple of 32 and scale [N, ceil(K/group)]");
  TORCH_CHECK(mode == 1 || scale.size(1) >= 1, "int1_gemv_mma: scale must have a column");
  if (onebit) {
    loraq_ops::check_cuda_tensor("int1_gemv_mma", col, "col", x.scalar_type(), 1);
    TORCH_CHECK(col.size(0) == K, "int1_gemv_mma: col must be [K] = [", K, "], got ", col.sizes());
  }
  loraq_ops::check_cuda_tensor("int1_gemv_mma", ws, "ws", at::kFloat, 2);
  TORCH_CHECK(ws.size(0) == M && ws.size(1) == N, "int1_gemv_mma: ws must be [M, N] = [", M, ", ", N, "], got ",
              ws.sizes());
  TORCH_CHECK(blocks >= 1 && blocks < (int64_t(1) << 30) && k_split >= 1 && warps >= 1 && warps <= 32,
              "int1_gemv_mma: blocks must be 1 to 2^30 - 1, k_split ≥ 1 and warps 1 to 32");
  TORCH_CHECK(lora_A.has_value() == parts.has_value(), "int1_gemv_mma: lora_A and parts come together");
  TORCH_CHECK(x.device() == packed.device() && x.device() == ws.device() && x.device() == scale.device() &&
                  (!onebit || x.device() == col.device()),
              "int1_gemv_mma: tensors on one device");

  Args a{};
  a.x = x.data_ptr();
  a.packed = packed.data_ptr<int32_t>();
  a.scale = scale.data_ptr();
  a.col = onebit ? col.data_ptr() : nullptr;
  a.ws = ws.data_ptr<float>();
  a.M = (int)M;
  a.N = (int)N;
  a.K = (int)K;
  a.KW = (int)KW;
  a.G = (int)scale.size(1);
  a.group_size = (int)(mode == 1 ? group_size : K);
  a.inv_group_words = mode == 1 ? 32.f / (float)group_size : 0.f;
  TORCH_CHECK(K < (int64_t(1) << 27), "int1_gemv_mma: K must be below 2^27 (its group index is computed in fp32)");
  TORCH_CHECK(N < (int64_t(1) << 30), "int1_gemv_mma: N must be below 2^30");
  a.minus_ones = x.scalar_type() == at::kHalf ? loraq_mma::Half2Bits<__half>::kMinusOnes
                                               : loraq_mma::Half2Bits<__nv_bfloat16>::kMinusOnes;
  a.sixteens = x.scalar_type() == at::kHalf ? loraq_mma::OffsetDecode<__half>::kSixteens
                                             : loraq_mma::OffsetDecode<__nv_bfloat16>::kSixteens;
  // K slices of whole tasks (none when K = 0)
  int64_t slices = 0;
  if (K > 0) {
    a.slice_inputs = (int)loraq_mma::slice_inputs_for(K, k_split, task_inputs);
    slices = (K + a.slice_inputs - 1) / a.slice_inputs;
  }
  const bool one = y.has_value();
  TORCH_CHECK(one || (!counters.has_value() && !lora_B.has_value() && !bias.has_value()),
              "int1_gemv_mma: counters, lora_B and bias are the one-launch finish's: they come with y");
  if (lora_A.has_value()) {
    const torch::Tensor& A = *lora_A;
    loraq_ops::check_cuda_tensor("int1_gemv_mma", A, "lora_A", x.scalar_type(), 2);
    TORCH_CHECK(A.size(1) == K, "int1_gemv_mma: lora_A must be [R, K]");
    loraq_ops::check_cuda_tensor("int1_gemv_mma", *parts, "parts", at::kFloat, 3);
    TORCH_CHECK(A.device() == x.device() && parts->device() == x.device(), "int1_gemv_mma: tensors on one device");
    TORCH_CHECK(parts->size(1) == M && parts->size(2) >= A.size(0) && parts->size(2) % 4 == 0 && parts->size(0) >= 1 &&
                    (K == 0 || parts->size(0) <= blocks * slices),
                "int1_gemv_mma: parts must be [slots ≤ blocks·slices, M, ≥ R and a multiple of 4], got ", parts->sizes());
    a.lora_A = A.data_ptr();
    a.parts = parts->data_ptr<float>();
    a.R = (int)A.size(0);
    a.block_r = (int)parts->size(2);
    a.slots = (int)parts->size(0);
    if (one) {  // parts is xa [1, M, block_r]; the slots are the argument's
      TORCH_CHECK(parts->size(0) == 1 && slots >= 1 && (K == 0 || slots <= blocks * slices),
                  "int1_gemv_mma: with y, parts must be xa [1, M, block_r] and 1 ≤ slots ≤ blocks·slices, got ",
                  parts->sizes(), " and ", slots, " slots");
      a.slots = (int)slots;
    }
  }
  // every kernel's units: 16 rows; a unit receives a task a K chunk, or (lut = 2) a row a K slice
  static_assert(loraq_lut8::kUnitRows == loraq_mma::kTaskRows, "the byte-lookup GEMV's units are the op's");
  if (one)
    loraq_ops::set_finish("int1_gemv_mma", a, x, ws, parts, *y, counters, lora_A, lora_B, bias, scaling,
                          blocks * std::max<int64_t>(slices, 1) * warps, loraq_mma::kTaskRows,
                          lut == 2 ? loraq_mma::kTaskRows * slices : (K + task_inputs - 1) / task_inputs);
  if (K == 0) {  // x·Ŵᵀ = 0 (the workspace stays zero) and so are the shares of x·Aᵀ; validated above
    if (one) {
      loraq_ops::finish_without_inputs(*y, bias);
    } else if (parts.has_value()) {
      parts->zero_();
    }
    return;
  }
  if (N == 0) return;
  const int64_t chunks = a.slice_inputs / task_inputs;
  // x's rows (8 bytes a unit of 4 inputs), then with the offset decode its table of C (M·chunks
  // floats); the lookup GEMV: its table of sums. kernels/int1_gemv_mma.py's k_slices plans with the
  // same sizes
  const size_t smem = lut == 2 ? (size_t)loraq_lut8::kTableBytes
                     : lut ? (size_t)loraq_lut::table_bytes((int)chunks)
                          : (size_t)M * (a.slice_inputs / 4 + loraq_mma::kRowPadUnits) * 8 +
                                (mode >= 3 ? (size_t)M * chunks * 4 : 0);
  const c10::cuda::CUDAGuard guard(x.device());
  int max_smem = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.device().index()));
  TORCH_CHECK(smem <= (size_t)max_smem, "int1_gemv_mma: ", lut ? "the slice's table" : "x's slice", " needs ", smem,
              " bytes of shared memory (", max_smem, " available)",
              lut == 2 ? ": the byte-lookup GEMV does not run on this GPU" : ": split K more");
  const bool vec = KW % 4 == 0 && reinterpret_cast<uintptr_t>(a.packed) % 16 == 0;
  TORCH_CHECK(slices <= 65535, "int1_gemv_mma: ", slices, " K slices exceed the grid's 65535",
              lut == 2 ? ": K is too long for the byte-lookup GEMV (slices of 1024 inputs)" : ": split K less");
  const Launch l{dim3((unsigned)blocks, (unsigned)slices), (int)warps * 32, smem, max_smem,
                 c10::cuda::getCurrentCUDAStream()};
  if (x.scalar_type() == at::kHalf) {
    if (vec) launch_kernels<__half, true>(lut, mode, row_groups, a, l);
    else launch_kernels<__half, false>(lut, mode, row_groups, a, l);
  } else {
    if (vec) launch_kernels<__nv_bfloat16, true>(lut, mode, row_groups, a, l);
    else launch_kernels<__nv_bfloat16, false>(lut, mode, row_groups, a, l);
  }
}

// For torch.compile's tracing (FakeTensor/Meta): the op only writes its outputs in place.
void int1_gemv_mma_meta(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                        const c10::optional<torch::Tensor>&, torch::Tensor, const c10::optional<torch::Tensor>&,
                        int64_t, int64_t, int64_t, int64_t, int64_t, const c10::optional<torch::Tensor>&,
                        const c10::optional<torch::Tensor>&, const c10::optional<torch::Tensor>&,
                        const c10::optional<torch::Tensor>&, double, int64_t, int64_t, int64_t) {}

}  // namespace loraq_mma_op

TORCH_LIBRARY_FRAGMENT(loraq, m) {
  m.def(
      "int1_gemv_mma(Tensor x, Tensor packed, Tensor scale, Tensor col, Tensor? lora_A, Tensor(a!) ws, "
      "Tensor(b!)? parts, int mode, int group_size, int blocks, int warps, int k_split, Tensor(c!)? y=None, "
      "Tensor(d!)? counters=None, Tensor? lora_B=None, Tensor? bias=None, float scaling=1.0, int slots=0, "
      "int lut=0, int row_groups=1) -> ()");
}

TORCH_LIBRARY_IMPL(loraq, CUDA, m) { m.impl("int1_gemv_mma", &loraq_mma_op::int1_gemv_mma); }

TORCH_LIBRARY_IMPL(loraq, Meta, m) { m.impl("int1_gemv_mma", &loraq_mma_op::int1_gemv_mma_meta); }
