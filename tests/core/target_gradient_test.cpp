// outputs.grad_target: d loss / d target (probability targets of cross_entropy, both
// arguments of kl_div, the target of BCE, the teacher logits of distillation_loss), against
// the float64 oracle on random shapes, dtypes, layouts and options, with and without the
// input gradient (also in place); the oracle's formulas against its own finite differences;
// 1 vs 2 threads; class-parallel shards; the errors.
#include <thread>

#include "test_support.hpp"

namespace softce_test {
namespace {

using softce::divergence;
using softce::reduction;
namespace ref = softce::reference;

// A loss as a function of (input, target, outputs).
using target_call = std::function<double(const array_view&, const array_view&, const softce::outputs&)>;

struct target_case {
  std::string name;
  shape_t shape;
  std::vector<double> x, t;
  target_call fast, oracle;
};

std::vector<double> finite_logits(std::mt19937_64& rng, std::int64_t n) { return normal_values(rng, n, 2.0); }

// Every loss with a target gradient, with random options.
// `masked_class`: one logit -inf (a class masked out), whose zero target's derivative is 0.
std::vector<target_case> random_cases(std::mt19937_64& rng, const shape_t& shape, bool masked_class = true) {
  std::vector<target_case> cases;
  const std::int64_t n = product(shape), C = classes_of(shape);
  const reduction reductions[] = {reduction::none, reduction::mean, reduction::sum};
  const reduction r = reductions[rng() % 3];
  {  // cross_entropy with probability targets: class weights, label smoothing, mask
    softce::cross_entropy_options o;
    o.reduce = r;
    auto w = std::make_shared<tensor>(make_tensor({C}, dtype::float64, uniform_values(rng, C, 0.2, 2.0)));
    if (rng() % 2) o.weight = w->view();
    if (rng() % 2) o.label_smoothing = 0.15;
    auto mask = std::make_shared<tensor>(tensor(row_shape_of(shape), dtype::boolean));
    if (rng() % 2 && !row_shape_of(shape).empty()) {
      std::vector<double> m(static_cast<std::size_t>(product(row_shape_of(shape))));
      for (auto& v : m) v = rng() % 3 != 0;
      m[0] = 1;  // one row kept at least
      mask->set(m);
      o.mask = mask->view();
    }
    std::vector<double> x = finite_logits(rng, n);
    if (masked_class && n > 2) x[rng() % n] = -inf;
    std::vector<double> t = probability_targets(rng, shape);
    cases.push_back({"cross_entropy", shape, x, t,
                     [o, w, mask](const array_view& in, const array_view& tg, const softce::outputs& out) {
                       return softce::cross_entropy(in, tg, o, out);
                     },
                     [o, w, mask](const array_view& in, const array_view& tg, const softce::outputs& out) {
                       return ref::cross_entropy(in, tg, o, out);
                     }});
  }
  {  // kl_div, both target forms
    softce::kl_div_options o;
    o.reduce = rng() % 2 ? reduction::batchmean : r;
    o.log_target = rng() % 2;
    std::vector<double> t = probability_targets(rng, shape, target_rows::normalised);
    if (o.log_target)
      for (auto& v : t) v = std::log(v);
    cases.push_back({std::string("kl_div") + (o.log_target ? " log_target" : ""), shape,
                     log_softmax_rows(finite_logits(rng, n), shape), t,
                     [o](const array_view& in, const array_view& tg, const softce::outputs& out) {
                       return softce::kl_div(in, tg, o, out);
                     },
                     [o](const array_view& in, const array_view& tg, const softce::outputs& out) {
                       return ref::kl_div(in, tg, o, out);
                     }});
  }
  {  // BCE with weight and pos_weight (broadcast along the last dimension)
    softce::bce_options o;
    o.reduce = r;
    const std::int64_t last = shape.back();
    auto w = std::make_shared<tensor>(make_tensor({last}, dtype::float32, uniform_values(rng, last, 0.5, 2.0)));
    auto pw = std::make_shared<tensor>(make_tensor({last}, dtype::float64, uniform_values(rng, last, 0.3, 3.0)));
    if (rng() % 2) o.weight = w->view();
    if (rng() % 2) o.pos_weight = pw->view();
    cases.push_back({"bce", shape, finite_logits(rng, n), uniform_values(rng, n, 0.0, 1.0),
                     [o, w, pw](const array_view& in, const array_view& tg, const softce::outputs& out) {
                       return softce::binary_cross_entropy_with_logits(in, tg, o, out);
                     },
                     [o, w, pw](const array_view& in, const array_view& tg, const softce::outputs& out) {
                       return ref::binary_cross_entropy_with_logits(in, tg, o, out);
                     }});
  }
  for (divergence d : {divergence::kl, divergence::reverse_kl, divergence::jsd}) {  // distillation
    softce::distillation_options o;
    o.kind = d;
    o.temperature = rng() % 2 ? 1.0 : 2.5;
    o.beta = d == divergence::jsd ? 0.3 : 0.5;
    const reduction dr[] = {reduction::none, reduction::sum, reduction::batchmean, reduction::mean};
    o.reduce = dr[rng() % 4];
    if (shape.size() >= 3) o.dim = 1;
    cases.push_back({std::string("distillation ") + divergence_text(d), shape, finite_logits(rng, n),
                     finite_logits(rng, n),
                     [o](const array_view& in, const array_view& tg, const softce::outputs& out) {
                       return softce::distillation_loss(in, tg, o, out);
                     },
                     [o](const array_view& in, const array_view& tg, const softce::outputs& out) {
                       return ref::distillation_loss(in, tg, o, out);
                     }});
  }
  return cases;
}

struct result {
  double loss;
  std::vector<double> grad, grad_target;
};

// Runs `call` with grad_target (dtype gt_type, a random layout) and optionally the input
// gradient (separate or in place over a copy of the input).
result run(const target_call& call, const tensor& x, const tensor& t, dtype gt_type, const layout& gt_layout,
           int grad_mode /* 0 none, 1 separate, 2 in place */) {
  tensor in = x, grad(x.shape(), x.type());
  tensor gt(t.shape(), gt_type, gt_layout);
  softce::outputs out;
  out.grad_target = gt.mutable_view();
  if (grad_mode == 1) out.grad = grad.mutable_view();
  if (grad_mode == 2) out.grad = in.mutable_view();
  result r;
  r.loss = call(in.view(), t.view(), out);
  EXPECT_TRUE(gt.padding_intact()) << "grad_target: bytes outside the elements were written";
  if (grad_mode) r.grad = (grad_mode == 2 ? in : grad).values();
  r.grad_target = gt.values();
  return r;
}

TEST(TargetGradient, MatchesTheOracleOnRandomCases) {
  std::mt19937_64 rng(41);
  const shape_t shapes[] = {{7}, {5, 9}, {3, 37}, {2, 4, 3}, {64, 33}, {2, 1500}};
  int compared = 0;
  for (int round = 0; round < 4; ++round)
    for (const shape_t& shape : shapes)
      for (const target_case& c : random_cases(rng, shape))
        for (dtype type : {dtype::float32, dtype::float64}) {
          SCOPED_TRACE(c.name + " " + shape_text(shape) + " " + name_of(type));
          const tensor x = make_tensor(shape, type, c.x, random_layout(rng, static_cast<int>(shape.size())));
          const tensor t = make_tensor(shape, type, c.t, random_layout(rng, static_cast<int>(shape.size())));
          const int grad_mode = static_cast<int>(rng() % 3);
          const dtype gt_type = rng() % 4 == 0 ? dtype::float64 : type;
          const layout gt_layout = random_layout(rng, static_cast<int>(shape.size()));
          const result f = run(c.fast, x, t, gt_type, gt_layout, grad_mode);
          const result o = run(c.oracle, x, t, gt_type, gt_layout, grad_mode);
          EXPECT_TRUE(loss_near(f.loss, o.loss, loss_tolerance(type))) << "loss";
          EXPECT_TRUE(values_near(f.grad_target, o.grad_target, array_tolerance(type, gt_type), "grad_target"));
          if (grad_mode) EXPECT_TRUE(values_near(f.grad, o.grad, array_tolerance(type, type), "grad"));
          // the target gradient is real work: not all zero where the loss depends on the target
          EXPECT_GT(max_abs(o.grad_target), 0.0);
          ++compared;
        }
  EXPECT_EQ(compared, 4 * 6 * 6 * 2);
}

// The oracle's target gradient against central differences of its own loss in the target,
// so that the formulas (and with them the kernels) are the derivative.
TEST(TargetGradient, OracleIsTheDerivative) {
  std::mt19937_64 rng(43);
  int checked = 0;
  for (const shape_t& shape : {shape_t{3, 6}, shape_t{2, 3, 4}})
    for (const target_case& c : random_cases(rng, shape, false)) {
      SCOPED_TRACE(c.name + " " + shape_text(shape));
      const tensor x = make_tensor(shape, dtype::float64, c.x);
      const tensor t = make_tensor(shape, dtype::float64, c.t);
      const result o = run(c.oracle, x, t, dtype::float64, {}, 0);
      for (std::size_t i = 0; i < c.t.size(); ++i) {
        // away from kinks: kl_div's t = 0 (NaN derivative there), probabilities near 0
        if (!std::isfinite(o.grad_target[i]) || std::fabs(c.t[i]) < 1e-4) continue;
        ++checked;
        const double h = 1e-6 * std::max(1.0, std::fabs(c.t[i]));
        const double fd = central_difference(
            [&](const std::vector<double>& tv) {
              return c.oracle(x.view(), make_tensor(shape, dtype::float64, tv).view(), {});
            },
            c.t, i, h);
        EXPECT_NEAR(o.grad_target[i], fd, 1e-6 * std::max(1.0, std::fabs(fd))) << "element " << i;
      }
    }
  EXPECT_GT(checked, 200);
}

// Long rows (split in pieces across threads) and many rows: bitwise identical for 1 and 2
// threads, and equal to the oracle.
TEST(TargetGradient, ThreadsAndLongRows) {
  const int saved = softce::get_num_threads();
  std::mt19937_64 rng(44);
  // (3, 263144): rows that would run one at a time over the threads, but for the target
  // gradient (a loop over the whole row), which keeps them on one thread each
  for (const shape_t& shape : {shape_t{2, 70000}, shape_t{300, 257}, shape_t{3, 4 * 65536 + 1000}}) {
    for (const target_case& c : random_cases(rng, shape)) {
      SCOPED_TRACE(c.name + " " + shape_text(shape));
      const tensor x = make_tensor(shape, dtype::float32, c.x);
      const tensor t = make_tensor(shape, dtype::float32, c.t);
      softce::set_num_threads(1);
      const result one = run(c.fast, x, t, dtype::float32, {}, 2);
      softce::set_num_threads(2);
      const result two = run(c.fast, x, t, dtype::float32, {}, 2);
      EXPECT_EQ(std::memcmp(&one.loss, &two.loss, sizeof(double)), 0);
      EXPECT_EQ(one.grad_target, two.grad_target);
      EXPECT_EQ(one.grad, two.grad);
      const result o = run(c.oracle, x, t, dtype::float32, {}, 2);
      EXPECT_TRUE(values_near(two.grad_target, o.grad_target, array_tolerance(dtype::float32, dtype::float32),
                              "grad_target"));
    }
  }
  softce::set_num_threads(saved);
}

// Class-parallel: each shard writes its own classes' target gradient, equal to the
// one-process oracle's columns.
TEST(TargetGradient, ClassParallelShards) {
  const std::int64_t N = 5, C = 41, split = 18;
  std::mt19937_64 rng(45);
  const std::vector<double> x = normal_values(rng, N * C, 2.0), z = normal_values(rng, N * C, 2.0);
  const std::vector<double> t = probability_targets(rng, {N, C});
  const tensor xt = make_tensor({N, C}, dtype::float64, x);
  for (int which_loss = 0; which_loss < 4; ++which_loss) {
    SCOPED_TRACE(which_loss);
    softce::cross_entropy_options ce;
    ce.label_smoothing = 0.1;
    softce::distillation_options d;
    d.kind = which_loss == 1 ? divergence::kl : which_loss == 2 ? divergence::reverse_kl : divergence::jsd;
    d.temperature = 1.5;
    const std::vector<double>& target = which_loss == 0 ? t : z;
    const tensor tt = make_tensor({N, C}, dtype::float64, target);
    tensor ref_gt({N, C}, dtype::float64);
    softce::outputs ro;
    ro.grad_target = ref_gt.mutable_view();
    if (which_loss == 0)
      ref::cross_entropy(xt.view(), tt.view(), ce, ro);
    else
      ref::distillation_loss(xt.view(), tt.view(), d, ro);
    const std::vector<double> want = ref_gt.values();
    two_shards bus;
    std::vector<double> got[2];
    auto run_shard = [&](int which) {
      const std::int64_t begin = which == 0 ? 0 : split, end = which == 0 ? split : C;
      const tensor xs = make_tensor({N, end - begin}, dtype::float64, columns(x, C, begin, end));
      const tensor ts = make_tensor({N, end - begin}, dtype::float64, columns(target, C, begin, end));
      tensor gt({N, end - begin}, dtype::float64);
      softce::outputs out;
      out.grad_target = gt.mutable_view();
      const softce::class_shard shard = bus.shard(which, begin, C);
      if (which_loss == 0)
        softce::class_parallel::cross_entropy(shard, xs.view(), ts.view(), ce, out);
      else
        softce::class_parallel::distillation_loss(shard, xs.view(), ts.view(), d, out);
      got[which] = gt.values();
    };
    std::thread other(run_shard, 1);
    run_shard(0);
    other.join();
    EXPECT_TRUE(values_near(got[0], columns(want, C, 0, split), array_tolerance(dtype::float64, dtype::float64)));
    EXPECT_TRUE(values_near(got[1], columns(want, C, split, C), array_tolerance(dtype::float64, dtype::float64)));
  }
}

// NaN: a NaN logit poisons the row's target gradient; a NaN target leaves it (the
// derivative does not depend on that value) while the loss is NaN.
TEST(TargetGradient, NaNRules) {
  const tensor x = make_tensor({2, 3}, dtype::float32, {0.5, nan, 1.0, 0.2, 0.1, -0.3});
  const tensor t = make_tensor({2, 3}, dtype::float32, {0.2, 0.3, 0.5, 0.6, nan, 0.4});
  tensor gt({2, 3}, dtype::float32), rgt({2, 3}, dtype::float32);
  softce::cross_entropy_options o;
  o.reduce = reduction::sum;
  softce::outputs out, rout;
  out.grad_target = gt.mutable_view();
  rout.grad_target = rgt.mutable_view();
  EXPECT_TRUE(std::isnan(softce::cross_entropy(x.view(), t.view(), o, out)));
  ref::cross_entropy(x.view(), t.view(), o, rout);
  const std::vector<double> g = gt.values();
  for (int c = 0; c < 3; ++c) EXPECT_TRUE(std::isnan(g[c])) << c;
  for (int c = 3; c < 6; ++c) EXPECT_TRUE(std::isfinite(g[c])) << c;
  EXPECT_TRUE(values_near(g, rgt.values(), array_tolerance(dtype::float32, dtype::float32)));
}

// -log q near the max class is small while lse and x are ~1000: float32 must not compute it
// as lse - x (lse rounded to float loses up to ulp(1000) / 2 = 3e-5), but as (shift - x) + log(sum),
// within the rounding of the float sum near 1 (2^-23) like torch's log_softmax.
TEST(TargetGradient, Float32NearTheMaxClassHasNoCancellation) {
  const tensor x = make_tensor({2, 3}, dtype::float32, {1000.0, 999.5, 990.0, -3.0, 400.25, 400.0});
  const tensor t = make_tensor({2, 3}, dtype::float32, {0.5, 0.25, 0.25, 0.2, 0.3, 0.5});
  const tensor w = make_tensor({3}, dtype::float32, {1.5, -0.5, 2.0});
  softce::cross_entropy_options o;
  o.weight = w.view();
  o.reduce = reduction::sum;
  tensor gt({2, 3}, dtype::float32), rgt({2, 3}, dtype::float64);
  softce::outputs out, rout;
  out.grad_target = gt.mutable_view();
  rout.grad_target = rgt.mutable_view();
  softce::cross_entropy(x.view(), t.view(), o, out);
  ref::cross_entropy(x.view(), t.view(), o, rout);
  const std::vector<double> f = gt.values(), r = rgt.values();
  const double weights[] = {1.5, -0.5, 2.0};
  for (std::size_t i = 0; i < f.size(); ++i)
    EXPECT_NEAR(f[i], r[i], 2 * 0x1p-23 * std::fabs(weights[i % 3]) + 1e-6 * std::fabs(r[i])) << i;
}

TEST(TargetGradient, Errors) {
  const tensor x = make_tensor({2, 3}, dtype::float32, {0.5, 0.1, 1.0, 0.2, 0.1, -0.3});
  const tensor t = make_tensor({2, 3}, dtype::float32, {0.2, 0.3, 0.5, 0.6, 0.0, 0.4});
  const tensor y = make_index_tensor({2}, dtype::int64, {1, 2});
  const std::string apart =
      "; an output may only be exactly the input (in-place gradient) and must not overlap any other array";
  auto expect_error = [](const std::function<void()>& f, const std::string& text) {
    try {
      f();
      ADD_FAILURE() << "no error, expected: " << text;
    } catch (const softce::error& e) {
      EXPECT_EQ(std::string(e.what()), text);
    }
  };
  tensor gt({2, 3}, dtype::float32), small({2, 2}, dtype::float32), ints({2, 3}, dtype::int32);
  softce::outputs out;
  out.grad_target = gt.mutable_view();
  expect_error([&] { softce::cross_entropy(x.view(), y.view(), {}, out); },
               "cross_entropy: grad_target: expected no grad_target with class-index targets (no gradient)");
  const tensor ki = make_index_tensor({2, 1}, dtype::int64, {0, 2});
  const tensor kv = make_tensor({2, 1}, dtype::float32, {0.5, 0.5});
  expect_error([&] { softce::cross_entropy(x.view(), softce::topk{ki.view(), kv.view(), false}, {}, out); },
               "cross_entropy: grad_target: expected no grad_target with top-k targets (only dense probability "
               "targets have one)");
  expect_error([&] { softce::distillation_loss(x.view(), softce::topk{ki.view(), kv.view(), false}, {}, out); },
               "distillation_loss: grad_target: expected no grad_target with a top-k teacher (no teacher logits)");
  softce::outputs wrong;
  wrong.grad_target = small.mutable_view();
  expect_error([&] { softce::kl_div(x.view(), t.view(), {}, wrong); },
               "kl_div: grad_target: expected shape (2, 3) (the target's), got (2, 2)");
  wrong.grad_target = ints.mutable_view();
  expect_error([&] { softce::binary_cross_entropy_with_logits(x.view(), t.view(), {}, wrong); },
               "binary_cross_entropy_with_logits: grad_target: expected a float32, float64, bfloat16 or float16 array, got "
               "int32");
  // aliasing: over the target itself, over the input, over the gradient
  tensor tc = t;
  softce::outputs over_target;
  over_target.grad_target = tc.mutable_view();
  expect_error([&] { softce::cross_entropy(x.view(), tc.view(), {}, over_target); },
               "cross_entropy: grad_target overlaps target" + apart);
  tensor xc = x;
  softce::outputs over_input;
  over_input.grad_target = xc.mutable_view();
  expect_error([&] { softce::distillation_loss(xc.view(), t.view(), {}, over_input); },
               "distillation_loss: grad_target overlaps input" + apart);
  tensor g({2, 3}, dtype::float32);
  softce::outputs both;
  both.grad = g.mutable_view();
  both.grad_target = g.mutable_view();
  expect_error([&] { softce::kl_div(x.view(), t.view(), {}, both); }, "kl_div: grad_target overlaps grad" + apart);
  // nothing written on an error
  EXPECT_TRUE(gt.padding_intact());
}

}  // namespace
}  // namespace softce_test
