// 16-bit kernels: dense cross-entropy on bfloat16 rows read in place (no staging copy), and
// the float16 / bfloat16 <-> float conversion used by staging.
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
#include <hwy/base.h>  // HWY_ARCH_X86

// bfloat16 rounding with AVX512-BF16's VCVTNEPS2BF16 (one instruction for 16 lanes, round
// to nearest even, NaN made quiet by or-ing 0x40: the same bits as StoreBf16's integer
// sequence, except that it flushes subnormal inputs to zero: those lanes, rare, are
// rounded by the integer rule instead, so every target writes the same bits). Highway
// 1.0.3 has no bfloat16 demotion with it (and no AVX3 target that implies AVX512-BF16),
// so it is a separate function with its own target attribute, picked at run time from
// the AVX3 kernels when the CPU has the extension. Defined once (this file is compiled
// once per Highway target).
#if HWY_ARCH_X86 && (defined(__GNUC__) || defined(__clang__)) && !defined(SOFTCE_NATIVE_BF16_DEFINED)
#define SOFTCE_NATIVE_BF16_DEFINED
#define SOFTCE_NATIVE_BF16 1
#include <immintrin.h>

#include <cfloat>
namespace softce::detail {
namespace {

bool cpu_has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return has;
}

// g = coef (e f a - (keep t + add)) for one chunk, rounded to bfloat16, as
// e (coef f a) - ((coef keep) t + coef add): the arithmetic of TargetRowGradCachedBf16's
// generic path (the same fused operations, so the same floats). (GCC 12 warns
// about _mm512_undefined_epi32 inside its own intrinsics headers: a false positive.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// One vector of 16: g rounded to bfloat16 and stored under the lane mask m.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma"))) inline void store_grad_bf16_native(
    __m512 gv, __mmask16 m, std::uint16_t* g) {
  __m256i bits = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(gv));
  // subnormal lanes (vfpclassps class 0x20: one instruction), rare: the integer rule
  const __mmask16 subnormal = _mm512_fpclass_ps_mask(gv, 0x20) & m;
  if (subnormal) {
    alignas(64) float lanes[16];
    alignas(32) std::uint16_t out[16];
    _mm512_store_ps(lanes, gv);
    _mm256_store_si256(reinterpret_cast<__m256i*>(out), bits);
    for (int j = 0; j < 16; ++j)
      if (subnormal & (1u << j)) {
        std::uint32_t u;
        std::memcpy(&u, &lanes[j], 4);
        out[j] = static_cast<std::uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
      }
    bits = _mm256_load_si256(reinterpret_cast<const __m256i*>(out));
  }
  _mm256_mask_storeu_epi16(g, m, bits);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma"))) void grad_cached_bf16_native(
    const float* e, const std::uint16_t* t, std::int64_t len, float factor, float a, float coef, float keep, float add,
    std::uint16_t* g) {
  // g = coef (e f a - wt) = e (coef f a) - coef wt: one multiply-add after the target's
  const __m512 vqa = _mm512_set1_ps(coef * factor * a);
  const __m512 vkeep = _mm512_set1_ps(coef * keep), vadd = _mm512_set1_ps(coef * add);
  std::int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m512i t32 = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + i))), 16);
    const __m512 wt = _mm512_fmadd_ps(_mm512_castsi512_ps(t32), vkeep, vadd);
    store_grad_bf16_native(_mm512_fmsub_ps(_mm512_loadu_ps(e + i), vqa, wt), __mmask16(0xFFFF), g + i);
  }
  if (i < len) {
    const __mmask16 m = static_cast<__mmask16>((1u << (len - i)) - 1u);
    const __m512i t32 = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, t + i)), 16);
    const __m512 wt = _mm512_fmadd_ps(_mm512_castsi512_ps(t32), vkeep, vadd);
    store_grad_bf16_native(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, e + i), vqa, wt), m, g + i);
  }
}
#pragma GCC diagnostic pop

}  // namespace
}  // namespace softce::detail
#endif

#if defined(SOFTCE_SRC_BF16_KERNELS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef SOFTCE_SRC_BF16_KERNELS_INL_H_
#undef SOFTCE_SRC_BF16_KERNELS_INL_H_
#else
#define SOFTCE_SRC_BF16_KERNELS_INL_H_
#endif

