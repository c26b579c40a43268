// Validation at the API boundary, and the canonical layouts the kernels' driver uses.
//
// Every public function checks its arguments here once, before any work, and throws
// softce::error("<function>: <argument>: expected ..., got ...") on the first problem.
#pragma once

#include <softce/softce.hpp>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

namespace softce::detail {

std::string shape_string(const std::int64_t* shape, int ndim);
inline std::string shape_string(const array_view& v) { return shape_string(v.shape, v.ndim); }

[[noreturn]] void fail(std::string_view function, std::string_view argument, const std::string& what,
                       error_kind kind = error_kind::value);

// Shortest text that reads back as the same double ("1.5", "0.1", "inf").
std::string format_number(double value);

bool is_float(dtype t) noexcept;
bool is_index(dtype t) noexcept;

// Checks the dtype is a known one, numel and the largest element and byte offsets fit in
// int64, the addresses touched do not wrap around (and a non-null pointer when the view holds
// elements).
void check_extent(std::string_view function, std::string_view argument, const array_view& v);
void check_float(std::string_view function, std::string_view argument, const array_view& v);
void check_same_shape(std::string_view function, std::string_view argument, const array_view& v,
                      const array_view& reference, std::string_view reference_name);
void check_reduction(std::string_view function, reduction r, std::initializer_list<reduction> allowed);

// The row space of a logits tensor: (C,) is one row; (N, C, d1..dk) has rows (N, d1..dk).
struct row_space {
  int ndim = 0;                       // number of row dimensions
  std::int64_t dims[max_dims] = {};   // (N, d1, ..., dk)
  std::int64_t rows = 1;
  std::int64_t classes = 0;
};

// An operand addressed by (row, class): element offset = row_offset(r) + c * class_stride.
struct row_operand {
  const char* base = nullptr;
  dtype type = dtype::float32;
  int ndim = 0;
  std::int64_t dims[max_dims] = {};
  std::int64_t strides[max_dims] = {};
  std::int64_t class_stride = 0;
  std::int64_t inner = 0;  // elements per row (C, or K for top-k)

  std::int64_t row_offset(std::int64_t r) const noexcept {
    std::int64_t off = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      std::int64_t extent = dims[d];
      off += (r % extent) * strides[d];
      r /= extent;
    }
    return off;
  }
  bool contiguous_rows() const noexcept { return class_stride == 1 || inner <= 1; }
  template <class T>
  const T* ptr(std::int64_t offset) const noexcept {
    return reinterpret_cast<const T*>(base) + offset;
  }
};

row_space logits_space(std::string_view function, const array_view& input);
// A view of the input's full shape (class dim at 1), addressed by (row, class).
row_operand class_operand(const row_space& space, const array_view& v);
// A view of the row shape (per-row targets, masks, losses), addressed by row.
row_operand row_shaped_operand(const row_space& space, const array_view& v);
void check_row_shape(std::string_view function, std::string_view argument, const array_view& v,
                     const row_space& space);
// (C,) float class weights.
void check_class_vector(std::string_view function, std::string_view argument,
                        const array_view& v, std::int64_t classes);

// Outputs: grad of the input's shape, losses of `expected` shape, both float; `r` a valid
// reduction. Also the aliasing rules among the outputs and the input (see check_aliasing):
// no output overlaps itself, grad and losses are apart, and an output overlapping the input
// is exactly the input and is the gradient (in place).
void check_outputs(std::string_view function, const outputs& out, const array_view& input,
                   const std::int64_t* loss_shape, int loss_ndim, reduction r);

// ---------------------------------------------------------------------------------------
// aliasing

// How the memory of two views relates. `same`: the same elements in the same order (data,
// dtype, shape, and the strides of every dimension longer than 1); `partial`: some byte is
// shared, or it could not be decided cheaply (then treated as shared); `none`: provably
// apart (byte extents apart, or an exact search over the index differences for views on one
// lattice of strides: interleaved columns x[:, ::2] / x[:, 1::2], different rows or columns).
enum class overlap { none, same, partial };
overlap overlap_of(const array_view& a, const array_view& b);
// Whether two different index tuples of `v` may address overlapping bytes (a zero stride, or
// strides that make positions collide); undecidable cheaply counts as overlapping.
bool overlaps_itself(const array_view& v);

// An input read by a call besides the logits, named as in the error messages; an absent
// optional argument is skipped.
struct named_array {
  std::string_view name;
  const array_view* view;
  named_array(std::string_view n, const array_view& v) : name(n), view(&v) {}
  named_array(std::string_view n, const std::optional<array_view>& v) : name(n), view(v ? &*v : nullptr) {}
};

// The aliasing rules for every loss (check_outputs does those among outputs and the input):
// no output overlaps any of `others` (checked here with check_extent first), hence, when
// the gradient is written in place over the input, no other input overlaps the input.
// Inputs that are only read may overlap each other. O(ndim) per pair; call after
// check_outputs, with every array the call reads besides the input.
void check_aliasing(std::string_view function, const outputs& out, std::initializer_list<named_array> others);
// outputs.grad_target: a float array of the target's shape (`target` null: the call has no
// differentiable target, and `unsupported` says why, e.g. "with class-index targets").
void check_grad_target(std::string_view function, const outputs& out, const array_view* target,
                       std::string_view target_name, std::string_view unsupported = {});

// ---------------------------------------------------------------------------------------
// distillation_loss's class dimension

// The student, teacher logits (when given) and gradient with options.dim moved to index 1;
// only strides change, and per-row arrays (mask, losses, top-k) keep the row shape, which is
// the student's shape without the class dimension in its original order. Checks `dim` (it
// must be given for 3 or more dimensions) and `kind`.
struct class_first_views {
  array_view student, teacher;
  outputs out;
};
class_first_views distillation_layout(std::string_view function, const distillation_options& options,
                                      const array_view& student, const array_view* teacher, const outputs& out);

}  // namespace softce::detail
