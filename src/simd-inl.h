// SIMD building blocks of the row kernels: exp and log that keep 0, -inf and NaN exact,
// partial vectors at a slice's end, chunk max, horizontal totals, the cache's chunk factor.
//
// Each kernel walks a contiguous slice in chunks of kChunk elements. Per chunk: a max
// pass, then a pass that accumulates exp and the target moments in vector registers of T
// while the chunk is in L1; the chunk totals are merged in double (row_stats.hpp). Keeping
// float accumulation to one chunk bounds its rounding error (~kChunk / lanes terms per
// lane) while the row-level sums stay exact to double precision.
//
// Differences are formed as (x - shift) before scaling by 1 / T: x - shift is exact for
// nearby floats, so logits offset by 1e4 lose nothing.
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
#include <type_traits>

#include "kernels.hpp"
#include "row_stats.hpp"
#include "threading.hpp"

#if defined(SOFTCE_SRC_SIMD_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef SOFTCE_SRC_SIMD_INL_H_
#undef SOFTCE_SRC_SIMD_INL_H_
#else
#define SOFTCE_SRC_SIMD_INL_H_
#endif

#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>
#include <hwy/cache_control.h>

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
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
  } else if constexpr (std::is_same_v<V<D>, hn::Vec512<float>>) {
    // AVX-512: the same reduction and polynomial in 14 instructions instead of ~21. k is
    // rounded with the 1.5 * 2^23 shifter (no vrndscaleps: 2 uops), 2^k is applied with
    // vscalefps straight from the float k (no float -> int conversion, whose AVX3 form
    // in Highway is three instructions, no shift and add), and the `tiny` lanes are zeroed
    // by the same instruction's zero mask. scalef(1 + em1, k) equals the generic
    // MulAdd(em1, 2^k, 2^k) wherever the result is a normal float (scaling by a power of two
    // commutes with rounding); k may differ from Round(x log2e) by one where x log2e lies
    // within an ulp of a half-integer (the shifter adds before rounding), which moves r
    // just outside [-ln2/2, ln2/2], where the polynomial is still accurate to ~1 ulp.
    const __m512 lowest = _mm512_set1_ps(-87.3365402f);  // log(FLT_MIN)
    const __m512 shifter = _mm512_set1_ps(12582912.0f);  // 1.5 * 2^23
    const __mmask16 tiny = _mm512_cmp_ps_mask(v.raw, lowest, _CMP_LT_OQ);
    // No clamp: a lane below `lowest` (-inf included) computes garbage or NaN that the
    // zero mask of the final vscalefps discards; NaN stays NaN (not `tiny`).
    const __m512 kf =
        _mm512_sub_ps(_mm512_fmadd_ps(v.raw, _mm512_set1_ps(1.44269504088896341f), shifter), shifter);
    __m512 r = _mm512_fmadd_ps(kf, _mm512_set1_ps(-0.693145751953125f), v.raw);
    r = _mm512_fmadd_ps(kf, _mm512_set1_ps(-1.428606765330187045e-6f), r);
    const __m512 r2 = _mm512_mul_ps(r, r);
    const __m512 p01 = _mm512_fmadd_ps(_mm512_set1_ps(0.166666671633720397949219f), r, _mm512_set1_ps(0.5f));
    const __m512 p23 =
        _mm512_fmadd_ps(_mm512_set1_ps(0.00833336077630519866943359f), r, _mm512_set1_ps(0.0416664853692054748535156f));
    const __m512 p45 = _mm512_fmadd_ps(_mm512_set1_ps(0.000198527617612853646278381f), r,
                                       _mm512_set1_ps(0.00139304355252534151077271f));
    const __m512 p = _mm512_fmadd_ps(_mm512_fmadd_ps(p45, r2, p23), r2, p01);
    const __m512 e = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0f));  // exp(r)
    return V<D>{_mm512_maskz_scalef_ps(static_cast<__mmask16>(~tiny), e, kf)};
#endif
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

// log(v) for v >= the smallest normal (callers route smaller values elsewhere); NaN stays
// NaN, +inf gives +inf. Highway's Log (musl's method: log = 2 atanh(z), z = (y - 1) / (y + 1)
// for the mantissa y in [sqrt(2)/2, sqrt(2)), exponent times ln 2 in two parts) with, on
// AVX-512, the exponent and mantissa from vgetexpps / vgetmantps and the division z replaced
// by a reciprocal estimate and one Newton step on the quotient (~1 ulp; vdivps alone costs
// about as much as the rest of the log, and it ran once per element in the JSD pass).
template <class D>
HWY_INLINE V<D> LogNormal(D d, V<D> v) {
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
  if constexpr (std::is_same_v<V<D>, hn::Vec512<float>>) {
    __m512 y = _mm512_maskz_getmant_ps(0xFFFF, v.raw, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);  // [1, 2)
    __m512 e = _mm512_maskz_getexp_ps(0xFFFF, v.raw);                                         // floor(log2 v)
    const __mmask16 big = _mm512_cmp_ps_mask(y, _mm512_set1_ps(1.41421356f), _CMP_GT_OQ);
    y = _mm512_mask_mul_ps(y, big, y, _mm512_set1_ps(0.5f));
    e = _mm512_mask_add_ps(e, big, e, _mm512_set1_ps(1.0f));
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 ym1 = _mm512_sub_ps(y, one);
    const __m512 den = _mm512_add_ps(y, one);
    const __m512 rcp = _mm512_maskz_rcp14_ps(0xFFFF, den);
    const __m512 z0 = _mm512_mul_ps(ym1, rcp);
    const __m512 z = _mm512_fmadd_ps(rcp, _mm512_fnmadd_ps(den, z0, ym1), z0);
    // Highway's LogImpl<float>::LogPoly and reconstruction
    const __m512 x2 = _mm512_mul_ps(z, z);
    const __m512 x4 = _mm512_mul_ps(x2, x2);
    const __m512 poly = _mm512_fmadd_ps(
        _mm512_fmadd_ps(_mm512_set1_ps(0.28498786688f), x4, _mm512_set1_ps(0.66666662693f)), x2,
        _mm512_mul_ps(_mm512_fmadd_ps(_mm512_set1_ps(0.24279078841f), x4, _mm512_set1_ps(0.40000972152f)), x4));
    const __m512 lo = _mm512_fmsub_ps(z, _mm512_sub_ps(ym1, poly), _mm512_mul_ps(e, _mm512_set1_ps(9.0580006145e-6f)));
    return V<D>{_mm512_fmsub_ps(e, _mm512_set1_ps(0.69313812256f), _mm512_sub_ps(lo, ym1))};
  }
#endif
  return hn::Log(d, v);
}

