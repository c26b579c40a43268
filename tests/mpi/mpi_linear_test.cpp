// Tests of the vocabulary-parallel fused output layer on MPI (softce::mpi::linear_*), run
// under mpirun with 1 to 4 ranks.
//
// Every rank builds the same global problem from the same seed: hidden (rows, D), weight
// (V, D), bias, class weights, every target kind and teacher form. The oracle is the
// single-process softce::linear_* on the full arrays (itself checked against a float64
// reference in tests/core/linear_test.cpp). Each rank then passes its slice of weight rows
// (and of the bias, class weights, probability targets, teacher logits, teacher weight and
// bias) to softce::mpi::linear_* and compares: loss to 1e-6 relative, per-row losses
// likewise, the full grad_hidden, its rows of grad_weight and grad_bias to 1e-5 of the
// gradient's scale. Loss and grad_hidden must be bitwise the same on every rank. Splits:
// even, skewed (uneven) and an empty first shard; V = 101 is no multiple of any block, and
// the small memory budgets make row blocks of one row and class blocks of 20 classes, so
// the in-process class-block merge composes with the cross-rank all-reduce. Then errors:
// one rank's bad argument and every disagreement of the fused layer raise on every rank.
// bfloat16 operands (hidden, weight, bias, a teacher's hidden states and weight) are run in
// float32 cases: the one-process oracle takes the same bfloat16 arrays.
//
// No GoogleTest: a failed check must not skip the collectives that follow it.
#include "mpi_harness.hpp"

#include <softce/mpi.hpp>

#include <bit>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using namespace mpi_harness;
using softce::array_view;
using softce::divergence;
using softce::dtype;
using softce::reduction;

bool close(double got, double want, double rel, double abs_floor = 0.0) {
  if (std::isnan(want)) return std::isnan(got);
  return std::fabs(got - want) <= rel * std::fabs(want) + abs_floor;
}

// `value`'s bits are the same on every rank.
void check_same_on_all_ranks(std::uint64_t bits, const std::string& what) {
  std::vector<std::uint64_t> all(static_cast<std::size_t>(g_size));
  MPI_Allgather(&bits, 1, MPI_UINT64_T, all.data(), 1, MPI_UINT64_T, MPI_COMM_WORLD);
  for (int r = 0; r < g_size; ++r) check(all[r] == bits, what + " differs between this rank and rank " + std::to_string(r));
}

template <class T>
std::uint64_t bits_hash(const std::vector<T>& v) {
  std::uint64_t h = 0x9e3779b97f4a7c15ull;
  for (const T& x : v) {
    std::uint64_t b = 0;
    std::memcpy(&b, &x, sizeof x);
    h = (h ^ b) * 0xff51afd7ed558ccdull;
    h ^= h >> 32;
  }
  return h;
}

// max |got - want| <= tol * max |want| (+ a floor for all-zero gradients)
template <class T>
void check_close_array(const T* got, const T* want, std::int64_t n, double tol, const std::string& what) {
  double scale = 0.0, worst = 0.0;
  std::int64_t at = -1;
  for (std::int64_t i = 0; i < n; ++i) scale = std::max(scale, std::fabs(static_cast<double>(want[i])));
  for (std::int64_t i = 0; i < n; ++i) {
    const double d = std::fabs(static_cast<double>(got[i]) - static_cast<double>(want[i]));
    if (!(d <= worst)) worst = d, at = i;  // NaN counts as worst
  }
  check(n == 0 || worst <= tol * std::max(scale, 1e-30),
        what + ": max difference " + num(worst) + " at " + std::to_string(at) + " (scale " + num(scale) + ")");
}

// ---------------------------------------------------------------------------------------
// one comparison case

enum class loss_kind { ce_index, ce_prob, ce_topk, distill_logits, distill_topk, distill_hidden };
enum class budget_kind { small, rows, whole };  // class blocks of 20 / row blocks of 3 rows / default

