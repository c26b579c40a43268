// distillation_loss: teacher logits (kl, reverse_kl, jsd with TRL's beta endpoints) and top-k
// teachers (with and without tail), against the reference on random shapes, dtypes,
// layouts, temperatures, masks and reductions.
#include "test_support.hpp"

namespace softce_test {
namespace {

using softce::divergence;
using softce::reduction;
namespace ref = softce::reference;

const dtype float_types[] = {dtype::float32, dtype::float64, dtype::bfloat16, dtype::float16};

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

// The gradients of reverse_kl and jsd, coef T q_c (log q_c - log r_c - D) with r = p or m,
// cancel: each log is computed with an absolute error of about eps (|log q| + log C) in the
// kernel's precision, while the difference may be much smaller. This returns the size of
// the terms, coef T max_c q_c (|log q_c| + |log r_c| + sum_j q_j (|log q_j| + |log r_j|) +
// 2 log C + 1), so that the tolerance is eps times it (a wrong factor or term still shows
// up as an error of the size of the gradient itself).
double cancelling_gradient_scale(const std::vector<double>& x, const std::vector<double>& z, const shape_t& shape,
                                 const softce::distillation_options& o, const std::vector<bool>& keep) {
  const std::int64_t C = classes_of(shape);
  const std::int64_t rows = product(row_shape_of(shape));
  std::int64_t kept = 0;
  for (std::int64_t r = 0; r < rows; ++r) kept += keep[r];
  double coef = 1;
  if (o.reduce == reduction::batchmean) coef = 1.0 / std::max<std::int64_t>(kept, 1);
  if (o.reduce == reduction::mean) coef = 1.0 / std::max<std::int64_t>(kept * C, 1);
  const double T = o.temperature;
  double scale = 0;
  for (std::int64_t r = 0; r < rows; ++r) {
    if (!keep[r]) continue;
    std::vector<double> u(C), v(C);
    for (std::int64_t c = 0; c < C; ++c) {
      u[c] = x[flat_index(shape, r, c)] / T;
      v[c] = z[flat_index(shape, r, c)] / T;
    }
    const std::vector<double> log_q = log_softmax_rows(u, {1, C}), log_p = log_softmax_rows(v, {1, C});
    std::vector<double> log_r = log_p;
    if (o.kind == divergence::jsd && o.beta > 0 && o.beta < 1)
      for (std::int64_t c = 0; c < C; ++c)
        log_r[c] = std::log(o.beta * std::exp(log_p[c]) + (1 - o.beta) * std::exp(log_q[c]));
    double a = 0, worst = 0;
    for (std::int64_t c = 0; c < C; ++c)
      if (std::exp(log_q[c]) > 0) a += std::exp(log_q[c]) * (std::fabs(log_q[c]) + std::fabs(log_r[c]));
    for (std::int64_t c = 0; c < C; ++c) {
      const double q = std::exp(log_q[c]);
      if (q > 0) worst = std::max(worst, q * (std::fabs(log_q[c]) + std::fabs(log_r[c]) + a + 2 * std::log(C) + 1));
    }
    scale = std::max(scale, coef * T * worst);
  }
  return scale;
}

void run_random_case(std::mt19937_64& rng, bool topk_teacher, shape_t shape = {}, std::optional<dtype> forced_type = {},
                     std::optional<divergence> forced_kind = {}, bool random_layouts = true) {
  if (shape.empty()) shape = random_logits_shape(rng);
  const dtype type = forced_type ? *forced_type : float_types[rng() % 4];
  const std::int64_t C = classes_of(shape);
  const shape_t rows_shape = row_shape_of(shape);
  const std::int64_t rows = product(rows_shape);
  const int ndim = static_cast<int>(shape.size());
  auto layout_for = [&](int n) { return random_layouts ? random_layout(rng, n) : row_major(n); };

  softce::distillation_options o;
  if (ndim >= 3) o.dim = 1;  // PyTorch's (N, C, d1, ...) layout
  const double temperatures[] = {1.0, 1.0, 0.5, 2.0, 4.0};
  o.temperature = temperatures[rng() % 5];
  const divergence kinds[] = {divergence::kl, divergence::reverse_kl, divergence::jsd, divergence::jsd};
  o.kind = topk_teacher ? divergence::kl : forced_kind ? *forced_kind : kinds[rng() % 4];
  const double betas[] = {0.0, 0.1, 0.5, 0.9, 1.0};
  o.beta = betas[rng() % 5];
  const reduction reductions[] = {reduction::none, reduction::mean, reduction::sum, reduction::batchmean};
  o.reduce = reductions[rng() % 4];
  std::ostringstream what;
  what << (topk_teacher ? "top-k teacher" : "teacher logits") << " " << divergence_text(o.kind) << " beta " << o.beta
       << " T " << o.temperature << " reduction " << reduction_text(o.reduce);
  tensor mask;
  if (rng() % 3 == 0) {
    std::vector<std::int64_t> m(static_cast<std::size_t>(rows));
    const bool none_kept = rng() % 6 == 0;
    for (auto& v : m) v = none_kept ? 0 : (rng() % 3 != 0);
    mask = make_index_tensor(rows_shape, dtype::boolean, m, layout_for(static_cast<int>(rows_shape.size())));
    o.mask = mask.view();
    what << " mask" << (none_kept ? " (all false)" : "");
  }

  std::vector<bool> keep(static_cast<std::size_t>(rows), true);
  if (o.mask) {
    const std::vector<double> m = mask.values();
    for (std::int64_t r = 0; r < rows; ++r) keep[r] = m[r] != 0;
  }
  std::vector<double> x = normal_values(rng, product(shape), rng() % 2 ? 1.0 : 3.0);
  tensor teacher, idx, val;
  softce::topk k;
  if (topk_teacher) {
    const std::int64_t K = static_cast<std::int64_t>(rng() % (std::min<std::int64_t>(C, 8) + 1));
    k.tail = rng() % 2;
    const topk_data d = random_topk(rng, shape, K, !k.tail && rng() % 2);
    idx = make_index_tensor(d.shape, rng() % 2 ? dtype::int32 : dtype::int64, d.indices,
                            layout_for(static_cast<int>(d.shape.size())));
    val = make_tensor(d.shape, rng() % 3 ? type : float_types[rng() % 4], d.values,
                      layout_for(static_cast<int>(d.shape.size())));
    k.indices = idx.view();
    k.values = val.view();
    what << " top-" << K << (k.tail ? " tail" : "") << " indices " << idx.describe() << " values " << val.describe();
  } else {
    std::vector<double> z = normal_values(rng, product(shape), rng() % 2 ? 1.0 : 3.0);
    // a masked vocabulary: the same classes -inf in student and teacher (one class kept)
    if (C > 1 && rng() % 4 == 0) {
      for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t c = 1; c < C; ++c)
          if (rng() % 3 == 0) x[flat_index(shape, r, c)] = z[flat_index(shape, r, c)] = -inf;
      what << " -inf logits";
    }
    teacher = make_tensor(shape, rng() % 3 ? type : float_types[rng() % 4], z, layout_for(ndim));
    what << " teacher " << teacher.describe();
  }
  const tensor input = make_tensor(shape, type, x, layout_for(ndim));
  const output_request req = random_outputs(rng, input, o.reduce == reduction::none, rows_shape);
  what << " student " << input.describe() << req.describe();
  SCOPED_TRACE(what.str());
  std::int64_t kept = 0;
  for (std::int64_t r = 0; r < rows; ++r) kept += keep[r];
  const double coef = reduction_coef(o.reduce, static_cast<double>(o.reduce == reduction::mean ? kept * C : kept));
  // gradient terms coef T (q, p) are at most coef T
  const double terms = compute_rtol(type) * coef * o.temperature * 2;
  if (topk_teacher) {
    expect_matches_reference(
        [=](const array_view& in, const softce::outputs& out) { return softce::distillation_loss(in, k, o, out); },
        [=](const array_view& in, const softce::outputs& out) { return ref::distillation_loss(in, k, o, out); }, input, req,
        terms);
  } else {
    const array_view tv = teacher.view();
    double extra_atol = terms;
    if (o.kind != divergence::kl && !(o.kind == divergence::jsd && o.beta == 0))
      extra_atol += 4 * (type == dtype::float64 ? 0x1p-52 : 0x1p-23) *
                   cancelling_gradient_scale(input.values(), teacher.values(), shape, o, keep);
    expect_matches_reference(
        [=](const array_view& in, const softce::outputs& out) { return softce::distillation_loss(in, tv, o, out); },
        [=](const array_view& in, const softce::outputs& out) { return ref::distillation_loss(in, tv, o, out); }, input,
        req, extra_atol);
  }
}

TEST(Distillation, KlMatchesReference) {
  std::mt19937_64 rng(601);
  for (int i = 0; i < 150; ++i) run_random_case(rng, false, {}, {}, divergence::kl);
}

TEST(Distillation, ReverseKlMatchesReference) {
  std::mt19937_64 rng(602);
  for (int i = 0; i < 150; ++i) run_random_case(rng, false, {}, {}, divergence::reverse_kl);
}

TEST(Distillation, JsdMatchesReference) {
  std::mt19937_64 rng(603);
  for (int i = 0; i < 200; ++i) run_random_case(rng, false, {}, {}, divergence::jsd);
}

TEST(Distillation, TopKTeacherMatchesReference) {
  std::mt19937_64 rng(604);
  for (int i = 0; i < 200; ++i) run_random_case(rng, true);
}

TEST(Distillation, SingleClass) {
  std::mt19937_64 rng(605);
  for (dtype type : float_types)
    for (divergence kind : {divergence::kl, divergence::reverse_kl, divergence::jsd}) {
      run_random_case(rng, false, {4, 1}, type, kind);
      run_random_case(rng, true, {4, 1}, type);
    }
}

TEST(Distillation, LargeClassCounts) {
  std::mt19937_64 rng(606);
  for (divergence kind : {divergence::kl, divergence::reverse_kl, divergence::jsd}) {
    run_random_case(rng, false, {1, 300000}, dtype::float32, kind, false);
    run_random_case(rng, false, {2, 262147}, dtype::float64, kind, false);  // rows one at a time, split
  }
  run_random_case(rng, true, {2, 262147}, dtype::float32, {}, false);
}

// TRL's endpoints: jsd with beta = 0 is kl, with beta = 1 reverse_kl, exactly.
TEST(Distillation, JsdEndpointsAreKlAndReverseKl) {
  std::mt19937_64 rng(607);
  for (dtype type : {dtype::float32, dtype::float64}) {
    const shape_t shape{5, 33};
    const tensor x = make_tensor(shape, type, normal_values(rng, 165, 2.0));
    const tensor z = make_tensor(shape, type, normal_values(rng, 165, 2.0));
    for (auto [beta, kind] : {std::pair{0.0, divergence::kl}, std::pair{1.0, divergence::reverse_kl}}) {
      softce::distillation_options jsd, plain;
      jsd.kind = divergence::jsd;
      jsd.beta = beta;
      jsd.temperature = plain.temperature = 2.0;
      plain.kind = kind;
      tensor g1(shape, type), g2(shape, type);
      softce::outputs o1, o2;
      o1.grad = g1.mutable_view();
      o2.grad = g2.mutable_view();
      EXPECT_EQ(softce::distillation_loss(x.view(), z.view(), jsd, o1), softce::distillation_loss(x.view(), z.view(), plain, o2));
      EXPECT_EQ(g1.element_bytes(), g2.element_bytes());
    }
  }
}

}  // namespace
}  // namespace softce_test

