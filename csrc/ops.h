// Operators of the stellar_kernels._C extension, registered under torch.ops.stellar_ext.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace stellar {

// cost (B, Q, T), Q <= T, float32/float64, any strides.
// Returns index (B, Q) int64 and status (B,) int32 (see hungarian.h).
std::tuple<at::Tensor, at::Tensor> hungarian_cpu(const at::Tensor& cost, bool maximize);
#ifdef STELLAR_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> hungarian_cuda(const at::Tensor& cost, bool maximize);
#endif

}  // namespace stellar
