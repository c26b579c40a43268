// Argument checks shared by every loss (see validate.hpp).
#include "validate.hpp"

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

void check_extent(std::string_view function, std::string_view argument, const array_view& v) {
  if (v.ndim < 0 || v.ndim > max_dims)
    fail(function, argument, "expected at most " + std::to_string(max_dims) + " dimensions, got " +
                                 std::to_string(v.ndim));
  std::int64_t numel = 1, last = 0;
  for (int i = 0; i < v.ndim; ++i) {
    if (v.shape[i] < 0)
      fail(function, argument, "expected non-negative sizes, got shape " + shape_string(v));
    if (__builtin_mul_overflow(numel, v.shape[i], &numel))
      fail(function, argument, "size of shape " + shape_string(v) + " overflows 64-bit indexing");
  }
  if (numel == 0) return;
  for (int i = 0; i < v.ndim; ++i) {
    std::int64_t span;
    std::int64_t stride = v.strides[i] < 0 ? -v.strides[i] : v.strides[i];
    if (__builtin_mul_overflow(v.shape[i] - 1, stride, &span) || __builtin_add_overflow(last, span, &last) ||
        __builtin_mul_overflow(last, static_cast<std::int64_t>(dtype_size(v.type)), &span))
      fail(function, argument, "strides of shape " + shape_string(v) + " overflow 64-bit indexing");
  }
  if (v.data == nullptr) fail(function, argument, "expected data, got a null pointer");
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
    names += "'" + std::string(reduction_name(a)) + "'";
  }
  fail(function, "reduction", "expected one of " + names + ", got '" + std::string(reduction_name(r)) + "'");
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
  s.rows = 1;
  for (int i = 0; i < s.ndim; ++i) s.rows *= s.dims[i];
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

void check_outputs(std::string_view function, const outputs& out, const array_view& input,
                   const std::int64_t* loss_shape, int loss_ndim, reduction r) {
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
}

}  // namespace softce::detail