namespace softce_test {
namespace {

// dim: every class dimension of a 3-d input, fast against the oracle (which moves the class
// dimension itself), with the gradient, the teacher's gradient and per-row losses; dim = -1
// on (B, S, V) equals dim = 1 on the same numbers laid out as (B, V, S).
TEST(Distillation, EveryClassDimensionMatchesTheOracle) {
  std::mt19937_64 rng(77);
  const shape_t shape{2, 3, 5};
  const std::vector<double> x = normal_values(rng, 30, 2.0), z = normal_values(rng, 30, 2.0);
  for (int dim : {-1, 0, 1, 2}) {
    for (divergence kind : {divergence::kl, divergence::reverse_kl, divergence::jsd}) {
      SCOPED_TRACE(std::to_string(dim) + " " + divergence_text(kind));
      softce::distillation_options o;
      o.dim = dim;
      o.kind = kind;
      o.beta = 0.3;
      o.temperature = 1.5;
      o.reduce = reduction::none;
      const int d = dim < 0 ? dim + 3 : dim;
      shape_t rows;
      for (int i = 0; i < 3; ++i)
        if (i != d) rows.push_back(shape[i]);
      const tensor xt = make_tensor(shape, dtype::float64, x), zt = make_tensor(shape, dtype::float64, z);
      auto run = [&](bool oracle) {
        tensor g(shape, dtype::float64), gt(shape, dtype::float64), l(rows, dtype::float64);
        softce::outputs out;
        out.grad = g.mutable_view();
        out.grad_target = gt.mutable_view();
        out.losses = l.mutable_view();
        const double loss = oracle ? softce::reference::distillation_loss(xt.view(), zt.view(), o, out)
                                   : softce::distillation_loss(xt.view(), zt.view(), o, out);
        return std::make_tuple(loss, g.values(), gt.values(), l.values());
      };
      const auto [fl, fg, fgt, fls] = run(false);
      const auto [rl, rg, rgt, rls] = run(true);
      const tolerance tol = array_tolerance(dtype::float64, dtype::float64);
      EXPECT_TRUE(loss_near(fl, rl, loss_tolerance(dtype::float64)));
      EXPECT_TRUE(values_near(fg, rg, tol, "grad"));
      EXPECT_TRUE(values_near(fgt, rgt, tol, "grad_target"));
      EXPECT_TRUE(values_near(fls, rls, tol, "losses"));
      if (dim == -1) {  // the same numbers as (B, V, S) with dim = 1
        std::vector<double> xs(30), zs(30);
        for (int b = 0; b < 2; ++b)
          for (int s = 0; s < 3; ++s)
            for (int v = 0; v < 5; ++v) {
              xs[b * 15 + v * 3 + s] = x[b * 15 + s * 5 + v];
              zs[b * 15 + v * 3 + s] = z[b * 15 + s * 5 + v];
            }
        softce::distillation_options o1 = o;
        o1.dim = 1;
        tensor l1(rows, dtype::float64);
        softce::outputs out1;
        out1.losses = l1.mutable_view();
        softce::reference::distillation_loss(make_tensor({2, 5, 3}, dtype::float64, xs).view(),
                                             make_tensor({2, 5, 3}, dtype::float64, zs).view(), o1, out1);
        EXPECT_TRUE(values_near(l1.values(), rls, tol, "dim=-1 vs the (B, V, S) layout"));
      }
    }
  }
}

}  // namespace
}  // namespace softce_test
