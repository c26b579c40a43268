// cross_entropy (class-index, probability and top-k targets) and cross_entropy_with_probs:
// the fast functions against the reference on random shapes, dtypes, layouts and options;
// one-hot probability targets bitwise equal to index targets.
#include "simd_targets.hpp"
#include "test_support.hpp"

namespace softce_test {
namespace {

using softce::reduction;
namespace ref = softce::reference;

const dtype float_types[] = {dtype::float32, dtype::float64, dtype::bfloat16, dtype::float16};

// Random logits shapes: (C,), (N, C), (N, C, d), (N, C, d1, d2) with small and odd sizes,
// C = 1 and N = 0 included.
shape_t random_logits_shape(std::mt19937_64& rng) {
  const std::int64_t classes[] = {1, 2, 3, 5, 8, 17, 64, 100, 255, 257, 1000, 1031};
  const std::int64_t batch[] = {0, 1, 2, 3, 7, 16};
  const std::int64_t C = classes[rng() % std::size(classes)];
  const std::int64_t N = batch[rng() % std::size(batch)];
  const auto form = rng() % 10;
  if (form == 0) return {C};
  if (form <= 6) return {N, C};
  if (form <= 8) return {std::min<std::int64_t>(N, 3), C, 1 + static_cast<std::int64_t>(rng() % 3)};
  return {std::min<std::int64_t>(N, 2), C, 2, 1 + static_cast<std::int64_t>(rng() % 2)};
}

enum class target_kind { probabilities, indices, topk, with_probs };

const char* kind_text(target_kind k) {
  switch (k) {
    case target_kind::probabilities: return "probabilities";
    case target_kind::indices: return "indices";
    case target_kind::topk: return "topk";
    case target_kind::with_probs: return "cross_entropy_with_probs";
  }
  return "?";
}

// One random case: builds logits, targets and options, runs fast and reference, compares.
// `shape` and `type` may be forced (empty shape = random).
void run_random_case(std::mt19937_64& rng, target_kind kind, shape_t shape = {}, std::optional<dtype> forced_type = {},
                     bool allow_expensive_layouts = true) {
  if (shape.empty()) shape = random_logits_shape(rng);
  const dtype type = forced_type ? *forced_type : float_types[rng() % 4];
  const std::int64_t C = classes_of(shape);
  const shape_t rows_shape = row_shape_of(shape);
  const std::int64_t rows = product(rows_shape);
  const int ndim = static_cast<int>(shape.size());
  auto layout_for = [&](int n) { return allow_expensive_layouts ? random_layout(rng, n) : row_major(n); };

  std::ostringstream what;
  what << kind_text(kind) << " input " << name_of(type) << shape_text(shape);

  softce::cross_entropy_options o;
  const reduction reductions[] = {reduction::none, reduction::mean, reduction::sum};
  o.reduce = reductions[rng() % 3];
  const double smoothing[] = {0.0, 0.0, 0.1, 0.35, 1.0};
  if (kind != target_kind::with_probs) o.label_smoothing = smoothing[rng() % 5];
  tensor weight;
  if (rng() % 2) {
    weight = make_tensor({C}, rng() % 2 ? type : float_types[rng() % 4], uniform_values(rng, C, 0.2, 2.0),
                         layout_for(1));
    o.weight = weight.view();
    what << " weight " << weight.describe();
  }
  tensor mask;
  if ((kind == target_kind::probabilities || kind == target_kind::topk) && rng() % 3 == 0) {
    std::vector<std::int64_t> m(static_cast<std::size_t>(rows));
    const bool none_kept = rng() % 6 == 0;
    for (auto& v : m) v = none_kept ? 0 : (rng() % 3 != 0);
    mask = make_index_tensor(rows_shape, dtype::boolean, m, layout_for(static_cast<int>(rows_shape.size())));
    o.mask = mask.view();
    what << " mask" << (none_kept ? " (all false)" : "");
  }

  std::vector<double> x = normal_values(rng, product(shape), rng() % 2 ? 1.0 : 3.0);
  tensor target;
  tensor topk_indices, topk_values;
  softce::topk k;
  switch (kind) {
    case target_kind::probabilities:
    case target_kind::with_probs: {
      const std::vector<double> t = probability_targets(rng, shape);
      // Masked logits (-inf) where the target is 0; only without smoothing, which would give
      // every class a positive target (and so an infinite loss).
      if (o.label_smoothing == 0 && rng() % 4 == 0) {
        for (std::size_t i = 0; i < x.size(); ++i)
          if (t[i] == 0 && rng() % 2) x[i] = -inf;
        what << " -inf logits";
      }
      target = make_tensor(shape, rng() % 3 ? type : float_types[rng() % 4], t, layout_for(ndim));
      what << " target " << target.describe();
      break;
    }
    case target_kind::indices: {
      std::vector<std::int64_t> y(static_cast<std::size_t>(rows));
      const bool custom_ignore = rng() % 4 == 0;
      o.ignore_index = custom_ignore ? static_cast<std::int64_t>(rng() % C) : -100;
      for (auto& v : y) v = rng() % 6 == 0 ? o.ignore_index : static_cast<std::int64_t>(rng() % C);
      if (o.label_smoothing == 0 && rng() % 4 == 0) {
        for (std::int64_t r = 0; r < rows; ++r)
          for (std::int64_t c = 0; c < C; ++c)
            if (c != y[r] && rng() % 2) x[flat_index(shape, r, c)] = -inf;
        what << " -inf logits";
      }
      target = make_index_tensor(rows_shape, rng() % 2 ? dtype::int32 : dtype::int64, y,
                                 layout_for(static_cast<int>(rows_shape.size())));
      what << " target " << target.describe() << " ignore_index " << o.ignore_index;
      break;
    }
    case target_kind::topk: {
      const std::int64_t K = static_cast<std::int64_t>(rng() % (std::min<std::int64_t>(C, 8) + 1));
      k.tail = !o.weight && o.label_smoothing == 0 && rng() % 2;
      const topk_data d = random_topk(rng, shape, K, !k.tail && rng() % 2);
      topk_indices = make_index_tensor(d.shape, rng() % 2 ? dtype::int32 : dtype::int64, d.indices,
                                       layout_for(static_cast<int>(d.shape.size())));
      topk_values = make_tensor(d.shape, rng() % 3 ? type : float_types[rng() % 4], d.values,
                                layout_for(static_cast<int>(d.shape.size())));
      k.indices = topk_indices.view();
      k.values = topk_values.view();
      what << " top-" << K << (k.tail ? " tail" : "") << " indices " << topk_indices.describe() << " values "
           << topk_values.describe();
      break;
    }
  }
  what << " reduction " << reduction_text(o.reduce) << " smoothing " << o.label_smoothing;

  const tensor input = make_tensor(shape, type, x, layout_for(ndim));
  const output_request req = random_outputs(rng, input, o.reduce == reduction::none, rows_shape);
  what << " input " << input.describe() << req.describe();
  SCOPED_TRACE(what.str());

  loss_call fast, reference;
  switch (kind) {
    case target_kind::probabilities:
    case target_kind::indices: {
      const array_view t = target.view();
      fast = [=](const array_view& in, const softce::outputs& out) { return softce::cross_entropy(in, t, o, out); };
      reference = [=](const array_view& in, const softce::outputs& out) { return ref::cross_entropy(in, t, o, out); };
      break;
    }
    case target_kind::topk:
      fast = [=](const array_view& in, const softce::outputs& out) { return softce::cross_entropy(in, k, o, out); };
      reference = [=](const array_view& in, const softce::outputs& out) { return ref::cross_entropy(in, k, o, out); };
      break;
    case target_kind::with_probs: {
      const array_view t = target.view();
      fast = [=](const array_view& in, const softce::outputs& out) {
        return softce::cross_entropy_with_probs(in, t, o.weight, o.reduce, out);
      };
      reference = [=](const array_view& in, const softce::outputs& out) {
        return ref::cross_entropy_with_probs(in, t, o.weight, o.reduce, out);
      };
      break;
    }
  }
  // gradient terms: coef * (q A, w t'), at most coef * max w (twice that with a tail)
  double denominator = 0;
  const std::vector<double> w = o.weight ? weight.values() : std::vector<double>(static_cast<std::size_t>(C), 1.0);
  if (kind == target_kind::indices) {
    const std::vector<double> y = target.values();
    for (double label : y)
      if (label != static_cast<double>(o.ignore_index)) denominator += w[static_cast<std::size_t>(label)];
  } else {
    const std::vector<double> m = o.mask ? mask.values() : std::vector<double>(static_cast<std::size_t>(rows), 1.0);
    for (double keep : m) denominator += keep != 0;
  }
  const double terms = reduction_coef(o.reduce, denominator) * max_abs(w, 1.0) * 2;
  expect_matches_reference(fast, reference, input, req, compute_rtol(type) * terms);
}

TEST(CrossEntropy, ProbabilityTargetsMatchReference) {
  std::mt19937_64 rng(101);
  for (int i = 0; i < 300; ++i) run_random_case(rng, target_kind::probabilities);
}

TEST(CrossEntropy, IndexTargetsMatchReference) {
  std::mt19937_64 rng(102);
  for (int i = 0; i < 300; ++i) run_random_case(rng, target_kind::indices);
}

TEST(CrossEntropy, TopKTargetsMatchReference) {
  std::mt19937_64 rng(103);
  for (int i = 0; i < 300; ++i) run_random_case(rng, target_kind::topk);
}

TEST(CrossEntropyWithProbs, MatchesReference) {
  std::mt19937_64 rng(104);
  for (int i = 0; i < 150; ++i) run_random_case(rng, target_kind::with_probs);
}

TEST(CrossEntropy, SingleClass) {
  std::mt19937_64 rng(105);
  for (target_kind kind : {target_kind::probabilities, target_kind::indices, target_kind::topk, target_kind::with_probs})
    for (dtype type : float_types)
      for (int i = 0; i < 4; ++i) run_random_case(rng, kind, {5, 1}, type);
}

// C >= 2^18 (a row of 1 MiB and more in float32: longer than the L2 cache of one core).
TEST(CrossEntropy, LargeClassCounts) {
  std::mt19937_64 rng(106);
  for (target_kind kind : {target_kind::probabilities, target_kind::indices, target_kind::topk}) {
    run_random_case(rng, kind, {2, 262147}, dtype::float32, false);
    run_random_case(rng, kind, {1, 300000}, dtype::float32, false);
    run_random_case(rng, kind, {2, 262144}, dtype::float64, false);
    run_random_case(rng, kind, {1, 262145}, dtype::bfloat16, false);
  }
  // one strided large case: (N, C, d) puts the classes at stride 2
  run_random_case(rng, target_kind::probabilities, {1, 270000, 2}, dtype::float32, false);
}

// ---------------------------------------------------------------------------------------
// one-hot probability targets are bitwise the index targets (no weights)

template <class T>
void expect_one_hot_bitwise(std::int64_t N, std::int64_t C, double smoothing, reduction reduce, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  const dtype type = softce::dtype_of<T>();
  const shape_t shape{N, C};
  const tensor x = make_tensor(shape, type, normal_values(rng, N * C, 2.0));
  std::vector<std::int64_t> y(static_cast<std::size_t>(N));
  std::vector<double> onehot(static_cast<std::size_t>(N * C), 0.0);
  for (std::int64_t r = 0; r < N; ++r) {
    y[r] = static_cast<std::int64_t>(rng() % C);
    onehot[r * C + y[r]] = 1.0;
  }
  const tensor labels = make_index_tensor({N}, dtype::int64, y);
  const tensor probs = make_tensor(shape, type, onehot);
  softce::cross_entropy_options o;
  o.label_smoothing = smoothing;
  o.reduce = reduce;
  tensor g_index(shape, type), g_probs(shape, type);
  tensor l_index({N}, type), l_probs({N}, type);
  softce::outputs out_index, out_probs;
  out_index.grad = g_index.mutable_view();
  out_probs.grad = g_probs.mutable_view();
  if (reduce == reduction::none) {
    out_index.losses = l_index.mutable_view();
    out_probs.losses = l_probs.mutable_view();
  }
  const double loss_index = softce::cross_entropy(x.view(), labels.view(), o, out_index);
  const double loss_probs = softce::cross_entropy(x.view(), probs.view(), o, out_probs);
  SCOPED_TRACE(std::string(name_of(type)) + " C " + std::to_string(C) + " smoothing " + std::to_string(smoothing) +
               " reduction " + reduction_text(reduce));
  EXPECT_EQ(std::memcmp(&loss_index, &loss_probs, sizeof(double)), 0)
      << std::setprecision(17) << loss_index << " vs " << loss_probs;
  EXPECT_EQ(g_index.element_bytes(), g_probs.element_bytes()) << "gradients differ";
  if (reduce == reduction::none) {
    EXPECT_EQ(l_index.element_bytes(), l_probs.element_bytes()) << "per-row losses differ";
  }
  // and both agree with the reference
  EXPECT_TRUE(loss_near(loss_index, ref::cross_entropy(x.view(), labels.view(), o), loss_tolerance(type)));
}

TEST(CrossEntropy, OneHotProbabilitiesAreBitwiseIndexTargets) {
  std::uint64_t seed = 200;
  for (double smoothing : {0.0, 0.1})
    for (reduction reduce : {reduction::mean, reduction::sum, reduction::none})
      for (std::int64_t C : {1, 7, 100, 4099}) {
        expect_one_hot_bitwise<float>(9, C, smoothing, reduce, ++seed);
        expect_one_hot_bitwise<double>(9, C, smoothing, reduce, ++seed);
      }
}

// Rows of at most one vector of classes, contiguous, go through one kernel call per block of
// rows (SmallTargetRows) instead of the row-by-row passes; the same rows stored class-major
// take the row-by-row path. Both must give the same bits, special rows included: a -inf
// logit with zero and with positive target, an all -inf row, NaN and +inf logits, a NaN
// target, an all-zero target; with class weights and label smoothing; in place too. Index
// targets likewise: an ignored row, and a NaN weight of a class no row uses (harmless
// without smoothing, every row NaN with it, as torch).
template <class T>
void expect_small_rows_bitwise(std::int64_t C, bool index, bool weighted, double smoothing, bool in_place,
                               std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  const dtype type = softce::dtype_of<T>();
  const std::int64_t N = 37;
  const shape_t shape{N, C};
  std::vector<double> x = normal_values(rng, N * C, 3.0), t = uniform_values(rng, N * C, 0.0, 1.0);
  const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  auto at = [&](std::int64_t r, std::int64_t c) { return static_cast<std::size_t>(r * C + c % C); };
  x[at(1, 0)] = -inf, t[at(1, 0)] = 0.0;
  x[at(2, 1)] = -inf, t[at(2, 1)] = 0.5;
  for (std::int64_t c = 0; c < C; ++c) x[at(3, c)] = -inf, t[at(7, c)] = 0.0;
  t[at(3, 0)] = 0.0;  // a zero target in the all -inf row: +0, not -0, in the gradient
  x[at(4, 2)] = nan;
  x[at(5, 0)] = inf;
  t[at(6, 1)] = nan;
  x[at(9, 0)] = -inf, t[at(9, 0)] = -0.0;  // a -0 target at a -inf logit adds nothing to b
  // labels below C - 1 where a NaN weight sits on class C - 1
  const bool unused_nan_weight = index && weighted && C >= 2;
  std::vector<std::int64_t> labels(static_cast<std::size_t>(N));
  for (auto& y : labels) y = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(unused_nan_weight ? C - 1 : C));
  labels[1] = 0;
  labels[2] = 1 % C;
  labels[8] = -100;  // ignored
  std::vector<double> w = uniform_values(rng, C, 0.5, 2.0);
  if (unused_nan_weight) w[static_cast<std::size_t>(C - 1)] = nan;
  layout class_major = row_major(2);
  class_major.order = {1, 0};
  const tensor weight = make_tensor({C}, type, w);
  const tensor label_tensor = make_index_tensor({N}, dtype::int64, labels);
  softce::cross_entropy_options o;
  o.reduce = reduction::none;
  o.label_smoothing = smoothing;
  if (weighted) o.weight = weight.view();
  std::vector<double> losses[2], grads[2];
  for (int path = 0; path < 2; ++path) {
    const layout l = path == 0 ? row_major(2) : class_major;
    tensor xt = make_tensor(shape, type, x, l);
    const tensor tt = make_tensor(shape, type, t, l);
    tensor g(shape, type, l), rl({N}, dtype::float64);
    softce::outputs out;
    out.grad = in_place ? xt.mutable_view() : g.mutable_view();
    out.losses = rl.mutable_view();
    softce::cross_entropy(xt.view(), index ? label_tensor.view() : tt.view(), o, out);
    losses[path] = rl.values();
    grads[path] = in_place ? xt.values() : g.values();
  }
  SCOPED_TRACE(std::string(name_of(type)) + " C " + std::to_string(C) + (index ? " index" : " dense") +
               (weighted ? " weighted" : "") + " smoothing " + std::to_string(smoothing) + (in_place ? " in place" : ""));
  EXPECT_TRUE(std::isnan(losses[0][4]) && std::isnan(losses[0][5]));
  if (!(unused_nan_weight && smoothing > 0)) {
    EXPECT_EQ(losses[0][2], inf);
    EXPECT_TRUE(std::isfinite(losses[0][0]));
    EXPECT_EQ(std::isnan(losses[0][6]), !index);
  }
  if (index) EXPECT_EQ(losses[0][8], 0.0);
  for (int which = 0; which < 2; ++which) {
    const std::vector<double>& a = which ? grads[0] : losses[0];
    const std::vector<double>& b = which ? grads[1] : losses[1];
    ASSERT_EQ(a.size(), b.size());
    int differ = 0;
    for (std::size_t i = 0; i < a.size(); ++i)
      if (std::memcmp(&a[i], &b[i], sizeof(double)) != 0 && !(std::isnan(a[i]) && std::isnan(b[i]))) {
        if (++differ < 4) ADD_FAILURE() << (which ? "gradient " : "loss ") << i << ": " << std::setprecision(17) << a[i] << " vs " << b[i];
      }
    EXPECT_EQ(differ, 0) << (which ? "gradient" : "row losses");
  }
}

// On every SIMD target this machine runs: the AVX-512 kernels have their own forms of some
// steps (AddWhereWeighted's masked FMA), the others the generic ones.
TEST(CrossEntropy, SmallRowsAreBitwiseTheRowByRowPath) {
  softce_test::restore_targets restore;
  for (std::int64_t target : softce_test::runnable_targets()) {
    hwy::SetSupportedTargetsForTest(target);
    SCOPED_TRACE(hwy::TargetName(target));
    std::uint64_t seed = 900;
    for (std::int64_t C : {1, 3, 7, 8, 10, 16})
      for (bool index : {false, true})
        for (bool weighted : {false, true})
          for (double smoothing : {0.0, 0.1})
            for (bool in_place : {false, true}) {
              expect_small_rows_bitwise<float>(C, index, weighted, smoothing, in_place, ++seed);
              if (C <= 8) expect_small_rows_bitwise<double>(C, index, weighted, smoothing, in_place, ++seed);
            }
  }
}

// The small-row path with mean and sum (the gradient's coefficient), rows walked backwards
// (a negative row stride), a 1-d input, and enough rows for two threads: the same bits as
// the row-by-row path (class-major, or an interleaved 1-d input), and as one thread.
TEST(CrossEntropy, SmallRowsReductionsStridesAndThreads) {
  std::mt19937_64 rng(950);
  const std::int64_t C = 10;
  const int saved_threads = softce::get_num_threads();
  for (const shape_t& shape : {shape_t{5000, C}, shape_t{C}}) {
    const std::int64_t n = product(shape);
    const int ndim = static_cast<int>(shape.size());
    const std::vector<double> x = normal_values(rng, n, 3.0), t = uniform_values(rng, n, 0.0, 1.0);
    layout fast = row_major(ndim), slow = row_major(ndim);
    if (ndim == 2) {
      fast.flip = {true, false};  // negative row stride, classes contiguous: the small path
      slow.order = {1, 0};        // class-major: the row-by-row path
    } else {
      slow.spacing = 2;  // interleaved classes: staged, the row-by-row path
    }
    for (reduction reduce : {reduction::mean, reduction::sum}) {
      SCOPED_TRACE(shape_text(shape) + " " + reduction_text(reduce));
      softce::cross_entropy_options o;
      o.reduce = reduce;
      o.label_smoothing = 0.05;
      double totals[3];
      std::vector<unsigned char> grads[3];
      for (int run = 0; run < 3; ++run) {
        softce::set_num_threads(run == 2 ? 1 : 2);
        const layout& l = run == 1 ? slow : fast;
        const tensor xt = make_tensor(shape, dtype::float32, x, l), tt = make_tensor(shape, dtype::float32, t, l);
        tensor g(shape, dtype::float32, l);
        softce::outputs out;
        out.grad = g.mutable_view();
        totals[run] = softce::cross_entropy(xt.view(), tt.view(), o, out);
        grads[run] = g.element_bytes();
      }
      softce::set_num_threads(saved_threads);
      for (int run = 1; run < 3; ++run) {
        EXPECT_EQ(std::memcmp(&totals[0], &totals[run], sizeof(double)), 0)
            << std::setprecision(17) << totals[0] << " vs " << totals[run] << " (run " << run << ")";
        EXPECT_EQ(grads[0], grads[run]) << "gradient, run " << run;
      }
      EXPECT_TRUE(loss_near(totals[0], ref::cross_entropy(make_tensor(shape, dtype::float32, x).view(),
                                                          make_tensor(shape, dtype::float32, t).view(), o),
                            loss_tolerance(dtype::float32)));
    }
  }
}

// ---------------------------------------------------------------------------------------
// top-k targets equal their dense scatter (without tail)

TEST(CrossEntropy, TopKWithoutTailIsTheScatteredDenseTarget) {
  std::mt19937_64 rng(300);
  for (dtype type : {dtype::float32, dtype::float64}) {
    for (std::int64_t C : {4, 50, 3000}) {
      const shape_t shape{6, C};
      const tensor x = make_tensor(shape, type, normal_values(rng, 6 * C, 2.0));
      const topk_data d = random_topk(rng, shape, std::min<std::int64_t>(C, 5), rng() % 2);
      std::vector<double> dense(static_cast<std::size_t>(6 * C), 0.0);
      for (std::int64_t r = 0; r < 6; ++r)
        for (std::int64_t j = 0; j < std::min<std::int64_t>(C, 5); ++j)
          dense[r * C + d.indices[r * std::min<std::int64_t>(C, 5) + j]] = d.values[r * std::min<std::int64_t>(C, 5) + j];
      const tensor idx = make_index_tensor(d.shape, dtype::int64, d.indices);
      const tensor val = make_tensor(d.shape, type, d.values);
      const tensor probs = make_tensor(shape, type, dense);
      for (reduction reduce : {reduction::mean, reduction::sum}) {
        softce::cross_entropy_options o;
        o.reduce = reduce;
        tensor g1(shape, dtype::float64), g2(shape, dtype::float64);
        softce::outputs o1, o2;
        o1.grad = g1.mutable_view();
        o2.grad = g2.mutable_view();
        const double l1 = softce::cross_entropy(x.view(), softce::topk{idx.view(), val.view(), false}, o, o1);
        const double l2 = softce::cross_entropy(x.view(), probs.view(), o, o2);
        EXPECT_TRUE(loss_near(l1, l2, loss_tolerance(type)));
        EXPECT_TRUE(values_near(g1.values(), g2.values(), array_tolerance(type, type), "grad"));
      }
    }
  }
}

}  // namespace
}  // namespace softce_test
