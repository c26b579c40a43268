// softce._core: bindings of softce/linear.hpp (fused output layer + loss), used by
// softce/linear.py.
//
// Arrays cross as nb::ndarray views (zero-copy, DLPack / buffer protocol), outputs are
// allocated in Python and passed in writable; the library runs with the GIL released.
// softce::error becomes ValueError / IndexError / TypeError through the translator
// registered in bindings.cpp. The teacher of linear_distillation_loss is logits, a top-k
// (indices + topk_values) or hidden states (teacher + teacher_weight [+ teacher_bias]).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/string_view.h>

#include <softce/linear.hpp>
#include <softce/softce.hpp>

#include "views.hpp"

#include <optional>
#include <string>
#include <string_view>

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using namespace softce_py;  // input_array, output_array, make_view, in_view (views.hpp)

softce::linear_outputs out_views(const std::optional<output_array>& losses,
                                 const std::optional<output_array>& grad_hidden,
                                 const std::optional<output_array>& grad_weight,
                                 const std::optional<output_array>& grad_bias, bool accumulate,
                                 std::string_view fn) {
  softce::linear_outputs out;
  if (losses) out.losses = make_view<softce::mutable_array_view>(*losses, fn, "losses");
  if (grad_hidden) out.grad_hidden = make_view<softce::mutable_array_view>(*grad_hidden, fn, "grad_hidden");
  if (grad_weight) out.grad_weight = make_view<softce::mutable_array_view>(*grad_weight, fn, "grad_weight");
  if (grad_bias) out.grad_bias = make_view<softce::mutable_array_view>(*grad_bias, fn, "grad_bias");
  out.accumulate = accumulate;
  return out;
}

softce::linear_options linear_options(std::optional<std::int64_t> memory_budget, bool validate_only,
                                      std::string_view fn) {
  softce::linear_options o;
  o.validate_only = validate_only;
  if (memory_budget) {
    if (*memory_budget < 0)
      throw softce::error(std::string(fn) + ": memory_budget: expected a number of bytes >= 0, got " +
                          std::to_string(*memory_budget));
    o.memory_budget = static_cast<std::size_t>(*memory_budget);
  }
  return o;
}

double linear_cross_entropy(const input_array& hidden, const input_array& weight,
                            const std::optional<input_array>& bias, const input_array& target,
                            const std::optional<input_array>& topk_values, bool tail,
                            const std::optional<input_array>& class_weight, std::int64_t ignore_index,
                            std::string_view reduction, double label_smoothing,
                            const std::optional<input_array>& mask, std::optional<std::int64_t> memory_budget,
                            const std::optional<output_array>& losses,
                            const std::optional<output_array>& grad_hidden,
                            const std::optional<output_array>& grad_weight,
                            const std::optional<output_array>& grad_bias, bool accumulate, bool validate_only) {
  constexpr std::string_view fn = "linear_cross_entropy";
  softce::cross_entropy_options options;
  options.weight = in_view(class_weight, fn, "class_weight");
  options.ignore_index = ignore_index;
  options.reduce = softce::parse_reduction(reduction);
  options.label_smoothing = label_smoothing;
  options.mask = in_view(mask, fn, "mask");
  const auto h = make_view<softce::array_view>(hidden, fn, "input");
  const auto w = make_view<softce::array_view>(weight, fn, "weight");
  const auto b = in_view(bias, fn, "bias");
  const auto out = out_views(losses, grad_hidden, grad_weight, grad_bias, accumulate, fn);
  const auto lo = linear_options(memory_budget, validate_only, fn);
  if (topk_values) {
    softce::topk t{make_view<softce::array_view>(target, fn, "target.indices"),
                   make_view<softce::array_view>(*topk_values, fn, "target.values"), tail};
    nb::gil_scoped_release release;
    return softce::linear_cross_entropy(h, w, b, t, options, lo, out);
  }
  const auto t = make_view<softce::array_view>(target, fn, "target");
  nb::gil_scoped_release release;
  return softce::linear_cross_entropy(h, w, b, t, options, lo, out);
}

