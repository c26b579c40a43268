// The harness shared by the MPI test programs (mpi_test.cpp, mpi_linear_test.cpp): the rank
// globals, `check` (which only records, so a failed check never skips the collectives that
// follow it), a splitmix64 stream that is the same on every rank, views over test arrays, the
// class splits, the error expectation and the start and the verdict of main.
#pragma once

#include <softce/mpi.hpp>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

namespace mpi_harness {

inline int g_rank = 0, g_size = 1;
// the reduce mode of the comparison cases: every case runs in both
inline softce::class_parallel::reduce_mode g_mode = softce::class_parallel::reduce_mode::ordered;
inline int g_checks = 0, g_failures = 0;
inline std::string g_case;

inline void check(bool ok, const std::string& what) {
  ++g_checks;
  if (ok) return;
  ++g_failures;
  if (g_failures <= 40) std::fprintf(stderr, "[rank %d] FAIL %s: %s\n", g_rank, g_case.c_str(), what.c_str());
}

// splitmix64: the same stream on every rank
struct rng {
  std::uint64_t state;
  explicit rng(std::uint64_t seed) : state(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1p-53; }
  std::int64_t below(std::int64_t n) { return static_cast<std::int64_t>(next() % static_cast<std::uint64_t>(n)); }
};

// A view of `data` with `shape`; row-major (contiguous) strides unless `strides` is given.
template <class Pointer>
softce::basic_view<Pointer> make_view(Pointer data, softce::dtype type, const std::vector<std::int64_t>& shape,
                                      std::vector<std::int64_t> strides = {}) {
  softce::basic_view<Pointer> v;
  v.data = data;
  v.type = type;
  v.ndim = static_cast<int>(shape.size());
  if (strides.empty()) {
    strides.assign(shape.size(), 1);
    for (int i = v.ndim - 2; i >= 0; --i) strides[i] = strides[i + 1] * shape[i + 1];
  }
  for (int i = 0; i < v.ndim; ++i) v.shape[i] = shape[i], v.strides[i] = strides[i];
  return v;
}

inline std::string num(double v) {
  char b[64];
  std::snprintf(b, sizeof b, "%.17g", v);
  return b;
}

// ---------------------------------------------------------------------------------------
// class splits (from_local: the skewed counts, through shard::from_local_classes)

enum class split_kind { even, skewed, from_local, empty_first };

inline std::vector<std::int64_t> split_counts(std::int64_t C, int P, split_kind kind) {
  std::vector<std::int64_t> counts(static_cast<std::size_t>(P));
  if (kind == split_kind::even || (kind == split_kind::empty_first && P == 1)) {
    for (int r = 0; r < P; ++r) counts[r] = C / P + (r < C % P ? 1 : 0);
  } else if (kind == split_kind::empty_first) {
    counts[0] = 0;
    for (int r = 1; r < P; ++r) counts[r] = C / (P - 1) + (r - 1 < C % (P - 1) ? 1 : 0);
  } else {  // rank r's share grows with r + 1
    const std::int64_t total = static_cast<std::int64_t>(P) * (P + 1) / 2;
    std::int64_t cum = 0;
    for (int r = 0; r < P; ++r) {
      const std::int64_t a = C * cum / total;
      cum += r + 1;
      counts[r] = C * cum / total - a;
    }
  }
  return counts;
}

// ---------------------------------------------------------------------------------------
// errors: the same softce::error on every rank

// Runs `call` (which must throw on every rank) and checks this rank's message and kind.
template <class Call>
void expect_error(const std::string& name, Call call, const std::string& want,
                  softce::error_kind kind = softce::error_kind::value) {
  g_case = name;
  std::string got = "(no error)";
  softce::error_kind got_kind = softce::error_kind::value;
  try {
    call();
  } catch (const softce::error& e) {
    got = e.what();
    got_kind = e.kind();
  } catch (const std::exception& e) {
    got = std::string("(not a softce::error) ") + e.what();
  }
  check(got == want, "message\n    got:  " + got + "\n    want: " + want);
  check(got_kind == kind, "error kind " + std::to_string(static_cast<int>(got_kind)));
}

// ---------------------------------------------------------------------------------------
// main's start and end

// MPI_Init_thread (funneled), the rank globals, one softce thread per rank (ranks share the
// cores); returns the start time.
inline std::chrono::steady_clock::time_point start(int& argc, char**& argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_size);
  softce::set_num_threads(1);  // ranks share the cores
  return std::chrono::steady_clock::now();
}

// The ranks agree on the verdict: rank 0 prints the totals; MPI_Finalize; the exit status.
inline int finish(const char* program, int cases, std::chrono::steady_clock::time_point started) {
  int failures = g_failures, total_failures = 0, total_checks = 0;
  MPI_Allreduce(&failures, &total_failures, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  MPI_Allreduce(&g_checks, &total_checks, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  if (g_rank == 0)
    std::printf("%s: %d ranks, %d comparison cases, %d checks, %d failures (%.2f s)\n", program, g_size, cases,
                total_checks, total_failures, seconds);
  MPI_Finalize();
  return total_failures == 0 ? 0 : 1;
}

}  // namespace mpi_harness
