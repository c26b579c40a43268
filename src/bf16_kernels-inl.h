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

// (GCC 12 warns about _mm512_undefined_epi32 inside its own intrinsics headers: a false
// positive.)
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

// A pair block of 32 (kBf16Pairs): the even classes' gradients ge and the odd ones' go,
// rounded to bfloat16 and stored in class order. Both rounded by one instruction, then
// interleaved by one permutation; a block with a subnormal lane takes the integer rule
// for all of its lanes (the same bits for the others).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma"))) inline void store_grad_pair_bf16_native(
    __m512 ge, __m512 go, std::uint16_t* g) {
  if (!_kortestz_mask16_u8(_mm512_fpclass_ps_mask(ge, 0x20), _mm512_fpclass_ps_mask(go, 0x20))) [[unlikely]] {
    alignas(64) float lanes[32];
    _mm512_store_ps(lanes, ge);
    _mm512_store_ps(lanes + 16, go);
    for (int j = 0; j < 32; ++j) {
      std::uint32_t u;
      std::memcpy(&u, &lanes[(j & 1) * 16 + j / 2], 4);
      g[j] = static_cast<std::uint16_t>(std::isnan(lanes[(j & 1) * 16 + j / 2]) ? (u >> 16) | 0x40u
                                                                            : (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
    return;
  }
  // words 0-15 the even classes, 16-31 the odd ones; class 2j comes from word j, 2j + 1
  // from word 16 + j
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i packed = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(go, ge));
  _mm512_storeu_si512(g, _mm512_permutexvar_epi16(order, packed));
}

// g = coef (e f a - (keep t + add)) for one chunk, rounded to bfloat16, as
// e (coef f a) - ((coef keep) t + coef add): the arithmetic of TargetRowGradCachedBf16's
// generic path (the same fused operations, so the same floats). `pairs`: the cache holds
// the chunk's pair blocks (kBf16Pairs).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma"))) void grad_cached_bf16_native(
    const float* e, const std::uint16_t* t, std::int64_t len, float factor, float a, float coef, float keep, float add,
    std::uint16_t* g, bool pairs) {
  // g = coef (e f a - wt) = e (coef f a) - coef wt: one multiply-add after the target's
  const __m512 vqa = _mm512_set1_ps(coef * factor * a);
  const __m512 vkeep = _mm512_set1_ps(coef * keep), vadd = _mm512_set1_ps(coef * add);
  std::int64_t i = 0;
  if (pairs) {
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (; i + 32 <= len; i += 32) {
      const __m512i tb = _mm512_loadu_si512(t + i);
      const __m512 w0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(tb, 16)), vkeep, vadd);
      const __m512 w1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(tb, high)), vkeep, vadd);
      store_grad_pair_bf16_native(_mm512_fmsub_ps(_mm512_loadu_ps(e + i), vqa, w0),
                                  _mm512_fmsub_ps(_mm512_loadu_ps(e + i + 16), vqa, w1), g + i);
    }
  }
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

