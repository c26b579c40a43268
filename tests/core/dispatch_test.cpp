// Highway runtime dispatch: the best SIMD target present is chosen, and every target
// compiled in and supported by this CPU (AVX3 and AVX2 on this development machine, plus
// SSE4 and the scalar emulation) gives results that match the float64 reference.
#include <hwy/targets.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "blas.hpp"
#include "simd_targets.hpp"
#include "test_support.hpp"

namespace softce_test {
namespace {

using softce::divergence;
namespace ref = softce::reference;

TEST(Dispatch, PicksTheBestTargetPresent) {
  restore_targets restore;
  hwy::SetSupportedTargetsForTest(0);
  const std::vector<std::int64_t> targets = runnable_targets();
  ASSERT_FALSE(targets.empty());
  EXPECT_EQ(softce::simd_target(), hwy::TargetName(targets.front()));
}

// The BLAS (src/blas.hpp) runs the kernels of this CPU: Debian's OpenBLAS 0.3.21 left to
// itself picks its SSE3 "Prescott" kernels on CPUs it does not know (6.5x slower GEMMs on
// an AVX-512 Xeon); softce tells it which to use, then restores the environment.
TEST(Dispatch, BlasRunsTheKernelsOfThisCpu) {
  const char* user = std::getenv("OPENBLAS_CORETYPE");
  const std::string wanted = user ? std::string(user) : softce::detail::blas::core_for_this_cpu();
  // a product it must get right: C (2 x 2) = 2 · A (2 x 3) · Bᵀ (3 x 2) + C
  const float A[6] = {1, 2, 3, 4, 5, 6}, B[6] = {1, 0, -1, 2, 1, 0};
  float C[4] = {1, 1, 1, 1};
  softce::detail::blas::sgemm("test", false, true, 2, 2, 3, 2.0f, A, 3, B, 3, 1.0f, C, 2);
  EXPECT_EQ(C[0], 1 + 2 * (1 - 3)) << "row 0 . col 0";
  EXPECT_EQ(C[1], 1 + 2 * (2 + 2)) << "row 0 . col 1";
  EXPECT_EQ(C[2], 1 + 2 * (4 - 6)) << "row 1 . col 0";
  EXPECT_EQ(C[3], 1 + 2 * (8 + 5)) << "row 1 . col 1";
  const std::string loaded = softce::detail::blas::describe("test");
  if (!wanted.empty()) EXPECT_NE(loaded.find(wanted), std::string::npos) << loaded << " (wanted " << wanted << ")";
  if (wanted != "Prescott") EXPECT_EQ(loaded.find("Prescott"), std::string::npos) << loaded;
  // the environment is as the user left it
  const char* after = std::getenv("OPENBLAS_CORETYPE");
  EXPECT_EQ(after == nullptr, user == nullptr);
}

TEST(Dispatch, EveryTargetMatchesTheReference) {
  restore_targets restore;
  const std::vector<std::int64_t> targets = runnable_targets();
  // at least two vector targets are exercised wherever the CPU has AVX2
  EXPECT_GE(targets.size(), 2u);
  for (std::int64_t target : targets) {
    hwy::SetSupportedTargetsForTest(target);
    SCOPED_TRACE(hwy::TargetName(target));
    ASSERT_EQ(softce::simd_target(), hwy::TargetName(target));
    std::mt19937_64 rng(4242);
    for (dtype type : {dtype::float32, dtype::float64}) {
      // odd C: every kernel's partial-vector tail; C > kChunk: the chunk merge
      for (const shape_t& shape : {shape_t{5, 37}, shape_t{2, 3000}}) {
        SCOPED_TRACE(std::string(name_of(type)) + " " + std::to_string(shape[1]) + " classes");
        const std::int64_t n = product(shape);
        const tensor x = make_tensor(shape, type, normal_values(rng, n, 3.0));
        const tensor z = make_tensor(shape, type, normal_values(rng, n, 3.0));
        const tensor t = make_tensor(shape, type, probability_targets(rng, shape, target_rows::normalised));
        std::vector<std::int64_t> labels(static_cast<std::size_t>(shape[0]));
        for (std::size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<std::int64_t>(i * 7) % shape[1];
        const tensor y = make_index_tensor({shape[0]}, dtype::int64, labels);
        output_request req;
        req.grad = true;
        req.grad_type = type;
        softce::cross_entropy_options ce;
        ce.label_smoothing = 0.1;
        expect_matches_reference(
            [&](const array_view& in, const softce::outputs& o) { return softce::cross_entropy(in, t.view(), ce, o); },
            [&](const array_view& in, const softce::outputs& o) { return ref::cross_entropy(in, t.view(), ce, o); }, x, req);
        expect_matches_reference(
            [&](const array_view& in, const softce::outputs& o) { return softce::cross_entropy(in, y.view(), ce, o); },
            [&](const array_view& in, const softce::outputs& o) { return ref::cross_entropy(in, y.view(), ce, o); }, x, req);
        for (divergence kind : {divergence::kl, divergence::reverse_kl, divergence::jsd}) {
          softce::distillation_options d;
          d.kind = kind;
          d.temperature = 2.0;
          expect_matches_reference(
              [&](const array_view& in, const softce::outputs& o) { return softce::distillation_loss(in, z.view(), d, o); },
              [&](const array_view& in, const softce::outputs& o) { return ref::distillation_loss(in, z.view(), d, o); }, x,
              req, 1e-6);
        }
        expect_matches_reference(
            [&](const array_view& in, const softce::outputs& o) { return softce::binary_cross_entropy_with_logits(in, t.view(), {}, o); },
            [&](const array_view& in, const softce::outputs& o) { return ref::binary_cross_entropy_with_logits(in, t.view(), {}, o); },
            x, req);
      }
    }
  }
}

// bfloat16 soft targets read in place: every target rounds the gradient alike (the AVX3
// kernel rounds with AVX512-BF16's instruction where the CPU has it, which flushes
// subnormals: those lanes take the integer rule), so the gradients of all targets agree to
// one bfloat16 step (their float sums differ in the last bits), subnormals included.
TEST(Dispatch, Bfloat16GradientsAgreeOnEveryTargetIncludingSubnormals) {
  restore_targets restore;
  std::mt19937_64 rng(4243);
  const std::int64_t N = 3, C = 3000;
  const shape_t shape{N, C};
  std::vector<double> xv = normal_values(rng, N * C, 3.0), tv(static_cast<std::size_t>(N * C), 0.0);
  // row 1 spans [-100, 0]: q runs through the subnormal range
  for (std::int64_t c = 0; c < C; ++c) xv[static_cast<std::size_t>(C + c)] = -100.0 * static_cast<double>(c) / (C - 1);
  for (std::int64_t r = 0; r < N; ++r) {
    tv[static_cast<std::size_t>(r * C)] = 0.75;
    tv[static_cast<std::size_t>(r * C + 5)] = 0.25;
  }
  const tensor x = make_tensor(shape, dtype::bfloat16, xv), t = make_tensor(shape, dtype::bfloat16, tv);
  for (double smoothing : {0.0, 0.1}) {
    std::vector<double> first;
    for (std::int64_t target : runnable_targets()) {
      hwy::SetSupportedTargetsForTest(target);
      SCOPED_TRACE(std::string(hwy::TargetName(target)) + " smoothing " + std::to_string(smoothing));
      tensor g(shape, dtype::bfloat16);
      softce::outputs out;
      out.grad = g.mutable_view();
      softce::cross_entropy_options o;
      o.label_smoothing = smoothing;
      softce::cross_entropy(x.view(), t.view(), o, out);
      const std::vector<double> v = g.values();
      if (first.empty()) {
        first = v;
        std::int64_t subnormal = 0;
        for (double e : v) subnormal += e != 0.0 && std::fabs(e) < std::numeric_limits<float>::min();
        if (smoothing == 0.0) EXPECT_GT(subnormal, 0) << "no subnormal gradient exercised";
        continue;
      }
      std::int64_t differ = 0;
      for (std::size_t i = 0; i < v.size(); ++i)
        differ += !(std::fabs(v[i] - first[i]) <= std::ldexp(std::max(std::fabs(v[i]), std::fabs(first[i])), -7));
      EXPECT_EQ(differ, 0) << "elements differ from the best target's by more than one bfloat16 step";
    }
  }
}

}  // namespace
}  // namespace softce_test
