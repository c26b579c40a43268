// Top-k targets (cross-entropy with a TopK target, and the kl distillation from a top-k
// teacher): dense softmax statistics plus sparse moments over the k entries; the gradient
// is the dense softmax times a factor, then corrected at the k entries. With the tail
// bucket the mass outside the top k adds -(1 - Σ v) log(1 - Q); its sum is taken against
// the tail's own max where the tail lies far below the top k (see topk_record).
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernels.hpp"
#include "loss_drivers.hpp"
#include "row_driver.hpp"
#include "row_stats.hpp"
#include "shard_records.hpp"
#include "staging.hpp"

namespace softce::detail {

topk_operands validate_topk(std::string_view fn, std::string_view name, const topk& target, const row_space& space,
                            std::int64_t total_classes) {
  const std::string indices_arg = std::string(name) + ".indices", values_arg = std::string(name) + ".values";
  check_extent(fn, indices_arg, target.indices);
  check_extent(fn, values_arg, target.values);
  if (!is_index(target.indices.type))
    fail(fn, indices_arg, "expected an int32 or int64 array, got " + std::string(dtype_name(target.indices.type)),
         error_kind::type);
  check_float(fn, values_arg, target.values);
  const std::int64_t k = target.indices.ndim == space.ndim + 1 ? target.indices.shape[space.ndim] : -1;
  bool ok = target.indices.ndim == space.ndim + 1;
  for (int i = 0; ok && i < space.ndim; ++i) ok = target.indices.shape[i] == space.dims[i];
  if (!ok)
    fail(fn, indices_arg, "expected shape " + shape_string(space.dims, space.ndim) +
                                   " + (K,) (the input's rows, then K), got " + shape_string(target.indices));
  check_same_shape(fn, values_arg, target.values, target.indices, "indices");
  topk_operands ops;
  ops.k = k;
  auto make = [&](const array_view& v) {
    row_operand op;
    op.base = static_cast<const char*>(v.data);
    op.type = v.type;
    op.ndim = space.ndim;
    for (int i = 0; i < space.ndim; ++i) op.dims[i] = space.dims[i], op.strides[i] = v.strides[i];
    op.class_stride = v.strides[space.ndim];
    op.inner = k;
    return op;
  };
  ops.indices = make(target.indices);
  ops.values = make(target.values);
  std::vector<std::int64_t> row(static_cast<std::size_t>(k));
  for (std::int64_t r = 0; r < space.rows; ++r) {
    const std::int64_t off = ops.indices.row_offset(r);
    for (std::int64_t j = 0; j < k; ++j) {
      const std::int64_t idx = load_index(ops.indices.base, ops.indices.type, off + j * ops.indices.class_stride);
      if (idx < 0 || idx >= total_classes)
        fail(fn, indices_arg, "index " + std::to_string(idx) + " at row " + std::to_string(r) +
                                       " is out of range for " + std::to_string(total_classes) + " classes",
             error_kind::index);
      row[static_cast<std::size_t>(j)] = idx;
    }
    std::sort(row.begin(), row.end());
    auto dup = std::adjacent_find(row.begin(), row.end());
    if (dup != row.end())
      fail(fn, indices_arg, "duplicate index " + std::to_string(*dup) + " in row " + std::to_string(r));
  }
  return ops;
}

namespace {

// Uncached rows (no gradient, or class-parallel): a tail sum below this (against the row's
// max, in float) may have lost terms to underflow (each below 1.2e-38): it is summed again
// against the tail's own max. Above it, the terms lost weigh at most C * 1e-18 relative.
constexpr double kTailRescale = 1e-20;

template <class T>
struct topk_context {
  row_reader<T> x;
  std::optional<row_writer<T>> g;
  const T* xr = nullptr;
  std::vector<double> top_logits;
  std::vector<std::int64_t> local_top;  // this shard's top-k classes of the row
  T* gr = nullptr;                       // the gradient row, holding the exp cache between the passes
  std::vector<T> shifts;                 // the cache's chunk shifts
};

// A row's loss terms, as finish computes them from the merged record.
struct topk_row_terms {
  bool poisoned;          // a NaN or +inf logit (NaN sum) or a value that is not finite
  double loss;
  double tau;             // 1 - Σ v: the tail's target mass
  bool tail_active;       // the tail bucket contributes
  bool rescaled;          // the tail was summed against its own max
  double outside_factor;  // the gradient's extra factor outside the top k
  double log_tail;        // log(1 - Q) + log(sum)
};

template <class T>
class topk_rows {
 public:
  topk_rows(std::string_view fn, const array_view& input, const topk& target,
            const std::optional<array_view>& mask_view, reduction mode, const outputs& out, const class_shard* shard,
            double temperature, bool entropy_term);
  double run();

