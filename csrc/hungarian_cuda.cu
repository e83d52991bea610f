// CUDA batched exact assignment. Each thread solves one problem with the solver
// of hungarian.h (the one the CPU tests check), its scratch in global memory.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "hungarian.h"
#include "ops.h"

namespace stellar {

namespace {

template <typename scalar_t, typename acc_t>
__global__ void hungarian_thread_kernel(const scalar_t* __restrict__ cost, int64_t batch, int64_t sb,
                                        int64_t sq, int64_t st, int32_t nr, int32_t nc,
                                        bool maximize, acc_t* real_ws, int32_t* int_ws,
                                        uint8_t* seen_ws, int64_t* index, int32_t* status) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b >= batch) return;
  const auto w = assign_workspace<acc_t>(real_ws + b * assign_real_scratch(nr, nc),
                                         int_ws + b * assign_int_scratch(nr, nc),
                                         seen_ws + b * assign_byte_scratch(nr, nc), nr, nc);
  status[b] = load_and_solve<scalar_t, acc_t, int64_t>(cost + b * sb, sq, st, nr, nc, maximize, w,
                                                        index + b * nr, 1);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> hungarian_cuda(const at::Tensor& cost, bool maximize) {
  TORCH_CHECK(cost.is_cuda(), "hungarian_cuda: cost must be a CUDA tensor");
  TORCH_CHECK(cost.dim() == 3, "hungarian: cost must be (B, Q, T), got ", cost.sizes());
  TORCH_CHECK(cost.size(1) <= cost.size(2), "hungarian: need Q <= T, got ", cost.sizes());
  const c10::cuda::CUDAGuard guard(cost.device());
  const int64_t batch = cost.size(0);
  const int32_t nr = static_cast<int32_t>(cost.size(1));
  const int32_t nc = static_cast<int32_t>(cost.size(2));
  auto index = at::full({batch, nr}, -1, cost.options().dtype(at::kLong));
  auto status = at::zeros({batch}, cost.options().dtype(at::kInt));
  if (cost.numel() == 0) return {index, status};
  auto opts = cost.options();
  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "hungarian_cuda", [&] {
    using acc_t = double;
    auto real_ws = at::empty({batch * assign_real_scratch(nr, nc)}, opts.dtype(at::kDouble));
    auto int_ws = at::empty({batch * assign_int_scratch(nr, nc)}, opts.dtype(at::kInt));
    auto seen_ws = at::empty({batch * assign_byte_scratch(nr, nc)}, opts.dtype(at::kByte));
    const int threads = 64;
    const int64_t blocks = (batch + threads - 1) / threads;
    hungarian_thread_kernel<scalar_t, acc_t>
        <<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            cost.const_data_ptr<scalar_t>(), batch, cost.stride(0), cost.stride(1),
            cost.stride(2), nr, nc, maximize, real_ws.data_ptr<acc_t>(),
            int_ws.data_ptr<int32_t>(), seen_ws.data_ptr<uint8_t>(), index.data_ptr<int64_t>(),
            status.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {index, status};
}

TORCH_LIBRARY_IMPL(stellar_ext, CUDA, m) { m.impl("hungarian", &hungarian_cuda); }

}  // namespace stellar
