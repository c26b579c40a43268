// C++ micro-benchmarks of every softce kernel path, through the public API.
//
// Each benchmark reports two rates:
//   bytes_per_second  the unavoidable memory traffic of the call (read the logits and the
//                     targets once, write the gradient once) divided by the time;
//   of_triad          that rate as a fraction of the triad bandwidth a[i] = b[i] + s c[i]
//                     (2 reads + 1 write, arrays far bigger than L3) measured in the same
//                     process with the same thread count: the physical bound.
// Unavoidable bytes per element (float32): dense soft CE, distillation, kl_div, BCE 12
// (x, t, g); index and top-k CE 8 (x, g); bfloat16 dense soft CE 6.
//
// Argument /threads:N is softce::set_num_threads(N); /inplace:1 writes the gradient over
// the logits (in-place backward), /inplace:0 into a separate, preallocated buffer. The
// buffers are created once per shape and reused, so page faults are not timed (bench.py
// measures whole calls, allocations included).
//
//   softce_bench --benchmark_filter=dense_ce --benchmark_repetitions=5
//                --benchmark_report_aggregates_only=true
#include <softce/softce.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------
// data

struct rng {
  std::uint64_t s;
  std::uint64_t next() {  // splitmix64
    std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  float uniform() { return static_cast<float>(next() >> 40) * (1.0f / 16777216.0f); }
  float normal() {  // sum of uniforms: cheap, good enough for logits
    float s = 0;
    for (int i = 0; i < 4; ++i) s += uniform();
    return (s - 2.0f) * 1.7320508f;
  }
};

std::uint16_t to_bf16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  return static_cast<std::uint16_t>(u >> 16);
}

std::vector<float> logits(std::int64_t n, std::uint64_t seed, float scale = 2.0f) {
  std::vector<float> v(static_cast<std::size_t>(n));
  rng r{seed};
  for (auto& x : v) x = scale * r.normal();
  return v;
}

// Rows of a softmax-like distribution (positive, each row sums to 1).
std::vector<float> probabilities(std::int64_t rows, std::int64_t C, std::uint64_t seed) {
  std::vector<float> v(static_cast<std::size_t>(rows * C));
  rng r{seed};
  for (std::int64_t i = 0; i < rows; ++i) {
    float* p = v.data() + i * C;
    double s = 0;
    for (std::int64_t c = 0; c < C; ++c) s += (p[c] = std::exp(2.0f * r.normal()));
    for (std::int64_t c = 0; c < C; ++c) p[c] = static_cast<float>(p[c] / s);
  }
  return v;
}

// One set of buffers per case, built on first use and kept for the whole run.
struct data {
  std::vector<float> x, t, g, x_pristine;
  std::vector<std::int64_t> y;          // class indices
  std::vector<std::int64_t> idx;        // top-k indices (N, K)
  std::vector<float> val;               // top-k values (N, K)
  std::vector<std::uint16_t> xb, tb, gb;  // bfloat16
};

data& cached(const std::string& key, const std::function<void(data&)>& build) {
  static std::map<std::string, std::unique_ptr<data>> cache;
  auto& slot = cache[key];
  if (!slot) {
    slot = std::make_unique<data>();
    build(*slot);
  }
  return *slot;
}

// ---------------------------------------------------------------------------------------
// the triad bound

// One triad over [0, n) split across `threads` threads. The clock starts when every thread
// is running (spin barrier), so thread creation is not timed.
double triad_seconds(float* a, const float* b, const float* c, std::int64_t n, int threads) {
  const float s = 3.0f;
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  auto part = [&](int k) {
    const std::int64_t begin = n * k / threads, end = n * (k + 1) / threads;
    float* __restrict pa = a;
    const float* __restrict pb = b;
    const float* __restrict pc = c;
    for (std::int64_t i = begin; i < end; ++i) pa[i] = pb[i] + s * pc[i];
  };
  std::vector<std::thread> pool;
  for (int k = 1; k < threads; ++k)
    pool.emplace_back([&, k] {
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) {
      }
      part(k);
    });
  while (ready.load() < threads - 1) {
  }
  const auto t0 = std::chrono::steady_clock::now();
  go.store(true, std::memory_order_release);
  part(0);
  for (auto& th : pool) th.join();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

constexpr std::int64_t kTriadElements = std::int64_t{32} << 20;  // 128 MiB per array

