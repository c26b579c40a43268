// Tests of softce::mpi (include/softce/mpi.hpp), run under mpirun with 1 to 4 ranks.
//
// Every rank builds the same global problem from the same seed, computes the single-process
// result with softce on the full arrays (the oracle here), then its own class shard with
// softce::mpi, and compares: loss to 1e-6 relative, per-row losses likewise, the gradient
// shard to 1e-5 of the gradient's scale; the loss must be bitwise the same on every rank.
// Then the all-reduce's merge order (with an exactly associative, non-commutative merge),
// shard::from_local_classes, and the error cases: each must raise softce::error with the
// expected message on EVERY rank (a hang is caught by the ctest timeout). The disagreements
// of tests/mpi/agreement_cases.txt are checked here and, with the same messages, on the
// torch.distributed front (python/tests/_distributed_cases.py): both run the core's protocol.
//
// No GoogleTest: a failed check must not skip the collectives that follow it, so checks only
// record; the ranks agree on the verdict at the end.
#include "mpi_harness.hpp"

#include <softce/mpi.hpp>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using namespace mpi_harness;
using softce::array_view;
using softce::divergence;
using softce::dtype;
using softce::mutable_array_view;
using softce::reduction;

constexpr double kInf = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------------------
// class splits

softce::mpi::shard make_shard(std::int64_t C, split_kind kind) {
  const auto counts = split_counts(C, g_size, kind);
  std::int64_t offset = 0;
  for (int r = 0; r < g_rank; ++r) offset += counts[r];
  if (kind == split_kind::from_local) {
    auto s = softce::mpi::shard::from_local_classes(MPI_COMM_WORLD, counts[g_rank]);
    s.mode = g_mode;
    check(s.class_offset == offset && s.num_classes == C && s.comm == MPI_COMM_WORLD,
          "from_local_classes: got offset " + std::to_string(s.class_offset) + " of " + std::to_string(s.num_classes));
    return s;
  }
  return softce::mpi::shard(MPI_COMM_WORLD, offset, C, g_mode);
}

// ---------------------------------------------------------------------------------------
// one comparison case

enum class loss_kind { ce_index, ce_prob, ce_topk, distill_logits, distill_topk };

struct spec {
  std::string name;
  loss_kind loss = loss_kind::ce_index;
  std::int64_t N = 8, C = 37, D = 0;  // D > 0: logits (N, C, D)
  reduction reduce = reduction::mean;
  bool weight = false;
  double smoothing = 0.0;
  std::int64_t ignore_index = -100;
  bool ignore_rows = false;
  bool mask = false;
  std::int64_t K = 5;
  bool tail = false;
  bool index32 = false;
  divergence kind = divergence::kl;
  double beta = 0.5;
  double temperature = 1.0;
  bool neg_inf = false;
  split_kind split = split_kind::even;
  bool strided = false;  // local views into the global arrays rather than local copies
  double logit_offset = 0.0;  // added to every logit (student and teacher)
  int threads = 1;            // softce threads per rank
};

bool close(double got, double want, double rel, double abs_floor = 0.0) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= rel * std::fabs(want) + abs_floor;
}

// Checks that `value` has the same bits on every rank.
void check_same_on_all_ranks(double value, const std::string& what) {
  std::vector<double> all(static_cast<std::size_t>(g_size));
  MPI_Allgather(&value, 1, MPI_DOUBLE, all.data(), 1, MPI_DOUBLE, MPI_COMM_WORLD);
  for (int r = 0; r < g_size; ++r)
    check(std::bit_cast<std::uint64_t>(all[r]) == std::bit_cast<std::uint64_t>(value),
          what + " differs between ranks: rank " + std::to_string(r) + " " + num(all[r]) + " vs " + num(value));
}

