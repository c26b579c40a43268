// softce::mpi: the class-parallel losses (class_parallel.hpp) with MPI collectives.
//
// One call on every rank:
//   the core validates its local arguments (no communication yet)
//   -> agreement: one MPI_Allgather of a small fixed record per rank (did the rank's
//      validation fail? row shape, shard, options, hashes of the arrays that must be
//      identical everywhere); every rank makes the same decision from the same data, so an
//      error anywhere becomes an error everywhere instead of a hang
//   -> the core's all-reduce(s) of the row statistics: MPI_Allreduce with a non-commutative
//      user-defined operation that calls the core's merge in rank (= class) order.
// The agreement runs inside the first all-reduce callback, i.e. after the core has checked
// everything it checks locally and before its first collective; a rank whose validation
// threw joins the same MPI_Allgather from its catch handler. So the happy path costs one
// extra latency-bound collective and nothing is validated twice.
#include <softce/mpi.hpp>

#include <algorithm>
#include <charconv>
#include <climits>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace softce::mpi {
namespace {

[[noreturn]] void fail_mpi(const char* what, int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) length = 0;
  throw error(std::string("mpi: ") + what + " failed: " + std::string(text, static_cast<std::size_t>(length)));
}

void check_mpi(int code, const char* what) {
  if (code != MPI_SUCCESS) fail_mpi(what, code);
}

// ---------------------------------------------------------------------------------------
// the all-reduce: records as MPI_DOUBLE x width, a non-commutative user-defined operation
//
// MPI's operation function has no user-data argument. The merge function travels as an
// attribute of the record datatype, which MPI hands to the operation: MPI-3.1 §5.9.5 says
// the datatype argument "is a handle to the data type that was passed into the call to
// MPI_REDUCE". That holds whichever thread runs the operation (a thread_local set before
// the call would rely on the operation running on the calling thread, which is what Open
// MPI and MPICH do for blocking collectives but no standard promises).

struct merge_context {
  row_stats_merge_fn merge;
  int width;
};

int merge_keyval() {
  static const int keyval = [] {
    int k = MPI_KEYVAL_INVALID;
    check_mpi(MPI_Type_create_keyval(MPI_TYPE_NULL_COPY_FN, MPI_TYPE_NULL_DELETE_FN, &k, nullptr),
              "MPI_Type_create_keyval");
    return k;
  }();
  return keyval;
}

// For a non-commutative operation MPI computes inoutvec = invec op inoutvec, where invec
// holds the combination of LOWER ranks than inoutvec (MPI-3.1 §5.9.5: the reduction is
// "in the order of the ranks" and the function computes "inoutvec[i] = invec[i] o
// inoutvec[i]"). The core's merge is merge(inout = earlier shards, in = later shards), so
// the earlier operand (invec) is copied aside, merged with the later one, and copied back.
void merge_operation(void* invec, void* inoutvec, int* len, MPI_Datatype* type) {
  void* attribute = nullptr;
  int found = 0;
  MPI_Type_get_attr(*type, merge_keyval(), &attribute, &found);
  if (!found) {
    // Cannot throw through MPI's C frames; this is a broken MPI, not a user error.
    MPI_Abort(MPI_COMM_WORLD, 1);
    return;
  }
  const auto& ctx = *static_cast<const merge_context*>(attribute);
  const std::size_t n = static_cast<std::size_t>(*len) * static_cast<std::size_t>(ctx.width);
  thread_local std::vector<double> earlier;
  earlier.assign(static_cast<const double*>(invec), static_cast<const double*>(invec) + n);
  ctx.merge(earlier.data(), static_cast<const double*>(inoutvec), *len);
  std::memcpy(inoutvec, earlier.data(), n * sizeof(double));
}

// Frees the datatype and operation of one all_reduce call on every exit.
struct reduce_handles {
  MPI_Datatype type = MPI_DATATYPE_NULL;
  MPI_Op op = MPI_OP_NULL;
  ~reduce_handles() {
    if (op != MPI_OP_NULL) MPI_Op_free(&op);
    if (type != MPI_DATATYPE_NULL) MPI_Type_free(&type);
  }
};

// ---------------------------------------------------------------------------------------
// the agreement step

enum class call_kind : std::int64_t { ce_index = 1, ce_probabilities, ce_topk, distill_logits, distill_topk };

