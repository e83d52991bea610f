// CPU batched exact assignment: one problem per work item under at::parallel_for.
//
// hungarian runs the solver of hungarian.h with SerialTeam. The test-only
// hungarian_emulated_warp runs it with EmulatedWarpTeam, the CUDA kernel's
// decomposition of every column sweep into 32 lanes, with the cost kept in the
// input's precision as the kernel keeps it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "hungarian.h"
#include "ops.h"

namespace stellar {

namespace {

template <typename Team, typename scalar_t, typename cost_t>
void solve_batch_cpu(const at::Tensor& cost, bool maximize, at::Tensor& index, at::Tensor& status) {
  using acc_t = double;
  const int64_t batch = cost.size(0);
  const int32_t nr = static_cast<int32_t>(cost.size(1));
  const int32_t nc = static_cast<int32_t>(cost.size(2));
  const int64_t sb = cost.stride(0), sq = cost.stride(1), st = cost.stride(2);
  const scalar_t* cost_ptr = cost.const_data_ptr<scalar_t>();
  int64_t* index_ptr = index.data_ptr<int64_t>();
  int32_t* status_ptr = status.data_ptr<int32_t>();
  const int64_t scratch_bytes = assign_layout<acc_t>(nr, nc, sizeof(cost_t)).total;

  // One problem is ~K^3 operations: a grain of a few problems keeps threads busy
  // without paying thread start-up for tiny batches.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, int64_t(nr) * nc));
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> buffer(scratch_bytes + 64);
    uint8_t* scratch = buffer.data() + (64 - reinterpret_cast<uintptr_t>(buffer.data()) % 64) % 64;
    const Team team{};
    for (int64_t b = begin; b < end; ++b) {
      status_ptr[b] = load_and_solve<Team, scalar_t, acc_t, cost_t, int64_t>(
          team, cost_ptr + b * sb, sq, st, nr, nc, maximize, scratch, true, index_ptr + b * nr);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> check_and_allocate(const at::Tensor& cost) {
  TORCH_CHECK(cost.dim() == 3, "hungarian: cost must be (B, Q, T), got ", cost.sizes());
  TORCH_CHECK(cost.size(1) <= cost.size(2), "hungarian: need Q <= T, got ", cost.sizes());
  TORCH_CHECK(cost.size(2) < (int64_t(1) << 30), "hungarian: T must be below 2^30, got ",
              cost.sizes());
  auto index = at::full({cost.size(0), cost.size(1)}, -1, cost.options().dtype(at::kLong));
  auto status = at::zeros({cost.size(0)}, cost.options().dtype(at::kInt));
  return {index, status};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> hungarian_cpu(const at::Tensor& cost, bool maximize) {
  auto [index, status] = check_and_allocate(cost);
  if (cost.numel() == 0) return {index, status};
  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "hungarian_cpu", [&] {
    solve_batch_cpu<SerialTeam, scalar_t, scalar_t>(cost, maximize, index, status);
  });
  return {index, status};
}

std::tuple<at::Tensor, at::Tensor> hungarian_emulated_warp(const at::Tensor& cost, bool maximize) {
  TORCH_CHECK(cost.device().is_cpu(), "hungarian_emulated_warp: cost must be a CPU tensor");
  auto [index, status] = check_and_allocate(cost);
  if (cost.numel() == 0) return {index, status};
  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "hungarian_emulated_warp", [&] {
    solve_batch_cpu<EmulatedWarpTeam, scalar_t, scalar_t>(cost, maximize, index, status);
  });
  return {index, status};
}

std::tuple<at::Tensor, at::Tensor> hungarian_meta(const at::Tensor& cost, bool maximize) {
  (void)maximize;
  TORCH_CHECK(cost.dim() == 3, "hungarian: cost must be (B, Q, T), got ", cost.sizes());
  return {at::empty({cost.size(0), cost.size(1)}, cost.options().dtype(at::kLong)),
          at::empty({cost.size(0)}, cost.options().dtype(at::kInt))};
}

TORCH_LIBRARY_IMPL(stellar_ext, CPU, m) {
  m.impl("hungarian", &hungarian_cpu);
  m.impl("hungarian_emulated_warp", &hungarian_emulated_warp);
}

TORCH_LIBRARY_IMPL(stellar_ext, Meta, m) { m.impl("hungarian", &hungarian_meta); }

}  // namespace stellar
