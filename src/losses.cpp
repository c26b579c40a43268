// The row losses (cross-entropy with index, probability and top-k targets; distillation):
// validation, then one fused pass per row, then a fixed-order reduction.
//
// Data flow of one call:
//   validate (validate.hpp) -> per row: stage the row if needed (staging.hpp), statistics
//   pass (kernels), loss from the statistics, gradient pass while the row is in cache
//   -> per-row losses summed in row order (bitwise identical for any thread count).
// In class-parallel mode (class_parallel.hpp) the statistics of all rows are computed
// first, combined across shards by the caller's all-reduce, and the loss and gradient
// passes follow.
#include <softce/class_parallel.hpp>
#include <softce/softce.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels.hpp"
#include "row_stats.hpp"
#include "staging.hpp"
#include "threading.hpp"
#include "validate.hpp"

namespace softce {
using namespace detail;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---------------------------------------------------------------------------------------
// records exchanged by the class-parallel all-reduce (plain doubles, merged in shard order)

struct ce_record {
  target_stats st;
  double target_weight;  // index targets: w[y] on the shard that owns y, else 0
};
static_assert(sizeof(ce_record) == 5 * sizeof(double));

void merge_ce_records(double* inout, const double* in, std::int64_t count) {
  auto* a = reinterpret_cast<ce_record*>(inout);
  const auto* b = reinterpret_cast<const ce_record*>(in);
  for (std::int64_t i = 0; i < count; ++i) {
    merge_into(a[i].st, b[i].st);
    a[i].target_weight += b[i].target_weight;
  }
}

// Top-k targets: softmax statistics of x / T plus, over the top-k entries, a = Σ v,
// b = Σ v (x_k - shift) / T and e = Σ exp((x_k - shift) / T); with a tail bucket also the
// sum outside the top k, e_tail, summed directly (1 - Q = e_tail / sum without the
// cancellation of 1 - e / sum when almost all the mass is in the top k). e_tail is taken
// against its own shift, tail_shift: the row's shift normally, the max outside the top k
// when the tail is so far below the row's max that float exps of it underflow (a gap of
// ~88 made log(1 - Q) = -inf although the exact value is finite).
// Shifts are kept in units of x / T while records travel, so merging needs no temperature.
struct topk_record {
  double shift, sum, a, b, e, e_tail, tail_shift;
};

void merge_topk(topk_record& acc, const topk_record& part, double inv_t) {
  if (std::isnan(acc.sum) || std::isnan(part.sum)) {  // a poisoned row stays poisoned
    acc.sum = kNaN;
    return;
  }
  const double shift = std::fmax(acc.shift, part.shift);
  if (shift != -kInf) {
    const double fa = rescale(acc.shift, shift, inv_t), fb = rescale(part.shift, shift, inv_t);
    double b_acc = acc.b, b_part = part.b;
    if (acc.a != 0.0 && acc.shift != -kInf) b_acc += acc.a * (acc.shift - shift) * inv_t;
    if (part.a != 0.0 && part.shift != -kInf) b_part += part.a * (part.shift - shift) * inv_t;
    acc.sum = acc.sum * fa + part.sum * fb;
    acc.e = acc.e * fa + part.e * fb;
    acc.b = b_acc + b_part;
  } else {
    acc.b += part.b;
  }
  acc.shift = shift;
  acc.a += part.a;
  const double tail_shift = std::fmax(acc.tail_shift, part.tail_shift);
  if (tail_shift != -kInf)
    acc.e_tail = acc.e_tail * rescale(acc.tail_shift, tail_shift, inv_t) +
                 part.e_tail * rescale(part.tail_shift, tail_shift, inv_t);
  acc.tail_shift = tail_shift;
}

void merge_topk_records(double* inout, const double* in, std::int64_t count) {
  auto* a = reinterpret_cast<topk_record*>(inout);
  const auto* b = reinterpret_cast<const topk_record*>(in);
  for (std::int64_t i = 0; i < count; ++i) merge_topk(a[i], b[i], 1.0);
}

void merge_distill_kl(double* inout, const double* in, std::int64_t count) {
  auto* a = reinterpret_cast<distill_stats*>(inout);
  const auto* b = reinterpret_cast<const distill_stats*>(in);
  for (std::int64_t i = 0; i < count; ++i) merge_into(a[i], b[i], 1.0, distill_kind::kl);
}

void merge_distill_reverse(double* inout, const double* in, std::int64_t count) {
  auto* a = reinterpret_cast<distill_stats*>(inout);
  const auto* b = reinterpret_cast<const distill_stats*>(in);
  for (std::int64_t i = 0; i < count; ++i) merge_into(a[i], b[i], 1.0, distill_kind::reverse_kl);
}

void merge_sums(double* inout, const double* in, std::int64_t count) {
  for (std::int64_t i = 0; i < count; ++i) inout[i] += in[i];
}

// Calls the shard's all-reduce on an array of records; the shift fields (given by their
// positions) are scaled by inv_t on the way so that merges need no temperature.
template <class Record>
void all_reduce_records(const class_shard& shard, std::vector<Record>& records,
                        row_stats_merge_fn merge, std::initializer_list<int> shift_fields,
                        double inv_t) {
  constexpr int width = sizeof(Record) / sizeof(double);
  auto* data = reinterpret_cast<double*>(records.data());
  const std::int64_t count = static_cast<std::int64_t>(records.size());
  if (inv_t != 1.0)
    for (std::int64_t i = 0; i < count; ++i)
      for (int f : shift_fields) data[i * width + f] *= inv_t;
  shard.all_reduce(data, count, width, merge);
  if (inv_t != 1.0)
    for (std::int64_t i = 0; i < count; ++i)
      for (int f : shift_fields) data[i * width + f] /= inv_t;
}

// ---------------------------------------------------------------------------------------
// the reduction

struct reduce_plan {
  reduction mode;
  double denominator;  // for mean / batchmean; 1 otherwise
};

// Sum of per-row losses in row order, then the reduction's division. With a denominator of
// 0 (no valid rows) the result is NaN, as in PyTorch.
double finish_reduction(const std::vector<double>& row_losses, const reduce_plan& plan) {
  double total = 0.0;
  for (double v : row_losses) total += v;
  if (plan.mode == reduction::mean || plan.mode == reduction::batchmean)
    return plan.denominator == 0.0 ? kNaN : total / plan.denominator;
  return total;
}

// The factor of the gradient: 1 for none/sum, 1/denominator for mean (0 when there is
// nothing to average: every row has a zero gradient then).
double gradient_coef(const reduce_plan& plan) {
  if (plan.mode == reduction::mean || plan.mode == reduction::batchmean)
    return plan.denominator == 0.0 ? 0.0 : 1.0 / plan.denominator;
  return 1.0;
}

void write_row_losses(const outputs& out, const row_space& space, const std::vector<double>& row_losses) {
  if (!out.losses) return;
  const row_operand op = row_shaped_operand(space, *out.losses);
  char* base = const_cast<char*>(op.base);
  for (std::int64_t r = 0; r < space.rows; ++r)
    store_float<double>(base, op.type, op.row_offset(r), row_losses[static_cast<std::size_t>(r)]);
}

// Row mask: true keeps the row. Returns the number of kept rows.
std::int64_t count_kept(const std::optional<row_operand>& mask, std::int64_t rows) {
  if (!mask) return rows;
  std::int64_t kept = 0;
  for (std::int64_t r = 0; r < rows; ++r)
    kept += reinterpret_cast<const bool*>(mask->base)[mask->row_offset(r)] ? 1 : 0;
  return kept;
}

bool row_kept(const std::optional<row_operand>& mask, std::int64_t r) {
  return !mask || reinterpret_cast<const bool*>(mask->base)[mask->row_offset(r)];
}

std::optional<row_operand> mask_operand(std::string_view fn, const std::optional<array_view>& mask,
                                        const row_space& space) {
  if (!mask) return std::nullopt;
  check_row_shape(fn, "mask", *mask, space);
  if (mask->type != dtype::boolean)
    fail(fn, "mask", "expected a bool array, got " + std::string(dtype_name(mask->type)), error_kind::type);
  return row_shaped_operand(space, *mask);
}

// Runs `rows` rows. Single process: stats and finish per row back to back (the row stays
// in cache). Class-parallel: all stats, the all-reduce (inside `exchange`), then finish.
template <class Context, class Stats, class StatsFn, class FinishFn, class ExchangeFn>
void run_rows(std::int64_t rows, std::int64_t row_length, bool sharded, const Context& make_context,
              StatsFn stats_fn, ExchangeFn exchange, FinishFn finish_fn, std::vector<double>& row_losses) {
  const std::int64_t grain = grain_for(row_length);
  if (!sharded) {
    parallel_for(rows, grain, [&](std::int64_t begin, std::int64_t end) {
      auto ctx = make_context();
      for (std::int64_t r = begin; r < end; ++r) {
        Stats st = stats_fn(ctx, r);
        row_losses[static_cast<std::size_t>(r)] = finish_fn(ctx, r, st);
      }
    });
    return;
  }
  std::vector<Stats> all(static_cast<std::size_t>(rows));
  parallel_for(rows, grain, [&](std::int64_t begin, std::int64_t end) {
    auto ctx = make_context();
    for (std::int64_t r = begin; r < end; ++r) all[static_cast<std::size_t>(r)] = stats_fn(ctx, r);
  });
  exchange(all);
  parallel_for(rows, grain, [&](std::int64_t begin, std::int64_t end) {
    auto ctx = make_context();
    for (std::int64_t r = begin; r < end; ++r)
      row_losses[static_cast<std::size_t>(r)] = finish_fn(ctx, r, all[static_cast<std::size_t>(r)]);
  });
}

// ---------------------------------------------------------------------------------------
// long rows in pieces (kRowPiece in threading.hpp: the split and its cost model)

static_assert(kRowPiece % kChunk == 0, "pieces must hold whole chunks (the exp cache's chunk shifts)");

// A row's statistics: piece(begin, length) for each piece of kRowPiece classes (spread over
// the threads when the caller's thread is free to split), merged with merge(acc, part) in
// piece order, so the result never depends on the thread count. A row of at most
// kRowPiece classes is one piece: one call on this thread.
template <class Stats, class PieceFn, class MergeFn>
[[gnu::noinline]] Stats row_stats_split(std::int64_t C, PieceFn& piece, MergeFn& merge) {
  const std::int64_t pieces = (C + kRowPiece - 1) / kRowPiece;
  std::vector<Stats> parts(static_cast<std::size_t>(pieces));
  parallel_for(pieces, 1, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t p = begin; p < end; ++p) {
      const std::int64_t c0 = p * kRowPiece;
      parts[static_cast<std::size_t>(p)] = piece(c0, std::min(kRowPiece, C - c0));
    }
  });
  Stats acc = parts[0];
  for (std::size_t p = 1; p < parts.size(); ++p) merge(acc, parts[p]);
  return acc;
}

