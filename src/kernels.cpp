// SIMD row kernels: written once with Highway, compiled for every x86/Arm target Highway
// knows, and the best one present chosen at run time (HWY_DYNAMIC_DISPATCH).
//
// Each kernel walks a contiguous slice in chunks of kChunk elements. Per chunk: a max
// pass, then a pass that accumulates exp and the target moments in vector registers of T
// while the chunk is in L1; the chunk totals are merged in double (row_stats.hpp). Keeping
// float accumulation to one chunk bounds its rounding error (~kChunk / lanes terms per
// lane) while the row-level sums stay exact to double precision.
//
// Differences are formed as (x - shift) before scaling by 1 / T: x - shift is exact for
// nearby floats, so logits offset by 1e4 lose nothing.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>
#include <hwy/cache_control.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels.hpp"
#include "row_stats.hpp"

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

// g = coef (e f a - (keep t + add)) for one chunk, rounded to bfloat16: the arithmetic of
// TargetRowGradCachedBf16 (the same fused operations, so the same floats). (GCC 12 warns
// about _mm512_undefined_epi32 inside its own intrinsics headers: a false positive.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma"))) void grad_cached_bf16_native(
    const float* e, const std::uint16_t* t, std::int64_t len, float factor, float a, float coef, float keep, float add,
    std::uint16_t* g) {
  const __m512 vf = _mm512_set1_ps(factor), va = _mm512_set1_ps(a), vcoef = _mm512_set1_ps(coef);
  const __m512 vkeep = _mm512_set1_ps(keep), vadd = _mm512_set1_ps(add), smallest = _mm512_set1_ps(FLT_MIN);
  for (std::int64_t i = 0; i < len; i += 16) {
    const __mmask16 m = len - i >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (len - i)) - 1u);
    const __m512 q = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, e + i), vf);
    const __m512i t32 = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, t + i)), 16);
    const __m512 wt = _mm512_fmadd_ps(_mm512_castsi512_ps(t32), vkeep, vadd);
    const __m512 gv = _mm512_mul_ps(vcoef, _mm512_fmsub_ps(q, va, wt));
    __m256i bits = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(gv));
    const __mmask16 subnormal = _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(gv, _mm512_setzero_ps(), _CMP_NEQ_OQ),
                                                        _mm512_abs_ps(gv), smallest, _CMP_LT_OQ) & m;
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
    _mm256_mask_storeu_epi16(g + i, m, bits);
  }
}
#pragma GCC diagnostic pop

}  // namespace
}  // namespace softce::detail
#endif

