// Element-wise kernels: kl_div (log-probability input) and binary_cross_entropy_with_logits.
//
// Highway's pattern (hwy/examples/skeleton-inl.h): kernels.cpp includes this file once per
// SIMD target (foreach_target.h re-includes kernels.cpp), so the guard below toggles with
// HWY_TARGET_TOGGLE instead of being a plain include guard. Bodies only: the table in
// kernels.cpp points at them, drivers reach them through kernels_for<T>() (kernels.hpp).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "kernels.hpp"
#include "row_stats.hpp"

#if defined(SOFTCE_SRC_ELEMENTWISE_KERNELS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef SOFTCE_SRC_ELEMENTWISE_KERNELS_INL_H_
#undef SOFTCE_SRC_ELEMENTWISE_KERNELS_INL_H_
#else
#define SOFTCE_SRC_ELEMENTWISE_KERNELS_INL_H_
#endif

#include "simd-inl.h"

HWY_BEFORE_NAMESPACE();
namespace softce::detail {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// ---------------------------------------------------------------------------------------
// element-wise losses

// Writes an element-wise kernel's gradient and losses (either pointer may be null) for the
// `count` lanes at offset `at`.
template <class D, class T = hn::TFromD<D>>
HWY_INLINE void StoreElementOutputs(D d, V<D> grad, V<D> loss, T* g, T* losses, size_t at, size_t count) {
  if (count == hn::Lanes(d)) {
    if (g) hn::StoreU(grad, d, g + at);
    if (losses) hn::StoreU(loss, d, losses + at);
  } else {
    if (g) StorePart(grad, d, g + at, count);
    if (losses) StorePart(loss, d, losses + at, count);
  }
}

// The lines a chunk ahead of `at` in the input, the target and a gradient buffer of its
// own (PrefetchNextChunk; without it the loop waits on the target's lines and, in the
// default call, on each fresh gradient line it stores to). softce_bench, 2 threads, Intel
// Xeon AVX-512: kl_div 1024x32000 in place 15.6/16.1 -> 8.75/8.55 ms, default 15.4/15.7
// -> 11.2/10.9 ms; BCE 4096x1000 in place 1.70/1.70 -> 1.66/1.64 ms, default 1.79/1.83 ->
// 1.67/1.67 ms.
template <class T>
HWY_INLINE void PrefetchElementStreams(const T* x, const T* t, const T* g, size_t at) {
  PrefetchNextChunk(x + at);
  PrefetchNextChunk(t + at);
  if (g && g != x) PrefetchNextChunk(g + at);
}

template <class T>
double KlDivElements(const T* x, const T* t, std::int64_t n, bool log_target, T coef, T* g,
                     T* losses) {
  const hn::ScalableTag<T> d;
  const size_t N = hn::Lanes(d);
  const auto zero = hn::Zero(d), vcoef = hn::Set(d, coef);
  double total = 0.0;
  for (std::int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const size_t len = static_cast<size_t>(std::min<std::int64_t>(kChunk, n - c0));
    V<decltype(d)> acc = zero;
    for (size_t i = 0; i < len; i += N) {
      const bool full = i + N <= len;
      const size_t at = static_cast<size_t>(c0) + i;
      PrefetchElementStreams(x, t, g, at);
      const auto xv = full ? hn::LoadU(d, x + at) : LoadPart(d, x + at, len - i, T(0));
      V<decltype(d)> loss, grad;
      if (log_target) {
        const auto tv = full ? hn::LoadU(d, t + at) : LoadPart(d, t + at, len - i, kNegInf<T>);
        const auto p = SafeExp(d, tv);
        loss = hn::IfThenZeroElse(hn::Eq(p, zero), hn::Mul(p, hn::Sub(tv, xv)));
        grad = hn::Neg(p);
      } else {
        const auto tv = full ? hn::LoadU(d, t + at) : LoadPart(d, t + at, len - i, T(0));
        loss = hn::IfThenZeroElse(hn::Eq(tv, zero), hn::Mul(tv, hn::Sub(SafeLog(d, tv), xv)));
        grad = hn::Neg(tv);
      }
      // a NaN input makes the element NaN, gradient included (the formulas above give a
      // zero target 0 and a gradient of -t that never looks at x)
      const auto nan_x = hn::IsNaN(xv);
      loss = hn::IfThenElse(nan_x, xv, loss);
      grad = hn::IfThenElse(nan_x, xv, grad);
      acc = hn::Add(acc, loss);
      StoreElementOutputs(d, hn::Mul(grad, vcoef), loss, g, losses, at, full ? N : len - i);
    }
    total += Total(d, acc);
  }
  return total;
}

template <class T>
double BceElements(const T* x, const T* t, const T* w, const T* pos_w, std::int64_t n, T coef,
                   T* g, T* losses) {
  const hn::ScalableTag<T> d;
  const size_t N = hn::Lanes(d);
  const auto zero = hn::Zero(d), one = hn::Set(d, T(1)), vcoef = hn::Set(d, coef);
  double total = 0.0;
  for (std::int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const size_t len = static_cast<size_t>(std::min<std::int64_t>(kChunk, n - c0));
    V<decltype(d)> acc = zero;
    for (size_t i = 0; i < len; i += N) {
      const bool full = i + N <= len;
      const size_t at = static_cast<size_t>(c0) + i;
      auto load = [&](const T* p, T fill) {
        return full ? hn::LoadU(d, p + at) : LoadPart(d, p + at, len - i, fill);
      };
      PrefetchElementStreams(x, t, g, at);
      const auto xv = load(x, T(0)), tv = load(t, T(0));
      // loss = a softplus(-x) + b softplus(x) with a = pos_weight t, b = 1 - t, written as
      // (a + b) log1p(exp(-|x|)) + (x >= 0 ? b x : -a x): terms of one sign, so no
      // cancellation where the loss is small (t = 0, x << 0), and c x with c = 0 is 0 even
      // where x is infinite (the 0 * inf of a masked logit, x = -inf at t = 0; a NaN x stays
      // NaN through log1p). grad = b sigma(x) - a sigma(-x), both sigmas from one exp.
      const auto e = ExpNonPositive(d, hn::Neg(hn::Abs(xv)));  // exp(-|x|) in [0, 1]
      const auto inv = ReciprocalOneTwo(d, hn::Add(one, e));   // 1 / (1 + e)
      const auto a = pos_w ? hn::Mul(load(pos_w, T(1)), tv) : tv;
      const auto b = hn::Sub(one, tv);
      const auto x_nonneg = hn::Ge(xv, zero);
      const auto c = hn::IfThenElse(x_nonneg, b, hn::Neg(a));
      auto loss = hn::MulAdd(hn::Add(a, b), Log1pUnit(d, e, inv),
                             hn::IfThenZeroElse(hn::Eq(c, zero), hn::Mul(c, xv)));
      const auto e_inv = hn::Mul(e, inv);
      const auto sigma_pos = hn::IfThenElse(x_nonneg, inv, e_inv);  // sigma(x)
      const auto sigma_neg = hn::IfThenElse(x_nonneg, e_inv, inv);  // sigma(-x) = 1 - sigma(x)
      auto grad = hn::NegMulAdd(a, sigma_neg, hn::Mul(b, sigma_pos));
      if (w) {
        const auto wv = load(w, T(0));
        loss = hn::Mul(loss, wv);
        grad = hn::Mul(grad, wv);
      }
      if (!full) loss = hn::IfThenElseZero(hn::FirstN(d, len - i), loss);
      acc = hn::Add(acc, loss);
      StoreElementOutputs(d, hn::Mul(grad, vcoef), loss, g, losses, at, full ? N : len - i);
    }
    total += Total(d, acc);
  }
  return total;
}

}  // namespace HWY_NAMESPACE
}  // namespace softce::detail
HWY_AFTER_NAMESPACE();

#endif  // SOFTCE_SRC_ELEMENTWISE_KERNELS_INL_H_
