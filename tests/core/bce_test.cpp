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

// Element by element in float32, against the formula in double: loss (softplus, from one
// exp, a reciprocal and log1p) and gradient within 4 ulp over |x| <= 80 wherever the
// formula has no cancellation: t = 1 for every x (loss softplus(-x), gradient -sigma(-x)),
// t = 0 for x >= 0 (the mirror image). (t = 0, x < 0 computes x + softplus(-x) and
// 1 - sigma(-x), as PyTorch does: exact only to an ulp of |x| or of 1 there.) A tolerance
// relative to the largest element would not see a wrong log1p of a tiny exp.
TEST(BinaryCrossEntropyWithLogits, Float32ElementsWithinFourUlp) {
  std::vector<double> xs;
  for (int i = -16000; i <= 16000; ++i) xs.push_back(static_cast<double>(static_cast<float>(i * 0.005)));
  for (int i = -200; i <= 200; ++i) xs.push_back(static_cast<double>(static_cast<float>(i * 1e-6)));
  const std::int64_t n = static_cast<std::int64_t>(xs.size());
  const tensor x = make_tensor({n}, dtype::float32, xs);
  for (double tv : {0.0, 1.0}) {
    SCOPED_TRACE("t = " + std::to_string(tv));
    const tensor t = make_tensor({n}, dtype::float32, std::vector<double>(xs.size(), tv));
    softce::bce_options o;
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
    int checked = 0, bad_loss = 0, bad_grad = 0;
    for (std::size_t i = 0; i < xs.size(); ++i) {
      const double v = tv == 1.0 ? xs[i] : -xs[i];  // t = 0 at x is t = 1 at -x
      if (tv == 0.0 && xs[i] < 0.0) continue;
      const double loss = std::log1p(std::exp(-std::fabs(v))) + std::max(-v, 0.0);  // softplus(-v)
      const double grad = (tv == 1.0 ? -1.0 : 1.0) / (1.0 + std::exp(v));            // -+sigma(-v)
      ++checked;
      if (!(std::fabs(l[i] - loss) <= 4 * ulp * std::fabs(loss))) ++bad_loss;
      if (!(std::fabs(gv[i] - grad) <= 4 * ulp * std::fabs(grad))) ++bad_grad;
    }
    EXPECT_GT(checked, 16000);
    EXPECT_EQ(bad_loss, 0);
    EXPECT_EQ(bad_grad, 0);
  }
}

}  // namespace
}  // namespace softce_test
