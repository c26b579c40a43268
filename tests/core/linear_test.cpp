// linear_cross_entropy / linear_distillation_loss (include/softce/linear.hpp) against the
// logits materialised in float64: logits = hidden · weightᵀ + bias computed naively in
// double, then the dense loss in float64 (itself checked against the oracle elsewhere), and
// the gradients G · W, Gᵀ · H and the column sums of G formed naively. Randomised shapes
// (D and V not multiples of the vector width, V not a multiple of the block, N = 0 / 1),
// every target kind and divergence, ignore_index rows, masks, class weights, label
// smoothing, budgets that force many row blocks and class blocks, float32 / float64 /
// bfloat16, 1 vs 2 threads, and the bad-input errors (with nothing written).
#include <softce/linear.hpp>
#include <softce/softce.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

using softce::divergence;
using softce::reduction;

enum class kind { index, probs, topk, topk_tail, distill_logits, distill_topk, distill_hidden };

const char* kind_name(kind k) {
  switch (k) {
    case kind::index: return "index";
    case kind::probs: return "probs";
    case kind::topk: return "topk";
    case kind::topk_tail: return "topk_tail";
    case kind::distill_logits: return "distill_logits";
    case kind::distill_topk: return "distill_topk";
    case kind::distill_hidden: return "distill_hidden";
  }
  return "?";
}

bool is_distill(kind k) { return k == kind::distill_logits || k == kind::distill_topk || k == kind::distill_hidden; }

// One problem, all data in double.
struct problem {
  kind k = kind::index;
  std::int64_t N = 0, D = 1, V = 1, K = 3, Dt = 1;
  std::vector<double> h, w, b, th, tw, tb, probs, teacher_logits, topk_values, class_weight;
  std::vector<std::int64_t> index, topk_indices;
  std::vector<std::uint8_t> mask;
  bool use_bias = false, use_mask = false, use_class_weight = false;
  double smoothing = 0.0;
  reduction red = reduction::mean;
  divergence div = divergence::kl;
  double temperature = 1.0, beta = 0.5;
  std::int64_t ignore_index = -100;
};

struct result {
  double loss = 0;
  std::vector<double> losses, gh, gw, gb;
};