// (the short row inline at the call site: a 64 x 10 call is ~9 us, a function call per
// row and pass shows)
template <class Stats, class PieceFn, class MergeFn>
[[gnu::always_inline]] inline Stats row_stats_in_pieces(std::int64_t C, PieceFn piece, MergeFn merge) {
  if (C <= kRowPiece) [[likely]]
    return piece(std::int64_t{0}, C);
  return row_stats_split<Stats>(C, piece, merge);
}

template <class PieceFn>
[[gnu::noinline]] void row_split(std::int64_t C, PieceFn& piece) {
  parallel_for((C + kRowPiece - 1) / kRowPiece, 1, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t p = begin; p < end; ++p) {
      const std::int64_t c0 = p * kRowPiece;
      piece(c0, std::min(kRowPiece, C - c0));
    }
  });
}

// An element-wise pass over a row (the gradient): piece(begin, length) for each piece.
template <class PieceFn>
[[gnu::always_inline]] inline void row_in_pieces(std::int64_t C, PieceFn piece) {
  if (C <= kRowPiece) [[likely]] {
    piece(std::int64_t{0}, C);
    return;
  }
  row_split(C, piece);
}

// The part of an exp cache (or of a target) that belongs to classes [c0, c0 + length).
template <class T>
exp_cache<T> cache_from(exp_cache<T> cache, std::int64_t c0) {
  return exp_cache<T>{cache.e ? cache.e + c0 : nullptr, cache.shifts ? cache.shifts + c0 / kChunk : nullptr};
}

template <class T>
target_desc<T> desc_slice(const target_desc<T>& t, std::int64_t c0, std::int64_t length) {
  target_desc<T> s = t;
  if (t.dense) s.dense = t.dense + c0;
  if (t.weight) s.weight = t.weight + c0;
  s.onehot = t.onehot >= c0 && t.onehot < c0 + length ? t.onehot - c0 : -1;
  return s;
}

inline void merge_target(target_stats& acc, const target_stats& part) { merge_into(acc, part); }

// ---------------------------------------------------------------------------------------
// cross-entropy: dense probability targets and class-index targets

double validate_smoothing(std::string_view fn, double eps) {
  if (!(eps >= 0.0 && eps <= 1.0))
    fail(fn, "label_smoothing", "expected a value in [0, 1], got " + format_number(eps));
  return eps;
}

template <class T>
std::vector<T> class_weights(const std::optional<array_view>& weight) {
  std::vector<T> w;
  if (!weight) return w;
  w.resize(static_cast<std::size_t>(weight->shape[0]));
  gather<T>(static_cast<const char*>(weight->data), weight->type, 0, weight->strides[0], weight->shape[0], w.data());
  return w;
}

// A row is poisoned (loss and whole gradient row NaN, as in PyTorch) when a NaN or +inf
// logit reached it (the statistics' sum is NaN then, see row_stats.hpp) or a weighted
// target that is not finite (NaN or infinite target or class weight: Σ w t' is not finite).
bool ce_row_poisoned(const target_stats& st) { return std::isnan(st.sum) || !std::isfinite(st.a); }

// The row's log-sum-exp from merged statistics as shift + log_sum (shift -inf for an all
// -inf row, log_sum NaN when poisoned): lse - x = (shift - x) + log_sum keeps -log q exact
// near the max, where lse - x would cancel.
struct row_lse {
  double shift, log_sum;
};
row_lse ce_row_lse(const target_stats& st) {
  if (std::isnan(st.sum)) return {st.shift, kNaN};
  if (st.sum == 0.0 || st.shift == -kInf) return {-kInf, 0.0};
  return {st.shift, std::log(st.sum)};
}

// d loss / d t_c for a dense target row, t'_c = keep t_c + add, wt_c = w_c t'_c:
// coef keep w_c (lse - x_c), and 0 where wt_c = 0 faces lse - x_c = +inf (x_c = -inf: the
// 0 * (-inf) = 0 rule's class; the expression in python/softce/_reference.py agrees).
template <class T>
void target_gradient_row(const T* x, std::int64_t n, const target_desc<T>& t, row_lse lse, double coef, T* gt) {
  const T shift = static_cast<T>(lse.shift), log_sum = static_cast<T>(lse.log_sum);
  const T scale = static_cast<T>(coef) * t.keep;
  for (std::int64_t c = 0; c < n; ++c) {
    const T w = t.weight ? t.weight[c] : T(1);
    const T wt = w * (t.keep * t.dense[c] + t.add);
    T s = (shift - x[c]) + log_sum;
    if (wt == T(0) && s == std::numeric_limits<T>::infinity()) s = T(0);
    gt[c] = scale * w * s;
  }
}

// CE row loss from merged statistics: Σ w t' (lse - x) = a log(sum) - b.
double ce_row_loss(const target_stats& st) {
  if (st.sum == 0.0 || st.shift == -kInf) return st.a > 0.0 ? kInf : 0.0;
  return st.a * std::log(st.sum) - st.b;
}

struct topk_operands {
  row_operand indices, values;
  std::int64_t k;
};

struct ce_call {
  std::string_view fn;
  const array_view& input;
  const cross_entropy_options& options;
  const outputs& out;
  const class_shard* shard;
};

