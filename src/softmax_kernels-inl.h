// Softmax and cross-entropy row kernels: plain softmax statistics (index and top-k targets,
// the teacher side), probability / one-hot target statistics, and their gradient passes
// (from the logits, or from the exp cache a statistics pass left).
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

#if defined(SOFTCE_SRC_SOFTMAX_KERNELS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef SOFTCE_SRC_SOFTMAX_KERNELS_INL_H_
#undef SOFTCE_SRC_SOFTMAX_KERNELS_INL_H_
#else
#define SOFTCE_SRC_SOFTMAX_KERNELS_INL_H_
#endif

#include "simd-inl.h"

HWY_BEFORE_NAMESPACE();
namespace softce::detail {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// ---------------------------------------------------------------------------------------
// plain softmax statistics (index / top-k targets, teacher side)

template <class T>
softmax_stats SoftmaxRowStats(const T* x, std::int64_t n, T inv_t, exp_cache<T> cache) {
  const hn::ScalableTag<T> d;
  const size_t N = hn::Lanes(d);
  softmax_stats acc{-kInf, 0.0};
  for (std::int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const size_t len = static_cast<size_t>(std::min<std::int64_t>(kChunk, n - c0));
    const T* xc = x + c0;
    const T m = ChunkMax(d, xc, len);
    const auto vshift = hn::Set(d, FiniteShift(m));
    const auto vt = hn::Set(d, inv_t);
    T* ec = cache.e ? cache.e + c0 : nullptr;
    if (cache.shifts) cache.shifts[c0 / kChunk] = FiniteShift(m);
    V<decltype(d)> s0 = hn::Zero(d), s1 = hn::Zero(d);
    const bool own_lines = ec && ec != xc;  // exps into a buffer that is not the logits
    size_t i = 0;
    for (; i + 2 * N <= len; i += 2 * N) {
      PrefetchNextChunk(xc + i);
      PrefetchNextChunk(xc + i + N);
      if (own_lines) {
        PrefetchNextChunk(ec + i);
        PrefetchNextChunk(ec + i + N);
      }
      const auto e0 = ExpNonPositive(d, hn::Mul(hn::Sub(hn::LoadU(d, xc + i), vshift), vt));
      const auto e1 = ExpNonPositive(d, hn::Mul(hn::Sub(hn::LoadU(d, xc + i + N), vshift), vt));
      s0 = hn::Add(s0, e0);
      s1 = hn::Add(s1, e1);
      if (ec) {
        hn::StoreU(e0, d, ec + i);
        hn::StoreU(e1, d, ec + i + N);
      }
    }
    for (; i < len; i += N) {
      const bool full = i + N <= len;
      const auto xv = full ? hn::LoadU(d, xc + i) : LoadPart(d, xc + i, len - i, kNegInf<T>);
      const auto e = ExpNonPositive(d, hn::Mul(hn::Sub(xv, vshift), vt));
      s0 = hn::Add(s0, e);
      if (ec) {
        if (full)
          hn::StoreU(e, d, ec + i);
        else
          StorePart(e, d, ec + i, len - i);
      }
    }
    merge_into(acc, softmax_stats{static_cast<double>(m), Total(d, hn::Add(s0, s1))},
               static_cast<double>(inv_t));
  }
  return acc;
}

// out = factor * in (a chunk of a cache turned into gradient; out may be in).
template <class T>
void ScaleRow(const T* in, std::int64_t n, T factor, T* out) {
  const hn::ScalableTag<T> d;
  const size_t N = hn::Lanes(d);
  const auto vf = hn::Set(d, factor);
  const size_t len = static_cast<size_t>(n);
  size_t i = 0;
  for (; i + N <= len; i += N) hn::StoreU(hn::Mul(hn::LoadU(d, in + i), vf), d, out + i);
  if (i < len) StorePart(hn::Mul(LoadPart(d, in + i, len - i, T(0)), vf), d, out + i, len - i);
}

// ChunkMax over a slice of n <= kChunk elements (the table's chunk_max).
template <class T>
T ChunkMaxOf(const T* x, std::int64_t n) {
  return ChunkMax(hn::ScalableTag<T>(), x, static_cast<size_t>(n));
}

// Σ exp((x - shift) / T) over [begin, end), in chunks (float accumulation within a chunk).
template <class T>
double ExpSumRange(const T* x, std::int64_t begin, std::int64_t end, T inv_t, T shift) {
  const hn::ScalableTag<T> d;
  const size_t N = hn::Lanes(d);
  const auto vshift = hn::Set(d, shift), vt = hn::Set(d, inv_t);
  double total = 0.0;
  for (std::int64_t c0 = begin; c0 < end; c0 += kChunk) {
    const size_t len = static_cast<size_t>(std::min<std::int64_t>(kChunk, end - c0));
    const T* xc = x + c0;
    V<decltype(d)> s = hn::Zero(d);
    for (size_t i = 0; i < len; i += N) {
      const auto xv = i + N <= len ? hn::LoadU(d, xc + i) : LoadPart(d, xc + i, len - i, kNegInf<T>);
      s = hn::Add(s, ExpNonPositive(d, hn::Mul(hn::Sub(xv, vshift), vt)));
    }
    total += Total(d, s);
  }
  return total;
}

template <class T>
double ExpSumExcluding(const T* x, std::int64_t n, T inv_t, T shift, const std::int64_t* excluded,
                       std::int64_t count) {
  double total = 0.0;
  std::int64_t begin = 0;
  for (std::int64_t j = 0; j < count; ++j) {
    total += ExpSumRange(x, begin, excluded[j], inv_t, shift);
    begin = excluded[j] + 1;
  }
  return total + ExpSumRange(x, begin, n, inv_t, shift);
}

template <class T>
void SoftmaxRowGrad(const T* x, std::int64_t n, T inv_t, row_normaliser<T> norm, T scale, T* g) {
  const hn::ScalableTag<T> d;
  const size_t N = hn::Lanes(d);
  const auto vshift = hn::Set(d, norm.shift), vls = hn::Set(d, norm.log_sum);
  const auto vt = hn::Set(d, inv_t), vscale = hn::Set(d, scale);
  const size_t len = static_cast<size_t>(n);
  size_t i = 0;
  for (; i + N <= len; i += N) {
    const auto q = ExpNonPositive(d, hn::Sub(hn::Mul(hn::Sub(hn::LoadU(d, x + i), vshift), vt), vls));
    hn::StoreU(hn::Mul(q, vscale), d, g + i);
  }
  if (i < len) {
    const auto xv = LoadPart(d, x + i, len - i, kNegInf<T>);
    const auto q = ExpNonPositive(d, hn::Sub(hn::Mul(hn::Sub(xv, vshift), vt), vls));
    StorePart(hn::Mul(q, vscale), d, g + i, len - i);
  }
}

// ---------------------------------------------------------------------------------------
// probability / one-hot targets

// w * t' for the lanes starting at i (lanes at or past r are 0 when kTail).
template <bool kTail, class D, class T = hn::TFromD<D>>
HWY_INLINE V<D> WeightedTarget(D d, const target_desc<T>& t, size_t i, size_t r) {
  const size_t N = hn::Lanes(d);
  V<D> tv;
  if (t.dense) {
    tv = kTail ? LoadPart(d, t.dense + i, r, T(0)) : hn::LoadU(d, t.dense + i);
  } else {
    tv = hn::Zero(d);
    const std::int64_t rel = t.onehot - static_cast<std::int64_t>(i);
    if (t.onehot >= 0 && rel >= 0 && rel < static_cast<std::int64_t>(N)) {
      const hn::RebindToSigned<D> di;
      using TI = hn::TFromD<decltype(di)>;
      const auto hit = hn::RebindMask(d, hn::Eq(hn::Iota(di, TI(0)), hn::Set(di, static_cast<TI>(rel))));
      tv = hn::IfThenElseZero(hit, hn::Set(d, T(1)));
    }
  }
  V<D> wt = hn::MulAdd(tv, hn::Set(d, t.keep), hn::Set(d, t.add));
  if (t.weight)
    wt = hn::Mul(wt, kTail ? LoadPart(d, t.weight + i, r, T(0)) : hn::LoadU(d, t.weight + i));
  if (kTail) wt = hn::IfThenElseZero(hn::FirstN(d, r), wt);
  return wt;
}

template <class T>
target_stats TargetRowStats(const T* x, std::int64_t n, const target_desc<T>& t, exp_cache<T> cache) {
  const hn::ScalableTag<T> d;
  const size_t N = hn::Lanes(d);
  target_stats acc{-kInf, 0.0, 0.0, 0.0};
  for (std::int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const size_t len = static_cast<size_t>(std::min<std::int64_t>(kChunk, n - c0));
    const T* xc = x + c0;
    // the target descriptor, moved to this chunk
    target_desc<T> tc = t;
    if (t.dense) tc.dense = t.dense + c0;
    if (t.weight) tc.weight = t.weight + c0;
    if (t.onehot >= 0) tc.onehot = t.onehot - c0;
    const T m = ChunkMax(d, xc, len);
    const auto vshift = hn::Set(d, FiniteShift(m));
    const auto zero = hn::Zero(d);
    T* ec = cache.e ? cache.e + c0 : nullptr;
    if (cache.shifts) cache.shifts[c0 / kChunk] = FiniteShift(m);
    V<decltype(d)> vs = zero, va = zero, vb = zero;
    const bool own_lines = ec && ec != xc;  // exps into a buffer that is not the logits
    size_t i = 0;
    for (; i + N <= len; i += N) {
      PrefetchNextChunk(xc + i);
      if (tc.dense) PrefetchNextChunk(tc.dense + i);
      if (own_lines) PrefetchNextChunk(ec + i);
      const auto diff = hn::Sub(hn::LoadU(d, xc + i), vshift);
      const auto wt = WeightedTarget<false>(d, tc, i, N);
      const auto e = ExpNonPositive(d, diff);
      vs = hn::Add(vs, e);
      va = hn::Add(va, wt);
      vb = AddWhereWeighted(d, vb, wt, diff);
      if (ec) hn::StoreU(e, d, ec + i);
    }
    if (i < len) {
      const auto diff = hn::Sub(LoadPart(d, xc + i, len - i, kNegInf<T>), vshift);
      const auto wt = WeightedTarget<true>(d, tc, i, len - i);
      const auto e = ExpNonPositive(d, diff);
      vs = hn::Add(vs, e);
      va = hn::Add(va, wt);
      vb = AddWhereWeighted(d, vb, wt, diff);
      if (ec) StorePart(e, d, ec + i, len - i);
    }
    // b was taken against FiniteShift(m); for m = -inf that is 0 and b is 0 or -inf.
    merge_into(acc, target_stats{static_cast<double>(m), Total(d, vs), Total(d, va), Total(d, vb)});
  }
  return acc;
}

template <class T>
void TargetRowGrad(const T* x, std::int64_t n, const target_desc<T>& t, row_normaliser<T> norm,
                   T a, T coef, T* g) {
  const hn::ScalableTag<T> d;
  const size_t N = hn::Lanes(d);
  const auto vshift = hn::Set(d, norm.shift), vls = hn::Set(d, norm.log_sum);
  const auto va = hn::Set(d, a), vcoef = hn::Set(d, coef);
  const size_t len = static_cast<size_t>(n);
  size_t i = 0;
  for (; i + N <= len; i += N) {
    const auto q = ExpNonPositive(d, hn::Sub(hn::Sub(hn::LoadU(d, x + i), vshift), vls));
    const auto wt = WeightedTarget<false>(d, t, i, N);
    hn::StoreU(hn::Mul(vcoef, hn::MulSub(q, va, wt)), d, g + i);
  }
  if (i < len) {
    const auto q = ExpNonPositive(d, hn::Sub(hn::Sub(LoadPart(d, x + i, len - i, kNegInf<T>), vshift), vls));
    const auto wt = WeightedTarget<true>(d, t, i, len - i);
    StorePart(hn::Mul(vcoef, hn::MulSub(q, va, wt)), d, g + i, len - i);
  }
}


template <class T>
void TargetRowGradCached(exp_cache<T> cache, std::int64_t n, const target_desc<T>& t, row_normaliser<T> norm, T a,
                         T coef, T* g) {
  const hn::ScalableTag<T> d;
  const size_t N = hn::Lanes(d);
  const auto va = hn::Set(d, a), vcoef = hn::Set(d, coef);
  for (std::int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const size_t len = static_cast<size_t>(std::min<std::int64_t>(kChunk, n - c0));
    const auto vf = hn::Set(d, ChunkFactor(cache.shifts[c0 / kChunk], norm, T(1)));
    target_desc<T> tc = t;
    if (t.dense) tc.dense = t.dense + c0;
    if (t.weight) tc.weight = t.weight + c0;
    if (t.onehot >= 0) tc.onehot = t.onehot - c0;
    const T* ec = cache.e + c0;
    T* gc = g + c0;
    const size_t i = WholeVectors(
        len, N, LongRowPiece(n),
        [&](size_t j) {
          PrefetchNextChunk(ec + j);
          if (tc.dense) PrefetchNextChunk(tc.dense + j);
        },
        [&](size_t j) {
          const auto q = hn::Mul(hn::LoadU(d, ec + j), vf);
          hn::StoreU(hn::Mul(vcoef, hn::MulSub(q, va, WeightedTarget<false>(d, tc, j, N))), d, gc + j);
        });
    if (i < len) {
      const auto q = hn::Mul(LoadPart(d, ec + i, len - i, T(0)), vf);
      const auto wt = WeightedTarget<true>(d, tc, i, len - i);
      StorePart(hn::Mul(vcoef, hn::MulSub(q, va, wt)), d, gc + i, len - i);
    }
  }
}

// Rows of n <= Lanes classes (one vector per row: C = 10 on AVX-512), all of a block's rows
// in one call: statistics, loss and gradient of a row from registers, with no exp cache, no
// chunk loop and no call per row. Targets: dense rows t (labels null), or class indices
// `labels` (t null; a negative label is an ignored row: loss 0, gradient 0) with torch's
// nll_loss weighting when `own_class_weight` (no smoothing: a row uses w_y alone, as
// keep). The statistics are exactly TargetRowStats' for a one-chunk row and the loss and
// poisoning rules are the driver's (ce_row_loss, ce_row_poisoned, normaliser,
// ChunkFactor), so the results are bit for bit those of the row-by-row path. losses[r]
// gets the row's loss; g (may be x: a row is read before it is written) gets
// coef (q a - w t'), NaN for a poisoned row.
template <class T>
void SmallTargetRows(const T* x, std::int64_t x_stride, const T* t, std::int64_t t_stride,
                     const std::int64_t* labels, bool own_class_weight, const T* weight, std::int64_t rows,
                     std::int64_t n, T keep, T add, T coef, T* g, std::int64_t g_stride, double* losses) {
  const hn::ScalableTag<T> d;
  const size_t len = static_cast<size_t>(n);
  const auto zero = hn::Zero(d), vcoef = hn::Set(d, coef);
  target_desc<T> desc{};
  desc.weight = labels && own_class_weight ? nullptr : weight;
  desc.keep = keep;
  desc.add = add;
  for (std::int64_t r = 0; r < rows; ++r) {
    T* gr = g ? g + r * g_stride : nullptr;
    if (labels) {
      const std::int64_t y = labels[r];
      if (y < 0) {  // an ignored row
        losses[r] = 0.0;
        if (gr) StorePart(zero, d, gr, len);
        continue;
      }
      desc.onehot = y;
      if (own_class_weight) desc.keep = weight ? weight[y] : T(1);
    } else {
      desc.dense = t + r * t_stride;
    }
    const auto xv = LoadPart(d, x + r * x_stride, len, kNegInf<T>);
    const auto wt = WeightedTarget<true>(d, desc, 0, len);
    const T m = hn::GetLane(hn::MaxOfLanes(d, xv));
    const auto diff = hn::Sub(xv, hn::Set(d, FiniteShift(m)));
    const auto e = ExpNonPositive(d, diff);
    const target_stats st{static_cast<double>(m), Total(d, e), Total(d, wt),
                          Total(d, AddWhereWeighted(d, zero, wt, diff))};
    if (ce_row_poisoned(st)) {
      losses[r] = std::numeric_limits<double>::quiet_NaN();
      if (gr) StorePart(hn::Set(d, std::numeric_limits<T>::quiet_NaN()), d, gr, len);
      continue;
    }
    // the normaliser's: an all -inf row (sum 0) has q = 0 (coef (0 a - w t'), +0 where
    // w t' = 0, as the row-by-row path); otherwise one log serves the loss and the factor
    // (ce_row_loss and normaliser<T> take it twice), and the factor is ChunkFactor's for the
    // row's one chunk, bit for bit, so that a one-hot row stays bitwise the index path's
    T factor = T(0);
    if (st.sum == 0.0 || m == kNegInf<T>) {
      losses[r] = ce_row_loss(st);
    } else {
      const double log_sum = std::log(st.sum);
      losses[r] = ce_loss_from_log(st.a, log_sum, st.b);
      factor = ChunkFactor(FiniteShift(m), row_normaliser<T>{m, static_cast<T>(log_sum)}, T(1));
    }
    if (!gr) continue;
    const auto q = hn::Mul(e, hn::Set(d, factor));
    StorePart(hn::Mul(vcoef, hn::MulSub(q, hn::Set(d, static_cast<T>(st.a)), wt)), d, gr, len);
  }
}

template <class T>
std::int64_t SmallRowClasses() {
  return static_cast<std::int64_t>(hn::Lanes(hn::ScalableTag<T>()));
}

// g = scale * q from the cache of a SoftmaxRowStats pass (q = e * ChunkFactor); g may be
// cache.e itself.
template <class T>
void SoftmaxRowGradCached(exp_cache<T> cache, std::int64_t n, T inv_t, row_normaliser<T> norm, T scale, T* g) {
  const hn::ScalableTag<T> d;
  const size_t N = hn::Lanes(d);
  for (std::int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const size_t len = static_cast<size_t>(std::min<std::int64_t>(kChunk, n - c0));
    const auto vf = hn::Set(d, static_cast<T>(static_cast<double>(ChunkFactor(cache.shifts[c0 / kChunk], norm, inv_t)) *
                                              static_cast<double>(scale)));
    const T* ec = cache.e + c0;
    T* gc = g + c0;
    const size_t i = WholeVectors(
        len, N, LongRowPiece(n), [&](size_t j) { PrefetchNextChunk(ec + j); },
        [&](size_t j) { hn::StoreU(hn::Mul(hn::LoadU(d, ec + j), vf), d, gc + j); });
    if (i < len) StorePart(hn::Mul(LoadPart(d, ec + i, len - i, T(0)), vf), d, gc + i, len - i);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace softce::detail
HWY_AFTER_NAMESPACE();

#endif  // SOFTCE_SRC_SOFTMAX_KERNELS_INL_H_
