// Fused output layer + loss (issue 11): linear_cross_entropy and linear_distillation_loss.
//
// The N x V logits never exist. Per block of B rows (and, when one row of V logits does not
// fit the memory budget, per block of Vc classes):
//
//   L (B, Vc)   = bias[c] + H_b (B, D) · W_cᵀ           GEMM 1 (BLAS)
//   loss_b, G   = fused loss over L, G written over L    softce::cross_entropy / distillation_loss
//   gH_b (B, D) (+)= coef · G · W_c                      GEMM 2
//   gW_c (Vc, D) += coef · Gᵀ · H_b                      GEMM 3
//   gb_c (Vc)   += coef · column sums of G
//
// The block losses are computed with reduction 'sum' (or 'none' for per-row losses), so they
// add up across blocks; the reduction's denominator (the summed class weight of the
// non-ignored index targets, the unmasked row count, ...) is global and is computed here
// once, up front, and `coef` = 1 / denominator goes in as the GEMMs' alpha (free).
//
// Class blocks: the loss over one row block is a class-parallel loss whose "shards" are the
// class blocks, run one after the other in this process. The shard all-reduce (a merge of
// row statistics through the monoid) cannot be answered before every class block has been
// seen, so it is done in passes: a discovery pass records the merged statistics of the
// all-reduce round it reaches (the gradient it writes is scratch), and the final pass
// replays the known rounds and keeps the results. One round (every loss but JSD, which has
// two) means two passes of GEMM 1; class blocks are the fallback for tiny budgets only.
//
// Every argument is validated before anything is written (targets and top-k indices
// included, with the same checks as the dense losses), so a block's loss call never throws.
#include <softce/class_parallel.hpp>
#include <softce/linear.hpp>
#include <softce/softce.hpp>

#include "blas.hpp"
#include "shard_records.hpp"
#include "staging.hpp"
#include "threading.hpp"
#include "validate.hpp"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace softce {
namespace {

using namespace detail;

constexpr std::int64_t kMinClassBlock = 16;  // the smallest class block the budget must hold
constexpr std::int64_t kMaxBlasInt = INT_MAX;

// ---------------------------------------------------------------------------------------
// BLAS

// Runs OpenBLAS on softce's thread count for the duration of a call, then restores it: the
// GEMMs and the fused loss run one after the other, each over all the threads, so neither
// oversubscribes the cores.
class blas_threads {
 public:
  explicit blas_threads(std::string_view function) : function_(function), previous_(blas::get_num_threads(function)) {
    const int want = get_num_threads();
    if (want != previous_) blas::set_num_threads(function_, want);
  }
  ~blas_threads() {
    if (blas::get_num_threads(function_) != previous_) blas::set_num_threads(function_, previous_);
  }
  blas_threads(const blas_threads&) = delete;
  blas_threads& operator=(const blas_threads&) = delete;