// Dense probability targets, class-index targets, and top-k targets with class weights or
// label smoothing (`sparse`: each row's top-k is scattered into a dense row buffer, since
// every class's target is needed then anyway).
template <class T>
double cross_entropy_dense_impl(const ce_call& call, const row_space& space, const array_view& target,
                                bool index_target, const topk_operands* sparse = nullptr) {
  const kernel_table<T>& kern = kernels_for<T>();
  [[maybe_unused]] const half_kernel_table& half = kernels().half;
  const auto& opt = call.options;
  const row_operand x_op = class_operand(space, call.input);
  const row_operand t_op = sparse ? row_operand{} : index_target ? row_shaped_operand(space, target)
                                                                 : class_operand(space, target);
  std::optional<row_operand> g_op, gt_op;
  if (call.out.grad) g_op = class_operand(space, *call.out.grad);
  if (call.out.grad_target) gt_op = class_operand(space, *call.out.grad_target);  // dense targets only
  const auto mask = mask_operand(call.fn, opt.mask, space);
  const std::vector<T> weight = class_weights<T>(opt.weight);
  const std::int64_t C = space.classes;
  const std::int64_t offset = call.shard ? call.shard->class_offset : 0;
  const std::int64_t total_classes = call.shard ? call.shard->num_classes : C;
  const double eps = opt.label_smoothing;

  // index targets: validate, and sum the weights of the non-ignored targets (mean's
  // denominator, as torch's nll_loss)
  double weight_total = 0.0;
  if (index_target) {
    for (std::int64_t r = 0; r < space.rows; ++r) {
      const std::int64_t y = load_index(t_op.base, t_op.type, t_op.row_offset(r));
      if (y == opt.ignore_index) continue;
      if (y < 0 || y >= total_classes)
        fail(call.fn, "target", "class index " + std::to_string(y) + " at row " + std::to_string(r) +
                                    " is out of range for " + std::to_string(total_classes) + " classes",
             error_kind::index);
      if (!call.shard) weight_total += weight.empty() ? 1.0 : static_cast<double>(weight[static_cast<std::size_t>(y)]);
    }
  }
  reduce_plan plan{opt.reduce, 1.0};
  if (opt.reduce == reduction::mean)
    plan.denominator = index_target ? weight_total : static_cast<double>(count_kept(mask, space.rows));

  std::vector<double> row_losses(static_cast<std::size_t>(space.rows), 0.0);
  struct context {
    row_reader<T> x, t;
    std::optional<row_writer<T>> g, gt;
    const T* xr = nullptr;
    target_desc<T> desc;
    bool skip = false;
    T* gr = nullptr;          // the gradient row, holding the exp cache between the passes
    std::vector<T> shifts;    // the cache's chunk shifts
    std::vector<T> dense;     // a top-k row scattered into zeros
    const std::uint16_t* x16 = nullptr;  // direct_bf16: the rows, read in place
    const std::uint16_t* t16 = nullptr;
    scratch_row<T> ecache;                // direct_bf16: the exp cache
  };
  // bfloat16 logits, probability targets and gradient, contiguous rows, no class weights,
  // one process: the kernels widen and round the 16-bit values in registers (no staging).
  const bool direct_bf16 = std::is_same_v<T, float> && !index_target && !sparse && weight.empty() && !call.shard && !gt_op &&
                           x_op.type == dtype::bfloat16 && x_op.contiguous_rows() && t_op.type == dtype::bfloat16 &&
                           t_op.contiguous_rows() && (!g_op || (g_op->type == dtype::bfloat16 && g_op->contiguous_rows()));
  auto make_context = [&] {
    context c{row_reader<T>(&x_op), row_reader<T>(&t_op), std::nullopt, std::nullopt, nullptr, {}, false, nullptr,
              {}, {}, nullptr, nullptr, {}};
    c.shifts.resize(static_cast<std::size_t>((C + kChunk - 1) / kChunk));
    if (sparse) c.dense.resize(static_cast<std::size_t>(C));
    if (direct_bf16 && g_op) c.ecache = scratch_row<T>(static_cast<std::size_t>(C));
    if (g_op) c.g.emplace(&*g_op);
    if (gt_op) c.gt.emplace(&*gt_op);
    return c;
  };
  // Sets up row r in the context (target descriptor, staged rows); returns the weight of
  // the row's class-index target on this shard (0 if another shard owns it).
  auto prepare = [&](context& c, std::int64_t r) -> double {
    c.desc = target_desc<T>{};
    c.desc.weight = weight.empty() ? nullptr : weight.data();
    c.desc.keep = static_cast<T>(1.0 - eps);
    c.desc.add = static_cast<T>(eps / static_cast<double>(total_classes));
    double target_weight = 0.0;
    if (index_target) {
      const std::int64_t y = load_index(t_op.base, t_op.type, t_op.row_offset(r));
      c.skip = y == opt.ignore_index;
      const std::int64_t local = y - offset;
      // Without smoothing a row uses the weight of its own class only, as torch's nll_loss:
      // w_y goes in as the one-hot's value, so a NaN or inf weight of a class no row uses
      // never meets a row (w_c * 0 would be NaN). With smoothing every weight is used.
      if (eps == 0.0) {
        c.desc.weight = nullptr;
        c.desc.keep = T(0);
      }
      if (!c.skip && local >= 0 && local < C) {
        c.desc.onehot = local;
        target_weight = weight.empty() ? 1.0 : static_cast<double>(weight[static_cast<std::size_t>(local)]);
        if (eps == 0.0) c.desc.keep = static_cast<T>(target_weight);
      }
    } else if (sparse) {
      c.skip = !row_kept(mask, r);
      if (!c.skip) {
        std::fill(c.dense.begin(), c.dense.end(), T(0));
        const row_operand& ix = sparse->indices;
        const row_operand& vs = sparse->values;
        for (std::int64_t j = 0; j < sparse->k; ++j) {
          const std::int64_t local = load_index(ix.base, ix.type, ix.row_offset(r) + j * ix.class_stride) - offset;
          if (local >= 0 && local < C)
            c.dense[static_cast<std::size_t>(local)] =
                load_float<T>(vs.base, vs.type, vs.row_offset(r) + j * vs.class_stride);
        }
        c.desc.dense = c.dense.data();
      }
    } else {
      c.skip = !row_kept(mask, r);
      if (!c.skip && direct_bf16) {
        c.x16 = x_op.template ptr<std::uint16_t>(x_op.row_offset(r));
        c.t16 = t_op.template ptr<std::uint16_t>(t_op.row_offset(r));
        return target_weight;
      }
      if (!c.skip) c.desc.dense = c.t.row(r);
    }
    if (!c.skip) c.xr = c.x.row(r);
    return target_weight;
  };
  auto stats_fn = [&](context& c, std::int64_t r) -> ce_record {
    const double target_weight = prepare(c, r);
    if (c.skip) return ce_record{{-kInf, 0.0, 0.0, 0.0}, 0.0};
    // Single process with a gradient: the statistics pass leaves exp(x - shift) in the
    // gradient row, so the gradient pass needs no second exp.
    exp_cache<T> cache;
    if constexpr (std::is_same_v<T, float>) {
      if (direct_bf16) {
        if (c.g) cache = exp_cache<T>{c.ecache.data(), c.shifts.data()};
        const target_stats st = row_stats_in_pieces<target_stats>(
            C,
            [&](std::int64_t c0, std::int64_t len) {
              return half.target_row_stats_bf16(c.x16 + c0, c.t16 + c0, len, c.desc.keep, c.desc.add, cache_from(cache, c0));
            },
            merge_target);
        return ce_record{st, target_weight};
      }
    }
    // (not with a target gradient: that needs the logits after the statistics pass)
    if (c.g && !call.shard && !c.gt) {
      c.gr = c.g->begin(r);
      cache = exp_cache<T>{c.gr, c.shifts.data()};
    }
    const target_stats st = row_stats_in_pieces<target_stats>(
        C,
        [&](std::int64_t c0, std::int64_t len) {
          return kern.target_row_stats(c.xr + c0, len, desc_slice(c.desc, c0, len), cache_from(cache, c0));
        },
        merge_target);
    return ce_record{st, target_weight};
  };
  double coef = gradient_coef(plan);
  auto finish_fn = [&](context& c, std::int64_t r, const ce_record& rec) -> double {
    if (call.shard) prepare(c, r);  // the passes ran apart: set the row up again
    // a mean over a zero total weight is NaN with a zero gradient, even for a poisoned row
    // (the oracle's rule; torch has 0 / 0 there)
    const bool nothing_to_average = plan.mode == reduction::mean && plan.denominator == 0.0;
    if (c.skip || nothing_to_average) {
      if (c.g) c.g->zero_row(r);
      if (c.gt) c.gt->zero_row(r);
      return 0.0;
    }
    // d loss / d target, before the gradient pass may overwrite the logits (in place)
    if (c.gt) {
      target_gradient_row(c.xr, C, c.desc, ce_row_lse(rec.st), coef, c.gt->begin(r));
      c.gt->commit();
    }
    if (ce_row_poisoned(rec.st)) {
      if constexpr (std::is_same_v<T, float>) {
        if (c.g && direct_bf16) {
          auto* g16 = const_cast<std::uint16_t*>(g_op->template ptr<std::uint16_t>(g_op->row_offset(r)));
          std::fill(g16, g16 + C, float_to_bf16(std::numeric_limits<float>::quiet_NaN()));
          return kNaN;
        }
      }
      if (c.g) c.g->fill_row(r, std::numeric_limits<T>::quiet_NaN());
      return kNaN;
    }
    if constexpr (std::is_same_v<T, float>) {
      if (c.g && direct_bf16) {  // written straight into the bfloat16 output row
        auto* g16 = const_cast<std::uint16_t*>(g_op->template ptr<std::uint16_t>(g_op->row_offset(r)));
        const exp_cache<T> cache{c.ecache.data(), c.shifts.data()};
        const row_normaliser<T> norm = normaliser<T>(rec.st.shift, rec.st.sum);
        row_in_pieces(C, [&](std::int64_t c0, std::int64_t len) {
          half.target_row_grad_cached_bf16(cache_from(cache, c0), c.t16 + c0, len, c.desc.keep, c.desc.add, norm,
                                      static_cast<T>(rec.st.a), static_cast<T>(coef), g16 + c0);
        });
        return ce_row_loss(rec.st);
      }
    }
    if (c.g) {
      const row_normaliser<T> norm = normaliser<T>(rec.st.shift, rec.st.sum);
      if (call.shard || c.gt) {
        T* g = c.g->begin(r);
        row_in_pieces(C, [&](std::int64_t c0, std::int64_t len) {
          kern.target_row_grad(c.xr + c0, len, desc_slice(c.desc, c0, len), norm, static_cast<T>(rec.st.a),
                          static_cast<T>(coef), g + c0);
        });
      } else {
        const exp_cache<T> cache{c.gr, c.shifts.data()};
        row_in_pieces(C, [&](std::int64_t c0, std::int64_t len) {
          kern.target_row_grad_cached(cache_from(cache, c0), len, desc_slice(c.desc, c0, len), norm,
                                 static_cast<T>(rec.st.a), static_cast<T>(coef), c.gr + c0);
        });
      }
      c.g->commit();
    }
    return ce_row_loss(rec.st);
  };
  auto exchange = [&](std::vector<ce_record>& records) {
    all_reduce_records(*call.shard, records, merge_ce_records, {0}, 1.0);
    if (index_target && opt.reduce == reduction::mean) {
      double total = 0.0;
      for (std::int64_t r = 0; r < space.rows; ++r) {
        const std::int64_t y = load_index(t_op.base, t_op.type, t_op.row_offset(r));
        if (y != opt.ignore_index) total += records[static_cast<std::size_t>(r)].target_weight;
      }
      plan.denominator = total;
      coef = gradient_coef(plan);
    }
  };
  run_rows<decltype(make_context), ce_record>(space.rows, C, call.shard != nullptr, make_context, stats_fn,
                                              exchange, finish_fn, row_losses);
  write_row_losses(call.out, space, row_losses);
  return finish_reduction(row_losses, plan);
}

