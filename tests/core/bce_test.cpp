// binary_cross_entropy_with_logits: the fast function against the reference on random
// shapes, dtypes, layouts, broadcast weight / pos_weight and reductions; extreme logits.
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

// A random shape broadcastable to `shape` (NumPy rules: right-aligned, 1 or the size).
shape_t broadcastable_to(std::mt19937_64& rng, const shape_t& shape) {
  const std::size_t keep = rng() % (shape.size() + 1);
  shape_t b(shape.end() - static_cast<std::ptrdiff_t>(keep), shape.end());
  for (auto& e : b)
    if (rng() % 2) e = 1;
  return b;
}

void run_random_case(std::mt19937_64& rng, shape_t shape, std::optional<dtype> forced_type = {}) {
  const dtype type = forced_type ? *forced_type : float_types[rng() % 4];
  const int ndim = static_cast<int>(shape.size());
  const std::int64_t n = product(shape);
  softce::bce_options o;
  const reduction reductions[] = {reduction::none, reduction::mean, reduction::sum};
  o.reduce = reductions[rng() % 3];
  std::string what = "bce";
  tensor weight, pos_weight;
  if (rng() % 2) {
    const shape_t ws = broadcastable_to(rng, shape);
    weight = make_tensor(ws, rng() % 2 ? type : float_types[rng() % 4], uniform_values(rng, product(ws), 0.0, 2.0),
                         random_layout(rng, static_cast<int>(ws.size())));
    o.weight = weight.view();
    what += " weight " + weight.describe();
  }
  if (rng() % 2) {
    const shape_t ps = broadcastable_to(rng, shape);
    pos_weight = make_tensor(ps, rng() % 2 ? type : float_types[rng() % 4],
                             uniform_values(rng, product(ps), 0.1, 4.0), random_layout(rng, static_cast<int>(ps.size())));
    o.pos_weight = pos_weight.view();
    what += " pos_weight " + pos_weight.describe();
  }
  const double scale = rng() % 3 == 0 ? 30.0 : 3.0;  // 30: saturated sigmoids
  const std::vector<double> x = normal_values(rng, n, scale);
  std::vector<double> t = uniform_values(rng, n, 0.0, 1.0);
  if (rng() % 2)
    for (auto& v : t) v = rng() % 3 == 0 ? 0.0 : rng() % 2 ? 1.0 : v;  // hard and soft labels
  const tensor input = make_tensor(shape, type, x, random_layout(rng, ndim));
  const tensor target = make_tensor(shape, rng() % 3 ? type : float_types[rng() % 4], t, random_layout(rng, ndim));
  const output_request req = random_outputs(rng, input, o.reduce == reduction::none, shape);
  SCOPED_TRACE(what + " input " + input.describe() + " target " + target.describe() + " reduction " +
               reduction_text(o.reduce) + " scale " + std::to_string(scale) + req.describe());
  const array_view tv = target.view();
  // gradient terms: coef w ((1 - t), lw (sigmoid - 1))
  const double max_w = o.weight ? max_abs(weight.values()) : 1.0;
  const double max_pw = o.pos_weight ? max_abs(pos_weight.values(), 1.0) : 1.0;
  const double terms = reduction_coef(o.reduce, static_cast<double>(n)) * max_w * (1 + max_pw);
  expect_matches_reference(
      [=](const array_view& in, const softce::outputs& out) {
        return softce::binary_cross_entropy_with_logits(in, tv, o, out);
      },
      [=](const array_view& in, const softce::outputs& out) { return ref::binary_cross_entropy_with_logits(in, tv, o, out); },
      input, req, compute_rtol(type) * terms);
}

TEST(BinaryCrossEntropyWithLogits, MatchesReference) {
  std::mt19937_64 rng(501);
  for (int i = 0; i < 300; ++i) run_random_case(rng, random_elementwise_shape(rng));
}

TEST(BinaryCrossEntropyWithLogits, LongRowsMatchReference) {
  std::mt19937_64 rng(502);
  run_random_case(rng, {2, 300000}, dtype::float32);
  run_random_case(rng, {1, 262147}, dtype::float64);
}