 private:
  std::string_view function_;
  int previous_;
};

// C (M, N) = alpha · op(A) (M, K) · op(B) (K, N) + beta · C, row-major. Sizes were checked
// to fit the BLAS's int. K = 0 (an empty product) scales C by beta.
template <class T>
void gemm(bool trans_a, bool trans_b, std::int64_t M, std::int64_t N, std::int64_t K, T alpha, const T* A,
          std::int64_t lda, const T* B, std::int64_t ldb, T beta, T* C, std::int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (std::int64_t i = 0; i < M; ++i)
      for (std::int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  const auto i = [](std::int64_t v) { return static_cast<int>(v); };
  if constexpr (std::is_same_v<T, float>)
    blas::sgemm("linear", trans_a, trans_b, i(M), i(N), i(K), alpha, A, i(lda), B, i(ldb), beta, C, i(ldc));
  else
    blas::dgemm("linear", trans_a, trans_b, i(M), i(N), i(K), alpha, A, i(lda), B, i(ldb), beta, C, i(ldc));
}

// ---------------------------------------------------------------------------------------
// layouts

// An array as (rows, inner): its row dimensions flattened into one stride, then at most one
// inner dimension (D, V or K).
struct flat {
  const char* base = nullptr;
  dtype type = dtype::float32;
  std::int64_t rows = 1, inner = 1, row_stride = 0, inner_stride = 0;

  std::size_t element() const { return dtype_size(type); }
  const char* at(std::int64_t r, std::int64_t c = 0) const {
    return base + (r * row_stride + c * inner_stride) * static_cast<std::int64_t>(element());
  }
  // rows [r0, r0 + count) as a 1-d view (per-row arrays)
  array_view rows_view(std::int64_t r0, std::int64_t count) const {
    array_view v;
    v.data = count > 0 ? at(r0) : base;
    v.type = type;
    v.ndim = 1;
    v.shape[0] = count;
    v.strides[0] = row_stride;
    return v;
  }
  // rows [r0, r0 + count) x inner [c0, c0 + width) as a 2-d view
  array_view block_view(std::int64_t r0, std::int64_t count, std::int64_t c0, std::int64_t width) const {
    array_view v;
    v.data = count > 0 && width > 0 ? at(r0, c0) : base;
    v.type = type;
    v.ndim = 2;
    v.shape[0] = count, v.shape[1] = width;
    v.strides[0] = row_stride, v.strides[1] = inner_stride;
    return v;
  }
};

mutable_array_view as_mutable(const array_view& v) {
  mutable_array_view m;
  m.data = const_cast<void*>(v.data);
  m.type = v.type;
  m.ndim = v.ndim;
  for (int i = 0; i < v.ndim; ++i) m.shape[i] = v.shape[i], m.strides[i] = v.strides[i];
  return m;
}

// Flattens dimensions [0, row_dims) of `v` (the row dimensions) into one stride; the
// dimension after them, if any, is the inner one.
flat flatten(std::string_view fn, std::string_view name, const array_view& v, int row_dims) {
  flat f;
  f.base = static_cast<const char*>(v.data);
  f.type = v.type;
  for (int i = 0; i < row_dims; ++i) f.rows *= v.shape[i];
  if (row_dims < v.ndim) f.inner = v.shape[row_dims], f.inner_stride = v.strides[row_dims];
  f.row_stride = f.inner;  // any value serves for a single row
  if (f.rows <= 1) return f;
  bool found = false;
  std::int64_t expected = 0;
  for (int i = row_dims - 1; i >= 0; --i) {
    if (v.shape[i] == 1) continue;
    if (!found) {
      f.row_stride = v.strides[i];
      found = true;
    } else if (v.strides[i] != expected) {
      fail(fn, name, "expected row dimensions that flatten to one stride (reshape or make it contiguous), got shape " +
                         shape_string(v) + " with strides " + shape_string(v.strides, v.ndim));
    }
    expected = v.strides[i] * v.shape[i];
  }
  return f;
}

// A GEMM operand (count, cols) in T: op element (i, k) at data[i * ld + k], or at
// data[k * ld + i] when `transposed`.
template <class T>
struct matrix_ref {
  const T* data = nullptr;
  std::int64_t ld = 1;
  bool transposed = false;
  // the operand from row `r` on
  const T* from(std::int64_t r) const { return transposed ? data + r : data + r * ld; }
};

// Rows [r0, r0 + count) of `f` (cols = f.inner) as a GEMM operand: the caller's memory when
// its dtype is T and one of its strides is 1, else converted into `staging`.
template <class T>
matrix_ref<T> rows_as_matrix(const flat& f, std::int64_t r0, std::int64_t count, std::vector<T>& staging) {
  const std::int64_t cols = f.inner;
  if (f.type == dtype_of<T>() && count > 0 && cols > 0) {
    const T* p = reinterpret_cast<const T*>(f.at(r0));
    if ((f.inner_stride == 1 || cols == 1) && (count == 1 || (f.row_stride >= cols && f.row_stride <= kMaxBlasInt)))
      return {p, count == 1 ? cols : f.row_stride, false};
    if ((f.row_stride == 1 || count == 1) && f.inner_stride >= count && f.inner_stride <= kMaxBlasInt)
      return {p, f.inner_stride, true};
  }
  staging.resize(static_cast<std::size_t>(count * cols));
  for (std::int64_t i = 0; i < count; ++i)
    gather<T>(f.base, f.type, (r0 + i) * f.row_stride, f.inner_stride, cols, staging.data() + i * cols);
  return {staging.data(), std::max<std::int64_t>(cols, 1), false};
}

template <class T>
bool needs_staging(const flat& f, std::int64_t count) {
  if (f.type != dtype_of<T>() || count <= 0 || f.inner <= 0) return true;
  if ((f.inner_stride == 1 || f.inner == 1) && (count == 1 || (f.row_stride >= f.inner && f.row_stride <= kMaxBlasInt)))
    return false;
  return !((f.row_stride == 1 || count == 1) && f.inner_stride >= count && f.inner_stride <= kMaxBlasInt);
}

// An output matrix written directly by a GEMM (dtype T, unit inner stride, rows apart).
template <class T>
bool writable_directly(const flat& f, std::int64_t count) {
  return f.type == dtype_of<T>() && count > 0 && f.inner > 0 && (f.inner_stride == 1 || f.inner == 1) &&
         (count == 1 || (f.row_stride >= f.inner && f.row_stride <= kMaxBlasInt));
}

// ---------------------------------------------------------------------------------------
// the call, validated

enum class loss_kind { ce_index, ce_probs, ce_topk, distill_logits, distill_topk, distill_hidden };

struct linear_call {
  std::string_view fn;
  loss_kind kind;
  std::int64_t N = 0, D = 0, V = 0;
  flat hidden, weight;               // (N, D), (V, D)
  std::optional<flat> bias;          // (V) as rows
  flat target;                       // index (N, 1), probabilities / teacher logits (N, V)
  flat topk_indices, topk_values;    // (N, K)
  bool tail = false;
  flat teacher_hidden, teacher_weight;  // (N, Dt), (V, Dt)
  std::optional<flat> teacher_bias;
  std::int64_t Dt = 0;
  std::optional<flat> mask;
  std::optional<array_view> class_weight;
  cross_entropy_options ce;          // reduce / mask / weight replaced per block
  distillation_options distill;
  reduction reduce = reduction::mean;
  double denominator = 1.0;
  // outputs
  std::optional<flat> losses, grad_hidden, grad_weight, grad_bias;
  bool accumulate = false;
  std::size_t budget = 0;
  // class-parallel (class_parallel::linear_*): this shard's rows [class_offset,
  // class_offset + V) of V_global; null in one process (then V_global = V)
  const class_shard* shard = nullptr;
  std::int64_t class_offset = 0, V_global = 0;
};

bool is_distillation(loss_kind k) {
  return k == loss_kind::distill_logits || k == loss_kind::distill_topk || k == loss_kind::distill_hidden;
}

std::string shape_with(const std::int64_t* dims, int ndim, std::int64_t last) {
  std::int64_t all[max_dims + 1];
  for (int i = 0; i < ndim; ++i) all[i] = dims[i];
  all[ndim] = last;
  return shape_string(all, ndim + 1);
}

// v has the hidden states' row shape, followed by `last` when last >= 0.
void check_rows_shape(std::string_view fn, std::string_view name, const array_view& v, const array_view& hidden,
                      std::int64_t last, std::string_view last_name) {
  const int row_dims = hidden.ndim - 1;
  bool ok = v.ndim == row_dims + (last >= 0 ? 1 : 0);
  for (int i = 0; ok && i < row_dims; ++i) ok = v.shape[i] == hidden.shape[i];
  if (ok && last >= 0) ok = v.shape[row_dims] == last;
  if (!ok) {
    const std::string expected = last >= 0 ? shape_with(hidden.shape, row_dims, last)
                                           : shape_string(hidden.shape, row_dims);
    fail(fn, name, "expected shape " + expected + " (the hidden states' rows" +
                       (last >= 0 ? ", then " + std::string(last_name) : std::string()) + "), got " + shape_string(v));
  }
}

void check_finite(std::string_view fn, std::string_view name, const flat& f) {
  std::vector<double> row(static_cast<std::size_t>(std::max<std::int64_t>(f.inner, 0)));
  for (std::int64_t r = 0; r < f.rows; ++r) {
    gather<double>(f.base, f.type, r * f.row_stride, f.inner_stride, f.inner, row.data());
    for (std::int64_t c = 0; c < f.inner; ++c)
      if (!std::isfinite(row[static_cast<std::size_t>(c)]))
        fail(fn, name, "expected finite values, got " + format_number(row[static_cast<std::size_t>(c)]) +
                           " at row " + std::to_string(r) + ", column " + std::to_string(c));
  }
}

// hidden (..., D), weight (V, D), bias (V): dtypes, shapes, extents. Returns (N, D) and (V, D).
void check_layer(linear_call& call, std::string_view hidden_name, const array_view& hidden, std::string_view weight_name,
                 const array_view& weight, std::string_view bias_name, const std::optional<array_view>& bias,
                 flat& hidden_flat, flat& weight_flat, std::optional<flat>& bias_flat, std::int64_t& D) {
  const std::string_view fn = call.fn;
  check_extent(fn, hidden_name, hidden);
  check_extent(fn, weight_name, weight);
  check_float(fn, hidden_name, hidden);
  check_float(fn, weight_name, weight);
  if (hidden.ndim < 1)
    fail(fn, hidden_name, "expected at least one dimension (..., D), got shape " + shape_string(hidden));
  D = hidden.shape[hidden.ndim - 1];
  if (weight.ndim != 2 || weight.shape[1] != D)
    fail(fn, weight_name, "expected shape (V, " + std::to_string(D) + ") (D = " + std::string(hidden_name) +
                              ".shape[-1]), got " + shape_string(weight));
  if (weight.type != hidden.type)
    fail(fn, weight_name, "expected the dtype of " + std::string(hidden_name) + " (" +
                              std::string(dtype_name(hidden.type)) + "), got " + std::string(dtype_name(weight.type)),
         error_kind::type);
  if (hidden_name == "hidden") call.V = weight.shape[0];
  if (weight.shape[0] != call.V)
    fail(fn, weight_name, "expected " + std::to_string(call.V) + " rows (classes, as the student's weight), got shape " +
                              shape_string(weight));
  if (bias) {
    check_extent(fn, bias_name, *bias);
    check_float(fn, bias_name, *bias);
    if (bias->ndim != 1 || bias->shape[0] != call.V)
      fail(fn, bias_name, "expected shape (" + std::to_string(call.V) + ") (one value per class), got " +
                              shape_string(*bias));
    if (bias->type != hidden.type)
      fail(fn, bias_name, "expected the dtype of " + std::string(hidden_name) + " (" +
                              std::string(dtype_name(hidden.type)) + "), got " + std::string(dtype_name(bias->type)),
           error_kind::type);
    bias_flat = flatten(fn, bias_name, *bias, 1);
  }
  if (D > kMaxBlasInt || call.V > kMaxBlasInt)
    fail(fn, weight_name, "expected at most " + std::to_string(kMaxBlasInt) + " rows and columns, got shape " +
                              shape_string(weight));
  hidden_flat = flatten(fn, hidden_name, hidden, hidden.ndim - 1);
  weight_flat = flatten(fn, weight_name, weight, 1);
}

// The outputs: shapes, dtypes, no overlap with any input or with each other.
void check_linear_outputs(const linear_call& call, const array_view& hidden, const linear_outputs& out,
                          std::initializer_list<named_array> inputs, linear_call& into) {
  const std::string_view fn = call.fn;
  struct named_output {
    std::string_view name;
    const std::optional<mutable_array_view>* view;
  };
  const named_output outs[] = {{"losses", &out.losses},
                               {"grad_hidden", &out.grad_hidden},
                               {"grad_weight", &out.grad_weight},
                               {"grad_bias", &out.grad_bias}};
  for (const auto& o : outs) {
    if (!*o.view) continue;
    const array_view v = **o.view;
    check_extent(fn, o.name, v);
    check_float(fn, o.name, v);
    if (overlaps_itself(v))
      fail(fn, o.name, "expected every element at its own address, got strides " + shape_string(v.strides, v.ndim));
  }
  if (out.losses) {
    if (call.reduce != reduction::none)
      fail(fn, "losses", "expected no losses output unless reduction is 'none', got reduction '" +
                             std::string(reduction_name(call.reduce)) + "'");
    check_rows_shape(fn, "losses", *out.losses, hidden, -1, "");
    into.losses = flatten(fn, "losses", *out.losses, hidden.ndim - 1);
  }
  if (out.grad_hidden) {
    check_same_shape(fn, "grad_hidden", *out.grad_hidden, hidden, "hidden");
    into.grad_hidden = flatten(fn, "grad_hidden", *out.grad_hidden, hidden.ndim - 1);
  }
  if (out.grad_weight) {
    const array_view g = *out.grad_weight;
    if (g.ndim != 2 || g.shape[0] != call.V || g.shape[1] != call.D)
      fail(fn, "grad_weight", "expected shape (" + std::to_string(call.V) + ", " + std::to_string(call.D) +
                                  ") (the weight's), got " + shape_string(g));
    into.grad_weight = flatten(fn, "grad_weight", g, 1);
  }
  if (out.grad_bias) {
    const array_view g = *out.grad_bias;
    if (g.ndim != 1 || g.shape[0] != call.V)
      fail(fn, "grad_bias", "expected shape (" + std::to_string(call.V) + ") (one value per class), got " +
                                shape_string(g));
    into.grad_bias = flatten(fn, "grad_bias", g, 1);
  }
  for (std::size_t i = 0; i < 4; ++i) {
    if (!*outs[i].view) continue;
    const array_view a = **outs[i].view;
    for (std::size_t j = i + 1; j < 4; ++j)
      if (*outs[j].view && overlap_of(a, **outs[j].view) != overlap::none)
        throw error(std::string(fn) + ": " + std::string(outs[i].name) + " overlaps " + std::string(outs[j].name) +
                    " (outputs may not overlap inputs or each other)");
    for (const named_array& in : inputs)
      if (in.view && overlap_of(a, *in.view) != overlap::none)
        throw error(std::string(fn) + ": " + std::string(outs[i].name) + " overlaps " + std::string(in.name) +
                    " (outputs may not overlap inputs or each other)");
  }
  into.accumulate = out.accumulate;
}

std::optional<array_view> maybe(const array_view* v) {
  return v ? std::optional<array_view>(*v) : std::nullopt;
}

void check_mask(linear_call& call, const std::optional<array_view>& mask, const array_view& hidden) {
  if (!mask) return;
  check_extent(call.fn, "mask", *mask);
  if (mask->type != dtype::boolean)
    fail(call.fn, "mask", "expected a bool array, got " + std::string(dtype_name(mask->type)), error_kind::type);
  check_rows_shape(call.fn, "mask", *mask, hidden, -1, "");
  call.mask = flatten(call.fn, "mask", *mask, hidden.ndim - 1);
}

std::int64_t kept_rows(const linear_call& call) {
  if (!call.mask) return call.N;
  std::int64_t kept = 0;
  for (std::int64_t r = 0; r < call.N; ++r) kept += *reinterpret_cast<const bool*>(call.mask->at(r)) ? 1 : 0;
  return kept;
}

void check_topk(linear_call& call, std::string_view name, const topk& t, const array_view& hidden) {
  const std::string_view fn = call.fn;
  const std::string indices_arg = std::string(name) + ".indices", values_arg = std::string(name) + ".values";
  check_extent(fn, indices_arg, t.indices);
  check_extent(fn, values_arg, t.values);
  if (!is_index(t.indices.type))
    fail(fn, indices_arg, "expected an int32 or int64 array, got " + std::string(dtype_name(t.indices.type)),
         error_kind::type);
  check_float(fn, values_arg, t.values);
  const int row_dims = hidden.ndim - 1;
  bool ok = t.indices.ndim == row_dims + 1;
  for (int i = 0; ok && i < row_dims; ++i) ok = t.indices.shape[i] == hidden.shape[i];
  if (!ok)
    fail(fn, indices_arg, "expected shape " + shape_string(hidden.shape, row_dims) +
                              " + (K,) (the hidden states' rows, then K), got " + shape_string(t.indices));
  check_same_shape(fn, values_arg, t.values, t.indices, "indices");
  call.topk_indices = flatten(fn, indices_arg, t.indices, row_dims);
  call.topk_values = flatten(fn, values_arg, t.values, row_dims);
  call.tail = t.tail;
  const flat& ix = call.topk_indices;
  std::vector<std::int64_t> row(static_cast<std::size_t>(ix.inner));
  for (std::int64_t r = 0; r < ix.rows; ++r) {
    for (std::int64_t j = 0; j < ix.inner; ++j) {
      const std::int64_t idx = load_index(ix.base, ix.type, r * ix.row_stride + j * ix.inner_stride);
      if (idx < 0 || idx >= call.V_global)
        fail(fn, indices_arg, "index " + std::to_string(idx) + " at row " + std::to_string(r) +
                                  " is out of range for " + std::to_string(call.V_global) + " classes",
             error_kind::index);
      row[static_cast<std::size_t>(j)] = idx;
    }
    std::sort(row.begin(), row.end());
    auto dup = std::adjacent_find(row.begin(), row.end());
    if (dup != row.end())
      fail(fn, indices_arg, "duplicate index " + std::to_string(*dup) + " in row " + std::to_string(r));
  }
}

// ---------------------------------------------------------------------------------------
// blocks

struct block_plan {
  std::int64_t rows = 1;     // B
  std::int64_t classes = 1;  // Vc
};

template <class T>
block_plan plan_blocks(const linear_call& call) {
  const std::int64_t logit_bytes = static_cast<std::int64_t>(sizeof(T)) * (call.kind == loss_kind::distill_hidden ? 2 : 1);
  // float staging per row: hidden (and teacher hidden) converted, grad_hidden before scatter
  std::int64_t staging = 0;
  const std::int64_t probe = std::max<std::int64_t>(call.N, 2);
  // Class-parallel: the plan must be the same on every shard (each block of rows is one
  // all-reduce), so it depends only on what the shards share: the global class count and
  // the staging as if every operand needed it (layouts may differ between shards).
  const bool shared_plan = call.shard != nullptr;
  const std::int64_t V = call.V_global;
  if (shared_plan || needs_staging<T>(call.hidden, probe)) staging += call.D;
  if (shared_plan ? call.grad_hidden.has_value() : call.grad_hidden && !writable_directly<T>(*call.grad_hidden, probe))
    staging += call.D;
  if (call.kind == loss_kind::distill_hidden && (shared_plan || needs_staging<T>(call.teacher_hidden, probe)))
    staging += call.Dt;
  staging *= static_cast<std::int64_t>(sizeof(T));
  const std::int64_t budget = static_cast<std::int64_t>(std::min<std::size_t>(call.budget, INT64_MAX / 4));
  const std::int64_t rows = std::max<std::int64_t>(call.N, 1);
  const double row_bytes = static_cast<double>(V) * static_cast<double>(logit_bytes) + static_cast<double>(staging);
  if (row_bytes <= static_cast<double>(budget))
    return {std::min<std::int64_t>(rows, static_cast<std::int64_t>(static_cast<double>(budget) / row_bytes)), V};
  const std::int64_t min_classes = std::min<std::int64_t>(V, kMinClassBlock);
  const std::int64_t wanted_classes = std::min<std::int64_t>(V, 256);
  for (std::int64_t B = std::min<std::int64_t>(rows, 64);; B = std::max<std::int64_t>(B / 2, 1)) {
    const std::int64_t left = budget - B * staging;
    const std::int64_t classes = left > 0 ? left / (B * logit_bytes) : 0;
    if (classes >= wanted_classes || (B == 1 && classes >= min_classes)) return {B, std::min(classes, V)};
    if (B == 1) break;
  }
  const std::int64_t need = min_classes * logit_bytes + staging;
  fail(call.fn, "memory_budget", "expected at least " + std::to_string(need) + " bytes (a block of one row and " +
                                     std::to_string(min_classes) + " classes), got " + std::to_string(call.budget));
}

// The loss over one block of logits (B, Vc) at rows r0, classes c0, gradient written in
// place; `shard` for class blocks. Reduction 'sum' ('none' when per-row losses are wanted).
template <class T>
double block_loss(const linear_call& call, const mutable_array_view& logits, const array_view* teacher_block,
                  std::int64_t r0, std::int64_t B, std::int64_t c0, std::int64_t Vc, const class_shard* shard,
                  bool final_pass) {
  outputs out;
  out.grad = logits;
  const bool per_row = call.reduce == reduction::none && call.losses && final_pass;
  if (per_row) out.losses = as_mutable(call.losses->rows_view(r0, B));
  const reduction reduce = per_row ? reduction::none : reduction::sum;
  std::optional<array_view> mask;
  if (call.mask) mask = call.mask->rows_view(r0, B);
  auto topk_of = [&] {
    return topk{call.topk_indices.block_view(r0, B, 0, call.topk_indices.inner),
                call.topk_values.block_view(r0, B, 0, call.topk_values.inner), call.tail};
  };
  if (!is_distillation(call.kind)) {
    cross_entropy_options opt = call.ce;
    opt.reduce = reduce;
    opt.mask = mask;
    if (call.class_weight) {
      array_view w = *call.class_weight;
      if (shard) {
        w.data = static_cast<const char*>(w.data) + c0 * w.strides[0] * static_cast<std::int64_t>(dtype_size(w.type));
        w.shape[0] = Vc;
      }
      opt.weight = w;
    }
    if (call.kind == loss_kind::ce_topk) {
      const topk t = topk_of();
      return shard ? class_parallel::cross_entropy(*shard, logits, t, opt, out) : cross_entropy(logits, t, opt, out);
    }
    const array_view target = call.kind == loss_kind::ce_index ? call.target.rows_view(r0, B)
                                                               : call.target.block_view(r0, B, c0, Vc);
    return shard ? class_parallel::cross_entropy(*shard, logits, target, opt, out)
                 : cross_entropy(logits, target, opt, out);
  }
  distillation_options opt = call.distill;
  opt.reduce = reduce;
  opt.mask = mask;
  opt.dim = std::nullopt;
  if (call.kind == loss_kind::distill_topk) {
    const topk t = topk_of();
    return shard ? class_parallel::distillation_loss(*shard, logits, t, opt, out)
                 : distillation_loss(logits, t, opt, out);
  }
  const array_view teacher = call.kind == loss_kind::distill_logits ? call.target.block_view(r0, B, c0, Vc)
                                                                    : *teacher_block;
  return shard ? class_parallel::distillation_loss(*shard, logits, teacher, opt, out)
               : distillation_loss(logits, teacher, opt, out);
}

// The all-reduce merge of plain sums (records of width 1): inout += in, so that the ordered
// all-reduce adds the shards' values in shard order (the commutative form knows it as sums).
constexpr row_stats_merge_fn sum_records = &merge_sums;

// Class-parallel grad_hidden: this shard's partial G · W (in the output, or in `partial`
// when the output cannot hold T) becomes the sum over the shards, formed in double in shard
// order and rounded once into the output. Pieces of rows of at most the memory budget (the
// same on every shard: N, D and the budget are agreed), each one all-reduce.
template <class T>
void sum_grad_hidden(const linear_call& call, const std::vector<T>& partial) {
  const std::int64_t N = call.N, D = call.D;
  if (N == 0 || D == 0) return;
  const flat& g = *call.grad_hidden;
  const std::int64_t bytes_per_row = D * static_cast<std::int64_t>(sizeof(double));
  const std::int64_t piece = std::clamp<std::int64_t>(
      static_cast<std::int64_t>(std::min<std::size_t>(call.budget, INT64_MAX / 4)) / bytes_per_row, 1, N);
  std::vector<double> sums(static_cast<std::size_t>(piece * D));
  for (std::int64_t r0 = 0; r0 < N; r0 += piece) {
    const std::int64_t rows = std::min(piece, N - r0);
    for (std::int64_t i = 0; i < rows; ++i) {
      double* row = sums.data() + i * D;
      if (!partial.empty())
        for (std::int64_t d = 0; d < D; ++d) row[d] = static_cast<double>(partial[static_cast<std::size_t>((r0 + i) * D + d)]);
      else
        gather<double>(g.base, g.type, (r0 + i) * g.row_stride, g.inner_stride, D, row);
    }
    call.shard->all_reduce(sums.data(), rows * D, 1, sum_records);
    for (std::int64_t i = 0; i < rows; ++i)
      scatter<double>(sums.data() + i * D, D, const_cast<char*>(g.base), g.type, (r0 + i) * g.row_stride,
                      g.inner_stride);
  }
}

template <class T>
double run(const linear_call& call) {
  const block_plan plan = plan_blocks<T>(call);
  blas_threads threads_guard(call.fn);
  const std::int64_t N = call.N, D = call.D, V = call.V;
  const std::int64_t B = plan.rows, Vc = plan.classes;
  // (an empty shard still runs one block of zero classes: its all-reduce calls are the others')
  const std::int64_t class_blocks = V == 0 ? 1 : (V + Vc - 1) / Vc;
  const bool class_path = class_blocks > 1;
  const T coef = call.denominator == 0.0 ? T(0) : static_cast<T>(1.0 / call.denominator);

  // the weights, whole: the caller's memory or one converted copy
  std::vector<T> weight_staging, teacher_weight_staging;
  // (nothing to convert when there are no rows)
  const matrix_ref<T> W = N > 0 ? rows_as_matrix<T>(call.weight, 0, V, weight_staging) : matrix_ref<T>{};
  matrix_ref<T> TW;
  if (call.kind == loss_kind::distill_hidden && N > 0)
    TW = rows_as_matrix<T>(call.teacher_weight, 0, V, teacher_weight_staging);
  std::vector<T> bias, teacher_bias;
  if (call.bias) {
    bias.resize(static_cast<std::size_t>(V));
    gather<T>(call.bias->base, call.bias->type, 0, call.bias->row_stride, V, bias.data());
  }
  if (call.teacher_bias) {
    teacher_bias.resize(static_cast<std::size_t>(V));
    gather<T>(call.teacher_bias->base, call.teacher_bias->type, 0, call.teacher_bias->row_stride, V,
              teacher_bias.data());
  }

  // grad_weight: written directly, or summed in T and stored at the end
  T* gw = nullptr;
  std::int64_t ldgw = D;
  std::vector<T> gw_staging;
  bool gw_started = call.accumulate;
  if (call.grad_weight) {
    if (writable_directly<T>(*call.grad_weight, V)) {
      gw = reinterpret_cast<T*>(const_cast<char*>(call.grad_weight->base));
      ldgw = V == 1 ? std::max<std::int64_t>(D, 1) : call.grad_weight->row_stride;
    } else {
      gw_staging.assign(static_cast<std::size_t>(V * D), T(0));
      if (call.accumulate)
        for (std::int64_t v = 0; v < V; ++v)
          gather<T>(call.grad_weight->base, call.grad_weight->type, v * call.grad_weight->row_stride,
                    call.grad_weight->inner_stride, D, gw_staging.data() + v * D);
      gw = gw_staging.data();
      ldgw = std::max<std::int64_t>(D, 1);
      gw_started = true;
    }
    if (!gw_started && N == 0)  // overwrite with zeros when there is no block to do it
      for (std::int64_t v = 0; v < V; ++v)
        for (std::int64_t d = 0; d < D; ++d) gw[v * ldgw + d] = T(0);
  }
  std::vector<double> gb;
  if (call.grad_bias) gb.assign(static_cast<std::size_t>(V), 0.0);

  std::vector<T> logits(static_cast<std::size_t>(B * std::min(Vc, std::max<std::int64_t>(V, 1)))), teacher_logits;
  if (call.kind == loss_kind::distill_hidden) teacher_logits.resize(logits.size());
  std::vector<T> hidden_staging, teacher_hidden_staging, grad_hidden_staging;
  // Class-parallel: this shard's partial grad_hidden is summed over the shards at the end;
  // when the output cannot hold it in T (a 16-bit or strided output), it is kept here whole.
  std::vector<T> grad_hidden_partial;
  if (call.shard && call.grad_hidden && !writable_directly<T>(*call.grad_hidden, N))
    grad_hidden_partial.resize(static_cast<std::size_t>(N * D));
  const int rounds = call.kind != loss_kind::ce_index && call.kind != loss_kind::ce_probs && call.kind != loss_kind::ce_topk &&
                             call.distill.kind == divergence::jsd && call.kind != loss_kind::distill_topk
                         ? 2 : 1;
  double total = 0.0;

  for (std::int64_t r0 = 0; r0 < N; r0 += B) {
    const std::int64_t rows = std::min(B, N - r0);
    const matrix_ref<T> H = rows_as_matrix<T>(call.hidden, r0, rows, hidden_staging);
    matrix_ref<T> TH;
    if (call.kind == loss_kind::distill_hidden) TH = rows_as_matrix<T>(call.teacher_hidden, r0, rows, teacher_hidden_staging);
    // grad_hidden rows: written directly or staged
    T* gh = nullptr;
    std::int64_t ldgh = D;
    const bool gh_partial = !grad_hidden_partial.empty();
    const bool gh_direct = call.grad_hidden && !gh_partial && writable_directly<T>(*call.grad_hidden, rows);
    if (call.grad_hidden) {
      if (gh_partial) {
        gh = grad_hidden_partial.data() + r0 * D;
        ldgh = std::max<std::int64_t>(D, 1);
      } else if (gh_direct) {
        gh = reinterpret_cast<T*>(const_cast<char*>(call.grad_hidden->at(r0)));
        ldgh = rows == 1 ? std::max<std::int64_t>(D, 1) : call.grad_hidden->row_stride;
      } else {
        grad_hidden_staging.resize(static_cast<std::size_t>(rows * D));
        gh = grad_hidden_staging.data();
        ldgh = std::max<std::int64_t>(D, 1);
      }
    }

    // the logits of classes [c0, c0 + width): bias, then + H · W_cᵀ
    auto compute_logits = [&](std::int64_t c0, std::int64_t width) {
      auto one = [&](const matrix_ref<T>& h, const matrix_ref<T>& w, const std::vector<T>& b, std::int64_t k, T* out) {
        if (!b.empty())
          for (std::int64_t i = 0; i < rows; ++i) std::memcpy(out + i * width, b.data() + c0, sizeof(T) * width);
        gemm<T>(h.transposed, !w.transposed, rows, width, k, T(1), h.data, h.ld, w.from(c0), w.ld,
                b.empty() ? T(0) : T(1), out, width);
      };
      one(H, W, bias, D, logits.data());
      if (call.kind == loss_kind::distill_hidden) one(TH, TW, teacher_bias, call.Dt, teacher_logits.data());
    };
    auto block_views = [&](std::int64_t width, mutable_array_view& lv, array_view& tv) {
      lv = view(logits.data(), {rows, width});
      if (call.kind == loss_kind::distill_hidden) tv = view(static_cast<const T*>(teacher_logits.data()), {rows, width});
    };
    // the gradient GEMMs of one block whose gradient G sits in `logits`
    auto backward = [&](std::int64_t c0, std::int64_t width, bool first_class_block) {
      const T* G = logits.data();
      if (call.grad_bias)
        for (std::int64_t i = 0; i < rows; ++i)
          for (std::int64_t c = 0; c < width; ++c)
            gb[static_cast<std::size_t>(c0 + c)] += static_cast<double>(G[i * width + c]);
      if (gh)
        gemm<T>(false, W.transposed, rows, D, width, coef, G, width, W.from(c0), W.ld,
                first_class_block ? T(0) : T(1), gh, ldgh);
      if (gw) gemm<T>(true, H.transposed, width, D, rows, coef, G, width, H.data, H.ld,
                      gw_started ? T(1) : T(0), gw + c0 * ldgw, ldgw);
    };

    if (!class_path) {
      compute_logits(0, V);
      mutable_array_view lv;
      array_view tv;
      block_views(V, lv, tv);
      total += block_loss<T>(call, lv, &tv, r0, rows, 0, V, call.shard, true);
      backward(0, V, true);
    } else {
      std::vector<std::vector<double>> known;  // merged statistics of each all-reduce round
      for (int pass = 0; pass <= rounds; ++pass) {
        const bool final_pass = pass == rounds;
        std::vector<double> merged;
        double value = 0.0;
        std::int64_t merged_count = 0;
        int merged_width = 0;
        row_stats_merge_fn merged_fn = nullptr;
        for (std::int64_t b = 0; b < class_blocks; ++b) {
          const std::int64_t c0 = b * Vc, width = std::min(Vc, V - c0);
          int round = 0;
          class_shard shard;
          shard.class_offset = call.class_offset + c0;
          shard.num_classes = call.V_global;
          shard.all_reduce = [&](double* stats, std::int64_t count, int width_records, row_stats_merge_fn merge) {
            const std::size_t n = static_cast<std::size_t>(count) * static_cast<std::size_t>(width_records);
            const std::size_t r = static_cast<std::size_t>(round++);
            if (r < known.size()) {
              std::memcpy(stats, known[r].data(), n * sizeof(double));
            } else if (r == known.size()) {
              if (b == 0) merged.assign(stats, stats + n);
              else merge(merged.data(), stats, count);
              merged_count = count, merged_width = width_records, merged_fn = merge;
            }
          };
          compute_logits(c0, width);
          mutable_array_view lv;
          array_view tv;
          block_views(width, lv, tv);
          value = block_loss<T>(call, lv, &tv, r0, rows, c0, width, &shard, final_pass);
          if (final_pass) backward(c0, width, b == 0);
        }
        if (final_pass) {
          total += value;
        } else {
          // this shard's class blocks merged: now the other shards' (class order is kept:
          // the blocks are in order within the shard, the shards in rank order)
          if (call.shard) call.shard->all_reduce(merged.data(), merged_count, merged_width, merged_fn);
          known.push_back(std::move(merged));
        }
      }
    }
    if (gw) gw_started = true;
    if (call.grad_hidden && !gh_direct && !gh_partial)
      for (std::int64_t i = 0; i < rows; ++i)
        scatter<T>(grad_hidden_staging.data() + i * D, D, const_cast<char*>(call.grad_hidden->base),
                   call.grad_hidden->type, (r0 + i) * call.grad_hidden->row_stride, call.grad_hidden->inner_stride);
  }

  if (call.grad_weight && !gw_staging.empty())
    for (std::int64_t v = 0; v < V; ++v)
      scatter<T>(gw_staging.data() + v * D, D, const_cast<char*>(call.grad_weight->base), call.grad_weight->type,
                 v * call.grad_weight->row_stride, call.grad_weight->inner_stride);
  if (call.grad_bias) {
    const flat& g = *call.grad_bias;
    for (std::int64_t v = 0; v < V; ++v) {
      double value = gb[static_cast<std::size_t>(v)] * static_cast<double>(coef);
      if (call.accumulate) value += load_float<double>(g.base, g.type, v * g.row_stride);
      store_float<double>(const_cast<char*>(g.base), g.type, v * g.row_stride, value);
    }
  }
  if (call.shard && call.grad_hidden) sum_grad_hidden<T>(call, grad_hidden_partial);
  if (call.reduce == reduction::mean || call.reduce == reduction::batchmean)
    return call.denominator == 0.0 ? std::numeric_limits<double>::quiet_NaN() : total / call.denominator;
  return total;
}

double dispatch(const linear_call& call) {
  return call.hidden.type == dtype::float64 ? run<double>(call) : run<float>(call);
}

// The parts every entry point shares: the layer, the budget, the finite check last (it
// reads every hidden state).
void begin(linear_call& call, const array_view& hidden, const array_view& weight, const std::optional<array_view>& bias,
           const linear_options& linear, const class_shard* shard) {
  check_layer(call, "hidden", hidden, "weight", weight, "bias", bias, call.hidden, call.weight, call.bias, call.D);
  call.N = call.hidden.rows;
  call.V_global = call.V;
  if (shard) {
    // this shard's rows of the weight: [class_offset, class_offset + V) of num_classes
    if (!shard->all_reduce) throw error(std::string(call.fn) + ": shard: expected an all_reduce function");
    if (shard->num_classes < 1 || shard->class_offset < 0 || shard->class_offset > shard->num_classes - call.V)
      fail(call.fn, "shard", "expected 0 <= class_offset and class_offset + weight.shape[0] <= num_classes >= 1, got "
                             "class_offset " + std::to_string(shard->class_offset) + ", " + std::to_string(call.V) +
                             " rows, num_classes " + std::to_string(shard->num_classes));
    call.shard = shard;
    call.class_offset = shard->class_offset;
    call.V_global = shard->num_classes;
  } else if (call.V == 0) {
    fail(call.fn, "weight", "expected at least one class (row), got shape " + shape_string(weight));
  }
  call.budget = linear.memory_budget;
}

void finish_validation(linear_call& call) {
  // the budget (throws when too small), then the hidden states' values
  if (call.hidden.type == dtype::float64) plan_blocks<double>(call);
  else plan_blocks<float>(call);
  check_finite(call.fn, "hidden", call.hidden);
}

double ce_entry(const array_view& hidden, const array_view& weight, const std::optional<array_view>& bias,
                const array_view* dense_target, const topk* sparse_target, const cross_entropy_options& options,
                const linear_options& linear, const linear_outputs& out, const class_shard* shard = nullptr) {
  linear_call call;
  call.fn = "linear_cross_entropy";
  const std::string_view fn = call.fn;
  begin(call, hidden, weight, bias, linear, shard);
  check_reduction(fn, options.reduce, {reduction::none, reduction::mean, reduction::sum});
  call.reduce = options.reduce;
  call.ce = options;
  if (!(options.label_smoothing >= 0.0 && options.label_smoothing <= 1.0))
    fail(fn, "label_smoothing", "expected a value in [0, 1], got " + format_number(options.label_smoothing));
  if (options.weight) {
    check_extent(fn, "weight", *options.weight);
    check_class_vector(fn, "class_weight", *options.weight, call.V);
    call.class_weight = options.weight;
  }
  check_mask(call, options.mask, hidden);
  if (dense_target) {
    const array_view& target = *dense_target;
    check_extent(fn, "target", target);
    if (is_index(target.type)) {
      call.kind = loss_kind::ce_index;
      check_rows_shape(fn, "target", target, hidden, -1, "");
      if (options.mask) fail(fn, "mask", "expected no mask with class-index targets (use ignore_index)");
      call.target = flatten(fn, "target", target, hidden.ndim - 1);
    } else if (is_float(target.type)) {
      call.kind = loss_kind::ce_probs;
      check_rows_shape(fn, "target", target, hidden, call.V, "V");
      if (options.ignore_index >= 0)
        fail(fn, "ignore_index", "expected no ignore_index with probability targets (use mask), got " +
                                     std::to_string(options.ignore_index));
      call.target = flatten(fn, "target", target, hidden.ndim - 1);
    } else {
      fail(fn, "target", "expected class indices (int32/int64) or probabilities (float), got " +
                             std::string(dtype_name(target.type)), error_kind::type);
    }
  } else {
    call.kind = loss_kind::ce_topk;
    if (sparse_target->tail && (options.weight || options.label_smoothing != 0.0))
      fail(fn, "target.tail", "expected no class weight and no label smoothing with a tail bucket");
    check_topk(call, "target", *sparse_target, hidden);
  }
  const linear_call& c = call;
  check_linear_outputs(c, hidden, out,
                       {{"hidden", hidden}, {"weight", weight}, {"bias", bias},
                        {"target", maybe(dense_target)},
                        {"target.indices", maybe(sparse_target ? &sparse_target->indices : nullptr)},
                        {"target.values", maybe(sparse_target ? &sparse_target->values : nullptr)},
                        {"class_weight", options.weight}, {"mask", options.mask}},
                       call);
  // mean's denominator; index targets: range check and the summed weight of the kept targets
  if (call.kind == loss_kind::ce_index) {
    std::vector<float> w;
    std::vector<double> wd;
    const bool in_double = hidden.type == dtype::float64;
    if (options.weight) {
      const flat wf = flatten(fn, "class_weight", *options.weight, 1);
      wd.resize(static_cast<std::size_t>(call.V));
      gather<double>(wf.base, wf.type, 0, wf.row_stride, call.V, wd.data());
      if (!in_double)  // the kernels use the weights in float, so does the denominator
        for (double& x : wd) x = static_cast<double>(static_cast<float>(x));
    }
    double weight_total = 0.0;
    for (std::int64_t r = 0; r < call.N; ++r) {
      const std::int64_t y = load_index(call.target.base, call.target.type, r * call.target.row_stride);
      if (y == options.ignore_index) continue;
      if (y < 0 || y >= call.V_global)
        fail(fn, "target", "class index " + std::to_string(y) + " at row " + std::to_string(r) +
                               " is out of range for " + std::to_string(call.V_global) + " classes",
             error_kind::index);
      // (class-parallel: the weights of this shard's classes; the shards' sums are added below)
      const std::int64_t local = y - call.class_offset;
      if (!options.weight) weight_total += 1.0;
      else if (local >= 0 && local < call.V) weight_total += wd[static_cast<std::size_t>(local)];
    }
    if (call.reduce == reduction::mean) call.denominator = weight_total;
  } else if (call.reduce == reduction::mean) {
    call.denominator = static_cast<double>(kept_rows(call));
  }
  finish_validation(call);
  if (linear.validate_only) return std::numeric_limits<double>::quiet_NaN();
  if (call.shard && call.kind == loss_kind::ce_index && call.reduce == reduction::mean && options.weight)
    call.shard->all_reduce(&call.denominator, 1, 1, sum_records);  // every check is behind us
  return dispatch(call);
}

double distill_entry(const array_view& hidden, const array_view& weight, const std::optional<array_view>& bias,
                     const array_view* teacher_logits, const topk* teacher_topk, const linear_teacher* teacher_layer,
                     const distillation_options& options, const linear_options& linear, const linear_outputs& out,
                     const class_shard* shard = nullptr) {
  linear_call call;
  call.fn = "linear_distillation_loss";
  const std::string_view fn = call.fn;
  begin(call, hidden, weight, bias, linear, shard);
  check_reduction(fn, options.reduce, {reduction::none, reduction::mean, reduction::sum, reduction::batchmean});
  call.reduce = options.reduce;
  call.distill = options;
  if (options.dim && *options.dim != -1 && *options.dim != hidden.ndim - 1)
    fail(fn, "dim", "expected the class dimension last (dim = -1 or unset), got " + std::to_string(*options.dim));
  if (!(options.temperature > 0.0) || !std::isfinite(options.temperature) ||
      !std::isfinite(static_cast<float>(1.0 / options.temperature)))
    fail(fn, "temperature", "expected a finite value > 0 whose reciprocal is finite in float32, got " +
                                format_number(options.temperature));
  if (!(options.beta >= 0.0 && options.beta <= 1.0))
    fail(fn, "beta", "expected a value in [0, 1], got " + format_number(options.beta));
  if (options.kind != divergence::kl && options.kind != divergence::reverse_kl && options.kind != divergence::jsd)
    fail(fn, "divergence", "expected 'kl', 'reverse_kl' or 'jsd', got invalid value " +
                               std::to_string(static_cast<int>(options.kind)));
  check_mask(call, options.mask, hidden);
  if (teacher_logits) {
    call.kind = loss_kind::distill_logits;
    check_extent(fn, "teacher", *teacher_logits);
    check_float(fn, "teacher", *teacher_logits);
    check_rows_shape(fn, "teacher", *teacher_logits, hidden, call.V, "V");
    call.target = flatten(fn, "teacher", *teacher_logits, hidden.ndim - 1);
  } else if (teacher_topk) {
    call.kind = loss_kind::distill_topk;
    if (options.kind != divergence::kl)
      fail(fn, "teacher", "expected teacher logits or hidden states for divergence '" +
                              std::string(divergence_name(options.kind)) + "' (a top-k teacher supports 'kl' only)");
    check_topk(call, "teacher", *teacher_topk, hidden);
  } else {
    call.kind = loss_kind::distill_hidden;
    std::optional<flat> tb;
    check_layer(call, "teacher.hidden", teacher_layer->hidden, "teacher.weight", teacher_layer->weight, "teacher.bias",
                teacher_layer->bias, call.teacher_hidden, call.teacher_weight, tb, call.Dt);
    call.teacher_bias = tb;
    check_rows_shape(fn, "teacher.hidden", teacher_layer->hidden, hidden, call.Dt, "Dt");
  }
  check_linear_outputs(call, hidden, out,
                       {{"hidden", hidden}, {"weight", weight}, {"bias", bias},
                        {"teacher", maybe(teacher_logits)},
                        {"teacher.indices", maybe(teacher_topk ? &teacher_topk->indices : nullptr)},
                        {"teacher.values", maybe(teacher_topk ? &teacher_topk->values : nullptr)},
                        {"teacher.hidden", maybe(teacher_layer ? &teacher_layer->hidden : nullptr)},
                        {"teacher.weight", maybe(teacher_layer ? &teacher_layer->weight : nullptr)},
                        {"teacher.bias", teacher_layer ? teacher_layer->bias : std::nullopt},
                        {"mask", options.mask}},
                       call);
  if (call.reduce == reduction::batchmean) call.denominator = static_cast<double>(kept_rows(call));
  if (call.reduce == reduction::mean)
    call.denominator = static_cast<double>(kept_rows(call)) * static_cast<double>(call.V_global);
  finish_validation(call);
  if (linear.validate_only) return std::numeric_limits<double>::quiet_NaN();
  return dispatch(call);
}

}  // namespace

double linear_cross_entropy(const array_view& hidden, const array_view& weight, const std::optional<array_view>& bias,
                            const array_view& target, const cross_entropy_options& options,
                            const linear_options& linear, const linear_outputs& out) {
  return ce_entry(hidden, weight, bias, &target, nullptr, options, linear, out);
}

double linear_cross_entropy(const array_view& hidden, const array_view& weight, const std::optional<array_view>& bias,
                            const topk& target, const cross_entropy_options& options, const linear_options& linear,
                            const linear_outputs& out) {
  return ce_entry(hidden, weight, bias, nullptr, &target, options, linear, out);
}

double linear_distillation_loss(const array_view& hidden, const array_view& weight,
                                const std::optional<array_view>& bias, const array_view& teacher_logits,
                                const distillation_options& options, const linear_options& linear,
                                const linear_outputs& out) {
  return distill_entry(hidden, weight, bias, &teacher_logits, nullptr, nullptr, options, linear, out);
}

double linear_distillation_loss(const array_view& hidden, const array_view& weight,
                                const std::optional<array_view>& bias, const topk& teacher,
                                const distillation_options& options, const linear_options& linear,
                                const linear_outputs& out) {
  return distill_entry(hidden, weight, bias, nullptr, &teacher, nullptr, options, linear, out);
}

double linear_distillation_loss(const array_view& hidden, const array_view& weight,
                                const std::optional<array_view>& bias, const linear_teacher& teacher,
                                const distillation_options& options, const linear_options& linear,
                                const linear_outputs& out) {
  return distill_entry(hidden, weight, bias, nullptr, nullptr, &teacher, options, linear, out);
}

namespace class_parallel {

double linear_cross_entropy(const class_shard& shard, const array_view& hidden, const array_view& weight,
                            const std::optional<array_view>& bias, const array_view& target,
                            const cross_entropy_options& options, const linear_options& linear,
                            const linear_outputs& out) {
  return ce_entry(hidden, weight, bias, &target, nullptr, options, linear, out, &shard);
}

double linear_cross_entropy(const class_shard& shard, const array_view& hidden, const array_view& weight,
                            const std::optional<array_view>& bias, const topk& target,
                            const cross_entropy_options& options, const linear_options& linear,
                            const linear_outputs& out) {
  return ce_entry(hidden, weight, bias, nullptr, &target, options, linear, out, &shard);
}

double linear_distillation_loss(const class_shard& shard, const array_view& hidden, const array_view& weight,
                                const std::optional<array_view>& bias, const array_view& teacher_logits,
                                const distillation_options& options, const linear_options& linear,
                                const linear_outputs& out) {
  return distill_entry(hidden, weight, bias, &teacher_logits, nullptr, nullptr, options, linear, out, &shard);
}

double linear_distillation_loss(const class_shard& shard, const array_view& hidden, const array_view& weight,
                                const std::optional<array_view>& bias, const topk& teacher,
                                const distillation_options& options, const linear_options& linear,
                                const linear_outputs& out) {
  return distill_entry(hidden, weight, bias, nullptr, &teacher, nullptr, options, linear, out, &shard);
}

double linear_distillation_loss(const class_shard& shard, const array_view& hidden, const array_view& weight,
                                const std::optional<array_view>& bias, const linear_teacher& teacher,
                                const distillation_options& options, const linear_options& linear,
                                const linear_outputs& out) {
  return distill_entry(hidden, weight, bias, nullptr, nullptr, &teacher, options, linear, out, &shard);
}

}  // namespace class_parallel

}  // namespace softce