HWY_BEFORE_NAMESPACE();
namespace softce::detail {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

template <class D>
using V = hn::Vec<D>;

template <class T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// exp for any argument: exactly 0 below the smallest normal's log and for -inf, +inf past
// the overflow bound, NaN for NaN (Highway's Exp is specified for finite arguments only and
// returns 0 for NaN; a NaN must reach the row's statistics, never be hidden). NaN tests use
// IsNaN: Highway's Ne is an ordered compare, false for NaN != NaN on x86.
template <class D>
HWY_INLINE V<D> SafeExp(D d, V<D> v) {
  using T = hn::TFromD<D>;
  const V<D> lowest = hn::Set(d, sizeof(T) == 4 ? T(-104) : T(-745));
  const V<D> highest = hn::Set(d, sizeof(T) == 4 ? T(88.7) : T(709.7));
  V<D> out = hn::Exp(d, hn::Min(hn::Max(v, lowest), highest));
  out = hn::IfThenZeroElse(hn::Lt(v, lowest), out);
  out = hn::IfThenElse(hn::Gt(v, highest), hn::Set(d, std::numeric_limits<T>::infinity()), out);
  return hn::IfThenElse(hn::IsNaN(v), v, out);
}

// SafeExp for v <= 0 or NaN (the double kernels' softmax arguments): no overflow branch.
template <class D>
HWY_INLINE V<D> SafeExpNonPositive(D d, V<D> v) {
  using T = hn::TFromD<D>;
  const V<D> lowest = hn::Set(d, sizeof(T) == 4 ? T(-104) : T(-745));
  const V<D> out = hn::IfThenZeroElse(hn::Lt(v, lowest), hn::Exp(d, hn::Max(v, lowest)));
  return hn::IfThenElse(hn::IsNaN(v), v, out);
}

// exp(v) for v <= 0 (softmax arguments x - max, log-probabilities, -|x|), exactly 0 for -inf
// and for results below the smallest normal float. About 2/3 of the vector operations of
// SafeExp: with no overflow range to handle, 2^k is one exponent-field add and one multiply
// (hn::Exp splits it in two to reach the denormal range), and the clamp doubles as the -inf
// guard. Same polynomial as hn::Exp, 1 ulp. float only (double keeps SafeExpNonPositive);
// valid for v <= 88. NaN gives NaN on every target: the clamp's Max(NaN, lowest) differs
// between targets, so the reduction r starts from v itself (NaN stays NaN, and a v below
// the clamp is zeroed by `tiny` whatever r is) -- the row statistics rely on it.
template <class D>
HWY_INLINE V<D> ExpNonPositive(D d, V<D> v) {
  using T = hn::TFromD<D>;
  if constexpr (sizeof(T) != 4) {
    return SafeExpNonPositive(d, v);
  } else {
    const hn::RebindToSigned<D> di;
    const V<D> lowest = hn::Set(d, -87.3365402f);  // log(FLT_MIN)
    const auto tiny = hn::Lt(v, lowest);
    const V<D> x = hn::Max(v, lowest);
    const V<D> k = hn::Round(hn::Mul(x, hn::Set(d, 1.44269504088896341f)));
    // r = v - k ln2 in extended precision (Cody-Waite, Highway's constants)
    V<D> r = hn::MulAdd(k, hn::Set(d, -0.693145751953125f), v);
    r = hn::MulAdd(k, hn::Set(d, -1.428606765330187045e-6f), r);
    // Highway's ExpPoly: exp(r) - 1 - r ~ r^2 (k0 + k1 r + ... + k5 r^5), |r| <= ln2 / 2
    const V<D> r2 = hn::Mul(r, r);
    const V<D> p01 = hn::MulAdd(hn::Set(d, 0.166666671633720397949219f), r, hn::Set(d, 0.5f));
    const V<D> p23 = hn::MulAdd(hn::Set(d, 0.00833336077630519866943359f), r, hn::Set(d, 0.0416664853692054748535156f));
    const V<D> p45 = hn::MulAdd(hn::Set(d, 0.000198527617612853646278381f), r, hn::Set(d, 0.00139304355252534151077271f));
    const V<D> p = hn::MulAdd(hn::MulAdd(p45, r2, p23), r2, p01);
    const V<D> em1 = hn::MulAdd(p, r2, r);  // exp(r) - 1
    // 2^k for k in [-126, 0]: a normal float built from its exponent field
    const V<D> two_k = hn::BitCast(d, hn::ShiftLeft<23>(hn::Add(hn::ConvertTo(di, k), hn::Set(di, 127))));
    return hn::IfThenZeroElse(tiny, hn::MulAdd(em1, two_k, two_k));
  }
}

// log that is -inf at 0 (masked out by callers), +inf at +inf and NaN below 0. (NaN gives
// a number here; callers multiply by v, which brings the NaN back.)
template <class D>
HWY_INLINE V<D> SafeLog(D d, V<D> v) {
  using T = hn::TFromD<D>;
  const V<D> zero = hn::Zero(d), inf = hn::Set(d, std::numeric_limits<T>::infinity());
  V<D> out = hn::Log(d, hn::Min(hn::Max(v, hn::Set(d, std::numeric_limits<T>::min())), hn::Set(d, std::numeric_limits<T>::max())));
  out = hn::IfThenElse(hn::Eq(v, zero), hn::Set(d, kNegInf<T>), out);
  out = hn::IfThenElse(hn::Eq(v, inf), inf, out);
  return hn::IfThenElse(hn::Lt(v, zero), hn::Set(d, std::numeric_limits<T>::quiet_NaN()), out);
}

// Partial vectors at the end of a slice go through a stack buffer: Highway 1.0.3's
// MaskedLoad / BlendedStore touch the whole vector on targets without masked memory
// operations (SSE4), which would read or write past the end of the caller's array.
// x86 AVX2 and AVX-512 have true masked loads and stores (vmaskmov, masked vmovups): lanes
// past r are never touched, so they are used directly there (a row of 10 classes is all
// partial vector; the stack buffer costs a scalar loop per load).
#undef SOFTCE_NATIVE_MASKED_MEMORY  // this file is compiled once per target
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2
#define SOFTCE_NATIVE_MASKED_MEMORY 1
#else
#define SOFTCE_NATIVE_MASKED_MEMORY 0
#endif

template <class D, class T = hn::TFromD<D>>
HWY_INLINE V<D> LoadPart(D d, const T* p, size_t r, T fill) {
#if SOFTCE_NATIVE_MASKED_MEMORY
  const auto m = hn::FirstN(d, r);
  return hn::IfThenElse(m, hn::MaskedLoad(m, d, p), hn::Set(d, fill));
#endif
  HWY_ALIGN_MAX T buffer[HWY_MAX_BYTES / sizeof(T)];
  const size_t N = hn::Lanes(d);
  for (size_t i = 0; i < N; ++i) buffer[i] = i < r ? p[i] : fill;
  return hn::Load(d, buffer);
}

template <class D, class T = hn::TFromD<D>>
HWY_INLINE void StorePart(V<D> v, D d, T* p, size_t r) {
#if SOFTCE_NATIVE_MASKED_MEMORY
  hn::BlendedStore(v, hn::FirstN(d, r), d, p);
  return;
#endif
  HWY_ALIGN_MAX T buffer[HWY_MAX_BYTES / sizeof(T)];
  hn::Store(v, d, buffer);
  for (size_t i = 0; i < r; ++i) p[i] = buffer[i];
}

template <class D>
HWY_INLINE double Total(D d, V<D> v) {
  return static_cast<double>(hn::GetLane(hn::SumOfLanes(d, v)));
}

// max over a chunk; -inf when empty or all -inf.
template <class D, class T = hn::TFromD<D>>
HWY_INLINE T ChunkMax(D d, const T* x, size_t n) {
  const size_t N = hn::Lanes(d);
  V<D> m0 = hn::Set(d, kNegInf<T>), m1 = m0;
  size_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    m0 = hn::Max(m0, hn::LoadU(d, x + i));
    m1 = hn::Max(m1, hn::LoadU(d, x + i + N));
  }
  for (; i + N <= n; i += N) m0 = hn::Max(m0, hn::LoadU(d, x + i));
  if (i < n) m1 = hn::Max(m1, LoadPart(d, x + i, n - i, kNegInf<T>));
  return hn::GetLane(hn::MaxOfLanes(d, hn::Max(m0, m1)));
}

// The finite value differences are taken against: the max, or 0 for an all -inf chunk.
template <class T>
HWY_INLINE T FiniteShift(T m) {
  return m == kNegInf<T> ? T(0) : m;
}