struct triad_arrays {
  std::unique_ptr<float[]> a, b, c;
  triad_arrays() : a(new float[kTriadElements]), b(new float[kTriadElements]), c(new float[kTriadElements]) {
    // random contents: pages of equal content could be merged or compressed behind our back
    rng r{99};
    for (std::int64_t i = 0; i < kTriadElements; ++i) a[i] = r.uniform(), b[i] = r.uniform(), c[i] = r.uniform();
  }
};

triad_arrays& triad_data() {
  static triad_arrays arrays;
  return arrays;
}

// Median triad bandwidth in bytes/s (12 bytes per element), measured once per thread count.
double triad_bandwidth(int threads) {
  static std::map<int, double> measured;
  auto it = measured.find(threads);
  if (it != measured.end()) return it->second;
  auto& d = triad_data();
  std::vector<double> times;
  triad_seconds(d.a.get(), d.b.get(), d.c.get(), kTriadElements, threads);  // warm-up
  for (int rep = 0; rep < 9; ++rep)
    times.push_back(triad_seconds(d.a.get(), d.b.get(), d.c.get(), kTriadElements, threads));
  std::nth_element(times.begin(), times.begin() + 4, times.end());
  const double bw = 12.0 * static_cast<double>(kTriadElements) / times[4];
  measured[threads] = bw;
  return bw;
}

void BM_triad(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  auto& d = triad_data();
  for (auto _ : state) {
    const double s = triad_seconds(d.a.get(), d.b.get(), d.c.get(), kTriadElements, threads);
    state.SetIterationTime(s);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * 12 * kTriadElements);
}

// Sets the rate counters of a loss benchmark: `bytes` unavoidable bytes per call.
void set_counters(benchmark::State& state, double bytes, int threads) {
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes * static_cast<double>(state.iterations())));
  state.counters["of_triad"] = benchmark::Counter(
      bytes * static_cast<double>(state.iterations()) / triad_bandwidth(threads), benchmark::Counter::kIsRate);
}

// ---------------------------------------------------------------------------------------
// the cases

struct shape {
  std::int64_t N, C;
  std::string key() const { return std::to_string(N) + "x" + std::to_string(C); }
};

// Dense probability targets (float32): 12 B per element.
void dense_ce(benchmark::State& state, shape s) {
  const int threads = static_cast<int>(state.range(0));
  const bool inplace = state.range(1) != 0;
  softce::set_num_threads(threads);
  data& d = cached("dense" + s.key(), [&](data& d) {
    d.x = logits(s.N * s.C, 1);
    d.t = probabilities(s.N, s.C, 2);
    d.g.assign(d.x.size(), 0.0f);
  });
  const auto x = softce::view(d.x.data(), {s.N, s.C});
  const auto t = softce::view(static_cast<const float*>(d.t.data()), {s.N, s.C});
  softce::outputs out;
  out.grad = softce::view(inplace ? d.x.data() : d.g.data(), {s.N, s.C});
  for (auto _ : state) benchmark::DoNotOptimize(softce::cross_entropy(x, t, {}, out));
  set_counters(state, 12.0 * static_cast<double>(s.N * s.C), threads);
}

// Class-index targets: 8 B per element.
void run_index_ce(benchmark::State& state, shape s, bool inplace) {
  const int threads = static_cast<int>(state.range(0));
  softce::set_num_threads(threads);
  data& d = cached("index" + s.key(), [&](data& d) {
    d.x = logits(s.N * s.C, 3);
    d.g.assign(d.x.size(), 0.0f);
    rng r{4};
    d.y.resize(static_cast<std::size_t>(s.N));
    for (auto& v : d.y) v = static_cast<std::int64_t>(r.next() % static_cast<std::uint64_t>(s.C));
  });
  const auto x = softce::view(d.x.data(), {s.N, s.C});
  const auto y = softce::view(static_cast<const std::int64_t*>(d.y.data()), {s.N});
  softce::outputs out;
  out.grad = softce::view(inplace ? d.x.data() : d.g.data(), {s.N, s.C});
  for (auto _ : state) benchmark::DoNotOptimize(softce::cross_entropy(x, y, {}, out));
  set_counters(state, 8.0 * static_cast<double>(s.N * s.C), threads);
}

void index_ce(benchmark::State& state, shape s) { run_index_ce(state, s, state.range(1) != 0); }

