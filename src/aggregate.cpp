// Soft labels from noisy votes: majority vote, vote fractions, Dawid–Skene EM.
//
// The votes are validated once and turned into two indexes (compressed rows):
//   by item       item -> its (annotator, label) votes   — the E-step and the vote counts
//   by annotator  annotator -> its (item, label) votes   — the M-step
// so every pass is a plain loop over contiguous memory and no pass needs atomics:
//   E-step   parallel over fixed blocks of items; each item's posterior is its own, and the
//            per-block partial sums (log-likelihood, class totals) are added in block order;
//   M-step   parallel over annotators; each sums its votes in a fixed order.
// So results are bitwise identical for any thread count.
//
// Cost per EM iteration, V votes, N items, C classes: V·C adds for the E-step, N·C exp, V·C
// adds for the M-step. The confusion logs are kept as (annotator, label, true class) so an
// E-step vote adds one contiguous row of C values.
#include <softce/aggregate.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include "threading.hpp"

namespace softce::aggregate {
namespace {

[[noreturn]] void fail(const char* function, const char* argument, const std::string& what) {
  throw error(std::string(function) + ": " + argument + ": " + what);
}

std::int64_t checked_mul(const char* function, const char* what, std::int64_t a, std::int64_t b) {
  std::int64_t r = 0;
  // sizes also become byte counts of double / int64 arrays: keep 8·r representable
  if (__builtin_mul_overflow(a, b, &r) || r > std::numeric_limits<std::int64_t>::max() / 8)
    fail(function, what,
         "expected a size that fits in memory, got " + std::to_string(a) + " x " +
             std::to_string(b) + " (overflows)");
  return r;
}

void check_classes(const char* function, std::int64_t classes) {
  if (classes < 1) fail(function, "classes", "expected a value >= 1, got " + std::to_string(classes));
}

// The validated votes, indexed both ways.
struct vote_index {
  std::int64_t items = 0, annotators = 0, classes = 0;
  std::vector<std::int64_t> item_start;       // (items + 1)
  std::vector<std::int64_t> item_annotator;   // (votes), grouped by item
  std::vector<std::int64_t> item_label;       // (votes), grouped by item
  std::vector<std::int64_t> annotator_start;  // (annotators + 1)
  std::vector<std::int64_t> annotator_item;   // (votes), grouped by annotator, item order
  std::vector<std::int64_t> annotator_label;  // (votes), grouped by annotator
  std::int64_t votes() const { return item_start.empty() ? 0 : item_start.back(); }
};

// Counting sort of the by-item index into the by-annotator index (stable: item order).
void index_by_annotator(vote_index& x) {
  const std::int64_t V = x.votes();
  x.annotator_start.assign(x.annotators + 1, 0);
  for (std::int64_t v = 0; v < V; ++v) ++x.annotator_start[x.item_annotator[v] + 1];
  for (std::int64_t j = 0; j < x.annotators; ++j) x.annotator_start[j + 1] += x.annotator_start[j];
  x.annotator_item.resize(V);
  x.annotator_label.resize(V);
  std::vector<std::int64_t> next(x.annotator_start.begin(), x.annotator_start.end() - 1);
  for (std::int64_t i = 0; i < x.items; ++i)
    for (std::int64_t v = x.item_start[i]; v < x.item_start[i + 1]; ++v) {
      const std::int64_t slot = next[x.item_annotator[v]]++;
      x.annotator_item[slot] = i;
      x.annotator_label[slot] = x.item_label[v];
    }
}

void fail_no_votes(const char* function, std::int64_t item) {
  fail(function, "votes",
       "expected at least one vote per item, got none for item " + std::to_string(item) +
           " (drop the item or give it a vote)");
}

vote_index build(const char* function, const wide_votes& w, std::int64_t classes) {
  check_classes(function, classes);
  if (w.items < 0 || w.annotators < 0)
    fail(function, "votes",
         "expected non-negative sizes, got (" + std::to_string(w.items) + ", " +
             std::to_string(w.annotators) + ")");
  if (w.annotators == 0 && w.items > 0)
    fail(function, "votes", "expected at least one annotator (column), got 0");
  const std::int64_t total = checked_mul(function, "votes", w.items, w.annotators);
  checked_mul(function, "classes", w.items, classes);
  checked_mul(function, "classes", checked_mul(function, "classes", w.annotators, classes), classes);
  if (total > 0 && w.labels == nullptr) fail(function, "votes", "expected data, got a null pointer");
  vote_index x;
  x.items = w.items;
  x.annotators = w.annotators;
  x.classes = classes;
  x.item_start.assign(w.items + 1, 0);
  std::int64_t V = 0;
  for (std::int64_t i = 0; i < w.items; ++i) {
    const std::int64_t* row = w.labels + i * w.annotators;
    std::int64_t n = 0;
    for (std::int64_t j = 0; j < w.annotators; ++j) {
      const std::int64_t l = row[j];
      if (l < -1 || l >= classes)
        fail(function, "votes",
             "expected class ids in [-1, " + std::to_string(classes) + "), got " +
                 std::to_string(l) + " at [" + std::to_string(i) + ", " + std::to_string(j) + "]");
      n += l >= 0;
    }
    if (n == 0) fail_no_votes(function, i);
    V += n;
    x.item_start[i + 1] = V;
  }
  x.item_annotator.resize(V);
  x.item_label.resize(V);
  std::int64_t v = 0;
  for (std::int64_t i = 0; i < w.items; ++i)
    for (std::int64_t j = 0; j < w.annotators; ++j)
      if (const std::int64_t l = w.labels[i * w.annotators + j]; l >= 0) {
        x.item_annotator[v] = j;
        x.item_label[v] = l;
        ++v;
      }
  index_by_annotator(x);
  return x;
}

vote_index build(const char* function, const long_votes& lv, std::int64_t classes) {
  check_classes(function, classes);
  if (lv.count < 0) fail(function, "count", "expected a value >= 0, got " + std::to_string(lv.count));
  if (lv.items < 0) fail(function, "items", "expected a value >= 0, got " + std::to_string(lv.items));
  if (lv.annotators < 0)
    fail(function, "annotators", "expected a value >= 0, got " + std::to_string(lv.annotators));
  if (lv.count > 0 && (lv.item == nullptr || lv.annotator == nullptr || lv.label == nullptr))
    fail(function, "votes", "expected data, got a null pointer");
  checked_mul(function, "count", lv.count, 2);
  std::int64_t items = lv.items, annotators = lv.annotators;
  // an inferred count (max id + 1) sizes arrays: ids stay far from overflow
  constexpr std::int64_t max_id = std::numeric_limits<std::int64_t>::max() / 16;
  const auto check_id = [&](const char* argument, std::int64_t id, std::int64_t v,
                            std::int64_t bound) {
    const std::int64_t limit = bound > 0 ? bound : max_id;
    if (id < 0 || id >= limit)
      fail(function, argument,
           "expected ids in [0, " + std::to_string(limit) + "), got " + std::to_string(id) +
               " at [" + std::to_string(v) + "]");
  };
  std::int64_t max_item = -1, max_annotator = -1;
  for (std::int64_t v = 0; v < lv.count; ++v) {
    check_id("item", lv.item[v], v, lv.items);
    check_id("annotator", lv.annotator[v], v, lv.annotators);
    if (lv.label[v] < 0 || lv.label[v] >= classes)
      fail(function, "label",
           "expected class ids in [0, " + std::to_string(classes) + "), got " +
               std::to_string(lv.label[v]) + " at [" + std::to_string(v) + "]");
    max_item = std::max(max_item, lv.item[v]);
    max_annotator = std::max(max_annotator, lv.annotator[v]);
  }
  if (items == 0) items = max_item + 1;
  if (annotators == 0) annotators = max_annotator + 1;
  checked_mul(function, "items", items + 1, 1);
  checked_mul(function, "classes", items, classes);
  checked_mul(function, "annotators",
              checked_mul(function, "annotators", annotators, classes), classes);
  vote_index x;
  x.items = items;
  x.annotators = annotators;
  x.classes = classes;
  x.item_start.assign(items + 1, 0);
  for (std::int64_t v = 0; v < lv.count; ++v) ++x.item_start[lv.item[v] + 1];
  for (std::int64_t i = 0; i < items; ++i) {
    if (x.item_start[i + 1] == 0) fail_no_votes(function, i);
    x.item_start[i + 1] += x.item_start[i];
  }
  x.item_annotator.resize(lv.count);
  x.item_label.resize(lv.count);
  std::vector<std::int64_t> next(x.item_start.begin(), x.item_start.end() - 1);
  for (std::int64_t v = 0; v < lv.count; ++v) {  // stable: input order within an item
    const std::int64_t slot = next[lv.item[v]]++;
    x.item_annotator[slot] = lv.annotator[v];
    x.item_label[slot] = lv.label[v];
  }
  index_by_annotator(x);
  return x;
}

// Per-item vote counts -> fractions (items, classes).
std::vector<double> fractions(const vote_index& x) {
  const std::int64_t C = x.classes;
  std::vector<double> p(static_cast<std::size_t>(x.items * C), 0.0);
  detail::parallel_for(x.items, detail::grain_for(C + 8), [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i) {
      double* row = &p[i * C];
      const std::int64_t n = x.item_start[i + 1] - x.item_start[i];
      for (std::int64_t v = x.item_start[i]; v < x.item_start[i + 1]; ++v) row[x.item_label[v]] += 1;
      for (std::int64_t k = 0; k < C; ++k) row[k] /= static_cast<double>(n);
    }
  });
  return p;
}

std::vector<std::int64_t> majority_of(const vote_index& x) {
  const std::int64_t C = x.classes;
  std::vector<std::int64_t> out(static_cast<std::size_t>(x.items));
  detail::parallel_for(x.items, detail::grain_for(C + 8), [&](std::int64_t begin, std::int64_t end) {
    std::vector<std::int64_t> count(C);
    for (std::int64_t i = begin; i < end; ++i) {
      std::fill(count.begin(), count.end(), 0);
      for (std::int64_t v = x.item_start[i]; v < x.item_start[i + 1]; ++v) ++count[x.item_label[v]];
      std::int64_t best = 0;
      for (std::int64_t k = 1; k < C; ++k)
        if (count[k] > count[best]) best = k;  // strict: a tie keeps the lower id
      out[i] = best;
    }
  });
  return out;
}

// exp(x) for x <= 0 (the E-step exponentiates log-posteriors minus their row maximum), to
// ~2 ulp, on two doubles at a time (GCC/Clang vector extensions: SSE2 on any x86-64, NEON
// on arm64) — the E-step's N·C exp dominate an iteration, and libm's scalar exp is several
// times slower. x = n·ln2 + r, |r| <= ln2/2, exp(r) by its Taylor series to r^13
// (truncation < 1e-17 relative), 2^n built in the exponent bits. Below -708 (where 2^n would
// be subnormal) and at -inf: 0.
typedef double double2 __attribute__((vector_size(16)));
typedef std::int64_t int2 __attribute__((vector_size(16)));

inline double2 exp_nonpositive(double2 x) {
  const double2 low = {-708.0, -708.0}, zero = {0.0, 0.0};
  const double2 shifter = {6755399441055744.0, 6755399441055744.0};  // 1.5·2^52: rounds
  const double2 clamped = x > low ? x : low;
  const double2 t = clamped * 1.4426950408889634 + shifter;  // n = round(x·log2 e) in the low bits
  const double2 n = t - shifter;
  const double2 r = (clamped - n * 0.6931471805599453) - n * 2.3190468138462996e-17;
  double2 p = r * (1.0 / 6227020800.0) + 1.0 / 479001600.0;  // 1/13!, 1/12!
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  int2 bits;
  std::memcpy(&bits, &t, sizeof bits);
  bits = (bits + 1023) << 52;  // n + 1023 in the exponent field (n in [-1022, 0])
  double2 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const double2 y = p * scale;
  return x >= low ? y : zero;
}

// values[k] = exp(values[k] - shift) for k < count, two at a time; `values` has room for
// count rounded up to even.
inline void exp_shifted(double* values, std::int64_t count, double shift) {
  for (std::int64_t k = 0; k < count; k += 2) {
    double2 v;
    std::memcpy(&v, values + k, sizeof v);
    v = exp_nonpositive(v - shift);
    std::memcpy(values + k, &v, sizeof v);
  }
}

// Items per block of the fixed-order reductions: the partial sums of a block are always
// formed in the same order, whichever thread runs it.
constexpr std::int64_t block_items = 512;

// The two inner loops, compiled for a fixed class count when it is small (CC > 0: the
// compiler unrolls and vectorises the loops over classes completely, ~3x faster than a
// loop bound read at run time) and for any count (CC = 0).
template <int CC>
double e_step_items(const vote_index& x, const double* log_prior, const double* log_confusion,
                    double* posterior, std::int64_t begin, std::int64_t end) {
  const std::int64_t C = CC > 0 ? CC : x.classes;
  // (C) log prior + Σ log confusion, then exp: on the stack (registers, no aliasing with
  // the confusion rows), rounded up to even for exp_shifted, the pad at -inf (exp: 0)
  constexpr std::int64_t stack = CC > 0 ? (CC + 1) / 2 * 2 : 2;
  double fixed[stack];
  std::vector<double> heap(CC > 0 ? 0 : (C + 1) / 2 * 2);
  double* __restrict lp = CC > 0 ? fixed : heap.data();
  const std::int64_t padded = (C + 1) / 2 * 2;
  for (std::int64_t k = C; k < padded; ++k) lp[k] = -std::numeric_limits<double>::infinity();
  const std::int64_t* start = x.item_start.data();
  const std::int64_t* annotator = x.item_annotator.data();
  const std::int64_t* label = x.item_label.data();
  double log_likelihood = 0;
  for (std::int64_t i = begin; i < end; ++i) {
    for (std::int64_t k = 0; k < C; ++k) lp[k] = log_prior[k];
    for (std::int64_t v = start[i]; v < start[i + 1]; ++v) {
      const double* __restrict row = log_confusion + (annotator[v] * C + label[v]) * C;
      for (std::int64_t k = 0; k < C; ++k) lp[k] += row[k];
    }
    double m = lp[0];
    for (std::int64_t k = 1; k < C; ++k) m = lp[k] > m ? lp[k] : m;
    exp_shifted(lp, C, m);
    double s = 0;
    for (std::int64_t k = 0; k < C; ++k) s += lp[k];
    const double inv = 1.0 / s;
    double* out = posterior + i * C;
    for (std::int64_t k = 0; k < C; ++k) out[k] = lp[k] * inv;
    log_likelihood += m + std::log(s);
  }
  return log_likelihood;
}

// counts (C_label, C_true) of annotator j += posterior of each item j voted on, in the row
// of the label given; used[l] = 1 for the labels j gave.
template <int CC>
void count_votes(const vote_index& x, std::int64_t j, const double* posterior, double* counts,
                 char* used) {
  const std::int64_t C = CC > 0 ? CC : x.classes;
  for (std::int64_t v = x.annotator_start[j]; v < x.annotator_start[j + 1]; ++v) {
    const std::int64_t l = x.annotator_label[v];
    const double* __restrict p = posterior + x.annotator_item[v] * C;
    double* __restrict row = counts + l * C;
    for (std::int64_t k = 0; k < C; ++k) row[k] += p[k];
    used[l] = 1;
  }
}

// Calls f(std::integral_constant<int, C>) for C in 2..16, else f(integral_constant<int, 0>).
template <class F>
double dispatch_classes(std::int64_t C, F&& f) {
  switch (C) {
#define SOFTCE_CASE(n) \
  case n: return f(std::integral_constant<int, n>{});
    SOFTCE_CASE(2) SOFTCE_CASE(3) SOFTCE_CASE(4) SOFTCE_CASE(5) SOFTCE_CASE(6) SOFTCE_CASE(7)
    SOFTCE_CASE(8) SOFTCE_CASE(9) SOFTCE_CASE(10) SOFTCE_CASE(11) SOFTCE_CASE(12)
    SOFTCE_CASE(13) SOFTCE_CASE(14) SOFTCE_CASE(15) SOFTCE_CASE(16)
#undef SOFTCE_CASE
    default: return f(std::integral_constant<int, 0>{});
  }
}

struct em_state {
  const vote_index& x;
  const dawid_skene_options& options;
  std::vector<double> posterior;      // (items, C)
  std::vector<double> priors;         // (C)
  std::vector<double> counts;         // (A, C_label, C_true) posterior-weighted vote counts
  std::vector<double> log_confusion;  // (A, C_label, C_true)
  std::vector<double> block_sums;     // (blocks, C + 1): class totals, then log-likelihood