struct spec {
  std::string name;
  loss_kind loss = loss_kind::ce_index;
  std::vector<std::int64_t> rows{12};  // the hidden states' row shape
  std::int64_t V = 101, D = 6, Dt = 5, K = 4;
  reduction reduce = reduction::mean;
  bool bias = false, class_weight = false, mask = false, ignore_rows = false, tail = false;
  bool teacher_bias = false, accumulate = false;
  bool bf16 = false;  // hidden, weight, bias (and a teacher's) as bfloat16; float32 outputs
  double smoothing = 0.0;
  divergence kind = divergence::kl;
  double temperature = 1.0, beta = 0.5;
  split_kind split = split_kind::even;
  budget_kind budget = budget_kind::small;
};

std::vector<spec> comparison_cases() {
  std::vector<spec> v;
  auto add = [&](spec s) { v.push_back(s); };
  spec s;
  s = {}; s.name = "ce index, weights, smoothing, ignore, bias"; s.class_weight = true; s.smoothing = 0.1;
  s.ignore_rows = true; s.bias = true; add(s);
  s = {}; s.name = "ce index sum, empty first shard, row blocks"; s.reduce = reduction::sum;
  s.split = split_kind::empty_first; s.budget = budget_kind::rows; add(s);
  s = {}; s.name = "ce index none, skewed, 3-d hidden"; s.reduce = reduction::none; s.rows = {3, 4};
  s.split = split_kind::skewed; s.bias = true; s.class_weight = true; add(s);
  s = {}; s.name = "ce index mean weights, empty first, whole"; s.class_weight = true;
  s.split = split_kind::empty_first; s.budget = budget_kind::whole; s.ignore_rows = true; add(s);
  s = {}; s.name = "ce probabilities, mask, bias, skewed"; s.loss = loss_kind::ce_prob; s.mask = true; s.bias = true;
  s.split = split_kind::skewed; s.smoothing = 0.05; add(s);
  s = {}; s.name = "ce probabilities none, empty first"; s.loss = loss_kind::ce_prob; s.reduce = reduction::none;
  s.split = split_kind::empty_first; s.class_weight = true; add(s);
  s = {}; s.name = "ce top-k tail, mask"; s.loss = loss_kind::ce_topk; s.tail = true; s.mask = true; add(s);
  s = {}; s.name = "ce top-k weights smoothing, empty first, none"; s.loss = loss_kind::ce_topk;
  s.class_weight = true; s.smoothing = 0.2; s.reduce = reduction::none; s.split = split_kind::empty_first;
  s.bias = true; add(s);
  s = {}; s.name = "distill logits kl T=2, mask, bias"; s.loss = loss_kind::distill_logits; s.temperature = 2.0;
  s.mask = true; s.bias = true; s.reduce = reduction::batchmean; add(s);
  s = {}; s.name = "distill logits jsd, empty first"; s.loss = loss_kind::distill_logits; s.kind = divergence::jsd;
  s.beta = 0.3; s.reduce = reduction::mean; s.split = split_kind::empty_first; add(s);
  s = {}; s.name = "distill logits reverse_kl none, skewed, row blocks"; s.loss = loss_kind::distill_logits;
  s.kind = divergence::reverse_kl; s.reduce = reduction::none; s.split = split_kind::skewed;
  s.budget = budget_kind::rows; add(s);
  s = {}; s.name = "distill top-k tail sum"; s.loss = loss_kind::distill_topk; s.tail = true;
  s.reduce = reduction::sum; s.bias = true; add(s);
  s = {}; s.name = "distill hidden kl, teacher bias, skewed"; s.loss = loss_kind::distill_hidden;
  s.teacher_bias = true; s.bias = true; s.temperature = 1.5; s.split = split_kind::skewed; add(s);
  s = {}; s.name = "distill hidden jsd, mask, empty first"; s.loss = loss_kind::distill_hidden;
  s.kind = divergence::jsd; s.mask = true; s.split = split_kind::empty_first; add(s);
  s = {}; s.name = "distill hidden reverse_kl, whole, accumulate"; s.loss = loss_kind::distill_hidden;
  s.kind = divergence::reverse_kl; s.budget = budget_kind::whole; s.accumulate = true; s.bias = true; add(s);
  s = {}; s.name = "ce index accumulate, empty first, bias"; s.accumulate = true; s.bias = true;
  s.split = split_kind::empty_first; add(s);
  // bfloat16 operands (run as float32 cases only)
  s = {}; s.name = "bf16 ce index, weights, bias, skewed"; s.bf16 = true; s.class_weight = true; s.bias = true;
  s.split = split_kind::skewed; add(s);
  s = {}; s.name = "bf16 ce probabilities none, empty first, row blocks"; s.bf16 = true; s.loss = loss_kind::ce_prob;
  s.reduce = reduction::none; s.split = split_kind::empty_first; s.budget = budget_kind::rows; add(s);
  s = {}; s.name = "bf16 distill hidden jsd, teacher bias, mask"; s.bf16 = true; s.loss = loss_kind::distill_hidden;
  s.kind = divergence::jsd; s.teacher_bias = true; s.mask = true; add(s);
  return v;
}

