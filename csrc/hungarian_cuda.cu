// CUDA batched exact assignment: one warp per problem, many problems per block.
//
// Each warp runs the solver of hungarian.h with WarpTeam: the lanes sweep the
// columns of every step (reduced-cost update, then a warp-shuffle argmin) and
// run the bookkeeping in between uniformly. A problem's scratch (potentials,
// path, matching and, when it fits, the cost itself) is in shared memory; past
// the shared-memory limit the cost is read from global memory, and past that
// the whole scratch lives in global memory.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>

#include "hungarian.h"
#include "ops.h"

namespace stellar {

namespace {

constexpr int kMaxWarpsPerBlock = 8;
constexpr int64_t kDefaultSharedBytes = 48 * 1024;

enum Scratch : int64_t {
  kScratchAuto = 0,
  kScratchShared = 1,      // cost and vectors in shared memory
  kScratchSharedVec = 2,   // vectors in shared memory, cost read from global memory
  kScratchGlobal = 3,      // everything in global memory
};

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxWarpsPerBlock * kWarpLanes)
    hungarian_warp_kernel(const scalar_t* __restrict__ cost, int64_t batch, int64_t sb, int64_t sq,
                          int64_t st, int32_t nr, int32_t nc, bool maximize, bool cost_in_scratch,
                          uint8_t* global_scratch, int64_t scratch_bytes, int64_t* index,
                          int32_t* status) {
  extern __shared__ __align__(16) uint8_t shared_scratch[];
  const int lane = threadIdx.x % kWarpLanes;
  const int warp = threadIdx.x / kWarpLanes;
  const int64_t b = int64_t(blockIdx.x) * (blockDim.x / kWarpLanes) + warp;
  if (b >= batch) return;  // the whole warp leaves together
  uint8_t* scratch = global_scratch != nullptr ? global_scratch + b * scratch_bytes
                                               : shared_scratch + warp * scratch_bytes;
  const WarpTeam team{lane};
  const int32_t code = load_and_solve<WarpTeam, scalar_t, double, scalar_t, int64_t>(
      team, cost + b * sb, sq, st, nr, nc, maximize, scratch, cost_in_scratch, index + b * nr);
  if (code != kAssignOk) team.for_each(nr, [&](int32_t r) { index[b * nr + r] = -1; });
  if (lane == 0) status[b] = code;
}

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// A card the library holds neither a kernel image nor PTX for fails every launch with an
// error that names no fix; say which build setting is the fix.
void check_kernel_image(const void* kernel, int device) {
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, kernel);
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
    (void)cudaGetLastError();  // not sticky: clear it so the next CUDA call does not see it
    const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, device);
    const int minor = device_attribute(cudaDevAttrComputeCapabilityMinor, device);
    TORCH_CHECK(false, "hungarian_cuda: the stellar_kernels extension holds no kernel image or ",
                "PTX for this GPU (compute capability ", major, ".", minor,
                "); rebuild it with TORCH_CUDA_ARCH_LIST naming ", major, ".", minor,
                " (e.g. TORCH_CUDA_ARCH_LIST=\"", major, ".", minor,
                "\" pip install -e . --no-build-isolation), or unset TORCH_CUDA_ARCH_LIST for "
                "the build on first use, which then compiles for the visible GPUs");
  }
  C10_CUDA_CHECK(err);
}