  std::int64_t blocks() const { return (x.items + block_items - 1) / block_items; }

  // priors = mean posterior, summed per block then over blocks in order.
  void update_priors() {
    const std::int64_t C = x.classes, B = blocks();
    detail::parallel_for(B, std::max<std::int64_t>(1, detail::grain_for(block_items * C)),
                         [&](std::int64_t b0, std::int64_t b1) {
      for (std::int64_t b = b0; b < b1; ++b) {
        double* sum = &block_sums[b * (C + 1)];
        std::fill(sum, sum + C, 0.0);
        const std::int64_t end = std::min(x.items, (b + 1) * block_items);
        for (std::int64_t i = b * block_items; i < end; ++i)
          for (std::int64_t k = 0; k < C; ++k) sum[k] += posterior[i * C + k];
      }
    });
    priors.assign(C, 0.0);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t k = 0; k < C; ++k) priors[k] += block_sums[b * (C + 1) + k];
    for (double& p : priors) p /= static_cast<double>(x.items);
  }

  // M-step: counts[j][l][k] = Σ over j's votes l of posterior[item][k]; then the smoothing,
  // the floor on the rows of labels j used, and normalisation over l for each true class k.
  void m_step() {
    update_priors();
    const std::int64_t C = x.classes;
    detail::parallel_for(x.annotators, std::max<std::int64_t>(1, detail::grain_for(C * C * 4)),
                         [&](std::int64_t j0, std::int64_t j1) {
      std::vector<char> used(C);
      std::vector<double> total(C);
      for (std::int64_t j = j0; j < j1; ++j) {
        double* n = &counts[j * C * C];  // (C_label, C_true)
        std::fill(n, n + C * C, 0.0);
        std::fill(used.begin(), used.end(), 0);
        dispatch_classes(C, [&](auto fixed) {
          count_votes<decltype(fixed)::value>(x, j, posterior.data(), n, used.data());
          return 0.0;
        });
        std::fill(total.begin(), total.end(), 0.0);
        for (std::int64_t l = 0; l < C; ++l)
          for (std::int64_t k = 0; k < C; ++k) {
            double& c = n[l * C + k];
            c += options.smoothing;
            if (used[l]) c = std::max(c, options.floor);
            total[k] += c;
          }
        double* lc = &log_confusion[j * C * C];
        for (std::int64_t l = 0; l < C; ++l)
          for (std::int64_t k = 0; k < C; ++k) {
            // no mass for true class k (or no votes at all): a uniform, uninformative column
            const double e = total[k] > 0 ? n[l * C + k] / total[k] : 1.0 / static_cast<double>(C);
            n[l * C + k] = e;
            lc[l * C + k] = std::log(e);
          }
      }
    });
  }

