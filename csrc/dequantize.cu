// loraq._C: dequantize kernels for the packed formats (CPU and CUDA), registered as
// torch.ops.loraq.int1_dequantize and torch.ops.loraq.sparse4x4_dequantize.
// The layouts are those of loraq/formats/int1.py and loraq/formats/sparse4x4.py; these ops
// must return exactly what Int1Weight.dequantize / Sparse4x4Weight.dequantize return
// (mean_abs scales; onebit is handled in Python).
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace {

template <typename scalar_t>
__host__ __device__ inline scalar_t int1_value(const int32_t* packed, const scalar_t* scale, int64_t n, int64_t k,
                                               int64_t words, int64_t groups, int64_t group_size) {
  const uint32_t word = static_cast<uint32_t>(packed[n * words + (k >> 5)]);
  const scalar_t a = scale[n * groups + k / group_size];
  return ((word >> (k & 31)) & 1u) ? a : static_cast<scalar_t>(-a);
}

template <typename scalar_t>
__host__ __device__ inline scalar_t sparse_value(const scalar_t* values, const uint8_t* positions, int64_t n,
                                                 int64_t k, int64_t TK, int64_t pos_cols) {
  const int64_t tn = n >> 2, tk = k >> 2;
  const uint8_t byte = positions[tn * pos_cols + (tk >> 1)];
  const int p = (tk & 1) ? (byte >> 4) : (byte & 15);
  const int here = static_cast<int>(((n & 3) << 2) | (k & 3));
  return p == here ? values[tn * TK + tk] : static_cast<scalar_t>(0);
}

template <typename scalar_t>
__global__ void int1_dequantize_kernel(const int32_t* packed, const scalar_t* scale, scalar_t* out, int64_t N,
                                       int64_t K, int64_t words, int64_t groups, int64_t group_size) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < N * K) out[i] = int1_value(packed, scale, i / K, i % K, words, groups, group_size);
}

template <typename scalar_t>
__global__ void sparse_dequantize_kernel(const scalar_t* values, const uint8_t* positions, scalar_t* out,
                                         int64_t N, int64_t K, int64_t TK, int64_t pos_cols) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < N * K) out[i] = sparse_value(values, positions, i / K, i % K, TK, pos_cols);
}

void check(const torch::Tensor& t, at::ScalarType dtype, int64_t dim, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

torch::Tensor int1_dequantize(const torch::Tensor& packed, const torch::Tensor& scale, int64_t K, int64_t group_size) {
  check(packed, at::kInt, 2, "packed");
  TORCH_CHECK(scale.dim() == 2 && scale.is_contiguous(), "scale must be a contiguous 2-D tensor");
  const int64_t N = packed.size(0), words = packed.size(1), groups = scale.size(1);
  TORCH_CHECK(words == (K + 31) / 32, "packed has ", words, " words per row, expected ", (K + 31) / 32);
  TORCH_CHECK(scale.size(0) == N, "scale has ", scale.size(0), " rows, packed ", N);
  TORCH_CHECK(group_size >= 1 && groups == (K + group_size - 1) / group_size, "scale has ", groups,
              " groups per row, expected ceil(K / group_size) = ", (K + group_size - 1) / group_size);
  TORCH_CHECK(packed.device() == scale.device(), "packed and scale must be on the same device");
  auto out = torch::empty({N, K}, scale.options());
  if (N * K == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scale.scalar_type(), "int1_dequantize", [&] {
    const int32_t* p = packed.data_ptr<int32_t>();
    const scalar_t* s = scale.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    if (packed.is_cuda()) {
      const c10::cuda::CUDAGuard guard(packed.device());
      const int threads = 256;
      const int64_t blocks = (N * K + threads - 1) / threads;
      int1_dequantize_kernel<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          p, s, o, N, K, words, groups, group_size);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n)
          for (int64_t k = 0; k < K; ++k) o[n * K + k] = int1_value(p, s, n, k, words, groups, group_size);
      });
    }
  });
  return out;
}

torch::Tensor sparse4x4_dequantize(const torch::Tensor& values, const torch::Tensor& positions, int64_t N, int64_t K) {
  check(positions, at::kByte, 2, "positions");
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous(), "values must be a contiguous 2-D tensor");
  const int64_t TN = values.size(0), TK = values.size(1), pos_cols = positions.size(1);
  TORCH_CHECK(TN == (N + 3) / 4 && TK == (K + 3) / 4, "values must be [ceil(N/4), ceil(K/4)] = [", (N + 3) / 4,
              ", ", (K + 3) / 4, "], got [", TN, ", ", TK, "]");
  TORCH_CHECK(positions.size(0) == TN && pos_cols == (TK + 1) / 2, "positions must be [", TN, ", ", (TK + 1) / 2, "]");
  TORCH_CHECK(values.device() == positions.device(), "values and positions must be on the same device");
  auto out = torch::empty({N, K}, values.options());
  if (N * K == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "sparse4x4_dequantize", [&] {
    const scalar_t* v = values.data_ptr<scalar_t>();
    const uint8_t* pos = positions.data_ptr<uint8_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    if (values.is_cuda()) {
      const c10::cuda::CUDAGuard guard(values.device());
      const int threads = 256;
      const int64_t blocks = (N * K + threads - 1) / threads;
      sparse_dequantize_kernel<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          v, pos, o, N, K, TK, pos_cols);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n)
          for (int64_t k = 0; k < K; ++k) o[n * K + k] = sparse_value(v, pos, n, k, TK, pos_cols);
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(loraq, m) {
  m.def("int1_dequantize(Tensor packed, Tensor scale, int K, int group_size) -> Tensor");
  m.def("sparse4x4_dequantize(Tensor values, Tensor positions, int N, int K) -> Tensor");
}

TORCH_LIBRARY_IMPL(loraq, CPU, m) {
  m.impl("int1_dequantize", &int1_dequantize);
  m.impl("sparse4x4_dequantize", &sparse4x4_dequantize);
}

TORCH_LIBRARY_IMPL(loraq, CUDA, m) {
  m.impl("int1_dequantize", &int1_dequantize);
  m.impl("sparse4x4_dequantize", &sparse4x4_dequantize);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "loraq compiled ops (torch.ops.loraq.*)"; }