template <class T>
void run_case(const spec& s, std::uint64_t seed) {
  g_case = s.name;
  const dtype type = softce::dtype_of<T>();
  const std::int64_t N = s.N, C = s.C, D = s.D > 0 ? s.D : 1, rows = N * D;
  const bool three_d = s.D > 0;
  const std::int64_t K = s.K;
  rng gen(seed);
  // global arrays, layout (N, C, D); row r = n * D + d
  auto at = [&](std::int64_t r, std::int64_t c) { return ((r / D) * C + c) * D + r % D; };
  std::vector<double> x(static_cast<std::size_t>(N * C * D)), z(x.size()), t(x.size(), 0.0);
  for (double& v : x) v = (gen.uniform() - 0.5) * 6.0;
  for (double& v : z) v = (gen.uniform() - 0.5) * 6.0;
  for (double& v : x) v += s.logit_offset;
  for (double& v : z) v += s.logit_offset;
  std::vector<bool> dead(x.size(), false);  // -inf logits
  if (s.neg_inf) {
    for (std::int64_t c = 0; c < C / 2; ++c) dead[at(0, c)] = true;  // whole shards of row 0
    if (rows > 1) dead[at(1, 3)] = true;
    if (rows > 2 && (s.loss == loss_kind::ce_prob || s.loss == loss_kind::distill_logits))
      for (std::int64_t c = 0; c < C; ++c) dead[at(2, c)] = true;  // an all -inf row
    for (std::size_t i = 0; i < x.size(); ++i)
      if (dead[i]) x[i] = z[i] = -kInf;
  }
  auto live = [&](std::int64_t r, std::int64_t c) { return !dead[at(r, c)]; };
  auto random_live_class = [&](std::int64_t r) {
    std::int64_t live_count = 0;
    for (std::int64_t c = 0; c < C; ++c) live_count += live(r, c) ? 1 : 0;
    if (live_count < K) return gen.below(C);  // an all -inf row: only dense targets use it
    for (;;) {
      const std::int64_t c = gen.below(C);
      if (live(r, c)) return c;
    }
  };
  // index targets
  std::vector<std::int64_t> y(static_cast<std::size_t>(rows));
  for (std::int64_t r = 0; r < rows; ++r) {
    bool any = false;
    for (std::int64_t c = 0; c < C; ++c) any = any || live(r, c);
    y[r] = (s.ignore_rows && r % 3 == 1) || !any ? s.ignore_index : random_live_class(r);
  }
  std::vector<std::int32_t> y32(y.begin(), y.end());
  // probability targets: zero where the logit is -inf
  for (std::int64_t r = 0; r < rows; ++r) {
    double sum = 0.0;
    for (std::int64_t c = 0; c < C; ++c) {
      const double v = live(r, c) ? gen.uniform() : 0.0;
      t[at(r, c)] = v;
      sum += v;
    }
    for (std::int64_t c = 0; c < C && sum > 0; ++c) t[at(r, c)] /= sum;
  }
  // mask
  std::vector<char> mask_storage(static_cast<std::size_t>(rows));
  for (std::int64_t r = 0; r < rows; ++r) mask_storage[r] = r == 0 || gen.uniform() > 0.3;
  // top-k: distinct live classes, values summing to 0.9
  std::vector<std::int64_t> top(static_cast<std::size_t>(rows * K));
  std::vector<double> topv(top.size());
  for (std::int64_t r = 0; r < rows; ++r) {
    double sum = 0.0;
    for (std::int64_t j = 0; j < K; ++j) {
      std::int64_t c;
      do c = random_live_class(r);
      while (std::find(&top[r * K], &top[r * K + j], c) != &top[r * K + j]);
      top[r * K + j] = c;
      topv[r * K + j] = 0.1 + gen.uniform();
      sum += topv[r * K + j];
    }
    for (std::int64_t j = 0; j < K; ++j) topv[r * K + j] *= 0.9 / sum;
  }
  std::vector<std::int32_t> top32(top.begin(), top.end());
  std::vector<double> w(static_cast<std::size_t>(C));
  for (double& v : w) v = 0.5 + 1.5 * gen.uniform();

  // typed global arrays and views
  std::vector<T> xt(x.begin(), x.end()), zt(z.begin(), z.end()), tt(t.begin(), t.end());
  std::vector<T> topvt(topv.begin(), topv.end()), wt(w.begin(), w.end());
  std::vector<std::int64_t> full_shape{N, C}, row_shape{N};
  if (three_d) full_shape.push_back(D), row_shape.push_back(D);
  std::vector<std::int64_t> topk_shape = row_shape;
  topk_shape.push_back(K);
  const array_view x_full = make_view<const void*>(xt.data(), type, full_shape);
  const array_view z_full = make_view<const void*>(zt.data(), type, full_shape);
  const array_view t_full = make_view<const void*>(tt.data(), type, full_shape);
  const array_view y_view = s.index32 ? make_view<const void*>(y32.data(), dtype::int32, row_shape)
                                      : make_view<const void*>(y.data(), dtype::int64, row_shape);
  const array_view mask_view = make_view<const void*>(mask_storage.data(), dtype::boolean, row_shape);
  softce::topk target_topk;
  target_topk.indices = s.index32 ? make_view<const void*>(top32.data(), dtype::int32, topk_shape)
                                  : make_view<const void*>(top.data(), dtype::int64, topk_shape);
  target_topk.values = make_view<const void*>(topvt.data(), type, topk_shape);
  target_topk.tail = s.tail;

  softce::cross_entropy_options ce;
  ce.reduce = s.reduce;
  ce.label_smoothing = s.smoothing;
  ce.ignore_index = s.ignore_index;
  if (s.mask) ce.mask = mask_view;
  softce::distillation_options dist;
  dist.reduce = s.reduce;
  dist.kind = s.kind;
  dist.beta = s.beta;
  dist.temperature = s.temperature;
  if (s.D > 0) dist.dim = 1;  // (N, C, d): PyTorch's layout, said explicitly
  if (s.mask) dist.mask = mask_view;

  // the single-process oracle
  std::vector<T> grad_ref(x.size());
  std::vector<double> losses_ref(static_cast<std::size_t>(rows));
  softce::outputs out_ref;
  out_ref.grad = make_view<void*>(grad_ref.data(), type, full_shape);
  if (s.reduce == reduction::none) out_ref.losses = make_view<void*>(losses_ref.data(), dtype::float64, row_shape);
  auto ce_full = ce;
  if (s.weight) ce_full.weight = make_view<const void*>(wt.data(), type, {C});
  double loss_ref = 0.0;
  try {
    switch (s.loss) {
      case loss_kind::ce_index: loss_ref = softce::cross_entropy(x_full, y_view, ce_full, out_ref); break;
      case loss_kind::ce_prob: loss_ref = softce::cross_entropy(x_full, t_full, ce_full, out_ref); break;
      case loss_kind::ce_topk: loss_ref = softce::cross_entropy(x_full, target_topk, ce_full, out_ref); break;
      case loss_kind::distill_logits: loss_ref = softce::distillation_loss(x_full, z_full, dist, out_ref); break;
      case loss_kind::distill_topk: loss_ref = softce::distillation_loss(x_full, target_topk, dist, out_ref); break;
    }
  } catch (const std::exception& e) {
    check(false, std::string("single-process call failed: ") + e.what());
  }

  // this rank's shard
  const softce::mpi::shard sh = make_shard(C, s.split);
  const std::int64_t off = sh.class_offset;
  const std::int64_t Cl = split_counts(C, g_size, s.split == split_kind::from_local ? split_kind::skewed : s.split)[g_rank];
  std::vector<std::int64_t> local_shape{N, Cl};
  if (three_d) local_shape.push_back(D);
  auto local_at = [&](std::int64_t r, std::int64_t c) { return ((r / D) * Cl + c) * D + r % D; };
  std::vector<T> xl(static_cast<std::size_t>(N * Cl * D)), zl(xl.size()), tl(xl.size());
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < Cl; ++c) {
      xl[local_at(r, c)] = xt[at(r, off + c)];
      zl[local_at(r, c)] = zt[at(r, off + c)];
      tl[local_at(r, c)] = tt[at(r, off + c)];
    }
  std::vector<std::int64_t> strided{C * D, D};
  if (!three_d) strided = {C, 1};
  else strided.push_back(1);
  auto local_view = [&](const std::vector<T>& global, const std::vector<T>& local) {
    return s.strided ? make_view<const void*>(global.data() + off * D, type, local_shape, strided)
                     : make_view<const void*>(local.data(), type, local_shape);
  };
  const array_view x_local = local_view(xt, xl), z_local = local_view(zt, zl), t_local = local_view(tt, tl);
  std::vector<T> w_local(wt.begin() + off, wt.begin() + off + Cl);
  auto ce_local = ce;
  if (s.weight) ce_local.weight = make_view<const void*>(w_local.data(), type, {Cl});
  std::vector<T> grad(xl.size(), T(-7));  // every element must be written
  std::vector<double> losses(static_cast<std::size_t>(rows), -7.0);
  softce::outputs out;
  out.grad = make_view<void*>(grad.data(), type, local_shape);
  if (s.reduce == reduction::none) out.losses = make_view<void*>(losses.data(), dtype::float64, row_shape);

  double loss = std::nan("");
  softce::set_num_threads(s.threads);
  try {
    switch (s.loss) {
      case loss_kind::ce_index: loss = softce::mpi::cross_entropy(sh, x_local, y_view, ce_local, out); break;
      case loss_kind::ce_prob: loss = softce::mpi::cross_entropy(sh, x_local, t_local, ce_local, out); break;
      case loss_kind::ce_topk: loss = softce::mpi::cross_entropy(sh, x_local, target_topk, ce_local, out); break;
      case loss_kind::distill_logits:
        loss = softce::mpi::distillation_loss(sh, x_local, z_local, dist, out);
        break;
      case loss_kind::distill_topk: loss = softce::mpi::distillation_loss(sh, x_local, target_topk, dist, out); break;
    }
  } catch (const std::exception& e) {
    check(false, std::string("unexpected error: ") + e.what());
  }
  softce::set_num_threads(1);

  // Both sides are float32 computations, each within ~1e-6 of the float64 value (the
  // single-process JSD measured 4e-7), summed in different orders (shards, cached exps vs a
  // second pass): their difference can reach twice that. float64 stays at 1e-6.
  const double loss_tol = std::is_same_v<T, float> ? 2e-6 : 1e-6;
  check(close(loss, loss_ref, loss_tol, 1e-12), "loss " + num(loss) + " vs single-process " + num(loss_ref));
  check_same_on_all_ranks(loss, "loss");
  if (s.reduce == reduction::none) {
    double hash = 0.0;
    for (std::int64_t r = 0; r < rows; ++r) {
      check(close(losses[r], losses_ref[r], loss_tol, 1e-12),
            "row " + std::to_string(r) + " loss " + num(losses[r]) + " vs " + num(losses_ref[r]));
      hash = hash * 1.0000001 + losses[r];
    }
    check_same_on_all_ranks(hash, "per-row losses");
  }
  double scale = 0.0;
  for (T g : grad_ref)
    if (std::isfinite(static_cast<double>(g))) scale = std::max(scale, std::fabs(static_cast<double>(g)));
  int bad = 0;
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < Cl; ++c) {
      const double got = grad[local_at(r, c)], want = grad_ref[at(r, off + c)];
      if (!close(got, want, 1e-5, 1e-5 * scale) && ++bad <= 3)
        check(false, "grad[row " + std::to_string(r) + ", class " + std::to_string(off + c) + "] " + num(got) +
                         " vs " + num(want));
    }
  check(bad == 0, std::to_string(bad) + " gradient elements differ");
}