  // E-step: posterior[i] ∝ prior · Π confusion[j][label][·], in log space; returns
  // Σ_i log p(votes of i).
  double e_step() {
    const std::int64_t C = x.classes, B = blocks();
    std::vector<double> log_prior(C);
    for (std::int64_t k = 0; k < C; ++k) log_prior[k] = std::log(std::max(priors[k], options.floor));
    const std::int64_t votes_per_item = x.items > 0 ? x.votes() / x.items + 1 : 1;
    detail::parallel_for(
        B, std::max<std::int64_t>(1, detail::grain_for(block_items * C * (votes_per_item + 4))),
        [&](std::int64_t b0, std::int64_t b1) {
          for (std::int64_t b = b0; b < b1; ++b) {
            const std::int64_t end = std::min(x.items, (b + 1) * block_items);
            const double log_likelihood = dispatch_classes(C, [&](auto fixed) {
              return e_step_items<decltype(fixed)::value>(x, log_prior.data(),
                                                          log_confusion.data(), posterior.data(),
                                                          b * block_items, end);
            });
            block_sums[b * (C + 1) + C] = log_likelihood;
          }
        });
    double total = 0;
    for (std::int64_t b = 0; b < B; ++b) total += block_sums[b * (C + 1) + C];
    return total;
  }
};

