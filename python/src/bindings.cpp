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

#include "views.hpp"

#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using namespace softce_py;

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
// class-parallel support (torch.distributed through Python callables)

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

// ---------------------------------------------------------------------------------------
// the losses: one description per loss (its own arguments, bound once; the options struct
// they make; the core functions), from which def_loss makes every entry point
//   <name>(input, target, *args, grad, losses[, dim], grad_target=None)
//   <name>_topk(input, indices, values, tail, *args, grad, losses[, dim])
//   class_parallel_<name>[_topk](class_offset, num_classes, all_reduce, <the same>)
// `args` are the loss's own arguments in the order of softce/_common.py's schema. Each
// returns the (reduced) loss as a Python float.

template <class... T>
struct type_list {};

using optional_array = std::optional<input_array>;
using optional_output = std::optional<output_array>;

struct cross_entropy_loss {
  static constexpr const char* name = "cross_entropy";
  static constexpr const char* input = "input";
  static constexpr const char* target = "target";
  static constexpr bool topk = true, class_parallel = true;
  using arg_types = type_list<optional_array, std::int64_t, std::string_view, double, optional_array>;
  using dim_types = type_list<>;
  static auto arg_names() {
    return std::make_tuple("weight"_a.noconvert().none(), "ignore_index"_a, "reduction"_a,
                           "label_smoothing"_a, "mask"_a.noconvert().none());
  }
  static softce::cross_entropy_options options(const optional_array& weight,
                                               std::int64_t ignore_index,
                                               std::string_view reduction,
                                               double label_smoothing,
                                               const optional_array& mask) {
    softce::cross_entropy_options options;
    options.weight = in_view(weight, name, "weight");
    options.ignore_index = ignore_index;
    options.reduce = softce::parse_reduction(reduction);
    options.label_smoothing = label_smoothing;
    options.mask = in_view(mask, name, "mask");
    return options;
  }
  template <class Target>
  static double run(const softce::array_view& x, const Target& t,
                    const softce::cross_entropy_options& o, const softce::outputs& out) {
    return softce::cross_entropy(x, t, o, out);
  }
  template <class Target>
  static double run(const softce::class_shard& shard, const softce::array_view& x,
                    const Target& t, const softce::cross_entropy_options& o,
                    const softce::outputs& out) {
    return softce::class_parallel::cross_entropy(shard, x, t, o, out);
  }
};

struct cross_entropy_with_probs_loss {
  static constexpr const char* name = "cross_entropy_with_probs";
  static constexpr const char* input = "input";
  static constexpr const char* target = "target";
  static constexpr bool topk = false, class_parallel = false;
  using arg_types = type_list<optional_array, std::string_view>;
  using dim_types = type_list<>;
  static auto arg_names() {
    return std::make_tuple("weight"_a.noconvert().none(), "reduction"_a);
  }
  struct options_type {  // the core function takes these two as arguments
    softce::reduction reduce;
    std::optional<softce::array_view> weight;
  };
  static options_type options(const optional_array& weight, std::string_view reduction) {
    options_type options;
    options.reduce = softce::parse_reduction(reduction);
    options.weight = in_view(weight, name, "weight");
    return options;
  }
  static double run(const softce::array_view& x, const softce::array_view& t,
                    const options_type& o, const softce::outputs& out) {
    return softce::cross_entropy_with_probs(x, t, o.weight, o.reduce, out);
  }
};

struct kl_div_loss {
  static constexpr const char* name = "kl_div";
  static constexpr const char* input = "input";
  static constexpr const char* target = "target";
  static constexpr bool topk = false, class_parallel = false;
  using arg_types = type_list<std::string_view, bool>;
  using dim_types = type_list<>;
  static auto arg_names() { return std::make_tuple("reduction"_a, "log_target"_a); }
  static softce::kl_div_options options(std::string_view reduction, bool log_target) {
    softce::kl_div_options options;
    options.reduce = softce::parse_reduction(reduction);
    options.log_target = log_target;
    return options;
  }
  static double run(const softce::array_view& x, const softce::array_view& t,
                    const softce::kl_div_options& o, const softce::outputs& out) {
    return softce::kl_div(x, t, o, out);
  }
};