 private:
  using context = topk_context<T>;
  context make_context() const;
  void entry(std::int64_t r, std::int64_t j, std::int64_t& local, double& v) const;
  void load_top(context& c, std::int64_t r) const;
  void resum_tail(context& c, topk_record& rec) const;
  softmax_stats tail_piece(context& c, std::int64_t p0, std::int64_t plen) const;
  void tail_chunk(context& c, softmax_stats& tail, std::size_t first, std::size_t next, std::int64_t c0,
                  std::int64_t len) const;
  topk_record tail_row_stats(context& c, std::int64_t r) const;
  void tail_row_grad(context& c, const topk_record& rec, double tau, bool tail_active) const;
  topk_record stats(context& c, std::int64_t r) const;
  void rescaled_tail_grad(const T* x, const topk_record& rec, double tau, double log_tail, T* g) const;
  topk_row_terms row_terms(std::int64_t r, const topk_record& rec) const;
  void gradient(context& c, std::int64_t r, const topk_record& rec, const topk_row_terms& terms) const;
  double finish(context& c, std::int64_t r, const topk_record& rec) const;

  const kernel_table<T>& kern_;
  const outputs& out_;
  const class_shard* shard_;
  const row_space space_;
  const std::int64_t C_, offset_, total_classes_;
  const topk_operands ops_;
  const std::optional<row_operand> mask_;
  const row_operand x_op_;
  std::optional<row_operand> g_op_;
  const double inv_t_, t2_;
  const bool entropy_term_;
  reduce_plan plan_;
  double coef_ = 1.0;
  std::int64_t k_;
  bool has_tail_;  // a top-k that covers every class has no tail (tau is then only the values' rounding)
  // Single process with a gradient: the statistics pass leaves exp(x - shift) in the gradient
  // row and the gradient pass scales it (one exp per element instead of two).
  bool cached_;
};

template <class T>
topk_rows<T>::topk_rows(std::string_view fn, const array_view& input, const topk& target,
                        const std::optional<array_view>& mask_view, reduction mode, const outputs& out,
                        const class_shard* shard, double temperature, bool entropy_term)
    : kern_(kernels_for<T>()),
      out_(out),
      shard_(shard),
      space_(logits_space(fn, input)),
      C_(space_.classes),
      offset_(shard ? shard->class_offset : 0),
      total_classes_(shard ? shard->num_classes : C_),
      ops_(validate_topk(fn, entropy_term ? "teacher" : "target", target, space_, total_classes_)),
      mask_(mask_operand(fn, mask_view, space_)),
      x_op_(class_operand(space_, input)),
      inv_t_(1.0 / temperature),
      t2_(temperature * temperature),
      entropy_term_(entropy_term),
      plan_{mode, 1.0} {
  if (out.grad) g_op_ = class_operand(space_, *out.grad);
  if (mode == reduction::mean || mode == reduction::batchmean) {
    plan_.denominator = static_cast<double>(count_kept(mask_, space_.rows));
    if (mode == reduction::mean && entropy_term) plan_.denominator *= static_cast<double>(total_classes_);
  }
  coef_ = gradient_coef(plan_) * temperature;
  k_ = ops_.k;
  has_tail_ = target.tail && k_ < total_classes_;
  cached_ = g_op_ && !shard;
}

template <class T>
typename topk_rows<T>::context topk_rows<T>::make_context() const {
  context c{row_reader<T>(&x_op_), std::nullopt, nullptr, {}, {}, nullptr, {}};
  if (g_op_) c.g.emplace(&*g_op_);
  if (cached_) c.shifts.resize(chunk_count(C_));
  return c;
}

template <class T>
void topk_rows<T>::entry(std::int64_t r, std::int64_t j, std::int64_t& local, double& v) const {
  const std::int64_t io = ops_.indices.row_offset(r) + j * ops_.indices.class_stride;
  const std::int64_t vo = ops_.values.row_offset(r) + j * ops_.values.class_stride;
  local = load_index(ops_.indices.base, ops_.indices.type, io) - offset_;
  v = load_float<double>(ops_.values.base, ops_.values.type, vo);
}

// The row's top-k logits, read before a pass may overwrite them (the exp cache and the
// gradient may be the input itself: in place).
template <class T>
void topk_rows<T>::load_top(context& c, std::int64_t r) const {
  c.top_logits.resize(static_cast<std::size_t>(k_));
  for (std::int64_t j = 0; j < k_; ++j) {
    std::int64_t local;
    double v;
    entry(r, j, local, v);
    c.top_logits[static_cast<std::size_t>(j)] = local >= 0 && local < C_ ? static_cast<double>(c.xr[local]) : 0.0;
  }
}

// The tail sum again, against the max outside the top k: exact where the sum against the
// row's max underflowed (every term below the smallest normal float). Rare: only rows
// whose tail lies ~46 T or more below the max.
template <class T>
void topk_rows<T>::resum_tail(context& c, topk_record& rec) const {
  std::sort(c.local_top.begin(), c.local_top.end());
  double tail_max = -kInf;
  std::size_t j = 0;
  for (std::int64_t i = 0; i < C_; ++i) {
    if (j < c.local_top.size() && c.local_top[j] == i) {
      ++j;
      continue;
    }
    tail_max = std::max(tail_max, static_cast<double>(c.xr[i]));
  }
  rec.tail_shift = tail_max;
  rec.e_tail = tail_max == -kInf ? 0.0
                                 : kern_.exp_sum_excluding(c.xr, C_, static_cast<T>(inv_t_), static_cast<T>(tail_max),
                                                           c.local_top.data(),
                                                           static_cast<std::int64_t>(c.local_top.size()));
}

// One chunk of a cached tail row holding the top-k entries local_top[first, next): the
// statistics straight from x, then the top-k entries' cached exps taken out of the sum:
// exact enough while the chunk's max is a tail entry (the tail's sum is then >= 1 and the
// top-k exps are each <= 1). When a top-k entry is the max, the tail may lie far below it
// (its exps underflow past a gap of ~88 T): the chunk's top-k entries are set to -inf in
// the gradient row (out of place: a copy of the chunk) and the tail summed against its own
// max. In place the pass would overwrite x, so the decision comes first (is some logit
// above the chunk's largest top-k logit? a few elements usually tell, else the chunk's
// max); out of place it comes with the pass. For finite and infinite logits both decide
// alike, so both do the same arithmetic (bitwise the same gradient); a NaN poisons the row
// on either path.
template <class T>
void topk_rows<T>::tail_chunk(context& c, softmax_stats& tail, std::size_t first, std::size_t next, std::int64_t c0,
                              std::int64_t len) const {
  const T it = static_cast<T>(inv_t_);
  const exp_cache<T> chunk_cache{c.gr + c0, c.shifts.data() + c0 / kChunk};
  auto top_is_max = [&](double chunk_max_value) {
    for (std::size_t j = first; j < next; ++j)
      if (static_cast<double>(c.xr[c.local_top[j]]) == chunk_max_value) return true;
    return false;
  };
  auto tail_above_top = [&] {
    T top_max = -std::numeric_limits<T>::infinity();
    for (std::size_t j = first; j < next; ++j) top_max = std::max(top_max, c.xr[c.local_top[j]]);
    const T* xc = c.xr + c0;
    for (std::int64_t i = 0; i < std::min<std::int64_t>(len, 64); ++i)
      if (xc[i] > top_max) return true;
    return kern_.chunk_max(xc, len) > top_max;
  };
  const bool in_place = c.gr == c.xr;
  if (!in_place || tail_above_top()) {
    softmax_stats st = kern_.softmax_row_stats(c.xr + c0, len, it, chunk_cache);
    if (in_place || !top_is_max(st.shift)) {
      for (std::size_t j = first; j < next; ++j) st.sum -= static_cast<double>(c.gr[c.local_top[j]]);
      merge_into(tail, st, static_cast<double>(it));  // a NaN sum stays NaN
      return;
    }
    std::copy(c.xr + c0, c.xr + c0 + len, c.gr + c0);
  }
  for (std::size_t j = first; j < next; ++j) c.gr[c.local_top[j]] = -std::numeric_limits<T>::infinity();
  merge_into(tail, kern_.softmax_row_stats(c.gr + c0, len, it, chunk_cache), static_cast<double>(it));
}

// One piece of a cached tail row: its chunks merged in order (pieces touch disjoint parts
// of the gradient row and the chunk shifts). A chunk without top-k entries is all tail.
template <class T>
softmax_stats topk_rows<T>::tail_piece(context& c, std::int64_t p0, std::int64_t plen) const {
  const T it = static_cast<T>(inv_t_);
  softmax_stats tail{-kInf, 0.0};
  std::size_t next =
      static_cast<std::size_t>(std::lower_bound(c.local_top.begin(), c.local_top.end(), p0) - c.local_top.begin());
  for (std::int64_t c0 = p0; c0 < p0 + plen; c0 += kChunk) {
    const std::int64_t len = std::min<std::int64_t>(kChunk, p0 + plen - c0);
    const std::size_t first = next;  // the chunk's top-k entries: local_top[first, next)
    while (next < c.local_top.size() && c.local_top[next] < c0 + len) ++next;
    if (first == next) {
      const exp_cache<T> chunk_cache{c.gr + c0, c.shifts.data() + c0 / kChunk};
      merge_into(tail, kern_.softmax_row_stats(c.xr + c0, len, it, chunk_cache), static_cast<double>(it));
      continue;
    }
    tail_chunk(c, tail, first, next, c0, len);
  }
  return tail;
}

// Cached rows with a tail: the statistics pass runs over the tail alone, chunk by chunk
// (tail_piece), so the tail's sum is taken against the tail's own max (exact however far
// below the top k it lies) and its exps stay as the cache. The row's statistics are then
// the tail's plus the top-k terms, summed in double.
template <class T>
topk_record topk_rows<T>::tail_row_stats(context& c, std::int64_t r) const {
  c.gr = c.g->begin(r);
  c.local_top.clear();
  for (std::int64_t j = 0; j < k_; ++j) {
    std::int64_t local;
    double v;
    entry(r, j, local, v);
    if (local >= 0 && local < C_) c.local_top.push_back(local);
  }
  std::sort(c.local_top.begin(), c.local_top.end());
  const T it = static_cast<T>(inv_t_);
  const softmax_stats tail = row_stats_in_pieces<softmax_stats>(
      C_, [&](std::int64_t p0, std::int64_t plen) { return tail_piece(c, p0, plen); },
      [&](softmax_stats& acc, const softmax_stats& part) { merge_into(acc, part, static_cast<double>(it)); });
  double top_max = -kInf;
  for (std::int64_t j = 0; j < k_; ++j) {
    std::int64_t local;
    double v;
    entry(r, j, local, v);
    if (local >= 0 && local < C_) top_max = std::fmax(top_max, c.top_logits[static_cast<std::size_t>(j)]);
  }
  const double shift = std::fmax(tail.shift, top_max);
  const double finite_shift = shift == -kInf ? 0.0 : shift;
  topk_record rec{shift, 0.0, 0.0, 0.0, 0.0, tail.sum, tail.shift};
  for (std::int64_t j = 0; j < k_; ++j) {
    std::int64_t local;
    double v;
    entry(r, j, local, v);
    if (local < 0 || local >= C_) continue;
    const double dk = (c.top_logits[static_cast<std::size_t>(j)] - finite_shift) * inv_t_;
    rec.a += v;
    if (v != 0.0) rec.b += v * dk;
    rec.e += std::exp(dk);
  }
  rec.sum = rec.e + tail.sum * rescale(tail.shift, shift, inv_t_);  // NaN stays NaN
  return rec;
}

// The gradient of a cached tail row outside the top k, chunk by chunk from the tail's
// exps e_c = exp((x_c - s) / T) (s the chunk's shift): coef q_c (a - tau Q / (1 - Q)) with
// q_c = e_c exp((s - shift) / T) / sum and q_c / (1 - Q) = e_c exp((s - tail_shift) / T)
// / e_tail, both factors at most 1 (no overflow, whatever the gap). An all -inf chunk
// holds shift 0 and zeros: min() keeps its factor finite.
template <class T>
void topk_rows<T>::tail_row_grad(context& c, const topk_record& rec, double tau, bool tail_active) const {
  const bool empty = rec.sum == 0.0 || rec.shift == -kInf;
  const double log_sum = empty ? 0.0 : std::log(rec.sum), Q = empty ? 0.0 : rec.e / rec.sum;
  row_in_pieces(C_, [&](std::int64_t p0, std::int64_t plen) {
    for (std::int64_t c0 = p0; c0 < p0 + plen; c0 += kChunk) {
      const double s = static_cast<double>(c.shifts[static_cast<std::size_t>(c0 / kChunk)]);
      double factor = empty ? 0.0 : rec.a * std::exp((std::min(s, rec.shift) - rec.shift) * inv_t_ - log_sum);
      if (!empty && tail_active && rec.e_tail > 0.0)
        factor -= tau * Q * std::exp((std::min(s, rec.tail_shift) - rec.tail_shift) * inv_t_) / rec.e_tail;
      kern_.scale_row(c.gr + c0, std::min<std::int64_t>(kChunk, p0 + plen - c0), static_cast<T>(coef_ * factor),
                      c.gr + c0);
    }
  });
}

template <class T>
topk_record topk_rows<T>::stats(context& c, std::int64_t r) const {
  if (!row_kept(mask_, r)) return topk_record{-kInf, 0.0, 0.0, 0.0, 0.0, 0.0, -kInf};
  c.xr = c.x.row(r);
  load_top(c, r);
  if (cached_ && has_tail_) return tail_row_stats(c, r);
  exp_cache<T> cache;
  if (cached_) {
    c.gr = c.g->begin(r);
    cache = exp_cache<T>{c.gr, c.shifts.data()};
  }
  const softmax_stats sm = row_stats_in_pieces<softmax_stats>(
      C_,
      [&](std::int64_t c0, std::int64_t len) {
        return kern_.softmax_row_stats(c.xr + c0, len, static_cast<T>(inv_t_), cache_from(cache, c0));
      },
      [&](softmax_stats& acc, const softmax_stats& part) {
        merge_into(acc, part, static_cast<double>(static_cast<T>(inv_t_)));
      });
  topk_record rec{sm.shift, sm.sum, 0.0, 0.0, 0.0, 0.0, sm.shift};
  const double shift = sm.shift == -kInf ? 0.0 : sm.shift;
  c.local_top.clear();
  for (std::int64_t j = 0; j < k_; ++j) {
    std::int64_t local;
    double v;
    entry(r, j, local, v);
    if (local < 0 || local >= C_) continue;
    const double dk = (c.top_logits[static_cast<std::size_t>(j)] - shift) * inv_t_;
    rec.a += v;
    if (v != 0.0) rec.b += v * dk;
    rec.e += std::exp(dk);
    c.local_top.push_back(local);
  }
  if (has_tail_) {  // not cached: the row is still there to be read again
    std::sort(c.local_top.begin(), c.local_top.end());
    rec.e_tail = kern_.exp_sum_excluding(c.xr, C_, static_cast<T>(inv_t_), static_cast<T>(shift), c.local_top.data(),
                                         static_cast<std::int64_t>(c.local_top.size()));
    if (rec.e_tail < kTailRescale) resum_tail(c, rec);
  }
  return rec;
}

// The gradient outside the top k, coef q_c (a - tau Q / (1 - Q)), for a rescaled tail:
// Q / (1 - Q) may exceed the float range while q_c underflows, so the factor's log goes
// into the normaliser (g = ±exp((x - shift) / T - log_sum + log|factor|)) and only the
// product is ever formed. The top-k entries are overwritten afterwards.
template <class T>
void topk_rows<T>::rescaled_tail_grad(const T* x, const topk_record& rec, double tau, double log_tail, T* g) const {
  const double log_ratio = std::log(std::fabs(tau)) + std::log(rec.e) - log_tail;  // log |tau| Q / (1 - Q)
  double log_factor, sign;
  if (log_ratio > 600.0) {  // a is at most 1: nothing next to e^600
    log_factor = std::log(coef_) + log_ratio;
    sign = tau > 0.0 ? -1.0 : 1.0;
  } else {
    const double factor = coef_ * (rec.a - (tau > 0.0 ? 1.0 : -1.0) * std::exp(log_ratio));
    log_factor = std::log(std::fabs(factor));
    sign = factor < 0.0 ? -1.0 : factor > 0.0 ? 1.0 : 0.0;
  }
  const row_normaliser<T> norm = normaliser<T>(rec.shift, rec.sum);
  const row_normaliser<T> folded{norm.shift, static_cast<T>(static_cast<double>(norm.log_sum) - log_factor)};
  row_in_pieces(C_, [&](std::int64_t c0, std::int64_t len) {
    kern_.softmax_row_grad(x + c0, len, static_cast<T>(inv_t_), sign == 0.0 ? norm : folded, static_cast<T>(sign),
                           g + c0);
  });
}

// The loss of an unpoisoned row (value_sum: Σ v, entropy: Σ v log v; values are identical
// on every shard, so they need no exchange) and the terms its gradient needs.
template <class T>
topk_row_terms topk_rows<T>::row_terms(std::int64_t r, const topk_record& rec) const {
  double value_sum = 0.0, entropy = 0.0;
  for (std::int64_t j = 0; j < k_; ++j) {
    std::int64_t local;
    double v;
    entry(r, j, local, v);
    value_sum += v;
    if (entropy_term_ && v != 0.0) entropy += v * std::log(v);
  }
  topk_row_terms t{false, kNaN, 1.0 - value_sum, false, false, 0.0, 0.0};
  // a NaN or +inf logit (NaN sum) or a value that is not finite poisons the row
  t.poisoned = std::isnan(rec.sum) || !std::isfinite(value_sum);
  if (t.poisoned) return t;
  const bool all_neg_inf = rec.sum == 0.0 || rec.shift == -kInf;
  double loss = all_neg_inf ? (rec.a > 0.0 ? kInf : 0.0) : rec.a * std::log(rec.sum) - rec.b;
  t.tail_active = has_tail_ && t.tau != 0.0 && !all_neg_inf;
  // the tail was summed against its own max (below the row's): see topk_record (an empty
  // or all -inf tail, e_tail = 0, keeps the plain path: its q are 0)
  t.rescaled = t.tail_active && rec.e_tail > 0.0 && rec.tail_shift < rec.shift;
  // -tau log(1 - Q) with 1 - Q = e_tail exp((tail_shift - shift) / T) / sum; d/dx_c is
  // -tau q_c Q / (1 - Q) outside the top k (Q / (1 - Q) = e / e_tail) and +tau q_c inside
  t.log_tail = std::log(rec.e_tail) + (t.rescaled ? (rec.tail_shift - rec.shift) * inv_t_ : 0.0);
  if (t.tail_active) {
    loss += -t.tau * (t.log_tail - std::log(rec.sum));
    if (rec.e_tail > 0.0 && !t.rescaled) t.outside_factor = -t.tau * rec.e / rec.e_tail;
  }
  if (entropy_term_ && has_tail_ && t.tau > 0.0) loss += t.tau * std::log(t.tau);  // 0 for tau <= 0
  t.loss = (loss + entropy) * (entropy_term_ ? t2_ : 1.0);
  return t;
}

// q (a + outside_factor) everywhere, then the top-k entries written directly: q_k (a + tau)
// - v_k with the tail, q_k a - v_k without.
template <class T>
void topk_rows<T>::gradient(context& c, std::int64_t r, const topk_record& rec, const topk_row_terms& t) const {
  const row_normaliser<T> norm = normaliser<T>(rec.shift, rec.sum);
  const T scale = static_cast<T>(coef_ * (rec.a + t.outside_factor));
  T* g;
  if (cached_ && has_tail_) {
    g = c.gr;
    tail_row_grad(c, rec, t.tau, t.tail_active);
  } else if (cached_) {
    g = c.gr;
    const exp_cache<T> cache{c.gr, c.shifts.data()};
    row_in_pieces(C_, [&](std::int64_t c0, std::int64_t len) {
      kern_.softmax_row_grad_cached(cache_from(cache, c0), len, static_cast<T>(inv_t_), norm, scale, g + c0);
    });
  } else {
    // class-parallel or no cache: the passes ran apart, read the row again
    c.xr = c.x.row(r);
    load_top(c, r);
    g = c.g->begin(r);
    if (t.rescaled)
      rescaled_tail_grad(c.xr, rec, t.tau, t.log_tail, g);
    else
      row_in_pieces(C_, [&](std::int64_t c0, std::int64_t len) {
        kern_.softmax_row_grad(c.xr + c0, len, static_cast<T>(inv_t_), norm, scale, g + c0);
      });
  }
  const double ls = static_cast<double>(norm.log_sum), sh = static_cast<double>(norm.shift);
  const double inside = rec.a + (t.tail_active ? t.tau : 0.0);
  for (std::int64_t j = 0; j < k_; ++j) {
    std::int64_t local;
    double v;
    entry(r, j, local, v);
    if (local < 0 || local >= C_) continue;
    const double qk = std::exp((c.top_logits[static_cast<std::size_t>(j)] - sh) * inv_t_ - ls);
    g[local] = static_cast<T>(coef_ * (qk * inside - v));
  }
  c.g->commit();
}

template <class T>
double topk_rows<T>::finish(context& c, std::int64_t r, const topk_record& rec) const {
  if (!row_kept(mask_, r)) {
    if (c.g) c.g->zero_row(r);
    return 0.0;
  }
  const topk_row_terms t = row_terms(r, rec);
  if (t.poisoned) {
    if (c.g) c.g->fill_row(r, std::numeric_limits<T>::quiet_NaN());
    return kNaN;
  }
  if (c.g) gradient(c, r, rec, t);
  return t.loss;
}

template <class T>
double topk_rows<T>::run() {
  auto make = [&] { return make_context(); };
  auto stats_fn = [&](context& c, std::int64_t r) { return stats(c, r); };
  auto finish_fn = [&](context& c, std::int64_t r, const topk_record& rec) { return finish(c, r, rec); };
  auto exchange = [&](std::vector<topk_record>& records) {
    all_reduce_records(*shard_, records, merge_topk_records, {0, 6}, inv_t_);
  };
  std::vector<double> row_losses(static_cast<std::size_t>(space_.rows), 0.0);
  // one at a time only with a gradient (without one, a tail is summed again over the row
  // on its thread) and rows used where they are
  const bool piecewise = g_op_ && direct_rows<T>(x_op_) && direct_rows<T>(*g_op_);
  run_rows<decltype(make), topk_record>(space_.rows, C_, shard_ != nullptr, piecewise, make, stats_fn, exchange,
                                        finish_fn, row_losses);
  write_row_losses(out_, space_, row_losses);
  return finish_reduction(row_losses, plan_);
}

}  // namespace

template <class T>
double topk_loss(std::string_view fn, const array_view& input, const topk& target,
                 const std::optional<array_view>& mask, reduction mode, const outputs& out, const class_shard* shard,
                 double temperature, bool entropy_term) {
  topk_rows<T> rows(fn, input, target, mask, mode, out, shard, temperature, entropy_term);
  return rows.run();
}

template double topk_loss<float>(std::string_view, const array_view&, const topk&, const std::optional<array_view>&,
                                 reduction, const outputs&, const class_shard*, double, bool);
template double topk_loss<double>(std::string_view, const array_view&, const topk&, const std::optional<array_view>&,
                                  reduction, const outputs&, const class_shard*, double, bool);

}  // namespace softce::detail