problem make_problem(std::mt19937_64& rng, kind k, std::int64_t N, std::int64_t D, std::int64_t V) {
  problem p;
  p.k = k;
  p.N = N, p.D = D, p.V = V;
  p.K = std::min<std::int64_t>(V, 1 + static_cast<std::int64_t>(rng() % 4));
  p.Dt = 1 + static_cast<std::int64_t>(rng() % 9);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  auto fill = [&](std::vector<double>& v, std::int64_t n, double scale) {
    v.resize(static_cast<std::size_t>(n));
    for (double& x : v) x = scale * normal(rng);
  };
  // large-ish logits (|x| up to ~10), -inf-free
  fill(p.h, N * D, 1.0);
  fill(p.w, V * D, 2.0 / std::sqrt(static_cast<double>(D)));
  p.use_bias = rng() % 2;
  fill(p.b, V, 1.0);
  fill(p.th, N * p.Dt, 1.0);
  fill(p.tw, V * p.Dt, 2.0 / std::sqrt(static_cast<double>(p.Dt)));
  fill(p.tb, V, 1.0);
  fill(p.teacher_logits, N * V, 3.0);
  p.probs.resize(static_cast<std::size_t>(N * V));
  for (std::int64_t n = 0; n < N; ++n) {
    double s = 0;
    for (std::int64_t v = 0; v < V; ++v) s += p.probs[n * V + v] = uniform(rng) < 0.3 ? 0.0 : uniform(rng);
    for (std::int64_t v = 0; v < V; ++v) p.probs[n * V + v] = s > 0 ? p.probs[n * V + v] / s : 1.0 / V;
  }
  p.index.resize(static_cast<std::size_t>(N));
  for (auto& y : p.index) y = rng() % 5 == 0 ? -100 : static_cast<std::int64_t>(rng() % V);
  p.topk_indices.resize(static_cast<std::size_t>(N * p.K));
  p.topk_values.resize(static_cast<std::size_t>(N * p.K));
  for (std::int64_t n = 0; n < N; ++n) {
    std::vector<std::int64_t> perm(static_cast<std::size_t>(V));
    for (std::int64_t v = 0; v < V; ++v) perm[v] = v;
    std::shuffle(perm.begin(), perm.end(), rng);
    double s = 0;
    for (std::int64_t j = 0; j < p.K; ++j) s += p.topk_values[n * p.K + j] = 0.1 + uniform(rng);
    const double total = k == kind::topk_tail ? s / 0.8 : s;  // tail: 20 % outside the top k
    for (std::int64_t j = 0; j < p.K; ++j) {
      p.topk_indices[n * p.K + j] = perm[j];
      p.topk_values[n * p.K + j] /= total;
    }
  }
  p.use_mask = k != kind::index && rng() % 2;
  p.mask.resize(static_cast<std::size_t>(N));
  for (auto& m : p.mask) m = rng() % 4 != 0;
  p.use_class_weight = (k == kind::index || k == kind::probs || k == kind::topk) && rng() % 2;
  p.class_weight.resize(static_cast<std::size_t>(V));
  for (double& c : p.class_weight) c = 0.25 + uniform(rng);
  if (k == kind::index || k == kind::probs || k == kind::topk) p.smoothing = rng() % 2 ? 0.0 : 0.15;
  const reduction ce_red[] = {reduction::mean, reduction::sum, reduction::none};
  const reduction d_red[] = {reduction::batchmean, reduction::mean, reduction::sum, reduction::none};
  p.red = is_distill(k) ? d_red[rng() % 4] : ce_red[rng() % 3];
  const divergence divs[] = {divergence::kl, divergence::reverse_kl, divergence::jsd};
  p.div = k == kind::distill_topk ? divergence::kl : divs[rng() % 3];
  p.temperature = rng() % 2 ? 1.0 : 2.5;
  const double betas[] = {0.0, 0.3, 0.5, 1.0};
  p.beta = betas[rng() % 4];
  return p;
}

softce::cross_entropy_options ce_options(const problem& p) {
  softce::cross_entropy_options o;
  o.reduce = p.red;
  o.label_smoothing = p.smoothing;
  o.ignore_index = p.k == kind::index ? p.ignore_index : -100;
  if (p.use_class_weight) o.weight = softce::view(p.class_weight.data(), {p.V});
  if (p.use_mask) o.mask = softce::view(reinterpret_cast<const bool*>(p.mask.data()), {p.N});
  return o;
}

softce::distillation_options distill_options(const problem& p) {
  softce::distillation_options o;
  o.reduce = p.red;
  o.kind = p.div;
  o.temperature = p.temperature;
  o.beta = p.beta;
  if (p.use_mask) o.mask = softce::view(reinterpret_cast<const bool*>(p.mask.data()), {p.N});
  return o;
}

softce::topk topk_of(const problem& p) {
  return {softce::view(p.topk_indices.data(), {p.N, p.K}), softce::view(p.topk_values.data(), {p.N, p.K}),
          p.k == kind::topk_tail};
}

std::vector<double> naive_logits(const std::vector<double>& h, const std::vector<double>& w,
                                 const std::vector<double>* b, std::int64_t N, std::int64_t D, std::int64_t V) {
  std::vector<double> L(static_cast<std::size_t>(N * V));
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t v = 0; v < V; ++v) {
      double s = b ? (*b)[v] : 0.0;
      for (std::int64_t d = 0; d < D; ++d) s += h[n * D + d] * w[v * D + d];
      L[n * V + v] = s;
    }
  return L;
}