void check_options(const dawid_skene_options& options) {
  const char* function = "dawid_skene";
  if (options.max_iterations < 1)
    fail(function, "max_iterations",
         "expected a value >= 1, got " + std::to_string(options.max_iterations));
  if (!(options.tolerance >= 0) || !std::isfinite(options.tolerance))
    fail(function, "tolerance", "expected a finite value >= 0, got " + std::to_string(options.tolerance));
  if (!(options.smoothing >= 0) || !std::isfinite(options.smoothing))
    fail(function, "smoothing", "expected a finite value >= 0, got " + std::to_string(options.smoothing));
  if (!(options.floor >= 0) || !(options.floor < 1))
    fail(function, "floor", "expected a value in [0, 1), got " + std::to_string(options.floor));
}

dawid_skene_result run_dawid_skene(const vote_index& x, const dawid_skene_options& options) {
  const std::int64_t C = x.classes, A = x.annotators;
  em_state s{x, options, {}, {}, {}, {}, {}};
  s.posterior = fractions(x);
  s.counts.assign(static_cast<std::size_t>(A * C * C), 0.0);
  s.log_confusion.assign(static_cast<std::size_t>(A * C * C), 0.0);
  s.block_sums.assign(static_cast<std::size_t>(s.blocks() * (C + 1)), 0.0);

  dawid_skene_result r;
  r.items = x.items;
  r.annotators = A;
  r.classes = C;
  s.m_step();
  double previous = -std::numeric_limits<double>::infinity();
  for (int it = 1; it <= options.max_iterations; ++it) {
    const double log_likelihood = s.e_step();
    s.m_step();
    r.iterations = it;
    r.log_likelihood = log_likelihood;
    r.log_likelihood_per_item = x.items > 0 ? log_likelihood / static_cast<double>(x.items) : 0.0;
    if (options.on_iteration) options.on_iteration(it, r.log_likelihood_per_item);
    if (options.tolerance > 0 && it > 1 && r.log_likelihood_per_item - previous < options.tolerance) {
      r.converged = true;
      break;
    }
    previous = r.log_likelihood_per_item;
  }
  r.probabilities = std::move(s.posterior);
  r.priors = s.priors;
  // counts now hold the confusion as (A, C_label, C_true); the result is (A, C_true, C_label)
  r.confusion.resize(static_cast<std::size_t>(A * C * C));
  r.accuracy.assign(A, 0.0);
  r.votes_per_annotator.resize(A);
  for (std::int64_t j = 0; j < A; ++j) {
    for (std::int64_t k = 0; k < C; ++k)
      for (std::int64_t l = 0; l < C; ++l)
        r.confusion[(j * C + k) * C + l] = s.counts[(j * C + l) * C + k];
    for (std::int64_t k = 0; k < C; ++k) r.accuracy[j] += r.priors[k] * r.confusion[(j * C + k) * C + k];
    r.votes_per_annotator[j] = x.annotator_start[j + 1] - x.annotator_start[j];
  }
  return r;
}

}  // namespace

std::vector<std::int64_t> majority(const wide_votes& votes, std::int64_t classes) {
  return majority_of(build("majority", votes, classes));
}
std::vector<std::int64_t> majority(const long_votes& votes, std::int64_t classes) {
  return majority_of(build("majority", votes, classes));
}
std::vector<double> vote_fractions(const wide_votes& votes, std::int64_t classes) {
  return fractions(build("vote_fractions", votes, classes));
}
std::vector<double> vote_fractions(const long_votes& votes, std::int64_t classes) {
  return fractions(build("vote_fractions", votes, classes));
}
dawid_skene_result dawid_skene(const wide_votes& votes, std::int64_t classes,
                               const dawid_skene_options& options) {
  check_options(options);
  return run_dawid_skene(build("dawid_skene", votes, classes), options);
}
dawid_skene_result dawid_skene(const long_votes& votes, std::int64_t classes,
                               const dawid_skene_options& options) {
  check_options(options);
  return run_dawid_skene(build("dawid_skene", votes, classes), options);
}

}  // namespace softce::aggregate