#include "simd-inl.h"

HWY_BEFORE_NAMESPACE();
namespace softce::detail {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// ---------------------------------------------------------------------------------------
// bfloat16 rows read in place (no staging copy): the 16-bit values are widened in
// registers, so a row is read from memory once, at half the bytes, under the prefetch.

template <class D>
HWY_INLINE V<D> LoadBf16(D d, const std::uint16_t* p) {
  const hn::Rebind<std::uint16_t, D> du16;
  const hn::RebindToUnsigned<D> du32;
  return hn::BitCast(d, hn::ShiftLeft<16>(hn::PromoteTo(du32, hn::LoadU(du16, p))));
}

// The first r < Lanes(d) values at p, the rest `fill_bits` (bfloat16 bit patterns).
template <class D>
HWY_INLINE V<D> LoadBf16Part(D d, const std::uint16_t* p, size_t r, std::uint16_t fill_bits) {
  HWY_ALIGN_MAX std::uint16_t buffer[HWY_MAX_BYTES / sizeof(float)];
  for (size_t i = 0; i < hn::Lanes(d); ++i) buffer[i] = i < r ? p[i] : fill_bits;
  return LoadBf16(d, buffer);
}

// Rounds to bfloat16 (nearest even, NaN kept quiet) and stores the first r values.
template <class D>
HWY_INLINE void StoreBf16(D d, V<D> v, std::uint16_t* p, size_t r) {
  const hn::RebindToUnsigned<D> du32;
  const hn::RebindToSigned<D> di32;
  const hn::Rebind<std::uint16_t, D> du16;
  const auto u = hn::BitCast(du32, v);
  const auto rounded =
      hn::ShiftRight<16>(hn::Add(u, hn::Add(hn::Set(du32, 0x7FFFu), hn::And(hn::ShiftRight<16>(u), hn::Set(du32, 1u)))));
  const auto quiet_nan = hn::Or(hn::ShiftRight<16>(u), hn::Set(du32, 0x40u));
  const auto bits =
      hn::DemoteTo(du16, hn::BitCast(di32, hn::IfThenElse(hn::RebindMask(du32, hn::IsNaN(v)), quiet_nan, rounded)));
  if (r >= hn::Lanes(d)) {
    hn::StoreU(bits, du16, p);
  } else {
    HWY_ALIGN_MAX std::uint16_t buffer[HWY_MAX_BYTES / sizeof(float)];
    hn::Store(bits, du16, buffer);
    for (size_t i = 0; i < r; ++i) p[i] = buffer[i];
  }
}

constexpr std::uint16_t kBf16NegInf = 0xFF80;

// Max of n bfloat16 values. On AVX-512 32 at a time, on integer keys: a bfloat16's bits
// with the magnitude bits flipped where the sign is set order like the floats (the flip is
// its own inverse), so vpmaxsw takes the max of 32 values in one instruction with no
// widening. A NaN (its key is above +inf's) wins, as it may: its row is NaN anyway (the sum
// pass turns NaN - NaN into NaN).
template <class D>
HWY_INLINE float Bf16ChunkMax(D d, const std::uint16_t* x, size_t len) {
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
  if constexpr (std::is_same_v<V<D>, hn::Vec512<float>>) {
    const __m512i magnitude = _mm512_set1_epi16(0x7FFF);
    const __m512i neg_inf = _mm512_set1_epi16(static_cast<short>(kBf16NegInf));
    // bits ^ (sign ? 0x7FFF : 0): vpternlogd's a ^ (b & c)
    auto key = [&](__m512i bits) HWY_ATTR {
      return _mm512_ternarylogic_epi32(bits, _mm512_srai_epi16(bits, 15), magnitude, 0x78);
    };
    __m512i m0 = key(neg_inf), m1 = m0;
    size_t i = 0;
    for (; i + 64 <= len; i += 64) {
      m0 = _mm512_max_epi16(m0, key(_mm512_loadu_si512(x + i)));
      m1 = _mm512_max_epi16(m1, key(_mm512_loadu_si512(x + i + 32)));
    }
    for (; i < len; i += 32) {
      const __mmask32 lanes = len - i >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << (len - i)) - 1u);
      m0 = _mm512_max_epi16(m0, key(_mm512_mask_loadu_epi16(neg_inf, lanes, x + i)));
    }
    // the max of the 32 keys: halves, quarters, then within 128 bits
    m0 = _mm512_max_epi16(m0, m1);
    m0 = _mm512_max_epi16(m0, _mm512_maskz_shuffle_i64x2(0xFF, m0, m0, 0x4E));
    m0 = _mm512_max_epi16(m0, _mm512_maskz_shuffle_i64x2(0xFF, m0, m0, 0xB1));
    m0 = _mm512_max_epi16(m0, _mm512_maskz_shuffle_epi32(0xFFFF, m0, _MM_PERM_BADC));
    m0 = _mm512_max_epi16(m0, _mm512_maskz_shuffle_epi32(0xFFFF, m0, _MM_PERM_CDAB));
    m0 = _mm512_max_epi16(m0, _mm512_maskz_srli_epi32(0xFFFF, m0, 16));
    alignas(64) std::uint32_t lanes[16];
    _mm512_store_si512(lanes, m0);
    const std::uint16_t k16 = static_cast<std::uint16_t>(lanes[0]);
    const std::uint32_t bits = static_cast<std::uint32_t>((k16 & 0x8000u) ? (k16 ^ 0x7FFFu) : k16) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
#endif
  const size_t N = hn::Lanes(d);
  V<D> m0 = hn::Set(d, kNegInf<float>);
  size_t i = 0;
  for (; i + N <= len; i += N) m0 = hn::Max(m0, LoadBf16(d, x + i));
  if (i < len) m0 = hn::Max(m0, LoadBf16Part(d, x + i, len - i, kBf16NegInf));
  return hn::GetLane(hn::MaxOfLanes(d, m0));
}