double linear_distillation_loss(const input_array& hidden, const input_array& weight,
                                const std::optional<input_array>& bias, const input_array& teacher,
                                const std::optional<input_array>& topk_values, bool tail,
                                const std::optional<input_array>& teacher_weight,
                                const std::optional<input_array>& teacher_bias, double temperature,
                                std::string_view divergence, double beta, std::string_view reduction,
                                const std::optional<input_array>& mask,
                                std::optional<std::int64_t> memory_budget,
                                const std::optional<output_array>& losses,
                                const std::optional<output_array>& grad_hidden,
                                const std::optional<output_array>& grad_weight,
                                const std::optional<output_array>& grad_bias, bool accumulate, bool validate_only) {
  constexpr std::string_view fn = "linear_distillation_loss";
  softce::distillation_options options;
  options.temperature = temperature;
  options.kind = softce::parse_divergence(divergence);
  options.beta = beta;
  options.reduce = softce::parse_reduction(reduction);
  options.mask = in_view(mask, fn, "mask");
  const auto h = make_view<softce::array_view>(hidden, fn, "input");
  const auto w = make_view<softce::array_view>(weight, fn, "weight");
  const auto b = in_view(bias, fn, "bias");
  const auto out = out_views(losses, grad_hidden, grad_weight, grad_bias, accumulate, fn);
  const auto lo = linear_options(memory_budget, validate_only, fn);
  if (teacher_weight) {
    softce::linear_teacher t{make_view<softce::array_view>(teacher, fn, "teacher.hidden"),
                             make_view<softce::array_view>(*teacher_weight, fn, "teacher.weight"),
                             in_view(teacher_bias, fn, "teacher.bias")};
    nb::gil_scoped_release release;
    return softce::linear_distillation_loss(h, w, b, t, options, lo, out);
  }
  if (topk_values) {
    softce::topk t{make_view<softce::array_view>(teacher, fn, "teacher.indices"),
                   make_view<softce::array_view>(*topk_values, fn, "teacher.values"), tail};
    nb::gil_scoped_release release;
    return softce::linear_distillation_loss(h, w, b, t, options, lo, out);
  }
  const auto t = make_view<softce::array_view>(teacher, fn, "teacher");
  nb::gil_scoped_release release;
  return softce::linear_distillation_loss(h, w, b, t, options, lo, out);
}

}  // namespace

void bind_linear(nb::module_& m) {
  m.def("linear_cross_entropy", &linear_cross_entropy, "hidden"_a.noconvert(), "weight"_a.noconvert(),
        "bias"_a.noconvert().none(), "target"_a.noconvert(), "topk_values"_a.noconvert().none(), "tail"_a,
        "class_weight"_a.noconvert().none(), "ignore_index"_a, "reduction"_a, "label_smoothing"_a,
        "mask"_a.noconvert().none(), "memory_budget"_a.none(), "losses"_a.noconvert().none(),
        "grad_hidden"_a.noconvert().none(), "grad_weight"_a.noconvert().none(),
        "grad_bias"_a.noconvert().none(), "accumulate"_a, "validate_only"_a = false);
  m.def("linear_distillation_loss", &linear_distillation_loss, "hidden"_a.noconvert(), "weight"_a.noconvert(),
        "bias"_a.noconvert().none(), "teacher"_a.noconvert(), "topk_values"_a.noconvert().none(), "tail"_a,
        "teacher_weight"_a.noconvert().none(), "teacher_bias"_a.noconvert().none(), "temperature"_a,
        "divergence"_a, "beta"_a, "reduction"_a, "mask"_a.noconvert().none(), "memory_budget"_a.none(),
        "losses"_a.noconvert().none(), "grad_hidden"_a.noconvert().none(), "grad_weight"_a.noconvert().none(),
        "grad_bias"_a.noconvert().none(), "accumulate"_a, "validate_only"_a = false);
}