// The reference: logits in double, the dense float64 loss, gradients formed naively.
result reference(const problem& p) {
  const std::int64_t N = p.N, D = p.D, V = p.V;
  std::vector<double> L = naive_logits(p.h, p.w, p.use_bias ? &p.b : nullptr, N, D, V);
  std::vector<double> G(L.size());
  result r;
  r.losses.assign(static_cast<std::size_t>(N), 0.0);
  softce::outputs out;
  out.grad = softce::view(G.data(), {N, V});
  if (p.red == reduction::none) out.losses = softce::view(r.losses.data(), {N});
  const auto x = softce::view(static_cast<const double*>(L.data()), {N, V});
  switch (p.k) {
    case kind::index:
      r.loss = softce::cross_entropy(x, softce::view(p.index.data(), {N}), ce_options(p), out);
      break;
    case kind::probs:
      r.loss = softce::cross_entropy(x, softce::view(p.probs.data(), {N, V}), ce_options(p), out);
      break;
    case kind::topk:
    case kind::topk_tail: r.loss = softce::cross_entropy(x, topk_of(p), ce_options(p), out); break;
    case kind::distill_logits:
      r.loss = softce::distillation_loss(x, softce::view(p.teacher_logits.data(), {N, V}), distill_options(p), out);
      break;
    case kind::distill_topk: r.loss = softce::distillation_loss(x, topk_of(p), distill_options(p), out); break;
    case kind::distill_hidden: {
      const std::vector<double> TL = naive_logits(p.th, p.tw, p.use_bias ? &p.tb : nullptr, N, p.Dt, V);
      r.loss = softce::distillation_loss(x, softce::view(TL.data(), {N, V}), distill_options(p), out);
      break;
    }
  }
  r.gh.assign(static_cast<std::size_t>(N * D), 0.0);
  r.gw.assign(static_cast<std::size_t>(V * D), 0.0);
  r.gb.assign(static_cast<std::size_t>(V), 0.0);
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t v = 0; v < V; ++v) {
      const double g = G[n * V + v];
      r.gb[v] += g;
      for (std::int64_t d = 0; d < D; ++d) {
        r.gh[n * D + d] += g * p.w[v * D + d];
        r.gw[v * D + d] += g * p.h[n * D + d];
      }
    }
  if (!p.use_bias) r.gb.assign(r.gb.size(), 0.0);
  return r;
}

template <class T>
std::vector<T> cast(const std::vector<double>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<T>(v[i]);
  return out;
}

