// Distillation with dense teacher logits: p = softmax(teacher / T), q = softmax(student / T),
// T^2 KL(p || q), T^2 KL(q || p) or T^2 times the generalised JSD (TRL's GKD convention).
// One joint statistics pass over both rows (distill_stats), the JSD's second pass once the
// normalisers are final, then the gradient pass (from exp caches where the process is
// alone), and on request the teacher's gradient.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels.hpp"
#include "loss_drivers.hpp"
#include "row_driver.hpp"
#include "row_stats.hpp"
#include "shard_records.hpp"
#include "staging.hpp"

namespace softce::detail {
namespace {

// d loss / d z for a row of teacher logits z (student x), u = x / T, v = z / T,
// log q = u - shift_x / T - log Σx, log p likewise, coef = the reduction's factor times T:
//   kl:         coef p (log p - log q - KL(p || q))
//   reverse_kl: coef (p - q)
//   jsd:        coef beta p (log p - log m - KL(p || m)),  m = beta p + (1 - beta) q
// (the derivatives of the expressions in python/softce/_reference.py). Scalar, in double:
// only calls that ask for the teacher's gradient pay for it.
struct teacher_gradient_row_args {
  double inv_t, shift_x, log_sum_x, shift_z, log_sum_z;
  grad_kind kind;
  double beta, divergence, coef;  // divergence: KL(p || q) for kl, KL(p || m) for jsd
};

template <class T>
void teacher_gradient_row(const T* x, const T* z, std::int64_t n, const teacher_gradient_row_args& a, T* gt) {
  const double log_beta = std::log(a.beta), log_rest = std::log1p(-a.beta);
  for (std::int64_t c = 0; c < n; ++c) {
    const double log_q = (static_cast<double>(x[c]) - a.shift_x) * a.inv_t - a.log_sum_x;
    const double log_p = (static_cast<double>(z[c]) - a.shift_z) * a.inv_t - a.log_sum_z;
    const double p = std::exp(log_p);
    double g;
    if (a.kind == grad_kind::kl) {
      g = p == 0.0 ? 0.0 : p * (log_p - log_q - a.divergence);
    } else if (a.kind == grad_kind::reverse_kl) {
      g = p - std::exp(log_q);
    } else {
      const double u = log_beta + log_p, v = log_rest + log_q, m = std::max(u, v);
      const double log_m = m == -kInf ? -kInf : m + std::log1p(std::exp(-std::fabs(u - v)));
      g = p == 0.0 ? 0.0 : a.beta * p * (log_p - log_m - a.divergence);
    }
    gt[c] = static_cast<T>(a.coef * g);
  }
}

// TRL's endpoints: beta = 0 is the forward KL, beta = 1 the reverse KL.
grad_kind gradient_kind(const distillation_options& opt) {
  grad_kind kind = opt.kind == divergence::kl           ? grad_kind::kl
                   : opt.kind == divergence::reverse_kl ? grad_kind::reverse_kl
                                                        : grad_kind::jsd;
  if (kind == grad_kind::jsd && opt.beta == 0.0) kind = grad_kind::kl;
  if (kind == grad_kind::jsd && opt.beta == 1.0) kind = grad_kind::reverse_kl;
  return kind;
}

template <class T>
struct distill_context {
  row_reader<T> x, z;
  std::optional<row_writer<T>> g, gt;
  const T* xr = nullptr;
  const T* zr = nullptr;
  T* gr = nullptr;                    // gradient row, holding exp of the student
  scratch_row<T> ez;                  // exp of the teacher (reverse_kl: dx - dz; jsd, later: log q - log m)
  std::vector<T> shifts_x, shifts_z;  // the chunk shifts
  scratch_row<T> ex;                  // exp of the student (scratch: reverse_kl, jsd)
};

// The divergence of a row and the values its gradients need.
struct distill_row_values {
  double divergence = 0.0;  // KL(p || q), KL(q || p) or the JSD
  double r = 0.0;           // the student gradient's constant: KL(q || p) or KL(q || m)
  double teacher = 0.0;     // the teacher gradient's: KL(p || q) or KL(p || m)
  double log_sum_x = 0.0, log_sum_z = 0.0;
};

template <class T>
class distill_rows {
 public:
  distill_rows(std::string_view fn, const array_view& student, const array_view& teacher,
               const distillation_options& opt, const outputs& out, const class_shard* shard);
  double run();

