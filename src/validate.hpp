// Validation at the API boundary, and the canonical layouts the kernels' driver uses.
//
// Every public function checks its arguments here once, before any work, and throws
// softce::error("<function>: <argument>: expected ..., got ...") on the first problem.
#pragma once

#include <softce/softce.hpp>

#include <cstdint>
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

// Checks numel and the largest element offset fit in int64 (and a non-null pointer when the
// view holds elements).
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

// Outputs: grad of the input's shape, losses of `expected` shape, both float.
void check_outputs(std::string_view function, const outputs& out, const array_view& input,
                   const std::int64_t* loss_shape, int loss_ndim, reduction r);

}  // namespace softce::detail