std::uint16_t to_bf16(double d) {
  float f = static_cast<float>(d);
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return static_cast<std::uint16_t>(u >> 16);
}
double from_bf16(std::uint16_t b) {
  std::uint32_t u = static_cast<std::uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Rounds the problem's hidden states and weights to bfloat16 (so that the float32 / float64
// reference sees the same operands).
void round_to_bf16(problem& p) {
  for (auto* v : {&p.h, &p.w, &p.b, &p.th, &p.tw, &p.tb})
    for (double& x : *v) x = from_bf16(to_bf16(x));
}

// softce's fused call in dtype T (float, double, or softce::bfloat16 for the 16-bit operands
// with float32 gradients).
template <class T>
result fused(const problem& p, std::size_t budget, bool accumulate = false, const result* start = nullptr) {
  using G = std::conditional_t<std::is_same_v<T, softce::bfloat16>, float, T>;
  const std::int64_t N = p.N, D = p.D, V = p.V;
  auto conv = [](const std::vector<double>& v) {
    if constexpr (std::is_same_v<T, softce::bfloat16>) {
      std::vector<softce::bfloat16> out(v.size());
      for (std::size_t i = 0; i < v.size(); ++i) out[i].bits = to_bf16(v[i]);
      return out;
    } else {
      return cast<T>(v);
    }
  };
  const auto h = conv(p.h), w = conv(p.w), b = conv(p.b), th = conv(p.th), tw = conv(p.tw), tb = conv(p.tb);
  const auto probs = cast<G>(p.probs), teacher_logits = cast<G>(p.teacher_logits);
  std::vector<G> losses(static_cast<std::size_t>(N)), gh(static_cast<std::size_t>(N * D)),
      gw(static_cast<std::size_t>(V * D)), gb(static_cast<std::size_t>(V));
  if (start) gw = cast<G>(start->gw), gb = cast<G>(start->gb);
  softce::linear_outputs out;
  out.grad_hidden = softce::view(gh.data(), {N, D});
  out.grad_weight = softce::view(gw.data(), {V, D});
  if (p.use_bias) out.grad_bias = softce::view(gb.data(), {V});
  if (p.red == reduction::none) out.losses = softce::view(losses.data(), {N});
  out.accumulate = accumulate;
  softce::linear_options lo;
  lo.memory_budget = budget;
  const auto H = softce::view(h.data(), {N, D});
  const auto W = softce::view(w.data(), {V, D});
  std::optional<softce::array_view> B;
  if (p.use_bias) B = softce::view(b.data(), {V});
  result r;
  switch (p.k) {
    case kind::index:
      r.loss = softce::linear_cross_entropy(H, W, B, softce::view(p.index.data(), {N}), ce_options(p), lo, out);
      break;
    case kind::probs:
      r.loss = softce::linear_cross_entropy(H, W, B, softce::view(probs.data(), {N, V}), ce_options(p), lo, out);
      break;
    case kind::topk:
    case kind::topk_tail: r.loss = softce::linear_cross_entropy(H, W, B, topk_of(p), ce_options(p), lo, out); break;
    case kind::distill_logits:
      r.loss = softce::linear_distillation_loss(H, W, B, softce::view(teacher_logits.data(), {N, V}),
                                                distill_options(p), lo, out);
      break;
    case kind::distill_topk:
      r.loss = softce::linear_distillation_loss(H, W, B, topk_of(p), distill_options(p), lo, out);
      break;
    case kind::distill_hidden: {
      softce::linear_teacher t{softce::view(th.data(), {N, p.Dt}), softce::view(tw.data(), {V, p.Dt}), std::nullopt};
      if (p.use_bias) t.bias = softce::view(tb.data(), {V});
      r.loss = softce::linear_distillation_loss(H, W, B, t, distill_options(p), lo, out);
      break;
    }
  }
  auto back = [](const std::vector<G>& v) {
    std::vector<double> out(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<double>(v[i]);
    return out;
  };
  r.losses = back(losses), r.gh = back(gh), r.gw = back(gw), r.gb = back(gb);
  if (!p.use_bias) r.gb.assign(r.gb.size(), 0.0);
  if (p.red != reduction::none) r.losses.assign(r.losses.size(), 0.0);
  return r;
}

// |a - b| <= tol * (scale of the array), element by element; NaN must match NaN.
void expect_close(const std::vector<double>& a, const std::vector<double>& b, double tol, const std::string& what,
                  double floor = 1e-30) {
  ASSERT_EQ(a.size(), b.size()) << what;
  double scale = floor;
  for (double x : b)
    if (std::isfinite(x)) scale = std::max(scale, std::fabs(x));
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(b[i])) {
      EXPECT_TRUE(std::isnan(a[i])) << what << " [" << i << "]";
      continue;
    }
    ASSERT_LE(std::fabs(a[i] - b[i]), tol * scale) << what << " [" << i << "] " << a[i] << " vs " << b[i];
  }
}

void expect_result(const result& got, const result& want, double tol, const std::string& what) {
  if (std::isnan(want.loss)) EXPECT_TRUE(std::isnan(got.loss)) << what;
  else EXPECT_NEAR(got.loss, want.loss, tol * std::max(1.0, std::fabs(want.loss))) << what;
  // per-row losses: an error relative to the logits' size (~1), not the loss's (KL ~ 0)
  expect_close(got.losses, want.losses, tol, what + " losses", 1.0);
  expect_close(got.gh, want.gh, tol, what + " grad_hidden");
  expect_close(got.gw, want.gw, tol, what + " grad_weight");
  expect_close(got.gb, want.gb, tol, what + " grad_bias");
}

