// Distillation row kernels (dense teacher logits): the joint statistics pass, the JSD's
// second pass, and the kl / reverse_kl / jsd gradient passes.
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

#if defined(SOFTCE_SRC_DISTILL_KERNELS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef SOFTCE_SRC_DISTILL_KERNELS_INL_H_
#undef SOFTCE_SRC_DISTILL_KERNELS_INL_H_
#else
#define SOFTCE_SRC_DISTILL_KERNELS_INL_H_
#endif

#include "simd-inl.h"

HWY_BEFORE_NAMESPACE();
namespace softce::detail {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// ---------------------------------------------------------------------------------------
// distillation (dense teacher logits)

// One vector of the joint statistics pass: the exps (cached when kCache), their sums, and
// k's term. p = 0 only at z = -inf: a p that underflowed in float against q = 0 gives
// 0 * inf = NaN, which the driver reads as KL = +inf (likewise for q in reverse KL). k's
// term is one fused multiply-add, skipped (not zeroed and added) in the excluded lanes.
template <distill_kind kKind, bool kCache, bool kFull, class D, class T = hn::TFromD<D>>
HWY_INLINE void DistillStatsVector(D d, const T* xp, const T* zp, size_t r, V<D> vsx, V<D> vsz, V<D> vt, V<D>& sx,
                                   V<D>& sz, V<D>& vk, T* ex, T* ez) {
  const auto xv = kFull ? hn::LoadU(d, xp) : LoadPart(d, xp, r, kNegInf<T>);
  const auto zv = kFull ? hn::LoadU(d, zp) : LoadPart(d, zp, r, kNegInf<T>);
  const auto dx = hn::Mul(hn::Sub(xv, vsx), vt), dz = hn::Mul(hn::Sub(zv, vsz), vt);
  const auto ex_v = ExpNonPositive(d, dx), ez_v = ExpNonPositive(d, dz);
  sx = hn::Add(sx, ex_v);
  sz = hn::Add(sz, ez_v);
  if constexpr (kCache) {
    // reverse_kl caches dx - dz in place of the teacher's exps: its gradient needs
    // log q - log p, not p (DistillRowGradReverseCached)
    const auto second = kKind == distill_kind::reverse_kl ? hn::Sub(dx, dz) : ez_v;
    if (kFull) {
      hn::StoreU(ex_v, d, ex);
      hn::StoreU(second, d, ez);
    } else {
      StorePart(ex_v, d, ex, r);
      StorePart(second, d, ez, r);
    }
  }
  const auto vneg_inf = hn::Set(d, kNegInf<T>);
  if constexpr (kKind == distill_kind::kl)
    vk = hn::IfThenElse(hn::Eq(zv, vneg_inf), vk, hn::MulAdd(ez_v, hn::Sub(dz, dx), vk));
  else if constexpr (kKind == distill_kind::reverse_kl)
    vk = hn::IfThenElse(hn::Eq(xv, vneg_inf), vk, hn::MulAdd(ex_v, hn::Sub(dx, dz), vk));
  else
    (void)vk;
}

template <distill_kind kKind, bool kCache, class T>
distill_stats DistillRowStatsImpl(const T* x, const T* z, std::int64_t n, T inv_t, exp_cache<T> cx, exp_cache<T> cz) {
  const hn::ScalableTag<T> d;
  const size_t N = hn::Lanes(d);
  distill_stats acc{-kInf, 0.0, -kInf, 0.0, 0.0};
  const auto vt = hn::Set(d, inv_t);
  for (std::int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const size_t len = static_cast<size_t>(std::min<std::int64_t>(kChunk, n - c0));
    const T* xc = x + c0;
    const T* zc = z + c0;
    const T mx = ChunkMax(d, xc, len), mz = ChunkMax(d, zc, len);
    const auto vsx = hn::Set(d, FiniteShift(mx)), vsz = hn::Set(d, FiniteShift(mz));
    if (cx.shifts) cx.shifts[c0 / kChunk] = FiniteShift(mx);
    if (cz.shifts) cz.shifts[c0 / kChunk] = FiniteShift(mz);
    T* exc = kCache ? cx.e + c0 : nullptr;
    T* ezc = kCache ? cz.e + c0 : nullptr;
    V<decltype(d)> sx = hn::Zero(d), sz = hn::Zero(d), vk = hn::Zero(d);
    size_t i = 0;
    // the student's exps go to lines of their own (a gradient buffer that is not the
    // logits): fetched ahead for writing too
    const bool own_lines = kCache && exc != xc;
    for (; i + N <= len; i += N) {
      PrefetchNextChunk(xc + i);
      PrefetchNextChunk(zc + i);
      if (own_lines) PrefetchNextChunk(exc + i);
      DistillStatsVector<kKind, kCache, true>(d, xc + i, zc + i, N, vsx, vsz, vt, sx, sz, vk, kCache ? exc + i : nullptr,
                                              kCache ? ezc + i : nullptr);
    }
    if (i < len)
      DistillStatsVector<kKind, kCache, false>(d, xc + i, zc + i, len - i, vsx, vsz, vt, sx, sz, vk,
                                               kCache ? exc + i : nullptr, kCache ? ezc + i : nullptr);
    merge_into(acc,
               distill_stats{static_cast<double>(mx), Total(d, sx), static_cast<double>(mz), Total(d, sz),
                             Total(d, vk)},
               static_cast<double>(inv_t), kKind);
  }
  return acc;
}

template <class T>
distill_stats DistillRowStats(const T* x, const T* z, std::int64_t n, T inv_t, distill_kind kind, exp_cache<T> cx,
                              exp_cache<T> cz) {
  const bool cache = cx.e != nullptr;
  if (kind == distill_kind::kl)
    return cache ? DistillRowStatsImpl<distill_kind::kl, true>(x, z, n, inv_t, cx, cz)
                 : DistillRowStatsImpl<distill_kind::kl, false>(x, z, n, inv_t, cx, cz);
  if (kind == distill_kind::reverse_kl)
    return cache ? DistillRowStatsImpl<distill_kind::reverse_kl, true>(x, z, n, inv_t, cx, cz)
                 : DistillRowStatsImpl<distill_kind::reverse_kl, false>(x, z, n, inv_t, cx, cz);
  return cache ? DistillRowStatsImpl<distill_kind::none, true>(x, z, n, inv_t, cx, cz)
               : DistillRowStatsImpl<distill_kind::none, false>(x, z, n, inv_t, cx, cz);
}

// log m for m = beta p + (1 - beta) q, from log p and log q (logaddexp): stays finite where
// beta p or (1 - beta) q underflow although p or q is still positive.
template <class D>
HWY_INLINE V<D> LogMixture(D d, V<D> lp, V<D> lq, V<D> log_beta, V<D> log_beta1) {
  const auto a = hn::Add(lp, log_beta), b = hn::Add(lq, log_beta1);
  const auto hi = hn::Max(a, b);
  const auto lo = hn::Min(a, b);
  // hi = -inf (both zero): -inf; otherwise hi + log1p(exp(lo - hi))
  const auto tail = hn::Log1p(d, ExpNonPositive(d, hn::Sub(lo, hi)));
  return hn::IfThenElse(hn::Eq(hi, hn::Set(d, kNegInf<hn::TFromD<D>>)), hi, hn::Add(hi, tail));
}

template <class T>
jsd_stats JsdRowStats(const T* x, const T* z, std::int64_t n, T inv_t, row_normaliser<T> nx,
                      row_normaliser<T> nz, T beta) {
  const hn::ScalableTag<T> d;
  const size_t N = hn::Lanes(d);
  const auto vt = hn::Set(d, inv_t);
  const auto vsx = hn::Set(d, nx.shift), vlx = hn::Set(d, nx.log_sum);
  const auto vsz = hn::Set(d, nz.shift), vlz = hn::Set(d, nz.log_sum);
  const auto vlbeta = hn::Set(d, std::log(beta)), vlbeta1 = hn::Set(d, std::log1p(-beta));
  const auto zero = hn::Zero(d);
  jsd_stats acc;
  for (std::int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const size_t len = static_cast<size_t>(std::min<std::int64_t>(kChunk, n - c0));
    V<decltype(d)> kp = zero, kq = zero;
    for (size_t i = 0; i < len; i += N) {
      const bool full = i + N <= len;
      const T* xp = x + c0 + i;
      const T* zp = z + c0 + i;
      const auto xv = full ? hn::LoadU(d, xp) : LoadPart(d, xp, len - i, kNegInf<T>);
      const auto zv = full ? hn::LoadU(d, zp) : LoadPart(d, zp, len - i, kNegInf<T>);
      const auto lq = hn::Sub(hn::Mul(hn::Sub(xv, vsx), vt), vlx);
      const auto lp = hn::Sub(hn::Mul(hn::Sub(zv, vsz), vt), vlz);
      const auto q = ExpNonPositive(d, lq), p = ExpNonPositive(d, lp);
      const auto lm = LogMixture(d, lp, lq, vlbeta, vlbeta1);
      kp = hn::Add(kp, hn::IfThenZeroElse(hn::Eq(p, zero), hn::Mul(p, hn::Sub(lp, lm))));
      kq = hn::Add(kq, hn::IfThenZeroElse(hn::Eq(q, zero), hn::Mul(q, hn::Sub(lq, lm))));
    }
    acc.kl_pm += Total(d, kp);
    acc.kl_qm += Total(d, kq);
  }
  return acc;
}

template <class T>
void DistillRowGrad(const T* x, const T* z, std::int64_t n, T inv_t, row_normaliser<T> nx,
                    row_normaliser<T> nz, grad_kind kind, T beta, T r, T coef, T* g) {
  const hn::ScalableTag<T> d;
  const size_t N = hn::Lanes(d);
  const auto vt = hn::Set(d, inv_t);
  const auto vsx = hn::Set(d, nx.shift), vlx = hn::Set(d, nx.log_sum);
  const auto vsz = hn::Set(d, nz.shift), vlz = hn::Set(d, nz.log_sum);
  // log beta and log(1 - beta); only jsd (0 < beta < 1) uses them
  const auto vlbeta = hn::Set(d, kind == grad_kind::jsd ? std::log(beta) : T(0));
  const auto vlbeta1 = hn::Set(d, kind == grad_kind::jsd ? std::log1p(-beta) : T(0));
  const auto vr = hn::Set(d, r), vcoef = hn::Set(d, coef);
  const auto zero = hn::Zero(d);
  const size_t len = static_cast<size_t>(n);
  for (size_t i = 0; i < len; i += N) {
    const bool full = i + N <= len;
    const auto xv = full ? hn::LoadU(d, x + i) : LoadPart(d, x + i, len - i, kNegInf<T>);
    const auto zv = full ? hn::LoadU(d, z + i) : LoadPart(d, z + i, len - i, kNegInf<T>);
    const auto lq = hn::Sub(hn::Mul(hn::Sub(xv, vsx), vt), vlx);
    const auto lp = hn::Sub(hn::Mul(hn::Sub(zv, vsz), vt), vlz);
    const auto q = ExpNonPositive(d, lq);
    V<decltype(d)> gv;
    if (kind == grad_kind::kl) {
      gv = hn::Sub(q, ExpNonPositive(d, lp));
    } else {
      const auto lref = kind == grad_kind::reverse_kl ? lp : LogMixture(d, lp, lq, vlbeta, vlbeta1);
      gv = hn::IfThenZeroElse(hn::Eq(q, zero), hn::Mul(q, hn::Sub(hn::Sub(lq, lref), vr)));
    }
    gv = hn::Mul(gv, vcoef);
    if (full)
      hn::StoreU(gv, d, g + i);
    else
      StorePart(gv, d, g + i, len - i);
  }
}

// g = coef (q - p) = ex (coef fx) - ez (coef fz): the chunk factors carry coef, so an element
// costs one multiply and one multiply-add.
template <class T>
void DistillRowGradKlCached(exp_cache<T> cx, exp_cache<T> cz, std::int64_t n, T inv_t, row_normaliser<T> nx,
                            row_normaliser<T> nz, T coef, T* g) {
  const hn::ScalableTag<T> d;
  const size_t N = hn::Lanes(d);
  for (std::int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const size_t len = static_cast<size_t>(std::min<std::int64_t>(kChunk, n - c0));
    const auto fx = hn::Set(d, coef * ChunkFactor(cx.shifts[c0 / kChunk], nx, inv_t));
    const auto fz = hn::Set(d, coef * ChunkFactor(cz.shifts[c0 / kChunk], nz, inv_t));
    const T* ex = cx.e + c0;
    const T* ez = cz.e + c0;
    T* gc = g + c0;
    const size_t i = WholeVectors(
        len, N, LongRowPiece(n),
        [&](size_t j) {
          PrefetchNextChunk(ex + j);
          PrefetchNextChunk(ez + j);
        },
        [&](size_t j) { hn::StoreU(hn::NegMulAdd(hn::LoadU(d, ez + j), fz, hn::Mul(hn::LoadU(d, ex + j), fx)), d, gc + j); });
    if (i < len) {
      const auto q = hn::Mul(LoadPart(d, ex + i, len - i, T(0)), fx);
      StorePart(hn::NegMulAdd(LoadPart(d, ez + i, len - i, T(0)), fz, q), d, gc + i, len - i);
    }
  }
}

// JSD's second pass from the statistics pass's exp caches (no exp per element): p and q
// are the cached exps times their chunk factors, log p and log q come from the logits, and
// log m = log(beta p + (1 - beta) q) is one log per element (LogNormal: no division on
// AVX-512). Where m is below the smallest normal float (beta p and (1 - beta) q underflowing
// while p or q is positive) the vector takes LogMixture's log-space path instead, so log m
// stays finite and exact there. Writes log q - log m to `log_ratio` (what the gradient pass
// needs: it then reads neither the logits nor log m; it may be cz.e: each ez is read first).
template <class T>
jsd_stats JsdRowStatsCached(const T* x, const T* z, exp_cache<T> cx, exp_cache<T> cz, std::int64_t n, T inv_t,
                            row_normaliser<T> nx, row_normaliser<T> nz, T beta, T* log_ratio) {
  const hn::ScalableTag<T> d;
  const size_t N = hn::Lanes(d);
  const auto vt = hn::Set(d, inv_t);
  // log q = (x - shift) / T - log_sum as one multiply-add (likewise log p)
  const auto vsx = hn::Set(d, nx.shift), vnlx = hn::Set(d, -nx.log_sum);
  const auto vsz = hn::Set(d, nz.shift), vnlz = hn::Set(d, -nz.log_sum);
  const auto vbeta = hn::Set(d, beta), vbeta1 = hn::Set(d, T(1) - beta);
  const auto vlbeta = hn::Set(d, std::log(beta)), vlbeta1 = hn::Set(d, std::log1p(-beta));
  const auto smallest = hn::Set(d, std::numeric_limits<T>::min());
  const auto zero = hn::Zero(d);
  jsd_stats acc;
  for (std::int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const size_t len = static_cast<size_t>(std::min<std::int64_t>(kChunk, n - c0));
    const auto fx = hn::Set(d, ChunkFactor(cx.shifts[c0 / kChunk], nx, inv_t));
    const auto fz = hn::Set(d, ChunkFactor(cz.shifts[c0 / kChunk], nz, inv_t));
    V<decltype(d)> kp = zero, kq = zero;
    // kFull: a whole vector at `at`; otherwise the r < N lanes left
    auto step = [&](auto full_tag, size_t at, size_t r) HWY_ATTR {
      constexpr bool kFull = decltype(full_tag)::value;
      const auto xv = kFull ? hn::LoadU(d, x + at) : LoadPart(d, x + at, r, kNegInf<T>);
      const auto zv = kFull ? hn::LoadU(d, z + at) : LoadPart(d, z + at, r, kNegInf<T>);
      const auto q = hn::Mul(kFull ? hn::LoadU(d, cx.e + at) : LoadPart(d, cx.e + at, r, T(0)), fx);
      const auto p = hn::Mul(kFull ? hn::LoadU(d, cz.e + at) : LoadPart(d, cz.e + at, r, T(0)), fz);
      const auto lq = hn::MulAdd(hn::Sub(xv, vsx), vt, vnlx);
      const auto lp = hn::MulAdd(hn::Sub(zv, vsz), vt, vnlz);
      const auto m = hn::MulAdd(vbeta, p, hn::Mul(vbeta1, q));
      const auto small = hn::Lt(m, smallest);
      auto lm = LogNormal(d, hn::Max(m, smallest));
      if (!hn::AllFalse(d, small)) lm = hn::IfThenElse(small, LogMixture(d, lp, lq, vlbeta, vlbeta1), lm);
      // p (log p - log m) and q (log q - log m), skipped where p or q is 0 (0 * -inf)
      const auto ratio_q = hn::Sub(lq, lm);
      kp = hn::IfThenElse(hn::Eq(p, zero), kp, hn::MulAdd(p, hn::Sub(lp, lm), kp));
      kq = hn::IfThenElse(hn::Eq(q, zero), kq, hn::MulAdd(q, ratio_q, kq));
      if (kFull)
        hn::StoreU(ratio_q, d, log_ratio + at);
      else
        StorePart(ratio_q, d, log_ratio + at, r);
    };
    size_t i = 0;
    for (; i + N <= len; i += N) step(std::true_type(), static_cast<size_t>(c0) + i, N);
    if (i < len) step(std::false_type(), static_cast<size_t>(c0) + i, len - i);
    acc.kl_pm += Total(d, kp);
    acc.kl_qm += Total(d, kq);
  }
  return acc;
}

// reverse_kl / jsd gradient from the student's exp cache (no exp per element):
// g = coef q (log q - log ref - r), q = cached exp times its chunk factor. reverse_kl
// (log_ratio null): log q from x, log ref = log p from z; jsd: log q - log m is the JSD
// pass's log_ratio (x and z are not read). g may be x.
template <class T>
void DistillRowGradLogCached(const T* x, const T* z, const T* log_ratio, exp_cache<T> cx, std::int64_t n, T inv_t,
                             row_normaliser<T> nx, row_normaliser<T> nz, T r, T coef, T* g) {
  const hn::ScalableTag<T> d;
  const size_t N = hn::Lanes(d);
  const auto vt = hn::Set(d, inv_t);
  const auto vsx = hn::Set(d, nx.shift), vlx = hn::Set(d, nx.log_sum);
  const auto vsz = hn::Set(d, nz.shift), vlz = hn::Set(d, nz.log_sum);
  const auto vr = hn::Set(d, r), vcoef = hn::Set(d, coef);
  const auto zero = hn::Zero(d);
  for (std::int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const size_t len = static_cast<size_t>(std::min<std::int64_t>(kChunk, n - c0));
    const auto fx = hn::Set(d, ChunkFactor(cx.shifts[c0 / kChunk], nx, inv_t));
    for (size_t i = 0; i < len; i += N) {
      const size_t at = static_cast<size_t>(c0) + i;
      const bool full = i + N <= len;
      const auto q = hn::Mul(full ? hn::LoadU(d, cx.e + at) : LoadPart(d, cx.e + at, len - i, T(0)), fx);
      V<decltype(d)> ratio;
      if (log_ratio) {
        ratio = full ? hn::LoadU(d, log_ratio + at) : LoadPart(d, log_ratio + at, len - i, T(0));
      } else {
        const auto xv = full ? hn::LoadU(d, x + at) : LoadPart(d, x + at, len - i, kNegInf<T>);
        const auto zv = full ? hn::LoadU(d, z + at) : LoadPart(d, z + at, len - i, kNegInf<T>);
        ratio = hn::Sub(hn::Sub(hn::Mul(hn::Sub(xv, vsx), vt), vlx), hn::Sub(hn::Mul(hn::Sub(zv, vsz), vt), vlz));
      }
      const auto gv = hn::Mul(vcoef, hn::IfThenZeroElse(hn::Eq(q, zero), hn::Mul(q, hn::Sub(ratio, vr))));
      if (full)
        hn::StoreU(gv, d, g + at);
      else
        StorePart(gv, d, g + at, len - i);
    }
  }
}

// reverse_kl gradient from the statistics pass's caches alone (neither logits row is read):
// g = coef q (log q - log p - r), q = ex times its chunk factor, and
// log q - log p = (dx - dz) + ((sx_c - Sx) - (sz_c - Sz)) / T - log Σx + log Σz with dx - dz
// the pass's cached difference (chunk shifts sx_c, sz_c; row shifts Sx, Sz). Per element:
// g = (ex coef fx) ((dx - dz) - (r - offset_c)), zero where q = 0.
template <class T>
void DistillRowGradReverseCached(exp_cache<T> cx, exp_cache<T> cdiff, std::int64_t n, T inv_t, row_normaliser<T> nx,
                                 row_normaliser<T> nz, T r, T coef, T* g) {
  const hn::ScalableTag<T> d;
  const size_t N = hn::Lanes(d);
  const auto zero = hn::Zero(d);
  for (std::int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const size_t len = static_cast<size_t>(std::min<std::int64_t>(kChunk, n - c0));
    const std::size_t c = static_cast<std::size_t>(c0 / kChunk);
    const double offset = ((static_cast<double>(cx.shifts[c]) - static_cast<double>(nx.shift)) -
                           (static_cast<double>(cdiff.shifts[c]) - static_cast<double>(nz.shift))) *
                              static_cast<double>(inv_t) -
                          static_cast<double>(nx.log_sum) + static_cast<double>(nz.log_sum);
    const auto vf = hn::Set(d, coef * ChunkFactor(cx.shifts[c], nx, inv_t));
    const auto vr = hn::Set(d, static_cast<T>(static_cast<double>(r) - offset));
    auto step = [&](auto full_tag, size_t at, size_t rest) HWY_ATTR {
      constexpr bool kFull = decltype(full_tag)::value;
      const auto e = kFull ? hn::LoadU(d, cx.e + at) : LoadPart(d, cx.e + at, rest, T(0));
      const auto diff = kFull ? hn::LoadU(d, cdiff.e + at) : LoadPart(d, cdiff.e + at, rest, T(0));
      const auto gv = hn::IfThenZeroElse(hn::Eq(e, zero), hn::Mul(hn::Mul(e, vf), hn::Sub(diff, vr)));
      if (kFull)
        hn::StoreU(gv, d, g + at);
      else
        StorePart(gv, d, g + at, rest);
    };
    size_t i = 0;
    for (; i + N <= len; i += N) step(std::true_type(), static_cast<size_t>(c0) + i, N);
    if (i < len) step(std::false_type(), static_cast<size_t>(c0) + i, len - i);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace softce::detail
HWY_AFTER_NAMESPACE();

#endif  // SOFTCE_SRC_DISTILL_KERNELS_INL_H_
