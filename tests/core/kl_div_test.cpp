// kl_div: the fast function against the reference on random shapes (0-d to 4-d), dtypes,
// layouts, reductions and log_target, with zero targets (and -inf inputs under them).
#include "test_support.hpp"

namespace softce_test {
namespace {

using softce::reduction;
namespace ref = softce::reference;

const dtype float_types[] = {dtype::float32, dtype::float64, dtype::bfloat16, dtype::float16};

shape_t random_elementwise_shape(std::mt19937_64& rng) {
  const std::int64_t sizes[] = {0, 1, 2, 3, 5, 16, 33};
  switch (rng() % 6) {
    case 0: return {};
    case 1: return {sizes[rng() % 7] * 7};
    case 2: return {sizes[rng() % 7], sizes[1 + rng() % 6] * 5};
    case 3: return {sizes[rng() % 7], 3, sizes[1 + rng() % 6]};
    case 4: return {2, sizes[rng() % 7], 2, 9};
    default: return {1 + static_cast<std::int64_t>(rng() % 4), 1000 + static_cast<std::int64_t>(rng() % 9000)};
  }
}

void run_random_case(std::mt19937_64& rng, shape_t shape, std::optional<dtype> forced_type = {}) {
  const dtype type = forced_type ? *forced_type : float_types[rng() % 4];
  const int ndim = static_cast<int>(shape.size());
  const std::int64_t n = product(shape);
  softce::kl_div_options o;
  const reduction reductions[] = {reduction::none, reduction::mean, reduction::sum, reduction::batchmean};
  o.reduce = reductions[rng() % 4];
  o.log_target = rng() % 2;

  // input: log-probabilities (random negative values), target: probabilities with zeros
  std::vector<double> x = uniform_values(rng, n, -6.0, 0.0);
  std::vector<double> t = uniform_values(rng, n, 0.0, 1.0);
  const bool with_zeros = rng() % 2;
  const bool with_neg_inf = with_zeros && rng() % 2;
  for (std::int64_t i = 0; i < n; ++i) {
    if (with_zeros && rng() % 3 == 0) {
      t[i] = 0;
      if (with_neg_inf && rng() % 2) x[i] = -inf;  // 0 * -inf contributes 0, not NaN
    }
    if (o.log_target) t[i] = std::log(t[i]);  // log 0 = -inf
  }
  const tensor input = make_tensor(shape, type, x, random_layout(rng, ndim));
  const tensor target = make_tensor(shape, rng() % 3 ? type : float_types[rng() % 4], t, random_layout(rng, ndim));
  const output_request req = random_outputs(rng, input, o.reduce == reduction::none, shape);
  SCOPED_TRACE("kl_div input " + input.describe() + " target " + target.describe() + " reduction " +
               reduction_text(o.reduce) + (o.log_target ? " log_target" : "") + (with_zeros ? " zeros" : "") +
               (with_neg_inf ? " -inf" : "") + req.describe());
  const array_view tv = target.view();
  expect_matches_reference(
      [=](const array_view& in, const softce::outputs& out) { return softce::kl_div(in, tv, o, out); },
      [=](const array_view& in, const softce::outputs& out) { return ref::kl_div(in, tv, o, out); }, input, req);
}

TEST(KlDiv, MatchesReference) {
  std::mt19937_64 rng(401);
  for (int i = 0; i < 300; ++i) run_random_case(rng, random_elementwise_shape(rng));
}

TEST(KlDiv, LongRowsMatchReference) {
  std::mt19937_64 rng(402);
  run_random_case(rng, {2, 300000}, dtype::float32);
  run_random_case(rng, {1, 262147}, dtype::float64);
  run_random_case(rng, {300001}, dtype::bfloat16);
}

TEST(KlDiv, ZeroTargetUnderNegativeInfinityInputContributesZero) {
  // torch gives NaN here; softce gives 0 (semantics.md).
  for (dtype type : float_types)
    for (bool log_target : {false, true}) {
      const tensor x = make_tensor({4}, type, {-inf, -1.0, -inf, -0.5});
      const tensor t = make_tensor({4}, type, log_target ? std::vector<double>{-inf, std::log(0.25), -inf, std::log(0.75)}
                                                          : std::vector<double>{0.0, 0.25, 0.0, 0.75});
      softce::kl_div_options o;
      o.log_target = log_target;
      o.reduce = reduction::sum;
      tensor g({4}, dtype::float64);
      softce::outputs out;
      out.grad = g.mutable_view();
      const double loss = softce::kl_div(x.view(), t.view(), o, out);
      // 0.25 (log 0.25 + 1) + 0.75 (log 0.75 + 0.5) on the values as stored in `type`
      EXPECT_TRUE(loss_near(loss, ref::kl_div(x.view(), t.view(), o), loss_tolerance(type))) << name_of(type);
      EXPECT_TRUE(std::isfinite(loss));
      EXPECT_FALSE(has_nan(g.values()));
      EXPECT_EQ(g.values()[0], 0.0);
      EXPECT_EQ(g.values()[2], 0.0);
    }
}

TEST(KlDiv, NegativeTargetGivesNaN) {
  const tensor x = make_tensor({2}, dtype::float64, {-1.0, -1.0});
  const tensor t = make_tensor({2}, dtype::float64, {-0.5, 0.5});
  softce::kl_div_options o;
  o.reduce = reduction::sum;
  EXPECT_TRUE(std::isnan(softce::kl_div(x.view(), t.view(), o)));
}

TEST(KlDiv, ReductionDenominators) {
  // mean divides by numel, batchmean by size(0), and a 0-d input's batchmean is its sum.
  std::mt19937_64 rng(403);
  const shape_t shape{3, 4, 5};
  const tensor x = make_tensor(shape, dtype::float64, uniform_values(rng, 60, -3.0, 0.0));
  const tensor t = make_tensor(shape, dtype::float64, uniform_values(rng, 60, 0.0, 1.0));
  softce::kl_div_options o;
  o.reduce = reduction::sum;
  const double sum = softce::kl_div(x.view(), t.view(), o);
  o.reduce = reduction::mean;
  EXPECT_NEAR(softce::kl_div(x.view(), t.view(), o), sum / 60, 1e-14);
  o.reduce = reduction::batchmean;
  EXPECT_NEAR(softce::kl_div(x.view(), t.view(), o), sum / 3, 1e-14);

  const tensor x0 = make_tensor({}, dtype::float64, {-2.0});
  const tensor t0 = make_tensor({}, dtype::float64, {0.5});
  EXPECT_NEAR(softce::kl_div(x0.view(), t0.view(), o), 0.5 * (std::log(0.5) + 2.0), 1e-15);
}

}  // namespace
}  // namespace softce_test
