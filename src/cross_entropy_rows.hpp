// The cross-entropy row engine shared by the three target kinds that reduce to the
// probability-target statistics (target_stats: Σ w t', Σ w t' (x - shift)): class-index
// targets (one-hot rows), dense probability targets, and top-k targets scattered into dense
// rows. Each kind supplies a `rows` object that sets a row up (its target descriptor, and
// whether the row is skipped); the engine runs the statistics pass, the loss, the target
// gradient and the gradient pass, row by row or around the class-parallel all-reduce.
//
// A `rows` object provides:
//   using state = ...;                       per-thread state (readers, buffers)
//   state make_state() const;
//   double prepare(context&, r) const;       sets c.desc / c.skip / c.xr, returns the weight
//                                            of the row's class-index target on this shard
//   ce_record stats(setup, context&, r, w);  the statistics pass (ce_rows_base: generic)
//   double finish(setup, context&, r, rec);  loss and gradients (ce_rows_base: generic)
//   void after_exchange(setup&, records);    after the all-reduce (ce_rows_base: nothing)
//   bool piecewise() const;                  prepare() copies or fills no whole row
//                                            (ce_rows_base: true)
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "kernels.hpp"
#include "loss_drivers.hpp"
#include "row_driver.hpp"
#include "row_stats.hpp"
#include "shard_records.hpp"
#include "staging.hpp"