std::string_view call_kind_name(std::int64_t k) {
  switch (static_cast<call_kind>(k)) {
    case call_kind::ce_index: return "cross_entropy with class-index targets";
    case call_kind::ce_probabilities: return "cross_entropy with probability targets";
    case call_kind::ce_topk: return "cross_entropy with top-k targets";
    case call_kind::distill_logits: return "distillation_loss with teacher logits";
    case call_kind::distill_topk: return "distillation_loss with a top-k teacher";
  }
  return "?";
}

enum class fact_format { integer, real, boolean, reduction_name, divergence_name, optional_integer };

// optional_integer: a value that may be absent (distillation's dim): 0 when absent, the
// value + 1 when it is >= 0, the value itself when negative.

struct option_fact {
  std::string_view name;
  std::int64_t value;  // reals as their bits
  fact_format format;
};

std::int64_t real_bits(double v) {
  std::int64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits;
}

std::string format_real(double v) {
  char buffer[64];
  auto result = std::to_chars(buffer, buffer + sizeof buffer, v);
  return std::string(buffer, result.ptr);
}

std::string quoted(std::string_view name) {
  std::string s(1, '\'');
  s += name;
  s += '\'';
  return s;
}

std::string format_fact(const option_fact& f, std::int64_t value) {
  switch (f.format) {
    case fact_format::integer: return std::to_string(value);
    case fact_format::optional_integer:
      return value == 0 ? "not given" : std::to_string(value > 0 ? value - 1 : value);
    case fact_format::boolean: return value ? "true" : "false";
    case fact_format::reduction_name:
      return quoted(reduction_name(static_cast<reduction>(value)));
    case fact_format::divergence_name:
      return quoted(divergence_name(static_cast<divergence>(value)));
    case fact_format::real: {
      double v;
      std::memcpy(&v, &value, sizeof v);
      return format_real(v);
    }
  }
  return "?";
}

constexpr int kMaxOptions = 6;

// What one rank says about its call; gathered as int64s.
struct rank_facts {
  std::int64_t failed = 0;      // 1: the rank's call threw before its first collective
  std::int64_t error_kind = 0;  // softce::error_kind of that error
  std::int64_t call = 0;        // call_kind
  std::int64_t class_offset = 0, local_classes = 0, num_classes = 0;
  std::int64_t row_ndim = 0;
  std::int64_t row_dims[max_dims] = {};
  std::int64_t options[kMaxOptions] = {};
  std::int64_t target_hash = 0;  // arrays that hold global data (index / top-k targets)
  std::int64_t mask_hash = 0;
};
constexpr int kFactsCount = static_cast<int>(sizeof(rank_facts) / sizeof(std::int64_t));
static_assert(sizeof(rank_facts) == kFactsCount * sizeof(std::int64_t));

// Hash of an array's dtype, shape and element values (in index order), to detect arrays
// that should be identical on every rank and are not. Four independent lanes over the
// innermost dimension: about a nanosecond per element, against reading C / ranks logits per
// row (the arrays hashed have K or 1 elements per row).
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

// One class-parallel call as the agreement step sees it.
struct call_description {
  std::string_view fn;         // "mpi::cross_entropy"
  std::string_view input_arg;  // "input" or "student_logits"
  std::string_view target_arg; // "target" or "teacher"
  call_kind kind;
  const array_view* input;
  std::vector<option_fact> options;
  std::vector<array_view> target_arrays;  // must be identical on every rank
  const std::optional<array_view>* mask;
};

struct local_failure {
  std::string message;
  error_kind kind;
};

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

rank_facts describe(const call_description& d, const shard& s, const local_failure* failure) {
  rank_facts f;
  f.call = static_cast<std::int64_t>(d.kind);
  f.class_offset = s.class_offset;
  f.num_classes = s.num_classes;
  if (failure) {
    f.failed = 1;
    f.error_kind = static_cast<std::int64_t>(failure->kind);
    return f;  // the arguments may be invalid: read nothing else
  }
  // validated by the core by now
  const array_view& in = *d.input;
  if (in.ndim == 1) {
    f.local_classes = in.shape[0];
  } else {
    f.local_classes = in.shape[1];
    f.row_ndim = in.ndim - 1;
    f.row_dims[0] = in.shape[0];
    for (int i = 2; i < in.ndim; ++i) f.row_dims[i - 1] = in.shape[i];
  }
  for (std::size_t i = 0; i < d.options.size(); ++i) f.options[i] = d.options[i].value;
  array_hasher target;
  for (const array_view& a : d.target_arrays) target.add(a);
  f.target_hash = static_cast<std::int64_t>(target.h);
  array_hasher mask;
  mask.add(d.mask->has_value() ? 1 : 0);
  if (d.mask->has_value()) mask.add(**d.mask);
  f.mask_hash = static_cast<std::int64_t>(mask.h);
  return f;
}