// 1 / v for v in [1, 2] (and NaN). AVX-512 float: the 14-bit reciprocal estimate and one
// Newton step, r + r (1 - v r), within an ulp and exactly 1 at v = 1 (the step's error is
// the estimate's squared, < 2^-28); vdivps alone costs about as much as a log. Elsewhere a
// division.
template <class D>
HWY_INLINE V<D> ReciprocalOneTwo(D d, V<D> v) {
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
  if constexpr (std::is_same_v<V<D>, hn::Vec512<float>>) {
    const __m512 r = _mm512_maskz_rcp14_ps(0xFFFF, v.raw);
    return V<D>{_mm512_fmadd_ps(r, _mm512_fnmadd_ps(v.raw, r, _mm512_set1_ps(1.0f)), r)};
  }
#endif
  return hn::Div(hn::Set(d, hn::TFromD<D>(1)), v);
}

// log(1 + e) for e in [0, 1] (and NaN), given inv = 1 / (1 + e): log u for the rounded
// u = 1 + e, corrected by the rounding, (e - (u - 1)) / u. No division (Highway's Log1p
// divides twice); e below an ulp of 1 gives u = 1, log u = 0 and exactly e.
template <class D>
HWY_INLINE V<D> Log1pUnit(D d, V<D> e, V<D> inv) {
  const auto one = hn::Set(d, hn::TFromD<D>(1));
  const auto u = hn::Add(one, e);
  return hn::MulAdd(hn::Sub(e, hn::Sub(u, one)), inv, LogNormal(d, u));
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

// acc + w d where w != 0, acc where w == 0 (a zero weight times an infinite difference
// adds 0, not NaN; a NaN weight is != 0 and poisons acc). One rounding (FMA). On AVX-512
// a single merge-masked FMA (the compiler leaves the generic form as compare, FMA and
// blend); elsewhere the generic form.
template <class D>
HWY_INLINE V<D> AddWhereWeighted(D d, V<D> acc, V<D> w, V<D> diff) {
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
  if constexpr (std::is_same_v<V<D>, hn::Vec512<float>>) {
    const __mmask16 nz = _mm512_cmp_ps_mask(w.raw, _mm512_setzero_ps(), _CMP_NEQ_UQ);
    return V<D>{_mm512_mask3_fmadd_ps(w.raw, diff.raw, acc.raw, nz)};
  } else if constexpr (std::is_same_v<V<D>, hn::Vec512<double>>) {
    const __mmask8 nz = _mm512_cmp_pd_mask(w.raw, _mm512_setzero_pd(), _CMP_NEQ_UQ);
    return V<D>{_mm512_mask3_fmadd_pd(w.raw, diff.raw, acc.raw, nz)};
  }
#endif
  return hn::IfThenElse(hn::Eq(w, hn::Zero(d)), acc, hn::MulAdd(w, diff, acc));
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

// The same prefetch serves the lines a statistics pass writes its exps to when they are
// not the logits' (a fresh gradient buffer, the default call): the line is in cache before
// the stores reach it instead of each store missing on its own (a read prefetch,
// prefetcht0; PREFETCHW measured no better). Statistics pass, fresh gradient buffer,
// distillation KL 1024x32000, 2 threads, Intel Xeon AVX-512: 22.4/23.0 -> 17.3/16.5 ms.

// A gradient pass over a piece of kRowPiece classes (the pieces of a longer row; a row of
// exactly kRowPiece classes too, harmlessly): the statistics pass's data is no longer all
// in this core's cache, so the pass prefetches what it reads a chunk ahead as well (dense
// soft CE, N = 8, C = 1M, in place, 2 threads, softce_bench: 3.57/3.40 -> 2.76/2.85 ms,
// Intel Xeon AVX-512). Shorter rows, in cache, skip it.
HWY_INLINE bool LongRowPiece(std::int64_t n) { return n >= kRowPiece; }

// Runs body(i) over the whole vectors of a chunk of `len` elements, N at a time, preceded
// by prefetch(i) when `prefetching` (the gradient passes over long-row pieces); returns
// where the partial vector starts. Two loops, so that the common case carries no test.
template <class Prefetch, class Body>
HWY_INLINE size_t WholeVectors(size_t len, size_t N, bool prefetching, Prefetch prefetch, Body body) {
  size_t i = 0;
  if (prefetching) {
    for (; i + N <= len; i += N) {
      prefetch(i);
      body(i);
    }
  }
  for (; i + N <= len; i += N) body(i);
  return i;
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

}  // namespace HWY_NAMESPACE
}  // namespace softce::detail
HWY_AFTER_NAMESPACE();

#endif  // SOFTCE_SRC_SIMD_INL_H_
