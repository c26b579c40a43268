// Differential fuzzer of the library API: random calls of every loss against the float64
// oracle (tests/oracle/reference.cpp).
//
// Each case draws a loss, a target kind, shapes (empty, one row, odd class counts, rows
// longer than a kernel chunk), dtypes, memory layouts (padded, permuted, negative strides),
// options, outputs (in place, other dtypes, per-row losses), a thread count, and special
// values (NaN, +inf, -inf) placed in any input. The fast call must agree with the oracle to
// the tolerances of the core tests, NaN where the oracle has NaN. A second family of cases
// places an output over an input (or two outputs over each other) at a random offset: an
// exact in-place gradient must compute the oracle's numbers, any other overlap must be
// refused with softce::error, and a refused call must leave every output untouched.
//
// Budget: SOFTCE_FUZZ_SECONDS (default 5: the CI smoke run; scripts/fuzz-api.sh runs it for
// 30 minutes with random seeds), SOFTCE_FUZZ_SEED (default 1, so CI is repeatable). A
// failure prints the case seed; SOFTCE_FUZZ_CASE=<seed> replays exactly that case;
// SOFTCE_FUZZ_KEEP_GOING=1 goes on after a failure (to survey a whole class of them).
#include <chrono>
#include <cstdlib>
#include <string>
#include <vector>

#include "test_support.hpp"