// Requests the line kChunk elements ahead (the same place in the next chunk) while this
// chunk is computed. Without it a chunk's max pass waits on DRAM with nothing to overlap
// (the previous chunk's math is done): a statistics pass cost memory time PLUS compute
// time; with it, the larger of the two. Past the end of the row it fetches the next row
// (contiguous layouts) or nothing useful; a prefetch never faults.
template <class T>
HWY_INLINE void PrefetchNextChunk(const T* p) {
  hwy::Prefetch(p + kChunk);
}

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
    size_t i = 0;
    for (; i + 2 * N <= len; i += 2 * N) {
      PrefetchNextChunk(xc + i);
      PrefetchNextChunk(xc + i + N);
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
    size_t i = 0;
    for (; i + N <= len; i += N) {
      PrefetchNextChunk(xc + i);
      const auto diff = hn::Sub(hn::LoadU(d, xc + i), vshift);
      const auto wt = WeightedTarget<false>(d, tc, i, N);
      const auto e = ExpNonPositive(d, diff);
      vs = hn::Add(vs, e);
      va = hn::Add(va, wt);
      vb = hn::Add(vb, hn::IfThenZeroElse(hn::Eq(wt, zero), hn::Mul(wt, diff)));
      if (ec) hn::StoreU(e, d, ec + i);
    }
    if (i < len) {
      const auto diff = hn::Sub(LoadPart(d, xc + i, len - i, kNegInf<T>), vshift);
      const auto wt = WeightedTarget<true>(d, tc, i, len - i);
      const auto e = ExpNonPositive(d, diff);
      vs = hn::Add(vs, e);
      va = hn::Add(va, wt);
      vb = hn::Add(vb, hn::IfThenZeroElse(hn::Eq(wt, zero), hn::Mul(wt, diff)));
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

// The factor turning cached exp((x - shift_c) / T) into q: exp((shift_c - M) / T - log_sum).
// An all -inf chunk holds shift_c = 0 (and zeros): min() keeps its factor finite where the
// row's max M is far below 0 (exp(-M / T) would overflow, and 0 * inf be NaN).
template <class T>
HWY_INLINE T ChunkFactor(T chunk_shift, row_normaliser<T> norm, T inv_t) {
  const double v = (std::min(static_cast<double>(chunk_shift), static_cast<double>(norm.shift)) -
                    static_cast<double>(norm.shift)) * static_cast<double>(inv_t) -
                   static_cast<double>(norm.log_sum);
  return static_cast<T>(std::exp(v));
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
    size_t i = 0;
    for (; i + N <= len; i += N) {
      const auto q = hn::Mul(hn::LoadU(d, ec + i), vf);
      const auto wt = WeightedTarget<false>(d, tc, i, N);
      hn::StoreU(hn::Mul(vcoef, hn::MulSub(q, va, wt)), d, gc + i);
    }
    if (i < len) {
      const auto q = hn::Mul(LoadPart(d, ec + i, len - i, T(0)), vf);
      const auto wt = WeightedTarget<true>(d, tc, i, len - i);
      StorePart(hn::Mul(vcoef, hn::MulSub(q, va, wt)), d, gc + i, len - i);
    }
  }
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
    size_t i = 0;
    for (; i + N <= len; i += N) hn::StoreU(hn::Mul(hn::LoadU(d, ec + i), vf), d, gc + i);
    if (i < len) StorePart(hn::Mul(LoadPart(d, ec + i, len - i, T(0)), vf), d, gc + i, len - i);
  }
}

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

// TargetRowStats for bfloat16 logits and dense bfloat16 targets without class weights:
// wt = keep * t + add. The cache is float.
target_stats TargetRowStatsBf16(const std::uint16_t* x, const std::uint16_t* t, std::int64_t n, float keep, float add,
                                exp_cache<float> cache) {
  const hn::ScalableTag<float> d;
  const size_t N = hn::Lanes(d);
  const auto vkeep = hn::Set(d, keep), vadd = hn::Set(d, add), zero = hn::Zero(d);
  target_stats acc{-kInf, 0.0, 0.0, 0.0};
  for (std::int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const size_t len = static_cast<size_t>(std::min<std::int64_t>(kChunk, n - c0));
    const std::uint16_t* xc = x + c0;
    const std::uint16_t* tc = t + c0;
    V<decltype(d)> m0 = hn::Set(d, kNegInf<float>);
    size_t i = 0;
    for (; i + N <= len; i += N) m0 = hn::Max(m0, LoadBf16(d, xc + i));
    if (i < len) m0 = hn::Max(m0, LoadBf16Part(d, xc + i, len - i, kBf16NegInf));
    const float m = hn::GetLane(hn::MaxOfLanes(d, m0));
    const auto vshift = hn::Set(d, FiniteShift(m));
    float* ec = cache.e ? cache.e + c0 : nullptr;
    if (cache.shifts) cache.shifts[c0 / kChunk] = FiniteShift(m);
    V<decltype(d)> vs = zero, va = zero, vb = zero;
    for (i = 0; i < len; i += N) {
      const bool full = i + N <= len;
      PrefetchNextChunk(xc + i);
      PrefetchNextChunk(tc + i);
      const auto xv = full ? LoadBf16(d, xc + i) : LoadBf16Part(d, xc + i, len - i, kBf16NegInf);
      auto wt = hn::MulAdd(full ? LoadBf16(d, tc + i) : LoadBf16Part(d, tc + i, len - i, 0), vkeep, vadd);
      if (!full) wt = hn::IfThenElseZero(hn::FirstN(d, len - i), wt);
      const auto diff = hn::Sub(xv, vshift);
      const auto e = ExpNonPositive(d, diff);
      vs = hn::Add(vs, e);
      va = hn::Add(va, wt);
      vb = hn::Add(vb, hn::IfThenZeroElse(hn::Eq(wt, zero), hn::Mul(wt, diff)));
      if (ec) {
        if (full)
          hn::StoreU(e, d, ec + i);
        else
          StorePart(e, d, ec + i, len - i);
      }
    }
    merge_into(acc, target_stats{static_cast<double>(m), Total(d, vs), Total(d, va), Total(d, vb)});
  }
  return acc;
}