namespace softce::detail {

template <class T>
std::vector<T> class_weights(const std::optional<array_view>& weight) {
  std::vector<T> w;
  if (!weight) return w;
  w.resize(static_cast<std::size_t>(weight->shape[0]));
  gather<T>(static_cast<const char*>(weight->data), weight->type, 0, weight->strides[0], weight->shape[0], w.data());
  return w;
}


// The row's log-sum-exp from merged statistics as shift + log_sum (shift -inf for an all
// -inf row, log_sum NaN when poisoned): lse - x = (shift - x) + log_sum keeps -log q exact
// near the max, where lse - x would cancel.
struct row_lse {
  double shift, log_sum;
};
inline row_lse ce_row_lse(const target_stats& st) {
  if (std::isnan(st.sum)) return {st.shift, kNaN};
  if (st.sum == 0.0 || st.shift == -kInf) return {-kInf, 0.0};
  return {st.shift, std::log(st.sum)};
}


// d loss / d t_c for a dense target row, t'_c = keep t_c + add, wt_c = w_c t'_c:
// coef keep w_c (lse - x_c), and 0 where wt_c = 0 faces lse - x_c = +inf (x_c = -inf: the
// 0 * (-inf) = 0 rule's class; the expression in python/softce/_reference.py agrees).
template <class T>
void target_gradient_row(const T* x, std::int64_t n, const target_desc<T>& t, row_lse lse, double coef, T* gt) {
  const T shift = static_cast<T>(lse.shift), log_sum = static_cast<T>(lse.log_sum);
  const T scale = static_cast<T>(coef) * t.keep;
  for (std::int64_t c = 0; c < n; ++c) {
    const T w = t.weight ? t.weight[c] : T(1);
    const T wt = w * (t.keep * t.dense[c] + t.add);
    T s = (shift - x[c]) + log_sum;
    if (wt == T(0) && s == std::numeric_limits<T>::infinity()) s = T(0);
    // a non-finite class weight: no value (inf times a -log q that may round to 0)
    gt[c] = std::isfinite(w) ? scale * w * s : std::numeric_limits<T>::quiet_NaN();
  }
}

// What every cross-entropy row of one call shares.
template <class T>
struct ce_setup {
  const ce_call& call;
  const kernel_table<T>& kern;  // fetched once per call
  const row_space& space;
  row_operand x_op;
  std::optional<row_operand> g_op, gt_op, mask;
  std::vector<T> weight;  // class weights, or empty
  std::int64_t C, offset, total_classes;
  double eps;  // label smoothing
  reduce_plan plan;
  double coef = 1.0;  // the gradient's factor (gradient_coef(plan)), set by run_ce_rows
};

template <class T>
ce_setup<T> make_ce_setup(const ce_call& call, const row_space& space) {
  std::optional<row_operand> g_op, gt_op;
  if (call.out.grad) g_op = class_operand(space, *call.out.grad);
  if (call.out.grad_target) gt_op = class_operand(space, *call.out.grad_target);  // dense targets only
  auto mask = mask_operand(call.fn, call.options.mask, space);
  return ce_setup<T>{call,
                     kernels_for<T>(),
                     space,
                     class_operand(space, call.input),
                     g_op,
                     gt_op,
                     mask,
                     class_weights<T>(call.options.weight),
                     space.classes,
                     call.shard ? call.shard->class_offset : 0,
                     call.shard ? call.shard->num_classes : space.classes,
                     call.options.label_smoothing,
                     reduce_plan{call.options.reduce, 1.0}};
}

// One thread's rows: readers and writers, the row being processed, its exp cache.
template <class T, class State>
struct ce_context {
  row_reader<T> x;
  std::optional<row_writer<T>> g, gt;
  const T* xr = nullptr;
  target_desc<T> desc;
  bool skip = false;
  T* gr = nullptr;        // the gradient row, holding the exp cache between the passes
  std::vector<T> shifts;  // the cache's chunk shifts
  State state;            // the target kind's own
};

// The descriptor every row starts from: class weights and label smoothing.
template <class T>
target_desc<T> base_desc(const ce_setup<T>& s) {
  target_desc<T> d{};
  d.weight = s.weight.empty() ? nullptr : s.weight.data();
  d.keep = static_cast<T>(1.0 - s.eps);
  d.add = static_cast<T>(s.eps / static_cast<double>(s.total_classes));
  return d;
}

// The statistics pass of a prepared row. Single process with a gradient: the pass leaves
// exp(x - shift) in the gradient row, so the gradient pass needs no second exp (not with a
// target gradient: that needs the logits after the statistics pass).
template <class T, class Context>
ce_record ce_row_stats(const ce_setup<T>& s, Context& c, std::int64_t r, double target_weight) {
  if (c.skip) return ce_record{{-kInf, 0.0, 0.0, 0.0}, 0.0};
  exp_cache<T> cache;
  if (c.g && !s.call.shard && !c.gt) {
    c.gr = c.g->begin(r);
    cache = exp_cache<T>{c.gr, c.shifts.data()};
  }
  const target_stats st = row_stats_in_pieces<target_stats>(
      s.C,
      [&](std::int64_t c0, std::int64_t len) {
        return s.kern.target_row_stats(c.xr + c0, len, desc_slice(c.desc, c0, len), cache_from(cache, c0));
      },
      merge_target);
  return ce_record{st, target_weight};
}

// The gradient pass: from the exp cache the statistics pass left in the gradient row, or
// from the logits (class-parallel, or when a target gradient kept the cache out).
template <class T, class Context>
void ce_row_gradient(const ce_setup<T>& s, Context& c, std::int64_t r, const ce_record& rec) {
  const row_normaliser<T> norm = normaliser<T>(rec.st.shift, rec.st.sum);
  const T a = static_cast<T>(rec.st.a), coef = static_cast<T>(s.coef);
  if (s.call.shard || c.gt) {
    T* g = c.g->begin(r);
    row_in_pieces(s.C, [&](std::int64_t c0, std::int64_t len) {
      s.kern.target_row_grad(c.xr + c0, len, desc_slice(c.desc, c0, len), norm, a, coef, g + c0);
    });
  } else {
    const exp_cache<T> cache{c.gr, c.shifts.data()};
    row_in_pieces(s.C, [&](std::int64_t c0, std::int64_t len) {
      s.kern.target_row_grad_cached(cache_from(cache, c0), len, desc_slice(c.desc, c0, len), norm, a, coef,
                                    c.gr + c0);
    });
  }
  c.g->commit();
}

// A mean over a zero total weight is NaN with a zero gradient, even for a poisoned row (the
// oracle's rule; torch has 0 / 0 there).
template <class T>
bool nothing_to_average(const ce_setup<T>& s) {
  return s.plan.mode == reduction::mean && s.plan.denominator == 0.0;
}

// Loss, target gradient and gradient of a row from its merged statistics.
template <class T, class Context>
double ce_row_finish(const ce_setup<T>& s, Context& c, std::int64_t r, const ce_record& rec) {
  if (c.skip || nothing_to_average(s)) {
    if (c.g) c.g->zero_row(r);
    if (c.gt) c.gt->zero_row(r);
    return 0.0;
  }
  // d loss / d target, before the gradient pass may overwrite the logits (in place)
  if (c.gt) {
    target_gradient_row(c.xr, s.C, c.desc, ce_row_lse(rec.st), s.coef, c.gt->begin(r));
    c.gt->commit();
  }
  if (ce_row_poisoned(rec.st)) {
    if (c.g) c.g->fill_row(r, std::numeric_limits<T>::quiet_NaN());
    return kNaN;
  }
  if (c.g) ce_row_gradient(s, c, r, rec);
  return ce_row_loss(rec.st);
}

// Rows of at most one vector of classes (C <= 16 float on AVX-512), contiguous, read and
// written where they are, no mask, one process, no target gradient: a block of rows per
// kernel call (SmallTargetRows), not two kernel calls and an exp cache per row (softce_bench
// small_ce/64x10, Intel Xeon AVX-512: 5.6 -> 2.8 us; the bits are the row-by-row path's).
// Dense targets (t_op) or class indices (t_op null, labels given to run_small_rows).
template <class T>
bool small_rows(const ce_setup<T>& s, const row_operand* t_op) {
  const auto flat = [](const row_operand& op) { return direct_rows<T>(op) && op.ndim <= 1; };
  return !s.call.shard && !s.gt_op && !s.mask && !nothing_to_average(s) && s.space.rows > 0 && s.C >= 1 &&
         s.C <= s.kern.small_row_classes() && flat(s.x_op) && (!t_op || flat(*t_op)) && (!s.g_op || flat(*s.g_op));
}

template <class T>
double run_small_rows(ce_setup<T>& s, const row_operand* t_op, const std::int64_t* labels) {
  s.coef = gradient_coef(s.plan);
  const auto stride = [](const row_operand& op) { return op.ndim == 1 ? op.strides[0] : std::int64_t{0}; };
  const std::int64_t xs = stride(s.x_op), ts = t_op ? stride(*t_op) : 0, gs = s.g_op ? stride(*s.g_op) : 0;
  const T* x = s.x_op.template ptr<T>(0);
  const T* t = t_op ? t_op->template ptr<T>(0) : nullptr;
  T* g = s.g_op ? const_cast<T*>(s.g_op->template ptr<T>(0)) : nullptr;
  const target_desc<T> desc = base_desc(s);
  const bool own_class_weight = s.eps == 0.0;  // index targets without smoothing: w_y alone
  std::vector<double> row_losses(static_cast<std::size_t>(s.space.rows), 0.0);
  parallel_for(s.space.rows, grain_for(s.C), [&](std::int64_t begin, std::int64_t end) {
    s.kern.small_target_rows(x + begin * xs, xs, t ? t + begin * ts : nullptr, ts, labels ? labels + begin : nullptr,
                             own_class_weight, desc.weight, end - begin, s.C, desc.keep, desc.add,
                             static_cast<T>(s.coef), g ? g + begin * gs : nullptr, gs, row_losses.data() + begin);
  });
  write_row_losses(s.call.out, s.space, row_losses);
  return finish_reduction(row_losses, s.plan);
}

// The generic passes, for target kinds that only differ in how a row is set up.
template <class T>
struct ce_rows_base {
  // whether a row's setup reads nothing over the whole row (run_rows; dense targets: read
  // where they are)
  bool piecewise() const { return true; }