std::string describe(const problem& p, std::size_t budget) {
  return std::string(kind_name(p.k)) + " N=" + std::to_string(p.N) + " D=" + std::to_string(p.D) +
         " V=" + std::to_string(p.V) + " red=" + std::string(softce::reduction_name(p.red)) +
         " div=" + std::string(softce::divergence_name(p.div)) + " beta=" + std::to_string(p.beta) +
         " T=" + std::to_string(p.temperature) + " bias=" + std::to_string(p.use_bias) +
         " mask=" + std::to_string(p.use_mask) + " cw=" + std::to_string(p.use_class_weight) +
         " ls=" + std::to_string(p.smoothing) + " budget=" + std::to_string(budget);
}

const kind all_kinds[] = {kind::index,          kind::probs,        kind::topk,          kind::topk_tail,
                          kind::distill_logits, kind::distill_topk, kind::distill_hidden};

// Budgets in units of one row of V logits of the element size: whole batch, a few rows per
// block, and below one row (class blocks).
std::size_t budget_for(std::mt19937_64& rng, const problem& p, std::size_t element, int mode) {
  const std::size_t logit = element * (p.k == kind::distill_hidden ? 2 : 1);
  const std::size_t staging = element * static_cast<std::size_t>(2 * p.D + p.Dt);
  switch (mode) {
    case 0: return std::size_t{64} << 20;
    case 1: return (logit * p.V + staging) * (1 + rng() % 4);
    default: {
      const std::size_t classes = 16 + rng() % std::max<std::int64_t>(p.V / 2, 1);
      return (logit * classes + staging) * (1 + rng() % 3);
    }
  }
}

TEST(LinearTest, MatchesMaterialisedLogitsFloat64) {
  std::mt19937_64 rng(11);
  const std::int64_t Ns[] = {0, 1, 2, 7, 23};
  const std::int64_t Ds[] = {1, 3, 17, 33};
  const std::int64_t Vs[] = {1, 5, 17, 40, 103};
  for (int it = 0; it < 400; ++it) {
    const kind k = all_kinds[it % std::size(all_kinds)];
    const std::int64_t V = Vs[rng() % std::size(Vs)];
    problem p = make_problem(rng, k, Ns[rng() % std::size(Ns)], Ds[rng() % std::size(Ds)], V);
    const std::size_t budget = budget_for(rng, p, sizeof(double), it % 3);
    const result want = reference(p);
    const result got = fused<double>(p, budget);
    expect_result(got, want, 1e-10, describe(p, budget));
    if (HasFatalFailure()) return;
  }
}

TEST(LinearTest, MatchesMaterialisedLogitsFloat32) {
  std::mt19937_64 rng(12);
  const std::int64_t Ns[] = {0, 1, 5, 31};
  const std::int64_t Ds[] = {1, 7, 19, 65};
  const std::int64_t Vs[] = {2, 17, 33, 129};
  for (int it = 0; it < 300; ++it) {
    const kind k = all_kinds[it % std::size(all_kinds)];
    problem p = make_problem(rng, k, Ns[rng() % std::size(Ns)], Ds[rng() % std::size(Ds)], Vs[rng() % std::size(Vs)]);
    const std::size_t budget = budget_for(rng, p, sizeof(float), it % 3);
    const result want = reference(p);
    const result got = fused<float>(p, budget);
    // float32 logits of |x| ~ 10 summed over D terms: ~1e-6 relative on the loss and gradients
    expect_result(got, want, 2e-5, describe(p, budget));
    if (HasFatalFailure()) return;
  }
}