// Collective. Throws softce::error on every rank when any rank failed or the ranks disagree;
// returns normally on the ranks whose own call failed (they rethrow their own error) and on
// every rank when all is well.
void agree(const call_description& d, const shard& s, const local_failure* failure) {
  int rank = 0, size = 1;
  check_mpi(MPI_Comm_rank(s.comm, &rank), "MPI_Comm_rank");
  check_mpi(MPI_Comm_size(s.comm, &size), "MPI_Comm_size");
  const rank_facts mine = describe(d, s, failure);
  std::vector<rank_facts> all(static_cast<std::size_t>(size));
  check_mpi(MPI_Allgather(&mine, kFactsCount, MPI_INT64_T, all.data(), kFactsCount, MPI_INT64_T, s.comm),
            "MPI_Allgather");
  const std::string prefix = std::string(d.fn) + ": ";
  auto fail = [&](const std::string& what) { throw error(prefix + what); };

  // 1. a rank's own validation failed: its message goes to the others (second collective,
  //    taken by every rank since every rank sees the same flags)
  for (int r = 0; r < size; ++r) {
    if (!all[static_cast<std::size_t>(r)].failed) continue;
    constexpr int kMessageBytes = 1024;
    char message[kMessageBytes] = {};
    if (rank == r) {
      const std::size_t n = std::min<std::size_t>(failure->message.size(), kMessageBytes - 1);
      std::memcpy(message, failure->message.data(), n);
    }
    check_mpi(MPI_Bcast(message, kMessageBytes, MPI_CHAR, r, s.comm), "MPI_Bcast");
    if (failure) return;
    throw error(prefix + "failed on rank " + std::to_string(r) + ": " + message,
                static_cast<error_kind>(all[static_cast<std::size_t>(r)].error_kind));
  }

  // 2. the ranks disagree: compare everything with rank 0, in this order
  const rank_facts& first = all[0];
  auto pair = [](int r0, const std::string& v0, int r1, const std::string& v1) {
    return " (rank " + std::to_string(r0) + ": " + v0 + ", rank " + std::to_string(r1) + ": " + v1 + ")";
  };
  for (int r = 1; r < size; ++r) {
    const rank_facts& f = all[static_cast<std::size_t>(r)];
    if (f.call != first.call)
      fail("ranks called different functions" +
           pair(0, std::string(call_kind_name(first.call)), r, std::string(call_kind_name(f.call))));
  }
  for (int r = 1; r < size; ++r) {
    const rank_facts& f = all[static_cast<std::size_t>(r)];
    if (f.num_classes != first.num_classes)
      fail("num_classes differs across ranks" +
           pair(0, std::to_string(first.num_classes), r, std::to_string(f.num_classes)));
  }
  for (int r = 1; r < size; ++r) {
    const rank_facts& f = all[static_cast<std::size_t>(r)];
    if (row_count(f) != row_count(first))
      fail(std::string(d.input_arg) + ": rows differ across ranks" +
           pair(0, std::to_string(row_count(first)), r, std::to_string(row_count(f))));
    bool same = f.row_ndim == first.row_ndim;
    for (std::int64_t i = 0; same && i < f.row_ndim; ++i) same = f.row_dims[i] == first.row_dims[i];
    if (!same)
      fail(std::string(d.input_arg) + ": row shape differs across ranks" +
           pair(0, row_shape_string(first), r, row_shape_string(f)));
  }
  std::int64_t next = 0;
  for (int r = 0; r < size; ++r) {
    const rank_facts& f = all[static_cast<std::size_t>(r)];
    if (f.class_offset != next)
      fail("shard: expected the ranks' classes to tile " + interval(0, first.num_classes) +
           " in rank order, but rank " + std::to_string(r) + " has classes " +
           interval(f.class_offset, f.class_offset + f.local_classes) + " (expected a start at " +
           std::to_string(next) + ")");
    next += f.local_classes;
  }
  if (next != first.num_classes)
    fail("shard: expected the ranks' classes to tile " + interval(0, first.num_classes) +
         " in rank order, but they cover " + interval(0, next));
  for (std::size_t i = 0; i < d.options.size(); ++i)
    for (int r = 1; r < size; ++r) {
      const std::int64_t v0 = first.options[i], v = all[static_cast<std::size_t>(r)].options[i];
      if (v != v0)
        fail(std::string(d.options[i].name) + " differs across ranks" +
             pair(0, format_fact(d.options[i], v0), r, format_fact(d.options[i], v)));
    }
  for (int r = 1; r < size; ++r) {
    const rank_facts& f = all[static_cast<std::size_t>(r)];
    if (f.target_hash != first.target_hash)
      fail(std::string(d.target_arg) + ": differs between rank 0 and rank " + std::to_string(r) +
           " (class indices and top-k entries are global and must be identical on every rank)");
    if (f.mask_hash != first.mask_hash)
      fail("mask: differs between rank 0 and rank " + std::to_string(r) +
           " (the row mask must be identical on every rank)");
  }
}