// g = coef (q a - wt) from the float cache and the bfloat16 targets (read again, from
// cache), rounded and written as bfloat16 straight into the output row.
void TargetRowGradCachedBf16(exp_cache<float> cache, const std::uint16_t* t, std::int64_t n, float keep, float add,
                             row_normaliser<float> norm, float a, float coef, std::uint16_t* g) {
  const hn::ScalableTag<float> d;
  const size_t N = hn::Lanes(d);
  const auto va = hn::Set(d, a), vcoef = hn::Set(d, coef), vkeep = hn::Set(d, keep), vadd = hn::Set(d, add);
#if defined(SOFTCE_NATIVE_BF16) && (HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL)
  if (cpu_has_avx512_bf16()) {
    for (std::int64_t c0 = 0; c0 < n; c0 += kChunk)
      grad_cached_bf16_native(cache.e + c0, t + c0, std::min<std::int64_t>(kChunk, n - c0),
                              ChunkFactor(cache.shifts[c0 / kChunk], norm, 1.0f), a, coef, keep, add, g + c0);
    return;
  }
#endif
  for (std::int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const size_t len = static_cast<size_t>(std::min<std::int64_t>(kChunk, n - c0));
    const auto vf = hn::Set(d, ChunkFactor(cache.shifts[c0 / kChunk], norm, 1.0f));
    const float* ec = cache.e + c0;
    const std::uint16_t* tc = t + c0;
    std::uint16_t* gc = g + c0;
    size_t i = 0;
    for (; i + N <= len; i += N) {
      const auto q = hn::Mul(hn::LoadU(d, ec + i), vf);
      const auto wt = hn::MulAdd(LoadBf16(d, tc + i), vkeep, vadd);
      StoreBf16(d, hn::Mul(vcoef, hn::MulSub(q, va, wt)), gc + i, N);
    }
    if (i < len) {
      const auto q = hn::Mul(LoadPart(d, ec + i, len - i, 0.0f), vf);
      const auto wt = hn::MulAdd(LoadBf16Part(d, tc + i, len - i, 0), vkeep, vadd);
      StoreBf16(d, hn::Mul(vcoef, hn::MulSub(q, va, wt)), gc + i, len - i);
    }
  }
}
// ---------------------------------------------------------------------------------------
// distillation (dense teacher logits)

template <class T>
distill_stats DistillRowStats(const T* x, const T* z, std::int64_t n, T inv_t, distill_kind kind, exp_cache<T> cx,
                              exp_cache<T> cz) {
  const hn::ScalableTag<T> d;
  const size_t N = hn::Lanes(d);
  distill_stats acc{-kInf, 0.0, -kInf, 0.0, 0.0};
  const auto vt = hn::Set(d, inv_t), vneg_inf = hn::Set(d, kNegInf<T>);
  for (std::int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const size_t len = static_cast<size_t>(std::min<std::int64_t>(kChunk, n - c0));
    const T* xc = x + c0;
    const T* zc = z + c0;
    const T mx = ChunkMax(d, xc, len), mz = ChunkMax(d, zc, len);
    const auto vsx = hn::Set(d, FiniteShift(mx)), vsz = hn::Set(d, FiniteShift(mz));
    const auto zero = hn::Zero(d);
    if (cx.shifts) cx.shifts[c0 / kChunk] = FiniteShift(mx);
    if (cz.shifts) cz.shifts[c0 / kChunk] = FiniteShift(mz);
    V<decltype(d)> sx = zero, sz = zero, vk = zero;
    for (size_t i = 0; i < len; i += N) {
      const bool full = i + N <= len;
      PrefetchNextChunk(xc + i);
      PrefetchNextChunk(zc + i);
      const auto xv = full ? hn::LoadU(d, xc + i) : LoadPart(d, xc + i, len - i, kNegInf<T>);
      const auto zv = full ? hn::LoadU(d, zc + i) : LoadPart(d, zc + i, len - i, kNegInf<T>);
      const auto dx = hn::Mul(hn::Sub(xv, vsx), vt), dz = hn::Mul(hn::Sub(zv, vsz), vt);
      const auto ex = ExpNonPositive(d, dx), ez = ExpNonPositive(d, dz);
      sx = hn::Add(sx, ex);
      sz = hn::Add(sz, ez);
      if (cx.e) {
        if (full) {
          hn::StoreU(ex, d, cx.e + c0 + i);
          hn::StoreU(ez, d, cz.e + c0 + i);
        } else {
          StorePart(ex, d, cx.e + c0 + i, len - i);
          StorePart(ez, d, cz.e + c0 + i, len - i);
        }
      }
      // p = 0 only at z = -inf: a p that underflowed in float against q = 0 gives
      // 0 * inf = NaN, which the driver reads as KL = +inf (likewise for q in reverse KL)
      if (kind == distill_kind::kl)
        vk = hn::Add(vk, hn::IfThenZeroElse(hn::Eq(zv, vneg_inf), hn::Mul(ez, hn::Sub(dz, dx))));
      else
        vk = hn::Add(vk, hn::IfThenZeroElse(hn::Eq(xv, vneg_inf), hn::Mul(ex, hn::Sub(dx, dz))));
    }
    merge_into(acc,
               distill_stats{static_cast<double>(mx), Total(d, sx), static_cast<double>(mz),
                             Total(d, sz), Total(d, vk)},
               static_cast<double>(inv_t), kind);
  }
  return acc;
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
                    row_normaliser<T> nz, int kind, T beta, T r, T coef, T* g) {
  const hn::ScalableTag<T> d;
  const size_t N = hn::Lanes(d);
  const auto vt = hn::Set(d, inv_t);
  const auto vsx = hn::Set(d, nx.shift), vlx = hn::Set(d, nx.log_sum);
  const auto vsz = hn::Set(d, nz.shift), vlz = hn::Set(d, nz.log_sum);
  // log beta and log(1 - beta); only jsd (0 < beta < 1) uses them
  const auto vlbeta = hn::Set(d, kind == kGradJsd ? std::log(beta) : T(0));
  const auto vlbeta1 = hn::Set(d, kind == kGradJsd ? std::log1p(-beta) : T(0));
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
    if (kind == kGradKl) {
      gv = hn::Sub(q, ExpNonPositive(d, lp));
    } else {
      const auto lref = kind == kGradReverseKl ? lp : LogMixture(d, lp, lq, vlbeta, vlbeta1);
      gv = hn::IfThenZeroElse(hn::Eq(q, zero), hn::Mul(q, hn::Sub(hn::Sub(lq, lref), vr)));
    }
    gv = hn::Mul(gv, vcoef);
    if (full)
      hn::StoreU(gv, d, g + i);
    else
      StorePart(gv, d, g + i, len - i);
  }
}