// ---------------------------------------------------------------------------------------
// the cases

std::vector<spec> comparison_cases() {
  std::vector<spec> cases;
  const split_kind splits[] = {split_kind::even, split_kind::skewed, split_kind::from_local};
  int n = 0;
  auto add = [&](spec s) {
    if (s.split == split_kind::even) s.split = splits[n % 3];
    ++n;
    cases.push_back(s);
  };
  const reduction ce_reductions[] = {reduction::mean, reduction::sum, reduction::none};
  // index targets
  for (reduction red : ce_reductions)
    for (bool weight : {false, true})
      for (double eps : {0.0, 0.1}) {
        spec s;
        s.name = "index " + std::string(softce::reduction_name(red)) + (weight ? " weight" : "") +
                 (eps > 0 ? " smoothing" : "") + " ignore";
        s.loss = loss_kind::ce_index;
        s.reduce = red;
        s.weight = weight;
        s.smoothing = eps;
        s.ignore_rows = true;
        s.index32 = weight;
        add(s);
      }
  {
    spec s;
    s.name = "index ignore_index=-1 -inf logits";
    s.ignore_index = -1;
    s.ignore_rows = true;
    s.neg_inf = true;
    s.weight = true;
    add(s);
    s.name = "index (N, C, d) strided";
    s.neg_inf = false;
    s.D = 3;
    s.strided = true;
    s.smoothing = 0.2;
    add(s);
    s.name = "index long rows";
    s.D = 0;
    s.N = 16;
    s.C = 4099;
    s.strided = false;
    add(s);
  }
  // probability targets
  struct prob_case {
    const char* name;
    reduction red;
    bool mask, weight;
    double eps;
    bool strided, neg_inf;
    std::int64_t D;
  };
  const prob_case probs[] = {
      {"prob mean", reduction::mean, false, false, 0.0, false, false, 0},
      {"prob mean mask", reduction::mean, true, false, 0.0, false, false, 0},
      {"prob sum weight", reduction::sum, false, true, 0.0, false, false, 0},
      {"prob none mask weight", reduction::none, true, true, 0.0, true, false, 0},
      {"prob mean smoothing weight", reduction::mean, false, true, 0.2, false, false, 0},
      {"prob sum -inf logits", reduction::sum, false, false, 0.0, false, true, 0},
      {"prob none -inf logits mask weight", reduction::none, true, true, 0.0, true, true, 0},
      {"prob (N, C, d) mask", reduction::mean, true, false, 0.1, true, false, 4},
  };
  for (const prob_case& p : probs) {
    spec s;
    s.name = p.name;
    s.loss = loss_kind::ce_prob;
    s.reduce = p.red;
    s.mask = p.mask;
    s.weight = p.weight;
    s.smoothing = p.eps;
    s.strided = p.strided;
    s.neg_inf = p.neg_inf;
    s.D = p.D;
    add(s);
  }
  // top-k targets
  for (bool tail : {false, true})
    for (reduction red : ce_reductions) {
      spec s;
      s.name = std::string("topk ") + (tail ? "tail " : "") + std::string(softce::reduction_name(red)) +
               (red != reduction::sum ? " mask" : "");
      s.loss = loss_kind::ce_topk;
      s.tail = tail;
      s.reduce = red;
      s.mask = red != reduction::sum;
      s.index32 = red == reduction::none;
      add(s);
    }
  {
    spec s;
    s.loss = loss_kind::ce_topk;
    s.name = "topk weight (dense path)";
    s.weight = true;
    add(s);
    s.name = "topk smoothing (dense path) mask";
    s.weight = false;
    s.smoothing = 0.1;
    s.mask = true;
    add(s);
    s.name = "topk tail -inf logits (N, C, d)";
    s.smoothing = 0.0;
    s.tail = true;
    s.neg_inf = true;
    s.D = 2;
    s.strided = true;
    add(s);
    s.name = "topk tail long rows";
    s.neg_inf = false;
    s.D = 0;
    s.N = 16;
    s.C = 4099;
    s.K = 20;
    s.strided = false;
    add(s);
  }
  // distillation, teacher logits, temperature 2
  struct distill_case {
    const char* name;
    divergence kind;
    double beta;
  };
  const distill_case kinds[] = {{"kl", divergence::kl, 0.5},
                                {"reverse_kl", divergence::reverse_kl, 0.5},
                                {"jsd beta=0.5", divergence::jsd, 0.5},
                                {"jsd beta=0", divergence::jsd, 0.0},
                                {"jsd beta=1", divergence::jsd, 1.0},
                                {"jsd beta=0.3", divergence::jsd, 0.3}};
  const reduction distill_reductions[] = {reduction::batchmean, reduction::sum, reduction::none, reduction::mean};
  int i = 0;
  for (const distill_case& k : kinds)
    for (int variant = 0; variant < 2; ++variant, ++i) {
      spec s;
      s.loss = loss_kind::distill_logits;
      s.kind = k.kind;
      s.beta = k.beta;
      s.temperature = 2.0;
      s.reduce = distill_reductions[i % 4];
      s.mask = variant == 1;
      s.neg_inf = variant == 1 && i % 3 != 0;
      s.strided = variant == 1;
      s.name = std::string("distill ") + k.name + " T=2 " + std::string(softce::reduction_name(s.reduce)) +
               (s.mask ? " mask" : "") + (s.neg_inf ? " -inf logits" : "");
      add(s);
    }
  {
    spec s;
    s.loss = loss_kind::distill_logits;
    s.kind = divergence::jsd;
    s.temperature = 2.0;
    s.reduce = reduction::batchmean;
    s.name = "distill jsd (N, C, d) T=2";
    s.D = 3;
    add(s);
    s.name = "distill jsd long rows T=0.5";
    s.D = 0;
    s.N = 16;
    s.C = 4099;
    s.temperature = 0.5;
    add(s);
  }
  // distillation, top-k teacher
  for (bool tail : {false, true})
    for (reduction red : {reduction::batchmean, reduction::none, reduction::mean}) {
      spec s;
      s.loss = loss_kind::distill_topk;
      s.tail = tail;
      s.reduce = red;
      s.temperature = 2.0;
      s.mask = red == reduction::none;
      s.name = std::string("distill topk teacher ") + (tail ? "tail " : "") +
               std::string(softce::reduction_name(red)) + " T=2" + (s.mask ? " mask" : "");
      add(s);
    }
  // large logits (shifts far from 0) with temperatures != 1: the shifts travel scaled by 1/T
  {
    spec s;
    s.logit_offset = 1000.0;
    s.temperature = 3.0;
    s.name = "distill reverse_kl logits ~1000 T=3";
    s.loss = loss_kind::distill_logits;
    s.kind = divergence::reverse_kl;
    add(s);
    s.name = "distill topk teacher tail logits ~-1000 T=3";
    s.logit_offset = -1000.0;
    s.loss = loss_kind::distill_topk;
    s.kind = divergence::kl;
    s.tail = true;
    add(s);
    s.name = "topk tail logits ~1000";
    s.logit_offset = 1000.0;
    s.loss = loss_kind::ce_topk;
    add(s);
  }
  // many rows (a larger all-reduce, several softce threads per rank)
  {
    spec s;
    s.name = "distill jsd 3000 rows 2 threads";
    s.loss = loss_kind::distill_logits;
    s.kind = divergence::jsd;
    s.beta = 0.7;
    s.temperature = 2.0;
    s.N = 3000;
    s.mask = true;
    s.reduce = reduction::none;
    s.threads = 2;
    add(s);
    s.name = "index mean weight smoothing 3000 rows 2 threads";
    s.loss = loss_kind::ce_index;
    s.reduce = reduction::mean;
    s.mask = false;
    s.weight = true;
    s.smoothing = 0.1;
    s.ignore_rows = true;
    add(s);
  }
  // no rows: the all-reduce has nothing to do, the agreement still runs
  {
    spec s;
    s.name = "index mean, no rows";
    s.N = 0;
    add(s);
    s.name = "distill jsd, no rows";
    s.loss = loss_kind::distill_logits;
    s.kind = divergence::jsd;
    s.reduce = reduction::batchmean;
    add(s);
  }
  // a rank with no classes (the first), when there are several ranks
  {
    spec s;
    s.name = "index, first rank empty";
    s.split = split_kind::empty_first;
    s.weight = true;
    cases.push_back(s);
    s.name = "distill jsd, first rank empty";
    s.loss = loss_kind::distill_logits;
    s.kind = divergence::jsd;
    s.temperature = 2.0;
    s.reduce = reduction::none;
    cases.push_back(s);
  }
  return cases;
}