// A pair block's even (ve) and odd (vo) classes rounded as StoreBf16 does, stored in class
// order: the even ones' bits land in the low halves of the 32-bit lanes, the odd ones' in
// the high halves.
template <class D>
HWY_INLINE void StoreBf16Pair(D d, V<D> ve, V<D> vo, std::uint16_t* p) {
  const hn::RebindToUnsigned<D> du32;
  const hn::Repartition<std::uint16_t, D> du16;
  const auto one = hn::Set(du32, 1u), half = hn::Set(du32, 0x7FFFu), quiet = hn::Set(du32, 0x00400000u);
  const auto ue = hn::BitCast(du32, ve), uo = hn::BitCast(du32, vo);
  // nearest even in the high halves (NaN: kept, made quiet)
  const auto re = hn::IfThenElse(hn::RebindMask(du32, hn::IsNaN(ve)), hn::Or(ue, quiet),
                                 hn::Add(ue, hn::Add(half, hn::And(hn::ShiftRight<16>(ue), one))));
  const auto ro = hn::IfThenElse(hn::RebindMask(du32, hn::IsNaN(vo)), hn::Or(uo, quiet),
                                 hn::Add(uo, hn::Add(half, hn::And(hn::ShiftRight<16>(uo), one))));
  const auto bits = hn::Or(hn::ShiftRight<16>(re), hn::And(ro, hn::Set(du32, 0xFFFF0000u)));
  hn::StoreU(hn::BitCast(du16, bits), du16, p);
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

// On vector targets a block of 2 vectors' classes (32 on AVX-512) is read with one load per
// operand and split into its even classes (the low halves of the 32-bit lanes, shifted up)
// and its odd ones (the high halves, masked): 2 operations where widening takes 4. The
// statistics are sums, free in their order; the exp cache then holds each block's 16 even classes
// followed by its 16 odd ones, and the gradient pass (TargetRowGradCachedBf16, the same
// target) reads it so and writes the classes back in their order. A chunk's blocks start
// at its first class; what is left of it (less than a block) is in class order.
inline constexpr bool kBf16Pairs = HWY_TARGET != HWY_SCALAR;

template <class D>
HWY_INLINE void LoadBf16Pairs(D d, const std::uint16_t* p, V<D>& even, V<D>& odd) {
  const hn::RebindToUnsigned<D> du32;
  const hn::Repartition<std::uint16_t, D> du16;
  const auto bits = hn::BitCast(du32, hn::LoadU(du16, p));
  even = hn::BitCast(d, hn::ShiftLeft<16>(bits));
  odd = hn::BitCast(d, hn::And(bits, hn::Set(du32, 0xFFFF0000u)));
}

// The statistics of one vector of logits xv and weighted targets wt: e = exp(x - shift)
// (returned, for the cache), Σ e, Σ wt, Σ wt (x - shift), the last skipped where wt = 0
// (0 * -inf) when kGuard. Unguarded, a lane adds wt (x - shift) exactly as the guarded one
// where it is not NaN (wt = 0 adds +-0), so a chunk whose unguarded Σ is not NaN has the
// guarded Σ's bits; TargetRowStatsBf16Impl redoes the others.
template <bool kGuard, class D>
HWY_INLINE V<D> Bf16Stats(D d, V<D> xv, V<D> wt, V<D> vshift, V<D>& vs, V<D>& va, V<D>& vb) {
  const auto diff = hn::Sub(xv, vshift);
  const auto e = ExpNonPositive(d, diff);
  vs = hn::Add(vs, e);
  va = hn::Add(va, wt);
  if constexpr (kGuard)
    vb = hn::IfThenElse(hn::Eq(wt, hn::Zero(d)), vb, hn::MulAdd(wt, diff, vb));
  else
    vb = hn::MulAdd(wt, diff, vb);
  return e;
}

// The statistics pass prefetches 4 KiB ahead, as the float kernels do (PrefetchNextChunk:
// one chunk of floats): two chunks of 16-bit values. (One chunk ahead, 2 KiB, was ~4 %
// slower at 1024 x 32000 on 2 threads; 8 KiB slower still.)
HWY_INLINE void PrefetchBf16Ahead(const std::uint16_t* p) { hwy::Prefetch(p + 2 * kChunk); }

// The weighted target keep t + add; t itself for plain targets (keep 1, add 0: no label
// smoothing), one operation less per vector (the same value; a -0 target stays -0).
template <bool kPlain, class D>
HWY_INLINE V<D> Bf16Weighted(V<D> t, V<D> vkeep, V<D> vadd) {
  if constexpr (kPlain)
    return t;
  else
    return hn::MulAdd(t, vkeep, vadd);
}

// The statistics of the classes [0, full) of a chunk (full: the chunk's whole vectors), in
// pair blocks where the target has them, then vectors in class order.
template <bool kCache, bool kGuard, bool kPlain, class D>
HWY_INLINE void Bf16StatsFull(D d, const std::uint16_t* xc, const std::uint16_t* tc, size_t full, V<D> vshift,
                              V<D> vkeep, V<D> vadd, V<D>& vs, V<D>& va, V<D>& vb, float* ec) {
  const size_t N = hn::Lanes(d);
  size_t i = 0;
  if constexpr (kBf16Pairs) {
    for (; i + 2 * N <= full; i += 2 * N) {
      PrefetchBf16Ahead(xc + i);  // one line of each per block
      PrefetchBf16Ahead(tc + i);
      V<D> x0, x1, t0, t1;
      LoadBf16Pairs(d, xc + i, x0, x1);
      LoadBf16Pairs(d, tc + i, t0, t1);
      const auto e0 = Bf16Stats<kGuard>(d, x0, Bf16Weighted<kPlain, D>(t0, vkeep, vadd), vshift, vs, va, vb);
      const auto e1 = Bf16Stats<kGuard>(d, x1, Bf16Weighted<kPlain, D>(t1, vkeep, vadd), vshift, vs, va, vb);
      if constexpr (kCache) {
        hn::StoreU(e0, d, ec + i);
        hn::StoreU(e1, d, ec + i + N);
      }
    }
  }
  for (; i + N <= full; i += N) {
    PrefetchBf16Ahead(xc + i);
    PrefetchBf16Ahead(tc + i);
    const auto e = Bf16Stats<kGuard>(d, LoadBf16(d, xc + i), Bf16Weighted<kPlain, D>(LoadBf16(d, tc + i), vkeep, vadd),
                                     vshift, vs, va, vb);
    if constexpr (kCache) hn::StoreU(e, d, ec + i);
  }
}

// TargetRowStats for bfloat16 logits and dense bfloat16 targets without class weights:
// wt = keep * t + add. The cache is float.
template <bool kCache, bool kPlain>
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
    const size_t full = len / N * N;
    Bf16StatsFull<kCache, false, kPlain>(d, xc, tc, full, vshift, vkeep, vadd, vs, va, vb, ec);
    // the full vectors' Σ wt (x - shift) unguarded: NaN only from a -inf logit under a zero
    // weight (or a NaN logit, target or an infinite target, which the guard keeps NaN too)
    if (!hn::AllFalse(d, hn::IsNaN(vb))) [[unlikely]] {
      vb = zero;
      V<decltype(d)> s_unused = zero, a_unused = zero;
      Bf16StatsFull<false, true, kPlain>(d, xc, tc, full, vshift, vkeep, vadd, s_unused, a_unused, vb, nullptr);
    }
#if HWY_TARGET != HWY_SCALAR  // one lane: no partial vector
    if (full < len) {
      const size_t r = len - full;
      const auto wt =
          hn::IfThenElseZero(hn::FirstN(d, r), Bf16Weighted<kPlain, decltype(d)>(LoadBf16Part(d, tc + full, r, 0), vkeep, vadd));
      const auto e = Bf16Stats<true>(d, LoadBf16Part(d, xc + full, r, kBf16NegInf), wt, vshift, vs, va, vb);
      if constexpr (kCache) StorePart(e, d, ec + full, r);
    }
#endif
    merge_into(acc, target_stats{static_cast<double>(m), Total(d, vs), Total(d, va), Total(d, vb)});
  }
  return acc;
}