// ---------------------------------------------------------------------------------------
// top-k targets (cross-entropy, and the kl distillation from a top-k teacher)

// Checks shapes and dtypes, then every row's indices: in range and without duplicates.
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

// Uncached rows (no gradient, or class-parallel): a tail sum below this (against the row's
// max, in float) may have lost terms to underflow (each below 1.2e-38): it is summed again
// against the tail's own max. Above it, the terms lost weigh at most C * 1e-18 relative.
constexpr double kTailRescale = 1e-20;

// Top-k rows: dense softmax statistics plus sparse moments; the gradient is the dense
// softmax times a factor, then corrected at the k entries. `temperature_scale` is T for
// distillation (loss T^2 x, gradient T x) and 1 for cross-entropy; `entropy_term` adds
// Σ v log v (the KL rather than the cross-entropy).
template <class T>
double topk_impl(std::string_view fn, const array_view& input, const topk& target,
                 const std::optional<array_view>& mask_view, reduction mode, const outputs& out,
                 const class_shard* shard, double temperature, bool entropy_term) {
  const kernel_table<T>& kern = kernels_for<T>();
  const row_space space = logits_space(fn, input);
  const std::int64_t C = space.classes;
  const std::int64_t offset = shard ? shard->class_offset : 0;
  const std::int64_t total_classes = shard ? shard->num_classes : C;
  const topk_operands ops = validate_topk(fn, entropy_term ? "teacher" : "target", target, space, total_classes);
  const auto mask = mask_operand(fn, mask_view, space);
  const row_operand x_op = class_operand(space, input);
  std::optional<row_operand> g_op;
  if (out.grad) g_op = class_operand(space, *out.grad);
  const double inv_t = 1.0 / temperature, t2 = temperature * temperature;

  reduce_plan plan{mode, 1.0};
  if (mode == reduction::mean || mode == reduction::batchmean) {
    plan.denominator = static_cast<double>(count_kept(mask, space.rows));
    if (mode == reduction::mean && entropy_term) plan.denominator *= static_cast<double>(total_classes);
  }
  const double coef = gradient_coef(plan) * temperature;
  const std::int64_t k = ops.k;
  // a top-k that covers every class has no tail (tau is then only the values' rounding)
  const bool has_tail = target.tail && k < total_classes;

  struct context {
    row_reader<T> x;
    std::optional<row_writer<T>> g;
    const T* xr = nullptr;
    std::vector<double> top_logits;
    std::vector<std::int64_t> local_top;  // this shard's top-k classes of the row
    T* gr = nullptr;                       // the gradient row, holding the exp cache between the passes
    std::vector<T> shifts;                 // the cache's chunk shifts
  };
  // Single process with a gradient: the statistics pass leaves exp(x - shift) in the gradient
  // row and the gradient pass scales it (one exp per element instead of two).
  const bool cached = g_op && !shard;
  auto make_context = [&] {
    context c{row_reader<T>(&x_op), std::nullopt, nullptr, {}, {}, nullptr, {}};
    if (g_op) c.g.emplace(&*g_op);
    if (cached) c.shifts.resize(static_cast<std::size_t>((C + kChunk - 1) / kChunk));
    return c;
  };
  auto entry = [&](std::int64_t r, std::int64_t j, std::int64_t& local, double& v) {
    const std::int64_t io = ops.indices.row_offset(r) + j * ops.indices.class_stride;
    const std::int64_t vo = ops.values.row_offset(r) + j * ops.values.class_stride;
    local = load_index(ops.indices.base, ops.indices.type, io) - offset;
    v = load_float<double>(ops.values.base, ops.values.type, vo);
  };
  // The row's top-k logits, read before a pass may overwrite them (the exp cache and the
  // gradient may be the input itself: in place).
  auto load_top = [&](context& c, std::int64_t r) {
    c.top_logits.resize(static_cast<std::size_t>(k));
    for (std::int64_t j = 0; j < k; ++j) {
      std::int64_t local;
      double v;
      entry(r, j, local, v);
      c.top_logits[static_cast<std::size_t>(j)] = local >= 0 && local < C ? static_cast<double>(c.xr[local]) : 0.0;
    }
  };
  // The tail sum again, against the max outside the top k: exact where the sum against the
  // row's max underflowed (every term below the smallest normal float). Rare: only rows
  // whose tail lies ~46 T or more below the max.
  auto resum_tail = [&](context& c, topk_record& rec) {
    std::sort(c.local_top.begin(), c.local_top.end());
    double tail_max = -kInf;
    std::size_t j = 0;
    for (std::int64_t i = 0; i < C; ++i) {
      if (j < c.local_top.size() && c.local_top[j] == i) {
        ++j;
        continue;
      }
      tail_max = std::max(tail_max, static_cast<double>(c.xr[i]));
    }
    rec.tail_shift = tail_max;
    rec.e_tail = tail_max == -kInf ? 0.0
                                   : kern.exp_sum_excluding(c.xr, C, static_cast<T>(inv_t), static_cast<T>(tail_max),
                                                       c.local_top.data(), static_cast<std::int64_t>(c.local_top.size()));
  };
  // Cached rows with a tail: the statistics pass runs over the tail alone, chunk by chunk:
  // a chunk without top-k entries is read in place; one holding top-k entries is summed
  // straight from x with their exps subtracted, unless a top-k entry is its max: then it
  // is copied into the gradient row with those entries set to -inf and summed again. Either way the tail's sum is taken against the tail's own max (exact however
  // far below the top k it lies) and its exps stay as the cache. The row's statistics are
  // then the tail's plus the top-k terms, summed in double.
  auto tail_row_stats = [&](context& c, std::int64_t r) -> topk_record {
    c.gr = c.g->begin(r);
    c.local_top.clear();
    for (std::int64_t j = 0; j < k; ++j) {
      std::int64_t local;
      double v;
      entry(r, j, local, v);
      if (local >= 0 && local < C) c.local_top.push_back(local);
    }
    std::sort(c.local_top.begin(), c.local_top.end());
    const T it = static_cast<T>(inv_t);
    // one piece of the row: its chunks merged in order (pieces touch disjoint parts of the
    // gradient row and the chunk shifts)
    auto tail_piece = [&](std::int64_t p0, std::int64_t plen) {
      softmax_stats tail{-kInf, 0.0};
      std::size_t next = static_cast<std::size_t>(
          std::lower_bound(c.local_top.begin(), c.local_top.end(), p0) - c.local_top.begin());
      for (std::int64_t c0 = p0; c0 < p0 + plen; c0 += kChunk) {
        const std::int64_t len = std::min<std::int64_t>(kChunk, p0 + plen - c0);
        const exp_cache<T> chunk_cache{c.gr + c0, c.shifts.data() + c0 / kChunk};
        const std::size_t first = next;  // the chunk's top-k entries: local_top[first, next)
        while (next < c.local_top.size() && c.local_top[next] < c0 + len) ++next;
        if (first == next) {  // no top-k entry: the chunk is all tail
          merge_into(tail, kern.softmax_row_stats(c.xr + c0, len, it, chunk_cache), static_cast<double>(it));
          continue;
        }
        // The statistics straight from x, then the top-k entries' cached exps taken out of
        // the sum: exact enough while the chunk's max is a tail entry (the tail's sum is then
        // >= 1 and the top-k exps are each <= 1). When a top-k entry is the max, the tail
        // may lie far below it (its exps underflow past a gap of ~88 T): the chunk's top-k
        // entries are set to -inf in the gradient row (out of place: a copy of the chunk)
        // and the tail summed against its own max. In place the pass would overwrite x, so
        // the decision comes first (is some logit above the chunk's largest top-k logit? a
        // few elements usually tell, else the chunk's max); out of place it comes with the
        // pass. For finite and infinite logits both decide alike, so both do the same
        // arithmetic (bitwise the same gradient); a NaN poisons the row on either path.
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
          return kern.chunk_max(xc, len) > top_max;
        };
        const bool in_place = c.gr == c.xr;
        if (!in_place || tail_above_top()) {
          softmax_stats st = kern.softmax_row_stats(c.xr + c0, len, it, chunk_cache);
          if (in_place || !top_is_max(st.shift)) {
            for (std::size_t j = first; j < next; ++j) st.sum -= static_cast<double>(c.gr[c.local_top[j]]);
            merge_into(tail, st, static_cast<double>(it));  // a NaN sum stays NaN
            continue;
          }
          std::copy(c.xr + c0, c.xr + c0 + len, c.gr + c0);
        }
        for (std::size_t j = first; j < next; ++j) c.gr[c.local_top[j]] = -std::numeric_limits<T>::infinity();
        merge_into(tail, kern.softmax_row_stats(c.gr + c0, len, it, chunk_cache), static_cast<double>(it));
      }
      return tail;
    };
    const softmax_stats tail = row_stats_in_pieces<softmax_stats>(
        C, tail_piece, [&](softmax_stats& acc, const softmax_stats& part) { merge_into(acc, part, static_cast<double>(it)); });
    double top_max = -kInf;
    for (std::int64_t j = 0; j < k; ++j) {
      std::int64_t local;
      double v;
      entry(r, j, local, v);
      if (local >= 0 && local < C) top_max = std::fmax(top_max, c.top_logits[static_cast<std::size_t>(j)]);
    }
    const double shift = std::fmax(tail.shift, top_max);
    const double finite_shift = shift == -kInf ? 0.0 : shift;
    topk_record rec{shift, 0.0, 0.0, 0.0, 0.0, tail.sum, tail.shift};
    for (std::int64_t j = 0; j < k; ++j) {
      std::int64_t local;
      double v;
      entry(r, j, local, v);
      if (local < 0 || local >= C) continue;
      const double dk = (c.top_logits[static_cast<std::size_t>(j)] - finite_shift) * inv_t;
      rec.a += v;
      if (v != 0.0) rec.b += v * dk;
      rec.e += std::exp(dk);
    }
    rec.sum = rec.e + tail.sum * rescale(tail.shift, shift, inv_t);  // NaN stays NaN
    return rec;
  };
  // The gradient of a cached tail row outside the top k, chunk by chunk from the tail's
  // exps e_c = exp((x_c - s) / T) (s the chunk's shift): coef q_c (a - tau Q / (1 - Q)) with
  // q_c = e_c exp((s - shift) / T) / sum and q_c / (1 - Q) = e_c exp((s - tail_shift) / T)
  // / e_tail, both factors at most 1 (no overflow, whatever the gap). An all -inf chunk
  // holds shift 0 and zeros: min() keeps its factor finite.
  auto tail_row_grad = [&](context& c, const topk_record& rec, double tau, bool tail_active) {
    const bool empty = rec.sum == 0.0 || rec.shift == -kInf;
    const double log_sum = empty ? 0.0 : std::log(rec.sum), Q = empty ? 0.0 : rec.e / rec.sum;
    row_in_pieces(C, [&](std::int64_t p0, std::int64_t plen) {
      for (std::int64_t c0 = p0; c0 < p0 + plen; c0 += kChunk) {
        const double s = static_cast<double>(c.shifts[static_cast<std::size_t>(c0 / kChunk)]);
        double factor = empty ? 0.0 : rec.a * std::exp((std::min(s, rec.shift) - rec.shift) * inv_t - log_sum);
        if (!empty && tail_active && rec.e_tail > 0.0)
          factor -= tau * Q * std::exp((std::min(s, rec.tail_shift) - rec.tail_shift) * inv_t) / rec.e_tail;
        kern.scale_row(c.gr + c0, std::min<std::int64_t>(kChunk, p0 + plen - c0), static_cast<T>(coef * factor), c.gr + c0);
      }
    });
  };
  auto stats_fn = [&](context& c, std::int64_t r) -> topk_record {
    if (!row_kept(mask, r)) return topk_record{-kInf, 0.0, 0.0, 0.0, 0.0, 0.0, -kInf};
    c.xr = c.x.row(r);
    load_top(c, r);
    if (cached && has_tail) return tail_row_stats(c, r);
    exp_cache<T> cache;
    if (cached) {
      c.gr = c.g->begin(r);
      cache = exp_cache<T>{c.gr, c.shifts.data()};
    }
    const softmax_stats sm = row_stats_in_pieces<softmax_stats>(
        C,
        [&](std::int64_t c0, std::int64_t len) {
          return kern.softmax_row_stats(c.xr + c0, len, static_cast<T>(inv_t), cache_from(cache, c0));
        },
        [&](softmax_stats& acc, const softmax_stats& part) { merge_into(acc, part, static_cast<double>(static_cast<T>(inv_t))); });
    topk_record rec{sm.shift, sm.sum, 0.0, 0.0, 0.0, 0.0, sm.shift};
    const double shift = sm.shift == -kInf ? 0.0 : sm.shift;
    c.local_top.clear();
    for (std::int64_t j = 0; j < k; ++j) {
      std::int64_t local;
      double v;
      entry(r, j, local, v);
      if (local < 0 || local >= C) continue;
      const double dk = (c.top_logits[static_cast<std::size_t>(j)] - shift) * inv_t;
      rec.a += v;
      if (v != 0.0) rec.b += v * dk;
      rec.e += std::exp(dk);
      c.local_top.push_back(local);
    }
    if (has_tail) {  // not cached: the row is still there to be read again
      std::sort(c.local_top.begin(), c.local_top.end());
      rec.e_tail = kern.exp_sum_excluding(c.xr, C, static_cast<T>(inv_t), static_cast<T>(shift), c.local_top.data(),
                                     static_cast<std::int64_t>(c.local_top.size()));
      if (rec.e_tail < kTailRescale) resum_tail(c, rec);
    }
    return rec;
  };
  // The gradient outside the top k, coef q_c (a - tau Q / (1 - Q)), for a rescaled tail:
  // Q / (1 - Q) may exceed the float range while q_c underflows, so the factor's log goes
  // into the normaliser (g = ±exp((x - shift) / T - log_sum + log|factor|)) and only the
  // product is ever formed. The top-k entries are overwritten afterwards.
  auto rescaled_tail_grad = [&](const T* x, const topk_record& rec, double tau, double log_tail, T* g) {
    const double log_ratio = std::log(std::fabs(tau)) + std::log(rec.e) - log_tail;  // log |tau| Q / (1 - Q)
    double log_factor, sign;
    if (log_ratio > 600.0) {  // a is at most 1: nothing next to e^600
      log_factor = std::log(coef) + log_ratio;
      sign = tau > 0.0 ? -1.0 : 1.0;
    } else {
      const double factor = coef * (rec.a - (tau > 0.0 ? 1.0 : -1.0) * std::exp(log_ratio));
      log_factor = std::log(std::fabs(factor));
      sign = factor < 0.0 ? -1.0 : factor > 0.0 ? 1.0 : 0.0;
    }
    const row_normaliser<T> norm = normaliser<T>(rec.shift, rec.sum);
    const row_normaliser<T> folded{norm.shift, static_cast<T>(static_cast<double>(norm.log_sum) - log_factor)};
    row_in_pieces(C, [&](std::int64_t c0, std::int64_t len) {
      kern.softmax_row_grad(x + c0, len, static_cast<T>(inv_t), sign == 0.0 ? norm : folded, static_cast<T>(sign), g + c0);
    });
  };
  auto finish_fn = [&](context& c, std::int64_t r, const topk_record& rec) -> double {
    if (!row_kept(mask, r)) {
      if (c.g) c.g->zero_row(r);
      return 0.0;
    }
    // values are identical on every shard: their sum and entropy need no exchange
    double value_sum = 0.0, entropy = 0.0;
    for (std::int64_t j = 0; j < k; ++j) {
      std::int64_t local;
      double v;
      entry(r, j, local, v);
      value_sum += v;
      if (entropy_term && v != 0.0) entropy += v * std::log(v);
    }
    // a NaN or +inf logit (NaN sum) or a value that is not finite poisons the row
    if (std::isnan(rec.sum) || !std::isfinite(value_sum)) {
      if (c.g) c.g->fill_row(r, std::numeric_limits<T>::quiet_NaN());
      return kNaN;
    }
    const bool all_neg_inf = rec.sum == 0.0 || rec.shift == -kInf;
    double loss = all_neg_inf ? (rec.a > 0.0 ? kInf : 0.0) : rec.a * std::log(rec.sum) - rec.b;
    const double tau = 1.0 - value_sum;
    const bool tail_active = has_tail && tau != 0.0 && !all_neg_inf;
    // the tail was summed against its own max (below the row's): see topk_record (an empty
    // or all -inf tail, e_tail = 0, keeps the plain path: its q are 0)
    const bool rescaled = tail_active && rec.e_tail > 0.0 && rec.tail_shift < rec.shift;
    // -tau log(1 - Q) with 1 - Q = e_tail exp((tail_shift - shift) / T) / sum; d/dx_c is
    // -tau q_c Q / (1 - Q) outside the top k (Q / (1 - Q) = e / e_tail) and +tau q_c inside
    double outside_factor = 0.0;
    const double log_tail = std::log(rec.e_tail) + (rescaled ? (rec.tail_shift - rec.shift) * inv_t : 0.0);
    if (tail_active) {
      loss += -tau * (log_tail - std::log(rec.sum));
      if (rec.e_tail > 0.0 && !rescaled) outside_factor = -tau * rec.e / rec.e_tail;
    }
    if (entropy_term && has_tail && tau > 0.0) loss += tau * std::log(tau);  // 0 for tau <= 0
    loss = (loss + entropy) * (entropy_term ? t2 : 1.0);
    if (c.g) {
      const row_normaliser<T> norm = normaliser<T>(rec.shift, rec.sum);
      const T scale = static_cast<T>(coef * (rec.a + outside_factor));
      // q (a + outside_factor) everywhere, then the top-k entries written directly:
      // q_k (a + tau) - v_k with the tail, q_k a - v_k without
      T* g;
      if (cached && has_tail) {
        g = c.gr;
        tail_row_grad(c, rec, tau, tail_active);
      } else if (cached) {
        g = c.gr;
        const exp_cache<T> cache{c.gr, c.shifts.data()};
        row_in_pieces(C, [&](std::int64_t c0, std::int64_t len) {
          kern.softmax_row_grad_cached(cache_from(cache, c0), len, static_cast<T>(inv_t), norm, scale, g + c0);
        });
      } else {
        if (!cached) {  // class-parallel: the passes ran apart, read the row again
          c.xr = c.x.row(r);
          load_top(c, r);
        }
        g = cached ? c.gr : c.g->begin(r);
        if (rescaled)
          rescaled_tail_grad(c.xr, rec, tau, log_tail, g);
        else
          row_in_pieces(C, [&](std::int64_t c0, std::int64_t len) {
            kern.softmax_row_grad(c.xr + c0, len, static_cast<T>(inv_t), norm, scale, g + c0);
          });
      }
      const double ls = static_cast<double>(norm.log_sum), sh = static_cast<double>(norm.shift);
      const double inside = rec.a + (tail_active ? tau : 0.0);
      for (std::int64_t j = 0; j < k; ++j) {
        std::int64_t local;
        double v;
        entry(r, j, local, v);
        if (local < 0 || local >= C) continue;
        const double qk = std::exp((c.top_logits[static_cast<std::size_t>(j)] - sh) * inv_t - ls);
        g[local] = static_cast<T>(coef * (qk * inside - v));
      }
      c.g->commit();
    }
    return loss;
  };
  auto exchange = [&](std::vector<topk_record>& records) {
    all_reduce_records(*shard, records, merge_topk_records, {0, 6}, inv_t);
  };
  std::vector<double> row_losses(static_cast<std::size_t>(space.rows), 0.0);
  run_rows<decltype(make_context), topk_record>(space.rows, C, shard != nullptr, make_context, stats_fn, exchange,
                                                finish_fn, row_losses);
  write_row_losses(out, space, row_losses);
  return finish_reduction(row_losses, plan);
}

