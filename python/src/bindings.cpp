// softce._core: the nanobind bindings of the C++ core, used by the Python package softce.
//
// Every function takes its arrays as nb::ndarray (zero-copy through DLPack or the buffer
// protocol: torch tensors, NumPy arrays, anything with __dlpack__), turns them into
// softce::array_view (pointer, dtype, shape, strides in elements) and calls the core with
// the GIL released. Outputs (gradient, per-row losses) are allocated by the caller in
// Python and passed in as writable arrays, so this file never creates framework objects.
// softce::error becomes ValueError / IndexError / TypeError with the core's message.
//
// Class-parallel entry points (class_parallel_*): the same losses with the class dimension
// split across the ranks of a torch.distributed process group. The collectives are done in
// Python (softce/distributed.py): the shard's all_reduce re-acquires the GIL and hands the
// row-statistics records and an opaque merge function to a Python callable, which gathers
// the records of every rank and gives them back to merge_records (below) to be combined in
// rank order.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/string_view.h>
#include <nanobind/stl/vector.h>

#include <softce/class_parallel.hpp>
#include <softce/softce.hpp>

#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

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
                          const std::optional<output_array>& losses, std::string_view fn,
                          const std::optional<output_array>& grad_target = std::nullopt) {
  softce::outputs out;
  if (grad) out.grad = make_view<softce::mutable_array_view>(*grad, fn, "grad");
  if (losses) out.losses = make_view<softce::mutable_array_view>(*losses, fn, "losses");
  if (grad_target) out.grad_target = make_view<softce::mutable_array_view>(*grad_target, fn, "grad_target");
  return out;
}

// `name`: the argument the top-k stands for ("target", or "teacher" for distillation).
softce::topk make_topk(const input_array& indices, const input_array& values, bool tail,
                       std::string_view fn, std::string_view name) {
  softce::topk t;
  t.indices = in_view(indices, fn, std::string(name) + ".indices");
  t.values = in_view(values, fn, std::string(name) + ".values");
  t.tail = tail;
  return t;
}

// ---------------------------------------------------------------------------------------
// the losses; each returns the (reduced) loss as a Python float

softce::cross_entropy_options cross_entropy_options(const std::optional<input_array>& weight,
                                                    std::int64_t ignore_index, std::string_view reduction,
                                                    double label_smoothing,
                                                    const std::optional<input_array>& mask) {
  constexpr std::string_view fn = "cross_entropy";
  softce::cross_entropy_options options;
  options.weight = in_view(weight, fn, "weight");
  options.ignore_index = ignore_index;
  options.reduce = softce::parse_reduction(reduction);
  options.label_smoothing = label_smoothing;
  options.mask = in_view(mask, fn, "mask");
  return options;
}

double cross_entropy(const input_array& input, const input_array& target,
                     const std::optional<input_array>& weight, std::int64_t ignore_index,
                     std::string_view reduction, double label_smoothing,
                     const std::optional<input_array>& mask,
                     const std::optional<output_array>& grad,
                     const std::optional<output_array>& losses,
                     const std::optional<output_array>& grad_target) {
  constexpr std::string_view fn = "cross_entropy";
  const auto options = cross_entropy_options(weight, ignore_index, reduction, label_smoothing, mask);
  const auto x = in_view(input, fn, "input");
  const auto t = in_view(target, fn, "target");
  const auto out = out_views(grad, losses, fn, grad_target);
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
  const auto options = cross_entropy_options(weight, ignore_index, reduction, label_smoothing, mask);
  const auto x = in_view(input, fn, "input");
  const auto t = make_topk(indices, values, tail, fn, "target");
  const auto out = out_views(grad, losses, fn);
  nb::gil_scoped_release release;
  return softce::cross_entropy(x, t, options, out);
}

double cross_entropy_with_probs(const input_array& input, const input_array& target,
                                const std::optional<input_array>& weight,
                                std::string_view reduction,
                                const std::optional<output_array>& grad,
                                const std::optional<output_array>& losses,
                                const std::optional<output_array>& grad_target) {
  constexpr std::string_view fn = "cross_entropy_with_probs";
  const auto reduce = softce::parse_reduction(reduction);
  const auto w = in_view(weight, fn, "weight");
  const auto x = in_view(input, fn, "input");
  const auto t = in_view(target, fn, "target");
  const auto out = out_views(grad, losses, fn, grad_target);
  nb::gil_scoped_release release;
  return softce::cross_entropy_with_probs(x, t, w, reduce, out);
}

