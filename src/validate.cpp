// Argument checks shared by every loss (see validate.hpp).
#include "validate.hpp"

#include <algorithm>
#include <charconv>
#include <cstdlib>

namespace softce::detail {

std::string shape_string(const std::int64_t* shape, int ndim) {
  std::string s = "(";
  for (int i = 0; i < ndim; ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + ")";
}

void fail(std::string_view function, std::string_view argument, const std::string& what,
          error_kind kind) {
  std::string message(function);
  message += ": ";
  if (!argument.empty()) {
    message += argument;
    message += ": ";
  }
  throw error(message + what, kind);
}

std::string format_number(double value) {
  char buffer[64];
  const auto result = std::to_chars(buffer, buffer + sizeof buffer, value);
  return std::string(buffer, result.ptr);
}

bool is_float(dtype t) noexcept {
  return t == dtype::float32 || t == dtype::float64 || t == dtype::bfloat16 || t == dtype::float16;
}
bool is_index(dtype t) noexcept { return t == dtype::int32 || t == dtype::int64; }

namespace {
bool valid_dtype(dtype t) noexcept { return dtype_size(t) != 0; }
bool valid_reduction(reduction r) noexcept {
  return r == reduction::none || r == reduction::mean || r == reduction::sum || r == reduction::batchmean;
}
bool valid_divergence(divergence d) noexcept {
  return d == divergence::kl || d == divergence::reverse_kl || d == divergence::jsd;
}
}  // namespace

void check_extent(std::string_view function, std::string_view argument, const array_view& v) {
  if (v.ndim < 0 || v.ndim > max_dims)
    fail(function, argument, "expected at most " + std::to_string(max_dims) + " dimensions, got " +
                                 std::to_string(v.ndim));
  if (!valid_dtype(v.type))
    fail(function, argument, "expected a valid dtype, got dtype value " + std::to_string(static_cast<int>(v.type)),
         error_kind::type);
  std::int64_t numel = 1;
  bool empty = false;
  for (int i = 0; i < v.ndim; ++i) {
    if (v.shape[i] < 0)
      fail(function, argument, "expected non-negative sizes, got shape " + shape_string(v));
    empty = empty || v.shape[i] == 0;
  }
  for (int i = 0; i < v.ndim; ++i)
    if (__builtin_mul_overflow(numel, v.shape[i], &numel))
      fail(function, argument, "size of shape " + shape_string(v) + " overflows 64-bit indexing");
  if (empty) return;
  // the lowest and highest element offsets, then the bytes they span
  const std::int64_t size = static_cast<std::int64_t>(dtype_size(v.type));
  std::int64_t below = 0, above = 0, bytes_below = 0, bytes_above = 0, total = 0;
  for (int i = 0; i < v.ndim; ++i) {
    const std::int64_t stride = v.strides[i];
    std::int64_t span;
    bool overflow = stride == INT64_MIN && v.shape[i] > 1;
    if (!overflow && v.shape[i] > 1) {
      overflow = __builtin_mul_overflow(v.shape[i] - 1, stride < 0 ? -stride : stride, &span) ||
                 __builtin_add_overflow(stride < 0 ? below : above, span, stride < 0 ? &below : &above);
    }
    if (overflow)
      fail(function, argument, "strides of shape " + shape_string(v) +
                                   " overflow 64-bit indexing");
  }
  if (__builtin_mul_overflow(below, size, &bytes_below) || __builtin_mul_overflow(above, size, &bytes_above) ||
      __builtin_add_overflow(bytes_above, size, &bytes_above) || __builtin_add_overflow(bytes_below, bytes_above, &total))
    fail(function, argument, "strides of shape " + shape_string(v) +
                                 " overflow 64-bit indexing");
  if (v.data == nullptr) fail(function, argument, "expected data, got a null pointer");
  // the addresses touched, data - bytes_below .. data + bytes_above, must not wrap around
  const auto address = reinterpret_cast<std::uintptr_t>(v.data);
  std::uintptr_t unused;
  if (__builtin_sub_overflow(address, static_cast<std::uintptr_t>(bytes_below), &unused) ||
      __builtin_add_overflow(address, static_cast<std::uintptr_t>(bytes_above), &unused))
    fail(function, argument, "strides of shape " + shape_string(v) +
                                 " reach outside the address space from the data pointer");
}

void check_float(std::string_view function, std::string_view argument, const array_view& v) {
  check_extent(function, argument, v);
  if (!is_float(v.type))
    fail(function, argument,
         "expected a float32, float64, bfloat16 or float16 array, got " + std::string(dtype_name(v.type)),
         error_kind::type);
}

void check_same_shape(std::string_view function, std::string_view argument, const array_view& v,
                      const array_view& reference, std::string_view reference_name) {
  bool same = v.ndim == reference.ndim;
  for (int i = 0; same && i < v.ndim; ++i) same = v.shape[i] == reference.shape[i];
  if (!same)
    fail(function, argument, "expected shape " + shape_string(reference) + " (the " + std::string(reference_name) +
                                 (reference_name.ends_with('s') ? "'" : "'s") + "), got " + shape_string(v));
}

void check_reduction(std::string_view function, reduction r, std::initializer_list<reduction> allowed) {
  std::string names;
  for (reduction a : allowed) {
    if (a == r) return;
    if (!names.empty()) names += ", ";
    names += '\'';
    names += reduction_name(a);
    names += '\'';
  }
  std::string got;
  if (valid_reduction(r)) {
    got += '\'';
    got += reduction_name(r);
    got += '\'';
  } else {
    got = "invalid value " + std::to_string(static_cast<int>(r));
  }
  fail(function, "reduction", "expected one of " + names + ", got " + got);
}

row_space logits_space(std::string_view function, const array_view& input) {
  check_float(function, "input", input);
  if (input.ndim < 1)
    fail(function, "input", "expected shape (C), (N, C) or (N, C, d1, ...), got a 0-dimensional array");
  row_space s;
  if (input.ndim == 1) {
    s.ndim = 0;
    s.classes = input.shape[0];
    s.rows = 1;
    return s;
  }
  s.classes = input.shape[1];
  s.ndim = input.ndim - 1;
  s.dims[0] = input.shape[0];
  for (int i = 2; i < input.ndim; ++i) s.dims[i - 1] = input.shape[i];
  s.rows = 1;  // fits whenever numel does, except with C = 0
  for (int i = 0; i < s.ndim; ++i)
    if (__builtin_mul_overflow(s.rows, s.dims[i], &s.rows))
      fail(function, "input", "number of rows of shape " + shape_string(input) + " overflows 64-bit indexing");
  return s;
}

row_operand class_operand(const row_space& space, const array_view& v) {
  row_operand op;
  op.base = static_cast<const char*>(v.data);
  op.type = v.type;
  op.ndim = space.ndim;
  op.inner = space.classes;
  if (v.ndim == 1) {
    op.class_stride = v.strides[0];
    return op;
  }
  op.class_stride = v.strides[1];
  op.dims[0] = space.dims[0];
  op.strides[0] = v.strides[0];
  for (int i = 2; i < v.ndim; ++i) {
    op.dims[i - 1] = space.dims[i - 1];
    op.strides[i - 1] = v.strides[i];
  }
  return op;
}

row_operand row_shaped_operand(const row_space& space, const array_view& v) {
  row_operand op;
  op.base = static_cast<const char*>(v.data);
  op.type = v.type;
  op.ndim = space.ndim;
  op.inner = 1;
  for (int i = 0; i < space.ndim; ++i) {
    op.dims[i] = space.dims[i];
    op.strides[i] = v.strides[i];
  }
  return op;
}

void check_row_shape(std::string_view function, std::string_view argument, const array_view& v,
                     const row_space& space) {
  check_extent(function, argument, v);
  bool same = v.ndim == space.ndim;
  for (int i = 0; same && i < v.ndim; ++i) same = v.shape[i] == space.dims[i];
  if (!same)
    fail(function, argument, "expected shape " + shape_string(space.dims, space.ndim) +
                                 " (the input's without the class dimension), got " + shape_string(v));
}

void check_class_vector(std::string_view function, std::string_view argument,
                        const array_view& v, std::int64_t classes) {
  check_float(function, argument, v);
  if (v.ndim != 1 || v.shape[0] != classes)
    fail(function, argument, "expected shape (" + std::to_string(classes) + ") (one value per class), got " +
                                 shape_string(v));
}

// ---------------------------------------------------------------------------------------
// aliasing
//
// A view's elements are the byte addresses base + Σ_k i_k stride_k. Two views overlap when
// some element of one shares a byte with an element of the other. Most pairs are decided by
// their byte extents (lowest .. highest byte touched); views whose extents interleave are
// decided exactly by a search over the index differences δ_k = i_k - j_k, which needs few
// steps when the strides form a lattice (each stride beyond the reach of the smaller ones,
// as in x[:, ::2] and x[:, 1::2]); the search gives up after a fixed budget, and an
// undecided pair counts as overlapping (PyTorch's get_overlap_status answers TooHard then).

namespace {

using wide = __int128;  // byte offsets of checked views: |offset| < 2^63, sums stay below 2^70

// The elements of a view as base + Σ_k i_k stride_k, 0 <= i_k <= reach_k, with positive byte
// strides (a negative stride is flipped and the base moved to the lowest element) and size-1
// and zero-stride dimensions dropped. Dimensions with equal strides are merged: the sums of
// their indices take every value in 0 .. Σ reach, so the set of addresses is the same.
struct lattice {
  wide base = 0, element = 0;
  int terms = 0;
  wide stride[max_dims] = {}, reach[max_dims] = {};
};

lattice lattice_of(const array_view& v) {
  lattice l;
  l.element = static_cast<wide>(dtype_size(v.type));
  l.base = static_cast<wide>(reinterpret_cast<std::uintptr_t>(v.data));
  for (int i = 0; i < v.ndim; ++i) {
    if (v.shape[i] <= 1 || v.strides[i] == 0) continue;
    wide stride = static_cast<wide>(v.strides[i]) * l.element;
    const wide reach = v.shape[i] - 1;
    if (stride < 0) {
      l.base += stride * reach;
      stride = -stride;
    }
    int k = 0;
    while (k < l.terms && l.stride[k] != stride) ++k;
    if (k == l.terms) l.stride[l.terms++] = stride;
    l.reach[k] += reach;
  }
  return l;
}

struct search_term {
  wide stride, lo, hi;  // δ in [lo, hi]
};

wide floor_div(wide a, wide b) {  // b > 0
  const wide q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

struct search_state {
  const search_term* terms;
  int count;
  wide min_rest[2 * max_dims + 1], max_rest[2 * max_dims + 1];  // bounds of Σ_{j>=k} δ_j s_j
  wide lower, upper;
  bool need_nonzero;
  int budget = 256;
};

// Whether some δ in the box (nonzero when need_nonzero) has Σ δ_k stride_k in (lower, upper).
// Terms by decreasing stride; at each level only the δ the remaining levels can complete.
// 1: yes, 0: no, -1: budget spent. With lattice strides (each beyond the reach of the smaller
// ones) a level has at most 3 candidates and most are cut at the next level, so the budget is
// met only by exotic layouts of many dimensions.
int search(search_state& st, int k, wide sum, bool nonzero) {
  if (k == st.count) return sum > st.lower && sum < st.upper && (nonzero || !st.need_nonzero) ? 1 : 0;
  const search_term& t = st.terms[k];
  wide first = floor_div(st.lower - sum - st.max_rest[k + 1], t.stride) + 1;
  wide last = -floor_div(-(st.upper - sum - st.min_rest[k + 1]), t.stride) - 1;
  // the set of solutions is symmetric when nonzero is needed: the first nonzero δ is positive
  const wide lo = st.need_nonzero && !nonzero && t.lo < 0 ? 0 : t.lo;
  if (first < lo) first = lo;
  if (last > t.hi) last = t.hi;
  for (wide d = first; d <= last; ++d) {
    if (--st.budget < 0) return -1;
    const int found = search(st, k + 1, sum + d * t.stride, nonzero || d != 0);
    if (found != 0) return found;
  }
  return 0;
}

int search_box(search_term* terms, int count, wide lower, wide upper, bool need_nonzero) {
  std::sort(terms, terms + count, [](const search_term& a, const search_term& b) { return a.stride > b.stride; });
  search_state st;
  st.terms = terms;
  st.count = count;
  st.lower = lower;
  st.upper = upper;
  st.need_nonzero = need_nonzero;
  st.min_rest[count] = st.max_rest[count] = 0;
  for (int k = count - 1; k >= 0; --k) {
    st.min_rest[k] = st.min_rest[k + 1] + terms[k].lo * terms[k].stride;
    st.max_rest[k] = st.max_rest[k + 1] + terms[k].hi * terms[k].stride;
  }
  return search(st, 0, 0, false);
}

// The bytes [low, high) a checked, non-empty view touches (no overflow: check_extent).
struct byte_range {
  std::uintptr_t low, high;
};
byte_range byte_range_of(const array_view& v) {
  std::int64_t below = 0, above = 0;
  for (int i = 0; i < v.ndim; ++i) {
    if (v.shape[i] <= 1) continue;
    const std::int64_t span = v.strides[i] * (v.shape[i] - 1);
    if (span < 0) below -= span;
    else above += span;
  }
  const auto size = static_cast<std::uintptr_t>(dtype_size(v.type));
  const auto address = reinterpret_cast<std::uintptr_t>(v.data);
  return {address - static_cast<std::uintptr_t>(below) * size, address + (static_cast<std::uintptr_t>(above) + 1) * size};
}

bool same_elements(const array_view& a, const array_view& b) {
  if (a.data != b.data || a.type != b.type || a.ndim != b.ndim) return false;
  for (int i = 0; i < a.ndim; ++i)
    if (a.shape[i] != b.shape[i] || (a.shape[i] > 1 && a.strides[i] != b.strides[i])) return false;
  return true;
}

const char* const kAliasRule =
    "; an output may only be exactly the input (in-place gradient) and must not overlap any other array";

[[noreturn]] void fail_overlap(std::string_view function, std::string_view output, std::string_view other) {
  throw error(std::string(function) + ": " + std::string(output) + " overlaps " + std::string(other) + kAliasRule);
}

void check_not_self_overlapping(std::string_view function, std::string_view argument, const array_view& v) {
  if (overlaps_itself(v))
    fail(function, argument, "expected every element at its own address, got strides " +
                                 shape_string(v.strides, v.ndim) + " for shape " + shape_string(v));
}

// The rules among the outputs and the input (check_outputs runs them).
void check_outputs_apart(std::string_view function, const outputs& out, const array_view& input) {
  if (out.grad) check_not_self_overlapping(function, "grad", *out.grad);
  if (out.losses) check_not_self_overlapping(function, "losses", *out.losses);
  if (out.grad && out.losses && overlap_of(*out.losses, *out.grad) != overlap::none)
    fail_overlap(function, "losses", "grad");
  if (out.grad && overlap_of(*out.grad, input) == overlap::partial) fail_overlap(function, "grad", "input");
  if (out.losses && overlap_of(*out.losses, input) != overlap::none) fail_overlap(function, "losses", "input");
  if (out.grad_target) {
    check_not_self_overlapping(function, "grad_target", *out.grad_target);
    if (overlap_of(*out.grad_target, input) != overlap::none) fail_overlap(function, "grad_target", "input");
    if (out.grad && overlap_of(*out.grad_target, *out.grad) != overlap::none)
      fail_overlap(function, "grad_target", "grad");
    if (out.losses && overlap_of(*out.grad_target, *out.losses) != overlap::none)
      fail_overlap(function, "grad_target", "losses");
  }
}

}  // namespace

overlap overlap_of(const array_view& a, const array_view& b) {
  if (a.numel() == 0 || b.numel() == 0) return overlap::none;
  if (same_elements(a, b)) return overlap::same;
  const byte_range ra = byte_range_of(a), rb = byte_range_of(b);
  if (ra.high <= rb.low || rb.high <= ra.low) return overlap::none;
  const lattice la = lattice_of(a), lb = lattice_of(b);
  // interleaved extents: is there x in A, y in B (offsets from the bases) with the elements
  // [a, a + eA) and [b, b + eB) at a = baseA + x, b = baseB + y sharing a byte,
  // -eA < a - b < eB, i.e. -eA - d < x - y < eB - d with d = baseA - baseB?
  search_term terms[2 * max_dims];
  int count = 0;
  for (int k = 0; k < la.terms; ++k) terms[count++] = {la.stride[k], 0, la.reach[k]};
  for (int k = 0; k < lb.terms; ++k) {
    int j = 0;
    while (j < la.terms && terms[j].stride != lb.stride[k]) ++j;
    if (j == la.terms) terms[count++] = {lb.stride[k], -lb.reach[k], 0};
    else terms[j].lo = -lb.reach[k];
  }
  const wide d = la.base - lb.base;
  return search_box(terms, count, -la.element - d, lb.element - d, false) == 0 ? overlap::none : overlap::partial;
}

bool overlaps_itself(const array_view& v) {
  if (v.numel() <= 1) return false;
  // the common case, row-major with any padding or spacing: each stride, from the last
  // dimension on, beyond the reach of the dimensions after it
  std::int64_t reach = 0;
  bool nested = true;
  for (int i = v.ndim - 1; i >= 0 && nested; --i) {
    if (v.shape[i] <= 1) continue;
    const std::int64_t stride = v.strides[i] < 0 ? -v.strides[i] : v.strides[i];
    nested = stride > reach;
    reach += stride * (v.shape[i] - 1);
  }
  if (nested) return false;
  search_term terms[2 * max_dims];
  int count = 0;
  for (int i = 0; i < v.ndim; ++i) {
    if (v.shape[i] <= 1) continue;
    if (v.strides[i] == 0) return true;
    const wide stride = v.strides[i] < 0 ? -static_cast<wide>(v.strides[i]) : static_cast<wide>(v.strides[i]);
    for (int k = 0; k < count; ++k)
      if (terms[k].stride == stride) return true;
    terms[count++] = {stride, -static_cast<wide>(v.shape[i] - 1), static_cast<wide>(v.shape[i] - 1)};
  }
  // other orders (column-major, permuted): each stride beyond the reach of the smaller ones
  std::sort(terms, terms + count, [](const search_term& a, const search_term& b) { return a.stride < b.stride; });
  wide sorted_reach = 0;
  nested = true;
  for (int k = 0; k < count && nested; ++k) {
    nested = terms[k].stride > sorted_reach;
    sorted_reach += terms[k].stride * terms[k].hi;
  }
  if (nested) return false;
  // Σ δ_k stride_k = 0 (in elements) for some δ != 0
  return search_box(terms, count, -1, 1, true) != 0;
}

void check_aliasing(std::string_view function, const outputs& out, std::initializer_list<named_array> others) {
  // With the gradient in place (grad is exactly the input) an input overlapping the input
  // overlaps grad: the first rule below refuses it too.
  for (const named_array& other : others) {
    if (!other.view) continue;
    check_extent(function, other.name, *other.view);
    if (out.grad && overlap_of(*out.grad, *other.view) != overlap::none) fail_overlap(function, "grad", other.name);
    if (out.losses && overlap_of(*out.losses, *other.view) != overlap::none)
      fail_overlap(function, "losses", other.name);
    if (out.grad_target && overlap_of(*out.grad_target, *other.view) != overlap::none)
      fail_overlap(function, "grad_target", other.name);
  }
}

void check_grad_target(std::string_view function, const outputs& out, const array_view* target,
                       std::string_view target_name, std::string_view unsupported) {
  if (!out.grad_target) return;
  if (!target) fail(function, "grad_target", "expected no grad_target " + std::string(unsupported));
  check_float(function, "grad_target", *out.grad_target);
  check_same_shape(function, "grad_target", *out.grad_target, *target, target_name);
}

void check_outputs(std::string_view function, const outputs& out, const array_view& input,
                   const std::int64_t* loss_shape, int loss_ndim, reduction r) {
  if (!valid_reduction(r))
    fail(function, "reduction", "expected 'none', 'mean', 'sum' or 'batchmean', got invalid value " +
                                    std::to_string(static_cast<int>(r)));
  if (out.grad) {
    check_float(function, "grad", *out.grad);
    check_same_shape(function, "grad", *out.grad, input, "input");
  }
  if (out.losses) {
    if (r != reduction::none)
      fail(function, "losses", "expected no losses output unless reduction is 'none', got reduction '" +
                                   std::string(reduction_name(r)) + "'");
    check_float(function, "losses", *out.losses);
    bool same = out.losses->ndim == loss_ndim;
    for (int i = 0; same && i < loss_ndim; ++i) same = out.losses->shape[i] == loss_shape[i];
    if (!same)
      fail(function, "losses", "expected shape " + shape_string(loss_shape, loss_ndim) + ", got " +
                                   shape_string(*out.losses));
  }
  check_outputs_apart(function, out, input);
}

// ---------------------------------------------------------------------------------------
// distillation_loss's class dimension

class_first_views distillation_layout(std::string_view function, const distillation_options& options,
                                      const array_view& student, const array_view* teacher, const outputs& out) {
  if (!valid_divergence(options.kind))
    fail(function, "divergence", "expected 'kl', 'reverse_kl' or 'jsd', got invalid value " +
                                     std::to_string(static_cast<int>(options.kind)));
  class_first_views views{student, teacher ? *teacher : array_view{}, out};
  const int ndim = student.ndim;
  if (ndim < 1 || ndim > max_dims) return views;  // logits_space reports it
  if (!options.dim) {
    if (ndim >= 3)
      fail(function, "dim", "class dimension ambiguous for " + std::to_string(ndim) +
                                "-dimensional logits; pass dim=1 for (N, C, d1, ...) layout or dim=-1 for "
                                "(batch, sequence, vocabulary)");
    return views;  // the last dimension: index 1, or 0 of a 1-d input
  }
  int dim = *options.dim;
  if (dim < -ndim || dim >= ndim)
    fail(function, "dim", "expected a value in [" + std::to_string(-ndim) + ", " + std::to_string(ndim - 1) +
                              "] for " + std::to_string(ndim) + "-dimensional logits, got " + std::to_string(dim));
  if (dim < 0) dim += ndim;
  if (ndim == 1 || dim == 1) return views;
  // The same shape before the move, so that errors show the caller's shapes.
  if (teacher) check_same_shape(function, "teacher", *teacher, student, "student");
  if (out.grad) check_same_shape(function, "grad", *out.grad, student, "input");
  if (out.grad_target) {
    if (!teacher) fail(function, "grad_target", "expected no grad_target with a top-k teacher (no teacher logits)");
    check_float(function, "grad_target", *out.grad_target);
    check_same_shape(function, "grad_target", *out.grad_target, *teacher, "teacher");
  }
  // (d0, ..., d_dim, ...) -> (first row dim, d_dim, the other row dims in order)
  int order[max_dims], n = 0;
  for (int i = 0; i < ndim; ++i)
    if (i != dim) order[n++] = i;
  for (int i = ndim - 1; i > 1; --i) order[i] = order[i - 1];
  order[1] = dim;
  auto permute = [&](auto& v) {
    auto copy = v;
    for (int i = 0; i < ndim; ++i) v.shape[i] = copy.shape[order[i]], v.strides[i] = copy.strides[order[i]];
  };
  permute(views.student);
  if (teacher) permute(views.teacher);
  if (out.grad) permute(*views.out.grad);
  if (out.grad_target) permute(*views.out.grad_target);
  return views;
}

}  // namespace softce::detail