// ---------------------------------------------------------------------------------------
// distillation with dense teacher logits

// d loss / d z for a row of teacher logits z (student x), u = x / T, v = z / T,
// log q = u - shift_x / T - log Σx, log p likewise, coef = the reduction's factor times T:
//   kl:         coef p (log p - log q - KL(p || q))
//   reverse_kl: coef (p - q)
//   jsd:        coef beta p (log p - log m - KL(p || m)),  m = beta p + (1 - beta) q
// (the derivatives of the expressions in python/softce/_reference.py). Scalar, in double:
// only calls that ask for the teacher's gradient pay for it.
struct teacher_gradient_row_args {
  double inv_t, shift_x, log_sum_x, shift_z, log_sum_z;
  grad_kind kind;
  double beta, divergence, coef;  // divergence: KL(p || q) for kl, KL(p || m) for jsd
};

template <class T>
void teacher_gradient_row(const T* x, const T* z, std::int64_t n, const teacher_gradient_row_args& a, T* gt) {
  const double log_beta = std::log(a.beta), log_rest = std::log1p(-a.beta);
  for (std::int64_t c = 0; c < n; ++c) {
    const double log_q = (static_cast<double>(x[c]) - a.shift_x) * a.inv_t - a.log_sum_x;
    const double log_p = (static_cast<double>(z[c]) - a.shift_z) * a.inv_t - a.log_sum_z;
    const double p = std::exp(log_p);
    double g;
    if (a.kind == grad_kind::kl) {
      g = p == 0.0 ? 0.0 : p * (log_p - log_q - a.divergence);
    } else if (a.kind == grad_kind::reverse_kl) {
      g = p - std::exp(log_q);
    } else {
      const double u = log_beta + log_p, v = log_rest + log_q, m = std::max(u, v);
      const double log_m = m == -kInf ? -kInf : m + std::log1p(std::exp(-std::fabs(u - v)));
      g = p == 0.0 ? 0.0 : a.beta * p * (log_p - log_m - a.divergence);
    }
    gt[c] = static_cast<T>(a.coef * g);
  }
}