double kl_div(const input_array& input, const input_array& target, std::string_view reduction,
              bool log_target, const std::optional<output_array>& grad,
              const std::optional<output_array>& losses,
              const std::optional<output_array>& grad_target) {
  constexpr std::string_view fn = "kl_div";
  softce::kl_div_options options;
  options.reduce = softce::parse_reduction(reduction);
  options.log_target = log_target;
  const auto x = in_view(input, fn, "input");
  const auto t = in_view(target, fn, "target");
  const auto out = out_views(grad, losses, fn, grad_target);
  nb::gil_scoped_release release;
  return softce::kl_div(x, t, options, out);
}

double binary_cross_entropy_with_logits(const input_array& input, const input_array& target,
                                        const std::optional<input_array>& weight,
                                        const std::optional<input_array>& pos_weight,
                                        std::string_view reduction,
                                        const std::optional<output_array>& grad,
                                        const std::optional<output_array>& losses,
                                        const std::optional<output_array>& grad_target) {
  constexpr std::string_view fn = "binary_cross_entropy_with_logits";
  softce::bce_options options;
  options.weight = in_view(weight, fn, "weight");
  options.pos_weight = in_view(pos_weight, fn, "pos_weight");
  options.reduce = softce::parse_reduction(reduction);
  const auto x = in_view(input, fn, "input");
  const auto t = in_view(target, fn, "target");
  const auto out = out_views(grad, losses, fn, grad_target);
  nb::gil_scoped_release release;
  return softce::binary_cross_entropy_with_logits(x, t, options, out);
}

// `dim`: the class dimension (None: the last one of a 1-d or 2-d input). The Python front
// moves the class dimension to 1 itself (a view) and passes dim=1 from 3 dimensions on.
softce::distillation_options distillation_options(double temperature,
                                                  std::string_view divergence, double beta,
                                                  std::string_view reduction,
                                                  const std::optional<input_array>& mask,
                                                  std::optional<int> dim) {
  softce::distillation_options options;
  options.dim = dim;
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
                         const std::optional<output_array>& losses,
                         std::optional<int> dim,
                         const std::optional<output_array>& grad_target) {
  constexpr std::string_view fn = "distillation_loss";
  const auto options = distillation_options(temperature, divergence, beta, reduction, mask, dim);
  const auto x = in_view(student, fn, "student_logits");
  const auto t = in_view(teacher, fn, "teacher");
  const auto out = out_views(grad, losses, fn, grad_target);
  nb::gil_scoped_release release;
  return softce::distillation_loss(x, t, options, out);
}

double distillation_loss_topk(const input_array& student, const input_array& indices,
                              const input_array& values, bool tail, double temperature,
                              std::string_view divergence, double beta,
                              std::string_view reduction,
                              const std::optional<input_array>& mask,
                              const std::optional<output_array>& grad,
                              const std::optional<output_array>& losses,
                         std::optional<int> dim) {
  constexpr std::string_view fn = "distillation_loss";
  const auto options = distillation_options(temperature, divergence, beta, reduction, mask, dim);
  const auto x = in_view(student, fn, "student_logits");
  const auto t = make_topk(indices, values, tail, fn, "teacher");
  const auto out = out_views(grad, losses, fn);
  nb::gil_scoped_release release;
  return softce::distillation_loss(x, t, options, out);
}

// ---------------------------------------------------------------------------------------
// class-parallel losses (torch.distributed through Python callables)

// The merge function crosses Python as a capsule with this name, so that merge_records
// accepts only what an all_reduce callback was given.
constexpr const char* kMergeCapsule = "softce.row_stats_merge_fn";