TEST(LinearTest, Bfloat16OperandsMatchFloat32) {
  std::mt19937_64 rng(13);
  for (int it = 0; it < 70; ++it) {
    const kind k = all_kinds[it % std::size(all_kinds)];
    problem p = make_problem(rng, k, 1 + rng() % 20, 1 + rng() % 40, 2 + rng() % 90);
    round_to_bf16(p);  // the same operands in every precision
    const std::size_t budget = budget_for(rng, p, sizeof(float), it % 3);
    const result want = reference(p);
    const result got = fused<softce::bfloat16>(p, budget);
    expect_result(got, want, 2e-5, "bf16 " + describe(p, budget));
    if (HasFatalFailure()) return;
  }
}

TEST(LinearTest, AccumulatesIntoGradWeightAndBias) {
  std::mt19937_64 rng(14);
  for (int it = 0; it < 30; ++it) {
    const kind k = all_kinds[it % std::size(all_kinds)];
    problem p = make_problem(rng, k, rng() % 9, 1 + rng() % 12, 1 + rng() % 50);
    p.use_bias = true;
    result start;
    std::normal_distribution<double> normal;
    start.gw.resize(static_cast<std::size_t>(p.V * p.D));
    start.gb.resize(static_cast<std::size_t>(p.V));
    for (double& x : start.gw) x = normal(rng);
    for (double& x : start.gb) x = normal(rng);
    const std::size_t budget = budget_for(rng, p, sizeof(double), it % 3);
    result want = reference(p);
    for (std::size_t i = 0; i < want.gw.size(); ++i) want.gw[i] += start.gw[i];
    for (std::size_t i = 0; i < want.gb.size(); ++i) want.gb[i] += start.gb[i];
    const result got = fused<double>(p, budget, true, &start);
    expect_result(got, want, 1e-10, "accumulate " + describe(p, budget));
    if (HasFatalFailure()) return;
  }
}

TEST(LinearTest, ClassBlocksMatchRowBlocks) {
  // the same problem through one block, many row blocks, and class blocks of 16+ classes
  std::mt19937_64 rng(15);
  for (int it = 0; it < 3 * static_cast<int>(std::size(all_kinds)); ++it) {
    const kind k = all_kinds[it % std::size(all_kinds)];
    problem p = make_problem(rng, k, 9, 13, 70);
    if (k == kind::distill_logits || k == kind::distill_hidden) {  // every divergence (JSD: two rounds)
      const divergence divs[] = {divergence::kl, divergence::reverse_kl, divergence::jsd};
      p.div = divs[(it / std::size(all_kinds)) % 3];
      p.beta = 0.3;
    }
    const result whole = fused<double>(p, std::size_t{64} << 20);
    const result rows = fused<double>(p, 8 * 70 * 2 * 2);  // 2 (1) rows
    const result classes = fused<double>(p, 320);  // 1 row x 40 (20) classes
    expect_result(rows, whole, 1e-12, std::string("rows ") + kind_name(k));
    expect_result(classes, whole, 1e-12, std::string("classes ") + kind_name(k));
  }
}

TEST(LinearTest, OneAndTwoThreadsAgree) {
  std::mt19937_64 rng(16);
  const int before = softce::get_num_threads();
  for (const kind k : all_kinds) {
    problem p = make_problem(rng, k, 300, 64, 1500);
    for (int mode = 0; mode < 3; ++mode) {
      const std::size_t budget = budget_for(rng, p, sizeof(float), mode);
      softce::set_num_threads(1);
      const result one = fused<float>(p, budget);
      softce::set_num_threads(2);
      const result two = fused<float>(p, budget);
      // row sums and the loss are in a fixed order; the BLAS may split a product differently
      expect_result(two, one, 1e-6, std::string("threads ") + describe(p, budget));
    }
  }
  softce::set_num_threads(before);
}