// Top-k targets (K = 64): 8 B per element (the k entries are negligible).
void topk_ce(benchmark::State& state, shape s, bool tail) {
  const int threads = static_cast<int>(state.range(0));
  const bool inplace = state.range(1) != 0;
  constexpr std::int64_t K = 64;
  softce::set_num_threads(threads);
  data& d = cached("topk" + s.key(), [&](data& d) {
    d.x = logits(s.N * s.C, 5);
    d.g.assign(d.x.size(), 0.0f);
    rng r{6};
    d.idx.resize(static_cast<std::size_t>(s.N * K));
    d.val.resize(static_cast<std::size_t>(s.N * K));
    std::vector<std::int64_t> perm(static_cast<std::size_t>(s.C));
    for (std::int64_t n = 0; n < s.N; ++n) {
      // K distinct classes: a partial Fisher-Yates shuffle
      std::iota(perm.begin(), perm.end(), 0);
      double sum = 0;
      for (std::int64_t k = 0; k < K; ++k) {
        const std::int64_t j = k + static_cast<std::int64_t>(r.next() % static_cast<std::uint64_t>(s.C - k));
        std::swap(perm[static_cast<std::size_t>(k)], perm[static_cast<std::size_t>(j)]);
        d.idx[static_cast<std::size_t>(n * K + k)] = perm[static_cast<std::size_t>(k)];
        sum += (d.val[static_cast<std::size_t>(n * K + k)] = std::exp(2.0f * r.normal()));
      }
      for (std::int64_t k = 0; k < K; ++k)  // 95 % of the mass in the top k
        d.val[static_cast<std::size_t>(n * K + k)] = static_cast<float>(0.95 * d.val[static_cast<std::size_t>(n * K + k)] / sum);
    }
  });
  const auto x = softce::view(d.x.data(), {s.N, s.C});
  softce::topk target{softce::view(static_cast<const std::int64_t*>(d.idx.data()), {s.N, K}),
                      softce::view(static_cast<const float*>(d.val.data()), {s.N, K}), tail};
  softce::outputs out;
  out.grad = softce::view(inplace ? d.x.data() : d.g.data(), {s.N, s.C});
  for (auto _ : state) benchmark::DoNotOptimize(softce::cross_entropy(x, target, {}, out));
  set_counters(state, 8.0 * static_cast<double>(s.N * s.C), threads);
}

// Distillation from dense teacher logits: 12 B per element (student, teacher, gradient).
void distill(benchmark::State& state, shape s, softce::divergence kind) {
  const int threads = static_cast<int>(state.range(0));
  const bool inplace = state.range(1) != 0;
  softce::set_num_threads(threads);
  data& d = cached("distill" + s.key(), [&](data& d) {
    d.x = logits(s.N * s.C, 7);
    d.t = logits(s.N * s.C, 8);
    d.g.assign(d.x.size(), 0.0f);
  });
  const auto x = softce::view(d.x.data(), {s.N, s.C});
  const auto z = softce::view(static_cast<const float*>(d.t.data()), {s.N, s.C});
  softce::distillation_options opt;
  opt.temperature = 2.0;
  opt.kind = kind;
  opt.beta = 0.5;
  softce::outputs out;
  out.grad = softce::view(inplace ? d.x.data() : d.g.data(), {s.N, s.C});
  for (auto _ : state) benchmark::DoNotOptimize(softce::distillation_loss(x, z, opt, out));
  set_counters(state, 12.0 * static_cast<double>(s.N * s.C), threads);
}

// Element-wise BCE with logits, soft targets: 12 B per element.
void bce(benchmark::State& state, shape s) {
  const int threads = static_cast<int>(state.range(0));
  const bool inplace = state.range(1) != 0;
  softce::set_num_threads(threads);
  data& d = cached("bce" + s.key(), [&](data& d) {
    d.x = logits(s.N * s.C, 9);
    d.t.resize(d.x.size());
    rng r{10};
    for (auto& v : d.t) v = r.uniform();
    d.g.assign(d.x.size(), 0.0f);
  });
  const auto x = softce::view(d.x.data(), {s.N, s.C});
  const auto t = softce::view(static_cast<const float*>(d.t.data()), {s.N, s.C});
  softce::outputs out;
  out.grad = softce::view(inplace ? d.x.data() : d.g.data(), {s.N, s.C});
  for (auto _ : state) benchmark::DoNotOptimize(softce::binary_cross_entropy_with_logits(x, t, {}, out));
  set_counters(state, 12.0 * static_cast<double>(s.N * s.C), threads);
}