// A class_shard whose all_reduce calls `all_reduce(records, merge)` in Python: `records` is
// a float64 NumPy array (count, width) viewing the core's buffer (valid during the call
// only; the callable replaces its contents by the combination over all ranks) and `merge`
// the capsule of the core's merge function. The core calls it on the thread that called
// the loss, which released the GIL: take it back for the callable. A Python exception in
// the callable propagates through the core (nb::python_error) and out of the loss call.
softce::class_shard python_shard(std::int64_t class_offset, std::int64_t num_classes,
                                 nb::handle all_reduce) {
  softce::class_shard shard;
  shard.class_offset = class_offset;
  shard.num_classes = num_classes;
  // A borrowed handle: the caller's argument outlives the call, and copies of the
  // std::function (made without the GIL) must not touch reference counts.
  shard.all_reduce = [callable = all_reduce](
                         double* stats, std::int64_t count, int width,
                         softce::row_stats_merge_fn merge) {
    nb::gil_scoped_acquire gil;
    const std::size_t shape[2] = {static_cast<std::size_t>(count),
                                  static_cast<std::size_t>(width)};
    nb::ndarray<nb::numpy, double, nb::ndim<2>, nb::c_contig> records(stats, 2, shape,
                                                                      nb::handle());
    // A function pointer as void*: conditionally supported by C++, fine on every platform
    // CPython runs on (POSIX requires it for dlsym).
    nb::capsule capsule(reinterpret_cast<const void*>(merge), kMergeCapsule);
    // rv_policy::reference: a view of the core's buffer, not a copy (an ndarray without
    // an owner is copied under the default policy)
    callable(records.cast(nb::rv_policy::reference), capsule);
  };
  return shard;
}

// Combines the records of every rank: gathered (ranks, count, width), rank order, into
// out (count, width): out = gathered[0] (+) gathered[1] (+) ... with the core's merge
// function, left to right, so every rank computes the same bits from the same data.
using gathered_records = nb::ndarray<const double, nb::ndim<3>, nb::c_contig, nb::device::cpu>;
using merged_records = nb::ndarray<double, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

void merge_records(const gathered_records& gathered, const nb::capsule& merge,
                   const merged_records& out) {
  constexpr std::string_view fn = "merge_records";
  if (!PyCapsule_IsValid(merge.ptr(), kMergeCapsule))
    throw softce::error(std::string(fn) + ": merge: expected the capsule given to an all_reduce "
                        "callback", softce::error_kind::type);
  const auto merge_fn = reinterpret_cast<softce::row_stats_merge_fn>(merge.data(kMergeCapsule));
  const std::size_t ranks = gathered.shape(0), count = gathered.shape(1);
  const std::size_t width = gathered.shape(2);
  if (ranks == 0 || out.shape(0) != count || out.shape(1) != width)
    throw softce::error(std::string(fn) + ": expected gathered records (ranks, " +
                        std::to_string(out.shape(0)) + ", " + std::to_string(out.shape(1)) +
                        ") with ranks >= 1, got (" + std::to_string(ranks) + ", " +
                        std::to_string(count) + ", " + std::to_string(width) + ")");
  const double* in = gathered.data();
  double* result = out.data();  // a buffer of its own (the core's), not part of `gathered`
  const std::size_t block = count * width;
  nb::gil_scoped_release release;
  if (block == 0) return;
  std::memcpy(result, in, block * sizeof(double));
  for (std::size_t r = 1; r < ranks; ++r)
    merge_fn(result, in + r * block, static_cast<std::int64_t>(count));
}

double class_parallel_cross_entropy(std::int64_t class_offset, std::int64_t num_classes,
                                    nb::callable all_reduce, const input_array& input,
                                    const input_array& target,
                                    const std::optional<input_array>& weight,
                                    std::int64_t ignore_index, std::string_view reduction,
                                    double label_smoothing,
                                    const std::optional<input_array>& mask,
                                    const std::optional<output_array>& grad,
                                    const std::optional<output_array>& losses) {
  constexpr std::string_view fn = "cross_entropy";
  const auto shard = python_shard(class_offset, num_classes, all_reduce);
  const auto options = cross_entropy_options(weight, ignore_index, reduction, label_smoothing, mask);
  const auto x = in_view(input, fn, "input");
  const auto t = in_view(target, fn, "target");
  const auto out = out_views(grad, losses, fn);
  nb::gil_scoped_release release;
  return softce::class_parallel::cross_entropy(shard, x, t, options, out);
}