struct bce_loss {
  static constexpr const char* name = "binary_cross_entropy_with_logits";
  static constexpr const char* input = "input";
  static constexpr const char* target = "target";
  static constexpr bool topk = false, class_parallel = false;
  using arg_types = type_list<optional_array, optional_array, std::string_view>;
  using dim_types = type_list<>;
  static auto arg_names() {
    return std::make_tuple("weight"_a.noconvert().none(), "pos_weight"_a.noconvert().none(),
                           "reduction"_a);
  }
  static softce::bce_options options(const optional_array& weight,
                                     const optional_array& pos_weight,
                                     std::string_view reduction) {
    softce::bce_options options;
    options.weight = in_view(weight, name, "weight");
    options.pos_weight = in_view(pos_weight, name, "pos_weight");
    options.reduce = softce::parse_reduction(reduction);
    return options;
  }
  static double run(const softce::array_view& x, const softce::array_view& t,
                    const softce::bce_options& o, const softce::outputs& out) {
    return softce::binary_cross_entropy_with_logits(x, t, o, out);
  }
};

// `dim`: the class dimension (None: the last one of a 1-d or 2-d input). The Python front
// moves the class dimension to 1 itself (a view) and passes dim=1 from 3 dimensions on.
struct distillation_loss_desc {
  static constexpr const char* name = "distillation_loss";
  static constexpr const char* input = "student_logits";
  static constexpr const char* target = "teacher";
  static constexpr bool topk = true, class_parallel = true;
  using arg_types = type_list<double, std::string_view, double, std::string_view, optional_array>;
  using dim_types = type_list<std::optional<int>>;
  static auto arg_names() {
    return std::make_tuple("temperature"_a, "divergence"_a, "beta"_a, "reduction"_a,
                           "mask"_a.noconvert().none());
  }
  static softce::distillation_options options(double temperature, std::string_view divergence,
                                              double beta, std::string_view reduction,
                                              const optional_array& mask,
                                              std::optional<int> dim) {
    softce::distillation_options options;
    options.dim = dim;
    options.temperature = temperature;
    options.kind = softce::parse_divergence(divergence);
    options.beta = beta;
    options.reduce = softce::parse_reduction(reduction);
    options.mask = in_view(mask, name, "mask");
    return options;
  }
  template <class Target>
  static double run(const softce::array_view& x, const Target& t,
                    const softce::distillation_options& o, const softce::outputs& out) {
    return softce::distillation_loss(x, t, o, out);
  }
  template <class Target>
  static double run(const softce::class_shard& shard, const softce::array_view& x,
                    const Target& t, const softce::distillation_options& o,
                    const softce::outputs& out) {
    return softce::class_parallel::distillation_loss(shard, x, t, o, out);
  }
};

// The entry points of Loss: Args are its own arguments, Dim its trailing dim (or nothing).
template <class Loss, class Args = typename Loss::arg_types, class Dim = typename Loss::dim_types>
struct entries;

