// The row kernels' exp and log, element by element, on every SIMD target this CPU runs,
// against float64 std::exp / std::log: the AVX-512 forms (ExpNonPositive with vscalefps,
// LogNormal without a division) must be as accurate as the generic ones, and keep the
// boundaries (exactly 0 below log(FLT_MIN) and at -inf, exactly 1 at 0, log 1 = 0).
// White-box: the kernels are reached through the kernel table (src/kernels.hpp).
#include <hwy/targets.h>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels.hpp"
#include "simd_targets.hpp"

namespace softce_test {
namespace {

using softce::detail::exp_cache;
using softce::detail::kChunk;
using softce::detail::kernels_for;
using softce::detail::row_normaliser;

constexpr double kUlp = 1.0 / (1 << 23);  // float's ulp at 1

// Logits in [-104, 0]: uniform, plus the edges of the reduction and the underflow cut.
std::vector<float> exp_arguments() {
  std::vector<float> v;
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<float> u(-104.0f, 0.0f);
  for (int i = 0; i < 200000; ++i) v.push_back(u(rng));
  for (int k = -126; k <= 0; ++k)  // x log2(e) near k and near k + 1/2 (the rounding ties)
    for (double half : {0.0, 0.5})
      for (double eps : {-2e-6, -1e-7, 0.0, 1e-7, 2e-6})
        v.push_back(static_cast<float>((k + half + eps) * std::log(2.0)));
  for (float x : {-87.3365402f, -87.3365479f, -87.33654f, -87.0f, -1e-30f, -0.0f, 0.0f, -1e-7f,
                  -std::numeric_limits<float>::infinity()})
    v.push_back(x);
  std::vector<float> kept;
  for (float x : v)
    if (x <= 0.0f) kept.push_back(x);
  return kept;
}

TEST(Kernels, ExpMatchesFloat64OnEveryTarget) {
  restore_targets restore;
  const std::vector<float> args = exp_arguments();
  for (std::int64_t target : runnable_targets()) {
    hwy::SetSupportedTargetsForTest(target);
    SCOPED_TRACE(hwy::TargetName(target));
    const auto& k = kernels_for<float>();
    // slices of kChunk - 1 arguments and a 0 (the chunk's max, so shift = 0 and e = exp(x))
    double worst = 0.0;
    for (std::size_t begin = 0; begin < args.size(); begin += kChunk - 1) {
      std::vector<float> x(args.begin() + static_cast<std::ptrdiff_t>(begin),
                           args.begin() + static_cast<std::ptrdiff_t>(std::min(args.size(), begin + kChunk - 1)));
      x.push_back(0.0f);
      std::vector<float> e(x.size()), shifts(1);
      k.softmax_row_stats(x.data(), static_cast<std::int64_t>(x.size()), 1.0f, exp_cache<float>{e.data(), shifts.data()});
      ASSERT_EQ(shifts[0], 0.0f);
      for (std::size_t i = 0; i < x.size(); ++i) {
        const double want = std::exp(static_cast<double>(x[i]));
        if (x[i] < -87.3365402f) {
          ASSERT_EQ(e[i], 0.0f) << "exp(" << x[i] << ") must be exactly 0 below log(FLT_MIN)";
          continue;
        }
        if (x[i] == 0.0f) {
          ASSERT_EQ(e[i], 1.0f);
        }
        if (want < std::numeric_limits<float>::min()) {
          // at the cut the result may be subnormal: within a subnormal step or two
          ASSERT_LE(std::fabs(e[i] - want), 2.0 * std::numeric_limits<float>::denorm_min() + 2 * kUlp * want) << x[i];
          continue;
        }
        const double rel = std::fabs(static_cast<double>(e[i]) - want) / want;
        worst = std::max(worst, rel);
        ASSERT_LE(rel, 2.0 * kUlp) << "exp(" << x[i] << ") = " << e[i] << ", float64 " << want;
      }
    }
    RecordProperty(std::string("exp_worst_ulp_") + hwy::TargetName(target), std::to_string(worst / kUlp));
  }
}

// log through the JSD pass: with x = z = 0, shift 0, log-sum 0 and cached exps p = q = m,
// its output log q - log m is -log m (the mixture 0.5 p + 0.5 q is m exactly).
TEST(Kernels, LogOfTheMixtureMatchesFloat64OnEveryTarget) {
  restore_targets restore;
  std::vector<float> m;
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<double> u(std::log(std::numeric_limits<float>::min()), 0.0);
  for (int i = 0; i < 100000; ++i) m.push_back(static_cast<float>(std::exp(u(rng))));
  for (int e = -126; e <= 0; ++e)  // around powers of two and the mantissa's sqrt(2) split
    for (double f : {1.0, 1.0000001, 1.41421, 1.4142135, 1.4142137, 1.41422, 1.9999999})
      if (std::ldexp(f, e) <= 1.0) m.push_back(static_cast<float>(std::ldexp(f, e)));
  for (int i = 1; i < 2000; ++i) m.push_back(1.0f - static_cast<float>(i) * 6e-8f);  // log near 0
  m.push_back(1.0f);
  m.push_back(std::numeric_limits<float>::min());
  for (std::int64_t target : runnable_targets()) {
    hwy::SetSupportedTargetsForTest(target);
    SCOPED_TRACE(hwy::TargetName(target));
    const auto& k = kernels_for<float>();
    const std::int64_t n = static_cast<std::int64_t>(m.size());
    std::vector<float> zeros(m.size(), 0.0f), q(m), p(m), ratio(m.size());
    std::vector<float> shifts(static_cast<std::size_t>((n + kChunk - 1) / kChunk), 0.0f);
    const row_normaliser<float> norm{0.0f, 0.0f};
    k.jsd_row_stats_cached(zeros.data(), zeros.data(), exp_cache<float>{q.data(), shifts.data()},
                           exp_cache<float>{p.data(), shifts.data()}, n, 1.0f, norm, norm, 0.5f, ratio.data());
    double worst = 0.0;
    for (std::size_t i = 0; i < m.size(); ++i) {
      const double want = -std::log(static_cast<double>(m[i]));
      if (m[i] == 1.0f) {
        ASSERT_EQ(ratio[i], 0.0f);
        continue;
      }
      const double rel = std::fabs(static_cast<double>(ratio[i]) - want) / std::fabs(want);
      worst = std::max(worst, rel);
      ASSERT_LE(rel, 2.0 * kUlp) << "log(" << m[i] << "): " << -ratio[i] << ", float64 " << -want;
    }
    RecordProperty(std::string("log_worst_ulp_") + hwy::TargetName(target), std::to_string(worst / kUlp));
  }
}


// The bfloat16 statistics pass's chunk max (AVX-512: on integer keys, 32 at a time) is the
// float max of the chunk: a wrong max would mostly hide behind softmax's shift invariance,
// so it is checked directly (target_stats.shift of a one-chunk slice), with mixed signs,
// signed zeros, subnormals, -inf and every length from 1 to 100 (partial vectors).
float bf16_value(std::uint16_t bits) {
  const std::uint32_t u = static_cast<std::uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

TEST(Kernels, Bfloat16ChunkMaxIsTheFloatMaxOnEveryTarget) {
  restore_targets restore;
  std::mt19937_64 rng(5);
  const std::vector<std::uint16_t> specials = {0x0000, 0x8000, 0x0001, 0x8001, 0xFF80, 0x7F7F, 0xFF7F, 0x3F80, 0xBF80};
  for (std::int64_t target : runnable_targets()) {
    hwy::SetSupportedTargetsForTest(target);
    SCOPED_TRACE(hwy::TargetName(target));
    const auto& half = softce::detail::kernels().half;
    for (int trial = 0; trial < 400; ++trial) {
      const std::size_t n = trial < 100 ? static_cast<std::size_t>(trial + 1) : 1 + rng() % kChunk;
      std::vector<std::uint16_t> x(n), t(n, 0);
      const bool all_negative = trial % 3 == 0;
      for (auto& v : x) {
        const std::uint64_t r = rng();
        v = r % 5 == 0 ? specials[(r >> 8) % specials.size()] : static_cast<std::uint16_t>((r >> 16) & 0x7F7F);
        if (all_negative || (r >> 40) % 2) v |= 0x8000;  // sign
      }
      float want = -std::numeric_limits<float>::infinity();
      for (auto v : x) want = std::max(want, bf16_value(v));
      const auto st = half.target_row_stats_bf16(x.data(), t.data(), static_cast<std::int64_t>(n), 1.0f, 0.0f,
                                                   exp_cache<float>{});
      ASSERT_EQ(st.shift, static_cast<double>(want)) << "n = " << n << ", trial " << trial;
    }
  }
}

}  // namespace
}  // namespace softce_test