// bfloat16 bits of a float that is exactly representable (round_to_bf16 made it so)
std::uint16_t bf16_bits(float f) { return static_cast<std::uint16_t>(std::bit_cast<std::uint32_t>(f) >> 16); }
float round_to_bf16(float f) {
  std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  u += 0x7FFFu + ((u >> 16) & 1u);  // nearest even (finite inputs)
  return std::bit_cast<float>(u & 0xFFFF0000u);
}
std::vector<std::uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<std::uint16_t> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = bf16_bits(v[i]);
  return out;
}

template <class T>
void run_case(const spec& s, std::uint64_t seed) {
  if (s.bf16 && !std::is_same_v<T, float>) return;  // bfloat16 operands, float32 outputs
  g_case = s.name + (sizeof(T) == 4 ? " float32" : " float64") +
           (g_mode == softce::class_parallel::reduce_mode::commutative ? " commutative" : "");
  const dtype type = softce::dtype_of<T>();
  std::int64_t N = 1;
  for (std::int64_t r : s.rows) N *= r;
  const std::int64_t V = s.V, D = s.D, Dt = s.Dt, K = s.K;
  rng gen(seed);
  auto fill = [&](std::vector<T>& a, double lo, double hi) {
    for (T& x : a) x = static_cast<T>(lo + (hi - lo) * gen.uniform());
  };
  std::vector<T> hidden(static_cast<std::size_t>(N * D)), weight(static_cast<std::size_t>(V * D)), bias(V), cw(V);
  std::vector<T> probs(static_cast<std::size_t>(N * V)), teacher(probs.size());
  std::vector<T> thidden(static_cast<std::size_t>(N * Dt)), tweight(static_cast<std::size_t>(V * Dt)), tbias(V);
  fill(hidden, -1.0, 1.0);
  fill(weight, -1.5, 1.5);
  fill(bias, -0.5, 0.5);
  fill(cw, 0.5, 2.0);
  fill(teacher, -3.0, 3.0);
  fill(thidden, -1.0, 1.0);
  fill(tweight, -1.5, 1.5);
  fill(tbias, -0.5, 0.5);
  if constexpr (std::is_same_v<T, float>) {
    if (s.bf16)
      for (auto* a : {&hidden, &weight, &bias, &thidden, &tweight, &tbias})
        for (float& x : *a) x = round_to_bf16(x);
  }
  const dtype op_type = s.bf16 ? dtype::bfloat16 : type;  // the layer's operands
  std::vector<std::uint16_t> hidden16, thidden16;
  if constexpr (std::is_same_v<T, float>) {
    if (s.bf16) hidden16 = to_bf16(hidden), thidden16 = to_bf16(thidden);
  }
  for (std::int64_t r = 0; r < N; ++r) {
    double sum = 0.0;
    for (std::int64_t c = 0; c < V; ++c) sum += static_cast<double>(probs[r * V + c] = static_cast<T>(gen.uniform()));
    for (std::int64_t c = 0; c < V; ++c) probs[r * V + c] = static_cast<T>(static_cast<double>(probs[r * V + c]) / sum);
  }
  std::vector<std::int64_t> y(static_cast<std::size_t>(N));
  for (std::int64_t r = 0; r < N; ++r) y[r] = s.ignore_rows && r % 4 == 1 ? -100 : gen.below(V);
  std::vector<std::int64_t> top(static_cast<std::size_t>(N * K));
  std::vector<T> topv(top.size());
  for (std::int64_t r = 0; r < N; ++r) {
    double sum = 0.0;
    for (std::int64_t j = 0; j < K; ++j) {
      std::int64_t c;
      bool dup;
      do {
        c = gen.below(V);
        dup = false;
        for (std::int64_t i = 0; i < j; ++i) dup = dup || top[r * K + i] == c;
      } while (dup);
      top[r * K + j] = c;
      sum += static_cast<double>(topv[r * K + j] = static_cast<T>(0.1 + gen.uniform()));
    }
    for (std::int64_t j = 0; j < K; ++j) topv[r * K + j] = static_cast<T>(static_cast<double>(topv[r * K + j]) * 0.9 / sum);
  }
  bool mask[64];
  for (std::int64_t r = 0; r < N; ++r) mask[r] = r == 0 || gen.uniform() > 0.3;

  std::vector<std::int64_t> hidden_shape = s.rows, thidden_shape = s.rows, prob_shape = s.rows, top_shape = s.rows;
  hidden_shape.push_back(D), thidden_shape.push_back(Dt), prob_shape.push_back(V), top_shape.push_back(K);
  const array_view h = make_view<const void*>(s.bf16 ? static_cast<const void*>(hidden16.data()) : hidden.data(),
                                              op_type, hidden_shape);
  const array_view th = make_view<const void*>(
      s.bf16 ? static_cast<const void*>(thidden16.data()) : thidden.data(), op_type, thidden_shape);
  const array_view yv = make_view<const void*>(y.data(), dtype::int64, s.rows);
  const array_view mv = make_view<const void*>(static_cast<const bool*>(mask), dtype::boolean, s.rows);
  const softce::topk tk{make_view<const void*>(top.data(), dtype::int64, top_shape),
                        make_view<const void*>(topv.data(), type, top_shape), s.tail};

  // budgets: `small` leaves room for one row of 20 classes, `rows` for 3 rows of every class
  const std::int64_t logit_bytes = static_cast<std::int64_t>(sizeof(T)) * (s.loss == loss_kind::distill_hidden ? 2 : 1);
  const std::int64_t staging = static_cast<std::int64_t>(sizeof(T)) * (2 * D + (s.loss == loss_kind::distill_hidden ? Dt : 0));
  softce::linear_options lo;
  if (s.budget == budget_kind::small) lo.memory_budget = static_cast<std::size_t>(20 * logit_bytes + staging);
  if (s.budget == budget_kind::rows) lo.memory_budget = static_cast<std::size_t>(3 * (V * logit_bytes + staging));

  softce::cross_entropy_options ce;
  ce.reduce = s.reduce;
  ce.label_smoothing = s.smoothing;
  if (s.mask) ce.mask = mv;
  softce::distillation_options dist;
  dist.reduce = s.reduce;
  dist.kind = s.kind;
  dist.beta = s.beta;
  dist.temperature = s.temperature;
  if (s.mask) dist.mask = mv;

  // the accumulated-into gradients start from these values
  std::vector<T> gw_start(weight.size()), gb_start(bias.size());
  fill(gw_start, -0.1, 0.1);
  fill(gb_start, -0.1, 0.1);

  // one call on (hidden, weight rows [c0, c0 + Vl)), with the shard or in one process
  struct result {
    double loss = std::nan("");
    std::vector<T> losses, gh, gw, gb;
  };
  auto call = [&](std::int64_t c0, std::int64_t Vl, const softce::mpi::shard* sh, const softce::linear_options& opt) {
    result out;
    std::vector<T> w(weight.begin() + c0 * D, weight.begin() + (c0 + Vl) * D), b(bias.begin() + c0, bias.begin() + c0 + Vl);
    std::vector<T> cwl(cw.begin() + c0, cw.begin() + c0 + Vl), tw(tweight.begin() + c0 * Dt, tweight.begin() + (c0 + Vl) * Dt);
    std::vector<T> tb(tbias.begin() + c0, tbias.begin() + c0 + Vl), p(static_cast<std::size_t>(N * Vl)), z(p.size());
    for (std::int64_t r = 0; r < N; ++r)
      for (std::int64_t c = 0; c < Vl; ++c) p[r * Vl + c] = probs[r * V + c0 + c], z[r * Vl + c] = teacher[r * V + c0 + c];
    std::vector<std::int64_t> local_shape = s.rows;
    local_shape.push_back(Vl);
    std::vector<std::uint16_t> w16, b16, tw16, tb16;
    if constexpr (std::is_same_v<T, float>) {
      if (s.bf16) w16 = to_bf16(w), b16 = to_bf16(b), tw16 = to_bf16(tw), tb16 = to_bf16(tb);
    }
    auto op = [&](const std::vector<T>& full, const std::vector<std::uint16_t>& half) {
      return s.bf16 ? static_cast<const void*>(half.data()) : static_cast<const void*>(full.data());
    };
    const array_view wv = make_view<const void*>(op(w, w16), op_type, {Vl, D});
    std::optional<array_view> bv;
    if (s.bias) bv = make_view<const void*>(op(b, b16), op_type, {Vl});
    auto c = ce;
    if (s.class_weight) c.weight = make_view<const void*>(cwl.data(), type, {Vl});
    out.losses.assign(static_cast<std::size_t>(N), T(-7));
    out.gh.assign(hidden.size(), T(-7));
    out.gw.assign(w.size(), T(-7));
    out.gb.assign(b.size(), T(-7));
    if (s.accumulate) {
      std::copy(gw_start.begin() + c0 * D, gw_start.begin() + (c0 + Vl) * D, out.gw.begin());
      std::copy(gb_start.begin() + c0, gb_start.begin() + c0 + Vl, out.gb.begin());
    }
    softce::linear_outputs lo_out;
    if (s.reduce == reduction::none) lo_out.losses = make_view<void*>(out.losses.data(), type, s.rows);
    lo_out.grad_hidden = make_view<void*>(out.gh.data(), type, hidden_shape);
    lo_out.grad_weight = make_view<void*>(out.gw.data(), type, {Vl, D});
    if (s.bias) lo_out.grad_bias = make_view<void*>(out.gb.data(), type, {Vl});
    lo_out.accumulate = s.accumulate;
    const array_view pv = make_view<const void*>(p.data(), type, local_shape);
    const array_view zv = make_view<const void*>(z.data(), type, local_shape);
    std::optional<array_view> tbv;
    if (s.teacher_bias) tbv = make_view<const void*>(op(tb, tb16), op_type, {Vl});
    const softce::linear_teacher lt{th, make_view<const void*>(op(tw, tw16), op_type, {Vl, Dt}), tbv};
    try {
      switch (s.loss) {
        case loss_kind::ce_index:
          out.loss = sh ? softce::mpi::linear_cross_entropy(*sh, h, wv, bv, yv, c, opt, lo_out)
                        : softce::linear_cross_entropy(h, wv, bv, yv, c, opt, lo_out);
          break;
        case loss_kind::ce_prob:
          out.loss = sh ? softce::mpi::linear_cross_entropy(*sh, h, wv, bv, pv, c, opt, lo_out)
                        : softce::linear_cross_entropy(h, wv, bv, pv, c, opt, lo_out);
          break;
        case loss_kind::ce_topk:
          out.loss = sh ? softce::mpi::linear_cross_entropy(*sh, h, wv, bv, tk, c, opt, lo_out)
                        : softce::linear_cross_entropy(h, wv, bv, tk, c, opt, lo_out);
          break;
        case loss_kind::distill_logits:
          out.loss = sh ? softce::mpi::linear_distillation_loss(*sh, h, wv, bv, zv, dist, opt, lo_out)
                        : softce::linear_distillation_loss(h, wv, bv, zv, dist, opt, lo_out);
          break;
        case loss_kind::distill_topk:
          out.loss = sh ? softce::mpi::linear_distillation_loss(*sh, h, wv, bv, tk, dist, opt, lo_out)
                        : softce::linear_distillation_loss(h, wv, bv, tk, dist, opt, lo_out);
          break;
        case loss_kind::distill_hidden:
          out.loss = sh ? softce::mpi::linear_distillation_loss(*sh, h, wv, bv, lt, dist, opt, lo_out)
                        : softce::linear_distillation_loss(h, wv, bv, lt, dist, opt, lo_out);
          break;
      }
    } catch (const std::exception& e) {
      check(false, std::string(sh ? "class-parallel" : "single-process") + " call failed: " + e.what());
    }
    return out;
  };

  const result ref = call(0, V, nullptr, softce::linear_options{});
  const auto counts = split_counts(V, g_size, s.split);
  std::int64_t off = 0;
  for (int r = 0; r < g_rank; ++r) off += counts[r];
  const std::int64_t Vl = counts[g_rank];
  const softce::mpi::shard sh(MPI_COMM_WORLD, off, V, g_mode);
  const result got = call(off, Vl, &sh, lo);

  const double tol = sizeof(T) == 4 ? 1e-6 : 1e-12, gtol = sizeof(T) == 4 ? 1e-5 : 1e-11;
  check(close(got.loss, ref.loss, tol), "loss " + num(got.loss) + " vs " + num(ref.loss));
  check(!std::isnan(ref.loss) || s.reduce == reduction::none, "the reference loss is NaN");
  check_same_on_all_ranks(std::bit_cast<std::uint64_t>(got.loss), "loss");
  if (s.reduce == reduction::none) {
    check_close_array(got.losses.data(), ref.losses.data(), N, tol * 10, "per-row losses");
    check_same_on_all_ranks(bits_hash(got.losses), "per-row losses");
  }
  check_close_array(got.gh.data(), ref.gh.data(), N * D, gtol, "grad_hidden (full)");
  check_same_on_all_ranks(bits_hash(got.gh), "grad_hidden");
  check_close_array(got.gw.data(), ref.gw.data() + off * D, Vl * D, gtol, "grad_weight rows");
  if (s.bias) check_close_array(got.gb.data(), ref.gb.data() + off, Vl, gtol, "grad_bias rows");
}

