// The one-launch finish's host side (gemv_finish.cuh), shared by the GEMV ops that have it
// (int1_gemv_mma_op.h, sparse4x4_gemv_op.h): its argument checks and Args::fin.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <torch/extension.h>

#include "gemv_finish.cuh"
#include "op_checks.h"

namespace loraq_ops {

// The one-launch finish's arguments (gemv_finish.cuh): y [M, N] in x's dtype, the int32 counters
// (at least `needed`), lora_B [N, R] with LoRA (and only then), bias [N] or none; all on x's device.
inline void check_finish_args(const char* op, const torch::Tensor& x, const torch::Tensor& y,
                              const c10::optional<torch::Tensor>& counters, bool has_lora,
                              const c10::optional<torch::Tensor>& lora_B, const c10::optional<torch::Tensor>& bias,
                              int64_t N, int64_t R, int64_t needed) {
  check_cuda_tensor(op, y, "y", x.scalar_type(), 2);
  TORCH_CHECK(y.size(0) == x.size(0) && y.size(1) == N, op, ": y must be [M, N] = [", x.size(0), ", ", N, "], got ",
              y.sizes());
  TORCH_CHECK(counters.has_value(), op, ": y needs counters");
  check_cuda_tensor(op, *counters, "counters", at::kInt, 1);
  TORCH_CHECK(counters->numel() >= needed, op, ": counters must have at least ", needed, " elements, got ",
              counters->numel());
  TORCH_CHECK(lora_B.has_value() == has_lora, op, ": lora_B comes with lora_A");
  if (has_lora) {
    check_cuda_tensor(op, *lora_B, "lora_B", x.scalar_type(), 2);
    TORCH_CHECK(lora_B->size(0) == N && lora_B->size(1) == R, op, ": lora_B must be [N, R] = [", N, ", ", R, "], got ",
                lora_B->sizes());
  }
  if (bias.has_value()) {
    check_cuda_tensor(op, *bias, "bias", x.scalar_type(), 1);
    TORCH_CHECK(bias->size(0) == N, op, ": bias must be [N] = [", N, "], got ", bias->sizes());
  }
  for (const auto* t : {&y, &*counters})
    TORCH_CHECK(t->device() == x.device(), op, ": tensors on one device");
  TORCH_CHECK((!has_lora || lora_B->device() == x.device()) && (!bias.has_value() || bias->device() == x.device()),
              op, ": tensors on one device");
}

// Check the finish's arguments and fill a.fin (a.M, a.R, a.slots and a.parts already set): y,
// counters, lora_B and bias as check_finish_args; `launch_warps` the warps of the launch, `rows`
// the weight rows a unit, `unit_tasks` the tasks a unit receives over every K slice. Changes
// nothing but `a` when it refuses.
template <typename A>
void set_finish(const char* op, A& a, const torch::Tensor& x, const torch::Tensor& ws,
                const c10::optional<torch::Tensor>& parts, const torch::Tensor& y,
                const c10::optional<torch::Tensor>& counters, const c10::optional<torch::Tensor>& lora_A,
                const c10::optional<torch::Tensor>& lora_B, const c10::optional<torch::Tensor>& bias, double scaling,
                int64_t launch_warps, int rows, int64_t unit_tasks) {
  const int64_t N = ws.size(1);
  // the kernels count warps, items and batches in 32 bits (and add them: below 2^30)
  TORCH_CHECK(launch_warps < (int64_t(1) << 30) &&
                  int64_t(a.M) * a.slots * ((a.R + loraq_gemv::kXaRanks - 1) / loraq_gemv::kXaRanks) < (int64_t(1) << 30),
              op, ": too many warps or items of x·Aᵀ for the one-launch finish");
  const int64_t units = (N + rows - 1) / rows;
  check_finish_args(op, x, y, counters, lora_A.has_value(), lora_B, bias, N, lora_A.has_value() ? lora_A->size(0) : 0,
                    loraq_gemv::finish_counters(units, loraq_gemv::xa_items(a), (int)launch_warps));
  // y, the counters and the sums are written by the kernel: none may overlap another, nor x·Aᵀ,
  // and y none of the inputs (blocks that start late read them after others wrote y)
  at::assert_no_overlap(y, x);
  if (lora_A.has_value()) at::assert_no_overlap(y, *lora_A);
  if (lora_B.has_value()) at::assert_no_overlap(y, *lora_B);
  if (bias.has_value()) at::assert_no_overlap(y, *bias);
  at::assert_no_overlap(y, ws);
  at::assert_no_overlap(y, *counters);
  at::assert_no_overlap(*counters, ws);
  if (parts.has_value()) {
    at::assert_no_overlap(*parts, ws);
    at::assert_no_overlap(*parts, y);
    at::assert_no_overlap(*parts, *counters);
  }
  a.fin.y = y.data_ptr();
  a.fin.lora_B = lora_B.has_value() ? lora_B->data_ptr() : nullptr;
  a.fin.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  a.fin.scaling = (float)scaling;
  a.fin.counters = counters->data_ptr<int32_t>();
  a.fin.units = (int)units;
  a.fin.unit_tasks = (int)unit_tasks;
}

// y where K = 0 (no kernel runs): the bias, or zeros; x·Aᵀ is 0 too.
inline void finish_without_inputs(torch::Tensor y, const c10::optional<torch::Tensor>& bias) {
  if (bias.has_value()) y.copy_(bias->unsqueeze(0).expand({y.size(0), y.size(1)}));
  else y.zero_();
}

}  // namespace loraq_ops