double class_parallel_cross_entropy_topk(std::int64_t class_offset, std::int64_t num_classes,
                                         nb::callable all_reduce, const input_array& input,
                                         const input_array& indices, const input_array& values,
                                         bool tail, const std::optional<input_array>& weight,
                                         std::int64_t ignore_index, std::string_view reduction,
                                         double label_smoothing,
                                         const std::optional<input_array>& mask,
                                         const std::optional<output_array>& grad,
                                         const std::optional<output_array>& losses) {
  constexpr std::string_view fn = "cross_entropy";
  const auto shard = python_shard(class_offset, num_classes, all_reduce);
  const auto options = cross_entropy_options(weight, ignore_index, reduction, label_smoothing, mask);
  const auto x = in_view(input, fn, "input");
  const auto t = make_topk(indices, values, tail, fn, "target");
  const auto out = out_views(grad, losses, fn);
  nb::gil_scoped_release release;
  return softce::class_parallel::cross_entropy(shard, x, t, options, out);
}

double class_parallel_distillation_loss(std::int64_t class_offset, std::int64_t num_classes,
                                        nb::callable all_reduce, const input_array& student,
                                        const input_array& teacher, double temperature,
                                        std::string_view divergence, double beta,
                                        std::string_view reduction,
                                        const std::optional<input_array>& mask,
                                        const std::optional<output_array>& grad,
                                        const std::optional<output_array>& losses,
                         std::optional<int> dim) {
  constexpr std::string_view fn = "distillation_loss";
  const auto shard = python_shard(class_offset, num_classes, all_reduce);
  const auto options = distillation_options(temperature, divergence, beta, reduction, mask, dim);
  const auto x = in_view(student, fn, "student_logits");
  const auto t = in_view(teacher, fn, "teacher");
  const auto out = out_views(grad, losses, fn);
  nb::gil_scoped_release release;
  return softce::class_parallel::distillation_loss(shard, x, t, options, out);
}

double class_parallel_distillation_loss_topk(std::int64_t class_offset, std::int64_t num_classes,
                                             nb::callable all_reduce, const input_array& student,
                                             const input_array& indices,
                                             const input_array& values, bool tail,
                                             double temperature, std::string_view divergence,
                                             double beta, std::string_view reduction,
                                             const std::optional<input_array>& mask,
                                             const std::optional<output_array>& grad,
                                             const std::optional<output_array>& losses,
                         std::optional<int> dim) {
  constexpr std::string_view fn = "distillation_loss";
  const auto shard = python_shard(class_offset, num_classes, all_reduce);
  const auto options = distillation_options(temperature, divergence, beta, reduction, mask, dim);
  const auto x = in_view(student, fn, "student_logits");
  const auto t = make_topk(indices, values, tail, fn, "teacher");
  const auto out = out_views(grad, losses, fn);
  nb::gil_scoped_release release;
  return softce::class_parallel::distillation_loss(shard, x, t, options, out);
}

}  // namespace

