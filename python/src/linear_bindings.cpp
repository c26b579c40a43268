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

#include <softce/class_parallel.hpp>
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

double linear_cross_entropy_impl(const input_array& hidden, const input_array& weight,
                            const std::optional<input_array>& bias, const input_array& target,
                            const std::optional<input_array>& topk_values, bool tail,
                            const std::optional<input_array>& class_weight, std::int64_t ignore_index,
                            std::string_view reduction, double label_smoothing,
                            const std::optional<input_array>& mask, std::optional<std::int64_t> memory_budget,
                            const std::optional<output_array>& losses,
                            const std::optional<output_array>& grad_hidden,
                            const std::optional<output_array>& grad_weight,
                            const std::optional<output_array>& grad_bias, bool accumulate, bool validate_only,
                            const softce::class_shard* shard = nullptr) {
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
    return shard ? softce::class_parallel::linear_cross_entropy(*shard, h, w, b, t, options, lo, out)
                 : softce::linear_cross_entropy(h, w, b, t, options, lo, out);
  }
  const auto t = make_view<softce::array_view>(target, fn, "target");
  nb::gil_scoped_release release;
  return shard ? softce::class_parallel::linear_cross_entropy(*shard, h, w, b, t, options, lo, out)
               : softce::linear_cross_entropy(h, w, b, t, options, lo, out);
}

double linear_distillation_loss_impl(const input_array& hidden, const input_array& weight,
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
                                const std::optional<output_array>& grad_bias, bool accumulate, bool validate_only,
                                const softce::class_shard* shard = nullptr) {
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
    return shard ? softce::class_parallel::linear_distillation_loss(*shard, h, w, b, t, options, lo, out)
                 : softce::linear_distillation_loss(h, w, b, t, options, lo, out);
  }
  if (topk_values) {
    softce::topk t{make_view<softce::array_view>(teacher, fn, "teacher.indices"),
                   make_view<softce::array_view>(*topk_values, fn, "teacher.values"), tail};
    nb::gil_scoped_release release;
    return shard ? softce::class_parallel::linear_distillation_loss(*shard, h, w, b, t, options, lo, out)
                 : softce::linear_distillation_loss(h, w, b, t, options, lo, out);
  }
  const auto t = make_view<softce::array_view>(teacher, fn, "teacher");
  nb::gil_scoped_release release;
  return shard ? softce::class_parallel::linear_distillation_loss(*shard, h, w, b, t, options, lo, out)
               : softce::linear_distillation_loss(h, w, b, t, options, lo, out);
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
  return linear_cross_entropy_impl(hidden, weight, bias, target, topk_values, tail, class_weight, ignore_index,
                                   reduction, label_smoothing, mask, memory_budget, losses, grad_hidden, grad_weight,
                                   grad_bias, accumulate, validate_only);
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
  return linear_distillation_loss_impl(hidden, weight, bias, teacher, topk_values, tail, teacher_weight,
                                       teacher_bias, temperature, divergence, beta, reduction, mask, memory_budget,
                                       losses, grad_hidden, grad_weight, grad_bias, accumulate, validate_only);
}

// ---------------------------------------------------------------------------------------
// class-parallel (softce/distributed.py): the shard's all_reduce is a Python callable

constexpr const char* kMergeCapsule = "softce.row_stats_merge_fn";  // as bindings.cpp names it

// A class_shard whose all_reduce calls `all_reduce(records, merge)` in Python (records: a
// float64 (count, width) view of the core's buffer, merge: the capsule of the core's merge
// function), taking the GIL back: the core runs without it. A borrowed handle: the caller's
// argument outlives the call.
softce::class_shard python_shard(std::int64_t class_offset, std::int64_t num_classes, nb::handle all_reduce) {
  softce::class_shard shard;
  shard.class_offset = class_offset;
  shard.num_classes = num_classes;
  shard.all_reduce = [callable = all_reduce](double* stats, std::int64_t count, int width,
                                             softce::row_stats_merge_fn merge) {
    nb::gil_scoped_acquire gil;
    const std::size_t shape[2] = {static_cast<std::size_t>(count), static_cast<std::size_t>(width)};
    nb::ndarray<nb::numpy, double, nb::ndim<2>, nb::c_contig> records(stats, 2, shape, nb::handle());
    nb::capsule capsule(reinterpret_cast<const void*>(merge), kMergeCapsule);
    callable(records.cast(nb::rv_policy::reference), capsule);
  };
  return shard;
}