template <class T>
void DistillRowGradKlCached(exp_cache<T> cx, exp_cache<T> cz, std::int64_t n, T inv_t, row_normaliser<T> nx,
                            row_normaliser<T> nz, T coef, T* g) {
  const hn::ScalableTag<T> d;
  const size_t N = hn::Lanes(d);
  const auto vcoef = hn::Set(d, coef);
  for (std::int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const size_t len = static_cast<size_t>(std::min<std::int64_t>(kChunk, n - c0));
    const auto fx = hn::Set(d, ChunkFactor(cx.shifts[c0 / kChunk], nx, inv_t));
    const auto fz = hn::Set(d, ChunkFactor(cz.shifts[c0 / kChunk], nz, inv_t));
    for (size_t i = 0; i < len; i += N) {
      const size_t at = static_cast<size_t>(c0) + i;
      if (i + N <= len) {
        const auto q = hn::Mul(hn::LoadU(d, cx.e + at), fx);
        hn::StoreU(hn::Mul(vcoef, hn::NegMulAdd(hn::LoadU(d, cz.e + at), fz, q)), d, g + at);
      } else {
        const auto q = hn::Mul(LoadPart(d, cx.e + at, len - i, T(0)), fx);
        StorePart(hn::Mul(vcoef, hn::NegMulAdd(LoadPart(d, cz.e + at, len - i, T(0)), fz, q)), d, g + at, len - i);
      }
    }
  }
}

// JSD's second pass from the statistics pass's exp caches (no exp per element): p and q
// are the cached exps times their chunk factors, log p and log q come from the logits, and
// log m = log(beta p + (1 - beta) q) is one log per element. Where m is below the smallest
// normal float (beta p and (1 - beta) q underflowing while p or q is positive) the vector
// takes LogMixture's log-space path instead, so log m stays finite and exact there.
// Writes log m to `log_m` (for the gradient pass; it may be cz.e: each ez is read first).
template <class T>
jsd_stats JsdRowStatsCached(const T* x, const T* z, exp_cache<T> cx, exp_cache<T> cz, std::int64_t n, T inv_t,
                            row_normaliser<T> nx, row_normaliser<T> nz, T beta, T* log_m) {
  const hn::ScalableTag<T> d;
  const size_t N = hn::Lanes(d);
  const auto vt = hn::Set(d, inv_t);
  const auto vsx = hn::Set(d, nx.shift), vlx = hn::Set(d, nx.log_sum);
  const auto vsz = hn::Set(d, nz.shift), vlz = hn::Set(d, nz.log_sum);
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
    for (size_t i = 0; i < len; i += N) {
      const size_t at = static_cast<size_t>(c0) + i;
      const bool full = i + N <= len;
      const auto xv = full ? hn::LoadU(d, x + at) : LoadPart(d, x + at, len - i, kNegInf<T>);
      const auto zv = full ? hn::LoadU(d, z + at) : LoadPart(d, z + at, len - i, kNegInf<T>);
      const auto q = hn::Mul(full ? hn::LoadU(d, cx.e + at) : LoadPart(d, cx.e + at, len - i, T(0)), fx);
      const auto p = hn::Mul(full ? hn::LoadU(d, cz.e + at) : LoadPart(d, cz.e + at, len - i, T(0)), fz);
      const auto lq = hn::Sub(hn::Mul(hn::Sub(xv, vsx), vt), vlx);
      const auto lp = hn::Sub(hn::Mul(hn::Sub(zv, vsz), vt), vlz);
      const auto m = hn::MulAdd(vbeta, p, hn::Mul(vbeta1, q));
      const auto small = hn::Lt(m, smallest);
      auto lm = hn::Log(d, hn::Max(m, smallest));
      if (!hn::AllFalse(d, small)) lm = hn::IfThenElse(small, LogMixture(d, lp, lq, vlbeta, vlbeta1), lm);
      kp = hn::Add(kp, hn::IfThenZeroElse(hn::Eq(p, zero), hn::Mul(p, hn::Sub(lp, lm))));
      kq = hn::Add(kq, hn::IfThenZeroElse(hn::Eq(q, zero), hn::Mul(q, hn::Sub(lq, lm))));
      if (full)
        hn::StoreU(lm, d, log_m + at);
      else
        StorePart(lm, d, log_m + at, len - i);
    }
    acc.kl_pm += Total(d, kp);
    acc.kl_qm += Total(d, kq);
  }
  return acc;
}