// Runs one core call with the agreement step in front of its first collective.
template <class Core>
double run(const call_description& d, const shard& s, Core&& core) {
  int initialised = 0, finalised = 0;
  MPI_Initialized(&initialised);
  MPI_Finalized(&finalised);
  if (!initialised || finalised) throw error(std::string(d.fn) + ": MPI is not initialised");
  if (s.comm == MPI_COMM_NULL) throw error(std::string(d.fn) + ": shard: expected a communicator, got MPI_COMM_NULL");

  bool agreed = false;
  class_shard cs;
  cs.class_offset = s.class_offset;
  cs.num_classes = s.num_classes;
  cs.all_reduce = [&](double* stats, std::int64_t count, int width, row_stats_merge_fn merge) {
    if (!agreed) {
      agreed = true;
      agree(d, s, nullptr);
    }
    all_reduce(s.comm, stats, count, width, merge);
  };
  double loss = 0.0;
  try {
    loss = core(cs);
  } catch (const std::exception& e) {
    // Past the agreement the error is already everyone's (or comes from MPI itself).
    if (agreed) throw;
    agreed = true;
    const auto* softce_error = dynamic_cast<const error*>(&e);
    const local_failure failure{e.what(), softce_error ? softce_error->kind() : error_kind::value};
    agree(d, s, &failure);
    throw;
  }
  if (!agreed) agree(d, s, nullptr);  // the core made no collective call: still agree
  return loss;
}

std::vector<option_fact> ce_options(const cross_entropy_options& o, bool index_target, bool tail) {
  std::vector<option_fact> v{{"reduction", static_cast<std::int64_t>(o.reduce), fact_format::reduction_name},
                             {"label_smoothing", real_bits(o.label_smoothing), fact_format::real}};
  if (index_target) v.push_back({"ignore_index", o.ignore_index, fact_format::integer});
  v.push_back({"target.tail", tail ? 1 : 0, fact_format::boolean});
  return v;
}

std::vector<option_fact> distill_options(const distillation_options& o, bool tail) {
  return {{"reduction", static_cast<std::int64_t>(o.reduce), fact_format::reduction_name},
          {"divergence", static_cast<std::int64_t>(o.kind), fact_format::divergence_name},
          {"beta", real_bits(o.beta), fact_format::real},
          {"temperature", real_bits(o.temperature), fact_format::real},
          {"teacher.tail", tail ? 1 : 0, fact_format::boolean},
          {"dim", o.dim ? (*o.dim < 0 ? *o.dim : *o.dim + 1) : 0, fact_format::optional_integer}};
}

bool is_index_dtype(dtype t) { return t == dtype::int32 || t == dtype::int64; }

}  // namespace

// ---------------------------------------------------------------------------------------
// public functions

