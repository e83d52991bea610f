// Exact linear assignment of one Q x T problem (Q <= T): shortest augmenting
// paths with row and column potentials (Jonker-Volgenant; the variant of
// Crouse, "On implementing 2D rectangular assignment algorithms", 2016).
//
// The solver is written once, against a "team": the workers that solve one
// problem together. A team offers four operations, and the solver touches the
// columns (or rows) of a problem only through them:
//
//   team.for_each(n, f)                    f(k) for every k in [0, n)
//   team.reduce(n, identity, visit, op)    reduction of visit(k) over [0, n)
//   team.reduce_grid(nr, nc, id, visit, op)  the same over (i, j) in nr x nc
//   team.single(f)                         f() once
//
// SerialTeam (one CPU thread: plain loops) is what the CPU extension runs.
// WarpTeam (32 CUDA lanes: lane l takes k = l, l + 32, ...; a butterfly of
// __shfl_xor_sync combines the lanes' partial results) is what the CUDA kernel
// runs. EmulatedWarpTeam runs WarpTeam's decomposition sequentially on the CPU
// (the same item-to-lane split, the same butterfly, the same argument order of
// every combine), so the CPU tests check the warp decomposition against scipy;
// csrc/testing/hungarian_warp_threads.cc runs it on 32 threads with a barrier
// for every __syncwarp(), and the tests run that under ThreadSanitizer to check
// the synchronization rules below.
//
// Rules that make a team of lanes correct (checked by reading this file):
//  * Outside team operations every lane runs the same code on the same values:
//    scalars live in registers and are uniform, because every reduction hands
//    all lanes a bitwise-identical result (the butterfly always combines the
//    lower lane's value as the first argument).
//  * Scratch memory (shared or global) is written only inside for_each/reduce
//    visits (item k touches only the entries of item k) and inside single()
//    (one lane). Every team operation begins and ends with __syncwarp(), which
//    orders those writes against every lane's reads.
//  * Every choice is an argmin under a strict total order (value, then an
//    integer tie key), so the result does not depend on how the items were split
//    among workers: the serial team, the emulated warp and the CUDA warp return
//    the same assignment.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#if !defined(__CUDA_ARCH__)
#include <stdexcept>
#endif

#if defined(__CUDACC__)
#define STELLAR_HD __host__ __device__
#define STELLAR_INLINE __forceinline__
#else
#define STELLAR_HD
#define STELLAR_INLINE inline __attribute__((always_inline))
#endif