TEST(BinaryCrossEntropyWithLogits, ExtremeLogitsStayFinite) {
  // log1p(exp(-|x|)) + max(-x, 0): no overflow for |x| = 1e4, exact limits.
  for (dtype type : {dtype::float32, dtype::float64}) {
    const tensor x = make_tensor({4}, type, {1e4, -1e4, 1e4, -1e4});
    const tensor t = make_tensor({4}, type, {1.0, 0.0, 0.0, 1.0});
    softce::bce_options o;
    o.reduce = reduction::none;
    tensor losses({4}, dtype::float64), g({4}, dtype::float64);
    softce::outputs out;
    out.grad = g.mutable_view();
    out.losses = losses.mutable_view();
    const double total = softce::binary_cross_entropy_with_logits(x.view(), t.view(), o, out);
    EXPECT_EQ(total, 2e4) << name_of(type);
    const std::vector<double> l = losses.values(), gv = g.values();
    EXPECT_EQ(l[0], 0.0);
    EXPECT_EQ(l[1], 0.0);
    EXPECT_EQ(l[2], 1e4);
    EXPECT_EQ(l[3], 1e4);
    EXPECT_EQ(gv[0], 0.0);
    EXPECT_EQ(gv[1], 0.0);
    EXPECT_EQ(gv[2], 1.0);
    EXPECT_EQ(gv[3], -1.0);
  }
}

// Element by element in float32, against the formula in double: the loss
// a softplus(-x) + b softplus(x) (a = pos_weight t, b = 1 - t; from one exp, a reciprocal
// and log1p) within 4 ulp of itself, the gradient b sigma(x) - a sigma(-x) within 4 ulp of
// b sigma(x) + a sigma(-x) (its terms' size: the bound where the two cancel), over |x| <= 80
// and near 0, for hard and soft targets, with and without pos_weight. t = 0 at x << 0 is in:
// the loss is exp(x) there (x + softplus(-x) would give 0), the gradient sigma(x) (1 -
// sigma(-x) would give 0). A tolerance relative to the largest element would not see a
// wrong log1p of a tiny exp.
TEST(BinaryCrossEntropyWithLogits, Float32ElementsWithinFourUlp) {
  std::vector<double> xs;
  for (int i = -16000; i <= 16000; ++i) xs.push_back(static_cast<double>(static_cast<float>(i * 0.005)));
  for (int i = -200; i <= 200; ++i) xs.push_back(static_cast<double>(static_cast<float>(i * 1e-6)));
  const std::int64_t n = static_cast<std::int64_t>(xs.size());
  const tensor x = make_tensor({n}, dtype::float32, xs);
  const std::pair<double, double> cases[] = {{0.0, 1.0}, {1.0, 1.0}, {0.3, 1.0}, {0.0, 2.5}, {1.0, 2.5}, {0.3, 2.5}};
  for (const auto& [t_value, pw_value] : cases) {
    const bool pos_weighted = pw_value != 1.0;
    SCOPED_TRACE("t = " + std::to_string(t_value) + (pos_weighted ? " pos_weight " + std::to_string(pw_value) : ""));
    const tensor t = make_tensor({n}, dtype::float32, std::vector<double>(xs.size(), t_value));
    const tensor pos_weight = make_tensor({1}, dtype::float32, {pw_value});
    softce::bce_options o;
    if (pos_weighted) o.pos_weight = pos_weight.view();
    o.reduce = reduction::sum;  // d loss / d x_i is the element's own gradient
    tensor losses({n}, dtype::float32), g({n}, dtype::float32);
    softce::outputs out;
    out.grad = g.mutable_view();
    softce::bce_options none = o;
    none.reduce = reduction::none;
    softce::outputs out_losses;
    out_losses.losses = losses.mutable_view();
    softce::binary_cross_entropy_with_logits(x.view(), t.view(), o, out);
    softce::binary_cross_entropy_with_logits(x.view(), t.view(), none, out_losses);
    const std::vector<double> l = losses.values(), gv = g.values();
    const double ulp = std::ldexp(1.0, -23);
    const double tf = static_cast<float>(t_value), a = static_cast<float>(pw_value) * tf, b = 1 - tf;
    int bad_loss = 0, bad_grad = 0;
    for (std::size_t i = 0; i < xs.size(); ++i) {
      const double v = xs[i], log1p_e = std::log1p(std::exp(-std::fabs(v)));
      const double loss = a * (log1p_e + std::max(-v, 0.0)) + b * (log1p_e + std::max(v, 0.0));
      const double sigma = 1 / (1 + std::exp(-v)), sigma_neg = 1 / (1 + std::exp(v));
      const double grad = b * sigma - a * sigma_neg, grad_size = b * sigma + a * sigma_neg;
      if (!(std::fabs(l[i] - loss) <= 4 * ulp * loss)) ++bad_loss;
      if (!(std::fabs(gv[i] - grad) <= 4 * ulp * grad_size)) ++bad_grad;
    }
    EXPECT_EQ(bad_loss, 0);
    EXPECT_EQ(bad_grad, 0);
  }
}