// reverse_kl / jsd gradient from the student's exp cache (no exp per element):
// g = coef q (log q - log ref - r), q = cached exp times its chunk factor, log q from x,
// log ref = log p from z (reverse_kl, log_m null) or the JSD pass's log m. g may be x.
template <class T>
void DistillRowGradLogCached(const T* x, const T* z, const T* log_m, exp_cache<T> cx, std::int64_t n, T inv_t,
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
      const auto xv = full ? hn::LoadU(d, x + at) : LoadPart(d, x + at, len - i, kNegInf<T>);
      const auto q = hn::Mul(full ? hn::LoadU(d, cx.e + at) : LoadPart(d, cx.e + at, len - i, T(0)), fx);
      const auto lq = hn::Sub(hn::Mul(hn::Sub(xv, vsx), vt), vlx);
      V<decltype(d)> lref;
      if (log_m) {
        lref = full ? hn::LoadU(d, log_m + at) : LoadPart(d, log_m + at, len - i, T(0));
      } else {
        const auto zv = full ? hn::LoadU(d, z + at) : LoadPart(d, z + at, len - i, kNegInf<T>);
        lref = hn::Sub(hn::Mul(hn::Sub(zv, vsz), vt), vlz);
      }
      const auto gv = hn::Mul(vcoef, hn::IfThenZeroElse(hn::Eq(q, zero), hn::Mul(q, hn::Sub(hn::Sub(lq, lref), vr))));
      if (full)
        hn::StoreU(gv, d, g + at);
      else
        StorePart(gv, d, g + at, len - i);
    }
  }
}

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
      const auto xv = load(x, T(0)), tv = load(t, T(0));
      const auto e = ExpNonPositive(d, hn::Neg(hn::Abs(xv)));  // exp(-|x|) in (0, 1]
      const auto softplus_neg = hn::Add(hn::Log1p(d, e), hn::Max(hn::Neg(xv), zero));
      const auto one_minus_t = hn::Sub(one, tv);
      // sigma(x) - 1 is -e / (1 + e) for x >= 0 and -1 / (1 + e) for x < 0 (no cancellation)
      const auto inv = hn::Div(one, hn::Add(one, e));
      const auto sig_minus_one =
          hn::Neg(hn::IfThenElse(hn::Ge(xv, zero), hn::Mul(e, inv), inv));
      auto lw = one;
      if (pos_w) lw = hn::MulAdd(hn::Sub(load(pos_w, T(1)), one), tv, one);
      auto loss = hn::MulAdd(one_minus_t, xv, hn::Mul(lw, softplus_neg));
      auto grad = hn::MulAdd(lw, sig_minus_one, one_minus_t);
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

// Monomorphic entry points for HWY_EXPORT (one per element type).
#define SOFTCE_ENTRY_POINTS(T, S)                                                              \
  softmax_stats SoftmaxRowStats##S(const T* x, std::int64_t n, T it, exp_cache<T> c) {        \
    return SoftmaxRowStats(x, n, it, c);                                                       \
  }                                                                                            \
  void SoftmaxRowGradCached##S(exp_cache<T> c, std::int64_t n, T it, row_normaliser<T> nm, T sc, \
                               T* g) {                                                         \
    SoftmaxRowGradCached(c, n, it, nm, sc, g);                                                 \
  }                                                                                            \
  void ScaleRow##S(const T* in, std::int64_t n, T f, T* out) { ScaleRow(in, n, f, out); }       \
  T ChunkMax##S(const T* x, std::int64_t n) {                                                  \
    return ChunkMax(hn::ScalableTag<T>(), x, static_cast<size_t>(n));                          \
  }                                                                                            \
  double ExpSumExcluding##S(const T* x, std::int64_t n, T it, T sh, const std::int64_t* ex,     \
                            std::int64_t cnt) {                                                \
    return ExpSumExcluding(x, n, it, sh, ex, cnt);                                             \
  }                                                                                            \
  void SoftmaxRowGrad##S(const T* x, std::int64_t n, T it, row_normaliser<T> nm, T sc, T* g) { \
    SoftmaxRowGrad(x, n, it, nm, sc, g);                                                       \
  }                                                                                            \
  target_stats TargetRowStats##S(const T* x, std::int64_t n, const target_desc<T>& t,          \
                                 exp_cache<T> c) {                                             \
    return TargetRowStats(x, n, t, c);                                                         \
  }                                                                                            \
  void TargetRowGradCached##S(exp_cache<T> c, std::int64_t n, const target_desc<T>& t,         \
                              row_normaliser<T> nm, T a, T coef, T* g) {                       \
    TargetRowGradCached(c, n, t, nm, a, coef, g);                                              \
  }                                                                                            \
  void DistillRowGradKlCached##S(exp_cache<T> cx, exp_cache<T> cz, std::int64_t n, T it,       \
                                 row_normaliser<T> nx, row_normaliser<T> nz, T coef, T* g) {   \
    DistillRowGradKlCached(cx, cz, n, it, nx, nz, coef, g);                                    \
  }                                                                                            \
  void TargetRowGrad##S(const T* x, std::int64_t n, const target_desc<T>& t,                   \
                        row_normaliser<T> nm, T a, T coef, T* g) {                             \
    TargetRowGrad(x, n, t, nm, a, coef, g);                                                    \
  }                                                                                            \
  distill_stats DistillRowStats##S(const T* x, const T* z, std::int64_t n, T it,               \
                                   distill_kind k, exp_cache<T> cx, exp_cache<T> cz) {         \
    return DistillRowStats(x, z, n, it, k, cx, cz);                                            \
  }                                                                                            \
  jsd_stats JsdRowStats##S(const T* x, const T* z, std::int64_t n, T it, row_normaliser<T> nx, \
                           row_normaliser<T> nz, T beta) {                                     \
    return JsdRowStats(x, z, n, it, nx, nz, beta);                                             \
  }                                                                                            \
  jsd_stats JsdRowStatsCached##S(const T* x, const T* z, exp_cache<T> cx, exp_cache<T> cz,       \
                                std::int64_t n, T it, row_normaliser<T> nx, row_normaliser<T> nz, \
                                T beta, T* lm) {                                              \
    return JsdRowStatsCached(x, z, cx, cz, n, it, nx, nz, beta, lm);                           \
  }                                                                                            \
  void DistillRowGradLogCached##S(const T* x, const T* z, const T* lm, exp_cache<T> cx,         \
                                  std::int64_t n, T it, row_normaliser<T> nx,                  \
                                  row_normaliser<T> nz, T r, T coef, T* g) {                   \
    DistillRowGradLogCached(x, z, lm, cx, n, it, nx, nz, r, coef, g);                          \
  }                                                                                            \
  void DistillRowGrad##S(const T* x, const T* z, std::int64_t n, T it, row_normaliser<T> nx,   \
                         row_normaliser<T> nz, int kind, T beta, T r, T coef, T* g) {          \
    DistillRowGrad(x, z, n, it, nx, nz, kind, beta, r, coef, g);                               \
  }                                                                                            \
  double KlDivElements##S(const T* x, const T* t, std::int64_t n, bool lt, T coef, T* g,       \
                          T* l) {                                                              \
    return KlDivElements(x, t, n, lt, coef, g, l);                                             \
  }                                                                                            \
  double BceElements##S(const T* x, const T* t, const T* w, const T* pw, std::int64_t n,       \
                        T coef, T* g, T* l) {                                                  \
    return BceElements(x, t, w, pw, n, coef, g, l);                                            \
  }