target_stats TargetRowStatsBf16(const std::uint16_t* x, const std::uint16_t* t, std::int64_t n, float keep, float add,
                                exp_cache<float> cache) {
  if (keep == 1.0f && add == 0.0f)
    return cache.e ? TargetRowStatsBf16Impl<true, true>(x, t, n, keep, add, cache)
                   : TargetRowStatsBf16Impl<false, true>(x, t, n, keep, add, cache);
  return cache.e ? TargetRowStatsBf16Impl<true, false>(x, t, n, keep, add, cache)
                 : TargetRowStatsBf16Impl<false, false>(x, t, n, keep, add, cache);
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
                              ChunkFactor(cache.shifts[c0 / kChunk], norm, 1.0f), a, coef, keep, add, g + c0,
                              kBf16Pairs);
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
    if constexpr (kBf16Pairs) {
      for (; i + 2 * N <= len; i += 2 * N) {
        V<decltype(d)> t0, t1;
        LoadBf16Pairs(d, tc + i, t0, t1);
        StoreBf16Pair(d, hn::MulSub(hn::LoadU(d, ec + i), vqa, hn::MulAdd(t0, vkeep_c, vadd_c)),
                      hn::MulSub(hn::LoadU(d, ec + i + N), vqa, hn::MulAdd(t1, vkeep_c, vadd_c)), gc + i);
      }
    }
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
