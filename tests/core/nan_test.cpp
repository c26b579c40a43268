// NaN and infinities, hunted: for every loss, target form, dtype and option, a NaN (and
// +inf, -inf) is put at random positions of each input in turn, on every SIMD target this
// machine runs, and each row's loss and gradient row are compared with the float64 oracle
// (NaN exactly where the oracle says NaN, within tolerance elsewhere). The contract is the
// "NaN and infinities" section of docs/semantics.md. Plus regression tests: the top-k
// tail past a logit gap of ~88 in float32, and class weights that no row uses.
#include <softce/class_parallel.hpp>

#include <hwy/targets.h>

#include <barrier>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "simd_targets.hpp"
#include "test_support.hpp"

namespace softce_test {
namespace {

using softce::divergence;
using softce::reduction;
namespace ref = softce::reference;

// SIMD targets: runnable_targets() and restore_targets from simd_targets.hpp

// ---------------------------------------------------------------------------------------
// one poisoned call

// The operands of a call as plain values; `build` turns them into the fast and oracle calls.
struct operands {
  std::vector<double> x;        // logits (or kl_div log-probabilities)
  std::vector<double> other;    // probability target, teacher logits, top-k values, kl_div / bce target
  std::vector<double> weight;   // class weights, or bce weight (input's shape)
  std::vector<double> pos_weight;
};

enum class operand { x, other, weight, pos_weight };

const char* operand_name(operand o) {
  switch (o) {
    case operand::x: return "input";
    case operand::other: return "target/teacher";
    case operand::weight: return "weight";
    case operand::pos_weight: return "pos_weight";
  }
  return "?";
}

std::vector<double>& pick(operands& ops, operand o) {
  switch (o) {
    case operand::x: return ops.x;
    case operand::other: return ops.other;
    case operand::weight: return ops.weight;
    case operand::pos_weight: return ops.pos_weight;
  }
  return ops.x;
}

// A family of calls: random clean operands, and the calls built from (poisoned) operands.
struct family {
  std::string name;
  std::vector<operand> poisonable;
  std::vector<double> specials;  // values to put into the poisonable operands
  std::function<operands(std::mt19937_64&, const shape_t&)> make;
  // the fast and oracle calls over `ops` (the input tensor is made by the driver)
  std::function<std::pair<loss_call, loss_call>(const operands&, const shape_t&, dtype)> calls;
  bool row_losses = true;   // reduction none gives per-row losses (else per element)
  bool in_place = true;     // the gradient may be written over the input
  double grad_atol = 0;     // extra absolute gradient tolerance, times compute_rtol
};

std::vector<std::int64_t> random_labels(std::mt19937_64& rng, const shape_t& shape) {
  std::vector<std::int64_t> y(static_cast<std::size_t>(product(row_shape_of(shape))));
  for (auto& v : y) v = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(classes_of(shape)));
  return y;
}

// Tensors that the calls read, kept alive by the calls themselves.
template <class... Args>
std::shared_ptr<tensor> keep(Args&&... args) {
  return std::make_shared<tensor>(make_tensor(std::forward<Args>(args)...));
}

std::optional<array_view> view_or_none(const std::shared_ptr<tensor>& t) {
  if (!t) return std::nullopt;
  return t->view();
}

// ---------------------------------------------------------------------------------------
// the families

family cross_entropy_indices(bool weighted, double smoothing, bool with_ignored_row) {
  family f;
  f.name = std::string("cross_entropy indices") + (weighted ? " weight" : "") +
           (smoothing > 0 ? " smoothing" : "") + (with_ignored_row ? " ignore_index" : "");
  f.poisonable = {operand::x};
  if (weighted) f.poisonable.push_back(operand::weight);
  f.specials = {nan, inf, -inf};
  f.make = [weighted](std::mt19937_64& rng, const shape_t& shape) {
    operands o;
    o.x = normal_values(rng, product(shape), 3.0);
    if (weighted) o.weight = uniform_values(rng, classes_of(shape), 0.2, 2.0);
    return o;
  };
  auto labels = std::make_shared<std::vector<std::int64_t>>();
  f.calls = [=](const operands& o, const shape_t& shape, dtype type) {
    std::mt19937_64 rng(product(shape));
    *labels = random_labels(rng, shape);
    if (with_ignored_row) (*labels)[0] = -100;
    auto y = std::make_shared<tensor>(make_index_tensor(row_shape_of(shape), dtype::int64, *labels));
    auto w = weighted ? keep(shape_t{classes_of(shape)}, type, o.weight) : nullptr;
    softce::cross_entropy_options opt;
    opt.label_smoothing = smoothing;
    opt.reduce = reduction::none;
    loss_call fast = [y, w, opt](const array_view& in, const softce::outputs& out) mutable {
      opt.weight = view_or_none(w);
      return softce::cross_entropy(in, y->view(), opt, out);
    };
    loss_call oracle = [y, w, opt](const array_view& in, const softce::outputs& out) mutable {
      opt.weight = view_or_none(w);
      return ref::cross_entropy(in, y->view(), opt, out);
    };
    return std::make_pair(fast, oracle);
  };
  return f;
}

family cross_entropy_probabilities(bool weighted, double smoothing, bool masked, bool with_probs) {
  family f;
  f.name = std::string(with_probs ? "cross_entropy_with_probs" : "cross_entropy probabilities") +
           (weighted ? " weight" : "") + (smoothing > 0 ? " smoothing" : "") + (masked ? " mask" : "");
  f.poisonable = {operand::x, operand::other};
  if (weighted) f.poisonable.push_back(operand::weight);
  f.specials = {nan, inf, -inf};
  f.make = [weighted](std::mt19937_64& rng, const shape_t& shape) {
    operands o;
    o.x = normal_values(rng, product(shape), 3.0);
    o.other = probability_targets(rng, shape, target_rows::with_zeros);
    if (weighted) o.weight = uniform_values(rng, classes_of(shape), 0.2, 2.0);
    return o;
  };
  f.calls = [=](const operands& o, const shape_t& shape, dtype type) {
    auto t = keep(shape, type, o.other);  // same dtype: bfloat16 takes the in-place bf16 path
    auto w = weighted ? keep(shape_t{classes_of(shape)}, type, o.weight) : nullptr;
    std::shared_ptr<tensor> m;
    if (masked) {
      std::vector<std::int64_t> keep_rows(static_cast<std::size_t>(product(row_shape_of(shape))), 1);
      keep_rows[0] = 0;
      m = std::make_shared<tensor>(make_index_tensor(row_shape_of(shape), dtype::boolean, keep_rows));
    }
    softce::cross_entropy_options opt;
    opt.label_smoothing = smoothing;
    opt.reduce = reduction::none;
    loss_call fast = [=](const array_view& in, const softce::outputs& out) mutable {
      opt.weight = view_or_none(w);
      opt.mask = view_or_none(m);
      if (with_probs) return softce::cross_entropy_with_probs(in, t->view(), opt.weight, opt.reduce, out);
      return softce::cross_entropy(in, t->view(), opt, out);
    };
    loss_call oracle = [=](const array_view& in, const softce::outputs& out) mutable {
      opt.weight = view_or_none(w);
      opt.mask = view_or_none(m);
      if (with_probs) return ref::cross_entropy_with_probs(in, t->view(), opt.weight, opt.reduce, out);
      return ref::cross_entropy(in, t->view(), opt, out);
    };
    return std::make_pair(fast, oracle);
  };
  return f;
}

// Top-k targets (cross-entropy) or a top-k teacher (distillation, kl).
family topk_family(bool distill, bool tail, bool weighted, double smoothing) {
  constexpr std::int64_t K = 3;
  family f;
  f.name = std::string(distill ? "distillation top-k teacher" : "cross_entropy top-k") + (tail ? " tail" : "") +
           (weighted ? " weight" : "") + (smoothing > 0 ? " smoothing" : "");
  f.poisonable = {operand::x, operand::other};
  if (weighted) f.poisonable.push_back(operand::weight);
  f.specials = {nan, inf, -inf};
  auto indices = std::make_shared<std::vector<std::int64_t>>();
  f.make = [=](std::mt19937_64& rng, const shape_t& shape) {
    operands o;
    o.x = normal_values(rng, product(shape), 3.0);
    const topk_data d = random_topk(rng, shape, K, !tail);
    *indices = d.indices;
    o.other = d.values;
    if (weighted) o.weight = uniform_values(rng, classes_of(shape), 0.2, 2.0);
    return o;
  };
  f.calls = [=](const operands& o, const shape_t& shape, dtype type) {
    shape_t kshape = row_shape_of(shape);
    kshape.push_back(K);
    auto ix = std::make_shared<tensor>(make_index_tensor(kshape, dtype::int64, *indices));
    auto vs = keep(kshape, type, o.other);
    auto w = weighted ? keep(shape_t{classes_of(shape)}, type, o.weight) : nullptr;
    auto make_topk = [ix, vs, tail] {
      softce::topk k;
      k.indices = ix->view();
      k.values = vs->view();
      k.tail = tail;
      return k;
    };
    if (distill) {
      softce::distillation_options opt;
      opt.dim = 1;  // PyTorch's (N, C, d1, ...) layout for the 3-d shapes
      opt.reduce = reduction::none;
      opt.temperature = 2.0;
      loss_call fast = [=](const array_view& in, const softce::outputs& out) {
        return softce::distillation_loss(in, make_topk(), opt, out);
      };
      loss_call oracle = [=](const array_view& in, const softce::outputs& out) {
        return ref::distillation_loss(in, make_topk(), opt, out);
      };
      return std::make_pair(fast, oracle);
    }
    softce::cross_entropy_options opt;
    opt.label_smoothing = smoothing;
    opt.reduce = reduction::none;
    loss_call fast = [=](const array_view& in, const softce::outputs& out) mutable {
      opt.weight = view_or_none(w);
      return softce::cross_entropy(in, make_topk(), opt, out);
    };
    loss_call oracle = [=](const array_view& in, const softce::outputs& out) mutable {
      opt.weight = view_or_none(w);
      return ref::cross_entropy(in, make_topk(), opt, out);
    };
    return std::make_pair(fast, oracle);
  };
  return f;
}

family distillation_dense(divergence kind, double beta, double temperature) {
  family f;
  f.name = std::string("distillation ") + divergence_text(kind) + " beta " + std::to_string(beta) + " T " +
           std::to_string(temperature);
  f.poisonable = {operand::x, operand::other};
  f.specials = {nan, inf, -inf};
  f.grad_atol = 8;  // reverse KL / JSD gradients carry q (log q - log p): terms of the logits' spread
  f.make = [](std::mt19937_64& rng, const shape_t& shape) {
    operands o;
    o.x = normal_values(rng, product(shape), 2.0);
    o.other = normal_values(rng, product(shape), 2.0);
    return o;
  };
  f.calls = [=](const operands& o, const shape_t& shape, dtype type) {
    auto z = keep(shape, type, o.other);
    softce::distillation_options opt;
    opt.dim = 1;  // PyTorch's (N, C, d1, ...) layout for the 3-d shapes
    opt.reduce = reduction::none;
    opt.kind = kind;
    opt.beta = beta;
    opt.temperature = temperature;
    loss_call fast = [=](const array_view& in, const softce::outputs& out) {
      return softce::distillation_loss(in, z->view(), opt, out);
    };
    loss_call oracle = [=](const array_view& in, const softce::outputs& out) {
      return ref::distillation_loss(in, z->view(), opt, out);
    };
    return std::make_pair(fast, oracle);
  };
  return f;
}

family kl_div_family(bool log_target) {
  family f;
  f.name = std::string("kl_div") + (log_target ? " log_target" : "");
  f.poisonable = {operand::x, operand::other};
  f.specials = {nan, inf, -inf};
  f.row_losses = false;
  f.make = [log_target](std::mt19937_64& rng, const shape_t& shape) {
    operands o;
    o.x = log_softmax_rows(normal_values(rng, product(shape), 2.0), shape);
    o.other = probability_targets(rng, shape, target_rows::with_zeros);
    if (log_target)
      for (auto& v : o.other) v = std::log(v);
    return o;
  };
  f.calls = [=](const operands& o, const shape_t& shape, dtype type) {
    auto t = keep(shape, type, o.other);
    softce::kl_div_options opt;
    opt.reduce = reduction::none;
    opt.log_target = log_target;
    loss_call fast = [=](const array_view& in, const softce::outputs& out) { return softce::kl_div(in, t->view(), opt, out); };
    loss_call oracle = [=](const array_view& in, const softce::outputs& out) { return ref::kl_div(in, t->view(), opt, out); };
    return std::make_pair(fast, oracle);
  };
  return f;
}

family bce_family(bool weighted, bool pos_weighted) {
  family f;
  f.name = std::string("binary_cross_entropy_with_logits") + (weighted ? " weight" : "") +
           (pos_weighted ? " pos_weight" : "");
  f.poisonable = {operand::x, operand::other};
  if (weighted) f.poisonable.push_back(operand::weight);
  if (pos_weighted) f.poisonable.push_back(operand::pos_weight);
  f.specials = {nan, inf, -inf};
  f.row_losses = false;
  f.grad_atol = 4;  // weight up to 2 times pos_weight up to 3
  f.make = [=](std::mt19937_64& rng, const shape_t& shape) {
    operands o;
    o.x = normal_values(rng, product(shape), 3.0);
    o.other = uniform_values(rng, product(shape), 0, 1);
    if (weighted) o.weight = uniform_values(rng, product(shape), 0, 2);
    if (pos_weighted) o.pos_weight = uniform_values(rng, classes_of(shape), 0.2, 3);
    return o;
  };
  f.calls = [=](const operands& o, const shape_t& shape, dtype type) {
    auto t = keep(shape, type, o.other);
    auto w = weighted ? keep(shape, type, o.weight) : nullptr;
    auto pw = pos_weighted ? keep(shape_t{shape.back()}, type, o.pos_weight) : nullptr;
    loss_call fast = [=](const array_view& in, const softce::outputs& out) {
      softce::bce_options opt;
      opt.reduce = reduction::none;
      opt.weight = view_or_none(w);
      opt.pos_weight = view_or_none(pw);
      return softce::binary_cross_entropy_with_logits(in, t->view(), opt, out);
    };
    loss_call oracle = [=](const array_view& in, const softce::outputs& out) {
      softce::bce_options opt;
      opt.reduce = reduction::none;
      opt.weight = view_or_none(w);
      opt.pos_weight = view_or_none(pw);
      return ref::binary_cross_entropy_with_logits(in, t->view(), opt, out);
    };
    return std::make_pair(fast, oracle);
  };
  return f;
}

std::vector<family> all_families() {
  std::vector<family> fs;
  for (bool weighted : {false, true})
    for (double eps : {0.0, 0.1}) {
      fs.push_back(cross_entropy_indices(weighted, eps, false));
      fs.push_back(cross_entropy_probabilities(weighted, eps, false, false));
    }
  fs.push_back(cross_entropy_indices(true, 0.0, true));
  fs.push_back(cross_entropy_probabilities(false, 0.0, true, false));
  fs.push_back(cross_entropy_probabilities(true, 0.0, false, true));
  for (bool tail : {false, true}) {
    fs.push_back(topk_family(false, tail, false, 0.0));
    fs.push_back(topk_family(true, tail, false, 0.0));
  }
  fs.push_back(topk_family(false, false, true, 0.0));
  fs.push_back(topk_family(false, false, false, 0.1));
  fs.push_back(distillation_dense(divergence::kl, 0.5, 1.0));
  fs.push_back(distillation_dense(divergence::kl, 0.5, 2.0));
  fs.push_back(distillation_dense(divergence::reverse_kl, 0.5, 1.0));
  fs.push_back(distillation_dense(divergence::jsd, 0.5, 2.0));
  fs.push_back(distillation_dense(divergence::jsd, 1.0, 1.0));
  fs.push_back(kl_div_family(false));
  fs.push_back(kl_div_family(true));
  fs.push_back(bce_family(false, false));
  fs.push_back(bce_family(true, true));
  return fs;
}

// Puts `value` at 1-2 random positions of `v`; returns their description.
std::string sprinkle(std::mt19937_64& rng, std::vector<double>& v, double value) {
  std::string note;
  const int count = 1 + static_cast<int>(rng() % 2);
  for (int i = 0; i < count; ++i) {
    const std::size_t at = static_cast<std::size_t>(rng() % v.size());
    v[at] = value;
    note += " [" + std::to_string(at) + "]=" + std::to_string(value);
  }
  return note;
}

// Every family, operand and special value on the current target, over `types` and `shapes`.
int hunt(const std::vector<dtype>& types, const std::vector<shape_t>& shapes, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  int cases = 0;
  int in_place_turn = 0;
  for (const family& f : all_families())
    for (dtype type : types)
      for (const shape_t& shape : shapes) {
        const operands clean = f.make(rng, shape);
        for (operand which : f.poisonable)
          for (double special : f.specials) {
            operands ops = clean;
            const std::string note = sprinkle(rng, pick(ops, which), special);
            SCOPED_TRACE(f.name + " " + name_of(type) + " " + shape_text(shape) + ": " + operand_name(which) + note);
            const tensor x = make_tensor(shape, type, ops.x);
            const auto [fast, oracle] = f.calls(ops, shape, type);
            output_request req;
            req.grad = true;
            req.grad_type = type;
            req.in_place = f.in_place && ++in_place_turn % 3 == 0;
            req.losses = true;
            req.losses_type = dtype::float64;
            req.losses_shape = f.row_losses ? row_shape_of(shape) : shape;
            expect_matches_reference(fast, oracle, x, req, f.grad_atol * compute_rtol(type));
            ++cases;
            if (::testing::Test::HasFailure()) return cases;  // one failing case says enough
          }
      }
  return cases;
}

TEST(NaN, EveryLossOnTheBestTarget) {
  // 26 families, 2-4 operands, 3 values, 4 dtypes, 4 shapes (rows of (N, C, d) too; (6, 7):
  // rows of one vector, SmallTargetRows)
  EXPECT_GE(hunt({dtype::float32, dtype::float64, dtype::bfloat16, dtype::float16}, {{4, 37}, {3, 2100}, {2, 9, 3}, {6, 7}}, 91),
            1000);
}

// The other targets: float32 and float64 (16-bit inputs are widened before the kernels).
TEST(NaN, EveryLossOnEveryTarget) {
  restore_targets restore;
  const std::vector<std::int64_t> targets = runnable_targets();
  for (std::size_t i = 1; i < targets.size(); ++i) {
    hwy::SetSupportedTargetsForTest(targets[i]);
    SCOPED_TRACE(hwy::TargetName(targets[i]));
    ASSERT_EQ(softce::simd_target(), hwy::TargetName(targets[i]));
    EXPECT_GE(hunt({dtype::float32, dtype::float64}, {{4, 37}, {2, 1100}, {6, 7}}, 92 + i), 500);
    if (::testing::Test::HasFailure()) return;
  }
}

// The hunt must be able to fail: a NaN logit in index cross-entropy gives its row NaN and
// leaves the other rows finite (the examples of issue 9, checked directly).
TEST(NaN, ExamplesFromTheIssue) {
  std::vector<double> x = {1, 2, 3, nan, 2, 3};
  const tensor xt = make_tensor({2, 3}, dtype::float32, x);
  const tensor y = make_index_tensor({2}, dtype::int64, {1, 1});
  std::vector<float> g(6), l(2);
  softce::outputs out;
  out.grad = mutable_array_view{g.data(), dtype::float32, 2, {2, 3}, {3, 1}};
  out.losses = mutable_array_view{l.data(), dtype::float32, 1, {2}, {1}};
  softce::cross_entropy_options opt;
  opt.reduce = reduction::none;
  softce::cross_entropy(xt.view(), y.view(), opt, out);
  EXPECT_TRUE(std::isfinite(l[0]));
  EXPECT_TRUE(std::isnan(l[1]));
  for (int c = 0; c < 3; ++c) {
    EXPECT_TRUE(std::isfinite(g[c]));
    EXPECT_TRUE(std::isnan(g[3 + c])) << c;
  }
  // kl_div with log_target and a NaN target: NaN loss and gradient (was 0 and -0)
  const tensor in = make_tensor({3}, dtype::float32, {-1.0, -1.5, -0.9});
  const tensor t = make_tensor({3}, dtype::float32, {-1.2, nan, -0.7});
  std::vector<float> kg(3);
  softce::outputs kout;
  kout.grad = mutable_array_view{kg.data(), dtype::float32, 1, {3}, {1}};
  softce::kl_div_options kopt;
  kopt.log_target = true;
  kopt.reduce = reduction::sum;
  EXPECT_TRUE(std::isnan(softce::kl_div(in.view(), t.view(), kopt, kout)));
  EXPECT_TRUE(std::isnan(kg[1]));
  EXPECT_TRUE(std::isfinite(kg[0]));
}

// ---------------------------------------------------------------------------------------
// regression: the top-k tail past a logit gap of ~88 (float32 exps of the tail underflow)

void expect_topk_tail_matches(dtype type, double gap, double temperature, bool in_place, bool distill) {
  SCOPED_TRACE(std::string(name_of(type)) + " gap " + std::to_string(gap) + " T " + std::to_string(temperature) +
               (in_place ? " in place" : "") + (distill ? " distillation" : " cross_entropy"));
  const shape_t shape{3, 1500};  // two chunks: the top k in the first, the max of the tail in the second
  std::mt19937_64 rng(7);
  std::vector<double> x = normal_values(rng, product(shape), 1.0);
  std::vector<std::int64_t> idx;
  std::vector<double> vals;
  for (std::int64_t r = 0; r < 3; ++r) {
    for (std::int64_t j = 0; j < 2; ++j) {
      const std::int64_t c = 10 + 7 * j + r;
      x[flat_index(shape, r, c)] = gap + static_cast<double>(j);  // the top k, far above the rest
      idx.push_back(c);
      vals.push_back(j == 0 ? 0.5 : 0.3);  // tau = 0.2
    }
  }
  const tensor xt = make_tensor(shape, type, x);
  const tensor it = make_index_tensor({3, 2}, dtype::int64, idx);
  const tensor vt = make_tensor({3, 2}, type, vals);
  softce::topk k;
  k.indices = it.view();
  k.values = vt.view();
  k.tail = true;
  output_request req;
  req.grad = true;
  req.grad_type = type;
  req.in_place = in_place;
  req.losses = true;
  req.losses_shape = {3};
  loss_call fast, oracle;
  if (distill) {
    softce::distillation_options opt;
    opt.reduce = reduction::none;
    opt.temperature = temperature;
    fast = [=](const array_view& in, const softce::outputs& o) { return softce::distillation_loss(in, k, opt, o); };
    oracle = [=](const array_view& in, const softce::outputs& o) { return ref::distillation_loss(in, k, opt, o); };
  } else {
    softce::cross_entropy_options opt;
    opt.reduce = reduction::none;
    fast = [=](const array_view& in, const softce::outputs& o) { return softce::cross_entropy(in, k, opt, o); };
    oracle = [=](const array_view& in, const softce::outputs& o) { return ref::cross_entropy(in, k, opt, o); };
  }
  const call_result f = run_call(fast, xt, req);
  const call_result r = run_call(oracle, xt, req);
  ASSERT_TRUE(std::isfinite(r.loss));
  EXPECT_TRUE(std::isfinite(f.loss)) << f.loss;
  EXPECT_TRUE(loss_near(f.loss, r.loss, loss_tolerance(type)));
  EXPECT_TRUE(values_near(f.losses, r.losses, array_tolerance(type, dtype::float64), "losses"));
  EXPECT_TRUE(values_near(f.grad, r.grad, array_tolerance(type, type), "grad"));
  // without a gradient the rows take the uncached path (the tail summed again from the row)
  output_request losses_only;
  losses_only.losses = true;
  losses_only.losses_shape = {3};
  const call_result fl = run_call(fast, xt, losses_only);
  EXPECT_TRUE(values_near(fl.losses, r.losses, array_tolerance(type, dtype::float64), "losses without grad"));
  // the tail entries' gradient, -tau q_c / (1 - Q) + a q_c, is not all flushed to zero
  double tail_grad = 0;
  for (std::int64_t c = 100; c < 1500; ++c) tail_grad += std::fabs(f.grad[static_cast<std::size_t>(flat_index(shape, 0, c))]);
  EXPECT_GT(tail_grad, 0.0);
}

TEST(NaN, TopKTailPastTheFloatExpRange) {
  for (dtype type : {dtype::float32, dtype::float64})
    for (double gap : {30.0, 60.0, 95.0, 300.0, 2000.0})
      for (bool in_place : {false, true})
        for (bool distill : {false, true}) {
          if (type == dtype::float32 && gap > 1000) continue;  // float32 logits: 2000 stays in range, but once is enough
          expect_topk_tail_matches(type, gap, distill ? 2.0 : 1.0, in_place, distill);
        }
}

// ---------------------------------------------------------------------------------------
// regression: a NaN or inf weight of a class that no row uses

TEST(NaN, UnusedClassWeightDoesNotReachTheRows) {
  const shape_t shape{4, 6};
  std::mt19937_64 rng(3);
  const tensor x = make_tensor(shape, dtype::float32, normal_values(rng, product(shape), 2.0));
  const tensor y = make_index_tensor({4}, dtype::int64, {0, 1, 2, 1});  // classes 3..5 unused
  for (double bad : {nan, inf, -inf}) {
    SCOPED_TRACE(bad);
    const tensor w = make_tensor({6}, dtype::float32, {0.5, 1.5, 2.0, 1.0, bad, 1.0});
    const tensor w_clean = make_tensor({6}, dtype::float32, {0.5, 1.5, 2.0, 1.0, 1.0, 1.0});
    for (reduction mode : {reduction::none, reduction::sum, reduction::mean}) {
      softce::cross_entropy_options opt;
      opt.reduce = mode;
      opt.weight = w.view();
      softce::cross_entropy_options clean = opt;
      clean.weight = w_clean.view();
      output_request req;
      req.grad = true;
      req.losses = mode == reduction::none;
      req.losses_shape = {4};
      const call_result f = run_call(
          [&](const array_view& in, const softce::outputs& o) { return softce::cross_entropy(in, y.view(), opt, o); }, x,
          req);
      const call_result c = run_call(
          [&](const array_view& in, const softce::outputs& o) { return softce::cross_entropy(in, y.view(), clean, o); },
          x, req);
      EXPECT_TRUE(std::isfinite(f.loss));
      EXPECT_EQ(f.loss, c.loss);  // the weight of an unused class changes nothing at all
      EXPECT_EQ(f.grad, c.grad);
      EXPECT_EQ(f.losses, c.losses);
      expect_matches_reference(
          [&](const array_view& in, const softce::outputs& o) { return softce::cross_entropy(in, y.view(), opt, o); },
          [&](const array_view& in, const softce::outputs& o) { return ref::cross_entropy(in, y.view(), opt, o); }, x,
          req);
    }
    // with label smoothing every class's weight is used by every row (as torch): all NaN
    softce::cross_entropy_options smooth;
    smooth.reduce = reduction::none;
    smooth.label_smoothing = 0.1;
    smooth.weight = w.view();
    std::vector<double> losses(4);
    output_request req;
    req.grad = true;
    req.losses = true;
    req.losses_shape = {4};
    const call_result f = run_call(
        [&](const array_view& in, const softce::outputs& o) { return softce::cross_entropy(in, y.view(), smooth, o); }, x,
        req);
    for (double l : f.losses) EXPECT_TRUE(std::isnan(l));
    for (double g : f.grad) EXPECT_TRUE(std::isnan(g));
  }
  // an ignored row uses no weight: its class's NaN weight changes nothing
  const tensor y_ignored = make_index_tensor({4}, dtype::int64, {0, 1, -100, 1});
  const tensor w = make_tensor({6}, dtype::float32, {0.5, 1.5, nan, 1.0, 1.0, 1.0});
  softce::cross_entropy_options opt;
  opt.weight = w.view();
  EXPECT_TRUE(std::isfinite(softce::cross_entropy(x.view(), y_ignored.view(), opt, {})));
}

// ---------------------------------------------------------------------------------------
// class-parallel: a poisoned row stays poisoned through the all-reduce of two shards, and
// shard offsets are overflow-checked

// Two shards in two threads; all_reduce merges shard 0's records with shard 1's (in shard
// order) and hands both the result.
TEST(NaN, ClassParallelShardsKeepAPoisonedRowPoisoned) {
  const std::int64_t N = 4, C = 40, split = 17;
  std::mt19937_64 rng(5);
  std::vector<double> x = normal_values(rng, N * C, 3.0), z = normal_values(rng, N * C, 3.0);
  x[1 * C + 30] = nan;  // row 1: NaN on shard 1
  x[2 * C + 3] = inf;   // row 2: +inf on shard 0
  z[3 * C + 25] = nan;  // row 3: NaN teacher logit on shard 1
  const tensor y = make_index_tensor({N}, dtype::int64, {5, 20, 33, 2});
  const tensor xt = make_tensor({N, C}, dtype::float32, x), zt = make_tensor({N, C}, dtype::float32, z);
  // the oracle over all classes
  std::vector<double> ref_ce(N), ref_kl(N);
  softce::cross_entropy_options ce;
  ce.reduce = reduction::none;
  softce::distillation_options kl;
  kl.reduce = reduction::none;
  ref::cross_entropy(xt.view(), y.view(), ce, {{}, mutable_array_view{ref_ce.data(), dtype::float64, 1, {N}, {1}}});
  ref::distillation_loss(xt.view(), zt.view(), kl, {{}, mutable_array_view{ref_kl.data(), dtype::float64, 1, {N}, {1}}});
  // the shards
  two_shards bus;
  std::vector<double> ce_rows[2], kl_rows[2];
  auto run = [&](int which) {
    const std::int64_t begin = which == 0 ? 0 : split, end = which == 0 ? split : C;
    const tensor xs = make_tensor({N, end - begin}, dtype::float32, columns(x, C, begin, end));
    const tensor zs = make_tensor({N, end - begin}, dtype::float32, columns(z, C, begin, end));
    const softce::class_shard shard = bus.shard(which, begin, C);
    ce_rows[which].assign(N, 0.0);
    kl_rows[which].assign(N, 0.0);
    softce::class_parallel::cross_entropy(shard, xs.view(), y.view(), ce,
                                          {{}, mutable_array_view{ce_rows[which].data(), dtype::float64, 1, {N}, {1}}});
    softce::class_parallel::distillation_loss(
        shard, xs.view(), zs.view(), kl, {{}, mutable_array_view{kl_rows[which].data(), dtype::float64, 1, {N}, {1}}});
  };
  std::thread other(run, 1);
  run(0);
  other.join();
  for (int which : {0, 1}) {
    SCOPED_TRACE(which);
    for (std::int64_t r = 0; r < N; ++r) {
      SCOPED_TRACE(r);
      EXPECT_TRUE(loss_near(ce_rows[which][r], ref_ce[r], loss_tolerance(dtype::float32)));
      EXPECT_TRUE(loss_near(kl_rows[which][r], ref_kl[r], loss_tolerance(dtype::float32)));
    }
    EXPECT_TRUE(std::isnan(ce_rows[which][1]) && std::isnan(ce_rows[which][2]) && std::isfinite(ce_rows[which][0]));
    EXPECT_TRUE(std::isnan(kl_rows[which][3]) && std::isfinite(kl_rows[which][0]));
  }
}

// The top-k tail past the float exp range, summed on two shards (the top k on shard 0,
// 100 above every other logit): each shard's tail against its own max, merged exactly.
TEST(NaN, ClassParallelTopKTailPastTheFloatExpRange) {
  const std::int64_t N = 2, C = 40, split = 17;
  std::mt19937_64 rng(6);
  std::vector<double> x = normal_values(rng, N * C, 1.0);
  x[0 * C + 3] = 100;
  x[1 * C + 5] = 101;
  const tensor xt = make_tensor({N, C}, dtype::float32, x);
  const tensor it = make_index_tensor({N, 1}, dtype::int64, {3, 5});
  const tensor vt = make_tensor({N, 1}, dtype::float32, {0.7, 0.6});
  softce::topk k;
  k.indices = it.view();
  k.values = vt.view();
  k.tail = true;
  softce::cross_entropy_options opt;
  opt.reduce = reduction::none;
  std::vector<double> ref_rows(N), ref_grad(N * C);
  ref::cross_entropy(xt.view(), k, opt,
                     {mutable_array_view{ref_grad.data(), dtype::float64, 2, {N, C}, {C, 1}},
                      mutable_array_view{ref_rows.data(), dtype::float64, 1, {N}, {1}}});
  two_shards bus;
  std::vector<double> rows[2], grads[2];
  auto run = [&](int which) {
    const std::int64_t begin = which == 0 ? 0 : split, end = which == 0 ? split : C;
    const tensor xs = make_tensor({N, end - begin}, dtype::float32, columns(x, C, begin, end));
    rows[which].assign(N, 0.0);
    grads[which].assign(static_cast<std::size_t>(N * (end - begin)), 0.0);
    softce::class_parallel::cross_entropy(
        bus.shard(which, begin, C), xs.view(), k, opt,
        {mutable_array_view{grads[which].data(), dtype::float64, 2, {N, end - begin}, {end - begin, 1}},
         mutable_array_view{rows[which].data(), dtype::float64, 1, {N}, {1}}});
  };
  std::thread other(run, 1);
  run(0);
  other.join();
  EXPECT_TRUE(values_near(rows[0], ref_rows, array_tolerance(dtype::float32, dtype::float64), "losses shard 0"));
  EXPECT_TRUE(values_near(rows[1], ref_rows, array_tolerance(dtype::float32, dtype::float64), "losses shard 1"));
  EXPECT_TRUE(values_near(grads[0], columns(ref_grad, C, 0, split), array_tolerance(dtype::float32, dtype::float64),
                          "grad shard 0"));
  EXPECT_TRUE(values_near(grads[1], columns(ref_grad, C, split, C), array_tolerance(dtype::float32, dtype::float64),
                          "grad shard 1"));
  EXPECT_TRUE(std::isfinite(rows[0][0]) && std::isfinite(rows[0][1]));
}

// A temperature so small that 1 / T overflows float32 would make every row NaN from finite
// logits: refused.
TEST(NaN, TemperatureWithAnInfiniteReciprocalIsAnError) {
  const tensor x = make_tensor({2, 3}, dtype::float32, {1, 2, 3, 4, 5, 6});
  softce::distillation_options opt;
  opt.temperature = 1e-39;
  try {
    softce::distillation_loss(x.view(), x.view(), opt);
    ADD_FAILURE() << "no error";
  } catch (const softce::error& e) {
    EXPECT_EQ(std::string(e.what()),
              "distillation_loss: temperature: expected a value whose reciprocal is finite in float32, got 1e-39");
  }
  opt.temperature = 1e-30;  // still fine
  EXPECT_TRUE(std::isfinite(softce::distillation_loss(x.view(), x.view(), opt)));
}

TEST(NaN, ShardOffsetOverflowIsAnError) {
  const tensor x = make_tensor({2, 3}, dtype::float32, {1, 2, 3, 4, 5, 6});
  const tensor y = make_index_tensor({2}, dtype::int64, {0, 1});
  softce::class_shard shard;
  shard.class_offset = std::numeric_limits<std::int64_t>::max() - 1;
  shard.num_classes = std::numeric_limits<std::int64_t>::max();
  shard.all_reduce = [](double*, std::int64_t, int, softce::row_stats_merge_fn) {};
  try {
    softce::class_parallel::cross_entropy(shard, x.view(), y.view());
    ADD_FAILURE() << "no error";
  } catch (const softce::error& e) {
    EXPECT_EQ(std::string(e.what()),
              "cross_entropy: shard: class_offset 9223372036854775806 plus 3 classes overflows a 64-bit index");
  }
}

}  // namespace
}  // namespace softce_test
