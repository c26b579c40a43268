// The fused row kernels (SIMD, Highway runtime dispatch), seen from the driver: the data
// they exchange with it, and the kernel table (kernel_table, kernels_for<T>()) through which
// a driver calls them. The bodies are in the -inl.h files listed in kernels.cpp.
//
// Every kernel works on ONE contiguous row slice of T = float or double (the driver stages
// strided or 16-bit rows into contiguous buffers first) and returns partial row statistics
// in double. Statistics of two slices merge exactly (the row-statistics monoid, see
// row_stats.hpp), so a row may be processed as one slice, in pieces, or split across
// processes. Each kernel walks its slice in chunks of `kChunk` elements: a max pass and a
// sum pass per chunk while the chunk is in L1, the chunk results merged in double.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

namespace softce::detail {

inline constexpr std::int64_t kChunk = 1024;

// Softmax statistics of x * inv_temperature over a slice: shift = a value of max(x)
// (0 when the slice is all -inf), sum = Σ exp((x - shift) * inv_temperature).
struct softmax_stats {
  double shift = 0;
  double sum = 0;
};

// Probability-target statistics: with t'_c = keep * t_c + add (t = dense target, or the
// one-hot of `onehot`, or 0 when neither), wt_c = w_c * t'_c:
//   a = Σ wt,  b = Σ wt * (x - shift)  (terms with wt = 0 skipped).
struct target_stats {
  double shift = 0;
  double sum = 0;
  double a = 0;
  double b = 0;
};

template <class T>
struct target_desc {
  const T* dense = nullptr;    // dense target row, or null
  std::int64_t onehot = -1;    // index of the 1 within the slice, or -1
  const T* weight = nullptr;   // class weights of the slice, or null (all 1)
  T keep = 1;                  // 1 - label_smoothing
  T add = 0;                   // label_smoothing / C
};

// Distillation statistics of a slice, student x and teacher z, both scaled by
// inv_temperature; k is Σ ez (dz - dx) for kl and Σ ex (dx - dz) for reverse_kl, where
// dx = (x - shift_x) / T, ex = exp(dx) (likewise for z).
struct distill_stats {
  double shift_x = 0, sum_x = 0;
  double shift_z = 0, sum_z = 0;
  double k = 0;
};

// Second pass of the generalised JSD (needs the row's softmax normalisers):
// kl_pm = Σ p (log p - log m), kl_qm = Σ q (log q - log m), m = beta p + (1 - beta) q.
struct jsd_stats {
  double kl_pm = 0;
  double kl_qm = 0;
};

// The row's normalisers as the gradient passes need them: log q = (x - shift) * inv_t - log_sum.
template <class T>
struct row_normaliser {
  T shift;
  T log_sum;
};

// none: the sums only, k left 0 (jsd, whose divergence comes from its second pass)
enum class distill_kind { kl, reverse_kl, none };

// Optional output of a statistics pass, so that the gradient pass needs no second exp:
// e[i] = exp((x[i] - shift_c) / T) and shifts[c] = shift_c for each chunk c. `e` may be
// the gradient buffer itself (even when that aliases x: each element is read before it is
// overwritten).
template <class T>
struct exp_cache {
  T* e = nullptr;
  T* shifts = nullptr;  // ceil(n / kChunk) entries
};

// The gradient kernels' divergence: kl = KL(p || q), reverse_kl = KL(q || p), jsd = the
// generalised JSD with mixture m = beta p + (1 - beta) q.
enum class grad_kind { kl, reverse_kl, jsd };

// ---------------------------------------------------------------------------------------
// The kernel table: one function pointer per kernel, for one SIMD target. A driver fetches
// it once per call (kernels_for<T>()) and calls through it row after row; the bodies live in
// the -inl.h files (Highway's pattern), compiled once per target by kernels.cpp. Adding a
// kernel: its body in an -inl.h file, and its entry here plus its line in kernels.cpp's
// table (the compiler rejects a table that misses an entry).
template <class T>
struct kernel_table {
  // softmax statistics; with a cache: e = exp((x - shift_c) * inv_t) and the chunk shifts
  softmax_stats (*softmax_row_stats)(const T* x, std::int64_t n, T inv_temperature, exp_cache<T> cache);
  // g = scale * q from a softmax_row_stats cache (g may be cache.e)
  void (*softmax_row_grad_cached)(exp_cache<T> cache, std::int64_t n, T inv_temperature, row_normaliser<T> norm,
                                  T scale, T* g);
  // g = scale * exp((x - shift) * inv_t - log_sum)
  void (*softmax_row_grad)(const T* x, std::int64_t n, T inv_temperature, row_normaliser<T> norm, T scale, T* g);
  // out = factor * in (out may be in)
  void (*scale_row)(const T* in, std::int64_t n, T factor, T* out);
  // max over n <= kChunk elements, exactly the max softmax_row_stats takes of a chunk
  T (*chunk_max)(const T* x, std::int64_t n);
  // Σ exp((x - shift) * inv_t) over the slice except the (sorted) excluded indices
  double (*exp_sum_excluding)(const T* x, std::int64_t n, T inv_temperature, T shift, const std::int64_t* excluded,
                              std::int64_t excluded_count);

