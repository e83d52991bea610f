// Operators of the stellar_kernels._C extension, registered under torch.ops.stellar_ext.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace stellar {

// cost (B, Q, T), Q <= T, float32/float64, any strides.
// Returns index (B, Q) int64 and status (B,) int32 (see hungarian.h).
std::tuple<at::Tensor, at::Tensor> hungarian_cpu(const at::Tensor& cost, bool maximize);
// The same on the CPU through the CUDA kernel's 32-lane decomposition (tests only).
std::tuple<at::Tensor, at::Tensor> hungarian_emulated_warp(const at::Tensor& cost, bool maximize);
#ifdef STELLAR_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> hungarian_cuda(const at::Tensor& cost, bool maximize);
// scratch: 0 picks; 1 problem in shared memory; 2 vectors in shared memory, cost
// read from global memory; 3 everything in global memory (tests force each).
std::tuple<at::Tensor, at::Tensor> hungarian_cuda_scratch(const at::Tensor& cost, bool maximize,
                                                          int64_t scratch);
#endif

}  // namespace stellar
