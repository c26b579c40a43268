// Arrays from Python (DLPack / buffer protocol through nb::ndarray) as softce views: the
// dtype mapping, the CPU check and the "function: argument: ..." errors, shared by every
// binding file of softce._core.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <softce/softce.hpp>

#include <optional>
#include <string>
#include <string_view>

namespace softce_py {

namespace nb = nanobind;

// Inputs may be read-only (e.g. np.broadcast_to); outputs must be writable. No device
// constraint here: a non-CPU array gets our own message instead of nanobind's generic one.
using input_array = nb::ndarray<nb::ro>;
using output_array = nb::ndarray<>;

inline std::string dlpack_dtype_name(nb::dlpack::dtype t) {
  const char* kind = "unknown";
  switch (static_cast<nb::dlpack::dtype_code>(t.code)) {
    case nb::dlpack::dtype_code::Int: kind = "int"; break;
    case nb::dlpack::dtype_code::UInt: kind = "uint"; break;
    case nb::dlpack::dtype_code::Float: kind = "float"; break;
    case nb::dlpack::dtype_code::Bfloat: kind = "bfloat"; break;
    case nb::dlpack::dtype_code::Complex: kind = "complex"; break;
    case nb::dlpack::dtype_code::Bool: return "bool";
    default: break;
  }
  std::string name = std::string(kind) + std::to_string(t.bits);
  if (t.lanes != 1) name += "x" + std::to_string(t.lanes);
  return name;
}

// The softce dtype of a DLPack dtype, if softce has it.
inline std::optional<softce::dtype> to_softce_dtype(nb::dlpack::dtype t) {
  if (t.lanes != 1) return std::nullopt;
  using code = nb::dlpack::dtype_code;
  switch (static_cast<code>(t.code)) {
    case code::Float:
      if (t.bits == 32) return softce::dtype::float32;
      if (t.bits == 64) return softce::dtype::float64;
      if (t.bits == 16) return softce::dtype::float16;
      break;
    case code::Bfloat:
      if (t.bits == 16) return softce::dtype::bfloat16;
      break;
    case code::Int:
      if (t.bits == 32) return softce::dtype::int32;
      if (t.bits == 64) return softce::dtype::int64;
      break;
    case code::Bool:
      if (t.bits == 8) return softce::dtype::boolean;
      break;
    default: break;
  }
  return std::nullopt;
}

// Fills `view` (an array_view or mutable_array_view) from `array`; `function` and `name`
// only serve the error messages, which follow the core's "function: argument: ..." style.
template <class View, class Array>
View make_view(const Array& array, std::string_view function, std::string_view name) {
  if (array.device_type() != nb::device::cpu::value) {
    throw softce::error(std::string(function) + ": " + std::string(name) +
                            ": expected a CPU array, got an array on DLPack device type " +
                            std::to_string(array.device_type()) +
                            "; softce has no GPU kernels in this build",
                        softce::error_kind::type);
  }
  const auto type = to_softce_dtype(array.dtype());
  if (!type) {
    throw softce::error(std::string(function) + ": " + std::string(name) +
                            ": unsupported dtype " + dlpack_dtype_name(array.dtype()),
                        softce::error_kind::type);
  }
  const auto ndim = static_cast<int>(array.ndim());
  if (ndim > softce::max_dims) {
    throw softce::error(std::string(function) + ": " + std::string(name) + ": expected at most " +
                        std::to_string(softce::max_dims) + " dimensions, got " +
                        std::to_string(ndim));
  }
  View v;
  v.data = const_cast<void*>(static_cast<const void*>(array.data()));
  v.type = *type;
  v.ndim = ndim;
  for (int i = 0; i < ndim; ++i) {
    v.shape[i] = static_cast<std::int64_t>(array.shape(i));
    v.strides[i] = array.stride(i);  // nanobind strides are in elements, as softce's
  }
  return v;
}

inline softce::array_view in_view(const input_array& a, std::string_view fn, std::string_view name) {
  return make_view<softce::array_view>(a, fn, name);
}
inline std::optional<softce::array_view> in_view(const std::optional<input_array>& a,
                                          std::string_view fn, std::string_view name) {
  if (!a) return std::nullopt;
  return in_view(*a, fn, name);
}
}  // namespace softce_py