void bind_aggregate(nb::module_& m);  // aggregate_bindings.cpp
void bind_agreement(nb::module_& m);  // agreement_bindings.cpp
void bind_linear(nb::module_& m);     // linear_bindings.cpp
NB_MODULE(_core, m) {
  m.doc() = "softce C++ core (nanobind bindings); use the softce package instead.";
  m.attr("version") = SOFTCE_VERSION;  // CMakeLists.txt's project() version

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
        "losses"_a.noconvert().none(), "grad_target"_a.noconvert().none() = nb::none());
  m.def("cross_entropy_topk", &cross_entropy_topk, "input"_a.noconvert(),
        "indices"_a.noconvert(), "values"_a.noconvert(), "tail"_a,
        "weight"_a.noconvert().none(), "ignore_index"_a, "reduction"_a, "label_smoothing"_a,
        "mask"_a.noconvert().none(), "grad"_a.noconvert().none(),
        "losses"_a.noconvert().none());
  m.def("cross_entropy_with_probs", &cross_entropy_with_probs, "input"_a.noconvert(),
        "target"_a.noconvert(), "weight"_a.noconvert().none(), "reduction"_a,
        "grad"_a.noconvert().none(), "losses"_a.noconvert().none(),
        "grad_target"_a.noconvert().none() = nb::none());
  m.def("kl_div", &kl_div, "input"_a.noconvert(), "target"_a.noconvert(), "reduction"_a,
        "log_target"_a, "grad"_a.noconvert().none(), "losses"_a.noconvert().none(),
        "grad_target"_a.noconvert().none() = nb::none());
  m.def("binary_cross_entropy_with_logits", &binary_cross_entropy_with_logits,
        "input"_a.noconvert(), "target"_a.noconvert(), "weight"_a.noconvert().none(),
        "pos_weight"_a.noconvert().none(), "reduction"_a, "grad"_a.noconvert().none(),
        "losses"_a.noconvert().none(), "grad_target"_a.noconvert().none() = nb::none());
  m.def("distillation_loss", &distillation_loss, "student_logits"_a.noconvert(),
        "teacher"_a.noconvert(), "temperature"_a, "divergence"_a, "beta"_a, "reduction"_a,
        "mask"_a.noconvert().none(), "grad"_a.noconvert().none(),
        "losses"_a.noconvert().none(), "dim"_a.none() = nb::none(),
        "grad_target"_a.noconvert().none() = nb::none());
  m.def("distillation_loss_topk", &distillation_loss_topk, "student_logits"_a.noconvert(),
        "indices"_a.noconvert(), "values"_a.noconvert(), "tail"_a, "temperature"_a,
        "divergence"_a, "beta"_a, "reduction"_a, "mask"_a.noconvert().none(),
        "grad"_a.noconvert().none(), "losses"_a.noconvert().none(), "dim"_a.none() = nb::none());

  // class-parallel: the same arguments after (class_offset, num_classes, all_reduce)
  m.def("class_parallel_cross_entropy", &class_parallel_cross_entropy, "class_offset"_a,
        "num_classes"_a, "all_reduce"_a, "input"_a.noconvert(), "target"_a.noconvert(),
        "weight"_a.noconvert().none(), "ignore_index"_a, "reduction"_a, "label_smoothing"_a,
        "mask"_a.noconvert().none(), "grad"_a.noconvert().none(),
        "losses"_a.noconvert().none());
  m.def("class_parallel_cross_entropy_topk", &class_parallel_cross_entropy_topk,
        "class_offset"_a, "num_classes"_a, "all_reduce"_a, "input"_a.noconvert(),
        "indices"_a.noconvert(), "values"_a.noconvert(), "tail"_a,
        "weight"_a.noconvert().none(), "ignore_index"_a, "reduction"_a, "label_smoothing"_a,
        "mask"_a.noconvert().none(), "grad"_a.noconvert().none(),
        "losses"_a.noconvert().none());
  m.def("class_parallel_distillation_loss", &class_parallel_distillation_loss,
        "class_offset"_a, "num_classes"_a, "all_reduce"_a, "student_logits"_a.noconvert(),
        "teacher"_a.noconvert(), "temperature"_a, "divergence"_a, "beta"_a, "reduction"_a,
        "mask"_a.noconvert().none(), "grad"_a.noconvert().none(),
        "losses"_a.noconvert().none(), "dim"_a.none() = nb::none());
  m.def("class_parallel_distillation_loss_topk", &class_parallel_distillation_loss_topk,
        "class_offset"_a, "num_classes"_a, "all_reduce"_a, "student_logits"_a.noconvert(),
        "indices"_a.noconvert(), "values"_a.noconvert(), "tail"_a, "temperature"_a,
        "divergence"_a, "beta"_a, "reduction"_a, "mask"_a.noconvert().none(),
        "grad"_a.noconvert().none(), "losses"_a.noconvert().none(), "dim"_a.none() = nb::none());
  m.def("merge_records", &merge_records, "gathered"_a.noconvert(), "merge"_a,
        "out"_a.noconvert());

  m.def("parse_reduction", [](std::string_view name) {
    return std::string(softce::reduction_name(softce::parse_reduction(name)));
  });
  m.def("parse_divergence", [](std::string_view name) {
    return std::string(softce::divergence_name(softce::parse_divergence(name)));
  });
  m.def("set_num_threads", &softce::set_num_threads, "threads"_a);
  m.def("get_num_threads", &softce::get_num_threads);
  m.def("simd_target", &softce::simd_target);
  bind_aggregate(m);
  bind_agreement(m);
  bind_linear(m);
}