// One vector of TargetRowStatsBf16: e = exp(x - shift) (cached), Σ e, Σ wt, Σ wt (x - shift),
// the last skipped where wt = 0 (0 * -inf) when kGuard. Unguarded, a lane adds wt (x - shift)
// exactly as the guarded one where it is not NaN (wt = 0 adds +-0), so a chunk whose
// unguarded Σ is not NaN has the guarded Σ's bits; TargetRowStatsBf16Impl redoes the others.
template <bool kFull, bool kCache, bool kGuard, class D>
HWY_INLINE void Bf16StatsVector(D d, const std::uint16_t* xp, const std::uint16_t* tp, size_t r, V<D> vshift,
                                V<D> vkeep, V<D> vadd, V<D>& vs, V<D>& va, V<D>& vb, float* ec) {
  const auto zero = hn::Zero(d);
  const auto xv = kFull ? LoadBf16(d, xp) : LoadBf16Part(d, xp, r, kBf16NegInf);
  auto wt = hn::MulAdd(kFull ? LoadBf16(d, tp) : LoadBf16Part(d, tp, r, 0), vkeep, vadd);
  if (!kFull) wt = hn::IfThenElseZero(hn::FirstN(d, r), wt);
  const auto diff = hn::Sub(xv, vshift);
  const auto e = ExpNonPositive(d, diff);
  vs = hn::Add(vs, e);
  va = hn::Add(va, wt);
  if constexpr (kGuard)
    vb = hn::IfThenElse(hn::Eq(wt, zero), vb, hn::MulAdd(wt, diff, vb));
  else
    vb = hn::MulAdd(wt, diff, vb);
  if constexpr (kCache) {
    if (kFull)
      hn::StoreU(e, d, ec);
    else
      StorePart(e, d, ec, r);
  }
}

