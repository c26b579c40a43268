// The fused row kernels (SIMD, Highway runtime dispatch), seen from the driver.
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

enum class distill_kind { kl, reverse_kl };

// Optional output of a statistics pass, so that the gradient pass needs no second exp:
// e[i] = exp((x[i] - shift_c) / T) and shifts[c] = shift_c for each chunk c. `e` may be
// the gradient buffer itself (even when that aliases x: each element is read before it is
// overwritten).
template <class T>
struct exp_cache {
  T* e = nullptr;
  T* shifts = nullptr;  // ceil(n / kChunk) entries
};

#define SOFTCE_DECLARE_KERNELS(T)                                                          \
  /* with a cache: e = exp((x - shift_c) * inv_t) and the chunk shifts, for the gradient */ \
  softmax_stats softmax_row_stats(const T* x, std::int64_t n, T inv_temperature,          \
                                  exp_cache<T> cache);                                     \
  /* g = scale * q from a softmax_row_stats cache (g may be cache.e) */                    \
  void softmax_row_grad_cached(exp_cache<T> cache, std::int64_t n, T inv_temperature,      \
                               row_normaliser<T> norm, T scale, T* g);                     \
  /* out = factor * in (out may be in) */                                                   \
  void scale_row(const T* in, std::int64_t n, T factor, T* out);                           \
  /* max over n <= kChunk elements, exactly the max softmax_row_stats takes of a chunk */  \
  T chunk_max(const T* x, std::int64_t n);                                                 \
  /* Σ exp((x - shift) * inv_t) over the slice except the (sorted) excluded indices */      \
  double exp_sum_excluding(const T* x, std::int64_t n, T inv_temperature, T shift,           \
                           const std::int64_t* excluded, std::int64_t excluded_count);       \
  /* g = scale * exp((x - shift) * inv_t - log_sum) */                                     \
  void softmax_row_grad(const T* x, std::int64_t n, T inv_temperature,                     \
                        row_normaliser<T> norm, T scale, T* g);                            \
  target_stats target_row_stats(const T* x, std::int64_t n, const target_desc<T>& t,       \
                                exp_cache<T> cache);                                       \
  /* the gradient from a cache: q = e * exp(shift_c - norm.shift - norm.log_sum) */        \
  void target_row_grad_cached(exp_cache<T> cache, std::int64_t n, const target_desc<T>& t, \
                              row_normaliser<T> norm, T a, T coef, T* g);                  \
  /* g = coef * (q * a - w * t') */                                                        \
  void target_row_grad(const T* x, std::int64_t n, const target_desc<T>& t,                \
                       row_normaliser<T> norm, T a, T coef, T* g);                         \
  distill_stats distill_row_stats(const T* x, const T* z, std::int64_t n, T inv_temperature, \
                                  distill_kind kind, exp_cache<T> cx, exp_cache<T> cz);    \
  /* kl gradient from caches: g = coef (q - p) */                                          \
  void distill_row_grad_kl_cached(exp_cache<T> cx, exp_cache<T> cz, std::int64_t n,        \
                                  T inv_temperature, row_normaliser<T> nx,                 \
                                  row_normaliser<T> nz, T coef, T* g);                     \
  jsd_stats jsd_row_stats(const T* x, const T* z, std::int64_t n, T inv_temperature,       \
                          row_normaliser<T> nx, row_normaliser<T> nz, T beta);             \
  /* jsd's second pass from exp caches (one log per element); writes log m (may be cz.e) */ \
  jsd_stats jsd_row_stats_cached(const T* x, const T* z, exp_cache<T> cx, exp_cache<T> cz, \
                                 std::int64_t n, T inv_temperature, row_normaliser<T> nx,  \
                                 row_normaliser<T> nz, T beta, T* log_m);                  \
  /* reverse_kl (log_m null: log p from z) / jsd (log m given) gradient from the student's \
     exp cache: g = coef q (log q - log ref - r), no exp per element; g may be x */         \
  void distill_row_grad_log_cached(const T* x, const T* z, const T* log_m, exp_cache<T> cx, \
                                   std::int64_t n, T inv_temperature, row_normaliser<T> nx, \
                                   row_normaliser<T> nz, T r, T coef, T* g);               \
  /* kl: g = coef (q - p); reverse_kl: g = coef q (log q - log p - r);                     \
     jsd: g = coef q (log q - log m - r), m = beta p + (1 - beta) q */                     \
  void distill_row_grad(const T* x, const T* z, std::int64_t n, T inv_temperature,        \
                        row_normaliser<T> nx, row_normaliser<T> nz, int kind, T beta, T r,  \
                        T coef, T* g);                                                     \
  /* element-wise: return Σ loss over the slice; write grad (coef * dloss) and the        \
     element losses where the pointers are non-null */                                     \
  double kl_div_elements(const T* x, const T* t, std::int64_t n, bool log_target, T coef,  \
                         T* g, T* losses);                                                 \
  double bce_elements(const T* x, const T* t, const T* w, const T* pos_w, std::int64_t n,  \
                      T coef, T* g, T* losses);

// Dense cross-entropy statistics and cached gradient reading bfloat16 logits and targets
// in place (no class weights): wt = keep * t + add; the gradient is written as bfloat16.
target_stats target_row_stats_bf16(const std::uint16_t* x, const std::uint16_t* t, std::int64_t n, float keep,
                                   float add, exp_cache<float> cache);
void target_row_grad_cached_bf16(exp_cache<float> cache, const std::uint16_t* t, std::int64_t n, float keep,
                                 float add, row_normaliser<float> norm, float a, float coef, std::uint16_t* g);

SOFTCE_DECLARE_KERNELS(float)
SOFTCE_DECLARE_KERNELS(double)
#undef SOFTCE_DECLARE_KERNELS

// 16-bit float conversion of contiguous arrays (round to nearest even on the way down).
void half_to_float(const std::uint16_t* in, bool bfloat, std::int64_t n, float* out);
void float_to_half(const float* in, bool bfloat, std::int64_t n, std::uint16_t* out);

// distill_row_grad kinds
inline constexpr int kGradKl = 0, kGradReverseKl = 1, kGradJsd = 2;

// Name of the SIMD target the dispatcher picked.
std::string simd_target_name();

}  // namespace softce::detail