  template <class Context>
  ce_record stats(const ce_setup<T>& s, Context& c, std::int64_t r, double target_weight) const {
    return ce_row_stats(s, c, r, target_weight);
  }
  template <class Context>
  double finish(const ce_setup<T>& s, Context& c, std::int64_t r, const ce_record& rec) const {
    return ce_row_finish(s, c, r, rec);
  }
  void after_exchange(ce_setup<T>&, std::vector<ce_record>&) const {}
};

// Runs every row of the call and returns the reduced loss (the per-row losses written).
template <class T, class Rows>
double run_ce_rows(ce_setup<T>& s, const Rows& rows) {
  using context = ce_context<T, typename Rows::state>;
  s.coef = gradient_coef(s.plan);
  auto make_context = [&] {
    context c{row_reader<T>(&s.x_op), std::nullopt, std::nullopt, nullptr, {}, false, nullptr, {}, rows.make_state()};
    c.shifts.resize(chunk_count(s.C));
    if (s.g_op) c.g.emplace(&*s.g_op);
    if (s.gt_op) c.gt.emplace(&*s.gt_op);
    return c;
  };
  auto stats_fn = [&](context& c, std::int64_t r) -> ce_record {
    c.desc = base_desc(s);
    const double target_weight = rows.prepare(c, r);
    return rows.stats(s, c, r, target_weight);
  };
  auto finish_fn = [&](context& c, std::int64_t r, const ce_record& rec) -> double {
    if (s.call.shard) {  // the passes ran apart: set the row up again
      c.desc = base_desc(s);
      rows.prepare(c, r);
    }
    return rows.finish(s, c, r, rec);
  };
  auto exchange = [&](std::vector<ce_record>& records) {
    all_reduce_records(*s.call.shard, records, merge_ce_records, {0}, 1.0);
    rows.after_exchange(s, records);
  };
  std::vector<double> row_losses(static_cast<std::size_t>(s.space.rows), 0.0);
  // every pass over a row in pieces: the row and its gradient used where they are, the
  // target kind's rows too, no target gradient (target_gradient_row is one loop)
  const bool piecewise =
      rows.piecewise() && direct_rows<T>(s.x_op) && (!s.g_op || direct_rows<T>(*s.g_op)) && !s.gt_op;
  run_rows<decltype(make_context), ce_record>(s.space.rows, s.C, s.call.shard != nullptr, piecewise, make_context,
                                              stats_fn, exchange, finish_fn, row_losses);
  write_row_losses(s.call.out, s.space, row_losses);
  return finish_reduction(row_losses, s.plan);
}

}  // namespace softce::detail