// TargetRowStats for bfloat16 logits and dense bfloat16 targets without class weights:
// wt = keep * t + add. The cache is float.
template <bool kCache>
target_stats TargetRowStatsBf16Impl(const std::uint16_t* x, const std::uint16_t* t, std::int64_t n, float keep,
                                    float add, exp_cache<float> cache) {
  const hn::ScalableTag<float> d;
  const size_t N = hn::Lanes(d);
  const auto vkeep = hn::Set(d, keep), vadd = hn::Set(d, add), zero = hn::Zero(d);
  target_stats acc{-kInf, 0.0, 0.0, 0.0};
  for (std::int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const size_t len = static_cast<size_t>(std::min<std::int64_t>(kChunk, n - c0));
    const std::uint16_t* xc = x + c0;
    const std::uint16_t* tc = t + c0;
    const float m = Bf16ChunkMax(d, xc, len);
    const auto vshift = hn::Set(d, FiniteShift(m));
    float* ec = kCache ? cache.e + c0 : nullptr;
    if (cache.shifts) cache.shifts[c0 / kChunk] = FiniteShift(m);
    V<decltype(d)> vs = zero, va = zero, vb = zero;
    size_t i = 0;
    for (; i + N <= len; i += N) {
      PrefetchNextChunk(xc + i);
      PrefetchNextChunk(tc + i);
      Bf16StatsVector<true, kCache, false>(d, xc + i, tc + i, N, vshift, vkeep, vadd, vs, va, vb,
                                           kCache ? ec + i : nullptr);
    }
    const size_t full = i;
    // the full vectors' Σ wt (x - shift) unguarded: NaN only from a -inf logit under a zero
    // weight (or a NaN logit, target or an infinite target, which the guard keeps NaN too)
    if (!hn::AllFalse(d, hn::IsNaN(vb))) [[unlikely]] {
      vb = zero;
      for (size_t j = 0; j < full; j += N) {
        V<decltype(d)> s_unused = zero, a_unused = zero;
        Bf16StatsVector<true, false, true>(d, xc + j, tc + j, N, vshift, vkeep, vadd, s_unused, a_unused, vb,
                                           nullptr);
      }
    }
#if HWY_TARGET != HWY_SCALAR  // one lane: no partial vector
    if (i < len)
      Bf16StatsVector<false, kCache, true>(d, xc + i, tc + i, len - i, vshift, vkeep, vadd, vs, va, vb,
                                           kCache ? ec + i : nullptr);
#endif
    merge_into(acc, target_stats{static_cast<double>(m), Total(d, vs), Total(d, va), Total(d, vb)});
  }
  return acc;
}

target_stats TargetRowStatsBf16(const std::uint16_t* x, const std::uint16_t* t, std::int64_t n, float keep, float add,
                                exp_cache<float> cache) {
  return cache.e ? TargetRowStatsBf16Impl<true>(x, t, n, keep, add, cache)
                 : TargetRowStatsBf16Impl<false>(x, t, n, keep, add, cache);
}

// g = coef (q a - wt) from the float cache and the bfloat16 targets (read again, from
// cache), rounded and written as bfloat16 straight into the output row.
void TargetRowGradCachedBf16(exp_cache<float> cache, const std::uint16_t* t, std::int64_t n, float keep, float add,
                             row_normaliser<float> norm, float a, float coef, std::uint16_t* g) {
  const hn::ScalableTag<float> d;
  const size_t N = hn::Lanes(d);
#if defined(SOFTCE_NATIVE_BF16) && (HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL)
  if (cpu_has_avx512_bf16()) {
    for (std::int64_t c0 = 0; c0 < n; c0 += kChunk)
      grad_cached_bf16_native(cache.e + c0, t + c0, std::min<std::int64_t>(kChunk, n - c0),
                              ChunkFactor(cache.shifts[c0 / kChunk], norm, 1.0f), a, coef, keep, add, g + c0);
    return;
  }
#endif
  // g = coef (e f a - (keep t + add)) = e (coef f a) - ((coef keep) t + coef add): one
  // multiply-add per element after the target's (the native path computes the same floats)
  const auto vkeep_c = hn::Set(d, coef * keep), vadd_c = hn::Set(d, coef * add);
  for (std::int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const size_t len = static_cast<size_t>(std::min<std::int64_t>(kChunk, n - c0));
    const auto vqa = hn::Set(d, coef * ChunkFactor(cache.shifts[c0 / kChunk], norm, 1.0f) * a);
    const float* ec = cache.e + c0;
    const std::uint16_t* tc = t + c0;
    std::uint16_t* gc = g + c0;
    size_t i = 0;
    for (; i + N <= len; i += N) {
      const auto wt = hn::MulAdd(LoadBf16(d, tc + i), vkeep_c, vadd_c);
      StoreBf16(d, hn::MulSub(hn::LoadU(d, ec + i), vqa, wt), gc + i, N);
    }
    if (i < len) {
      const auto wt = hn::MulAdd(LoadBf16Part(d, tc + i, len - i, 0), vkeep_c, vadd_c);
      StoreBf16(d, hn::MulSub(LoadPart(d, ec + i, len - i, 0.0f), vqa, wt), gc + i, len - i);
    }
  }
}

