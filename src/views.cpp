// Small pieces of the public API that are not losses: dtype names, view construction,
// parsing of reduction and divergence names.
#include <softce/softce.hpp>

#include <string>

namespace softce {

std::string_view dtype_name(dtype type) noexcept {
  switch (type) {
    case dtype::float32: return "float32";
    case dtype::float64: return "float64";
    case dtype::bfloat16: return "bfloat16";
    case dtype::float16: return "float16";
    case dtype::int32: return "int32";
    case dtype::int64: return "int64";
    case dtype::boolean: return "bool";
  }
  return "unknown";
}

std::size_t dtype_size(dtype type) noexcept {
  switch (type) {
    case dtype::float32: case dtype::int32: return 4;
    case dtype::float64: case dtype::int64: return 8;
    case dtype::bfloat16: case dtype::float16: return 2;
    case dtype::boolean: return 1;
  }
  return 0;
}

namespace detail {
void fill_view_layout(int& ndim, std::int64_t* shape_out, std::int64_t* strides_out,
                      std::initializer_list<std::int64_t> shape,
                      std::initializer_list<std::int64_t> strides) {
  if (shape.size() > static_cast<std::size_t>(max_dims))
    throw error("view: expected at most " + std::to_string(max_dims) + " dimensions, got " +
                std::to_string(shape.size()));
  if (strides.size() != 0 && strides.size() != shape.size())
    throw error("view: expected " + std::to_string(shape.size()) + " strides, got " +
                std::to_string(strides.size()));
  ndim = static_cast<int>(shape.size());
  int i = 0;
  for (std::int64_t extent : shape) {
    if (extent < 0)
      throw error("view: expected non-negative sizes, got " + std::to_string(extent) +
                  " in dimension " + std::to_string(i));
    shape_out[i++] = extent;
  }
  if (strides.size() != 0) {
    i = 0;
    for (std::int64_t stride : strides) strides_out[i++] = stride;
  } else {
    // row-major strides; the last product (the size) must fit too
    std::int64_t stride = 1;
    for (int d = ndim - 1; d >= 0; --d) {
      strides_out[d] = stride;
      if (__builtin_mul_overflow(stride, shape_out[d] > 0 ? shape_out[d] : 1, &stride)) {
        std::string text = "(";
        for (int k = 0; k < ndim; ++k) text += (k ? ", " : "") + std::to_string(shape_out[k]);
        throw error("view: size of shape " + text + ") overflows 64-bit indexing");
      }
    }
  }
}
}  // namespace detail

reduction parse_reduction(std::string_view name) {
  if (name == "none") return reduction::none;
  if (name == "mean") return reduction::mean;
  if (name == "sum") return reduction::sum;
  if (name == "batchmean") return reduction::batchmean;
  throw error("parse_reduction: unknown reduction '" + std::string(name) +
              "' (expected 'none', 'mean', 'sum' or 'batchmean')");
}

divergence parse_divergence(std::string_view name) {
  if (name == "kl") return divergence::kl;
  if (name == "reverse_kl") return divergence::reverse_kl;
  if (name == "jsd") return divergence::jsd;
  throw error("parse_divergence: unknown divergence '" + std::string(name) +
              "' (expected 'kl', 'reverse_kl' or 'jsd')");
}

std::string_view reduction_name(reduction r) noexcept {
  switch (r) {
    case reduction::none: return "none";
    case reduction::mean: return "mean";
    case reduction::sum: return "sum";
    case reduction::batchmean: return "batchmean";
  }
  return "unknown";
}

std::string_view divergence_name(divergence d) noexcept {
  switch (d) {
    case divergence::kl: return "kl";
    case divergence::reverse_kl: return "reverse_kl";
    case divergence::jsd: return "jsd";
  }
  return "unknown";
}

}  // namespace softce