template <class T>
double distill_dense_impl(std::string_view fn, const array_view& student, const array_view& teacher,
                          const distillation_options& opt, const outputs& out, const class_shard* shard) {
  const kernel_table<T>& kern = kernels_for<T>();
  const row_space space = logits_space(fn, student);
  const std::int64_t C = space.classes;
  const std::int64_t total_classes = shard ? shard->num_classes : C;
  const auto mask = mask_operand(fn, opt.mask, space);
  const row_operand x_op = class_operand(space, student), z_op = class_operand(space, teacher);
  std::optional<row_operand> g_op, gt_op;
  if (out.grad) g_op = class_operand(space, *out.grad);
  if (out.grad_target) gt_op = class_operand(space, *out.grad_target);
  const double T_ = opt.temperature, inv_t = 1.0 / T_, t2 = T_ * T_;
  // TRL's endpoints: beta = 0 is the forward KL, beta = 1 the reverse KL
  grad_kind kind = opt.kind == divergence::kl ? grad_kind::kl : opt.kind == divergence::reverse_kl ? grad_kind::reverse_kl : grad_kind::jsd;
  if (kind == grad_kind::jsd && opt.beta == 0.0) kind = grad_kind::kl;
  if (kind == grad_kind::jsd && opt.beta == 1.0) kind = grad_kind::reverse_kl;
  const double beta = opt.beta;
  const distill_kind stats_kind = kind == grad_kind::reverse_kl ? distill_kind::reverse_kl : distill_kind::kl;

  reduce_plan plan{opt.reduce, 1.0};
  if (opt.reduce == reduction::mean || opt.reduce == reduction::batchmean) {
    plan.denominator = static_cast<double>(count_kept(mask, space.rows));
    if (opt.reduce == reduction::mean) plan.denominator *= static_cast<double>(total_classes);
  }
  const double coef = gradient_coef(plan) * T_;

  struct context {
    row_reader<T> x, z;
    std::optional<row_writer<T>> g, gt;
    const T* xr = nullptr;
    const T* zr = nullptr;
    T* gr = nullptr;                         // gradient row, holding exp of the student
    scratch_row<T> ez;                       // exp of the teacher
    std::vector<T> shifts_x, shifts_z;       // the chunk shifts
    scratch_row<T> ex;                       // exp of the student (scratch: reverse_kl, jsd)
  };
  // kl in one process: the statistics pass caches both exps, the gradient pass reuses them
  // (not with a teacher gradient: that needs the student's logits after the statistics pass)
  const bool cached = out.grad && !shard && kind == grad_kind::kl && !out.grad_target;
  // reverse_kl (with a gradient) and jsd in one process: the statistics pass caches both
  // exps in scratch rows (the logits stay intact: log q and log p are read from them), so
  // the JSD pass and the gradient pass need no exp per element (jsd: one log, of m).
  const bool scratch = !shard && ((out.grad && kind == grad_kind::reverse_kl) || kind == grad_kind::jsd);
  auto make_context = [&] {
    context c{row_reader<T>(&x_op), row_reader<T>(&z_op), std::nullopt, std::nullopt, nullptr, nullptr, nullptr, {}, {},
              {}, {}};
    if (g_op) c.g.emplace(&*g_op);
    if (gt_op) c.gt.emplace(&*gt_op);
    if (cached || scratch) {
      c.ez = scratch_row<T>(static_cast<std::size_t>(C));
      c.shifts_x.resize(static_cast<std::size_t>((C + kChunk - 1) / kChunk));
      c.shifts_z.resize(c.shifts_x.size());
    }
    if (scratch) c.ex = scratch_row<T>(static_cast<std::size_t>(C));
    return c;
  };
  auto stage = [&](context& c, std::int64_t r) {
    c.xr = c.x.row(r);
    c.zr = c.z.row(r);
  };
  auto stats_fn = [&](context& c, std::int64_t r) -> distill_stats {
    if (!row_kept(mask, r)) return distill_stats{-kInf, 0.0, -kInf, 0.0, 0.0};
    stage(c, r);
    exp_cache<T> cx, cz;
    if (cached) {
      c.gr = c.g->begin(r);
      cx = exp_cache<T>{c.gr, c.shifts_x.data()};
      cz = exp_cache<T>{c.ez.data(), c.shifts_z.data()};
    } else if (scratch) {
      cx = exp_cache<T>{c.ex.data(), c.shifts_x.data()};
      cz = exp_cache<T>{c.ez.data(), c.shifts_z.data()};
    }
    return row_stats_in_pieces<distill_stats>(
        C,
        [&](std::int64_t c0, std::int64_t len) {
          return kern.distill_row_stats(c.xr + c0, c.zr + c0, len, static_cast<T>(inv_t), stats_kind, cache_from(cx, c0),
                                   cache_from(cz, c0));
        },
        [&](distill_stats& acc, const distill_stats& part) {
          merge_into(acc, part, static_cast<double>(static_cast<T>(inv_t)), stats_kind);
        });
  };
  // jsd's second pass, per row, after the normalisers are final
  std::vector<jsd_stats> jsd;
  auto jsd_of = [&](context& c, const distill_stats& st) {
    const row_normaliser<T> nx = normaliser<T>(st.shift_x, st.sum_x), nz = normaliser<T>(st.shift_z, st.sum_z);
    const exp_cache<T> cx{c.ex.data(), c.shifts_x.data()}, cz{c.ez.data(), c.shifts_z.data()};
    return row_stats_in_pieces<jsd_stats>(
        C,
        [&](std::int64_t c0, std::int64_t len) {
          if (scratch)  // log m replaces the teacher's exps, for the gradient pass
            return kern.jsd_row_stats_cached(c.xr + c0, c.zr + c0, cache_from(cx, c0), cache_from(cz, c0), len,
                                        static_cast<T>(inv_t), nx, nz, static_cast<T>(beta), c.ez.data() + c0);
          return kern.jsd_row_stats(c.xr + c0, c.zr + c0, len, static_cast<T>(inv_t), nx, nz, static_cast<T>(beta));
        },
        [](jsd_stats& acc, const jsd_stats& part) {
          acc.kl_pm += part.kl_pm;
          acc.kl_qm += part.kl_qm;
        });
  };
  auto finish_fn = [&](context& c, std::int64_t r, const distill_stats& st) -> double {
    if (!row_kept(mask, r)) {
      if (c.g) c.g->zero_row(r);
      if (c.gt) c.gt->zero_row(r);
      return 0.0;
    }
    // a NaN or +inf logit on either side, or a side that is all -inf (no softmax: torch's
    // log_softmax is NaN there)
    if (std::isnan(st.sum_x) || std::isnan(st.sum_z) || (C > 0 && (st.sum_x == 0.0 || st.sum_z == 0.0))) {
      if (c.g) c.g->fill_row(r, std::numeric_limits<T>::quiet_NaN());
      if (c.gt) c.gt->fill_row(r, std::numeric_limits<T>::quiet_NaN());
      return kNaN;
    }
    // reverse KL with p = 0 where q > 0 (a finite student logit against a -inf teacher
    // logit): KL(q || p) = +inf, and its gradient has no value (torch: inf and NaN mixed).
    // k is then +inf, or NaN where q underflowed in float (0 * inf).
    if (kind == grad_kind::reverse_kl && !(st.k < kInf)) {
      if (c.g) c.g->fill_row(r, std::numeric_limits<T>::quiet_NaN());
      if (c.gt) c.gt->fill_row(r, std::numeric_limits<T>::quiet_NaN());
      return kInf;
    }
    if (shard) stage(c, r);
    const double lsx = st.sum_x > 0.0 ? std::log(st.sum_x) : -kInf;
    const double lsz = st.sum_z > 0.0 ? std::log(st.sum_z) : -kInf;
    double divergence_value = 0.0, r_value = 0.0, teacher_value = 0.0;
    if (kind == grad_kind::kl) {
      // q = 0 where p > 0 (a -inf student logit against a finite teacher logit): KL = +inf,
      // with the ordinary gradient T (q - p); k is +inf, or NaN where p underflowed
      divergence_value = !(st.k < kInf) ? kInf : st.sum_z > 0.0 ? st.k / st.sum_z - lsz + lsx : 0.0;
      teacher_value = divergence_value;
    } else if (kind == grad_kind::reverse_kl) {
      divergence_value = st.sum_x > 0.0 ? st.k / st.sum_x - lsx + lsz : 0.0;
      r_value = divergence_value;
    } else {
      const jsd_stats js = shard ? jsd[static_cast<std::size_t>(r)] : jsd_of(c, st);
      divergence_value = beta * js.kl_pm + (1.0 - beta) * js.kl_qm;
      r_value = js.kl_qm;
      teacher_value = js.kl_pm;
    }
    if (c.gt) {  // before the gradient pass may overwrite the student's logits (in place)
      const teacher_gradient_row_args a{inv_t, st.shift_x, lsx, st.shift_z, lsz, kind, beta, teacher_value, coef};
      teacher_gradient_row(c.xr, c.zr, C, a, c.gt->begin(r));
      c.gt->commit();
    }
    if (c.g && cached) {
      const exp_cache<T> cx{c.gr, c.shifts_x.data()}, cz{c.ez.data(), c.shifts_z.data()};
      const row_normaliser<T> nx = normaliser<T>(st.shift_x, st.sum_x), nz = normaliser<T>(st.shift_z, st.sum_z);
      row_in_pieces(C, [&](std::int64_t c0, std::int64_t len) {
        kern.distill_row_grad_kl_cached(cache_from(cx, c0), cache_from(cz, c0), len, static_cast<T>(inv_t), nx, nz,
                                   static_cast<T>(coef), c.gr + c0);
      });
      c.g->commit();
    } else if (c.g) {
      T* g = c.g->begin(r);
      const double row_coef = kind == grad_kind::jsd ? coef * (1.0 - beta) : coef;
      const row_normaliser<T> nx = normaliser<T>(st.shift_x, st.sum_x), nz = normaliser<T>(st.shift_z, st.sum_z);
      const exp_cache<T> cx{c.ex.data(), c.shifts_x.data()};
      row_in_pieces(C, [&](std::int64_t c0, std::int64_t len) {
        if (scratch)
          kern.distill_row_grad_log_cached(c.xr + c0, c.zr + c0, kind == grad_kind::jsd ? c.ez.data() + c0 : nullptr,
                                      cache_from(cx, c0), len, static_cast<T>(inv_t), nx, nz,
                                      static_cast<T>(r_value), static_cast<T>(row_coef), g + c0);
        else
          kern.distill_row_grad(c.xr + c0, c.zr + c0, len, static_cast<T>(inv_t), nx, nz, kind, static_cast<T>(beta),
                           static_cast<T>(r_value), static_cast<T>(row_coef), g + c0);
      });
      c.g->commit();
    }
    return t2 * divergence_value;
  };
  auto exchange = [&](std::vector<distill_stats>& records) {
    all_reduce_records(*shard, records, stats_kind == distill_kind::kl ? merge_distill_kl : merge_distill_reverse,
                       {0, 2}, inv_t);
    if (kind != grad_kind::jsd) return;
    jsd.assign(records.size(), jsd_stats{});
    parallel_for(space.rows, grain_for(C), [&](std::int64_t begin, std::int64_t end) {
      auto c = make_context();
      for (std::int64_t r = begin; r < end; ++r) {
        if (!row_kept(mask, r)) continue;
        stage(c, r);
        jsd[static_cast<std::size_t>(r)] = jsd_of(c, records[static_cast<std::size_t>(r)]);
      }
    });
    shard->all_reduce(reinterpret_cast<double*>(jsd.data()), static_cast<std::int64_t>(jsd.size() * 2), 1, merge_sums);
  };
  std::vector<double> row_losses(static_cast<std::size_t>(space.rows), 0.0);
  run_rows<decltype(make_context), distill_stats>(space.rows, C, shard != nullptr, make_context, stats_fn, exchange,
                                                  finish_fn, row_losses);
  write_row_losses(out, space, row_losses);
  return finish_reduction(row_losses, plan);
}