// ---------------------------------------------------------------------------------------
// 16-bit float conversion (staging of bfloat16 / float16 rows)

void HalfToFloat(const std::uint16_t* in, bool bfloat, std::int64_t n, float* out) {
  const hn::ScalableTag<float> df;
  const hn::Rebind<std::uint16_t, decltype(df)> du16;
  const hn::Rebind<hwy::float16_t, decltype(df)> df16;
  const hn::RebindToUnsigned<decltype(df)> du32;
  const size_t N = hn::Lanes(df);
  std::int64_t i = 0;
  for (; i + static_cast<std::int64_t>(N) <= n; i += N) {
    const auto bits = hn::LoadU(du16, in + i);
    if (bfloat)
      hn::StoreU(hn::BitCast(df, hn::ShiftLeft<16>(hn::PromoteTo(du32, bits))), df, out + i);
    else
      hn::StoreU(hn::PromoteTo(df, hn::BitCast(df16, bits)), df, out + i);
  }
  for (; i < n; ++i) {
    std::uint32_t u = static_cast<std::uint32_t>(in[i]);
    if (bfloat) {
      u <<= 16;
      std::memcpy(out + i, &u, 4);
    } else {
      _Float16 h;
      const std::uint16_t b = static_cast<std::uint16_t>(u);
      std::memcpy(&h, &b, 2);
      out[i] = static_cast<float>(h);
    }
  }
}

void FloatToHalf(const float* in, bool bfloat, std::int64_t n, std::uint16_t* out) {
  const hn::ScalableTag<float> df;
  const hn::Rebind<std::uint16_t, decltype(df)> du16;
  const hn::Rebind<hwy::float16_t, decltype(df)> df16;
  const hn::RebindToUnsigned<decltype(df)> du32;
  const hn::RebindToSigned<decltype(df)> di32;
  const size_t N = hn::Lanes(df);
  std::int64_t i = 0;
  if (bfloat) {
    for (; i + static_cast<std::int64_t>(N) <= n; i += N) {
      const auto v = hn::LoadU(df, in + i);
      const auto u = hn::BitCast(du32, v);
      // round to nearest even: add 0x7FFF plus the lowest kept bit; keep NaNs quiet
      const auto rounded = hn::ShiftRight<16>(hn::Add(u, hn::Add(hn::Set(du32, 0x7FFFu), hn::And(hn::ShiftRight<16>(u), hn::Set(du32, 1u)))));
      const auto quiet_nan = hn::Or(hn::ShiftRight<16>(u), hn::Set(du32, 0x40u));
      const auto bits = hn::IfThenElse(hn::RebindMask(du32, hn::IsNaN(v)), quiet_nan, rounded);
      hn::StoreU(hn::DemoteTo(du16, hn::BitCast(di32, bits)), du16, out + i);
    }
  } else {
    for (; i + static_cast<std::int64_t>(N) <= n; i += N)
      hn::StoreU(hn::BitCast(du16, hn::DemoteTo(df16, hn::LoadU(df, in + i))), du16, out + i);
  }
  for (; i < n; ++i) {
    if (bfloat) {
      std::uint32_t u;
      std::memcpy(&u, in + i, 4);
      if (in[i] != in[i])
        out[i] = static_cast<std::uint16_t>((u >> 16) | 0x40);
      else
        out[i] = static_cast<std::uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
    } else {
      const _Float16 h = static_cast<_Float16>(in[i]);
      std::memcpy(out + i, &h, 2);
    }
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace softce::detail
HWY_AFTER_NAMESPACE();

#endif  // SOFTCE_SRC_BF16_KERNELS_INL_H_