// kl_div on log-probabilities: 12 B per element.
void kl_div(benchmark::State& state, shape s) {
  const int threads = static_cast<int>(state.range(0));
  const bool inplace = state.range(1) != 0;
  softce::set_num_threads(threads);
  data& d = cached("kldiv" + s.key(), [&](data& d) {
    d.x = logits(s.N * s.C, 11, 1.0f);
    for (auto& v : d.x) v = -std::abs(v) - 10.0f;  // log-probability-like
    d.t = probabilities(s.N, s.C, 12);
    d.g.assign(d.x.size(), 0.0f);
  });
  const auto x = softce::view(d.x.data(), {s.N, s.C});
  const auto t = softce::view(static_cast<const float*>(d.t.data()), {s.N, s.C});
  softce::kl_div_options opt;
  opt.reduce = softce::reduction::batchmean;
  softce::outputs out;
  out.grad = softce::view(inplace ? d.x.data() : d.g.data(), {s.N, s.C});
  for (auto _ : state) benchmark::DoNotOptimize(softce::kl_div(x, t, opt, out));
  set_counters(state, 12.0 * static_cast<double>(s.N * s.C), threads);
}

// bfloat16 logits and targets, gradient in bfloat16: 6 B per element.
void dense_ce_bf16(benchmark::State& state, shape s) {
  const int threads = static_cast<int>(state.range(0));
  const bool inplace = state.range(1) != 0;
  softce::set_num_threads(threads);
  data& d = cached("bf16" + s.key(), [&](data& d) {
    const auto x = logits(s.N * s.C, 13);
    const auto t = probabilities(s.N, s.C, 14);
    d.xb.resize(x.size());
    d.tb.resize(t.size());
    for (std::size_t i = 0; i < x.size(); ++i) d.xb[i] = to_bf16(x[i]), d.tb[i] = to_bf16(t[i]);
    d.gb.assign(x.size(), 0);
  });
  auto* xp = reinterpret_cast<softce::bfloat16*>(d.xb.data());
  auto* tp = reinterpret_cast<const softce::bfloat16*>(d.tb.data());
  auto* gp = reinterpret_cast<softce::bfloat16*>(d.gb.data());
  const auto x = softce::view(static_cast<const softce::bfloat16*>(xp), {s.N, s.C});
  const auto t = softce::view(tp, {s.N, s.C});
  softce::outputs out;
  out.grad = softce::view(inplace ? xp : gp, {s.N, s.C});
  for (auto _ : state) benchmark::DoNotOptimize(softce::cross_entropy(x, t, {}, out));
  set_counters(state, 6.0 * static_cast<double>(s.N * s.C), threads);
}

// Small calls: the time per call is the per-call overhead plus a little work.
void small_ce(benchmark::State& state, shape s) {
  const int threads = static_cast<int>(state.range(0));
  softce::set_num_threads(threads);
  data& d = cached("small" + s.key(), [&](data& d) {
    d.x = logits(s.N * s.C, 15);
    d.t = probabilities(s.N, s.C, 16);
    d.g.assign(d.x.size(), 0.0f);
  });
  const auto x = softce::view(static_cast<const float*>(d.x.data()), {s.N, s.C});
  const auto t = softce::view(static_cast<const float*>(d.t.data()), {s.N, s.C});
  softce::outputs out;
  out.grad = softce::view(d.g.data(), {s.N, s.C});
  for (auto _ : state) benchmark::DoNotOptimize(softce::cross_entropy(x, t, {}, out));
  set_counters(state, 12.0 * static_cast<double>(s.N * s.C), threads);
}

// The same with class indices (a kept gradient buffer, as small_ce).
void small_index_ce(benchmark::State& state, shape s) { run_index_ce(state, s, false); }