// ---------------------------------------------------------------------------------------
// public entry points (shared by the single-process and class-parallel forms)

bool computes_in_double(const array_view& input) { return input.type == dtype::float64; }

void check_shard(std::string_view fn, const class_shard* shard, const row_space& space) {
  if (!shard) return;
  if (!shard->all_reduce) fail(fn, "shard", "expected an all_reduce function, got none");
  // the end of the shard's class range, overflow-checked (an offset near 2^63 would wrap)
  std::int64_t end = 0;
  if (__builtin_add_overflow(shard->class_offset, space.classes, &end))
    fail(fn, "shard", "class_offset " + std::to_string(shard->class_offset) + " plus " +
                          std::to_string(space.classes) + " classes overflows a 64-bit index");
  if (shard->class_offset < 0 || end > shard->num_classes)
    fail(fn, "shard", "expected classes [" + std::to_string(shard->class_offset) + ", " + std::to_string(end) +
                          ") to lie within " + std::to_string(shard->num_classes) + " classes");
}

double cross_entropy_entry(const array_view& input, const array_view& target, const cross_entropy_options& opt,
                           const outputs& out, const class_shard* shard, std::string_view fn = "cross_entropy") {
  const row_space space = logits_space(fn, input);
  check_shard(fn, shard, space);
  check_reduction(fn, opt.reduce, {reduction::none, reduction::mean, reduction::sum});
  validate_smoothing(fn, opt.label_smoothing);
  check_extent(fn, "target", target);
  const bool index_target = is_index(target.type);
  if (index_target) {
    check_row_shape(fn, "target", target, space);
    if (opt.mask) fail(fn, "mask", "expected no mask with class-index targets (use ignore_index)");
  } else if (is_float(target.type)) {
    check_same_shape(fn, "target", target, input, "input");
    if (opt.ignore_index >= 0)  // as torch: probability targets have no ignore_index
      fail(fn, "ignore_index", "expected no ignore_index with probability targets (use mask), got " +
                                   std::to_string(opt.ignore_index));
  } else {
    fail(fn, "target", "expected class indices (int32/int64) or probabilities (float), got " +
                           std::string(dtype_name(target.type)), error_kind::type);
  }
  if (opt.weight) check_class_vector(fn, "weight", *opt.weight, space.classes);
  check_outputs(fn, out, input, space.dims, space.ndim, opt.reduce);
  check_aliasing(fn, out, {{"target", target}, {"weight", opt.weight}, {"mask", opt.mask}});
  check_grad_target(fn, out, index_target ? nullptr : &target, "target", "with class-index targets (no gradient)");
  const ce_call call{fn, input, opt, out, shard};
  return computes_in_double(input) ? cross_entropy_dense_impl<double>(call, space, target, index_target)
                                   : cross_entropy_dense_impl<float>(call, space, target, index_target);
}

