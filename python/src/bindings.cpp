// softce._core: the nanobind bindings of the C++ core, used by the Python package softce.
//
// Every function takes its arrays as nb::ndarray (zero-copy through DLPack or the buffer
// protocol: torch tensors, NumPy arrays, anything with __dlpack__), turns them into
// softce::array_view (pointer, dtype, shape, strides in elements) and calls the core with
// the GIL released. Outputs (gradient, per-row losses) are allocated by the caller in
// Python and passed in as writable arrays, so this file never creates framework objects.
// softce::error becomes ValueError / IndexError / TypeError with the core's message.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/string_view.h>

#include <softce/softce.hpp>

#include <optional>
#include <string>
#include <string_view>

namespace nb = nanobind;
using namespace nb::literals;

namespace {

// Inputs may be read-only (e.g. np.broadcast_to); outputs must be writable. No device
// constraint here: a non-CPU array gets our own message instead of nanobind's generic one.
using input_array = nb::ndarray<nb::ro>;
using output_array = nb::ndarray<>;

std::string dlpack_dtype_name(nb::dlpack::dtype t) {
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
std::optional<softce::dtype> to_softce_dtype(nb::dlpack::dtype t) {
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

softce::array_view in_view(const input_array& a, std::string_view fn, std::string_view name) {
  return make_view<softce::array_view>(a, fn, name);
}
std::optional<softce::array_view> in_view(const std::optional<input_array>& a,
                                          std::string_view fn, std::string_view name) {
  if (!a) return std::nullopt;
  return in_view(*a, fn, name);
}
softce::outputs out_views(const std::optional<output_array>& grad,
                          const std::optional<output_array>& losses, std::string_view fn) {
  softce::outputs out;
  if (grad) out.grad = make_view<softce::mutable_array_view>(*grad, fn, "grad");
  if (losses) out.losses = make_view<softce::mutable_array_view>(*losses, fn, "losses");
  return out;
}

softce::topk make_topk(const input_array& indices, const input_array& values, bool tail,
                       std::string_view fn) {
  softce::topk t;
  t.indices = in_view(indices, fn, "target.indices");
  t.values = in_view(values, fn, "target.values");
  t.tail = tail;
  return t;
}

// ---------------------------------------------------------------------------------------
// the losses; each returns the (reduced) loss as a Python float

double cross_entropy(const input_array& input, const input_array& target,
                     const std::optional<input_array>& weight, std::int64_t ignore_index,
                     std::string_view reduction, double label_smoothing,
                     const std::optional<input_array>& mask,
                     const std::optional<output_array>& grad,
                     const std::optional<output_array>& losses) {
  constexpr std::string_view fn = "cross_entropy";
  softce::cross_entropy_options options;
  options.weight = in_view(weight, fn, "weight");
  options.ignore_index = ignore_index;
  options.reduce = softce::parse_reduction(reduction);
  options.label_smoothing = label_smoothing;
  options.mask = in_view(mask, fn, "mask");
  const auto x = in_view(input, fn, "input");
  const auto t = in_view(target, fn, "target");
  const auto out = out_views(grad, losses, fn);
  nb::gil_scoped_release release;
  return softce::cross_entropy(x, t, options, out);
}

double cross_entropy_topk(const input_array& input, const input_array& indices,
                          const input_array& values, bool tail,
                          const std::optional<input_array>& weight, std::int64_t ignore_index,
                          std::string_view reduction, double label_smoothing,
                          const std::optional<input_array>& mask,
                          const std::optional<output_array>& grad,
                          const std::optional<output_array>& losses) {
  constexpr std::string_view fn = "cross_entropy";
  softce::cross_entropy_options options;
  options.weight = in_view(weight, fn, "weight");
  options.ignore_index = ignore_index;
  options.reduce = softce::parse_reduction(reduction);
  options.label_smoothing = label_smoothing;
  options.mask = in_view(mask, fn, "mask");
  const auto x = in_view(input, fn, "input");
  const auto t = make_topk(indices, values, tail, fn);
  const auto out = out_views(grad, losses, fn);
  nb::gil_scoped_release release;
  return softce::cross_entropy(x, t, options, out);
}

double cross_entropy_with_probs(const input_array& input, const input_array& target,
                                const std::optional<input_array>& weight,
                                std::string_view reduction,
                                const std::optional<output_array>& grad,
                                const std::optional<output_array>& losses) {
  constexpr std::string_view fn = "cross_entropy_with_probs";
  const auto reduce = softce::parse_reduction(reduction);
  const auto w = in_view(weight, fn, "weight");
  const auto x = in_view(input, fn, "input");
  const auto t = in_view(target, fn, "target");
  const auto out = out_views(grad, losses, fn);
  nb::gil_scoped_release release;
  return softce::cross_entropy_with_probs(x, t, w, reduce, out);
}

double kl_div(const input_array& input, const input_array& target, std::string_view reduction,
              bool log_target, const std::optional<output_array>& grad,
              const std::optional<output_array>& losses) {
  constexpr std::string_view fn = "kl_div";
  softce::kl_div_options options;
  options.reduce = softce::parse_reduction(reduction);
  options.log_target = log_target;
  const auto x = in_view(input, fn, "input");
  const auto t = in_view(target, fn, "target");
  const auto out = out_views(grad, losses, fn);
  nb::gil_scoped_release release;
  return softce::kl_div(x, t, options, out);
}

double binary_cross_entropy_with_logits(const input_array& input, const input_array& target,
                                        const std::optional<input_array>& weight,
                                        const std::optional<input_array>& pos_weight,
                                        std::string_view reduction,
                                        const std::optional<output_array>& grad,
                                        const std::optional<output_array>& losses) {
  constexpr std::string_view fn = "binary_cross_entropy_with_logits";
  softce::bce_options options;
  options.weight = in_view(weight, fn, "weight");
  options.pos_weight = in_view(pos_weight, fn, "pos_weight");
  options.reduce = softce::parse_reduction(reduction);
  const auto x = in_view(input, fn, "input");
  const auto t = in_view(target, fn, "target");
  const auto out = out_views(grad, losses, fn);
  nb::gil_scoped_release release;
  return softce::binary_cross_entropy_with_logits(x, t, options, out);
}

softce::distillation_options distillation_options(double temperature,
                                                  std::string_view divergence, double beta,
                                                  std::string_view reduction,
                                                  const std::optional<input_array>& mask) {
  softce::distillation_options options;
  options.temperature = temperature;
  options.kind = softce::parse_divergence(divergence);
  options.beta = beta;
  options.reduce = softce::parse_reduction(reduction);
  options.mask = in_view(mask, "distillation_loss", "mask");
  return options;
}

double distillation_loss(const input_array& student, const input_array& teacher,
                         double temperature, std::string_view divergence, double beta,
                         std::string_view reduction, const std::optional<input_array>& mask,
                         const std::optional<output_array>& grad,
                         const std::optional<output_array>& losses) {
  constexpr std::string_view fn = "distillation_loss";
  const auto options = distillation_options(temperature, divergence, beta, reduction, mask);
  const auto x = in_view(student, fn, "student_logits");
  const auto t = in_view(teacher, fn, "teacher");
  const auto out = out_views(grad, losses, fn);
  nb::gil_scoped_release release;
  return softce::distillation_loss(x, t, options, out);
}

double distillation_loss_topk(const input_array& student, const input_array& indices,
                              const input_array& values, bool tail, double temperature,
                              std::string_view divergence, double beta,
                              std::string_view reduction,
                              const std::optional<input_array>& mask,
                              const std::optional<output_array>& grad,
                              const std::optional<output_array>& losses) {
  constexpr std::string_view fn = "distillation_loss";
  const auto options = distillation_options(temperature, divergence, beta, reduction, mask);
  const auto x = in_view(student, fn, "student_logits");
  const auto t = make_topk(indices, values, tail, fn);
  const auto out = out_views(grad, losses, fn);
  nb::gil_scoped_release release;
  return softce::distillation_loss(x, t, options, out);
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "softce C++ core (nanobind bindings); use the softce package instead.";

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const softce::error& e) {
      PyObject* type = PyExc_ValueError;
      if (e.kind() == softce::error_kind::index) type = PyExc_IndexError;
      if (e.kind() == softce::error_kind::type) type = PyExc_TypeError;
      PyErr_SetString(type, e.what());
    }
  });

