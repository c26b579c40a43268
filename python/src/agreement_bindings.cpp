// Python bindings of the cross-rank agreement protocol (class_parallel.hpp: transport,
// describe, run, shard_from_local_classes), used by softce/distributed.py. The protocol
// itself (the facts, the fingerprint, the comparisons and their messages) is the core's, the
// same code softce::mpi runs; this file only adapts:
//  - a Python transport object (rank, size, all_gather, broadcast, all_reduce; distributed.py
//    implements it on torch.distributed) to class_parallel::transport;
//  - a Python exception to a local_failure (message and code) and back: codes 0..2 are
//    softce's error kinds (ValueError, IndexError, TypeError), 3 NotImplementedError and 4
//    any other exception (RuntimeError on the other ranks);
//  - the core call made in Python (a class_parallel_* binding taking an all_reduce callable)
//    to the core function `run` expects.
// Everything here runs with the GIL held, apart from the core call inside `run`, which
// releases it and takes it back for its all_reduce callback.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/string_view.h>

#include <softce/class_parallel.hpp>

#include "views.hpp"

#include <cstring>
#include <optional>
#include <string>
#include <utility>

namespace nb = nanobind;
using namespace nb::literals;

namespace {

namespace cp = softce::class_parallel;

// The name bindings.cpp gives the capsule of the core's merge function (kMergeCapsule there).
constexpr const char* kMergeCapsule = "softce.row_stats_merge_fn";

constexpr std::int64_t kNotImplementedCode = 3, kOtherCode = 4;

using any_array = nb::ndarray<nb::ro>;

// The softce dtype of a DLPack dtype; another dtype becomes an invalid value, which is never
// read: the facts of a call are read only after the core accepted the same arrays.
softce::dtype to_dtype(nb::dlpack::dtype t) {
  return softce_py::to_softce_dtype(t).value_or(static_cast<softce::dtype>(255));
}

// Never throws (see to_dtype): more than max_dims dimensions give an empty view.
softce::array_view view_of(const any_array& a) {
  softce::array_view v;
  v.data = a.data();
  v.type = to_dtype(a.dtype());
  if (a.ndim() > static_cast<std::size_t>(softce::max_dims)) return v;
  v.ndim = static_cast<int>(a.ndim());
  for (int i = 0; i < v.ndim; ++i) {
    v.shape[i] = static_cast<std::int64_t>(a.shape(static_cast<std::size_t>(i)));
    v.strides[i] = a.stride(static_cast<std::size_t>(i));
  }
  return v;
}
std::optional<softce::array_view> view_of(const std::optional<any_array>& a) {
  if (!a) return std::nullopt;
  return view_of(*a);
}

// Option names parsed without throwing: a bad name is the core's error to raise, inside run.
softce::reduction reduction_or_default(std::string_view name) {
  try {
    return softce::parse_reduction(name);
  } catch (const softce::error&) {
    return softce::reduction::mean;
  }
}
softce::divergence divergence_or_default(std::string_view name) {
  try {
    return softce::parse_divergence(name);
  } catch (const softce::error&) {
    return softce::divergence::kl;
  }
}

// One described call: the description and the arrays it views (kept alive here).
struct agreement_call {
  std::string function;  // the description's string_view points here
  cp::call_description description;
  std::optional<any_array> input, target, indices, values, weight, mask;
  std::optional<any_array> layer_weight, teacher_hidden;  // the linear calls
};

void set_common(agreement_call& c, std::string function, const any_array& input,
                const std::optional<any_array>& mask) {
  c.function = std::move(function);
  c.input = input;
  c.mask = mask;
}

agreement_call* describe_cross_entropy(std::string function, const any_array& input,
                                       const any_array& target,
                                       const std::optional<any_array>& values, bool tail,
                                       const std::optional<any_array>& weight,
                                       std::int64_t ignore_index, std::string_view reduction,
                                       double label_smoothing,
                                       const std::optional<any_array>& mask) {
  auto* c = new agreement_call;
  set_common(*c, std::move(function), input, mask);
  c->weight = weight;
  softce::cross_entropy_options o;
  o.weight = view_of(weight);
  o.ignore_index = ignore_index;
  o.reduce = reduction_or_default(reduction);
  o.label_smoothing = label_smoothing;
  o.mask = view_of(mask);
  if (values) {
    c->indices = target;
    c->values = values;
    const softce::topk t{view_of(target), view_of(*values), tail};
    c->description = cp::describe(c->function, 0, 0, view_of(input), t, o);
  } else {
    c->target = target;
    c->description = cp::describe(c->function, 0, 0, view_of(input),
                                  view_of(target), o);
  }
  return c;
}

agreement_call* describe_distillation(std::string function, const any_array& student,
                                      const any_array& teacher,
                                      const std::optional<any_array>& values, bool tail,
                                      double temperature, std::string_view divergence,
                                      double beta, std::string_view reduction,
                                      const std::optional<any_array>& mask,
                                      std::optional<int> dim) {
  auto* c = new agreement_call;
  set_common(*c, std::move(function), student, mask);
  softce::distillation_options o;
  o.temperature = temperature;
  o.kind = divergence_or_default(divergence);
  o.beta = beta;
  o.reduce = reduction_or_default(reduction);
  o.mask = view_of(mask);
  o.dim = dim;
  if (values) {
    c->indices = teacher;
    c->values = values;
    const softce::topk t{view_of(teacher), view_of(*values), tail};
    c->description = cp::describe(c->function, 0, 0, view_of(student), t, o);
  } else {
    c->target = teacher;
    c->description = cp::describe(c->function, 0, 0, view_of(student),
                                  view_of(teacher), o);
  }
  return c;
}

// The fused output layer (linear calls): `input` is the hidden states, `layer_weight` this
// rank's rows; `grad_hidden`: whether the call computes grad_hidden (a collective of its own).
softce::linear_options budget_of(std::optional<std::int64_t> memory_budget) {
  softce::linear_options lo;
  if (memory_budget && *memory_budget >= 0) lo.memory_budget = static_cast<std::size_t>(*memory_budget);
  return lo;
}

softce::linear_outputs grad_hidden_of(bool grad_hidden) {
  softce::linear_outputs out;
  if (grad_hidden) out.grad_hidden = softce::mutable_array_view{};  // only its presence is read
  return out;
}

agreement_call* describe_linear_cross_entropy(std::string function, const any_array& hidden, const any_array& weight,
                                              const std::optional<any_array>& bias, const any_array& target,
                                              const std::optional<any_array>& values, bool tail,
                                              const std::optional<any_array>& class_weight, std::int64_t ignore_index,
                                              std::string_view reduction, double label_smoothing,
                                              const std::optional<any_array>& mask,
                                              std::optional<std::int64_t> memory_budget, bool grad_hidden) {
  auto* c = new agreement_call;
  set_common(*c, std::move(function), hidden, mask);
  c->layer_weight = weight;
  c->weight = class_weight;
  softce::cross_entropy_options o;
  o.weight = view_of(class_weight);
  o.ignore_index = ignore_index;
  o.reduce = reduction_or_default(reduction);
  o.label_smoothing = label_smoothing;
  o.mask = view_of(mask);
  std::optional<softce::array_view> b;
  if (bias) b = view_of(*bias);
  const auto lo = budget_of(memory_budget);
  const auto out = grad_hidden_of(grad_hidden);
  if (values) {
    c->indices = target;
    c->values = values;
    const softce::topk t{view_of(target), view_of(*values), tail};
    c->description = cp::describe_linear(c->function, 0, 0, view_of(hidden), view_of(weight), b, t, o, lo, out);
  } else {
    c->target = target;
    c->description =
        cp::describe_linear(c->function, 0, 0, view_of(hidden), view_of(weight), b, view_of(target), o, lo, out);
  }
  return c;
}

agreement_call* describe_linear_distillation(std::string function, const any_array& hidden, const any_array& weight,
                                             const std::optional<any_array>& bias, const any_array& teacher,
                                             const std::optional<any_array>& values, bool tail,
                                             const std::optional<any_array>& teacher_weight,
                                             const std::optional<any_array>& teacher_bias, double temperature,
                                             std::string_view divergence, double beta, std::string_view reduction,
                                             const std::optional<any_array>& mask,
                                             std::optional<std::int64_t> memory_budget, bool grad_hidden) {
  auto* c = new agreement_call;
  set_common(*c, std::move(function), hidden, mask);
  c->layer_weight = weight;
  softce::distillation_options o;
  o.temperature = temperature;
  o.kind = divergence_or_default(divergence);
  o.beta = beta;
  o.reduce = reduction_or_default(reduction);
  o.mask = view_of(mask);
  std::optional<softce::array_view> b;
  if (bias) b = view_of(*bias);
  const auto lo = budget_of(memory_budget);
  const auto out = grad_hidden_of(grad_hidden);
  if (teacher_weight) {
    c->teacher_hidden = teacher;
    c->target = teacher_weight;  // kept alive; not compared (per shard)
    c->values = teacher_bias;
    const softce::linear_teacher t{view_of(teacher), view_of(*teacher_weight), view_of(teacher_bias)};
    c->description = cp::describe_linear(c->function, 0, 0, view_of(hidden), view_of(weight), b, t, o, lo, out);
  } else if (values) {
    c->indices = teacher;
    c->values = values;
    const softce::topk t{view_of(teacher), view_of(*values), tail};
    c->description = cp::describe_linear(c->function, 0, 0, view_of(hidden), view_of(weight), b, t, o, lo, out);
  } else {
    c->target = teacher;
    c->description =
        cp::describe_linear(c->function, 0, 0, view_of(hidden), view_of(weight), b, view_of(teacher), o, lo, out);
  }
  return c;
}

// ---------------------------------------------------------------------------------------
// exceptions

std::int64_t python_code(nb::handle type) {
  if (PyErr_GivenExceptionMatches(type.ptr(), PyExc_ValueError)) return cp::failure_code(softce::error_kind::value);
  if (PyErr_GivenExceptionMatches(type.ptr(), PyExc_IndexError)) return cp::failure_code(softce::error_kind::index);
  if (PyErr_GivenExceptionMatches(type.ptr(), PyExc_TypeError)) return cp::failure_code(softce::error_kind::type);
  if (PyErr_GivenExceptionMatches(type.ptr(), PyExc_NotImplementedError)) return kNotImplementedCode;
  return kOtherCode;
}

PyObject* python_type(std::int64_t code) {
  switch (code) {
    case 0: return PyExc_ValueError;
    case 1: return PyExc_IndexError;
    case 2: return PyExc_TypeError;
    case kNotImplementedCode: return PyExc_NotImplementedError;
    default: return PyExc_RuntimeError;
  }
}

cp::local_failure failure_of(nb::handle exception) {
  return {nb::str(exception).c_str(), python_code(exception.type())};
}

cp::local_failure describe_failure(const std::exception& e) {
  if (const auto* python = dynamic_cast<const nb::python_error*>(&e)) return failure_of(python->value());
  const auto* softce_error = dynamic_cast<const softce::error*>(&e);
  return {e.what(), softce_error ? cp::failure_code(softce_error->kind()) : kOtherCode};
}

// ---------------------------------------------------------------------------------------
// the transport

using int64_vector = nb::ndarray<nb::numpy, std::int64_t, nb::ndim<1>, nb::c_contig>;
using byte_vector = nb::ndarray<nb::numpy, std::uint8_t, nb::ndim<1>, nb::c_contig>;
using gathered_int64 = nb::ndarray<const std::int64_t, nb::c_contig, nb::device::cpu>;

// Views of the core's buffers are handed to Python for the duration of one call
// (rv_policy::reference: an ndarray without an owner would be copied otherwise).
template <class T>
nb::object numpy_view(T* data, std::int64_t count) {
  const std::size_t shape[1] = {static_cast<std::size_t>(count)};
  return nb::ndarray<nb::numpy, T, nb::ndim<1>, nb::c_contig>(data, 1, shape, nb::handle())
      .cast(nb::rv_policy::reference);
}

// A borrowed handle: `object` outlives every use (the binding call that made the transport).
cp::transport python_transport(nb::handle object) {
  cp::transport t;
  t.rank = nb::cast<int>(object.attr("rank"));
  t.size = nb::cast<int>(object.attr("size"));
  t.all_gather = [object, size = t.size](const std::int64_t* mine, std::int64_t count, std::int64_t* all) {
    nb::object result = object.attr("all_gather")(numpy_view(const_cast<std::int64_t*>(mine), count));
    const auto gathered = nb::cast<gathered_int64>(result);
    if (gathered.size() != static_cast<std::size_t>(size * count))
      throw softce::error("agreement: transport.all_gather: expected " + std::to_string(size * count) +
                          " int64 values, got " + std::to_string(gathered.size()));
    std::memcpy(all, gathered.data(), static_cast<std::size_t>(size * count) * sizeof(std::int64_t));
  };
  t.broadcast = [object](char* bytes, std::int64_t count, int root) {
    object.attr("broadcast")(numpy_view(reinterpret_cast<std::uint8_t*>(bytes), count), root);
  };
  // the commutative form (transport.mode 1): built-in MAX / SUM all-reduces of float64 vectors
  if (nb::hasattr(object, "mode") && nb::cast<std::int64_t>(object.attr("mode")) == 1) {
    t.mode = cp::reduce_mode::commutative;
    t.all_reduce_max = [object](double* values, std::int64_t count) {
      object.attr("all_reduce_max")(numpy_view(values, count));
    };
    t.all_reduce_sum = [object](double* values, std::int64_t count) {
      object.attr("all_reduce_sum")(numpy_view(values, count));
    };
  }
  t.all_reduce = [object](double* records, std::int64_t count, int width, softce::row_stats_merge_fn merge) {
    const std::size_t shape[2] = {static_cast<std::size_t>(count), static_cast<std::size_t>(width)};
    nb::ndarray<nb::numpy, double, nb::ndim<2>, nb::c_contig> view(records, 2, shape, nb::handle());
    nb::capsule capsule(reinterpret_cast<const void*>(merge), kMergeCapsule);
    object.attr("all_reduce")(view.cast(nb::rv_policy::reference), capsule);
  };
  return t;
}

// ---------------------------------------------------------------------------------------
// the entry points

using records_array = nb::ndarray<double, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

// run(transport, call, class_offset, num_classes, core): core(all_reduce) makes the core call
// with `all_reduce` as its callback (the class_parallel_* bindings' argument) and returns the
// loss. The call is described before the shard is known (see distributed.py), so the shard
// comes here.
double agreed_run(nb::handle transport, const agreement_call& call, std::int64_t class_offset,
                  std::int64_t num_classes, nb::callable core) {
  const cp::transport t = python_transport(transport);
  cp::call_description description = call.description;
  description.class_offset = class_offset;
  description.num_classes = num_classes;
  return cp::run(
      t, description,
      [&](const softce::class_shard& shard) {
        // The core's callback, seen from Python: to the shard's all_reduce (agreement first).
        nb::object all_reduce = nb::cpp_function([&shard](records_array records, nb::capsule merge) {
          if (!PyCapsule_IsValid(merge.ptr(), kMergeCapsule))
            throw softce::error("all_reduce: merge: expected the capsule given to an all_reduce callback",
                                softce::error_kind::type);
          const auto fn = reinterpret_cast<softce::row_stats_merge_fn>(merge.data(kMergeCapsule));
          shard.all_reduce(records.data(), static_cast<std::int64_t>(records.shape(0)),
                           static_cast<int>(records.shape(1)), fn);
        });
        return nb::cast<double>(core(all_reduce));
      },
      describe_failure);
}

std::pair<std::int64_t, std::int64_t> shard_from_local_classes(nb::handle transport, std::string_view function,
                                                               std::int64_t local_classes,
                                                               std::optional<nb::object> failure) {
  const cp::transport t = python_transport(transport);
  std::optional<cp::local_failure> mine;
  if (failure && !failure->is_none()) mine = failure_of(*failure);
  const auto range = cp::shard_from_local_classes(t, function, local_classes, mine ? &*mine : nullptr);
  return {range.class_offset, range.num_classes};
}

}  // namespace