void all_reduce(MPI_Comm comm, double* records, std::int64_t count, int width, row_stats_merge_fn merge) {
  if (width < 1 || count < 0 || merge == nullptr || (count > 0 && records == nullptr))
    throw error("mpi::all_reduce: expected count >= 0 records of width >= 1 and a merge function");
  if (count == 0) return;  // the same on every rank
  merge_context ctx{merge, width};
  reduce_handles h;
  check_mpi(MPI_Type_contiguous(width, MPI_DOUBLE, &h.type), "MPI_Type_contiguous");
  check_mpi(MPI_Type_commit(&h.type), "MPI_Type_commit");
  check_mpi(MPI_Type_set_attr(h.type, merge_keyval(), &ctx), "MPI_Type_set_attr");
  check_mpi(MPI_Op_create(&merge_operation, /*commute=*/0, &h.op), "MPI_Op_create");
  // MPI counts are int; pieces of at most 2^27 doubles (1 GiB) keep every byte count in range
  const std::int64_t piece = std::max<std::int64_t>(1, (std::int64_t{1} << 27) / width);
  for (std::int64_t begin = 0; begin < count; begin += piece) {
    const int n = static_cast<int>(std::min(piece, count - begin));
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, records + begin * width, n, h.type, h.op, comm), "MPI_Allreduce");
  }
}

shard shard::from_local_classes(MPI_Comm comm, std::int64_t local_classes) {
  int rank = 0, size = 1;
  check_mpi(MPI_Comm_rank(comm, &rank), "MPI_Comm_rank");
  check_mpi(MPI_Comm_size(comm, &size), "MPI_Comm_size");
  // One MPI_Allgather rather than MPI_Exscan + MPI_Allreduce: one collective, and every rank
  // sees every count, so a bad count is an error on every rank.
  std::vector<std::int64_t> counts(static_cast<std::size_t>(size));
  check_mpi(MPI_Allgather(&local_classes, 1, MPI_INT64_T, counts.data(), 1, MPI_INT64_T, comm), "MPI_Allgather");
  std::int64_t offset = 0, total = 0;
  for (int r = 0; r < size; ++r) {
    const std::int64_t c = counts[static_cast<std::size_t>(r)];
    if (c < 0)
      throw error("mpi::shard: local_classes: expected a count >= 0 on every rank, got " + std::to_string(c) +
                  " on rank " + std::to_string(r));
    if (r == rank) offset = total;
    total += c;
  }
  return shard(comm, offset, total);
}

double cross_entropy(const shard& s, const array_view& input, const array_view& target,
                     const cross_entropy_options& options, const outputs& out) {
  const bool index_target = is_index_dtype(target.type);
  call_description d{"mpi::cross_entropy", "input", "target",
                     index_target ? call_kind::ce_index : call_kind::ce_probabilities, &input,
                     ce_options(options, index_target, false), {}, &options.mask};
  if (index_target) d.target_arrays.push_back(target);  // probability targets are per shard
  return run(d, s, [&](const class_shard& cs) {
    return class_parallel::cross_entropy(cs, input, target, options, out);
  });
}

double cross_entropy(const shard& s, const array_view& input, const topk& target,
                     const cross_entropy_options& options, const outputs& out) {
  call_description d{"mpi::cross_entropy", "input", "target", call_kind::ce_topk, &input,
                     ce_options(options, false, target.tail), {target.indices, target.values}, &options.mask};
  return run(d, s, [&](const class_shard& cs) {
    return class_parallel::cross_entropy(cs, input, target, options, out);
  });
}

double distillation_loss(const shard& s, const array_view& student_logits, const array_view& teacher_logits,
                         const distillation_options& options, const outputs& out) {
  call_description d{"mpi::distillation_loss", "student_logits", "teacher", call_kind::distill_logits,
                     &student_logits, distill_options(options, false), {}, &options.mask};
  return run(d, s, [&](const class_shard& cs) {
    return class_parallel::distillation_loss(cs, student_logits, teacher_logits, options, out);
  });
}

double distillation_loss(const shard& s, const array_view& student_logits, const topk& teacher,
                         const distillation_options& options, const outputs& out) {
  call_description d{"mpi::distillation_loss", "student_logits", "teacher", call_kind::distill_topk,
                     &student_logits, distill_options(options, teacher.tail),
                     {teacher.indices, teacher.values}, &options.mask};
  return run(d, s, [&](const class_shard& cs) {
    return class_parallel::distillation_loss(cs, student_logits, teacher, options, out);
  });
}

}  // namespace softce::mpi
