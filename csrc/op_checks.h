// Argument checks shared by the ops' launchers (host code): each error names the op and the tensor;
// and their kernel launch.
#pragma once

#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>

namespace loraq_ops {

// t must be a contiguous `dim`-D CUDA tensor of `dtype`.
inline void check_cuda_tensor(const char* op, const torch::Tensor& t, const char* name, at::ScalarType dtype,
                              int64_t dim) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim && t.is_contiguous(), op, ": ", name, " must be a contiguous ", dim, "-D tensor, got shape ",
              t.sizes());
}

// A kernel's launch. Its dynamic shared memory may go up to the device's opt-in limit `max_smem`:
// always that value, not this call's need, since two threads setting different limits could fail
// each other's launch.
template <typename Kernel, typename A>
void launch_kernel(Kernel kernel, const A& a, dim3 grid, int threads, size_t smem, int max_smem,
                   cudaStream_t stream) {
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem));
  kernel<<<grid, threads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace loraq_ops