template <class Loss, class... Args, class... Dim>
struct entries<Loss, type_list<Args...>, type_list<Dim...>> {
  static double dense(const input_array& input, const input_array& target, Args... args,
                      const optional_output& grad, const optional_output& losses, Dim... dim,
                      const optional_output& grad_target) {
    const auto options = Loss::options(args..., dim...);
    const auto x = in_view(input, Loss::name, Loss::input);
    const auto t = in_view(target, Loss::name, Loss::target);
    const auto out = out_views(grad, losses, Loss::name, grad_target);
    nb::gil_scoped_release release;
    return Loss::run(x, t, options, out);
  }
  static double topk(const input_array& input, const input_array& indices,
                     const input_array& values, bool tail, Args... args,
                     const optional_output& grad, const optional_output& losses, Dim... dim) {
    const auto options = Loss::options(args..., dim...);
    const auto x = in_view(input, Loss::name, Loss::input);
    const auto t = make_topk(indices, values, tail, Loss::name, Loss::target);
    const auto out = out_views(grad, losses, Loss::name);
    nb::gil_scoped_release release;
    return Loss::run(x, t, options, out);
  }
  static double parallel_dense(std::int64_t class_offset, std::int64_t num_classes,
                               nb::callable all_reduce, const input_array& input,
                               const input_array& target, Args... args,
                               const optional_output& grad, const optional_output& losses,
                               Dim... dim) {
    const auto shard = python_shard(class_offset, num_classes, all_reduce);
    const auto options = Loss::options(args..., dim...);
    const auto x = in_view(input, Loss::name, Loss::input);
    const auto t = in_view(target, Loss::name, Loss::target);
    const auto out = out_views(grad, losses, Loss::name);
    nb::gil_scoped_release release;
    return Loss::run(shard, x, t, options, out);
  }
  static double parallel_topk(std::int64_t class_offset, std::int64_t num_classes,
                              nb::callable all_reduce, const input_array& input,
                              const input_array& indices, const input_array& values,
                              bool tail, Args... args, const optional_output& grad,
                              const optional_output& losses, Dim... dim) {
    const auto shard = python_shard(class_offset, num_classes, all_reduce);
    const auto options = Loss::options(args..., dim...);
    const auto x = in_view(input, Loss::name, Loss::input);
    const auto t = make_topk(indices, values, tail, Loss::name, Loss::target);
    const auto out = out_views(grad, losses, Loss::name);
    nb::gil_scoped_release release;
    return Loss::run(shard, x, t, options, out);
  }
};

// m.def(name, function, <the argument annotations of the tuples, in order>)
template <class Function, class... Tuples>
void def_with(nb::module_& m, const std::string& name, Function function, Tuples... parts) {
  std::apply([&](auto... a) { m.def(name.c_str(), function, a...); },
             std::tuple_cat(parts...));
}

// Arrays must not be converted (copied) by nanobind: noconvert on every array argument.
template <class Loss>
void def_loss(nb::module_& m) {
  using E = entries<Loss>;
  const std::string name = Loss::name;
  const auto dense = std::make_tuple(nb::arg(Loss::input).noconvert(),
                                     nb::arg(Loss::target).noconvert());
  const auto topk = std::make_tuple(nb::arg(Loss::input).noconvert(), "indices"_a.noconvert(),
                                    "values"_a.noconvert(), "tail"_a);
  const auto outputs = std::make_tuple("grad"_a.noconvert().none(), "losses"_a.noconvert().none());
  const auto dim = [] {
    if constexpr (std::is_same_v<typename Loss::dim_types, type_list<>>) return std::tuple<>();
    else return std::make_tuple("dim"_a.none() = nb::none());
  }();
  const auto grad_target = std::make_tuple("grad_target"_a.noconvert().none() = nb::none());
  const auto shard = std::make_tuple("class_offset"_a, "num_classes"_a, "all_reduce"_a);
  def_with(m, name, &E::dense, dense, Loss::arg_names(), outputs, dim, grad_target);
  if constexpr (Loss::topk)
    def_with(m, name + "_topk", &E::topk, topk, Loss::arg_names(), outputs, dim);
  if constexpr (Loss::class_parallel) {
    // the same arguments after (class_offset, num_classes, all_reduce)
    def_with(m, "class_parallel_" + name, &E::parallel_dense, shard, dense, Loss::arg_names(),
             outputs, dim);
    if constexpr (Loss::topk)
      def_with(m, "class_parallel_" + name + "_topk", &E::parallel_topk, shard, topk,
               Loss::arg_names(), outputs, dim);
  }
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

  def_loss<cross_entropy_loss>(m);
  def_loss<cross_entropy_with_probs_loss>(m);
  def_loss<kl_div_loss>(m);
  def_loss<bce_loss>(m);
  def_loss<distillation_loss_desc>(m);
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