// Infinite logits: a term whose coefficient is zero is 0, not 0 * inf (a masked logit, -inf
// with target 0, costs nothing and moves nothing; torch gives NaN there); a NaN logit stays
// NaN even where pos_weight 0 at t = 1 zeroes both coefficients. The target's gradient
// pos_weight softplus(-x) - softplus(x) follows the same rule: a masked term adds nothing to
// it either (as cross_entropy's target gradient at a masked class), an unmasked one its
// infinite limit.
TEST(BinaryCrossEntropyWithLogits, InfiniteLogitsFollowTheLimits) {
  const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  const std::vector<double> xs = {-inf, inf, inf, -inf, inf, nan, -inf, -inf};
  const std::vector<double> ts = {0.0, 1.0, 0.0, 1.0, 0.5, 1.0, 0.0, 0.5};
  const std::vector<double> pws = {2.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.5, 0.0};
  const std::vector<double> want_loss = {0.0, 0.0, inf, inf, inf, nan, 0.0, 0.0};
  const std::vector<double> want_grad = {0.0, 0.0, 1.0, -2.0, 0.5, nan, 0.0, 0.0};
  const std::vector<double> want_grad_target = {0.0, 0.0, -inf, inf, -inf, nan, 0.0, 0.0};
  const auto same = [](double got, double want) { return std::isnan(want) ? std::isnan(got) : got == want; };
  for (dtype type : {dtype::float32, dtype::float64, dtype::bfloat16}) {
    SCOPED_TRACE(name_of(type));
    const std::int64_t n = static_cast<std::int64_t>(xs.size());
    const tensor x = make_tensor({n}, type, xs), t = make_tensor({n}, type, ts), pw = make_tensor({n}, type, pws);
    softce::bce_options o;
    o.reduce = reduction::none;
    o.pos_weight = pw.view();
    tensor losses({n}, dtype::float64), g({n}, dtype::float64), gt({n}, dtype::float64);
    softce::outputs out;
    out.grad = g.mutable_view();
    out.grad_target = gt.mutable_view();
    out.losses = losses.mutable_view();
    for (auto call : {&softce::binary_cross_entropy_with_logits, &ref::binary_cross_entropy_with_logits}) {
      call(x.view(), t.view(), o, out);
      const std::vector<double> l = losses.values(), gv = g.values(), gtv = gt.values();
      for (std::size_t i = 0; i < xs.size(); ++i) {
        EXPECT_PRED2(same, l[i], want_loss[i]) << "loss " << i << (call == &ref::binary_cross_entropy_with_logits ? " oracle" : "");
        EXPECT_PRED2(same, gv[i], want_grad[i]) << "grad " << i;
        EXPECT_PRED2(same, gtv[i], want_grad_target[i]) << "grad_target " << i;
      }
    }
  }
}

}  // namespace
}  // namespace softce_test
