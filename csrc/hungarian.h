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

// Branch-free selections (min/max compile to minsd/maxsd, the index picks to
// masks): on random costs the comparisons are unpredictable, and a compiler left
// to itself turns selects into branches whose mispredictions dominate.
template <typename acc_t>
STELLAR_HD inline acc_t select_min(acc_t a, acc_t b) {
  return b < a ? b : a;
}
template <typename acc_t>
STELLAR_HD inline acc_t select_max(acc_t a, acc_t b) {
  return a < b ? b : a;
}
STELLAR_HD inline int32_t select_index(bool take_b, int32_t a, int32_t b) {
  const int32_t mask = -static_cast<int32_t>(take_b);
  return (a & ~mask) | (b & mask);
}

// Caller-provided scratch for one problem: acc_t cost[Q * T], u[Q], v[T], shortest[T];
// int32 path[T], row4col[T], col4row[Q], remaining[T]; uint8 row_seen[Q], col_seen[T].
template <typename acc_t>
struct AssignWorkspace {
  acc_t* cost;
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

// Copies problem (i, j) -> src[i * sq + j * st] into the contiguous w.cost, negated
// when maximizing so that the solver always minimizes. Forbidden pairs (+inf when
// minimizing, -inf when maximizing) become +inf; NaN or the opposite infinity,
// which would make the optimum unbounded, returns kAssignInvalid.
template <typename scalar_t, typename acc_t>
STELLAR_HD int32_t load_problem(const scalar_t* src, int64_t sq, int64_t st, int32_t nr,
                                int32_t nc, bool maximize, acc_t* dst, bool* all_finite) {
  const acc_t inf = assign_infinity<acc_t>();
  const acc_t sign = maximize ? acc_t(-1) : acc_t(1);
  // Flags accumulated without branches so that the copy vectorizes.
  bool invalid = false, forbidden = false;
  for (int32_t i = 0; i < nr; ++i) {
    const scalar_t* row = src + i * sq;
    acc_t* out = dst + int64_t(i) * nc;
    for (int32_t j = 0; j < nc; ++j) {
      const acc_t m = sign * static_cast<acc_t>(row[j * st]);
      invalid |= (m != m) | (m == -inf);
      forbidden |= m == inf;
      out[j] = m;
    }
  }
  *all_finite = !forbidden;
  return invalid ? kAssignInvalid : kAssignOk;
}

// Jonker-Volgenant initialization of a square, all-finite problem: column
// reduction, reduction transfer and two rounds of augmenting row reduction. It
// leaves most rows assigned and potentials that are dual feasible
// (c_ij - u_i - v_j >= 0) and tight on every assigned pair, which is all the
// shortest-path phase needs; a random 16 x 16 problem then needs few searches.
// Square only: with spare columns, an unassigned column must keep v_j = 0.
// Uses w.shortest as the list of free rows and w.path as per-row match counts.
template <typename acc_t>
STELLAR_HD void jv_initialize(int32_t n, AssignWorkspace<acc_t> w) {
  const acc_t inf = assign_infinity<acc_t>();
  const acc_t* cost = w.cost;
  int32_t* matches = w.path;
  for (int32_t i = 0; i < n; ++i) matches[i] = 0;
  // Column reduction: v_j = min_i c_ij; a row that is the minimum of one column takes it.
  int32_t* argmin = w.remaining;
  for (int32_t j = 0; j < n; ++j) {
    w.v[j] = cost[j];
    argmin[j] = 0;
  }
  for (int32_t i = 1; i < n; ++i) {
    for (int32_t j = 0; j < n; ++j) {
      const acc_t c = cost[i * n + j];
      argmin[j] = select_index(c < w.v[j], argmin[j], i);
      w.v[j] = select_min(w.v[j], c);
    }
  }
  for (int32_t j = n - 1; j >= 0; --j) {
    const int32_t arg = argmin[j];
    if (++matches[arg] == 1) {
      w.col4row[arg] = j;
      w.row4col[j] = arg;
    }
  }
  for (int32_t j = 0; j < n; ++j) {
    const int32_t r = w.row4col[j];
    if (r != -1 && w.col4row[r] != j) w.row4col[j] = -1;
  }
  // Reduction transfer: a row matched once passes its slack to its column.
  int32_t* free_rows = w.remaining;
  int32_t num_free = 0;
  for (int32_t i = 0; i < n; ++i) {
    if (matches[i] == 0) {
      free_rows[num_free++] = i;
    } else if (matches[i] == 1) {
      const int32_t j1 = w.col4row[i];
      acc_t lowest = inf;
      for (int32_t j = 0; j < n; ++j) {
        const acc_t h = j == j1 ? inf : cost[i * n + j] - w.v[j];
        lowest = select_min(lowest, h);
      }
      if (lowest < inf) w.v[j1] -= lowest;
    }
  }
  // Augmenting row reduction, twice over the free rows; the step cap guards
  // against long chains of tiny decrements in floating point.
  int64_t steps_left = 2 * int64_t(n);
  for (int32_t round = 0; round < 2 && num_free > 0; ++round) {
    const int32_t previous = num_free;
    int32_t k = 0;
    num_free = 0;
    while (k < previous) {
      const int32_t i = free_rows[k++];
      if (--steps_left < 0) {
        free_rows[num_free++] = i;
        continue;
      }
      acc_t umin = cost[i * n] - w.v[0], usub = inf;
      int32_t j1 = 0, j2 = -1;
      for (int32_t j = 1; j < n; ++j) {
        const acc_t h = cost[i * n + j] - w.v[j];
        const bool new_min = h < umin;
        j2 = select_index(new_min, select_index(h < usub, j2, j), j1);
        j1 = select_index(new_min, j1, j);
        usub = select_min(usub, select_max(h, umin));
        umin = select_min(umin, h);
      }
      int32_t i0 = w.row4col[j1];
      if (umin < usub) {
        w.v[j1] -= usub - umin;
      } else if (i0 != -1 && j2 != -1) {
        j1 = j2;
        i0 = w.row4col[j2];
      }
      w.col4row[i] = j1;
      w.row4col[j1] = i;
      if (i0 != -1) {
        w.col4row[i0] = -1;
        if (umin < usub) {
          free_rows[--k] = i0;  // retry the displaced row at once
        } else {
          free_rows[num_free++] = i0;
        }
      }
    }
  }
  // u_i = min_j (c_ij - v_j): feasible everywhere, tight on the assigned columns.
  // Only the shortest-path phase reads u, and it runs only for rows still free.
  if (num_free == 0) return;
  for (int32_t i = 0; i < n; ++i) {
    acc_t lowest = inf;
    for (int32_t j = 0; j < n; ++j) {
      lowest = select_min(lowest, cost[i * n + j] - w.v[j]);
    }
    w.u[i] = lowest;
  }
}

// Solves the problem loaded in w.cost (nr x nc, row-major, to minimize); writes
// the column chosen for each row to out[i * so]. Returns kAssignOk or kAssignInfeasible.
template <typename acc_t, typename index_t>
STELLAR_HD int32_t solve_assignment(int32_t nr, int32_t nc, bool all_finite, AssignWorkspace<acc_t> w,
                                    index_t* out, int64_t so) {
  const acc_t inf = assign_infinity<acc_t>();
  const acc_t* cost = w.cost;
  for (int32_t i = 0; i < nr; ++i) {
    w.u[i] = acc_t(0);
    w.col4row[i] = -1;
  }
  for (int32_t j = 0; j < nc; ++j) {
    w.v[j] = acc_t(0);
    w.row4col[j] = -1;
  }
  if (nr == nc && all_finite) jv_initialize(nr, w);

  for (int32_t cur_row = 0; cur_row < nr; ++cur_row) {
    if (w.col4row[cur_row] != -1) continue;
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
      const acc_t* row = cost + int64_t(i) * nc;
      const acc_t base = min_val - w.u[i];
      for (int32_t it = 0; it < num_remaining; ++it) {
        const int32_t j = w.remaining[it];
        const acc_t r = base + row[j] - w.v[j];
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

// Loads and solves one problem: the entry point of the CPU and CUDA batch drivers.
template <typename scalar_t, typename acc_t, typename index_t>
STELLAR_HD int32_t load_and_solve(const scalar_t* src, int64_t sq, int64_t st, int32_t nr,
                                  int32_t nc, bool maximize, AssignWorkspace<acc_t> w,
                                  index_t* out, int64_t so) {
  bool all_finite = true;
  // A unit column stride is the common case; spelling it out lets the copy vectorize.
  const int32_t status =
      st == 1 ? load_problem<scalar_t, acc_t>(src, sq, 1, nr, nc, maximize, w.cost, &all_finite)
              : load_problem<scalar_t, acc_t>(src, sq, st, nr, nc, maximize, w.cost, &all_finite);
  if (status != kAssignOk) return status;
  return solve_assignment<acc_t, index_t>(nr, nc, all_finite, w, out, so);
}

// Scratch sizes of one problem, in elements.
STELLAR_HD inline int64_t assign_real_scratch(int32_t nr, int32_t nc) {
  return int64_t(nr) * nc + nr + 2 * int64_t(nc);
}
STELLAR_HD inline int64_t assign_int_scratch(int32_t nr, int32_t nc) { return 3 * int64_t(nc) + nr; }
STELLAR_HD inline int64_t assign_byte_scratch(int32_t nr, int32_t nc) { return int64_t(nr) + nc; }

// Lays a workspace over three scratch arrays of the sizes above.
template <typename acc_t>
STELLAR_HD inline AssignWorkspace<acc_t> assign_workspace(acc_t* real, int32_t* ints, uint8_t* bytes,
                                                         int32_t nr, int32_t nc) {
  acc_t* cost = real;
  acc_t* u = cost + int64_t(nr) * nc;
  return AssignWorkspace<acc_t>{cost,      u,         u + nr,         u + nr + nc, ints,
                                ints + nc, ints + 2 * nc, ints + 2 * nc + nr, bytes, bytes + nr};
}

}  // namespace stellar
