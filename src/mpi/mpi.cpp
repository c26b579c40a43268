// softce::mpi: the class-parallel losses (class_parallel.hpp) with MPI collectives.
//
// A thin adapter: the protocol of one call (validation, the cross-rank agreement that makes
// an error on one rank an error on every rank, the ordered all-reduce of the row statistics)
// is the core's (class_parallel::run in src/agreement.cpp); this file supplies its transport:
//   all_gather -> MPI_Allgather (the agreement's record of facts: one per call)
//   broadcast  -> MPI_Bcast (a failing rank's message, only when some rank failed)
//   all_reduce -> MPI_Allreduce with a non-commutative user-defined operation that calls the
//                 core's merge in rank (= class) order.
// So the happy path costs one extra latency-bound collective and nothing is validated twice.
#include <softce/mpi.hpp>

#include <algorithm>
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
// the transport: the core's agreement protocol (class_parallel.hpp) over MPI

// A built-in element-wise all-reduce of doubles, in pieces whose counts fit MPI's int.
void all_reduce_builtin(MPI_Comm comm, double* values, std::int64_t count, MPI_Op op) {
  constexpr std::int64_t piece = std::int64_t{1} << 27;
  for (std::int64_t begin = 0; begin < count; begin += piece) {
    const int n = static_cast<int>(std::min(piece, count - begin));
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, values + begin, n, MPI_DOUBLE, op, comm), "MPI_Allreduce");
  }
}

class_parallel::transport mpi_transport(MPI_Comm comm,
                                        class_parallel::reduce_mode mode = class_parallel::reduce_mode::ordered) {
  class_parallel::transport t;
  t.mode = mode;
  t.all_reduce_max = [comm](double* values, std::int64_t count) { all_reduce_builtin(comm, values, count, MPI_MAX); };
  t.all_reduce_sum = [comm](double* values, std::int64_t count) { all_reduce_builtin(comm, values, count, MPI_SUM); };
  check_mpi(MPI_Comm_rank(comm, &t.rank), "MPI_Comm_rank");
  check_mpi(MPI_Comm_size(comm, &t.size), "MPI_Comm_size");
  // The records gathered are a few dozen int64s and the messages 1 KB: int counts suffice.
  t.all_gather = [comm](const std::int64_t* mine, std::int64_t count, std::int64_t* all) {
    check_mpi(MPI_Allgather(mine, static_cast<int>(count), MPI_INT64_T, all, static_cast<int>(count), MPI_INT64_T, comm),
              "MPI_Allgather");
  };
  t.broadcast = [comm](char* bytes, std::int64_t count, int root) {
    check_mpi(MPI_Bcast(bytes, static_cast<int>(count), MPI_CHAR, root, comm), "MPI_Bcast");
  };
  t.all_reduce = [comm](double* records, std::int64_t count, int width, row_stats_merge_fn merge) {
    all_reduce(comm, records, count, width, merge);
  };
  return t;
}

// Runs one core call under the core's agreement protocol.
template <class Core>
double run(const shard& s, const class_parallel::call_description& call, Core&& core) {
  int initialised = 0, finalised = 0;
  MPI_Initialized(&initialised);
  MPI_Finalized(&finalised);
  if (!initialised || finalised) throw error(std::string(call.function) + ": MPI is not initialised");
  if (s.comm == MPI_COMM_NULL)
    throw error(std::string(call.function) + ": shard: expected a communicator, got MPI_COMM_NULL");
  return class_parallel::run(mpi_transport(s.comm, s.mode), call, core);
}

// The fused output layer's calls, one per target (teacher) form: describe, then run.
template <class Target>
double run_linear_cross_entropy(const shard& s, const array_view& hidden, const array_view& weight,
                                const std::optional<array_view>& bias, const Target& target,
                                const cross_entropy_options& options, const linear_options& linear,
                                const linear_outputs& out) {
  const auto call = class_parallel::describe_linear("mpi::linear_cross_entropy", s.class_offset, s.num_classes, hidden,
                                                    weight, bias, target, options, linear, out);
  return run(s, call, [&](const class_shard& cs) {
    return class_parallel::linear_cross_entropy(cs, hidden, weight, bias, target, options, linear, out);
  });
}

