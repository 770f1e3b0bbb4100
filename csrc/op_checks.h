// Argument checks shared by the ops' launchers (host code): each error names the op and the tensor.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <torch/extension.h>

namespace loraq_ops {

// t must be a contiguous `dim`-D CUDA tensor of `dtype`.
inline void check_cuda_tensor(const char* op, const torch::Tensor& t, const char* name, at::ScalarType dtype,
                              int64_t dim) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim && t.is_contiguous(), op, ": ", name, " must be a contiguous ", dim, "-D tensor, got shape ",
              t.sizes());
}

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

}  // namespace loraq_ops