double class_parallel_linear_cross_entropy(
    std::int64_t class_offset, std::int64_t num_classes, nb::callable all_reduce, const input_array& hidden,
    const input_array& weight, const std::optional<input_array>& bias, const input_array& target,
    const std::optional<input_array>& topk_values, bool tail, const std::optional<input_array>& class_weight,
    std::int64_t ignore_index, std::string_view reduction, double label_smoothing,
    const std::optional<input_array>& mask, std::optional<std::int64_t> memory_budget,
    const std::optional<output_array>& losses, const std::optional<output_array>& grad_hidden,
    const std::optional<output_array>& grad_weight, const std::optional<output_array>& grad_bias) {
  const auto shard = python_shard(class_offset, num_classes, all_reduce);
  return linear_cross_entropy_impl(hidden, weight, bias, target, topk_values, tail, class_weight, ignore_index, reduction,
                              label_smoothing, mask, memory_budget, losses, grad_hidden, grad_weight, grad_bias, false,
                              false, &shard);
}

double class_parallel_linear_distillation_loss(
    std::int64_t class_offset, std::int64_t num_classes, nb::callable all_reduce, const input_array& hidden,
    const input_array& weight, const std::optional<input_array>& bias, const input_array& teacher,
    const std::optional<input_array>& topk_values, bool tail, const std::optional<input_array>& teacher_weight,
    const std::optional<input_array>& teacher_bias, double temperature, std::string_view divergence, double beta,
    std::string_view reduction, const std::optional<input_array>& mask, std::optional<std::int64_t> memory_budget,
    const std::optional<output_array>& losses, const std::optional<output_array>& grad_hidden,
    const std::optional<output_array>& grad_weight, const std::optional<output_array>& grad_bias) {
  const auto shard = python_shard(class_offset, num_classes, all_reduce);
  return linear_distillation_loss_impl(hidden, weight, bias, teacher, topk_values, tail, teacher_weight, teacher_bias,
                                  temperature, divergence, beta, reduction, mask, memory_budget, losses, grad_hidden,
                                  grad_weight, grad_bias, false, false, &shard);
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
  m.def("class_parallel_linear_cross_entropy", &class_parallel_linear_cross_entropy, "class_offset"_a,
        "num_classes"_a, "all_reduce"_a, "hidden"_a.noconvert(), "weight"_a.noconvert(), "bias"_a.noconvert().none(),
        "target"_a.noconvert(), "topk_values"_a.noconvert().none(), "tail"_a, "class_weight"_a.noconvert().none(),
        "ignore_index"_a, "reduction"_a, "label_smoothing"_a, "mask"_a.noconvert().none(), "memory_budget"_a.none(),
        "losses"_a.noconvert().none(), "grad_hidden"_a.noconvert().none(), "grad_weight"_a.noconvert().none(),
        "grad_bias"_a.noconvert().none());
  m.def("class_parallel_linear_distillation_loss", &class_parallel_linear_distillation_loss, "class_offset"_a,
        "num_classes"_a, "all_reduce"_a, "hidden"_a.noconvert(), "weight"_a.noconvert(), "bias"_a.noconvert().none(),
        "teacher"_a.noconvert(), "topk_values"_a.noconvert().none(), "tail"_a, "teacher_weight"_a.noconvert().none(),
        "teacher_bias"_a.noconvert().none(), "temperature"_a, "divergence"_a, "beta"_a, "reduction"_a,
        "mask"_a.noconvert().none(), "memory_budget"_a.none(), "losses"_a.noconvert().none(),
        "grad_hidden"_a.noconvert().none(), "grad_weight"_a.noconvert().none(), "grad_bias"_a.noconvert().none());
}