double cross_entropy_topk_entry(const array_view& input, const topk& target, const cross_entropy_options& opt,
                                const outputs& out, const class_shard* shard) {
  constexpr std::string_view fn = "cross_entropy";
  const row_space space = logits_space(fn, input);
  check_shard(fn, shard, space);
  check_reduction(fn, opt.reduce, {reduction::none, reduction::mean, reduction::sum});
  validate_smoothing(fn, opt.label_smoothing);
  if (opt.weight) check_class_vector(fn, "weight", *opt.weight, space.classes);
  check_outputs(fn, out, input, space.dims, space.ndim, opt.reduce);
  check_aliasing(fn, out, {{"target.indices", target.indices}, {"target.values", target.values},
                           {"weight", opt.weight}, {"mask", opt.mask}});
  check_grad_target(fn, out, nullptr, "target", "with top-k targets (only dense probability targets have one)");
  if (target.tail && (opt.weight || opt.label_smoothing != 0.0))
    fail(fn, "target.tail", "expected no class weight and no label smoothing with a tail bucket");
  if (opt.weight || opt.label_smoothing != 0.0) {
    const topk_operands ops = validate_topk(fn, "target", target, space, shard ? shard->num_classes : space.classes);
    const ce_call call{fn, input, opt, out, shard};
    return computes_in_double(input) ? cross_entropy_dense_impl<double>(call, space, input, false, &ops)
                                     : cross_entropy_dense_impl<float>(call, space, input, false, &ops);
  }
  return computes_in_double(input)
             ? topk_impl<double>(fn, input, target, opt.mask, opt.reduce, out, shard, 1.0, false)
             : topk_impl<float>(fn, input, target, opt.mask, opt.reduce, out, shard, 1.0, false);
}

void check_distillation_options(std::string_view fn, const distillation_options& opt) {
  if (!(opt.temperature > 0.0) || !std::isfinite(opt.temperature))
    fail(fn, "temperature", "expected a finite value > 0, got " + format_number(opt.temperature));
  // the kernels scale by 1 / T in float32: an infinite factor would turn x - max = 0 into NaN
  if (!std::isfinite(static_cast<float>(1.0 / opt.temperature)))
    fail(fn, "temperature", "expected a value whose reciprocal is finite in float32, got " +
                                format_number(opt.temperature));
  if (!(opt.beta >= 0.0 && opt.beta <= 1.0))
    fail(fn, "beta", "expected a value in [0, 1], got " + format_number(opt.beta));
}

double distillation_entry(const array_view& student_logits, const array_view& teacher_logits,
                          const distillation_options& opt, const outputs& out_logits, const class_shard* shard) {
  constexpr std::string_view fn = "distillation_loss";
  // the class dimension moved to index 1 (options.dim)
  const class_first_views views = distillation_layout(fn, opt, student_logits, &teacher_logits, out_logits);
  const array_view &student = views.student, &teacher = views.teacher;
  const outputs& out = views.out;
  const row_space space = logits_space(fn, student);
  check_shard(fn, shard, space);
  check_distillation_options(fn, opt);
  check_float(fn, "teacher", teacher);
  check_same_shape(fn, "teacher", teacher, student, "student");
  check_outputs(fn, out, student, space.dims, space.ndim, opt.reduce);
  check_aliasing(fn, out, {{"teacher", teacher}, {"mask", opt.mask}});
  check_grad_target(fn, out, &teacher, "teacher");
  return computes_in_double(student) ? distill_dense_impl<double>(fn, student, teacher, opt, out, shard)
                                     : distill_dense_impl<float>(fn, student, teacher, opt, out, shard);
}

double distillation_topk_entry(const array_view& student_logits, const topk& teacher, const distillation_options& opt,
                               const outputs& out_logits, const class_shard* shard) {
  constexpr std::string_view fn = "distillation_loss";
  // the class dimension moved to index 1 (options.dim)
  const class_first_views views = distillation_layout(fn, opt, student_logits, nullptr, out_logits);
  const array_view& student = views.student;
  const outputs& out = views.out;
  const row_space space = logits_space(fn, student);
  check_shard(fn, shard, space);
  check_distillation_options(fn, opt);
  if (opt.kind != divergence::kl)
    fail(fn, "teacher", "expected teacher logits for divergence '" + std::string(divergence_name(opt.kind)) +
                            "' (a top-k teacher supports 'kl' only)");
  check_outputs(fn, out, student, space.dims, space.ndim, opt.reduce);
  check_aliasing(fn, out, {{"teacher.indices", teacher.indices}, {"teacher.values", teacher.values}, {"mask", opt.mask}});
  check_grad_target(fn, out, nullptr, "teacher", "with a top-k teacher (no teacher logits)");
  return computes_in_double(student)
             ? topk_impl<double>(fn, student, teacher, opt.mask, opt.reduce, out, shard, opt.temperature, true)
             : topk_impl<float>(fn, student, teacher, opt.mask, opt.reduce, out, shard, opt.temperature, true);
}

}  // namespace

double cross_entropy(const array_view& input, const array_view& target, const cross_entropy_options& options,
                     const outputs& out) {
  return cross_entropy_entry(input, target, options, out, nullptr);
}

double cross_entropy(const array_view& input, const topk& target, const cross_entropy_options& options,
                     const outputs& out) {
  return cross_entropy_topk_entry(input, target, options, out, nullptr);
}

double cross_entropy_with_probs(const array_view& input, const array_view& target, std::optional<array_view> weight,
                                reduction reduce, const outputs& out) {
  check_reduction("cross_entropy_with_probs", reduce, {reduction::none, reduction::mean, reduction::sum});
  if (!is_float(target.type))
    fail("cross_entropy_with_probs", "target",
         "expected probabilities (float), got " + std::string(dtype_name(target.type)), error_kind::type);
  cross_entropy_options opt;
  opt.weight = weight;
  opt.reduce = reduce;
  return cross_entropy_entry(input, target, opt, out, nullptr, "cross_entropy_with_probs");
}

double distillation_loss(const array_view& student_logits, const array_view& teacher_logits,
                         const distillation_options& options, const outputs& out) {
  return distillation_entry(student_logits, teacher_logits, options, out, nullptr);
}

double distillation_loss(const array_view& student_logits, const topk& teacher, const distillation_options& options,
                         const outputs& out) {
  return distillation_topk_entry(student_logits, teacher, options, out, nullptr);
}

std::string simd_target() { return simd_target_name(); }

namespace class_parallel {
double cross_entropy(const class_shard& shard, const array_view& input, const array_view& target,
                     const cross_entropy_options& options, const outputs& out) {
  return cross_entropy_entry(input, target, options, out, &shard);
}
double cross_entropy(const class_shard& shard, const array_view& input, const topk& target,
                     const cross_entropy_options& options, const outputs& out) {
  return cross_entropy_topk_entry(input, target, options, out, &shard);
}
double distillation_loss(const class_shard& shard, const array_view& student_logits,
                         const array_view& teacher_logits, const distillation_options& options,
                         const outputs& out) {
  return distillation_entry(student_logits, teacher_logits, options, out, &shard);
}
double distillation_loss(const class_shard& shard, const array_view& student_logits, const topk& teacher,
                         const distillation_options& options, const outputs& out) {
  return distillation_topk_entry(student_logits, teacher, options, out, &shard);
}
}  // namespace class_parallel

}  // namespace softce