 private:
  using context = distill_context<T>;
  context make_context() const;
  // where the statistics pass leaves the student's exps (scratch_)
  T* student_exps(const context& c) const { return ex_in_grad_ ? c.gr : c.ex.data(); }
  void stage(context& c, std::int64_t r) const {
    c.xr = c.x.row(r);
    c.zr = c.z.row(r);
  }
  distill_stats stats(context& c, std::int64_t r) const;
  jsd_stats jsd_of(context& c, const distill_stats& st) const;
  distill_row_values row_values(context& c, std::int64_t r, const distill_stats& st) const;
  void student_gradient(context& c, std::int64_t r, const distill_stats& st, const distill_row_values& v) const;
  double finish(context& c, std::int64_t r, const distill_stats& st) const;
  void exchange(std::vector<distill_stats>& records);

  const kernel_table<T>& kern_;
  const outputs& out_;
  const class_shard* shard_;
  const row_space space_;
  const std::int64_t C_, total_classes_;
  const std::optional<row_operand> mask_;
  const row_operand x_op_, z_op_;
  std::optional<row_operand> g_op_, gt_op_;
  const double T_, inv_t_, t2_, beta_;
  const grad_kind kind_;
  const distill_kind stats_kind_;
  reduce_plan plan_;
  double coef_ = 1.0;
  // kl in one process: the statistics pass caches both exps, the gradient pass reuses them
  // (not with a teacher gradient: that needs the student's logits after the statistics pass)
  bool cached_;
  // reverse_kl (with a gradient) and jsd in one process: the statistics pass caches both
  // exps in scratch rows (the logits stay intact: log q and log p are read from them), so
  // the JSD pass and the gradient pass need no exp per element (jsd: one log, of m).
  bool scratch_;
  // ... with the student's exps in the gradient row instead of a scratch row (one row of C
  // less per thread): when the gradient is not the logits (jsd reads them again) and no
  // teacher gradient needs the logits after the statistics pass
  bool ex_in_grad_ = false;
  std::vector<jsd_stats> jsd_;  // class-parallel jsd: every row's second pass, exchanged
};

template <class T>
distill_rows<T>::distill_rows(std::string_view fn, const array_view& student, const array_view& teacher,
                              const distillation_options& opt, const outputs& out, const class_shard* shard)
    : kern_(kernels_for<T>()),
      out_(out),
      shard_(shard),
      space_(logits_space(fn, student)),
      C_(space_.classes),
      total_classes_(shard ? shard->num_classes : C_),
      mask_(mask_operand(fn, opt.mask, space_)),
      x_op_(class_operand(space_, student)),
      z_op_(class_operand(space_, teacher)),
      T_(opt.temperature),
      inv_t_(1.0 / T_),
      t2_(T_ * T_),
      beta_(opt.beta),
      kind_(gradient_kind(opt)),
      stats_kind_(kind_ == grad_kind::reverse_kl ? distill_kind::reverse_kl
                  : kind_ == grad_kind::jsd      ? distill_kind::none
                                                 : distill_kind::kl),
      plan_{opt.reduce, 1.0} {
  if (out.grad) g_op_ = class_operand(space_, *out.grad);
  if (out.grad_target) gt_op_ = class_operand(space_, *out.grad_target);
  if (opt.reduce == reduction::mean || opt.reduce == reduction::batchmean) {
    plan_.denominator = static_cast<double>(count_kept(mask_, space_.rows));
    if (opt.reduce == reduction::mean) plan_.denominator *= static_cast<double>(total_classes_);
  }
  coef_ = gradient_coef(plan_) * T_;
  cached_ = out.grad && !shard && kind_ == grad_kind::kl && !out.grad_target;
  scratch_ = !shard && ((out.grad && kind_ == grad_kind::reverse_kl) || kind_ == grad_kind::jsd);
  ex_in_grad_ = scratch_ && out.grad && !out.grad_target && g_op_->base != x_op_.base;
}

template <class T>
typename distill_rows<T>::context distill_rows<T>::make_context() const {
  context c{row_reader<T>(&x_op_), row_reader<T>(&z_op_), std::nullopt, std::nullopt, nullptr, nullptr, nullptr, {}, {},
            {}, {}};
  if (g_op_) c.g.emplace(&*g_op_);
  if (gt_op_) c.gt.emplace(&*gt_op_);
  if (cached_ || scratch_) {
    c.ez = scratch_row<T>(static_cast<std::size_t>(C_));
    c.shifts_x.resize(chunk_count(C_));
    c.shifts_z.resize(c.shifts_x.size());
  }
  if (scratch_ && !ex_in_grad_) c.ex = scratch_row<T>(static_cast<std::size_t>(C_));
  return c;
}

template <class T>
distill_stats distill_rows<T>::stats(context& c, std::int64_t r) const {
  if (!row_kept(mask_, r)) return distill_stats{-kInf, 0.0, -kInf, 0.0, 0.0};
  stage(c, r);
  exp_cache<T> cx, cz;
  if (cached_) {
    c.gr = c.g->begin(r);
    cx = exp_cache<T>{c.gr, c.shifts_x.data()};
    cz = exp_cache<T>{c.ez.data(), c.shifts_z.data()};
  } else if (scratch_) {
    if (ex_in_grad_) c.gr = c.g->begin(r);
    cx = exp_cache<T>{student_exps(c), c.shifts_x.data()};
    cz = exp_cache<T>{c.ez.data(), c.shifts_z.data()};
  }
  return row_stats_in_pieces<distill_stats>(
      C_,
      [&](std::int64_t c0, std::int64_t len) {
        return kern_.distill_row_stats(c.xr + c0, c.zr + c0, len, static_cast<T>(inv_t_), stats_kind_,
                                       cache_from(cx, c0), cache_from(cz, c0));
      },
      [&](distill_stats& acc, const distill_stats& part) {
        merge_into(acc, part, static_cast<double>(static_cast<T>(inv_t_)), stats_kind_);
      });
}

// jsd's second pass, per row, after the normalisers are final
template <class T>
jsd_stats distill_rows<T>::jsd_of(context& c, const distill_stats& st) const {
  const row_normaliser<T> nx = normaliser<T>(st.shift_x, st.sum_x), nz = normaliser<T>(st.shift_z, st.sum_z);
  const exp_cache<T> cx{student_exps(c), c.shifts_x.data()}, cz{c.ez.data(), c.shifts_z.data()};
  const T it = static_cast<T>(inv_t_), beta = static_cast<T>(beta_);
  return row_stats_in_pieces<jsd_stats>(
      C_,
      [&](std::int64_t c0, std::int64_t len) {
        if (scratch_)  // log q - log m replaces the teacher's exps, for the gradient pass
          return kern_.jsd_row_stats_cached(c.xr + c0, c.zr + c0, cache_from(cx, c0), cache_from(cz, c0), len, it, nx,
                                            nz, beta, c.ez.data() + c0);
        return kern_.jsd_row_stats(c.xr + c0, c.zr + c0, len, it, nx, nz, beta);
      },
      [](jsd_stats& acc, const jsd_stats& part) {
        acc.kl_pm += part.kl_pm;
        acc.kl_qm += part.kl_qm;
      });
}

template <class T>
distill_row_values distill_rows<T>::row_values(context& c, std::int64_t r, const distill_stats& st) const {
  distill_row_values v;
  v.log_sum_x = st.sum_x > 0.0 ? std::log(st.sum_x) : -kInf;
  v.log_sum_z = st.sum_z > 0.0 ? std::log(st.sum_z) : -kInf;
  if (kind_ == grad_kind::kl) {
    // q = 0 where p > 0 (a -inf student logit against a finite teacher logit): KL = +inf,
    // with the ordinary gradient T (q - p); k is +inf, or NaN where p underflowed
    v.divergence = !(st.k < kInf) ? kInf : st.sum_z > 0.0 ? st.k / st.sum_z - v.log_sum_z + v.log_sum_x : 0.0;
    v.teacher = v.divergence;
  } else if (kind_ == grad_kind::reverse_kl) {
    v.divergence = st.sum_x > 0.0 ? st.k / st.sum_x - v.log_sum_x + v.log_sum_z : 0.0;
    v.r = v.divergence;
  } else {
    const jsd_stats js = shard_ ? jsd_[static_cast<std::size_t>(r)] : jsd_of(c, st);
    v.divergence = beta_ * js.kl_pm + (1.0 - beta_) * js.kl_qm;
    v.r = js.kl_qm;
    v.teacher = js.kl_pm;
  }
  return v;
}

template <class T>
void distill_rows<T>::student_gradient(context& c, std::int64_t r, const distill_stats& st,
                                       const distill_row_values& v) const {
  const row_normaliser<T> nx = normaliser<T>(st.shift_x, st.sum_x), nz = normaliser<T>(st.shift_z, st.sum_z);
  const T it = static_cast<T>(inv_t_);
  if (cached_) {
    const exp_cache<T> cx{c.gr, c.shifts_x.data()}, cz{c.ez.data(), c.shifts_z.data()};
    row_in_pieces(C_, [&](std::int64_t c0, std::int64_t len) {
      kern_.distill_row_grad_kl_cached(cache_from(cx, c0), cache_from(cz, c0), len, it, nx, nz, static_cast<T>(coef_),
                                       c.gr + c0);
    });
    c.g->commit();
    return;
  }
  T* g = c.g->begin(r);
  const T row_coef = static_cast<T>(kind_ == grad_kind::jsd ? coef_ * (1.0 - beta_) : coef_);
  const T rv = static_cast<T>(v.r);
  const exp_cache<T> cx{student_exps(c), c.shifts_x.data()};
  const exp_cache<T> cdiff{c.ez.data(), c.shifts_z.data()};  // reverse_kl: dx - dz
  row_in_pieces(C_, [&](std::int64_t c0, std::int64_t len) {
    if (scratch_ && kind_ == grad_kind::reverse_kl)
      kern_.distill_row_grad_reverse_cached(cache_from(cx, c0), cache_from(cdiff, c0), len, it, nx, nz, rv, row_coef,
                                            g + c0);
    else if (scratch_)
      kern_.distill_row_grad_log_cached(c.xr + c0, c.zr + c0, c.ez.data() + c0, cache_from(cx, c0), len, it, nx, nz,
                                        rv, row_coef, g + c0);
    else
      kern_.distill_row_grad(c.xr + c0, c.zr + c0, len, it, nx, nz, kind_, static_cast<T>(beta_), rv, row_coef,
                             g + c0);
  });
  c.g->commit();
}

template <class T>
double distill_rows<T>::finish(context& c, std::int64_t r, const distill_stats& st) const {
  auto fill = [&](double value) {
    if (c.g) c.g->fill_row(r, static_cast<T>(value));
    if (c.gt) c.gt->fill_row(r, static_cast<T>(value));
  };
  if (!row_kept(mask_, r)) {
    fill(0.0);
    return 0.0;
  }
  // a NaN or +inf logit on either side, or a side that is all -inf (no softmax: torch's
  // log_softmax is NaN there)
  if (std::isnan(st.sum_x) || std::isnan(st.sum_z) || (C_ > 0 && (st.sum_x == 0.0 || st.sum_z == 0.0))) {
    fill(kNaN);
    return kNaN;
  }
  // reverse KL with p = 0 where q > 0 (a finite student logit against a -inf teacher
  // logit): KL(q || p) = +inf, and its gradient has no value (torch: inf and NaN mixed).
  // k is then +inf, or NaN where q underflowed in float (0 * inf).
  if (kind_ == grad_kind::reverse_kl && !(st.k < kInf)) {
    fill(kNaN);
    return kInf;
  }
  if (shard_) stage(c, r);
  const distill_row_values v = row_values(c, r, st);
  if (c.gt) {  // before the gradient pass may overwrite the student's logits (in place)
    const teacher_gradient_row_args a{inv_t_, st.shift_x, v.log_sum_x, st.shift_z, v.log_sum_z,
                                      kind_,  beta_,      v.teacher,   coef_};
    teacher_gradient_row(c.xr, c.zr, C_, a, c.gt->begin(r));
    c.gt->commit();
  }
  if (c.g) student_gradient(c, r, st, v);
  return t2_ * v.divergence;
}

// The all-reduce of the statistics (jsd leaves k 0 and never reads it, whichever merge);
// for jsd then every row's second pass, all-reduced too.
template <class T>
void distill_rows<T>::exchange(std::vector<distill_stats>& records) {
  all_reduce_records(*shard_, records, stats_kind_ == distill_kind::kl ? merge_distill_kl : merge_distill_reverse,
                     {0, 2}, inv_t_);
  if (kind_ != grad_kind::jsd) return;
  jsd_.assign(records.size(), jsd_stats{});
  parallel_for(space_.rows, grain_for(C_), [&](std::int64_t begin, std::int64_t end) {
    context c = make_context();
    for (std::int64_t r = begin; r < end; ++r) {
      if (!row_kept(mask_, r)) continue;
      stage(c, r);
      jsd_[static_cast<std::size_t>(r)] = jsd_of(c, records[static_cast<std::size_t>(r)]);
    }
  });
  shard_->all_reduce(reinterpret_cast<double*>(jsd_.data()), static_cast<std::int64_t>(jsd_.size() * 2), 1,
                     merge_sums);
}

template <class T>
double distill_rows<T>::run() {
  auto make = [&] { return make_context(); };
  auto stats_fn = [&](context& c, std::int64_t r) { return stats(c, r); };
  auto finish_fn = [&](context& c, std::int64_t r, const distill_stats& st) { return finish(c, r, st); };
  auto exchange_fn = [&](std::vector<distill_stats>& records) { exchange(records); };
  std::vector<double> row_losses(static_cast<std::size_t>(space_.rows), 0.0);
  // one at a time only with both rows and the gradient used where they are, and no
  // teacher gradient (teacher_gradient_row is one loop over the row)
  const bool piecewise =
      direct_rows<T>(x_op_) && direct_rows<T>(z_op_) && (!g_op_ || direct_rows<T>(*g_op_)) && !gt_op_;
  run_rows<decltype(make), distill_stats>(space_.rows, C_, shard_ != nullptr, piecewise, make, stats_fn, exchange_fn,
                                          finish_fn, row_losses);
  write_row_losses(out_, space_, row_losses);
  return finish_reduction(row_losses, plan_);
}

}  // namespace

template <class T>
double distillation_dense(std::string_view fn, const array_view& student, const array_view& teacher,
                          const distillation_options& options, const outputs& out, const class_shard* shard) {
  distill_rows<T> rows(fn, student, teacher, options, out, shard);
  return rows.run();
}

template double distillation_dense<float>(std::string_view, const array_view&, const array_view&,
                                          const distillation_options&, const outputs&, const class_shard*);
template double distillation_dense<double>(std::string_view, const array_view&, const array_view&,
                                           const distillation_options&, const outputs&, const class_shard*);

}  // namespace softce::detail