TEST(LinearTest, LeadingDimensions) {
  // hidden (2, 3, D), targets (2, 3), a strided (column-sliced) hidden and a transposed weight
  std::mt19937_64 rng(17);
  problem p = make_problem(rng, kind::index, 6, 10, 21);
  p.red = reduction::none;
  const result want = reference(p);
  std::vector<double> hidden_wide(6 * 13), weight_t(10 * 21);
  for (int n = 0; n < 6; ++n)
    for (int d = 0; d < 10; ++d) hidden_wide[n * 13 + d] = p.h[n * 10 + d];
  for (int v = 0; v < 21; ++v)
    for (int d = 0; d < 10; ++d) weight_t[d * 21 + v] = p.w[v * 10 + d];
  std::vector<double> losses(6), gh(6 * 10), gw(21 * 10), gb(21);
  softce::linear_outputs out;
  out.losses = softce::view(losses.data(), {2, 3});
  out.grad_hidden = softce::view(gh.data(), {2, 3, 10});
  out.grad_weight = softce::view(gw.data(), {21, 10});
  out.grad_bias = softce::view(gb.data(), {21});
  std::optional<softce::array_view> bias;
  if (p.use_bias) bias = softce::view(p.b.data(), {21});
  const double loss = softce::linear_cross_entropy(softce::view(hidden_wide.data(), {2, 3, 10}, {39, 13, 1}),
                                                   softce::view(weight_t.data(), {21, 10}, {1, 21}), bias,
                                                   softce::view(p.index.data(), {2, 3}), ce_options(p), {}, out);
  EXPECT_NEAR(loss, want.loss, 1e-10);
  expect_close(losses, want.losses, 1e-10, "losses");
  expect_close(gh, want.gh, 1e-10, "grad_hidden");
  expect_close(gw, want.gw, 1e-10, "grad_weight");
  if (p.use_bias) expect_close(gb, want.gb, 1e-10, "grad_bias");
}

TEST(LinearTest, AllIgnoredMeanIsNaNWithZeroGradients) {
  std::vector<float> h(3 * 4, 0.5f), w(5 * 4, 0.25f), gh(12, 7.f), gw(20, 7.f);
  std::vector<std::int64_t> t(3, -100);
  softce::linear_outputs out;
  out.grad_hidden = softce::view(gh.data(), {3, 4});
  out.grad_weight = softce::view(gw.data(), {5, 4});
  const double loss = softce::linear_cross_entropy(softce::view(h.data(), {3, 4}), softce::view(w.data(), {5, 4}),
                                                   std::nullopt, softce::view(t.data(), {3}), {}, {}, out);
  EXPECT_TRUE(std::isnan(loss));
  for (float g : gh) EXPECT_EQ(g, 0.f);
  for (float g : gw) EXPECT_EQ(g, 0.f);
}

// ---------------------------------------------------------------------------------------
// errors: the message names the argument, nothing is written

struct error_case {
  std::vector<float> h = std::vector<float>(4 * 3, 0.5f), w = std::vector<float>(5 * 3, 0.1f),
                     b = std::vector<float>(5, 0.f), probs = std::vector<float>(4 * 5, 0.2f);
  std::vector<std::int64_t> t = {0, 1, 2, 3};
  std::vector<float> gh = std::vector<float>(12, 9.f), gw = std::vector<float>(15, 9.f), gb = std::vector<float>(5, 9.f);
  softce::linear_outputs out() {
    softce::linear_outputs o;
    o.grad_hidden = softce::view(gh.data(), {4, 3});
    o.grad_weight = softce::view(gw.data(), {5, 3});
    o.grad_bias = softce::view(gb.data(), {5});
    return o;
  }
  bool untouched() const {
    for (float g : gh) if (g != 9.f) return false;
    for (float g : gw) if (g != 9.f) return false;
    for (float g : gb) if (g != 9.f) return false;
    return true;
  }
};

template <class F>
void expect_error(F&& call, const std::string& message, error_case& c) {
  try {
    call();
    ADD_FAILURE() << "no error, expected: " << message;
  } catch (const softce::error& e) {
    EXPECT_EQ(std::string(e.what()), message);
  }
  EXPECT_TRUE(c.untouched()) << message;
}