  // Arrays must not be converted (copied) by nanobind: noconvert on every array argument.
  m.def("cross_entropy", &cross_entropy, "input"_a.noconvert(), "target"_a.noconvert(),
        "weight"_a.noconvert().none(), "ignore_index"_a, "reduction"_a, "label_smoothing"_a,
        "mask"_a.noconvert().none(), "grad"_a.noconvert().none(),
        "losses"_a.noconvert().none());
  m.def("cross_entropy_topk", &cross_entropy_topk, "input"_a.noconvert(),
        "indices"_a.noconvert(), "values"_a.noconvert(), "tail"_a,
        "weight"_a.noconvert().none(), "ignore_index"_a, "reduction"_a, "label_smoothing"_a,
        "mask"_a.noconvert().none(), "grad"_a.noconvert().none(),
        "losses"_a.noconvert().none());
  m.def("cross_entropy_with_probs", &cross_entropy_with_probs, "input"_a.noconvert(),
        "target"_a.noconvert(), "weight"_a.noconvert().none(), "reduction"_a,
        "grad"_a.noconvert().none(), "losses"_a.noconvert().none());
  m.def("kl_div", &kl_div, "input"_a.noconvert(), "target"_a.noconvert(), "reduction"_a,
        "log_target"_a, "grad"_a.noconvert().none(), "losses"_a.noconvert().none());
  m.def("binary_cross_entropy_with_logits", &binary_cross_entropy_with_logits,
        "input"_a.noconvert(), "target"_a.noconvert(), "weight"_a.noconvert().none(),
        "pos_weight"_a.noconvert().none(), "reduction"_a, "grad"_a.noconvert().none(),
        "losses"_a.noconvert().none());
  m.def("distillation_loss", &distillation_loss, "student_logits"_a.noconvert(),
        "teacher"_a.noconvert(), "temperature"_a, "divergence"_a, "beta"_a, "reduction"_a,
        "mask"_a.noconvert().none(), "grad"_a.noconvert().none(),
        "losses"_a.noconvert().none());
  m.def("distillation_loss_topk", &distillation_loss_topk, "student_logits"_a.noconvert(),
        "indices"_a.noconvert(), "values"_a.noconvert(), "tail"_a, "temperature"_a,
        "divergence"_a, "beta"_a, "reduction"_a, "mask"_a.noconvert().none(),
        "grad"_a.noconvert().none(), "losses"_a.noconvert().none());

  m.def("parse_reduction", [](std::string_view name) {
    return std::string(softce::reduction_name(softce::parse_reduction(name)));
  });
  m.def("parse_divergence", [](std::string_view name) {
    return std::string(softce::divergence_name(softce::parse_divergence(name)));
  });
  m.def("set_num_threads", &softce::set_num_threads, "threads"_a);
  m.def("get_num_threads", &softce::get_num_threads);
  m.def("simd_target", &softce::simd_target);
}
