// The cross-rank agreement protocol of the class-parallel losses (class_parallel.hpp), the
// one copy every front uses: softce::mpi (src/mpi/mpi.cpp) and torch.distributed
// (python/softce/distributed.py through python/src/agreement_bindings.cpp).
//
// Each rank turns its call into a fixed record of int64 "facts"; one all_gather gives every
// rank the table of all records, and every rank runs the same comparisons over the same
// table, so every rank reaches the same verdict: go on, or the same error. A rank whose own
// checks failed sends a record saying so (and nothing else: its arguments may be invalid);
// its message then follows by broadcast.
#include <softce/class_parallel.hpp>

#include "shard_records.hpp"

#include <algorithm>
#include <cstdint>
#include <charconv>
#include <cstring>
#include <string>
#include <vector>

namespace softce::class_parallel {
namespace {

// ---------------------------------------------------------------------------------------
// facts: what one rank says about its call

enum class fact_format { integer, real, boolean, given, dtype_name, reduction_name, divergence_name, optional_integer };

// An option compared across ranks. Reals travel as their bits (so -0.0 and NaN payloads
// count as different, as they would change the result). optional_integer: 0 when absent,
// the value + 1 when it is >= 0, the value itself when negative.
struct option_fact {
  std::string_view name;
  std::int64_t value;
  fact_format format;
};

constexpr int kMaxOptions = 14;
constexpr int kMessageBytes = 1024;  // a failing rank's message, truncated to this

// The record gathered from every rank, as int64s (agreement_facts of them).
struct rank_facts {
  std::int64_t failed = 0;  // 1: this rank's checks failed before the agreement
  std::int64_t code = 0;    // local_failure::code of that failure
  std::int64_t kind = 0;    // call_kind
  std::int64_t class_offset = 0, local_classes = 0, num_classes = 0;
  std::int64_t row_ndim = 0;
  std::int64_t row_dims[max_dims] = {};
  std::int64_t options[kMaxOptions] = {};
  std::int64_t target_fingerprint = 0;  // arrays identical on every rank: index / top-k targets
  std::int64_t mask_fingerprint = 0;
  std::int64_t hidden_fingerprint = 0;          // linear kinds: the replicated hidden states
  std::int64_t teacher_hidden_fingerprint = 0;  // linear_distillation_hidden: the teacher's
  std::int64_t mode = 0;                        // the transport's reduce_mode
};
static_assert(sizeof(rank_facts) == agreement_facts * sizeof(std::int64_t));

std::int64_t real_bits(double v) {
  std::int64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits;
}

bool is_linear(call_kind k) {
  return k == call_kind::linear_cross_entropy_index || k == call_kind::linear_cross_entropy_probabilities ||
         k == call_kind::linear_cross_entropy_topk || k == call_kind::linear_distillation_logits ||
         k == call_kind::linear_distillation_topk || k == call_kind::linear_distillation_hidden;
}

bool is_cross_entropy(call_kind k) {
  return k == call_kind::cross_entropy_index || k == call_kind::cross_entropy_probabilities ||
         k == call_kind::cross_entropy_topk || k == call_kind::linear_cross_entropy_index ||
         k == call_kind::linear_cross_entropy_probabilities || k == call_kind::linear_cross_entropy_topk;
}

bool is_index_kind(call_kind k) {
  return k == call_kind::cross_entropy_index || k == call_kind::linear_cross_entropy_index;
}

bool is_topk_kind(call_kind k) {
  return k == call_kind::cross_entropy_topk || k == call_kind::distillation_topk ||
         k == call_kind::linear_cross_entropy_topk || k == call_kind::linear_distillation_topk;
}

std::string_view input_name(call_kind k) {
  return is_linear(k) ? "hidden" : is_cross_entropy(k) ? "input" : "student_logits";
}
std::string_view target_name(call_kind k) { return is_cross_entropy(k) ? "target" : "teacher"; }

// The options compared, in the order they are compared (the same list on every rank once
// the kinds agree).
std::vector<option_fact> option_facts(const call_description& c) {
  std::vector<option_fact> v;
  if (is_cross_entropy(c.kind)) {
    const cross_entropy_options& o = c.cross_entropy;
    v.push_back({"reduction", static_cast<std::int64_t>(o.reduce), fact_format::reduction_name});
    v.push_back({"label_smoothing", real_bits(o.label_smoothing), fact_format::real});
    if (is_index_kind(c.kind)) v.push_back({"ignore_index", o.ignore_index, fact_format::integer});
    v.push_back({"target.tail", is_topk_kind(c.kind) && c.top.tail, fact_format::boolean});
    v.push_back({is_linear(c.kind) ? "class_weight" : "weight", o.weight.has_value(), fact_format::given});
    v.push_back({"mask", o.mask.has_value(), fact_format::given});
    v.push_back({is_linear(c.kind) ? "hidden dtype" : "input dtype", static_cast<std::int64_t>(c.input.type),
                 fact_format::dtype_name});
  } else {
    const distillation_options& o = c.distillation;
    v.push_back({"reduction", static_cast<std::int64_t>(o.reduce), fact_format::reduction_name});
    v.push_back({"divergence", static_cast<std::int64_t>(o.kind), fact_format::divergence_name});
    v.push_back({"beta", real_bits(o.beta), fact_format::real});
    v.push_back({"temperature", real_bits(o.temperature), fact_format::real});
    v.push_back({"teacher.tail", is_topk_kind(c.kind) && c.top.tail, fact_format::boolean});
    v.push_back({"dim", o.dim ? (*o.dim < 0 ? *o.dim : *o.dim + 1) : 0, fact_format::optional_integer});
    v.push_back({"mask", o.mask.has_value(), fact_format::given});
    v.push_back({is_linear(c.kind) ? "hidden dtype" : "student_logits dtype", static_cast<std::int64_t>(c.input.type),
                 fact_format::dtype_name});
  }
  if (is_linear(c.kind)) {
    // the fused layer: D (the hidden states' last dimension, the weight's columns), whether
    // a bias is given, and the budget (it sets the row blocks, so the all-reduce calls)
    v.push_back({"hidden.shape[-1]", c.input.ndim ? c.input.shape[c.input.ndim - 1] : 0, fact_format::integer});
    v.push_back({"bias", c.bias, fact_format::given});
    v.push_back({"grad_hidden", c.grad_hidden, fact_format::given});
    v.push_back({"memory_budget", static_cast<std::int64_t>(std::min<std::size_t>(c.memory_budget, INT64_MAX)),
                 fact_format::integer});
    if (c.kind == call_kind::linear_distillation_hidden) {
      const std::int64_t Dt = c.teacher_hidden && c.teacher_hidden->ndim ? c.teacher_hidden->shape[c.teacher_hidden->ndim - 1] : 0;
      v.push_back({"teacher.hidden.shape[-1]", Dt, fact_format::integer});
      v.push_back({"teacher.bias", c.teacher_bias, fact_format::given});
    }
  }
  return v;
}

// The class dimension of the (validated) logits: 0 for 1-d, else 1, except that
// distillation takes it from its dim option.
int class_dim(const call_description& c) {
  const int ndim = c.input.ndim;
  if (is_linear(c.kind)) return ndim - 1;  // hidden (..., D): the rows are all but the last
  if (ndim <= 1) return 0;
  if (!is_cross_entropy(c.kind) && c.distillation.dim) {
    const int d = *c.distillation.dim;
    return d < 0 ? d + ndim : d;
  }
  return 1;
}

std::int64_t as_int64(std::uint64_t h) {
  std::int64_t v;
  std::memcpy(&v, &h, sizeof v);
  return v;
}

rank_facts describe_facts(const call_description& c, const local_failure* failure, reduce_mode mode) {
  rank_facts f;
  f.kind = static_cast<std::int64_t>(c.kind);
  f.mode = static_cast<std::int64_t>(mode);
  if (failure) {
    f.failed = 1;
    f.code = failure->code;
    return f;  // the arguments may be invalid: read nothing else
  }
  f.class_offset = c.class_offset;
  f.num_classes = c.num_classes;
  const array_view& in = c.input;
  const int cd = class_dim(c);
  f.local_classes = in.ndim ? in.shape[cd] : 0;
  if (is_linear(c.kind)) f.local_classes = c.weight.ndim == 2 ? c.weight.shape[0] : 0;
  for (int i = 0; i < in.ndim; ++i)
    if (i != cd) f.row_dims[f.row_ndim++] = in.shape[i];
  const auto options = option_facts(c);
  if (options.size() > kMaxOptions) throw error("agreement: more options than the record holds");  // a bug here
  for (std::size_t i = 0; i < options.size(); ++i) f.options[i] = options[i].value;
  if (is_index_kind(c.kind)) {
    const std::optional<array_view> target[1] = {c.target};
    f.target_fingerprint = as_int64(fingerprint(target, 1));
  } else if (is_topk_kind(c.kind)) {
    const std::optional<array_view> target[2] = {c.top.indices, c.top.values};
    f.target_fingerprint = as_int64(fingerprint(target, 2));
  }  // probability targets and teacher logits are sharded like the logits
  const std::optional<array_view>& mask = is_cross_entropy(c.kind) ? c.cross_entropy.mask : c.distillation.mask;
  f.mask_fingerprint = as_int64(fingerprint(&mask, 1));
  if (is_linear(c.kind)) {
    // the replicated operands: about a nanosecond per element, against the 2 x V_local
    // multiply-adds per element of the products
    const std::optional<array_view> hidden[1] = {c.input};
    f.hidden_fingerprint = as_int64(fingerprint(hidden, 1));
    if (c.teacher_hidden) f.teacher_hidden_fingerprint = as_int64(fingerprint(&c.teacher_hidden, 1));
  }
  return f;
}

// ---------------------------------------------------------------------------------------
// messages

std::string format_real(double v) {
  char buffer[64];
  auto result = std::to_chars(buffer, buffer + sizeof buffer, v);
  return std::string(buffer, result.ptr);
}

// (built by appending: GCC 12 warns falsely about "literal" + std::string&&)
std::string quoted(std::string_view name) {
  std::string s(1, '\'');
  s += name;
  s += '\'';
  return s;
}

std::string format_fact(fact_format format, std::int64_t value) {
  switch (format) {
    case fact_format::integer: return std::to_string(value);
    case fact_format::optional_integer:
      return value == 0 ? "not given" : std::to_string(value > 0 ? value - 1 : value);
    case fact_format::boolean: return value ? "true" : "false";
    case fact_format::given: return value ? "given" : "not given";
    case fact_format::dtype_name: return quoted(dtype_name(static_cast<dtype>(value)));
    case fact_format::reduction_name: return quoted(reduction_name(static_cast<reduction>(value)));
    case fact_format::divergence_name: return quoted(divergence_name(static_cast<divergence>(value)));
    case fact_format::real: {
      double v;
      std::memcpy(&v, &value, sizeof v);
      return format_real(v);
    }
  }
  return "?";
}

std::string interval(std::int64_t begin, std::int64_t end) {
  std::string s(1, '[');
  s += std::to_string(begin);
  s += ", ";
  s += std::to_string(end);
  s += ')';
  return s;
}

std::string row_shape_string(const rank_facts& f) {
  std::string s = "(";
  for (std::int64_t i = 0; i < f.row_ndim; ++i) s += (i ? ", " : "") + std::to_string(f.row_dims[i]);
  return s + ")";
}

std::int64_t row_count(const rank_facts& f) {
  std::int64_t n = 1;
  for (std::int64_t i = 0; i < f.row_ndim; ++i) n *= f.row_dims[i];
  return n;
}

std::string pair(int r0, const std::string& v0, int r1, const std::string& v1) {
  return " (rank " + std::to_string(r0) + ": " + v0 + ", rank " + std::to_string(r1) + ": " + v1 + ")";
}

error_kind kind_of_code(std::int64_t code) {
  return code == 1 ? error_kind::index : code == 2 ? error_kind::type : error_kind::value;
}

void check_transport(const transport& t, std::string_view function) {
  if (t.size < 1 || t.rank < 0 || t.rank >= t.size || !t.all_gather || !t.broadcast)
    throw error(std::string(function) + ": transport: expected 0 <= rank < size, all_gather and broadcast, got rank " +
                std::to_string(t.rank) + " of " + std::to_string(t.size));
}

// Every rank's record, in rank order.
template <class Record>
std::vector<Record> gather(const transport& t, const Record& mine) {
  static_assert(sizeof(Record) % sizeof(std::int64_t) == 0);
  constexpr auto count = static_cast<std::int64_t>(sizeof(Record) / sizeof(std::int64_t));
  std::vector<Record> all(static_cast<std::size_t>(t.size));
  t.all_gather(reinterpret_cast<const std::int64_t*>(&mine), count, reinterpret_cast<std::int64_t*>(all.data()));
  return all;
}

// Once some rank's `failed` flag is set (every rank sees the same flags): the lowest failing
// rank's message goes to every rank by one broadcast, taken by every rank. Returns on a
// failing rank (it rethrows its own error); throws a shard_failure on the others.
void share_failure(const transport& t, std::string_view function, int failed_rank, std::int64_t code,
                   const local_failure* mine) {
  char message[kMessageBytes] = {};
  if (t.rank == failed_rank) {
    const std::size_t n = std::min<std::size_t>(mine->message.size(), kMessageBytes - 1);
    std::memcpy(message, mine->message.data(), n);
  }
  t.broadcast(message, kMessageBytes, failed_rank);
  message[kMessageBytes - 1] = '\0';
  if (mine) return;
  throw shard_failure(std::string(function) + ": failed on rank " + std::to_string(failed_rank) + ": " + message,
                      failed_rank, code);
}

// The verdict over a table with no failure: compares every rank with rank 0, in this order.
void compare(const call_description& c, const std::vector<rank_facts>& all) {
  const std::string prefix = std::string(c.function) + ": ";
  auto fail = [&](const std::string& what) { throw error(prefix + what); };
  const int size = static_cast<int>(all.size());
  const rank_facts& first = all[0];
  for (int r = 1; r < size; ++r)
    if (all[r].kind != first.kind)
      fail("ranks called different functions" +
           pair(0, std::string(call_kind_name(static_cast<call_kind>(first.kind))), r,
                std::string(call_kind_name(static_cast<call_kind>(all[r].kind)))));
  // the kinds agree: rank 0's description tells every rank what the facts mean
  const call_kind kind = static_cast<call_kind>(first.kind);
  auto mode_name = [](std::int64_t m) { return std::string(m == 1 ? "'commutative'" : "'ordered'"); };
  for (int r = 1; r < size; ++r)
    if (all[r].mode != first.mode)
      fail("reduce mode differs across ranks" + pair(0, mode_name(first.mode), r, mode_name(all[r].mode)));
  for (int r = 1; r < size; ++r)
    if (all[r].num_classes != first.num_classes)
      fail("num_classes differs across ranks" +
           pair(0, std::to_string(first.num_classes), r, std::to_string(all[r].num_classes)));
  const std::string input = std::string(input_name(kind));
  for (int r = 1; r < size; ++r) {
    const rank_facts& f = all[r];
    if (row_count(f) != row_count(first))
      fail(input + ": rows differ across ranks" + pair(0, std::to_string(row_count(first)), r, std::to_string(row_count(f))));
    bool same = f.row_ndim == first.row_ndim;
    for (std::int64_t i = 0; same && i < f.row_ndim; ++i) same = f.row_dims[i] == first.row_dims[i];
    if (!same) fail(input + ": row shape differs across ranks" + pair(0, row_shape_string(first), r, row_shape_string(f)));
  }
  std::int64_t next = 0;
  for (int r = 0; r < size; ++r) {
    const rank_facts& f = all[r];
    if (f.class_offset != next)
      fail("shard: expected the ranks' classes to tile " + interval(0, first.num_classes) + " in rank order, but rank " +
           std::to_string(r) + " has classes " + interval(f.class_offset, f.class_offset + f.local_classes) +
           " (expected a start at " + std::to_string(next) + ")");
    next += f.local_classes;
  }
  if (next != first.num_classes)
    fail("shard: expected the ranks' classes to tile " + interval(0, first.num_classes) +
         " in rank order, but they cover " + interval(0, next));
  call_description kind_only;  // the option list depends on the kind alone
  kind_only.kind = kind;
  const auto options = option_facts(kind_only);
  for (std::size_t i = 0; i < options.size(); ++i)
    for (int r = 1; r < size; ++r) {
      const std::int64_t v0 = first.options[i], v = all[r].options[i];
      if (v != v0)
        fail(std::string(options[i].name) + " differs across ranks" +
             pair(0, format_fact(options[i].format, v0), r, format_fact(options[i].format, v)));
    }
  for (int r = 1; r < size; ++r) {
    if (all[r].target_fingerprint != first.target_fingerprint)
      fail(std::string(target_name(kind)) + ": differs between rank 0 and rank " + std::to_string(r) +
           " (class indices and top-k entries are global and must be identical on every rank)");
    if (all[r].mask_fingerprint != first.mask_fingerprint)
      fail("mask: differs between rank 0 and rank " + std::to_string(r) +
           " (the row mask must be identical on every rank)");
    if (all[r].hidden_fingerprint != first.hidden_fingerprint)
      fail("hidden: differs between rank 0 and rank " + std::to_string(r) +
           " (the hidden states are replicated: they must be identical on every rank)");
    if (all[r].teacher_hidden_fingerprint != first.teacher_hidden_fingerprint)
      fail("teacher.hidden: differs between rank 0 and rank " + std::to_string(r) +
           " (the teacher's hidden states are replicated: they must be identical on every rank)");
  }
}

// ---------------------------------------------------------------------------------------
// the fingerprint: four independent lanes over the innermost dimension, about a nanosecond
// per element (the arrays hashed have K or 1 elements per row, against C / ranks logits)

struct array_hasher {
  std::uint64_t h = 0x9e3779b97f4a7c15ull;

