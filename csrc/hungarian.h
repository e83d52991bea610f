// Exact linear assignment of one Q x T problem (Q <= T): shortest augmenting
// paths with row and column potentials (Jonker-Volgenant; the variant of
// Crouse, "On implementing 2D rectangular assignment algorithms", 2016).
//
// The solver is written once, for the host and the device: the CPU extension
// runs it per problem under at::parallel_for, the CUDA kernel per thread, so the
// CPU tests vouch for the GPU code's logic.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define STELLAR_HD __host__ __device__
#else
#define STELLAR_HD
#endif

namespace stellar {

// Status codes written per problem.
constexpr int32_t kAssignOk = 0;
constexpr int32_t kAssignInfeasible = 1;  // forbidden pairs leave no complete assignment
constexpr int32_t kAssignInvalid = 2;     // NaN, or an infinity that makes the optimum unbounded

template <typename acc_t>
STELLAR_HD inline acc_t assign_infinity() {
  return acc_t(1) / acc_t(0);
}

// Caller-provided scratch for one problem: acc_t u[Q], v[T], shortest[T];
// int32 path[T], row4col[T], col4row[Q], remaining[T]; uint8 row_seen[Q], col_seen[T].
template <typename acc_t>
struct AssignWorkspace {
  acc_t* u;
  acc_t* v;
  acc_t* shortest;
  int32_t* path;
  int32_t* row4col;
  int32_t* col4row;
  int32_t* remaining;
  uint8_t* row_seen;
  uint8_t* col_seen;
};

// Reads cost(i, j) = cost[i * sq + j * st], negated when maximizing so that the
// solver always minimizes. Forbidden pairs (+inf when minimizing, -inf when
// maximizing) become +inf; the opposite infinity or NaN is invalid.
template <typename scalar_t, typename acc_t>
STELLAR_HD inline acc_t assign_cost(const scalar_t* cost, int64_t sq, int64_t st, int32_t i,
                                    int32_t j, bool maximize) {
  acc_t c = static_cast<acc_t>(cost[i * sq + j * st]);
  return maximize ? -c : c;
}

// Solves one problem; writes the column chosen for each row to out[i * so].
// Returns kAssignOk, kAssignInfeasible or kAssignInvalid.
template <typename scalar_t, typename acc_t, typename index_t>
STELLAR_HD int32_t solve_assignment(const scalar_t* cost, int64_t sq, int64_t st, int32_t nr,
                                    int32_t nc, bool maximize, AssignWorkspace<acc_t> w,
                                    index_t* out, int64_t so) {
  const acc_t inf = assign_infinity<acc_t>();
  for (int32_t i = 0; i < nr; ++i) {
    for (int32_t j = 0; j < nc; ++j) {
      acc_t c = assign_cost<scalar_t, acc_t>(cost, sq, st, i, j, maximize);
      if (c != c || c == -inf) return kAssignInvalid;
    }
  }
  for (int32_t i = 0; i < nr; ++i) {
    w.u[i] = acc_t(0);
    w.col4row[i] = -1;
  }
  for (int32_t j = 0; j < nc; ++j) {
    w.v[j] = acc_t(0);
    w.row4col[j] = -1;
  }

  for (int32_t cur_row = 0; cur_row < nr; ++cur_row) {
    // Dijkstra over columns from cur_row in the reduced costs c - u - v.
    acc_t min_val = acc_t(0);
    int32_t num_remaining = nc;
    for (int32_t j = 0; j < nc; ++j) {
      // Reverse order so that, among equal distances, the lowest column wins last.
      w.remaining[j] = nc - j - 1;
      w.shortest[j] = inf;
      w.col_seen[j] = 0;
    }
    for (int32_t i = 0; i < nr; ++i) w.row_seen[i] = 0;

    int32_t sink = -1;
    int32_t i = cur_row;
    while (sink == -1) {
      int32_t index = -1;
      acc_t lowest = inf;
      w.row_seen[i] = 1;
      for (int32_t it = 0; it < num_remaining; ++it) {
        const int32_t j = w.remaining[it];
        const acc_t r =
            min_val + assign_cost<scalar_t, acc_t>(cost, sq, st, i, j, maximize) - w.u[i] - w.v[j];
        if (r < w.shortest[j]) {
          w.path[j] = i;
          w.shortest[j] = r;
        }
        // Prefer an unassigned column on ties: it ends the search at once.
        if (w.shortest[j] < lowest || (w.shortest[j] == lowest && w.row4col[j] == -1)) {
          lowest = w.shortest[j];
          index = it;
        }
      }
      min_val = lowest;
      if (index == -1 || !(min_val < inf)) return kAssignInfeasible;
      const int32_t j = w.remaining[index];
      if (w.row4col[j] == -1) {
        sink = j;
      } else {
        i = w.row4col[j];
      }
      w.col_seen[j] = 1;
      w.remaining[index] = w.remaining[--num_remaining];
    }

    // Update the potentials so that reduced costs stay non-negative.
    w.u[cur_row] += min_val;
    for (int32_t r = 0; r < nr; ++r) {
      if (w.row_seen[r] && r != cur_row) w.u[r] += min_val - w.shortest[w.col4row[r]];
    }
    for (int32_t c = 0; c < nc; ++c) {
      if (w.col_seen[c]) w.v[c] -= min_val - w.shortest[c];
    }

    // Augment along the path back to cur_row.
    int32_t j = sink;
    while (true) {
      const int32_t r = w.path[j];
      w.row4col[j] = r;
      const int32_t previous = w.col4row[r];
      w.col4row[r] = j;
      j = previous;
      if (r == cur_row) break;
    }
  }
  for (int32_t i = 0; i < nr; ++i) out[i * so] = static_cast<index_t>(w.col4row[i]);
  return kAssignOk;
}

}  // namespace stellar
