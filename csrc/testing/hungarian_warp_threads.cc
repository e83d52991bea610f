// Checks the warp synchronization of hungarian.h on the CPU (a test program, not
// part of the extension; tests/test_hungarian.py builds it with ThreadSanitizer).
//
// ThreadedWarpTeam runs the solver as the CUDA kernel does: 32 threads, one per
// lane, each running the whole solver on one shared workspace, meeting at a
// barrier wherever WarpTeam calls __syncwarp() and exchanging reduction values
// through memory where WarpTeam shuffles. A write that the solver made outside a
// visit or single(), or a read not separated from another lane's write by a
// team operation, is a data race here, which ThreadSanitizer reports; a lane
// that left the others (a non-uniform decision) deadlocks or disagrees.
//
//   hungarian_warp_threads SEED  -> exit 0 when every problem matched the serial solver
#include <pthread.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "../hungarian.h"

namespace {

using stellar::kWarpLanes;

struct Shared {
  pthread_barrier_t barrier;
  unsigned char slots[kWarpLanes][64];  // one reduction value per lane
};

struct ThreadedWarpTeam {
  int lane;
  Shared* shared;

  void sync() const { pthread_barrier_wait(&shared->barrier); }

  template <typename F>
  void for_each(int32_t n, F&& f) const {
    sync();
    for (int32_t k = lane; k < n; k += kWarpLanes) f(k);
    sync();
  }
  template <typename F>
  void single(F&& f) const {
    sync();
    if (lane == 0) f();
    sync();
  }
  template <typename R>
  R shuffle_xor(const R& value, int offset) const {
    static_assert(sizeof(R) <= 64, "reduction value too large");
    std::memcpy(shared->slots[lane], &value, sizeof(R));
    sync();
    R other;
    std::memcpy(&other, shared->slots[lane ^ offset], sizeof(R));
    sync();
    return other;
  }
  template <typename R, typename C>
  R butterfly(R acc, C& combine) const {
    for (int offset = kWarpLanes / 2; offset > 0; offset >>= 1) {
      const R other = shuffle_xor(acc, offset);
      acc = (lane & offset) ? combine(other, acc) : combine(acc, other);
    }
    sync();
    return acc;
  }
  template <typename R, typename V, typename C>
  R reduce(int32_t n, R acc, V&& visit, C&& combine) const {
    sync();
    for (int32_t k = lane; k < n; k += kWarpLanes) acc = combine.fold(acc, visit(k));
    return butterfly(acc, combine);
  }
  template <typename R, typename V, typename C>
  R reduce_grid(int32_t nr, int32_t nc, R acc, V&& visit, C&& combine) const {
    sync();
    const int64_t total = int64_t(nr) * nc;
    stellar::GridWalk at(lane, nc);
    for (int64_t e = lane; e < total; e += kWarpLanes, at.step(nc)) {
      acc = combine.fold(acc, visit(at.i, at.j));
    }
    return butterfly(acc, combine);
  }
};

struct Problem {
  int32_t nr, nc;
  bool maximize;
  std::vector<float> cost;
};

int32_t solve_serial(const Problem& p, std::vector<int64_t>& out) {
  std::vector<uint8_t> scratch(stellar::assign_layout<double>(p.nr, p.nc, sizeof(float)).total);
  out.assign(p.nr, -1);
  return stellar::load_and_solve<stellar::SerialTeam, float, double, float, int64_t>(
      stellar::SerialTeam{}, p.cost.data(), p.nc, 1, p.nr, p.nc, p.maximize, scratch.data(), true,
      out.data());
}

// cost_in_scratch = false reads the cost in place, as the kernel's global-memory paths do.
int32_t solve_threaded(const Problem& p, bool cost_in_scratch, std::vector<int64_t>& out) {
  const int64_t bytes =
      stellar::assign_layout<double>(p.nr, p.nc, cost_in_scratch ? sizeof(float) : 0).total;
  std::vector<uint8_t> scratch(bytes);
  std::vector<float> negated(p.cost);
  if (!cost_in_scratch && p.maximize) {
    for (float& c : negated) c = -c;
  }
  out.assign(p.nr, -1);
  Shared shared;
  pthread_barrier_init(&shared.barrier, nullptr, kWarpLanes);
  std::vector<int32_t> status(kWarpLanes);
  std::vector<std::thread> lanes;
  for (int lane = 0; lane < kWarpLanes; ++lane) {
    lanes.emplace_back([&, lane] {
      const ThreadedWarpTeam team{lane, &shared};
      status[lane] = stellar::load_and_solve<ThreadedWarpTeam, float, double, float, int64_t>(
          team, negated.data(), p.nc, 1, p.nr, p.nc, cost_in_scratch && p.maximize,
          scratch.data(), cost_in_scratch, out.data());
    });
  }
  for (auto& t : lanes) t.join();
  pthread_barrier_destroy(&shared.barrier);
  for (int lane = 1; lane < kWarpLanes; ++lane) {
    if (status[lane] != status[0]) {
      std::fprintf(stderr, "lanes returned different status codes\n");
      std::exit(3);
    }
  }
  return status[0];
}

}  // namespace

int main(int argc, char** argv) {
  const unsigned seed = argc > 1 ? static_cast<unsigned>(std::strtoul(argv[1], nullptr, 10)) : 1;
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  std::vector<Problem> problems;
  auto add = [&](int32_t nr, int32_t nc, bool maximize, int kind) {
    Problem p{nr, nc, maximize, std::vector<float>(size_t(nr) * nc)};
    for (float& c : p.cost) {
      c = kind == 1 ? std::floor(uniform(gen) * 3.0f) : uniform(gen);
      if (kind == 2 && uniform(gen) < 0.35f) c = maximize ? -INFINITY : INFINITY;
    }
    if (kind == 3) {  // nobody may take column 1: infeasible
      for (int32_t i = 0; i < nr; ++i) p.cost[size_t(i) * nc + 1] = INFINITY;
    }
    problems.push_back(std::move(p));
  };
  add(16, 16, false, 0);  // Jonker-Volgenant start, then searches
  add(16, 16, true, 0);
  add(8, 8, false, 1);  // ties
  add(5, 9, false, 2);  // rectangular, forbidden pairs, grid walk with nc < 32
  add(12, 12, true, 2);
  add(3, 3, false, 2);
  add(6, 6, false, 3);
  add(37, 45, false, 0);  // lanes with two columns each
  add(40, 40, false, 1);
  int failures = 0;
  for (size_t n = 0; n < problems.size(); ++n) {
    const Problem& p = problems[n];
    std::vector<int64_t> serial, threaded;
    const int32_t s = solve_serial(p, serial);
    for (const bool cost_in_scratch : {true, false}) {
      const int32_t t = solve_threaded(p, cost_in_scratch, threaded);
      const bool same = s == t && serial == threaded;
      std::printf("problem %zu (%d x %d, maximize %d, cost in scratch %d): status %d, %s\n", n,
                  p.nr, p.nc, int(p.maximize), int(cost_in_scratch), int(t),
                  same ? "same as serial" : "DIFFERENT");
      failures += !same;
    }
  }
  return failures == 0 ? 0 : 1;
}