// ---------------------------------------------------------------------------------------
// errors: the same softce::error on every rank

void test_errors() {
  const std::int64_t N = 8, V = 37, D = 4, Dt = 3;
  const int P = g_size, last = P - 1;
  const auto counts = split_counts(V, P, split_kind::even);
  std::int64_t off = 0;
  for (int r = 0; r < g_rank; ++r) off += counts[r];
  const std::int64_t Vl = counts[g_rank];
  const bool changes = g_rank == last;
  const std::string L = std::to_string(last);
  std::vector<float> hidden(static_cast<std::size_t>(N * (D + 1)), 0.25f), hidden2 = hidden;
  std::vector<double> hidden_d(hidden.size(), 0.25);
  std::vector<float> weight(static_cast<std::size_t>((Vl + 1) * (D + 1)), 0.5f), bias(Vl + 1, 0.0f);
  std::vector<float> thidden(static_cast<std::size_t>(N * Dt), 0.5f), tweight(static_cast<std::size_t>(Vl * Dt), 0.1f);
  std::vector<float> teacher(static_cast<std::size_t>(N * Vl), 0.3f);
  std::vector<std::int64_t> y(N, 1);
  const softce::mpi::shard sh(MPI_COMM_WORLD, off, V);
  const array_view h = softce::view(hidden.data(), {N, D}), w = softce::view(weight.data(), {Vl, D});
  const array_view yv = softce::view(y.data(), {N});
  const std::string ce = "mpi::linear_cross_entropy: ", kd = "mpi::linear_distillation_loss: ";

  // a class id outside every shard: every rank's own check, before any collective
  std::vector<std::int64_t> y_bad = y;
  y_bad[3] = V;
  expect_error(
      "linear error: class index outside every shard",
      [&] { softce::mpi::linear_cross_entropy(sh, h, w, std::nullopt, softce::view(y_bad.data(), {N})); },
      "linear_cross_entropy: target: class index 37 at row 3 is out of range for 37 classes",
      softce::error_kind::index);
  // a shard that does not fit its rows (the core's own check)
  expect_error(
      "linear error: shard beyond num_classes",
      [&] { softce::mpi::linear_cross_entropy(softce::mpi::shard(MPI_COMM_WORLD, V, V), h, w, std::nullopt, yv); },
      g_rank == 0 || Vl > 0
          ? "linear_cross_entropy: shard: expected 0 <= class_offset and class_offset + weight.shape[0] <= "
            "num_classes >= 1, got class_offset 37, " + std::to_string(Vl) + " rows, num_classes 37"
          : "");
  if (P == 1) return;

  // a bad argument on the last rank only: its own message there, "failed on rank" elsewhere
  const array_view bad_bias = softce::view(bias.data(), {changes ? Vl + 1 : Vl});
  const std::string bias_message = "linear_cross_entropy: bias: expected shape (" + std::to_string(counts[last]) +
                                   ") (one value per class), got (" + std::to_string(counts[last] + 1) + ")";
  expect_error(
      "linear error: bad bias on one rank", [&] { softce::mpi::linear_cross_entropy(sh, h, w, bad_bias, yv); },
      changes ? bias_message : ce + "failed on rank " + L + ": " + bias_message);
  // the disagreements of the fused layer
  expect_error(
      "linear error: hidden values differ",
      [&] {
        if (changes) hidden2[5] = 0.75f;
        softce::mpi::linear_cross_entropy(sh, softce::view(hidden2.data(), {N, D}), w, std::nullopt, yv);
      },
      ce + "hidden: differs between rank 0 and rank " + L +
          " (the hidden states are replicated: they must be identical on every rank)");
  expect_error(
      "linear error: D differs",
      [&] {
        const std::int64_t d = changes ? D + 1 : D;
        softce::mpi::linear_cross_entropy(sh, softce::view(hidden.data(), {N, d}), softce::view(weight.data(), {Vl, d}),
                                          std::nullopt, yv);
      },
      ce + "hidden.shape[-1] differs across ranks (rank 0: 4, rank " + L + ": 5)");
  expect_error(
      "linear error: bias on one rank",
      [&] {
        std::optional<array_view> b;
        if (!changes) b = softce::view(bias.data(), {Vl});
        softce::mpi::linear_cross_entropy(sh, h, w, b, yv);
      },
      ce + "bias differs across ranks (rank 0: given, rank " + L + ": not given)");
  expect_error(
      "linear error: grad_hidden requested on one rank",
      [&] {
        std::vector<float> gh(static_cast<std::size_t>(N * D));
        softce::linear_outputs o;
        if (!changes) o.grad_hidden = softce::view(gh.data(), {N, D});
        softce::mpi::linear_cross_entropy(sh, h, w, std::nullopt, yv, {}, {}, o);
      },
      ce + "grad_hidden differs across ranks (rank 0: given, rank " + L + ": not given)");
  expect_error(
      "linear error: reduce mode differs",
      [&] {
        const softce::mpi::shard s2(MPI_COMM_WORLD, off, V,
                                    changes ? softce::class_parallel::reduce_mode::commutative
                                            : softce::class_parallel::reduce_mode::ordered);
        softce::mpi::linear_cross_entropy(s2, h, w, std::nullopt, yv);
      },
      ce + "reduce mode differs across ranks (rank 0: 'ordered', rank " + L + ": 'commutative')");
  expect_error(
      "linear error: memory_budget differs",
      [&] {
        softce::linear_options o;
        o.memory_budget = changes ? 4096 : 8192;
        softce::mpi::linear_cross_entropy(sh, h, w, std::nullopt, yv, {}, o);
      },
      ce + "memory_budget differs across ranks (rank 0: 8192, rank " + L + ": 4096)");
  expect_error(
      "linear error: hidden dtype differs",
      [&] {
        std::vector<double> wd(static_cast<std::size_t>(Vl * D), 0.5);
        if (changes)
          softce::mpi::linear_cross_entropy(sh, softce::view(hidden_d.data(), {N, D}), softce::view(wd.data(), {Vl, D}),
                                            std::nullopt, yv);
        else
          softce::mpi::linear_cross_entropy(sh, h, w, std::nullopt, yv);
      },
      ce + "hidden dtype differs across ranks (rank 0: 'float32', rank " + L + ": 'float64')");
  expect_error(
      "linear error: teacher form differs",
      [&] {
        const softce::linear_teacher lt{softce::view(thidden.data(), {N, Dt}), softce::view(tweight.data(), {Vl, Dt}),
                                        std::nullopt};
        if (changes) softce::mpi::linear_distillation_loss(sh, h, w, std::nullopt, lt);
        else softce::mpi::linear_distillation_loss(sh, h, w, std::nullopt, softce::view(teacher.data(), {N, Vl}));
      },
      kd + "ranks called different functions (rank 0: linear_distillation_loss with teacher logits, rank " + L +
          ": linear_distillation_loss with teacher hidden states)");
  expect_error(
      "linear error: teacher hidden differs",
      [&] {
        std::vector<float> t2 = thidden;
        if (changes) t2[1] = 0.0f;
        const softce::linear_teacher lt{softce::view(t2.data(), {N, Dt}), softce::view(tweight.data(), {Vl, Dt}),
                                        std::nullopt};
        softce::mpi::linear_distillation_loss(sh, h, w, std::nullopt, lt);
      },
      kd + "teacher.hidden: differs between rank 0 and rank " + L +
          " (the teacher's hidden states are replicated: they must be identical on every rank)");
  expect_error(
      "linear error: dense and linear calls mixed",
      [&] {
        if (changes) softce::mpi::linear_cross_entropy(sh, h, w, std::nullopt, yv);
        else softce::mpi::cross_entropy(sh, softce::view(teacher.data(), {N, Vl}), yv);
      },
      g_rank == 0 ? "mpi::cross_entropy: ranks called different functions (rank 0: cross_entropy with class-index "
                    "targets, rank " + L + ": linear_cross_entropy with class-index targets)"
                  : changes ? ce + "ranks called different functions (rank 0: cross_entropy with class-index targets, "
                                   "rank " + L + ": linear_cross_entropy with class-index targets)"
                            : "mpi::cross_entropy: ranks called different functions (rank 0: cross_entropy with "
                              "class-index targets, rank " + L + ": linear_cross_entropy with class-index targets)");
  // and a good call still works: uniform logits -> log V
  g_case = "linear good call after errors";
  std::vector<float> zero_w(static_cast<std::size_t>(Vl * D), 0.0f);
  double loss = std::nan("");
  try {
    loss = softce::mpi::linear_cross_entropy(sh, h, softce::view(zero_w.data(), {Vl, D}), std::nullopt, yv);
  } catch (const std::exception& e) {
    check(false, e.what());
  }
  check(close(loss, std::log(static_cast<double>(V)), 1e-6), "loss " + num(loss));
}

}  // namespace

int main(int argc, char** argv) {
  const auto started = start(argc, argv);
  int cases = 0;
  for (auto mode : {softce::class_parallel::reduce_mode::ordered, softce::class_parallel::reduce_mode::commutative}) {
    g_mode = mode;
    std::uint64_t seed = 11;
    for (const spec& s : comparison_cases()) {
      run_case<float>(s, seed);
      run_case<double>(s, seed);  // returns at once for bfloat16 operands
      ++seed;
      cases += s.bf16 ? 1 : 2;
    }
  }
  test_errors();
  return finish("mpi_linear_test", cases, started);
}