namespace stellar {

// Status codes written per problem.
constexpr int32_t kAssignOk = 0;
constexpr int32_t kAssignInfeasible = 1;  // forbidden pairs leave no complete assignment
constexpr int32_t kAssignInvalid = 2;     // NaN, or an infinity that makes the optimum unbounded

constexpr int32_t kNoIndex = 0x7fffffff;  // tie key and index of "nothing" in reductions

template <typename acc_t>
STELLAR_HD STELLAR_INLINE acc_t assign_infinity() {
  return acc_t(1) / acc_t(0);
}

// Branch-free selections (min/max compile to minsd/maxsd, the index picks to
// masks): on random costs the comparisons are unpredictable, and a compiler left
// to itself turns selects into branches whose mispredictions dominate.
template <typename acc_t>
STELLAR_HD STELLAR_INLINE acc_t select_min(acc_t a, acc_t b) {
  return b < a ? b : a;
}
template <typename acc_t>
STELLAR_HD STELLAR_INLINE acc_t select_max(acc_t a, acc_t b) {
  return a < b ? b : a;
}
STELLAR_HD STELLAR_INLINE int32_t select_index(bool take_b, int32_t a, int32_t b) {
  const int32_t mask = -static_cast<int32_t>(take_b);
  return (a & ~mask) | (b & mask);
}

// ---------------------------------------------------------------------------
// Reductions. op(a, b) combines two partial results; op.fold(acc, item) adds one
// item to a worker's partial result, the items of one worker arriving in
// ascending order of k (a faster special case of op). Each op is a min under a
// strict total order, hence commutative and associative up to the sign of a zero.

// The smallest value (no index).
template <typename acc_t>
struct MinCombine {
  STELLAR_HD STELLAR_INLINE acc_t operator()(acc_t a, acc_t b) const { return select_min(a, b); }
  STELLAR_HD STELLAR_INLINE acc_t fold(acc_t a, acc_t b) const { return select_min(a, b); }
};

// The smallest (value, tie) pair, carrying pos (the item that holds it).
template <typename acc_t>
struct ArgMin {
  acc_t value;
  int32_t tie;
  int32_t pos;
};
template <typename acc_t>
STELLAR_HD STELLAR_INLINE ArgMin<acc_t> argmin_identity() {
  return ArgMin<acc_t>{assign_infinity<acc_t>(), kNoIndex, -1};
}
template <typename acc_t>
struct ArgMinCombine {
  STELLAR_HD STELLAR_INLINE ArgMin<acc_t> operator()(const ArgMin<acc_t>& a,
                                                     const ArgMin<acc_t>& b) const {
    const bool take_b = b.value < a.value || (b.value == a.value && b.tie < a.tie);
    return ArgMin<acc_t>{take_b ? b.value : a.value, select_index(take_b, a.tie, b.tie),
                         select_index(take_b, a.pos, b.pos)};
  }
  STELLAR_HD STELLAR_INLINE ArgMin<acc_t> fold(const ArgMin<acc_t>& a,
                                               const ArgMin<acc_t>& b) const {
    return (*this)(a, b);
  }
};

// The two smallest (value, index) pairs in lexicographic order.
template <typename acc_t>
struct TopTwo {
  acc_t v1, v2;
  int32_t j1, j2;
};
template <typename acc_t>
STELLAR_HD STELLAR_INLINE TopTwo<acc_t> top_two_identity() {
  const acc_t inf = assign_infinity<acc_t>();
  return TopTwo<acc_t>{inf, inf, kNoIndex, kNoIndex};
}
template <typename acc_t>
STELLAR_HD STELLAR_INLINE TopTwo<acc_t> top_two_item(acc_t value, int32_t j) {
  return TopTwo<acc_t>{value, assign_infinity<acc_t>(), j, kNoIndex};
}
template <typename acc_t>
STELLAR_HD STELLAR_INLINE bool pair_less(acc_t va, int32_t ja, acc_t vb, int32_t jb) {
  return va < vb || (va == vb && ja < jb);
}
template <typename acc_t>
struct TopTwoCombine {
  STELLAR_HD STELLAR_INLINE TopTwo<acc_t> operator()(const TopTwo<acc_t>& a,
                                                     const TopTwo<acc_t>& b) const {
    // first = min(a1, b1); second = min(max(a1, b1), the other's second).
    const bool b_first = pair_less(b.v1, b.j1, a.v1, a.j1);
    const acc_t f_v = b_first ? b.v1 : a.v1, l_v = b_first ? a.v1 : b.v1;
    const int32_t f_j = select_index(b_first, a.j1, b.j1), l_j = select_index(b_first, b.j1, a.j1);
    const acc_t s_v = b_first ? b.v2 : a.v2;
    const int32_t s_j = select_index(b_first, a.j2, b.j2);
    const bool take_l = pair_less(l_v, l_j, s_v, s_j);
    return TopTwo<acc_t>{f_v, take_l ? l_v : s_v, f_j, select_index(take_l, s_j, l_j)};
  }
  // The same when b is one item (b.v2 = inf) whose index exceeds a's, as in a
  // worker's own ascending pass: on equal values a's pairs come first (so an
  // infinite item is not taken over the identity; callers check j2).
  STELLAR_HD STELLAR_INLINE TopTwo<acc_t> fold(const TopTwo<acc_t>& a,
                                               const TopTwo<acc_t>& b) const {
    const bool new_min = b.v1 < a.v1;
    const bool new_sub = b.v1 < a.v2;
    TopTwo<acc_t> r;
    r.v1 = new_min ? b.v1 : a.v1;
    r.j1 = new_min ? b.j1 : a.j1;
    r.v2 = new_min ? a.v1 : (new_sub ? b.v1 : a.v2);
    r.j2 = new_min ? a.j1 : (new_sub ? b.j1 : a.j2);
    return r;
  }
};

// Bitwise OR of status flags.
struct OrCombine {
  STELLAR_HD STELLAR_INLINE int32_t operator()(int32_t a, int32_t b) const { return a | b; }
  STELLAR_HD STELLAR_INLINE int32_t fold(int32_t a, int32_t b) const { return a | b; }
};

// ---------------------------------------------------------------------------
// Teams.

// One CPU thread: every operation is a plain loop.
struct SerialTeam {
  template <typename F>
  STELLAR_HD STELLAR_INLINE void for_each(int32_t n, F&& f) const {
    for (int32_t k = 0; k < n; ++k) f(k);
  }
  template <typename F>
  STELLAR_HD STELLAR_INLINE void single(F&& f) const {
    f();
  }
  template <typename R, typename V, typename C>
  STELLAR_HD STELLAR_INLINE R reduce(int32_t n, R acc, V&& visit, C&& combine) const {
    for (int32_t k = 0; k < n; ++k) acc = combine.fold(acc, visit(k));
    return acc;
  }
  template <typename R, typename V, typename C>
  STELLAR_HD STELLAR_INLINE R reduce_grid(int32_t nr, int32_t nc, R acc, V&& visit,
                                          C&& combine) const {
    for (int32_t i = 0; i < nr; ++i) {
      for (int32_t j = 0; j < nc; ++j) acc = combine.fold(acc, visit(i, j));
    }
    return acc;
  }
};

constexpr int kWarpLanes = 32;

// Where lane `lane` starts in an nr x nc grid walked in row-major order with a
// stride of kWarpLanes items, and how far each step moves.
struct GridWalk {
  int32_t i, j, di, dj;
  STELLAR_HD STELLAR_INLINE GridWalk(int32_t lane, int32_t nc)
      : i(lane / nc), j(lane % nc), di(kWarpLanes / nc), dj(kWarpLanes % nc) {}
  STELLAR_HD STELLAR_INLINE void step(int32_t nc) {
    i += di;
    j += dj;
    if (j >= nc) {
      j -= nc;
      ++i;
    }
  }
};

#if !defined(__CUDA_ARCH__)
// WarpTeam's decomposition run sequentially on the CPU (tests only). Lanes run
// in descending order, so that a visit that depended on another item of the same
// operation (a race on the GPU) would change the result here.
struct EmulatedWarpTeam {
  template <typename F>
  void for_each(int32_t n, F&& f) const {
    for (int lane = kWarpLanes - 1; lane >= 0; --lane) {
      for (int32_t k = lane; k < n; k += kWarpLanes) f(k);
    }
  }
  template <typename F>
  void single(F&& f) const {
    f();
  }
  template <typename R, typename C>
  static R butterfly(R* acc, C& combine) {
    for (int offset = kWarpLanes / 2; offset > 0; offset >>= 1) {
      R next[kWarpLanes];
      for (int lane = 0; lane < kWarpLanes; ++lane) {
        const int other = lane ^ offset;
        next[lane] = (lane & offset) ? combine(acc[other], acc[lane]) : combine(acc[lane], acc[other]);
      }
      for (int lane = 0; lane < kWarpLanes; ++lane) acc[lane] = next[lane];
    }
    // Every lane must hold the same bits, or lanes of a real warp would diverge.
    for (int lane = 1; lane < kWarpLanes; ++lane) {
      if (std::memcmp(&acc[lane], &acc[0], sizeof(R)) != 0) {
        throw std::logic_error("hungarian: warp lanes disagree on a reduction");
      }
    }
    return acc[0];
  }
  template <typename R, typename V, typename C>
  R reduce(int32_t n, R identity, V&& visit, C&& combine) const {
    R acc[kWarpLanes];
    for (int lane = kWarpLanes - 1; lane >= 0; --lane) {
      acc[lane] = identity;
      for (int32_t k = lane; k < n; k += kWarpLanes) acc[lane] = combine.fold(acc[lane], visit(k));
    }
    return butterfly(acc, combine);
  }
  template <typename R, typename V, typename C>
  R reduce_grid(int32_t nr, int32_t nc, R identity, V&& visit, C&& combine) const {
    R acc[kWarpLanes];
    const int64_t total = int64_t(nr) * nc;
    for (int lane = kWarpLanes - 1; lane >= 0; --lane) {
      acc[lane] = identity;
      GridWalk at(lane, nc);
      for (int64_t e = lane; e < total; e += kWarpLanes, at.step(nc)) {
        acc[lane] = combine.fold(acc[lane], visit(at.i, at.j));
      }
    }
    return butterfly(acc, combine);
  }
};
#endif

#if defined(__CUDACC__)
// Moves any trivially copyable value between lanes, 32 bits at a time.
template <typename R>
__device__ STELLAR_INLINE R shfl_xor_value(const R& value, int offset) {
  static_assert(sizeof(R) % 4 == 0, "reduction values must be a whole number of 32-bit words");
  constexpr int kWords = sizeof(R) / 4;
  uint32_t words[kWords];
  memcpy(words, &value, sizeof(R));
#pragma unroll
  for (int w = 0; w < kWords; ++w) words[w] = __shfl_xor_sync(0xffffffffu, words[w], offset);
  R out;
  memcpy(&out, words, sizeof(R));
  return out;
}

// The 32 lanes of one warp; every lane of the warp calls every operation.
struct WarpTeam {
  int lane;
  template <typename F>
  __device__ STELLAR_INLINE void for_each(int32_t n, F&& f) const {
    __syncwarp();
#pragma unroll 4
    for (int32_t k = lane; k < n; k += kWarpLanes) f(k);
    __syncwarp();
  }
  template <typename F>
  __device__ STELLAR_INLINE void single(F&& f) const {
    __syncwarp();
    if (lane == 0) f();
    __syncwarp();
  }
  template <typename R, typename C>
  __device__ STELLAR_INLINE R butterfly(R acc, C& combine) const {
#pragma unroll
    for (int offset = kWarpLanes / 2; offset > 0; offset >>= 1) {
      const R other = shfl_xor_value(acc, offset);
      acc = (lane & offset) ? combine(other, acc) : combine(acc, other);
    }
    __syncwarp();
    return acc;
  }
  template <typename R, typename V, typename C>
  __device__ STELLAR_INLINE R reduce(int32_t n, R acc, V&& visit, C&& combine) const {
    __syncwarp();
#pragma unroll 4
    for (int32_t k = lane; k < n; k += kWarpLanes) acc = combine.fold(acc, visit(k));
    return butterfly(acc, combine);
  }
  template <typename R, typename V, typename C>
  __device__ STELLAR_INLINE R reduce_grid(int32_t nr, int32_t nc, R acc, V&& visit,
                                          C&& combine) const {
    __syncwarp();
    const int64_t total = int64_t(nr) * nc;
    GridWalk at(lane, nc);
#pragma unroll 4
    for (int64_t e = lane; e < total; e += kWarpLanes, at.step(nc)) {
      acc = combine.fold(acc, visit(at.i, at.j));
    }
    return butterfly(acc, combine);
  }
};
#endif

// ---------------------------------------------------------------------------
// Scratch of one problem.

// acc_t u[Q], v[T], shortest[T]; cost_t cost[Q * T] (only when the cost is copied
// into scratch); int32 path[T], row4col[T], col4row[Q], remaining[T];
// uint8 row_seen[Q], col_seen[T]. Each array starts on a 16-byte boundary.
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

STELLAR_HD STELLAR_INLINE int64_t align16(int64_t bytes) { return (bytes + 15) & ~int64_t(15); }

struct AssignLayout {
  int64_t u, v, shortest, cost, path, row4col, col4row, remaining, row_seen, col_seen, total;
};

// Byte offsets of the arrays above; cost_bytes is sizeof(cost_t), or 0 when the
// solver reads the cost where it already is.
template <typename acc_t>
STELLAR_HD inline AssignLayout assign_layout(int32_t nr, int32_t nc, int64_t cost_bytes) {
  AssignLayout l;
  int64_t at = 0;
  auto take = [&](int64_t bytes) {
    const int64_t start = at;
    at = align16(at + bytes);
    return start;
  };
  l.u = take(sizeof(acc_t) * int64_t(nr));
  l.v = take(sizeof(acc_t) * int64_t(nc));
  l.shortest = take(sizeof(acc_t) * int64_t(nc));
  l.cost = take(cost_bytes * int64_t(nr) * nc);
  l.path = take(4 * int64_t(nc));
  l.row4col = take(4 * int64_t(nc));
  l.col4row = take(4 * int64_t(nr));
  l.remaining = take(4 * int64_t(nc));
  l.row_seen = take(nr);
  l.col_seen = take(nc);
  l.total = at;
  return l;
}

template <typename acc_t>
STELLAR_HD STELLAR_INLINE AssignWorkspace<acc_t> assign_workspace(uint8_t* base,
                                                                  const AssignLayout& l) {
  return AssignWorkspace<acc_t>{reinterpret_cast<acc_t*>(base + l.u),
                                reinterpret_cast<acc_t*>(base + l.v),
                                reinterpret_cast<acc_t*>(base + l.shortest),
                                reinterpret_cast<int32_t*>(base + l.path),
                                reinterpret_cast<int32_t*>(base + l.row4col),
                                reinterpret_cast<int32_t*>(base + l.col4row),
                                reinterpret_cast<int32_t*>(base + l.remaining),
                                base + l.row_seen,
                                base + l.col_seen};
}

// ---------------------------------------------------------------------------
// The solver.

// Checks problem (i, j) -> src[i * sq + j * st] and, when dst is not null, copies
// it into the contiguous dst (row-major, nc columns), negated when maximizing so
// that the solver always minimizes. Forbidden pairs (+inf when minimizing, -inf
// when maximizing) become +inf; NaN or the opposite infinity, which would make the
// optimum unbounded, returns kAssignInvalid.
constexpr int32_t kFlagInvalid = 1;
constexpr int32_t kFlagForbidden = 2;

template <typename Team, typename scalar_t, typename cost_t>
STELLAR_HD int32_t load_problem(const Team& team, const scalar_t* src, int64_t sq, int64_t st,
                                int32_t nr, int32_t nc, bool maximize, cost_t* dst,
                                bool* all_finite) {
  const cost_t inf = assign_infinity<cost_t>();
  const cost_t sign = maximize ? cost_t(-1) : cost_t(1);
  // Flags combined without branches so that the serial copy vectorizes.
  const int32_t flags = team.reduce_grid(
      nr, nc, int32_t(0),
      [&](int32_t i, int32_t j) {
        const cost_t m = sign * static_cast<cost_t>(src[i * sq + j * st]);
        if (dst != nullptr) dst[int64_t(i) * nc + j] = m;
        return (kFlagInvalid & -int32_t((m != m) | (m == -inf))) |
               (kFlagForbidden & -int32_t(m == inf));
      },
      OrCombine{});
  *all_finite = !(flags & kFlagForbidden);
  return (flags & kFlagInvalid) ? kAssignInvalid : kAssignOk;
}

// Jonker-Volgenant initialization of a square, all-finite problem: column
// reduction, reduction transfer and two rounds of augmenting row reduction. It
// leaves most rows assigned and potentials that are dual feasible
// (c_ij - u_i - v_j >= 0) and tight on every assigned pair, which is all the
// shortest-path phase needs; a random 16 x 16 problem then needs few searches.
// Square only: with spare columns, an unassigned column must keep v_j = 0.
// Uses w.remaining as the column argmins, then as the list of free rows, and
// w.path as per-row match counts.
template <typename Team, typename acc_t, typename cost_t>
STELLAR_HD void jv_initialize(const Team& team, int32_t n, const cost_t* cost, int64_t ld,
                              AssignWorkspace<acc_t> w) {
  const acc_t inf = assign_infinity<acc_t>();
  int32_t* matches = w.path;
  int32_t* argmin = w.remaining;
  // Column reduction: v_j = min_i c_ij (the lowest row on ties).
  team.for_each(n, [&](int32_t j) {
    w.v[j] = acc_t(cost[j]);
    argmin[j] = 0;
    matches[j] = 0;
  });
  for (int32_t i = 1; i < n; ++i) {
    const cost_t* row = cost + i * ld;
    team.for_each(n, [&](int32_t j) {
      const acc_t c = acc_t(row[j]);
      argmin[j] = select_index(c < w.v[j], argmin[j], i);
      w.v[j] = select_min(w.v[j], c);
    });
  }
  // A row that is the minimum of one or more columns takes the lowest of them.
  team.single([&] {
    for (int32_t j = n - 1; j >= 0; --j) {
      const int32_t arg = argmin[j];
      if (++matches[arg] == 1) {
        w.col4row[arg] = j;
        w.row4col[j] = arg;
      }
    }
  });
  team.for_each(n, [&](int32_t j) {
    const int32_t r = w.row4col[j];
    if (r != -1 && w.col4row[r] != j) w.row4col[j] = -1;
  });
  // Reduction transfer: a row matched once passes its slack to its column.
  int32_t* free_rows = w.remaining;
  int32_t num_free = 0;
  for (int32_t i = 0; i < n; ++i) {
    const int32_t m = matches[i];
    if (m == 0) {
      ++num_free;
    } else if (m == 1) {
      const int32_t j1 = w.col4row[i];
      const cost_t* row = cost + i * ld;
      const acc_t lowest = team.reduce(
          n, inf, [&](int32_t j) { return j == j1 ? inf : acc_t(row[j]) - w.v[j]; },
          MinCombine<acc_t>{});
      if (lowest < inf) team.single([&] { w.v[j1] -= lowest; });
    }
  }
  team.single([&] {
    int32_t k = 0;
    for (int32_t i = 0; i < n; ++i) {
      if (matches[i] == 0) free_rows[k++] = i;
    }
  });
  // Augmenting row reduction, twice over the free rows; the step cap guards
  // against long chains of tiny decrements in floating point.
  int64_t steps_left = 2 * int64_t(n);
  for (int32_t round = 0; round < 2 && num_free > 0; ++round) {
    const int32_t previous = num_free;
    int32_t k = 0;
    num_free = 0;
    while (k < previous) {
      const int32_t i = free_rows[k++];
      const cost_t* row = cost + i * ld;
      const TopTwo<acc_t> t =
          --steps_left < 0
              ? top_two_identity<acc_t>()
              : team.reduce(
                    n, top_two_identity<acc_t>(),
                    [&](int32_t j) { return top_two_item<acc_t>(acc_t(row[j]) - w.v[j], j); },
                    TopTwoCombine<acc_t>{});
      if (t.j2 == kNoIndex) {  // out of steps, or reduced costs overflowed: left to the search
        const int32_t slot = num_free++;
        team.single([&] { free_rows[slot] = i; });
        continue;
      }
      const bool strict = t.v1 < t.v2;
      int32_t j1 = t.j1;
      int32_t i0 = w.row4col[j1];
      if (!strict && i0 != -1) {
        j1 = t.j2;
        i0 = w.row4col[j1];
      }
      // A displaced row is retried at once after a strict decrease, else next round.
      const int32_t slot = i0 == -1 ? -1 : (strict ? --k : num_free++);
      team.single([&] {
        if (strict) w.v[j1] -= t.v2 - t.v1;
        w.col4row[i] = j1;
        w.row4col[j1] = i;
        if (i0 != -1) {
          w.col4row[i0] = -1;
          free_rows[slot] = i0;
        }
      });
    }
  }
  // u_i = min_j (c_ij - v_j): feasible everywhere, tight on the assigned columns.
  // Only the shortest-path phase reads u, and it runs only for rows still free.
  if (num_free == 0) return;
  for (int32_t i = 0; i < n; ++i) {
    const cost_t* row = cost + i * ld;
    const acc_t lowest = team.reduce(
        n, inf, [&](int32_t j) { return acc_t(row[j]) - w.v[j]; }, MinCombine<acc_t>{});
    team.single([&] { w.u[i] = lowest; });
  }
}

// Solves the problem cost[i * ld + j] (nr x nc, to minimize); writes the column
// chosen for each row to out[i]. Returns kAssignOk or kAssignInfeasible.
template <typename Team, typename acc_t, typename cost_t, typename index_t>
STELLAR_HD int32_t solve_assignment(const Team& team, int32_t nr, int32_t nc, const cost_t* cost,
                                    int64_t ld, bool all_finite, AssignWorkspace<acc_t> w,
                                    index_t* out) {
  const acc_t inf = assign_infinity<acc_t>();
  team.for_each(nr, [&](int32_t i) {
    w.u[i] = acc_t(0);
    w.col4row[i] = -1;
  });
  team.for_each(nc, [&](int32_t j) {
    w.v[j] = acc_t(0);
    w.row4col[j] = -1;
  });
  if (nr == nc && all_finite) jv_initialize(team, nr, cost, ld, w);

  for (int32_t cur_row = 0; cur_row < nr; ++cur_row) {
    if (w.col4row[cur_row] != -1) continue;
    // Dijkstra over columns from cur_row in the reduced costs c - u - v; the
    // columns not yet reached are w.remaining[0, num_remaining).
    team.for_each(nc, [&](int32_t j) {
      w.remaining[j] = j;
      w.shortest[j] = inf;
      w.col_seen[j] = 0;
    });
    team.for_each(nr, [&](int32_t r) { w.row_seen[r] = r == cur_row; });
    acc_t min_val = acc_t(0);
    int32_t num_remaining = nc;
    int32_t sink = -1;
    int32_t i = cur_row;
    while (sink == -1) {
      const cost_t* row = cost + i * ld;
      const acc_t base = min_val - w.u[i];
      // The nearest column; on equal distances an unassigned one (it ends the
      // search), then the lowest index.
      const ArgMin<acc_t> next = team.reduce(
          num_remaining, argmin_identity<acc_t>(),
          [&](int32_t it) {
            const int32_t j = w.remaining[it];
            const acc_t r = base + acc_t(row[j]) - w.v[j];
            acc_t s = w.shortest[j];
            if (r < s) {
              w.path[j] = i;
              w.shortest[j] = r;
              s = r;
            }
            return ArgMin<acc_t>{s, j + (w.row4col[j] == -1 ? 0 : nc), it};
          },
          ArgMinCombine<acc_t>{});
      min_val = next.value;
      if (next.pos == -1 || !(min_val < inf)) return kAssignInfeasible;
      const int32_t j = w.remaining[next.pos];
      const int32_t r = w.row4col[j];
      const int32_t last = --num_remaining;
      team.single([&] {
        w.col_seen[j] = 1;
        w.remaining[next.pos] = w.remaining[last];
        if (r != -1) w.row_seen[r] = 1;
      });
      if (r == -1) {
        sink = j;
      } else {
        i = r;
      }
    }

    // Update the potentials so that reduced costs stay non-negative.
    team.for_each(nr, [&](int32_t r) {
      if (r == cur_row) {
        w.u[r] += min_val;
      } else if (w.row_seen[r]) {
        w.u[r] += min_val - w.shortest[w.col4row[r]];
      }
    });
    team.for_each(nc, [&](int32_t c) {
      if (w.col_seen[c]) w.v[c] -= min_val - w.shortest[c];
    });

    // Augment along the path back to cur_row.
    team.single([&] {
      int32_t j = sink;
      while (true) {
        const int32_t r = w.path[j];
        w.row4col[j] = r;
        const int32_t previous = w.col4row[r];
        w.col4row[r] = j;
        j = previous;
        if (r == cur_row) break;
      }
    });
  }
  team.for_each(nr, [&](int32_t r) { out[r] = static_cast<index_t>(w.col4row[r]); });
  return kAssignOk;
}

// Loads (or checks) and solves one problem: the entry point of the batch drivers.
// scratch holds assign_layout<acc_t>(nr, nc, cost_in_scratch ? sizeof(cost_t) : 0)
// bytes. With cost_in_scratch the problem is copied there (as cost_t); otherwise
// the solver reads src in place, which needs st == 1, maximize == false and
// cost_t == scalar_t.
template <typename Team, typename scalar_t, typename acc_t, typename cost_t, typename index_t>
STELLAR_HD int32_t load_and_solve(const Team& team, const scalar_t* src, int64_t sq, int64_t st,
                                  int32_t nr, int32_t nc, bool maximize, uint8_t* scratch,
                                  bool cost_in_scratch, index_t* out) {
  const AssignLayout layout =
      assign_layout<acc_t>(nr, nc, cost_in_scratch ? int64_t(sizeof(cost_t)) : 0);
  const AssignWorkspace<acc_t> w = assign_workspace<acc_t>(scratch, layout);
  bool all_finite = true;
  int32_t status;
  if (cost_in_scratch) {
    cost_t* dst = reinterpret_cast<cost_t*>(scratch + layout.cost);
    // A unit column stride is the common case; spelling it out lets the copy vectorize.
    status = st == 1 ? load_problem(team, src, sq, 1, nr, nc, maximize, dst, &all_finite)
                     : load_problem(team, src, sq, st, nr, nc, maximize, dst, &all_finite);
    if (status != kAssignOk) return status;
    return solve_assignment(team, nr, nc, static_cast<const cost_t*>(dst), int64_t(nc), all_finite,
                            w, out);
  }
  if constexpr (std::is_same<cost_t, scalar_t>::value) {
    status = load_problem(team, src, sq, 1, nr, nc, false, static_cast<cost_t*>(nullptr),
                          &all_finite);
    if (status != kAssignOk) return status;
    return solve_assignment(team, nr, nc, src, sq, all_finite, w, out);
  } else {
    return kAssignInvalid;  // not reached: the drivers copy when the types differ
  }
}

}  // namespace stellar