  static std::uint64_t mix(std::uint64_t h, std::uint64_t v) {
    h = (h ^ v) * 0xff51afd7ed558ccdull;
    return h ^ (h >> 32);
  }
  void add(std::uint64_t v) { h = mix(h, v); }

  template <class U>
  void add_run(const U* p, std::int64_t n, std::int64_t stride) {
    std::uint64_t lane[4] = {h, h + 1, h + 2, h + 3};
    std::int64_t j = 0;
    for (; j + 4 <= n; j += 4)
      for (int l = 0; l < 4; ++l) lane[l] = mix(lane[l], static_cast<std::uint64_t>(p[(j + l) * stride]));
    for (; j < n; ++j) lane[0] = mix(lane[0], static_cast<std::uint64_t>(p[j * stride]));
    for (int l = 0; l < 4; ++l) add(lane[l]);
  }

  void add(const array_view& v) {
    add(static_cast<std::uint64_t>(v.type));
    add(static_cast<std::uint64_t>(v.ndim));
    for (int i = 0; i < v.ndim; ++i) add(static_cast<std::uint64_t>(v.shape[i]));
    if (v.numel() == 0) return;
    const int last = v.ndim - 1;
    const std::int64_t inner = v.ndim ? v.shape[last] : 1, stride = v.ndim ? v.strides[last] : 1;
    const std::int64_t outer = v.numel() / inner;
    std::int64_t index[max_dims] = {};
    for (std::int64_t o = 0; o < outer; ++o) {
      std::int64_t offset = 0;
      for (int i = 0; i < last; ++i) offset += index[i] * v.strides[i];
      const char* p = static_cast<const char*>(v.data) + offset * static_cast<std::int64_t>(dtype_size(v.type));
      switch (dtype_size(v.type)) {
        case 8: add_run(reinterpret_cast<const std::uint64_t*>(p), inner, stride); break;
        case 4: add_run(reinterpret_cast<const std::uint32_t*>(p), inner, stride); break;
        case 2: add_run(reinterpret_cast<const std::uint16_t*>(p), inner, stride); break;
        default: add_run(reinterpret_cast<const std::uint8_t*>(p), inner, stride); break;
      }
      for (int i = last - 1; i >= 0; --i) {
        if (++index[i] < v.shape[i]) break;
        index[i] = 0;
      }
    }
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------
// public functions

std::string_view call_kind_name(call_kind kind) noexcept {
  switch (kind) {
    case call_kind::cross_entropy_index: return "cross_entropy with class-index targets";
    case call_kind::cross_entropy_probabilities: return "cross_entropy with probability targets";
    case call_kind::cross_entropy_topk: return "cross_entropy with top-k targets";
    case call_kind::distillation_logits: return "distillation_loss with teacher logits";
    case call_kind::distillation_topk: return "distillation_loss with a top-k teacher";
    case call_kind::linear_cross_entropy_index: return "linear_cross_entropy with class-index targets";
    case call_kind::linear_cross_entropy_probabilities: return "linear_cross_entropy with probability targets";
    case call_kind::linear_cross_entropy_topk: return "linear_cross_entropy with top-k targets";
    case call_kind::linear_distillation_logits: return "linear_distillation_loss with teacher logits";
    case call_kind::linear_distillation_topk: return "linear_distillation_loss with a top-k teacher";
    case call_kind::linear_distillation_hidden: return "linear_distillation_loss with teacher hidden states";
  }
  return "an unknown function";
}

std::int64_t failure_code(error_kind kind) noexcept { return static_cast<std::int64_t>(kind); }

shard_failure::shard_failure(const std::string& message, int rank, std::int64_t code)
    : error(message, kind_of_code(code)), rank_(rank), code_(code) {}

std::uint64_t fingerprint(const std::optional<array_view>* arrays, std::size_t count) {
  array_hasher h;
  for (std::size_t i = 0; i < count; ++i) {
    h.add(arrays[i] ? 1 : 2);
    if (arrays[i]) h.add(*arrays[i]);
  }
  return h.h;
}

call_description describe(std::string_view function, std::int64_t class_offset, std::int64_t num_classes,
                          const array_view& input, const array_view& target, const cross_entropy_options& options) {
  call_description c;
  c.function = function;
  const bool index_target = target.type == dtype::int32 || target.type == dtype::int64;
  c.kind = index_target ? call_kind::cross_entropy_index : call_kind::cross_entropy_probabilities;
  c.class_offset = class_offset;
  c.num_classes = num_classes;
  c.input = input;
  if (index_target) c.target = target;  // probability targets are per shard: not compared
  c.cross_entropy = options;
  return c;
}

call_description describe(std::string_view function, std::int64_t class_offset, std::int64_t num_classes,
                          const array_view& input, const topk& target, const cross_entropy_options& options) {
  call_description c;
  c.function = function;
  c.kind = call_kind::cross_entropy_topk;
  c.class_offset = class_offset;
  c.num_classes = num_classes;
  c.input = input;
  c.top = target;
  c.cross_entropy = options;
  return c;
}

call_description describe(std::string_view function, std::int64_t class_offset, std::int64_t num_classes,
                          const array_view& student_logits, const array_view&,
                          const distillation_options& options) {
  call_description c;
  c.function = function;
  c.kind = call_kind::distillation_logits;  // teacher logits are per shard: not compared
  c.class_offset = class_offset;
  c.num_classes = num_classes;
  c.input = student_logits;
  c.distillation = options;
  return c;
}

call_description describe(std::string_view function, std::int64_t class_offset, std::int64_t num_classes,
                          const array_view& student_logits, const topk& teacher,
                          const distillation_options& options) {
  call_description c;
  c.function = function;
  c.kind = call_kind::distillation_topk;
  c.class_offset = class_offset;
  c.num_classes = num_classes;
  c.input = student_logits;
  c.top = teacher;
  c.distillation = options;
  return c;
}

namespace {
call_description linear_common(const linear_outputs& out, std::string_view function, call_kind kind, std::int64_t class_offset,
                               std::int64_t num_classes, const array_view& hidden, const array_view& weight,
                               const std::optional<array_view>& bias, const linear_options& linear) {
  call_description c;
  c.function = function;
  c.kind = kind;
  c.class_offset = class_offset;
  c.num_classes = num_classes;
  c.input = hidden;
  c.weight = weight;
  c.bias = bias.has_value();
  c.memory_budget = linear.memory_budget;
  c.grad_hidden = out.grad_hidden.has_value();
  return c;
}
}  // namespace

call_description describe_linear(std::string_view function, std::int64_t class_offset, std::int64_t num_classes,
                                 const array_view& hidden, const array_view& weight,
                                 const std::optional<array_view>& bias, const array_view& target,
                                 const cross_entropy_options& options, const linear_options& linear, const linear_outputs& out) {
  const bool index_target = target.type == dtype::int32 || target.type == dtype::int64;
  call_description c = linear_common(
      out, function, index_target ? call_kind::linear_cross_entropy_index : call_kind::linear_cross_entropy_probabilities,
      class_offset, num_classes, hidden, weight, bias, linear);
  if (index_target) c.target = target;  // probability targets are per shard: not compared
  c.cross_entropy = options;
  return c;
}

call_description describe_linear(std::string_view function, std::int64_t class_offset, std::int64_t num_classes,
                                 const array_view& hidden, const array_view& weight,
                                 const std::optional<array_view>& bias, const topk& target,
                                 const cross_entropy_options& options, const linear_options& linear, const linear_outputs& out) {
  call_description c = linear_common(out, function, call_kind::linear_cross_entropy_topk, class_offset, num_classes,
                                     hidden, weight, bias, linear);
  c.top = target;
  c.cross_entropy = options;
  return c;
}

call_description describe_linear(std::string_view function, std::int64_t class_offset, std::int64_t num_classes,
                                 const array_view& hidden, const array_view& weight,
                                 const std::optional<array_view>& bias, const array_view&,
                                 const distillation_options& options, const linear_options& linear, const linear_outputs& out) {
  call_description c = linear_common(out, function, call_kind::linear_distillation_logits, class_offset, num_classes,
                                     hidden, weight, bias, linear);
  c.distillation = options;
  return c;
}

call_description describe_linear(std::string_view function, std::int64_t class_offset, std::int64_t num_classes,
                                 const array_view& hidden, const array_view& weight,
                                 const std::optional<array_view>& bias, const topk& teacher,
                                 const distillation_options& options, const linear_options& linear, const linear_outputs& out) {
  call_description c = linear_common(out, function, call_kind::linear_distillation_topk, class_offset, num_classes,
                                     hidden, weight, bias, linear);
  c.top = teacher;
  c.distillation = options;
  return c;
}

call_description describe_linear(std::string_view function, std::int64_t class_offset, std::int64_t num_classes,
                                 const array_view& hidden, const array_view& weight,
                                 const std::optional<array_view>& bias, const linear_teacher& teacher,
                                 const distillation_options& options, const linear_options& linear, const linear_outputs& out) {
  call_description c = linear_common(out, function, call_kind::linear_distillation_hidden, class_offset, num_classes,
                                     hidden, weight, bias, linear);
  c.teacher_hidden = teacher.hidden;  // teacher weight and bias are per shard: not compared
  c.teacher_bias = teacher.bias.has_value();
  c.distillation = options;
  return c;
}

void agree(const transport& t, const call_description& call, const local_failure* failure) {
  check_transport(t, call.function);
  const std::vector<rank_facts> all = gather(t, describe_facts(call, failure, t.mode));
  // 1. some rank's own checks failed: its message goes to the others
  for (int r = 0; r < t.size; ++r)
    if (all[static_cast<std::size_t>(r)].failed) {
      share_failure(t, call.function, r, all[static_cast<std::size_t>(r)].code, failure);
      return;
    }
  // 2. the ranks disagree
  compare(call, all);
}

double run(const transport& t, const call_description& call, const std::function<double(const class_shard&)>& core,
           const std::function<local_failure(const std::exception&)>& describe_failure) {
  check_transport(t, call.function);
  bool agreed = false;
  class_shard shard;
  shard.class_offset = call.class_offset;
  shard.num_classes = call.num_classes;
  shard.all_reduce = [&](double* records, std::int64_t count, int width, row_stats_merge_fn merge) {
    if (!agreed) {
      agreed = true;
      agree(t, call, nullptr);
    }
    if (t.mode == reduce_mode::commutative)
      commutative_all_reduce(records, count, width, merge, t.all_reduce_max, t.all_reduce_sum);
    else
      t.all_reduce(records, count, width, merge);
  };
  double loss = 0.0;
  try {
    loss = core(shard);
  } catch (const std::exception& e) {
    // Past the agreement the error is already everyone's (or comes from the transport).
    if (agreed) throw;
    agreed = true;
    local_failure failure;
    if (describe_failure) {
      failure = describe_failure(e);
    } else {
      const auto* softce_error = dynamic_cast<const error*>(&e);
      failure = {e.what(), softce_error ? failure_code(softce_error->kind()) : 0};
    }
    agree(t, call, &failure);
    throw;
  }
  if (!agreed) agree(t, call, nullptr);  // the core made no collective call: still agree
  return loss;
}

// ---------------------------------------------------------------------------------------
// the commutative form of the all-reduce

namespace {

// The shift fields (running maxima, in units of x / T) of the records of each merge
// function; the other fields are sums once the shifts agree (row_stats.hpp, shard_records.hpp).
struct record_layout {
  int width;
  std::vector<int> shifts;  // positions of the shift fields
};

bool layout_of(row_stats_merge_fn merge, int width, record_layout& out) {
  using namespace detail;
  if (merge == &merge_ce_records) out = {5, {0}};                      // target_stats + target_weight
  else if (merge == &merge_topk_records) out = {7, {0, 6}};            // shift ... tail_shift
  else if (merge == &merge_distill_kl || merge == &merge_distill_reverse) out = {5, {0, 2}};  // shift_x, shift_z
  else if (merge == &merge_sums) out = {width, {}};  // the JSD's second pass, the fused layer's sums
  else return false;
  return out.width == width;
}

}  // namespace

void commutative_all_reduce(double* records, std::int64_t count, int width, row_stats_merge_fn merge,
                            const std::function<void(double*, std::int64_t)>& all_reduce_max,
                            const std::function<void(double*, std::int64_t)>& all_reduce_sum) {
  record_layout layout;
  if (!layout_of(merge, width, layout))
    throw error("commutative_all_reduce: merge: expected one of softce's record merge functions (width " +
                std::to_string(width) + "); use the ordered all-reduce for records of your own");
  if (!all_reduce_max || !all_reduce_sum)
    throw error("commutative_all_reduce: expected all_reduce_max and all_reduce_sum");
  if (count <= 0) return;
  const std::size_t shifts = layout.shifts.size();
  std::vector<double> maxima(static_cast<std::size_t>(count) * shifts);
  if (shifts > 0) {
    // 1. the global maxima of the shifts
    for (std::int64_t i = 0; i < count; ++i)
      for (std::size_t j = 0; j < shifts; ++j) maxima[i * shifts + j] = records[i * width + layout.shifts[j]];
    all_reduce_max(maxima.data(), static_cast<std::int64_t>(maxima.size()));
    // 2. each record rescaled to them: merged into (those shifts, zero sums), the identity
    // of the monoid at that shift
    std::vector<double> rescaled(static_cast<std::size_t>(width));
    for (std::int64_t i = 0; i < count; ++i) {
      std::fill(rescaled.begin(), rescaled.end(), 0.0);
      for (std::size_t j = 0; j < shifts; ++j) rescaled[layout.shifts[j]] = maxima[i * shifts + j];
      merge(rescaled.data(), records + i * width, 1);
      for (int f = 0; f < width; ++f) records[i * width + f] = rescaled[f];
      for (std::size_t j = 0; j < shifts; ++j) records[i * width + layout.shifts[j]] = 0.0;  // not summed
    }
  }
  // 3. the sums (records with equal shifts merge by adding their other fields)
  all_reduce_sum(records, count * width);
  if (shifts > 0)
    for (std::int64_t i = 0; i < count; ++i)
      for (std::size_t j = 0; j < shifts; ++j) records[i * width + layout.shifts[j]] = maxima[i * shifts + j];
}

shard_range shard_from_local_classes(const transport& t, std::string_view function, std::int64_t local_classes,
                                     const local_failure* failure) {
  check_transport(t, function);
  struct record {
    std::int64_t failed, code, local_classes;
  };
  const record mine{failure ? 1 : 0, failure ? failure->code : 0, failure ? 0 : local_classes};
  const std::vector<record> all = gather(t, mine);
  for (int r = 0; r < t.size; ++r)
    if (all[static_cast<std::size_t>(r)].failed) {
      share_failure(t, function, r, all[static_cast<std::size_t>(r)].code, failure);
      return {};
    }
  shard_range s;
  for (int r = 0; r < t.size; ++r) {
    const std::int64_t c = all[static_cast<std::size_t>(r)].local_classes;
    if (c < 0)
      throw error(std::string(function) + ": local_classes: expected a count >= 0 on every rank, got " +
                  std::to_string(c) + " on rank " + std::to_string(r));
    if (r == t.rank) s.class_offset = s.num_classes;
    s.num_classes += c;
  }
  return s;
}

}  // namespace softce::class_parallel