TEST(LinearTest, Errors) {
  error_case c;
  const auto H = softce::view(c.h.data(), {4, 3});
  const auto W = softce::view(c.w.data(), {5, 3});
  const std::optional<softce::array_view> B = softce::view(c.b.data(), {5});
  const auto T = softce::view(c.t.data(), {4});
  expect_error([&] { softce::linear_cross_entropy(H, softce::view(c.w.data(), {3, 5}), B, T, {}, {}, c.out()); },
               "linear_cross_entropy: weight: expected shape (V, 3) (D = hidden.shape[-1]), got (3, 5)", c);
  expect_error([&] { softce::linear_cross_entropy(H, W, softce::view(c.b.data(), {4}), T, {}, {}, c.out()); },
               "linear_cross_entropy: bias: expected shape (5) (one value per class), got (4)", c);
  expect_error([&] { softce::linear_cross_entropy(H, W, B, softce::view(c.t.data(), {3}), {}, {}, c.out()); },
               "linear_cross_entropy: target: expected shape (4) (the hidden states' rows), got (3)", c);
  expect_error(
      [&] { softce::linear_cross_entropy(H, W, B, softce::view(c.probs.data(), {4, 4}), {}, {}, c.out()); },
      "linear_cross_entropy: target: expected shape (4, 5) (the hidden states' rows, then V), got (4, 4)", c);
  c.t[2] = 5;
  expect_error([&] { softce::linear_cross_entropy(H, W, B, T, {}, {}, c.out()); },
               "linear_cross_entropy: target: class index 5 at row 2 is out of range for 5 classes", c);
  c.t[2] = 2;
  c.h[7] = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { softce::linear_cross_entropy(H, W, B, T, {}, {}, c.out()); },
               "linear_cross_entropy: hidden: expected finite values, got nan at row 2, column 1", c);
  c.h[7] = std::numeric_limits<float>::infinity();
  expect_error([&] { softce::linear_cross_entropy(H, W, B, T, {}, {}, c.out()); },
               "linear_cross_entropy: hidden: expected finite values, got inf at row 2, column 1", c);
  c.h[7] = 0.5f;
  softce::linear_options tiny;
  tiny.memory_budget = 19;
  expect_error([&] { softce::linear_cross_entropy(H, W, B, T, {}, tiny, c.out()); },
               "linear_cross_entropy: memory_budget: expected at least 20 bytes (a block of one row and 5 classes), "
               "got 19",
               c);
  std::vector<float> teacher(4 * 6, 0.f);
  expect_error(
      [&] {
        softce::linear_distillation_loss(H, W, B, softce::view(teacher.data(), {4, 6}), {}, {}, c.out());
      },
      "linear_distillation_loss: teacher: expected shape (4, 5) (the hidden states' rows, then V), got (4, 6)", c);
  std::vector<float> th(4 * 2, 0.f), tw(6 * 2, 0.f);
  softce::linear_teacher lt{softce::view(th.data(), {4, 2}), softce::view(tw.data(), {6, 2}), std::nullopt};
  expect_error([&] { softce::linear_distillation_loss(H, W, B, lt, {}, {}, c.out()); },
               "linear_distillation_loss: teacher.weight: expected 5 rows (classes, as the student's weight), got "
               "shape (6, 2)",
               c);
  softce::linear_outputs overlapping = c.out();
  overlapping.grad_hidden = softce::view(c.h.data(), {4, 3});
  expect_error([&] { softce::linear_cross_entropy(H, W, B, T, {}, {}, overlapping); },
               "linear_cross_entropy: grad_hidden overlaps hidden (outputs may not overlap inputs or each other)", c);
  softce::linear_outputs wrong_gw = c.out();
  wrong_gw.grad_weight = softce::view(c.gw.data(), {3, 5});
  expect_error([&] { softce::linear_cross_entropy(H, W, B, T, {}, {}, wrong_gw); },
               "linear_cross_entropy: grad_weight: expected shape (5, 3) (the weight's), got (3, 5)", c);
}

}  // namespace
