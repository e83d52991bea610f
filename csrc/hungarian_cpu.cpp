// CPU batched exact assignment: one problem per work item under at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "hungarian.h"
#include "ops.h"

namespace stellar {

namespace {

template <typename scalar_t>
void solve_batch_cpu(const at::Tensor& cost, bool maximize, at::Tensor& index, at::Tensor& status) {
  using acc_t = double;
  const int64_t batch = cost.size(0);
  const int32_t nr = static_cast<int32_t>(cost.size(1));
  const int32_t nc = static_cast<int32_t>(cost.size(2));
  const int64_t sb = cost.stride(0), sq = cost.stride(1), st = cost.stride(2);
  const scalar_t* cost_ptr = cost.const_data_ptr<scalar_t>();
  int64_t* index_ptr = index.data_ptr<int64_t>();
  int32_t* status_ptr = status.data_ptr<int32_t>();

  // One problem is ~K^3 operations: a grain of a few problems keeps threads busy
  // without paying thread start-up for tiny batches.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, int64_t(nr) * nc));
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> real_buf(assign_real_scratch(nr, nc));
    std::vector<int32_t> int_buf(assign_int_scratch(nr, nc));
    std::vector<uint8_t> byte_buf(assign_byte_scratch(nr, nc));
    const auto w = assign_workspace<acc_t>(real_buf.data(), int_buf.data(), byte_buf.data(), nr, nc);
    for (int64_t b = begin; b < end; ++b) {
      status_ptr[b] = load_and_solve<scalar_t, acc_t, int64_t>(
          cost_ptr + b * sb, sq, st, nr, nc, maximize, w, index_ptr + b * nr, 1);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> hungarian_cpu(const at::Tensor& cost, bool maximize) {
  TORCH_CHECK(cost.dim() == 3, "hungarian: cost must be (B, Q, T), got ", cost.sizes());
  TORCH_CHECK(cost.size(1) <= cost.size(2), "hungarian: need Q <= T, got ", cost.sizes());
  auto index = at::full({cost.size(0), cost.size(1)}, -1, cost.options().dtype(at::kLong));
  auto status = at::zeros({cost.size(0)}, cost.options().dtype(at::kInt));
  if (cost.numel() == 0) return {index, status};
  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "hungarian_cpu",
                             [&] { solve_batch_cpu<scalar_t>(cost, maximize, index, status); });
  return {index, status};
}

TORCH_LIBRARY_IMPL(stellar_ext, CPU, m) { m.impl("hungarian", &hungarian_cpu); }

}  // namespace stellar