  // probability / one-hot targets
  target_stats (*target_row_stats)(const T* x, std::int64_t n, const target_desc<T>& t, exp_cache<T> cache);
  // g = coef * (q * a - w * t')
  void (*target_row_grad)(const T* x, std::int64_t n, const target_desc<T>& t, row_normaliser<T> norm, T a, T coef,
                          T* g);
  // the same from a cache: q = e * exp(shift_c - norm.shift - norm.log_sum)
  void (*target_row_grad_cached)(exp_cache<T> cache, std::int64_t n, const target_desc<T>& t, row_normaliser<T> norm,
                                 T a, T coef, T* g);
  // rows of n <= small_row_classes() contiguous classes, a block of rows in one call, dense
  // targets t or class indices `labels` (< 0: ignored row): losses[r] the row's loss,
  // g (null, or may be x) = coef * (q * a - w * t')
  void (*small_target_rows)(const T* x, std::int64_t x_stride, const T* t, std::int64_t t_stride,
                            const std::int64_t* labels, bool own_class_weight, const T* weight, std::int64_t rows,
                            std::int64_t n, T keep, T add, T coef, T* g, std::int64_t g_stride, double* losses);
  std::int64_t (*small_row_classes)();  // one vector of T

  // distillation (dense teacher logits)
  distill_stats (*distill_row_stats)(const T* x, const T* z, std::int64_t n, T inv_temperature, distill_kind kind,
                                     exp_cache<T> cx, exp_cache<T> cz);
  // kl gradient from caches: g = coef (q - p)
  void (*distill_row_grad_kl_cached)(exp_cache<T> cx, exp_cache<T> cz, std::int64_t n, T inv_temperature,
                                     row_normaliser<T> nx, row_normaliser<T> nz, T coef, T* g);
  jsd_stats (*jsd_row_stats)(const T* x, const T* z, std::int64_t n, T inv_temperature, row_normaliser<T> nx,
                             row_normaliser<T> nz, T beta);
  // jsd's second pass from exp caches (one log per element); writes log q - log m (may be cz.e)
  jsd_stats (*jsd_row_stats_cached)(const T* x, const T* z, exp_cache<T> cx, exp_cache<T> cz, std::int64_t n,
                                    T inv_temperature, row_normaliser<T> nx, row_normaliser<T> nz, T beta, T* log_ratio);
  // reverse_kl (log_ratio null: log q - log p from x and z) / jsd (log_ratio = log q - log m
  // from jsd_row_stats_cached) gradient from the student's exp cache:
  // g = coef q (log q - log ref - r), no exp per element; g may be x
  void (*distill_row_grad_log_cached)(const T* x, const T* z, const T* log_ratio, exp_cache<T> cx, std::int64_t n,
                                      T inv_temperature, row_normaliser<T> nx, row_normaliser<T> nz, T r, T coef,
                                      T* g);
  // reverse_kl gradient from the statistics pass's caches alone: cx the student's exps,
  // cdiff.e = dx - dz (what distill_row_stats caches for reverse_kl in place of the
  // teacher's exps), cdiff.shifts the teacher's chunk shifts; g may be x
  void (*distill_row_grad_reverse_cached)(exp_cache<T> cx, exp_cache<T> cdiff, std::int64_t n, T inv_temperature,
                                          row_normaliser<T> nx, row_normaliser<T> nz, T r, T coef, T* g);
  // kl: g = coef (q - p); reverse_kl: g = coef q (log q - log p - r);
  // jsd: g = coef q (log q - log m - r), m = beta p + (1 - beta) q
  void (*distill_row_grad)(const T* x, const T* z, std::int64_t n, T inv_temperature, row_normaliser<T> nx,
                           row_normaliser<T> nz, grad_kind kind, T beta, T r, T coef, T* g);

  // element-wise: return Σ loss over the slice; write grad (coef * dloss) and the element
  // losses where the pointers are non-null
  double (*kl_div_elements)(const T* x, const T* t, std::int64_t n, bool log_target, T coef, T* g, T* losses);
  double (*bce_elements)(const T* x, const T* t, const T* w, const T* pos_w, std::int64_t n, T coef, T* g,
                         T* losses);
};

// 16-bit kernels: bfloat16 rows read in place, and 16-bit float conversion.
struct half_kernel_table {
  // dense cross-entropy statistics and cached gradient reading bfloat16 logits and targets
  // in place (no class weights): wt = keep * t + add; the gradient is written as bfloat16
  target_stats (*target_row_stats_bf16)(const std::uint16_t* x, const std::uint16_t* t, std::int64_t n, float keep,
                                        float add, exp_cache<float> cache);
  void (*target_row_grad_cached_bf16)(exp_cache<float> cache, const std::uint16_t* t, std::int64_t n, float keep,
                                      float add, row_normaliser<float> norm, float a, float coef, std::uint16_t* g);
  // conversion of contiguous arrays (round to nearest even on the way down)
  void (*half_to_float)(const std::uint16_t* in, bool bfloat, std::int64_t n, float* out);
  void (*float_to_half)(const float* in, bool bfloat, std::int64_t n, std::uint16_t* out);
};

// Every kernel of one SIMD target.
struct kernel_set {
  kernel_table<float> f32;
  kernel_table<double> f64;
  half_kernel_table half;
  const char* (*target_name)();
};

// The kernels of the SIMD target the dispatcher picks now (Highway's runtime dispatch: the
// best target this CPU runs, or the one a test forced). Fetch once per call, not per row.
const kernel_set& kernels();

template <class T>
inline const kernel_table<T>& kernels_for() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
  if constexpr (std::is_same_v<T, float>)
    return kernels().f32;
  else
    return kernels().f64;
}

// 16-bit float conversion of contiguous arrays through the current target's kernels (for
// callers outside a driver's call; drivers use kernels().half).
inline void half_to_float(const std::uint16_t* in, bool bfloat, std::int64_t n, float* out) {
  kernels().half.half_to_float(in, bfloat, n, out);
}
inline void float_to_half(const float* in, bool bfloat, std::int64_t n, std::uint16_t* out) {
  kernels().half.float_to_half(in, bfloat, n, out);
}

// Name of the SIMD target the dispatcher picked.
std::string simd_target_name();

}  // namespace softce::detail