template <typename scalar_t>
void launch(const at::Tensor& cost_in, bool maximize, int64_t scratch_mode, at::Tensor& index,
            at::Tensor& status) {
  using acc_t = double;
  const int device = cost_in.get_device();
  const int64_t batch = cost_in.size(0);
  const int32_t nr = static_cast<int32_t>(cost_in.size(1));
  const int32_t nc = static_cast<int32_t>(cost_in.size(2));
  const int64_t shared_limit =
      device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  const int64_t full_bytes = assign_layout<acc_t>(nr, nc, sizeof(scalar_t)).total;
  const int64_t vec_bytes = assign_layout<acc_t>(nr, nc, 0).total;

  if (scratch_mode == kScratchAuto) {
    scratch_mode = full_bytes <= shared_limit  ? kScratchShared
                   : vec_bytes <= shared_limit ? kScratchSharedVec
                                               : kScratchGlobal;
  }
  TORCH_CHECK(scratch_mode >= kScratchShared && scratch_mode <= kScratchGlobal,
              "hungarian_cuda: scratch must be 0..3, got ", scratch_mode);
  const bool cost_in_scratch = scratch_mode == kScratchShared;
  const int64_t scratch_bytes = cost_in_scratch ? full_bytes : vec_bytes;
  TORCH_CHECK(scratch_mode == kScratchGlobal || scratch_bytes <= shared_limit,
              "hungarian_cuda: a ", nr, " x ", nc, " problem needs ", scratch_bytes,
              " bytes of shared memory, the device offers ", shared_limit);

  // Without a copy into scratch the solver reads the cost in place: contiguous
  // rows, already negated when maximizing.
  at::Tensor cost = cost_in;
  if (!cost_in_scratch) {
    cost = (maximize ? cost_in.neg() : cost_in).contiguous();
    maximize = false;
  }

  // Enough blocks to spread the batch over every multiprocessor; more warps per
  // block only once every multiprocessor has work.
  int64_t warps = std::clamp<int64_t>(batch / std::max(sms, 1), 1, kMaxWarpsPerBlock);
  at::Tensor global_scratch;
  int64_t shared_bytes = 0;
  if (scratch_mode == kScratchGlobal) {
    warps = std::min<int64_t>(warps, 4);
    global_scratch = at::empty({batch * scratch_bytes}, cost.options().dtype(at::kByte));
  } else {
    warps = std::max<int64_t>(1, std::min(warps, shared_limit / scratch_bytes));
    shared_bytes = warps * scratch_bytes;
  }
  const int64_t blocks = (batch + warps - 1) / warps;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "hungarian_cuda: batch too large");

  auto kernel = hungarian_warp_kernel<scalar_t>;
  check_kernel_image(reinterpret_cast<const void*>(kernel), device);
  if (shared_bytes > kDefaultSharedBytes) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_bytes)));
  }
  kernel<<<static_cast<unsigned>(blocks), static_cast<unsigned>(warps * kWarpLanes),
           static_cast<size_t>(shared_bytes), c10::cuda::getCurrentCUDAStream(device)>>>(
      cost.const_data_ptr<scalar_t>(), batch, cost.stride(0), cost.stride(1), cost.stride(2), nr,
      nc, maximize, cost_in_scratch,
      global_scratch.defined() ? global_scratch.data_ptr<uint8_t>() : nullptr, scratch_bytes,
      index.data_ptr<int64_t>(), status.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> hungarian_cuda_scratch(const at::Tensor& cost, bool maximize,
                                                          int64_t scratch) {
  TORCH_CHECK(cost.is_cuda(), "hungarian_cuda: cost must be a CUDA tensor");
  TORCH_CHECK(cost.dim() == 3, "hungarian: cost must be (B, Q, T), got ", cost.sizes());
  TORCH_CHECK(cost.size(1) <= cost.size(2), "hungarian: need Q <= T, got ", cost.sizes());
  TORCH_CHECK(cost.size(2) < (int64_t(1) << 30), "hungarian: T must be below 2^30, got ",
              cost.sizes());
  const c10::cuda::CUDAGuard guard(cost.device());
  // The kernel writes every entry of both (index -1 where a problem has no solution).
  auto index = at::empty({cost.size(0), cost.size(1)}, cost.options().dtype(at::kLong));
  auto status = at::empty({cost.size(0)}, cost.options().dtype(at::kInt));
  if (cost.numel() == 0) {
    status.zero_();
    return {index, status};
  }
  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "hungarian_cuda",
                             [&] { launch<scalar_t>(cost, maximize, scratch, index, status); });
  return {index, status};
}

std::tuple<at::Tensor, at::Tensor> hungarian_cuda(const at::Tensor& cost, bool maximize) {
  return hungarian_cuda_scratch(cost, maximize, kScratchAuto);
}

TORCH_LIBRARY_IMPL(stellar_ext, CUDA, m) {
  m.impl("hungarian", &hungarian_cuda);
  m.impl("hungarian_cuda_scratch", &hungarian_cuda_scratch);
}

}  // namespace stellar