// ---------------------------------------------------------------------------------------
// the all-reduce's merge order

// 2x2 integer matrices (exact in doubles): associative and not commutative, so the result
// shows the order in which MPI combined the ranks.
void matrix_product(double* inout, const double* in, std::int64_t count) {
  for (std::int64_t i = 0; i < count; ++i) {
    double* a = inout + 4 * i;
    const double* b = in + 4 * i;
    const double r0 = a[0] * b[0] + a[1] * b[2], r1 = a[0] * b[1] + a[1] * b[3];
    const double r2 = a[2] * b[0] + a[3] * b[2], r3 = a[2] * b[1] + a[3] * b[3];
    a[0] = r0, a[1] = r1, a[2] = r2, a[3] = r3;
  }
}

void test_merge_order() {
  g_case = "all_reduce merge order";
  // sizes that select different MPI algorithms (Open MPI switches at 128 KiB and 1 MiB)
  for (std::int64_t count : {0, 1, 7, 1000, 5000, 40000}) {
    auto matrix = [](int rank, std::int64_t i, double* m) {
      rng gen(static_cast<std::uint64_t>(rank) * 7919 + static_cast<std::uint64_t>(i));
      for (int j = 0; j < 4; ++j) m[j] = static_cast<double>(gen.below(4));
    };
    std::vector<double> mine(static_cast<std::size_t>(4 * count)), want(mine.size());
    for (std::int64_t i = 0; i < count; ++i) {
      matrix(g_rank, i, &mine[4 * i]);
      matrix(0, i, &want[4 * i]);
      for (int r = 1; r < g_size; ++r) {
        double m[4];
        matrix(r, i, m);
        matrix_product(&want[4 * i], m, 1);  // rank order: M0 M1 ... M(P-1)
      }
    }
    softce::mpi::all_reduce(MPI_COMM_WORLD, mine.data(), count, 4, matrix_product);
    check(mine == want, "count " + std::to_string(count) + ": the product is not in rank order");
  }
}

