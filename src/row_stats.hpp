// The row-statistics monoid: exact merging of partial softmax statistics (online softmax).
//
// A partial statistic keeps `shift` = the max of its slice (-inf for an empty or all -inf
// slice), `sum` = Σ exp((x - shift) / T), and moments. Merging rescales both sides to the
// larger shift. Moments of the form Σ w (x - shift) are moved to the new shift by adding
// a * (old - new); a slice with a = 0 contributes nothing, and an all -inf slice already
// holds 0 or -inf there, so no 0 * inf appears. Used by the kernels (chunk by chunk), the
// driver (pieces of long rows) and the class-parallel all-reduce (shard by shard).
//
// NaN: a NaN or +inf logit makes its slice's `sum` NaN (the kernels let NaN through exp,
// and +inf - +inf is NaN). The merges keep a NaN sum NaN whatever the shifts are (std::fmax
// drops a NaN shift, and an all -inf side would otherwise skip the other side's sum), so
// the driver sees a poisoned row as a NaN sum and makes its loss and gradient NaN.
#pragma once

#include <cmath>
#include <limits>

#include "kernels.hpp"

namespace softce::detail {

inline constexpr double kInf = std::numeric_limits<double>::infinity();
inline constexpr double kNaNValue = std::numeric_limits<double>::quiet_NaN();

// exp((from - to) * inv_t) for a shift `from` moving to `to` >= from; 0 for from = -inf.
inline double rescale(double from, double to, double inv_t) {
  if (from == -kInf) return 0.0;
  if (from == to) return 1.0;  // the common case (one chunk, or the max's own chunk): no exp
  return std::exp((from - to) * inv_t);
}

inline void merge_into(softmax_stats& acc, const softmax_stats& part, double inv_t) {
  if (std::isnan(acc.sum) || std::isnan(part.sum)) {
    acc.sum = kNaNValue;
    return;
  }
  double shift = std::fmax(acc.shift, part.shift);
  if (shift == -kInf) return;  // both all -inf: sums stay 0
  acc.sum = acc.sum * rescale(acc.shift, shift, inv_t) + part.sum * rescale(part.shift, shift, inv_t);
  acc.shift = shift;
}

inline void move_moment(double& b, double a, double from, double to) {
  if (a != 0.0 && from != -kInf) b += a * (from - to);
}

inline void merge_into(target_stats& acc, const target_stats& part) {
  if (std::isnan(acc.sum) || std::isnan(part.sum)) {
    acc.sum = acc.b = kNaNValue;
    acc.a += part.a;
    return;
  }
  double shift = std::fmax(acc.shift, part.shift);
  double b_acc = acc.b, b_part = part.b;
  if (shift != -kInf) {
    move_moment(b_acc, acc.a, acc.shift, shift);
    move_moment(b_part, part.a, part.shift, shift);
    acc.sum = acc.sum * rescale(acc.shift, shift, 1.0) + part.sum * rescale(part.shift, shift, 1.0);
  }
  acc.shift = shift;
  acc.a += part.a;
  acc.b = b_acc + b_part;
}

// distill_stats.k is Σ e_ref (d_ref - d_other) where "ref" is the teacher for kl and the
// student for reverse_kl: it scales like the ref sum and shifts with both shifts.
inline void merge_into(distill_stats& acc, const distill_stats& part, double inv_t,
                       distill_kind kind) {
  if (std::isnan(acc.sum_x) || std::isnan(acc.sum_z) || std::isnan(part.sum_x) || std::isnan(part.sum_z)) {
    acc.sum_x = acc.sum_z = acc.k = kNaNValue;
    return;
  }
  double sx = std::fmax(acc.shift_x, part.shift_x), sz = std::fmax(acc.shift_z, part.shift_z);
  auto moved_k = [&](const distill_stats& s) {
    if (kind == distill_kind::none) return 0.0;
    double ref_sum = kind == distill_kind::kl ? s.sum_z : s.sum_x;
    if (ref_sum == 0.0) return 0.0;
    double dz = s.shift_z == -kInf ? 0.0 : (s.shift_z - sz) * inv_t;
    double dx = s.shift_x == -kInf ? 0.0 : (s.shift_x - sx) * inv_t;
    double factor = kind == distill_kind::kl ? rescale(s.shift_z, sz, inv_t) : rescale(s.shift_x, sx, inv_t);
    double delta = kind == distill_kind::kl ? dz - dx : dx - dz;
    return factor * (s.k + ref_sum * delta);
  };
  double k = moved_k(acc) + moved_k(part);
  if (sx != -kInf)
    acc.sum_x = acc.sum_x * rescale(acc.shift_x, sx, inv_t) + part.sum_x * rescale(part.shift_x, sx, inv_t);
  if (sz != -kInf)
    acc.sum_z = acc.sum_z * rescale(acc.shift_z, sz, inv_t) + part.sum_z * rescale(part.shift_z, sz, inv_t);
  acc.shift_x = sx;
  acc.shift_z = sz;
  acc.k = k;
}

// A row is poisoned (loss and whole gradient row NaN, as in PyTorch) when a NaN or +inf
// logit reached it (the statistics' sum is NaN then, see row_stats.hpp) or a weighted
// target that is not finite (NaN or infinite target or class weight: Σ w t' is not finite).
inline bool ce_row_poisoned(const target_stats& st) { return std::isnan(st.sum) || !std::isfinite(st.a); }

// a log(sum) - b, out of line (row_driver.cpp): one rounding for every caller, the kernels
// compiled per SIMD target included (inline there, the compiler would fuse it into an FMA).
double ce_loss_from_log(double a, double log_sum, double b);

// CE row loss from merged statistics: Σ w t' (lse - x) = a log(sum) - b.
inline double ce_row_loss(const target_stats& st) {
  if (st.sum == 0.0 || st.shift == -kInf) return st.a > 0.0 ? kInf : 0.0;
  return ce_loss_from_log(st.a, std::log(st.sum), st.b);
}

// The normaliser the gradient kernels use: log q = (x - shift) * inv_t - log_sum. For an
// all -inf row (sum = 0) q is defined as 0: shift 0 and log_sum = +inf give exp(-inf) = 0.
template <class T>
inline row_normaliser<T> normaliser(double shift, double sum) {
  if (sum == 0.0 || shift == -kInf)
    return {T(0), std::numeric_limits<T>::infinity()};
  return {static_cast<T>(shift), static_cast<T>(std::log(sum))};
}

}  // namespace softce::detail
