// Argument checks shared by the ops' launchers (host code): each error names the op and the tensor.
#pragma once

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

}  // namespace loraq_ops