void bind_agreement(nb::module_& m) {
  // A rank told of another rank's failure raises that rank's exception type.
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const cp::shard_failure& e) {
      PyErr_SetString(python_type(e.code()), e.what());
    }
  });

  nb::class_<agreement_call>(m, "AgreementCall");
  m.def("agreement_describe_cross_entropy", &describe_cross_entropy, "function"_a, "input"_a.noconvert(), "target"_a.noconvert(), "values"_a.noconvert().none(),
        "tail"_a, "weight"_a.noconvert().none(), "ignore_index"_a, "reduction"_a, "label_smoothing"_a,
        "mask"_a.noconvert().none(), nb::rv_policy::take_ownership);
  m.def("agreement_describe_distillation", &describe_distillation, "function"_a, "student_logits"_a.noconvert(), "teacher"_a.noconvert(),
        "values"_a.noconvert().none(), "tail"_a, "temperature"_a, "divergence"_a, "beta"_a,
        "reduction"_a, "mask"_a.noconvert().none(), "dim"_a.none(), nb::rv_policy::take_ownership);
  m.def("agreement_describe_linear_cross_entropy", &describe_linear_cross_entropy, "function"_a,
        "hidden"_a.noconvert(), "weight"_a.noconvert(), "bias"_a.noconvert().none(), "target"_a.noconvert(),
        "values"_a.noconvert().none(), "tail"_a, "class_weight"_a.noconvert().none(), "ignore_index"_a,
        "reduction"_a, "label_smoothing"_a, "mask"_a.noconvert().none(), "memory_budget"_a.none(),
        "grad_hidden"_a, nb::rv_policy::take_ownership);
  m.def("agreement_describe_linear_distillation", &describe_linear_distillation, "function"_a,
        "hidden"_a.noconvert(), "weight"_a.noconvert(), "bias"_a.noconvert().none(), "teacher"_a.noconvert(),
        "values"_a.noconvert().none(), "tail"_a, "teacher_weight"_a.noconvert().none(),
        "teacher_bias"_a.noconvert().none(), "temperature"_a, "divergence"_a, "beta"_a, "reduction"_a,
        "mask"_a.noconvert().none(), "memory_budget"_a.none(), "grad_hidden"_a, nb::rv_policy::take_ownership);
  m.def("agreement_run", &agreed_run, "transport"_a, "call"_a, "class_offset"_a, "num_classes"_a, "core"_a);
  m.def("agreement_shard_from_local_classes", &shard_from_local_classes, "transport"_a, "function"_a,
        "local_classes"_a, "failure"_a.none());
  m.attr("agreement_facts") = cp::agreement_facts;
}