// ---------------------------------------------------------------------------------------
// errors: the same softce::error on every rank

// The message the single-process core gives for the same local mistake.
template <class Call>
std::string core_message(Call call) {
  try {
    call();
  } catch (const softce::error& e) {
    return e.what();
  }
  return "(no error)";
}

void test_errors() {
  const std::int64_t N = 8, C = 37;
  const int P = g_size, last = P - 1;
  const auto counts = split_counts(C, P, split_kind::even);
  std::int64_t off = 0;
  for (int r = 0; r < g_rank; ++r) off += counts[r];
  const std::int64_t Cl = counts[g_rank];
  std::vector<float> x(static_cast<std::size_t>(N * (Cl + 1)), 0.5f), w(static_cast<std::size_t>(Cl + 1), 1.0f);
  std::vector<std::int64_t> y(N, 1), top(static_cast<std::size_t>(N * 2));
  std::vector<float> topv(top.size(), 0.4f);
  for (std::int64_t r = 0; r < N; ++r) top[2 * r] = 0, top[2 * r + 1] = C - 1;
  const softce::mpi::shard sh(MPI_COMM_WORLD, off, C);
  const array_view input = softce::view(x.data(), {N, Cl});
  const array_view target = softce::view(y.data(), {N});
  const std::string rank_s = std::to_string(last);

  if (P > 1) {
    // rows differ: the last rank has one row fewer
    const std::int64_t n = g_rank == last ? N - 1 : N;
    expect_error(
        "error: rows differ",
        [&] { softce::mpi::cross_entropy(sh, softce::view(x.data(), {n, Cl}), softce::view(y.data(), {n})); },
        "mpi::cross_entropy: input: rows differ across ranks (rank 0: 8, rank " + rank_s + ": 7)");
    // the same rows in another row shape
    const array_view x3 = g_rank == last ? softce::view(x.data(), {4, Cl, 2}) : softce::view(x.data(), {2, Cl, 4});
    const array_view y3 = g_rank == last ? softce::view(y.data(), {4, 2}) : softce::view(y.data(), {2, 4});
    expect_error(
        "error: row shape differs", [&] { softce::mpi::cross_entropy(sh, x3, y3); },
        "mpi::cross_entropy: input: row shape differs across ranks (rank 0: (2, 4), rank " + rank_s + ": (4, 2))");
    // num_classes differs (the last rank's range still fits its own count)
    expect_error(
        "error: num_classes differs",
        [&] {
          softce::mpi::cross_entropy(softce::mpi::shard(MPI_COMM_WORLD, off, g_rank == last ? C + 5 : C), input,
                                     target);
        },
        "mpi::cross_entropy: num_classes differs across ranks (rank 0: 37, rank " + rank_s + ": 42)");
    // a gap between rank 0 and rank 1
    const std::int64_t shifted = g_rank == 0 ? 0 : off + 1;
    expect_error(
        "error: shards leave a gap",
        [&] { softce::mpi::cross_entropy(softce::mpi::shard(MPI_COMM_WORLD, shifted, C + 1), input, target); },
        "mpi::cross_entropy: shard: expected the ranks' classes to tile [0, 38) in rank order, but rank 1 has "
        "classes [" + std::to_string(counts[0] + 1) + ", " + std::to_string(counts[0] + 1 + counts[1]) +
            ") (expected a start at " + std::to_string(counts[0]) + ")");
    // a bad class weight on the last rank only: its own message there, "failed on rank" elsewhere
    const std::int64_t last_classes = counts[last];
    const std::string weight_message = core_message([&] {
      std::vector<float> xs(static_cast<std::size_t>(N * last_classes)), ws(static_cast<std::size_t>(last_classes + 1));
      softce::cross_entropy_options o;
      o.weight = softce::view(ws.data(), {last_classes + 1});
      softce::cross_entropy(softce::view(xs.data(), {N, last_classes}), softce::view(y.data(), {N}), o);
    });
    softce::cross_entropy_options bad_weight;
    bad_weight.weight = softce::view(w.data(), {g_rank == last ? Cl + 1 : Cl});
    expect_error(
        "error: bad weight on one rank", [&] { softce::mpi::cross_entropy(sh, input, target, bad_weight); },
        g_rank == last ? weight_message : "mpi::cross_entropy: failed on rank " + rank_s + ": " + weight_message);
    // errors on two ranks: each its own; the others report the lowest failing rank
    softce::cross_entropy_options bad_two;
    bad_two.label_smoothing = g_rank == 0 ? 2.0 : g_rank == last ? 3.0 : 0.0;
    const std::string m0 = core_message([&] {
      softce::cross_entropy_options o;
      o.label_smoothing = 2.0;
      softce::cross_entropy(input, target, o);
    });
    const std::string mlast = core_message([&] {
      softce::cross_entropy_options o;
      o.label_smoothing = 3.0;
      softce::cross_entropy(input, target, o);
    });
    expect_error(
        "error: failures on two ranks", [&] { softce::mpi::cross_entropy(sh, input, target, bad_two); },
        g_rank == 0 ? m0 : g_rank == last ? mlast : "mpi::cross_entropy: failed on rank 0: " + m0);
    // options differ: jsd on rank 0 would make two all-reduces there and one elsewhere
    softce::distillation_options d;
    d.kind = g_rank == 0 ? divergence::jsd : divergence::kl;
    expect_error(
        "error: divergence differs", [&] { softce::mpi::distillation_loss(sh, input, input, d); },
        "mpi::distillation_loss: divergence differs across ranks (rank 0: 'jsd', rank 1: 'kl')");
    softce::distillation_options dd;
    if (g_rank == 0) dd.dim = -1;  // the same class dimension of 2-d logits, said differently
    expect_error(
        "error: dim differs", [&] { softce::mpi::distillation_loss(sh, input, input, dd); },
        "mpi::distillation_loss: dim differs across ranks (rank 0: -1, rank 1: not given)");
    softce::distillation_options dt;
    dt.temperature = g_rank == last ? 2.5 : 2.0;
    expect_error(
        "error: temperature differs", [&] { softce::mpi::distillation_loss(sh, input, input, dt); },
        "mpi::distillation_loss: temperature differs across ranks (rank 0: 2, rank " + rank_s + ": 2.5)");
    // targets differ
    std::vector<std::int64_t> y2 = y;
    if (g_rank == last) y2[5] = 2;
    expect_error(
        "error: targets differ", [&] { softce::mpi::cross_entropy(sh, input, softce::view(y2.data(), {N})); },
        "mpi::cross_entropy: target: differs between rank 0 and rank " + rank_s +
            " (class indices and top-k entries are global and must be identical on every rank)");
    // different functions
    std::vector<float> probs(static_cast<std::size_t>(N * Cl), 0.1f);
    expect_error(
        "error: different functions",
        [&] {
          if (g_rank == 0)
            softce::mpi::cross_entropy(sh, input, target);
          else
            softce::mpi::cross_entropy(sh, input, softce::view(probs.data(), {N, Cl}));
        },
        "mpi::cross_entropy: ranks called different functions (rank 0: cross_entropy with class-index targets, "
        "rank 1: cross_entropy with probability targets)");
    // from_local_classes with a negative count on one rank
    expect_error(
        "error: from_local_classes negative count",
        [&] { softce::mpi::shard::from_local_classes(MPI_COMM_WORLD, g_rank == last ? -3 : 5); },
        "mpi::shard: local_classes: expected a count >= 0 on every rank, got -3 on rank " + rank_s);
  }
  // a class id outside every shard: the core's check, on every rank, before any collective
  std::vector<std::int64_t> y_bad = y;
  y_bad[3] = C;
  expect_error(
      "error: class index outside every shard",
      [&] { softce::mpi::cross_entropy(sh, input, softce::view(y_bad.data(), {N})); },
      "cross_entropy: target: class index 37 at row 3 is out of range for 37 classes", softce::error_kind::index);
  std::vector<std::int64_t> top_bad = top;
  top_bad[2 * 3 + 1] = C;
  softce::topk tk{softce::view(top_bad.data(), {N, 2}), softce::view(topv.data(), {N, 2}), false};
  expect_error(
      "error: top-k index outside every shard", [&] { softce::mpi::cross_entropy(sh, input, tk); },
      "cross_entropy: target.indices: index 37 at row 3 is out of range for 37 classes", softce::error_kind::index);
  expect_error(
      "error: top-k teacher index outside every shard", [&] { softce::mpi::distillation_loss(sh, input, tk); },
      "distillation_loss: teacher.indices: index 37 at row 3 is out of range for 37 classes",
      softce::error_kind::index);
  // shards that do not reach num_classes
  expect_error(
      "error: shards do not cover num_classes",
      [&] { softce::mpi::cross_entropy(softce::mpi::shard(MPI_COMM_WORLD, off, C + 1), input, target); },
      "mpi::cross_entropy: shard: expected the ranks' classes to tile [0, 38) in rank order, but they cover [0, 37)");
  // and after all that, a good call still works
  g_case = "good call after errors";
  double loss = std::nan("");
  try {
    loss = softce::mpi::cross_entropy(sh, input, target);
  } catch (const std::exception& e) {
    check(false, e.what());
  }
  check(close(loss, std::log(static_cast<double>(C)), 1e-6), "loss " + num(loss));
}