SOFTCE_ENTRY_POINTS(float, F32)
SOFTCE_ENTRY_POINTS(double, F64)
#undef SOFTCE_ENTRY_POINTS

const char* TargetName() { return hwy::TargetName(HWY_TARGET); }


}  // namespace HWY_NAMESPACE
}  // namespace softce::detail
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace softce::detail {

HWY_EXPORT(TargetName);
HWY_EXPORT(TargetRowStatsBf16);
HWY_EXPORT(TargetRowGradCachedBf16);

target_stats target_row_stats_bf16(const std::uint16_t* x, const std::uint16_t* t, std::int64_t n, float keep,
                                   float add, exp_cache<float> cache) {
  return HWY_DYNAMIC_DISPATCH(TargetRowStatsBf16)(x, t, n, keep, add, cache);
}
void target_row_grad_cached_bf16(exp_cache<float> cache, const std::uint16_t* t, std::int64_t n, float keep,
                                 float add, row_normaliser<float> norm, float a, float coef, std::uint16_t* g) {
  HWY_DYNAMIC_DISPATCH(TargetRowGradCachedBf16)(cache, t, n, keep, add, norm, a, coef, g);
}
HWY_EXPORT(HalfToFloat);
HWY_EXPORT(FloatToHalf);

void half_to_float(const std::uint16_t* in, bool bfloat, std::int64_t n, float* out) {
  HWY_DYNAMIC_DISPATCH(HalfToFloat)(in, bfloat, n, out);
}
void float_to_half(const float* in, bool bfloat, std::int64_t n, std::uint16_t* out) {
  HWY_DYNAMIC_DISPATCH(FloatToHalf)(in, bfloat, n, out);
}
#define SOFTCE_EXPORT(S)          \
  HWY_EXPORT(SoftmaxRowStats##S); \
  HWY_EXPORT(SoftmaxRowGrad##S);  \
  HWY_EXPORT(SoftmaxRowGradCached##S); \
  HWY_EXPORT(ScaleRow##S);        \
  HWY_EXPORT(ChunkMax##S);        \
  HWY_EXPORT(ExpSumExcluding##S); \
  HWY_EXPORT(TargetRowStats##S);  \
  HWY_EXPORT(TargetRowGrad##S);   \
  HWY_EXPORT(TargetRowGradCached##S); \
  HWY_EXPORT(DistillRowGradKlCached##S); \
  HWY_EXPORT(DistillRowStats##S); \
  HWY_EXPORT(JsdRowStats##S);     \
  HWY_EXPORT(DistillRowGrad##S);  \
  HWY_EXPORT(JsdRowStatsCached##S); \
  HWY_EXPORT(DistillRowGradLogCached##S); \
  HWY_EXPORT(KlDivElements##S);   \
  HWY_EXPORT(BceElements##S);
SOFTCE_EXPORT(F32)
SOFTCE_EXPORT(F64)
#undef SOFTCE_EXPORT

#define SOFTCE_DISPATCH(T, S)                                                                   \
  softmax_stats softmax_row_stats(const T* x, std::int64_t n, T it, exp_cache<T> c) {           \
    return HWY_DYNAMIC_DISPATCH(SoftmaxRowStats##S)(x, n, it, c);                               \
  }                                                                                             \
  void softmax_row_grad_cached(exp_cache<T> c, std::int64_t n, T it, row_normaliser<T> nm, T sc, \
                               T* g) {                                                          \
    HWY_DYNAMIC_DISPATCH(SoftmaxRowGradCached##S)(c, n, it, nm, sc, g);                         \
  }                                                                                             \
  void scale_row(const T* in, std::int64_t n, T f, T* out) {                                    \
    HWY_DYNAMIC_DISPATCH(ScaleRow##S)(in, n, f, out);                                           \
  }                                                                                             \
  T chunk_max(const T* x, std::int64_t n) { return HWY_DYNAMIC_DISPATCH(ChunkMax##S)(x, n); }   \
  void softmax_row_grad(const T* x, std::int64_t n, T it, row_normaliser<T> nm, T sc, T* g) {   \
    HWY_DYNAMIC_DISPATCH(SoftmaxRowGrad##S)(x, n, it, nm, sc, g);                               \
  }                                                                                             \
  double exp_sum_excluding(const T* x, std::int64_t n, T it, T sh, const std::int64_t* ex,      \
                           std::int64_t cnt) {                                                  \
    return HWY_DYNAMIC_DISPATCH(ExpSumExcluding##S)(x, n, it, sh, ex, cnt);                     \
  }                                                                                             \
  target_stats target_row_stats(const T* x, std::int64_t n, const target_desc<T>& t,           \
                                exp_cache<T> c) {                                               \
    return HWY_DYNAMIC_DISPATCH(TargetRowStats##S)(x, n, t, c);                                 \
  }                                                                                             \
  void target_row_grad_cached(exp_cache<T> c, std::int64_t n, const target_desc<T>& t,          \
                              row_normaliser<T> nm, T a, T coef, T* g) {                        \
    HWY_DYNAMIC_DISPATCH(TargetRowGradCached##S)(c, n, t, nm, a, coef, g);                      \
  }                                                                                             \
  void distill_row_grad_kl_cached(exp_cache<T> cx, exp_cache<T> cz, std::int64_t n, T it,       \
                                  row_normaliser<T> nx, row_normaliser<T> nz, T coef, T* g) {   \
    HWY_DYNAMIC_DISPATCH(DistillRowGradKlCached##S)(cx, cz, n, it, nx, nz, coef, g);            \
  }                                                                                             \
  void target_row_grad(const T* x, std::int64_t n, const target_desc<T>& t,                     \
                       row_normaliser<T> nm, T a, T coef, T* g) {                               \
    HWY_DYNAMIC_DISPATCH(TargetRowGrad##S)(x, n, t, nm, a, coef, g);                            \
  }                                                                                             \
  distill_stats distill_row_stats(const T* x, const T* z, std::int64_t n, T it,                 \
                                  distill_kind k, exp_cache<T> cx, exp_cache<T> cz) {           \
    return HWY_DYNAMIC_DISPATCH(DistillRowStats##S)(x, z, n, it, k, cx, cz);                    \
  }                                                                                             \
  jsd_stats jsd_row_stats(const T* x, const T* z, std::int64_t n, T it, row_normaliser<T> nx,   \
                          row_normaliser<T> nz, T beta) {                                       \
    return HWY_DYNAMIC_DISPATCH(JsdRowStats##S)(x, z, n, it, nx, nz, beta);                     \
  }                                                                                             \
  jsd_stats jsd_row_stats_cached(const T* x, const T* z, exp_cache<T> cx, exp_cache<T> cz,       \
                                 std::int64_t n, T it, row_normaliser<T> nx, row_normaliser<T> nz, \
                                 T beta, T* lm) {                                              \
    return HWY_DYNAMIC_DISPATCH(JsdRowStatsCached##S)(x, z, cx, cz, n, it, nx, nz, beta, lm);   \
  }                                                                                             \
  void distill_row_grad_log_cached(const T* x, const T* z, const T* lm, exp_cache<T> cx,        \
                                   std::int64_t n, T it, row_normaliser<T> nx,                  \
                                   row_normaliser<T> nz, T r, T coef, T* g) {                   \
    HWY_DYNAMIC_DISPATCH(DistillRowGradLogCached##S)(x, z, lm, cx, n, it, nx, nz, r, coef, g);  \
  }                                                                                             \
  void distill_row_grad(const T* x, const T* z, std::int64_t n, T it, row_normaliser<T> nx,     \
                        row_normaliser<T> nz, int kind, T beta, T r, T coef, T* g) {            \
    HWY_DYNAMIC_DISPATCH(DistillRowGrad##S)(x, z, n, it, nx, nz, kind, beta, r, coef, g);       \
  }                                                                                             \
  double kl_div_elements(const T* x, const T* t, std::int64_t n, bool lt, T coef, T* g,         \
                         T* l) {                                                                \
    return HWY_DYNAMIC_DISPATCH(KlDivElements##S)(x, t, n, lt, coef, g, l);                     \
  }                                                                                             \
  double bce_elements(const T* x, const T* t, const T* w, const T* pw, std::int64_t n, T coef,  \
                      T* g, T* l) {                                                             \
    return HWY_DYNAMIC_DISPATCH(BceElements##S)(x, t, w, pw, n, coef, g, l);                    \
  }
SOFTCE_DISPATCH(float, F32)
SOFTCE_DISPATCH(double, F64)
#undef SOFTCE_DISPATCH

std::string simd_target_name() { return HWY_DYNAMIC_DISPATCH(TargetName)(); }

}  // namespace softce::detail
#endif  // HWY_ONCE