template <class Teacher>
double run_linear_distillation_loss(const shard& s, const array_view& hidden, const array_view& weight,
                                    const std::optional<array_view>& bias, const Teacher& teacher,
                                    const distillation_options& options, const linear_options& linear,
                                    const linear_outputs& out) {
  const auto call = class_parallel::describe_linear("mpi::linear_distillation_loss", s.class_offset, s.num_classes,
                                                    hidden, weight, bias, teacher, options, linear, out);
  return run(s, call, [&](const class_shard& cs) {
    return class_parallel::linear_distillation_loss(cs, hidden, weight, bias, teacher, options, linear, out);
  });
}

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
  // One MPI_Allgather rather than MPI_Exscan + MPI_Allreduce: one collective, and every rank
  // sees every count, so a bad count is an error on every rank.
  const auto range = class_parallel::shard_from_local_classes(mpi_transport(comm), "mpi::shard", local_classes);
  return shard(comm, range.class_offset, range.num_classes);  // mode: ordered (set it after)
}

double cross_entropy(const shard& s, const array_view& input, const array_view& target,
                     const cross_entropy_options& options, const outputs& out) {
  const auto call = class_parallel::describe("mpi::cross_entropy", s.class_offset, s.num_classes, input, target, options);
  return run(s, call, [&](const class_shard& cs) { return class_parallel::cross_entropy(cs, input, target, options, out); });
}

double cross_entropy(const shard& s, const array_view& input, const topk& target,
                     const cross_entropy_options& options, const outputs& out) {
  const auto call = class_parallel::describe("mpi::cross_entropy", s.class_offset, s.num_classes, input, target, options);
  return run(s, call, [&](const class_shard& cs) { return class_parallel::cross_entropy(cs, input, target, options, out); });
}

double distillation_loss(const shard& s, const array_view& student_logits, const array_view& teacher_logits,
                         const distillation_options& options, const outputs& out) {
  const auto call = class_parallel::describe("mpi::distillation_loss", s.class_offset, s.num_classes, student_logits,
                                             teacher_logits, options);
  return run(s, call, [&](const class_shard& cs) {
    return class_parallel::distillation_loss(cs, student_logits, teacher_logits, options, out);
  });
}

double distillation_loss(const shard& s, const array_view& student_logits, const topk& teacher,
                         const distillation_options& options, const outputs& out) {
  const auto call =
      class_parallel::describe("mpi::distillation_loss", s.class_offset, s.num_classes, student_logits, teacher, options);
  return run(s, call, [&](const class_shard& cs) {
    return class_parallel::distillation_loss(cs, student_logits, teacher, options, out);
  });
}

double linear_cross_entropy(const shard& s, const array_view& hidden, const array_view& weight,
                            const std::optional<array_view>& bias, const array_view& target,
                            const cross_entropy_options& options, const linear_options& linear,
                            const linear_outputs& out) {
  return run_linear_cross_entropy(s, hidden, weight, bias, target, options, linear, out);
}

double linear_cross_entropy(const shard& s, const array_view& hidden, const array_view& weight,
                            const std::optional<array_view>& bias, const topk& target,
                            const cross_entropy_options& options, const linear_options& linear,
                            const linear_outputs& out) {
  return run_linear_cross_entropy(s, hidden, weight, bias, target, options, linear, out);
}

double linear_distillation_loss(const shard& s, const array_view& hidden, const array_view& weight,
                                const std::optional<array_view>& bias, const array_view& teacher_logits,
                                const distillation_options& options, const linear_options& linear,
                                const linear_outputs& out) {
  return run_linear_distillation_loss(s, hidden, weight, bias, teacher_logits, options, linear, out);
}

double linear_distillation_loss(const shard& s, const array_view& hidden, const array_view& weight,
                                const std::optional<array_view>& bias, const topk& teacher,
                                const distillation_options& options, const linear_options& linear,
                                const linear_outputs& out) {
  return run_linear_distillation_loss(s, hidden, weight, bias, teacher, options, linear, out);
}

double linear_distillation_loss(const shard& s, const array_view& hidden, const array_view& weight,
                                const std::optional<array_view>& bias, const linear_teacher& teacher,
                                const distillation_options& options, const linear_options& linear,
                                const linear_outputs& out) {
  return run_linear_distillation_loss(s, hidden, weight, bias, teacher, options, linear, out);
}

}  // namespace softce::mpi