// ---------------------------------------------------------------------------------------
// the disagreements shared with the torch.distributed front (agreement_cases.txt)

struct agreement_case {
  std::string name, message;
};

std::vector<agreement_case> read_agreement_cases() {
  std::ifstream in(SOFTCE_AGREEMENT_CASES);
  std::vector<agreement_case> cases;
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') continue;
    const auto tab = line.find('\t');
    if (tab == std::string::npos) continue;
    cases.push_back({line.substr(0, tab), line.substr(tab + 1)});
  }
  return cases;
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (auto at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size())) s.replace(at, from.size(), to);
  return s;
}

void test_shared_agreement_cases() {
  const std::int64_t N = 8, C = 37;
  const int P = g_size, last = P - 1;
  const auto counts = split_counts(C, P, split_kind::even);
  std::int64_t off = 0;
  for (int r = 0; r < g_rank; ++r) off += counts[r];
  const std::int64_t Cl = counts[g_rank];
  const bool changes = g_rank == last;  // the last rank changes the one thing named
  std::vector<float> x(static_cast<std::size_t>(N * Cl), 0.5f), probs(x.size(), 0.1f), w(static_cast<std::size_t>(Cl), 1.0f);
  std::vector<double> xd(x.size(), 0.5);
  std::vector<std::int64_t> y(N, 1), top(static_cast<std::size_t>(N * 2));
  std::vector<float> topv(top.size(), 0.4f);
  for (std::int64_t r = 0; r < N; ++r) top[2 * r] = 0, top[2 * r + 1] = C - 1;
  bool mask[N] = {true, true, true, true, true, true, true, true};
  const softce::mpi::shard sh(MPI_COMM_WORLD, off, C);
  const array_view input = softce::view(x.data(), {N, Cl}), target = softce::view(y.data(), {N});
  const array_view prob_target = softce::view(probs.data(), {N, Cl});
  const std::string ce = "mpi::cross_entropy: ", kd = "mpi::distillation_loss: ";

  // name -> (function prefix, the call on this rank)
  std::map<std::string, std::pair<std::string, std::function<void()>>> impl;
  impl["weight_on_one_rank"] = {ce, [&] {
    softce::cross_entropy_options o;
    if (!changes) o.weight = softce::view(w.data(), {Cl});
    softce::mpi::cross_entropy(sh, input, target, o);
  }};
  impl["input_dtype"] = {ce, [&] {
    softce::mpi::cross_entropy(sh, changes ? softce::view(xd.data(), {N, Cl}) : input, target);
  }};
  impl["student_dtype"] = {kd, [&] {
    const array_view s = changes ? softce::view(xd.data(), {N, Cl}) : input;
    softce::mpi::distillation_loss(sh, s, s);
  }};
  impl["rows"] = {ce, [&] {
    const std::int64_t n = changes ? N - 1 : N;
    softce::mpi::cross_entropy(sh, softce::view(x.data(), {n, Cl}), softce::view(y.data(), {n}));
  }};
  impl["label_smoothing"] = {ce, [&] {
    softce::cross_entropy_options o;
    o.label_smoothing = changes ? 0.0 : 0.1;
    softce::mpi::cross_entropy(sh, input, target, o);
  }};
  impl["ignore_index"] = {ce, [&] {
    softce::cross_entropy_options o;
    o.ignore_index = changes ? 3 : -100;
    softce::mpi::cross_entropy(sh, input, target, o);
  }};
  impl["reduction"] = {ce, [&] {
    softce::cross_entropy_options o;
    o.reduce = changes ? reduction::sum : reduction::mean;
    softce::mpi::cross_entropy(sh, input, target, o);
  }};
  impl["temperature"] = {kd, [&] {
    softce::distillation_options o;
    o.temperature = changes ? 2.5 : 2.0;
    softce::mpi::distillation_loss(sh, input, input, o);
  }};
  impl["divergence"] = {kd, [&] {
    softce::distillation_options o;
    o.kind = changes ? divergence::kl : divergence::jsd;
    softce::mpi::distillation_loss(sh, input, input, o);
  }};
  impl["function"] = {ce, [&] { softce::mpi::cross_entropy(sh, input, changes ? prob_target : target); }};
  impl["index_target"] = {ce, [&] {
    std::vector<std::int64_t> y2 = y;
    if (changes) y2[5] = 2;
    softce::mpi::cross_entropy(sh, input, softce::view(y2.data(), {N}));
  }};
  impl["topk_teacher"] = {kd, [&] {
    std::vector<std::int64_t> top2 = top;
    if (changes) top2[2 * 4] = 1;
    softce::mpi::distillation_loss(sh, input, softce::topk{softce::view(top2.data(), {N, 2}), softce::view(topv.data(), {N, 2}), false});
  }};
  impl["mask_on_one_rank"] = {ce, [&] {
    softce::cross_entropy_options o;
    if (!changes) o.mask = softce::view(mask, {N});
    softce::mpi::cross_entropy(sh, input, prob_target, o);
  }};
  impl["mask_values"] = {ce, [&] {
    bool m2[N];
    std::copy(mask, mask + N, m2);
    if (changes) m2[2] = false;
    softce::cross_entropy_options o;
    o.mask = softce::view(m2, {N});
    softce::mpi::cross_entropy(sh, input, prob_target, o);
  }};

  // the fused output layer: hidden (N, 4) replicated, weight rows (Cl, 4)
  const std::int64_t D = 4;
  std::vector<float> hidden(static_cast<std::size_t>(N * (D + 1)), 0.25f), layer(static_cast<std::size_t>(Cl * (D + 1)), 0.5f);
  std::vector<float> bias(static_cast<std::size_t>(Cl), 0.0f), thidden(static_cast<std::size_t>(N * 3), 0.5f);
  const array_view h = softce::view(hidden.data(), {N, D}), lw = softce::view(layer.data(), {Cl, D});
  const std::string lce = "mpi::linear_cross_entropy: ", lkd = "mpi::linear_distillation_loss: ";
  impl["linear_hidden_values"] = {lce, [&] {
    std::vector<float> h2(hidden.begin(), hidden.begin() + N * D);
    if (changes) h2[5] = 0.75f;
    softce::mpi::linear_cross_entropy(sh, softce::view(h2.data(), {N, D}), lw, std::nullopt, target);
  }};
  impl["linear_D"] = {lce, [&] {
    const std::int64_t d = changes ? D + 1 : D;
    softce::mpi::linear_cross_entropy(sh, softce::view(hidden.data(), {N, d}), softce::view(layer.data(), {Cl, d}),
                                      std::nullopt, target);
  }};
  impl["linear_bias_on_one_rank"] = {lce, [&] {
    std::optional<array_view> b;
    if (!changes) b = softce::view(bias.data(), {Cl});
    softce::mpi::linear_cross_entropy(sh, h, lw, b, target);
  }};
  impl["linear_class_weight_on_one_rank"] = {lce, [&] {
    softce::cross_entropy_options o;
    if (!changes) o.weight = softce::view(w.data(), {Cl});
    softce::mpi::linear_cross_entropy(sh, h, lw, std::nullopt, target, o);
  }};
  impl["linear_memory_budget"] = {lce, [&] {
    softce::linear_options o;
    o.memory_budget = changes ? 4096 : 8192;
    softce::mpi::linear_cross_entropy(sh, h, lw, std::nullopt, target, {}, o);
  }};
  impl["linear_teacher_form"] = {lkd, [&] {
    std::vector<float> tw(static_cast<std::size_t>(Cl * 3), 0.1f);
    if (changes)
      softce::mpi::linear_distillation_loss(sh, h, lw, std::nullopt,
                                            softce::linear_teacher{softce::view(thidden.data(), {N, 3}),
                                                                   softce::view(tw.data(), {Cl, 3}), std::nullopt});
    else
      softce::mpi::linear_distillation_loss(sh, h, lw, std::nullopt, prob_target);
  }};

  const auto cases = read_agreement_cases();
  g_case = "agreement_cases.txt";
  check(cases.size() == impl.size(), "agreement_cases.txt has " + std::to_string(cases.size()) + " cases, this test " +
                                         std::to_string(impl.size()));
  for (const agreement_case& c : cases) {
    const auto found = impl.find(c.name);
    g_case = "shared agreement case " + c.name;
    check(found != impl.end(), "not implemented here");
    if (found == impl.end()) continue;
    expect_error("shared agreement case " + c.name, found->second.second,
                 found->second.first + replace_all(c.message, "{last}", std::to_string(last)));
  }
}

}  // namespace

int main(int argc, char** argv) {
  const auto started = start(argc, argv);

  test_merge_order();
  int cases = 0;
  for (auto mode : {softce::class_parallel::reduce_mode::ordered, softce::class_parallel::reduce_mode::commutative}) {
    g_mode = mode;
    const std::string suffix = mode == softce::class_parallel::reduce_mode::commutative ? " commutative" : "";
    std::uint64_t seed = 1;
    for (const spec& s : comparison_cases()) {
      spec f32 = s, f64 = s;
      f32.name += " float32" + suffix;
      f64.name += " float64" + suffix;
      run_case<float>(f32, seed);
      run_case<double>(f64, seed);
      ++seed;
      cases += 2;
    }
  }
  g_mode = softce::class_parallel::reduce_mode::ordered;
  test_errors();
  if (g_size > 1) test_shared_agreement_cases();

  return finish("mpi_test", cases, started);
}