template <class Fn>
void add(const std::string& name, Fn fn, bool inplace_arg = true) {
  auto* b = benchmark::RegisterBenchmark(name.c_str(), fn);
  if (inplace_arg) {
    b->ArgNames({"threads", "inplace"});
    for (int threads : {1, 2})
      for (int inplace : {1, 0}) b->Args({threads, inplace});
  } else {
    b->ArgNames({"threads"});
    for (int threads : {1, 2}) b->Args({threads});
  }
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  benchmark::AddCustomContext("simd_target", softce::simd_target());
  benchmark::RegisterBenchmark("triad_128MiB", BM_triad)
      ->ArgNames({"threads"})
      ->Arg(1)
      ->Arg(2)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
  for (shape s : {shape{4096, 1000}, shape{1024, 32000}, shape{128, 128256}})
    add("dense_ce/" + s.key(), [s](benchmark::State& st) { dense_ce(st, s); });
  add("index_ce/1024x32000", [](benchmark::State& st) { index_ce(st, {1024, 32000}); });
  add("topk64_ce/256x128256", [](benchmark::State& st) { topk_ce(st, {256, 128256}, false); });
  add("topk64_tail_ce/256x128256", [](benchmark::State& st) { topk_ce(st, {256, 128256}, true); });
  add("distill_kl_T2/1024x32000", [](benchmark::State& st) { distill(st, {1024, 32000}, softce::divergence::kl); });
  add("distill_reverse_kl_T2/1024x32000",
      [](benchmark::State& st) { distill(st, {1024, 32000}, softce::divergence::reverse_kl); });
  add("distill_jsd/1024x32000", [](benchmark::State& st) { distill(st, {1024, 32000}, softce::divergence::jsd); });
  add("bce/4096x1000", [](benchmark::State& st) { bce(st, {4096, 1000}); });
  add("kl_div/1024x32000", [](benchmark::State& st) { kl_div(st, {1024, 32000}); });
  add("dense_ce_bf16/1024x32000", [](benchmark::State& st) { dense_ce_bf16(st, {1024, 32000}); });
  // Long rows (N = 1 or 8, C = 4M or 1M: a retrieval head, a big vocabulary at batch 1): a
  // row is split into pieces across threads (kRowPiece in src/threading.hpp).
  for (shape s : {shape{1, 4194304}, shape{8, 1048576}}) {
    add("long_dense_ce/" + s.key(), [s](benchmark::State& st) { dense_ce(st, s); });
    add("long_index_ce/" + s.key(), [s](benchmark::State& st) { index_ce(st, s); });
    add("long_topk64_tail_ce/" + s.key(), [s](benchmark::State& st) { topk_ce(st, s, true); });
    add("long_distill_kl_T2/" + s.key(), [s](benchmark::State& st) { distill(st, s, softce::divergence::kl); });
  }
  // In-cache variants (one thread, the data fits in L2): the compute ceiling of each kernel,
  // to tell a compute-bound kernel from a memory-bound one.
  auto hot = [](const std::string& name, auto fn) {
    benchmark::RegisterBenchmark(("hot/" + name).c_str(), fn)
        ->ArgNames({"threads", "inplace"})
        ->Args({1, 1})
        ->Args({1, 0})
        ->UseRealTime()
        ->Unit(benchmark::kMicrosecond);
  };
  hot("dense_ce/2x32000", [](benchmark::State& st) { dense_ce(st, {2, 32000}); });
  hot("index_ce/2x32000", [](benchmark::State& st) { index_ce(st, {2, 32000}); });
  hot("topk64_ce/1x128256", [](benchmark::State& st) { topk_ce(st, {1, 128256}, false); });
  hot("topk64_tail_ce/1x128256", [](benchmark::State& st) { topk_ce(st, {1, 128256}, true); });
  hot("distill_kl_T2/2x32000", [](benchmark::State& st) { distill(st, {2, 32000}, softce::divergence::kl); });
  hot("distill_reverse_kl_T2/2x32000",
      [](benchmark::State& st) { distill(st, {2, 32000}, softce::divergence::reverse_kl); });
  hot("distill_jsd/2x32000", [](benchmark::State& st) { distill(st, {2, 32000}, softce::divergence::jsd); });
  hot("bce/64x1000", [](benchmark::State& st) { bce(st, {64, 1000}); });
  hot("dense_ce_bf16/2x32000", [](benchmark::State& st) { dense_ce_bf16(st, {2, 32000}); });
  for (shape s : {shape{64, 10}, shape{256, 1000}}) {
    auto* b = benchmark::RegisterBenchmark(("small_ce/" + s.key()).c_str(),
                                           [s](benchmark::State& st) { small_ce(st, s); });
    b->ArgNames({"threads"})->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMicrosecond);
    b = benchmark::RegisterBenchmark(("small_index_ce/" + s.key()).c_str(),
                                     [s](benchmark::State& st) { small_index_ce(st, s); });
    b->ArgNames({"threads"})->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMicrosecond);
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