namespace softce_test {
namespace {

namespace ref = softce::reference;
using softce::divergence;
using softce::reduction;

std::uint64_t env_u64(const char* name, std::uint64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 10) : fallback;
}

template <class T>
T pick(std::mt19937_64& rng, std::initializer_list<T> items) {
  return items.begin()[rng() % items.size()];
}

dtype random_float(std::mt19937_64& rng) {
  // float32 most often: it is what users pass and where the SIMD paths are widest
  const auto p = rng() % 8;
  return p < 4 ? dtype::float32 : p < 6 ? dtype::float64 : p == 6 ? dtype::bfloat16 : dtype::float16;
}

// Logits of `shape`: (C,), (N, C) or (N, C, d...) with class counts that hit every kernel
// path (one class, partial vectors, several vectors, more than one chunk).
shape_t random_logits_shape(std::mt19937_64& rng, int max_ndim) {
  const std::int64_t C = pick<std::int64_t>(rng, {1, 2, 3, 7, 16, 33, 100, 257, 1000, 4099});
  const int ndim = 1 + static_cast<int>(rng() % max_ndim);
  if (ndim == 1) return {C};
  shape_t s{pick<std::int64_t>(rng, {0, 1, 2, 3, 5}), C};
  for (int d = 2; d < ndim; ++d) s.push_back(1 + static_cast<std::int64_t>(rng() % 3));
  if (C >= 1000 && s[0] > 2) s[0] = 2;  // keep a case below a millisecond or so
  return s;
}

// Which special values an input may hold: NaN anywhere (it must come out as NaN), infinities
// only where they mean something (a masked logit, a zero probability as a log-target, a
// weight); an infinite probability is outside every loss's domain.
enum class specials { nan_only, nan_and_inf, nan_and_minus_inf };

// Overwrites a few elements with special values, sometimes.
void sprinkle_specials(std::mt19937_64& rng, std::vector<double>& v, std::string& note, const char* name,
                       specials allowed) {
  if (v.empty() || rng() % 3 != 0) return;
  const int count = 1 + static_cast<int>(rng() % 3);
  for (int i = 0; i < count; ++i) {
    const std::size_t at = rng() % v.size();
    double special = nan;
    if (allowed == specials::nan_and_inf) special = pick<double>(rng, {nan, inf, -inf, -inf});
    if (allowed == specials::nan_and_minus_inf) special = pick<double>(rng, {nan, -inf, -inf});
    v[at] = special;
    note += std::string(" ") + name + "[" + std::to_string(at) + "]=" + std::to_string(special);
  }
}

std::vector<double> random_logits(std::mt19937_64& rng, std::int64_t n) {
  // from gentle to gaps far beyond exp's float32 range
  const double scale = pick<double>(rng, {0.1, 1.0, 3.0, 30.0, 120.0});
  const double shift = pick<double>(rng, {0.0, 0.0, 50.0, -1000.0});
  return normal_values(rng, n, scale, shift);
}

// Largest minus smallest finite value (0 without any).
double finite_spread(const std::vector<double>& v) {
  double lo = inf, hi = -inf;
  for (double x : v)
    if (std::isfinite(x)) lo = std::min(lo, x), hi = std::max(hi, x);
  return hi >= lo ? hi - lo : 0;
}

reduction random_reduction(std::mt19937_64& rng, bool batchmean) {
  return batchmean ? pick(rng, {reduction::none, reduction::mean, reduction::sum, reduction::batchmean})
                   : pick(rng, {reduction::none, reduction::mean, reduction::sum});
}

// Per-row losses have the row shape; the element-wise losses, the input's shape.
struct fuzz_case {
  std::string description;
  tensor input;
  softce_test::loss_call fast, oracle;
  bool per_element = false;
  reduction reduce = reduction::mean;
  double grad_atol = 0;
  // A row's loss is a difference of terms of size ~ log C (times T^2 for distillation):
  // an absolute allowance of a rounding of those terms per row summed.
  double loss_atol = 0;
  // the arrays the calls read besides the input (kept alive with the case)
  std::vector<tensor> keep;
  std::vector<softce::topk> topks;
  // outputs.grad_target applies (a dense target or teacher of the input's shape), with the
  // allowance for its cancellation (lse - x, log t - x: roundings of the largest term)
  bool target_gradient = false;
  double target_grad_atol = 0;
};

// One random valid call. The lambdas capture views into `c.keep`, which is reserved up front
// so that the views stay valid.
void make_case(std::mt19937_64& rng, fuzz_case& c) {
  c.keep.reserve(8);
  c.topks.reserve(1);
  // 0-2 cross_entropy (index, probability, top-k), 3 kl_div, 4 bce, 5-6 distillation
  const int kind = static_cast<int>(rng() % 7);
  const dtype type = random_float(rng);
  const bool distill = kind >= 5;
  // 3-d and wider distillation inputs need the class dimension named; they are covered in
  // the core tests, the fuzzer keeps (C,) and (N, C).
  const shape_t shape = random_logits_shape(rng, distill ? 2 : 4);
  const shape_t rows = row_shape_of(shape);
  const std::int64_t C = classes_of(shape), n = product(shape), R = product(rows);
  std::string note;
  std::vector<double> x = random_logits(rng, n);
  sprinkle_specials(rng, x, note, "x", specials::nan_and_inf);
  c.input = make_tensor(shape, type, x, random_layout(rng, static_cast<int>(shape.size())));
  // lse - x_c rounds like the logits' magnitude (a shift of -1000 leaves ~1e-13 in float64
  // on a loss of 1e-7): a few units of the arithmetic's precision times the largest logit
  const double arithmetic_unit = type == dtype::float64 ? 0x1p-52 : 0x1p-23;
  c.loss_atol = 4 * arithmetic_unit * max_abs(x);
  auto add = [&](tensor t) -> const tensor& {
    c.keep.push_back(std::move(t));
    return c.keep.back();
  };
  auto optional_mask = [&]() -> std::optional<array_view> {
    if (rng() % 3 != 0) return std::nullopt;
    std::vector<std::int64_t> m(static_cast<std::size_t>(R));
    for (auto& b : m) b = rng() % 4 != 0;
    return add(make_index_tensor(rows, dtype::boolean, m, random_layout(rng, static_cast<int>(rows.size())))).view();
  };
  // A gradient element is a difference of terms of size ~ weight (q A - w t', sigma(x) - t):
  // float32 arithmetic leaves a rounding of those terms even where the difference is tiny.
  c.grad_atol = 2 * compute_rtol(type);
  auto class_weight = [&]() -> std::optional<array_view> {
    if (rng() % 3 != 0) return std::nullopt;
    std::vector<double> w = uniform_values(rng, C, 0.0, 2.0);
    c.grad_atol = 4 * compute_rtol(type);  // weights up to 2
    if (rng() % 4 == 0) w[rng() % w.size()] = 0;
    sprinkle_specials(rng, w, note, "weight", specials::nan_and_inf);
    return add(make_tensor({C}, pick(rng, {type, dtype::float64}), w)).view();
  };
  const std::string shape_note = c.input.describe();

  if (kind <= 2) {  // cross_entropy: index, probability, top-k targets
    softce::cross_entropy_options o;
    o.reduce = random_reduction(rng, false);
    c.reduce = o.reduce;
    if (kind == 0) {
      // ignore_index: the default -100, or a real class (which then never counts)
      if (rng() % 4 == 0) o.ignore_index = static_cast<std::int64_t>(rng() % C);
      std::vector<std::int64_t> y(static_cast<std::size_t>(R));
      for (auto& v : y) v = rng() % 6 == 0 ? o.ignore_index : static_cast<std::int64_t>(rng() % C);
      o.weight = class_weight();
      if (rng() % 2) o.label_smoothing = pick<double>(rng, {0.1, 0.5, 1.0});
      const tensor& t = add(make_index_tensor(rows, pick(rng, {dtype::int32, dtype::int64}), y));
      c.description = "cross_entropy index targets";
      c.fast = [o, v = t.view()](const array_view& in, const softce::outputs& out) { return softce::cross_entropy(in, v, o, out); };
      c.oracle = [o, v = t.view()](const array_view& in, const softce::outputs& out) { return ref::cross_entropy(in, v, o, out); };
    } else if (kind == 1) {
      std::vector<double> t = probability_targets(rng, shape);
      sprinkle_specials(rng, t, note, "target", specials::nan_only);
      o.weight = class_weight();
      o.mask = optional_mask();
      if (rng() % 3 == 0) o.label_smoothing = pick<double>(rng, {0.1, 1.0});
      const bool snorkel = !o.mask && o.label_smoothing == 0 && rng() % 3 == 0;
      c.target_gradient = true;
      c.target_grad_atol = 2 * c.loss_atol + c.grad_atol;  // w up to 2
      const tensor& tt = add(make_tensor(shape, pick(rng, {type, dtype::float32, dtype::float64}), t,
                                         random_layout(rng, static_cast<int>(shape.size()))));
      if (snorkel) {
        c.description = "cross_entropy_with_probs";
        c.fast = [o, v = tt.view()](const array_view& in, const softce::outputs& out) {
          return softce::cross_entropy_with_probs(in, v, o.weight, o.reduce, out);
        };
        c.oracle = [o, v = tt.view()](const array_view& in, const softce::outputs& out) {
          return ref::cross_entropy_with_probs(in, v, o.weight, o.reduce, out);
        };
      } else {
        c.description = "cross_entropy probability targets";
        c.fast = [o, v = tt.view()](const array_view& in, const softce::outputs& out) { return softce::cross_entropy(in, v, o, out); };
        c.oracle = [o, v = tt.view()](const array_view& in, const softce::outputs& out) { return ref::cross_entropy(in, v, o, out); };
      }
    } else {
      const std::int64_t K = 1 + static_cast<std::int64_t>(rng() % std::min<std::int64_t>(C, 8));
      const bool tail = rng() % 2 == 0;
      topk_data d = random_topk(rng, shape, K, !tail || rng() % 4 == 0);
      sprinkle_specials(rng, d.values, note, "values", specials::nan_only);
      if (!tail) {
        o.weight = class_weight();
        if (rng() % 3 == 0) o.label_smoothing = 0.1;
      }
      o.mask = optional_mask();
      const tensor& idx = add(make_index_tensor(d.shape, pick(rng, {dtype::int32, dtype::int64}), d.indices));
      const tensor& val = add(make_tensor(d.shape, pick(rng, {type, dtype::float32}), d.values));
      c.topks.push_back(softce::topk{idx.view(), val.view(), tail});
      c.description = std::string("cross_entropy top-") + std::to_string(K) + (tail ? " with tail" : "");
      c.fast = [o, k = c.topks.back()](const array_view& in, const softce::outputs& out) { return softce::cross_entropy(in, k, o, out); };
      c.oracle = [o, k = c.topks.back()](const array_view& in, const softce::outputs& out) { return ref::cross_entropy(in, k, o, out); };
    }
  } else if (kind == 3 || kind == 4) {  // element-wise: kl_div, binary_cross_entropy_with_logits
    c.per_element = true;
    if (kind == 3) {
      softce::kl_div_options o;
      o.reduce = random_reduction(rng, true);
      o.log_target = rng() % 2;
      c.reduce = o.reduce;
      std::vector<double> t = probability_targets(rng, shape);
      if (o.log_target)
        for (auto& v : t) v = std::log(v);
      sprinkle_specials(rng, t, note, "target", o.log_target ? specials::nan_and_minus_inf : specials::nan_only);
      // kl_div's input is log-probabilities
      std::vector<double> lx = log_softmax_rows(x, shape);
      c.input = make_tensor(shape, type, lx, random_layout(rng, static_cast<int>(shape.size())));
      c.target_gradient = true;
      double log_t = 1;
      for (double v : t)
        if (v > 0 && std::isfinite(v)) log_t = std::max(log_t, std::fabs(o.log_target ? v : std::log(v)));
      c.target_grad_atol = 4 * arithmetic_unit * (max_abs(lx) + log_t + 1) * (o.log_target ? 2 : 1);
      const tensor& tt = add(make_tensor(shape, pick(rng, {type, dtype::float64}), t));
      c.description = std::string("kl_div") + (o.log_target ? " log_target" : "");
      c.fast = [o, v = tt.view()](const array_view& in, const softce::outputs& out) { return softce::kl_div(in, v, o, out); };
      c.oracle = [o, v = tt.view()](const array_view& in, const softce::outputs& out) { return ref::kl_div(in, v, o, out); };
    } else {
      softce::bce_options o;
      o.reduce = random_reduction(rng, false);
      c.reduce = o.reduce;
      std::vector<double> t = uniform_values(rng, n, 0, 1);
      sprinkle_specials(rng, t, note, "target", specials::nan_only);
      if (rng() % 3 == 0) {
        std::vector<double> pw = uniform_values(rng, C, 0.2, 3);
        sprinkle_specials(rng, pw, note, "pos_weight", specials::nan_only);
        const shape_t pws = shape.size() == 1 ? shape_t{C} : shape_t{C};
        // pos_weight (C,) broadcasts over the last dimension, which is C only for (C,) and
        // (N, C); otherwise give it the full shape
        if (shape.size() <= 2) {
          o.pos_weight = add(make_tensor(pws, type, pw)).view();
        }
      }
      if (rng() % 3 == 0) {
        std::vector<double> w = uniform_values(rng, n, 0, 2);
        sprinkle_specials(rng, w, note, "weight", specials::nan_only);
        o.weight = add(make_tensor(shape, type, w)).view();
      }
      const tensor& tt = add(make_tensor(shape, pick(rng, {type, dtype::float64}), t));
      c.grad_atol = 12 * compute_rtol(type);  // weight up to 2 times pos_weight up to 3
      c.target_gradient = true;
      c.target_grad_atol = 24 * arithmetic_unit * (max_abs(x) + 1);
      c.description = "binary_cross_entropy_with_logits";
      c.fast = [o, v = tt.view()](const array_view& in, const softce::outputs& out) {
        return softce::binary_cross_entropy_with_logits(in, v, o, out);
      };
      c.oracle = [o, v = tt.view()](const array_view& in, const softce::outputs& out) {
        return ref::binary_cross_entropy_with_logits(in, v, o, out);
      };
    }
  } else {  // distillation: dense teacher logits or a top-k teacher
    softce::distillation_options o;
    o.reduce = random_reduction(rng, true);
    c.reduce = o.reduce;
    o.temperature = pick<double>(rng, {0.5, 1.0, 2.0, 4.0});
    // a top-k teacher supports kl only
    o.kind = kind == 5 ? pick(rng, {divergence::kl, divergence::reverse_kl, divergence::jsd}) : divergence::kl;
    o.beta = pick<double>(rng, {0.0, 0.1, 0.5, 0.9, 1.0});
    o.mask = optional_mask();
    c.grad_atol = 2 * compute_rtol(type) * o.temperature;  // T^2 / T scales the gradient
    c.loss_atol += compute_rtol(type) * o.temperature * o.temperature * (1 + std::log(static_cast<double>(C)));
    if (kind == 5) {
      std::vector<double> z = random_logits(rng, n);
      sprinkle_specials(rng, z, note, "teacher", specials::nan_and_inf);
      // reverse KL and JSD gradients carry q (log q - log p): terms of the size of the
      // logits' spread over T, rounded in float32
      c.grad_atol *= 1 + (finite_spread(x) + finite_spread(z)) / o.temperature;
      c.loss_atol *= 1 + (finite_spread(x) + finite_spread(z)) / o.temperature;
      c.target_gradient = true;
      c.target_grad_atol = 2 * c.grad_atol;
      const tensor& tt = add(make_tensor(shape, pick(rng, {type, dtype::float32}), z,
                                         random_layout(rng, static_cast<int>(shape.size()))));
      c.description = std::string("distillation_loss ") + divergence_text(o.kind);
      c.fast = [o, v = tt.view()](const array_view& in, const softce::outputs& out) { return softce::distillation_loss(in, v, o, out); };
      c.oracle = [o, v = tt.view()](const array_view& in, const softce::outputs& out) { return ref::distillation_loss(in, v, o, out); };
    } else {
      const std::int64_t K = 1 + static_cast<std::int64_t>(rng() % std::min<std::int64_t>(C, 8));
      const bool tail = rng() % 2 == 0;
      topk_data d = random_topk(rng, shape, K, !tail);
      sprinkle_specials(rng, d.values, note, "values", specials::nan_only);
      const tensor& idx = add(make_index_tensor(d.shape, dtype::int64, d.indices));
      const tensor& val = add(make_tensor(d.shape, pick(rng, {type, dtype::float32}), d.values));
      c.topks.push_back(softce::topk{idx.view(), val.view(), tail});
      c.description = std::string("distillation_loss top-") + std::to_string(K) + " " + divergence_text(o.kind) +
                      (tail ? " with tail" : "");
      c.fast = [o, k = c.topks.back()](const array_view& in, const softce::outputs& out) { return softce::distillation_loss(in, k, o, out); };
      c.oracle = [o, k = c.topks.back()](const array_view& in, const softce::outputs& out) { return ref::distillation_loss(in, k, o, out); };
    }
    c.description += " reduction " + std::string(reduction_text(o.reduce)) + " T " + std::to_string(o.temperature) +
                     " beta " + std::to_string(o.beta) + (o.mask ? " mask" : "");
  }
  c.description += " on " + shape_note + " reduction " + reduction_text(c.reduce) + note;
}

// The fast call and the oracle on separate copies of the input, compared: the core tests'
// tolerances plus the case's allowances for cancellation.
void expect_agrees(const fuzz_case& c, const output_request& req, std::optional<dtype> target_grad) {
  // with target_grad: outputs.grad_target of that dtype (a random layout) on both calls
  tensor gt_fast, gt_ref;
  const layout gt_layout = [&] {
    std::mt19937_64 rng(static_cast<std::uint64_t>(c.input.numel()));
    return random_layout(rng, c.input.ndim());
  }();
  auto with_target_grad = [&](const loss_call& call, tensor& gt) -> loss_call {
    if (!target_grad) return call;
    return [&call, &gt, &c, &gt_layout, type = *target_grad](const array_view& in, const softce::outputs& out) {
      gt = tensor(c.input.shape(), type, gt_layout);
      softce::outputs with = out;
      with.grad_target = gt.mutable_view();
      return call(in, with);
    };
  };
  const call_result f = run_call(with_target_grad(c.fast, gt_fast), c.input, req);
  const call_result r = run_call(with_target_grad(c.oracle, gt_ref), c.input, req);
  const dtype type = c.input.type();
  const std::int64_t rows = c.per_element ? c.input.numel() : product(row_shape_of(c.input.shape()));
  tolerance loss_tol = loss_tolerance(type);
  loss_tol.atol += c.loss_atol * (c.reduce == reduction::sum || c.reduce == reduction::none ? rows : 1);
  EXPECT_TRUE(loss_near(f.loss, r.loss, loss_tol)) << "loss";
  if (req.grad) {
    tolerance tol = array_tolerance(type, req.in_place ? type : req.grad_type);
    tol.atol += c.grad_atol;
    EXPECT_TRUE(values_near(f.grad, r.grad, tol, "grad"));
  }
  if (req.losses) {
    tolerance tol = array_tolerance(type, req.losses_type);
    tol.atol += loss_tolerance(type).atol + c.loss_atol;
    EXPECT_TRUE(values_near(f.losses, r.losses, tol, "losses"));
  }
  if (target_grad) {
    EXPECT_TRUE(gt_fast.padding_intact()) << "grad_target: bytes outside the elements were written";
    tolerance tol = array_tolerance(type, *target_grad);
    tol.atol += c.target_grad_atol;
    EXPECT_TRUE(values_near(gt_fast.values(), gt_ref.values(), tol, "grad_target"));
  }
}

// Runs one case: the fast call and the oracle on separate copies, compared.
void run_case(std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  fuzz_case c;
  make_case(rng, c);
  const shape_t losses_shape = c.per_element ? c.input.shape() : row_shape_of(c.input.shape());
  const output_request req = random_outputs(rng, c.input, c.reduce == reduction::none, losses_shape);
  const int threads = 1 + static_cast<int>(rng() % 2);
  softce::set_num_threads(threads);
  std::optional<dtype> target_grad;
  if (c.target_gradient && rng() % 2) target_grad = random_float(rng);
  SCOPED_TRACE("case seed " + std::to_string(seed) + ": " + c.description + req.describe() +
               (target_grad ? std::string(" grad_target ") + name_of(*target_grad) : std::string()) + ", " +
               std::to_string(threads) + " threads");
  try {
    expect_agrees(c, req, target_grad);
  } catch (const softce::error& e) {
    ADD_FAILURE() << "a valid call was refused: " << e.what();
  }
}

// ---------------------------------------------------------------------------------------
// aliasing: outputs placed over inputs inside one buffer

enum class placement { exact, overlapping, disjoint };

// One float32 buffer holding the logits (N, C) at offset 0 and a second array (the target,
// the gradient or the per-row losses) at `offset` elements; the second array's extent either
// overlaps the logits or starts after them.
void run_alias_case(std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  const std::int64_t N = 1 + static_cast<std::int64_t>(rng() % 4), C = pick<std::int64_t>(rng, {3, 16, 33});
  const std::int64_t n = N * C;
  const int what = static_cast<int>(rng() % 4);  // 0 grad over target, 1 grad over input, 2 losses over input, 3 grad over losses
  const placement where = static_cast<placement>(rng() % 3);
  std::int64_t offset = 0;
  if (where == placement::overlapping) offset = 1 + static_cast<std::int64_t>(rng() % (n - 1 > 0 ? n - 1 : 1));
  if (where == placement::disjoint) offset = 2 * n + static_cast<std::int64_t>(rng() % 5);
  std::vector<float> buffer(static_cast<std::size_t>(4 * n + 16), 0.0f);
  std::vector<double> x = normal_values(rng, n, 2.0);
  std::vector<double> t = probability_targets(rng, {N, C}, target_rows::normalised);
  for (std::int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(x[i]);
  std::vector<float> separate_target(t.begin(), t.end());
  // room for per-row losses placed past the gradient's first element
  std::vector<float> separate_grad(static_cast<std::size_t>(n + N), -7.0f);
  std::vector<float> losses(static_cast<std::size_t>(N), -7.0f);
  std::string description = std::string("alias case ") + (what == 0 ? "grad over target" : what == 1 ? "grad over input"
                                                                          : what == 2 ? "losses over input" : "grad over losses") +
                            (where == placement::exact ? " exact" : where == placement::overlapping ? " overlapping" : " disjoint") +
                            " offset " + std::to_string(offset) + " N " + std::to_string(N) + " C " + std::to_string(C);
  SCOPED_TRACE("case seed " + std::to_string(seed) + ": " + description);

  const array_view input = softce::view(static_cast<const float*>(buffer.data()), {N, C});
  array_view target = softce::view(static_cast<const float*>(separate_target.data()), {N, C});
  softce::outputs out;
  softce::cross_entropy_options o;
  bool allowed = where == placement::disjoint;
  switch (what) {
    case 0: {  // the target lives in the buffer at 0 (the input elsewhere), the gradient at offset
      std::vector<float> input_copy(buffer.begin(), buffer.begin() + n);
      for (std::int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(t[i]);
      target = softce::view(static_cast<const float*>(buffer.data()), {N, C});
      out.grad = softce::view(buffer.data() + offset, {N, C});
      const array_view in = softce::view(static_cast<const float*>(input_copy.data()), {N, C});
      bool threw = false;
      try {
        softce::cross_entropy(in, target, o, out);
      } catch (const softce::error&) {
        threw = true;
      }
      EXPECT_EQ(threw, !allowed) << (threw ? "a valid call was refused" : "an overlap of grad and target was accepted");
      return;
    }
    case 1:  // in place (exact) or a gradient over part of the input
      out.grad = softce::view(buffer.data() + offset, {N, C});
      allowed = allowed || where == placement::exact;
      break;
    case 2:
      o.reduce = reduction::none;
      out.losses = softce::view(buffer.data() + offset, {N});
      out.grad = softce::view(separate_grad.data(), {N, C});
      break;
    default:  // two outputs over each other: grad at 0 of a separate buffer, losses at offset
      o.reduce = reduction::none;
      out.grad = softce::view(separate_grad.data(), {N, C});
      out.losses = softce::view(separate_grad.data() + (where == placement::disjoint ? 0 : offset % n), {N});
      allowed = false;  // there is no room for a disjoint placement here: always an overlap
      if (where == placement::disjoint) {
        out.losses = softce::view(losses.data(), {N});
        allowed = true;
      }
      break;
  }
  const std::vector<float> before(buffer);
  const std::vector<float> grad_before(separate_grad);
  bool threw = false;
  double loss = 0;
  try {
    loss = softce::cross_entropy(input, target, o, out);
  } catch (const softce::error&) {
    threw = true;
  }
  EXPECT_EQ(threw, !allowed) << (threw ? "a valid call was refused" : "an overlapping output was accepted");
  if (threw) {
    // refused before anything was written
    EXPECT_EQ(buffer, before) << "a refused call wrote into the buffer";
    EXPECT_EQ(separate_grad, grad_before) << "a refused call wrote the gradient";
    return;
  }
  // accepted: the numbers are the oracle's on separate copies
  std::vector<float> xin(before.begin(), before.begin() + n), g(static_cast<std::size_t>(n));
  std::vector<float> l(static_cast<std::size_t>(N));
  softce::outputs r;
  r.grad = softce::view(g.data(), {N, C});
  if (o.reduce == reduction::none) r.losses = softce::view(l.data(), {N});
  const double expected = ref::cross_entropy(softce::view(static_cast<const float*>(xin.data()), {N, C}), target, o, r);
  EXPECT_TRUE(loss_near(loss, expected, loss_tolerance(dtype::float32)));
  const float* grad = what == 1 ? buffer.data() + offset : separate_grad.data();
  // (only the first n elements of separate_grad are the gradient)
  std::vector<double> fast_grad(grad, grad + n), ref_grad(g.begin(), g.end());
  tolerance tol = array_tolerance(dtype::float32, dtype::float32);
  tol.atol += 2 * compute_rtol(dtype::float32);  // q A - t: a rounding of terms of size 1
  EXPECT_TRUE(values_near(fast_grad, ref_grad, tol, "grad"));
}

// Runs `one` on consecutive case seeds until the time budget is spent or a case fails.
template <class Case>
void fuzz(Case one, std::uint64_t stream) {
  if (const char* replay = std::getenv("SOFTCE_FUZZ_CASE"); replay && *replay) {
    one(std::strtoull(replay, nullptr, 10));
    return;
  }
  const auto seconds = static_cast<double>(env_u64("SOFTCE_FUZZ_SECONDS", 5));
  const std::uint64_t seed = env_u64("SOFTCE_FUZZ_SEED", 1) * 1000003 + stream * 0x9E3779B97F4A7C15ull;
  const int threads = softce::get_num_threads();
  const auto start = std::chrono::steady_clock::now();
  std::uint64_t cases = 0;
  while (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < seconds) {
    one(seed + cases);
    ++cases;
    // one reproducible failure, not a flood (SOFTCE_FUZZ_KEEP_GOING=1 to survey them all)
    if (::testing::Test::HasFailure() && !env_u64("SOFTCE_FUZZ_KEEP_GOING", 0)) break;
  }
  softce::set_num_threads(threads);
  std::printf("%llu cases\n", static_cast<unsigned long long>(cases));
  EXPECT_GT(cases, 0u);
}

TEST(Differential, RandomCallsMatchTheOracle) { fuzz(run_case, 1); }
TEST(Differential, OverlappingOutputsAreRefused) { fuzz(run_alias_case, 2); }

}  // namespace
}  // namespace softce_test
