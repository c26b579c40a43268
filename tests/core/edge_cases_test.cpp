// Edge cases of the row losses: -inf (masked) logits with zero targets, all-zero and
// unnormalised target rows, rows whose logits are all -inf, logits offset by +-1e4 and
// scaled by 200 (float32 against the float64 reference), ignored / masked rows, means over
// zero rows (NaN, as PyTorch, with a zero gradient) and empty batches.
#include "test_support.hpp"

namespace softce_test {
namespace {

using softce::divergence;
using softce::reduction;
namespace ref = softce::reference;

const dtype float_types[] = {dtype::float32, dtype::float64, dtype::bfloat16, dtype::float16};

// Runs a call with a float64 gradient (initialised to NaN, so every element must be
// written) and per-row losses when the reduction is none.
struct result {
  double loss;
  std::vector<double> grad;
};
result run(const std::function<double(const softce::outputs&)>& call, const shape_t& shape) {
  tensor g(shape, dtype::float64);
  softce::outputs out;
  out.grad = g.mutable_view();
  const double loss = call(out);
  return {loss, g.values()};
}

TEST(EdgeCases, MaskedLogitsWithZeroTargetsGiveFiniteLossAndNoNaN) {
  // A vocabulary mask: -inf logits where the target is 0. PyTorch gives NaN (0 * -inf);
  // softce gives the loss over the remaining classes.
  for (dtype type : float_types) {
    SCOPED_TRACE(name_of(type));
    const shape_t shape{3, 5};
    const std::vector<double> x{1.0, -inf, 0.5, -inf, 2.0,  -inf, -inf, 3.0, 0.0, -1.0,  0.2, 0.1, -inf, -inf, -inf};
    const std::vector<double> t{0.3, 0.0, 0.2, 0.0, 0.5,   0.0, 0.0, 0.6, 0.4, 0.0,    0.9, 0.1, 0.0, 0.0, 0.0};
    const tensor input = make_tensor(shape, type, x), target = make_tensor(shape, type, t);
    for (reduction r : {reduction::mean, reduction::sum, reduction::none}) {
      softce::cross_entropy_options o;
      o.reduce = r;
      const result f = run([&](const softce::outputs& out) { return softce::cross_entropy(input.view(), target.view(), o, out); }, shape);
      const result g = run([&](const softce::outputs& out) { return ref::cross_entropy(input.view(), target.view(), o, out); }, shape);
      EXPECT_TRUE(std::isfinite(f.loss));
      EXPECT_FALSE(has_nan(f.grad));
      EXPECT_TRUE(loss_near(f.loss, g.loss, loss_tolerance(type)));
      EXPECT_TRUE(values_near(f.grad, g.grad, array_tolerance(type, dtype::float64)));
      // the gradient at a masked logit is -coef w t' = 0
      EXPECT_EQ(f.grad[1], 0.0);
      EXPECT_EQ(f.grad[14], 0.0);
    }
    // the same with a top-k target holding the nonzero entries (and a zero one)
    const tensor idx = make_index_tensor({3, 3}, dtype::int64, {0, 2, 4, 2, 3, 0, 0, 1, 2});
    const tensor val = make_tensor({3, 3}, type, {0.3, 0.2, 0.5, 0.6, 0.4, 0.0, 0.9, 0.1, 0.0});
    const softce::topk k{idx.view(), val.view(), false};
    const result f = run([&](const softce::outputs& out) { return softce::cross_entropy(input.view(), k, {}, out); }, shape);
    const result g = run([&](const softce::outputs& out) { return ref::cross_entropy(input.view(), k, {}, out); }, shape);
    EXPECT_TRUE(std::isfinite(f.loss));
    EXPECT_FALSE(has_nan(f.grad));
    EXPECT_TRUE(loss_near(f.loss, g.loss, loss_tolerance(type)));
    EXPECT_TRUE(values_near(f.grad, g.grad, array_tolerance(type, dtype::float64)));
    // distillation with the same classes masked in student and teacher
    const tensor teacher = make_tensor(shape, type, {0.0, -inf, 1.0, -inf, 0.5, -inf, -inf, 1.0, 2.0, 0.0, 1.0, 1.0, -inf, -inf, -inf});
    for (divergence kind : {divergence::kl, divergence::reverse_kl, divergence::jsd}) {
      softce::distillation_options o;
      o.kind = kind;
      const result fd = run([&](const softce::outputs& out) { return softce::distillation_loss(input.view(), teacher.view(), o, out); }, shape);
      const result gd = run([&](const softce::outputs& out) { return ref::distillation_loss(input.view(), teacher.view(), o, out); }, shape);
      EXPECT_TRUE(std::isfinite(fd.loss)) << divergence_text(kind);
      EXPECT_FALSE(has_nan(fd.grad)) << divergence_text(kind);
      EXPECT_TRUE(loss_near(fd.loss, gd.loss, loss_tolerance(type))) << divergence_text(kind);
      EXPECT_TRUE(values_near(fd.grad, gd.grad, {compute_rtol(type), unit_roundoff(type), 1e-7}));
    }
  }
}

// The same in rows long enough for the kernels' full vectors and several chunks (the 5-class
// rows above reach only the partial last vector): the bfloat16 statistics pass sums
// w t' (x - shift) without the zero-weight guard and redoes a chunk whose sum is NaN, so a
// masked logit must be found in a full vector, in the first and in a later chunk, and in
// the partial tail; with label smoothing a masked class gets weight, the loss is +inf.
TEST(EdgeCases, MaskedLogitsInLongRows) {
  std::mt19937_64 rng(7);
  const std::int64_t rows = 3, C = 2100;  // chunks of 1024, 1024 and 52 classes
  for (dtype type : float_types) {
    SCOPED_TRACE(name_of(type));
    std::vector<double> x = normal_values(rng, rows * C, 2.0), t(static_cast<std::size_t>(rows * C), 0.0);
    for (std::int64_t r = 0; r < rows; ++r) {
      double total = 0.0;
      for (std::int64_t c = 0; c < C; ++c) {
        const std::size_t i = static_cast<std::size_t>(r * C + c);
        const bool masked = (c % 7 == r) || c == C - 1;  // some in every vector and chunk
        if (masked) {
          x[i] = -inf;
        } else {
          t[i] = 1.0 + static_cast<double>((c * 13 + r) % 5);
          total += t[i];
        }
      }
      for (std::int64_t c = 0; c < C; ++c) t[static_cast<std::size_t>(r * C + c)] /= total;
    }
    const shape_t shape{rows, C};
    const tensor input = make_tensor(shape, type, x), target = make_tensor(shape, type, t);
    for (double smoothing : {0.0, 0.1}) {
      SCOPED_TRACE(smoothing);
      softce::cross_entropy_options o;
      o.label_smoothing = smoothing;
      // the gradient in the input's type: bfloat16 logits, targets and gradient take the
      // kernels that read and write bfloat16 rows in place
      tensor grad(shape, type);
      softce::outputs fout;
      fout.grad = grad.mutable_view();
      const result f{softce::cross_entropy(input.view(), target.view(), o, fout), grad.values()};
      const result g = run([&](const softce::outputs& out) { return ref::cross_entropy(input.view(), target.view(), o, out); }, shape);
      if (smoothing == 0.0) {
        EXPECT_TRUE(std::isfinite(f.loss));
        EXPECT_TRUE(loss_near(f.loss, g.loss, loss_tolerance(type)));
      } else {
        EXPECT_EQ(f.loss, inf);
        EXPECT_EQ(g.loss, inf);
      }
      EXPECT_FALSE(has_nan(f.grad));
      EXPECT_TRUE(values_near(f.grad, g.grad, array_tolerance(type, type)));
    }
  }
}

TEST(EdgeCases, ZeroAndUnnormalisedTargetRows) {
  std::mt19937_64 rng(801);
  for (dtype type : {dtype::float32, dtype::float64}) {
    const shape_t shape{4, 6};
    const tensor input = make_tensor(shape, type, normal_values(rng, 24, 2.0));
    std::vector<double> t = probability_targets(rng, shape, target_rows::normalised);
    for (int c = 0; c < 6; ++c) {
      t[0 * 6 + c] = 0;         // all-zero row: loss 0, gradient 0
      t[1 * 6 + c] *= 3.5;      // sums to 3.5
      t[2 * 6 + c] *= 0.25;     // sums to 0.25
    }
    const tensor target = make_tensor(shape, type, t);
    softce::cross_entropy_options o;
    o.reduce = reduction::none;
    tensor losses({4}, dtype::float64);
    softce::outputs out;
    tensor g(shape, dtype::float64);
    out.grad = g.mutable_view();
    out.losses = losses.mutable_view();
    softce::cross_entropy(input.view(), target.view(), o, out);
    const std::vector<double> l = losses.values(), gv = g.values();
    EXPECT_EQ(l[0], 0.0);
    for (int c = 0; c < 6; ++c) EXPECT_EQ(gv[c], 0.0);
    // an unnormalised row is that multiple of the normalised row's loss; grad = q A - t
    const std::vector<double> x = input.values();
    const tensor row1 = make_tensor({6}, type, std::vector<double>(x.begin() + 6, x.begin() + 12));
    std::vector<double> t1(t.begin() + 6, t.begin() + 12);
    for (auto& v : t1) v /= 3.5;
    const tensor target1 = make_tensor({6}, type, t1);
    const double normalised = softce::cross_entropy(row1.view(), target1.view(), {});
    EXPECT_NEAR(l[1], 3.5 * normalised, 1e-5 * l[1]);
    softce::cross_entropy_options mean;
    EXPECT_TRUE(loss_near(softce::cross_entropy(input.view(), target.view(), mean),
                          ref::cross_entropy(input.view(), target.view(), mean), loss_tolerance(type)));
  }
}

TEST(EdgeCases, RowsWithAllLogitsNegativeInfinity) {
  // s = 0: loss +inf when the row's target mass A > 0, else 0; gradient -coef w t'.
  for (dtype type : {dtype::float32, dtype::float64}) {
    const shape_t shape{2, 3};
    const tensor input = make_tensor(shape, type, {-inf, -inf, -inf, -inf, -inf, -inf});
    const tensor positive = make_tensor(shape, type, {0.2, 0.8, 0.0, 0.5, 0.5, 0.0});
    const tensor zero = make_tensor(shape, type, {0, 0, 0, 0, 0, 0});
    softce::cross_entropy_options o;
    o.reduce = reduction::sum;
    const result f = run([&](const softce::outputs& out) { return softce::cross_entropy(input.view(), positive.view(), o, out); }, shape);
    EXPECT_EQ(f.loss, inf);
    std::vector<double> minus_t = positive.values();
    for (auto& v : minus_t) v = -v;
    EXPECT_EQ(f.grad, minus_t);
    const result z = run([&](const softce::outputs& out) { return softce::cross_entropy(input.view(), zero.view(), o, out); }, shape);
    EXPECT_EQ(z.loss, 0.0);
    EXPECT_EQ(z.grad, std::vector<double>(6, 0.0));
    const result r = run([&](const softce::outputs& out) { return ref::cross_entropy(input.view(), positive.view(), o, out); }, shape);
    EXPECT_EQ(r.loss, inf);
    EXPECT_EQ(r.grad, f.grad);
  }
}

// Logits offset by +-1e4 and scaled by 200: float32 computations still agree with the
// float64 reference (on the same float32 values) to ~1e-5.
TEST(EdgeCases, OffsetAndScaledLogitsInFloat32) {
  std::mt19937_64 rng(802);
  for (double offset : {1e4, -1e4, 0.0})
    for (double scale : {1.0, 200.0}) {
      if (offset == 0 && scale == 1) continue;
      SCOPED_TRACE("offset " + std::to_string(offset) + " scale " + std::to_string(scale));
      const shape_t shape{8, 300};
      const tensor x = make_tensor(shape, dtype::float32, normal_values(rng, 2400, scale, offset));
      const tensor z = make_tensor(shape, dtype::float32, normal_values(rng, 2400, scale, offset));
      const tensor t = make_tensor(shape, dtype::float32, probability_targets(rng, shape));
      std::vector<std::int64_t> y(8);
      for (auto& v : y) v = static_cast<std::int64_t>(rng() % 300);
      const tensor labels = make_index_tensor({8}, dtype::int64, y);
      const topk_data d = random_topk(rng, shape, 5, false);
      const tensor idx = make_index_tensor(d.shape, dtype::int64, d.indices);
      const tensor val = make_tensor(d.shape, dtype::float32, d.values);
      const softce::topk k{idx.view(), val.view(), false};
      const softce::topk k_tail{idx.view(), val.view(), true};
      auto check = [&](const std::string& what, const loss_call& fast, const loss_call& reference) {
        SCOPED_TRACE(what);
        output_request req;
        req.grad = true;
        req.grad_type = dtype::float32;
        expect_matches_reference(fast, reference, x, req, 1e-5 * 2 / 8);
      };
      softce::cross_entropy_options smooth;
      smooth.label_smoothing = 0.1;
      check("probabilities", [&](const array_view& in, const softce::outputs& o) { return softce::cross_entropy(in, t.view(), {}, o); },
            [&](const array_view& in, const softce::outputs& o) { return ref::cross_entropy(in, t.view(), {}, o); });
      check("indices, smoothing", [&](const array_view& in, const softce::outputs& o) { return softce::cross_entropy(in, labels.view(), smooth, o); },
            [&](const array_view& in, const softce::outputs& o) { return ref::cross_entropy(in, labels.view(), smooth, o); });
      check("top-k", [&](const array_view& in, const softce::outputs& o) { return softce::cross_entropy(in, k, {}, o); },
            [&](const array_view& in, const softce::outputs& o) { return ref::cross_entropy(in, k, {}, o); });
      check("top-k tail", [&](const array_view& in, const softce::outputs& o) { return softce::cross_entropy(in, k_tail, {}, o); },
            [&](const array_view& in, const softce::outputs& o) { return ref::cross_entropy(in, k_tail, {}, o); });
      for (divergence kind : {divergence::kl, divergence::reverse_kl, divergence::jsd}) {
        softce::distillation_options o;
        o.kind = kind;
        o.temperature = 2;
        check(std::string("distillation ") + divergence_text(kind),
              [&](const array_view& in, const softce::outputs& out) { return softce::distillation_loss(in, z.view(), o, out); },
              [&](const array_view& in, const softce::outputs& out) { return ref::distillation_loss(in, z.view(), o, out); });
      }
    }
}

// Top-k targets with a tail: the bucket term -tau log(1 - Q) when the top k hold almost all
// of the predicted mass (1 - Q ~ 1e-5: no cancellation allowed in 1 - Q), and when they
// cover every class (1 - Q = 0: the loss is +inf by the formula, the gradient finite).
TEST(EdgeCases, TopKTailWhenTheTopKHoldAlmostAllOrAllTheMass) {
  for (dtype type : {dtype::float32, dtype::float64}) {
    SCOPED_TRACE(name_of(type));
    const tensor x = make_tensor({1, 4}, type, {0.0, 0.5, -11.0, -11.5});
    const tensor idx = make_index_tensor({1, 2}, dtype::int64, {0, 1});
    const tensor val = make_tensor({1, 2}, type, {0.5, 0.3});
    const softce::topk k{idx.view(), val.view(), true};
    output_request req;
    req.grad = true;
    req.grad_type = type;
    expect_matches_reference([&](const array_view& in, const softce::outputs& o) { return softce::cross_entropy(in, k, {}, o); },
                             [&](const array_view& in, const softce::outputs& o) { return ref::cross_entropy(in, k, {}, o); }, x, req);
    softce::distillation_options d;
    d.temperature = 0.5;
    expect_matches_reference([&](const array_view& in, const softce::outputs& o) { return softce::distillation_loss(in, k, d, o); },
                             [&](const array_view& in, const softce::outputs& o) { return ref::distillation_loss(in, k, d, o); }, x,
                             req);

    const tensor x2 = make_tensor({1, 2}, type, {0.3, -0.2});
    const tensor idx2 = make_index_tensor({1, 2}, dtype::int64, {0, 1});
    const softce::topk all{idx2.view(), val.view(), true};
    // a top-k covering every class has no tail: the same as without the bucket (finite)
    const softce::topk no_tail{idx2.view(), val.view(), false};
    const result f = run([&](const softce::outputs& o) { return softce::cross_entropy(x2.view(), all, {}, o); }, {1, 2});
    const result r = run([&](const softce::outputs& o) { return ref::cross_entropy(x2.view(), all, {}, o); }, {1, 2});
    const result f0 = run([&](const softce::outputs& o) { return softce::cross_entropy(x2.view(), no_tail, {}, o); }, {1, 2});
    EXPECT_TRUE(std::isfinite(f.loss));
    EXPECT_EQ(f.loss, f0.loss);
    EXPECT_TRUE(loss_near(f.loss, r.loss, loss_tolerance(type)));
    EXPECT_TRUE(values_near(f.grad, r.grad, array_tolerance(type, dtype::float64)));
    EXPECT_TRUE(values_near(f.grad, f0.grad, array_tolerance(type, dtype::float64)));
    const result fd = run([&](const softce::outputs& o) { return softce::distillation_loss(x2.view(), all, {}, o); }, {1, 2});
    const result rd = run([&](const softce::outputs& o) { return ref::distillation_loss(x2.view(), all, {}, o); }, {1, 2});
    EXPECT_TRUE(std::isfinite(fd.loss));
    EXPECT_TRUE(loss_near(fd.loss, rd.loss, loss_tolerance(type)));
    EXPECT_FALSE(has_nan(fd.grad));
  }
}

// Index targets whose classes all have weight 0: mean divides by a zero total weight, which
// gives NaN (as torch) and a zero gradient, like a mean over no rows.
TEST(EdgeCases, ZeroTotalTargetWeightGivesNaNAndZeroGradient) {
  for (dtype type : {dtype::float32, dtype::float64}) {
    SCOPED_TRACE(name_of(type));
    const tensor x = make_tensor({3, 4}, type, {0.1, 0.2, 0.3, 0.4, 1, -1, 2, 0, 0.5, 0.5, 0.5, 0.5});
    const tensor labels = make_index_tensor({3}, dtype::int64, {1, 1, 3});
    const tensor weight = make_tensor({4}, type, {1.0, 0.0, 2.0, 0.0});
    softce::cross_entropy_options o;
    o.weight = weight.view();
    for (double eps : {0.0, 0.2}) {
      o.label_smoothing = eps;
      const result f = run([&](const softce::outputs& out) { return softce::cross_entropy(x.view(), labels.view(), o, out); }, {3, 4});
      const result r = run([&](const softce::outputs& out) { return ref::cross_entropy(x.view(), labels.view(), o, out); }, {3, 4});
      EXPECT_TRUE(std::isnan(f.loss));
      EXPECT_TRUE(std::isnan(r.loss));
      for (double g : f.grad) EXPECT_EQ(g, 0.0);
      for (double g : r.grad) EXPECT_EQ(g, 0.0);
    }
  }
}

// Top-k teacher values summing to slightly more than 1 (tau < 0): tau log tau is taken as 0,
// the tail bucket term stays finite.
TEST(EdgeCases, TopKTeacherValuesAboveOneKeepAFiniteLoss) {
  for (dtype type : {dtype::float32, dtype::float64}) {
    SCOPED_TRACE(name_of(type));
    const tensor x = make_tensor({1, 5}, type, {0.3, -0.2, 1.0, 0.0, -1.0});
    const tensor idx = make_index_tensor({1, 2}, dtype::int64, {2, 0});
    const tensor val = make_tensor({1, 2}, type, {0.7, 0.3000001});
    const softce::topk k{idx.view(), val.view(), true};
    softce::distillation_options d;
    d.temperature = 2.0;
    const result f = run([&](const softce::outputs& out) { return softce::distillation_loss(x.view(), k, d, out); }, {1, 5});
    const result r = run([&](const softce::outputs& out) { return ref::distillation_loss(x.view(), k, d, out); }, {1, 5});
    EXPECT_TRUE(std::isfinite(f.loss));
    EXPECT_TRUE(loss_near(f.loss, r.loss, loss_tolerance(type)));
    EXPECT_TRUE(values_near(f.grad, r.grad, array_tolerance(type, dtype::float64)));
  }
}

TEST(EdgeCases, IgnoredAndMaskedRowsHaveZeroLossAndGradient) {
  std::mt19937_64 rng(803);
  const shape_t shape{4, 5};
  for (dtype type : {dtype::float32, dtype::float64}) {
    const tensor x = make_tensor(shape, type, normal_values(rng, 20, 2.0));
    const tensor labels = make_index_tensor({4}, dtype::int32, {1, -100, 3, -100});
    const tensor t = make_tensor(shape, type, probability_targets(rng, shape, target_rows::normalised));
    const tensor mask = make_index_tensor({4}, dtype::boolean, {1, 0, 1, 0});
    softce::cross_entropy_options index_options, prob_options;
    index_options.reduce = prob_options.reduce = reduction::none;
    prob_options.mask = mask.view();
    softce::distillation_options distill;
    distill.reduce = reduction::none;
    distill.mask = mask.view();
    const std::function<double(const softce::outputs&)> calls[] = {
        [&](const softce::outputs& o) { return softce::cross_entropy(x.view(), labels.view(), index_options, o); },
        [&](const softce::outputs& o) { return softce::cross_entropy(x.view(), t.view(), prob_options, o); },
        [&](const softce::outputs& o) { return softce::distillation_loss(x.view(), t.view(), distill, o); },
    };
    for (const auto& call : calls) {
      tensor g(shape, dtype::float64), losses({4}, dtype::float64);
      softce::outputs out;
      out.grad = g.mutable_view();
      out.losses = losses.mutable_view();
      call(out);
      const std::vector<double> gv = g.values(), l = losses.values();
      for (int row : {1, 3}) {
        EXPECT_EQ(l[row], 0.0);
        for (int c = 0; c < 5; ++c) EXPECT_EQ(gv[row * 5 + c], 0.0);
      }
      EXPECT_GT(l[0], 0.0);
      EXPECT_GT(l[2], 0.0);
    }
  }
}

// Mean over zero valid rows is NaN (as torch: F.cross_entropy with every target ignored),
// the gradient zero (not NaN); sum is 0.
TEST(EdgeCases, MeanOverZeroValidRowsIsNaNWithZeroGradient) {
  std::mt19937_64 rng(804);
  const shape_t shape{3, 4};
  for (dtype type : {dtype::float32, dtype::float64, dtype::bfloat16}) {
    SCOPED_TRACE(name_of(type));
    const tensor x = make_tensor(shape, type, normal_values(rng, 12));
    const tensor labels = make_index_tensor({3}, dtype::int64, {-100, -100, -100});
    const tensor t = make_tensor(shape, type, probability_targets(rng, shape));
    const tensor mask = make_index_tensor({3}, dtype::boolean, {0, 0, 0});
    const tensor idx = make_index_tensor({3, 1}, dtype::int64, {0, 1, 2});
    const tensor val = make_tensor({3, 1}, type, {0.5, 0.5, 0.5});
    const softce::topk k{idx.view(), val.view(), true};
    for (reduction r : {reduction::mean, reduction::sum}) {
      SCOPED_TRACE(reduction_text(r));
      softce::cross_entropy_options index_options, masked;
      index_options.reduce = masked.reduce = r;
      masked.mask = mask.view();
      softce::distillation_options distill;
      distill.reduce = r == reduction::mean ? reduction::batchmean : r;
      distill.mask = mask.view();
      softce::distillation_options distill_mean = distill;
      distill_mean.reduce = r;
      const std::function<double(const softce::outputs&)> calls[] = {
          [&](const softce::outputs& o) { return softce::cross_entropy(x.view(), labels.view(), index_options, o); },
          [&](const softce::outputs& o) { return softce::cross_entropy(x.view(), t.view(), masked, o); },
          [&](const softce::outputs& o) { return softce::cross_entropy(x.view(), k, masked, o); },
          [&](const softce::outputs& o) { return softce::distillation_loss(x.view(), t.view(), distill, o); },
          [&](const softce::outputs& o) { return softce::distillation_loss(x.view(), t.view(), distill_mean, o); },
          [&](const softce::outputs& o) { return softce::distillation_loss(x.view(), k, distill, o); },
      };
      int i = 0;
      for (const auto& call : calls) {
        const result f = run(call, shape);
        if (r == reduction::mean)
          EXPECT_TRUE(std::isnan(f.loss)) << "call " << i << ": " << f.loss;
        else
          EXPECT_EQ(f.loss, 0.0) << "call " << i;
        EXPECT_EQ(f.grad, std::vector<double>(12, 0.0)) << "call " << i;
        ++i;
      }
    }
  }
}

// N = 0: mean -> NaN, sum -> 0, none -> 0 with empty per-row losses; nothing is written.
TEST(EdgeCases, EmptyBatch) {
  for (dtype type : {dtype::float32, dtype::float64}) {
    const shape_t shape{0, 7};
    const tensor x(shape, type), t(shape, type), labels({0}, dtype::int64);
    const tensor idx({0, 2}, dtype::int32), val({0, 2}, type);
    const softce::topk k{idx.view(), val.view(), false};
    for (reduction r : {reduction::mean, reduction::sum, reduction::none}) {
      SCOPED_TRACE(std::string(name_of(type)) + " " + reduction_text(r));
      softce::cross_entropy_options o;
      o.reduce = r;
      softce::distillation_options d;
      d.reduce = r == reduction::mean ? reduction::batchmean : r;
      softce::kl_div_options kl;
      kl.reduce = r;
      softce::bce_options bce;
      bce.reduce = r;
      const double expected = r == reduction::mean ? nan : 0.0;
      tensor g(shape, type), losses({0}, type);
      softce::outputs out;
      out.grad = g.mutable_view();
      if (r == reduction::none) out.losses = losses.mutable_view();
      softce::outputs elementwise_out;
      elementwise_out.grad = g.mutable_view();
      if (r == reduction::none) elementwise_out.losses = g.mutable_view();
      const double results[] = {
          softce::cross_entropy(x.view(), t.view(), o, out),
          softce::cross_entropy(x.view(), labels.view(), o, out),
          softce::cross_entropy(x.view(), k, o, out),
          softce::cross_entropy_with_probs(x.view(), t.view(), std::nullopt, r, out),
          softce::distillation_loss(x.view(), t.view(), d, out),
          softce::distillation_loss(x.view(), k, d, out),
          softce::kl_div(x.view(), t.view(), kl, elementwise_out),
          softce::binary_cross_entropy_with_logits(x.view(), t.view(), bce, elementwise_out),
      };
      for (double v : results) {
        if (std::isnan(expected))
          EXPECT_TRUE(std::isnan(v)) << v;
        else
          EXPECT_EQ(v, expected);
      }
    }
  }
}

}  // namespace
}  // namespace softce_test
