// softce class-parallel losses: the class dimension of the logits is split across shards
// (processes, ranks). Each shard holds a contiguous range of classes; the per-row softmax
// statistics of the shards are combined with one all-reduce of a few doubles per row (two
// for the generalised JSD), so every shard gets the global loss and the gradient of its own
// classes. This header has no MPI dependency: the caller supplies the all-reduce
// (softce::mpi does so for MPI, the Python front for torch.distributed).
//
// The second half of this header is the cross-rank AGREEMENT protocol that every front
// shares: a front supplies a `transport` (all-gather, broadcast, ordered all-reduce) and the
// core decides, identically on every rank, whether a call may proceed. An argument error on
// one rank, or arguments that differ where they must be identical, becomes a softce::error on
// EVERY rank instead of a hang in the next collective. softce::mpi and the torch.distributed
// front (python/softce/distributed.py) are thin adapters over it.
#pragma once

#include <softce/linear.hpp>
#include <softce/softce.hpp>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

namespace softce {

// Associative combination of two arrays of `count` row-statistics records (the
// row-statistics monoid): inout[i] = inout[i] (+) in[i], where `inout` holds the shards
// before `in` in class order. Not bitwise commutative, so combine in shard order.
using row_stats_merge_fn = void (*)(double* inout, const double* in, std::int64_t count);

struct class_shard {
  std::int64_t class_offset = 0;  // global id of this shard's first class
  std::int64_t num_classes = 0;   // C over all shards together
  // Replace `stats` (count records of `width` doubles) by the combination over all shards,
  // in shard order, using `merge`. Every shard calls it the same number of times with the
  // same count and width. Called on the thread that called the loss.
  std::function<void(double* stats, std::int64_t count, int width, row_stats_merge_fn merge)>
      all_reduce;
};

// The same contracts as the functions in softce.hpp, with these differences:
//  - input (and probability targets, class weights) hold this shard's classes only;
//  - index and top-k targets hold global class ids; ignore_index as usual;
//  - label smoothing uses the global class count;
//  - the result is the global loss (identical on every shard); outputs.grad receives this
//    shard's gradient; outputs.losses the global per-row losses.
// Validation that depends only on local arguments happens before any all_reduce call, so
// an error is raised on every shard that sees it; arguments must agree across shards
// (callers such as softce::mpi check N before calling).
namespace class_parallel {
double cross_entropy(const class_shard& shard, const array_view& input, const array_view& target,
                     const cross_entropy_options& options = {}, const outputs& out = {});
double cross_entropy(const class_shard& shard, const array_view& input, const topk& target,
                     const cross_entropy_options& options = {}, const outputs& out = {});
double distillation_loss(const class_shard& shard, const array_view& student_logits,
                         const array_view& teacher_logits,
                         const distillation_options& options = {}, const outputs& out = {});
double distillation_loss(const class_shard& shard, const array_view& student_logits,
                         const topk& teacher, const distillation_options& options = {},
                         const outputs& out = {});

// The fused output layer + loss (linear.hpp), vocabulary-parallel as in Megatron: the shard
// holds a contiguous slice of rows of the weight, weight (V_local, D) = rows
// [class_offset, class_offset + V_local) of the global (num_classes, D) weight, and the same
// slice of the bias, the class weights, probability targets, teacher logits and a teacher's
// weight and bias; V_local may be 0 (an empty shard). The hidden states (and a teacher's
// hidden states) are replicated: identical on every shard. Index and top-k targets hold
// global class ids.
//  - the result is the global loss (identical on every shard), outputs.losses the global
//    per-row losses;
//  - grad_weight / grad_bias receive the gradient of this shard's rows;
//  - grad_hidden receives the FULL gradient d loss / d hidden, the sum over all shards of
//    their partial products G_shard · W_shard: summed through shard.all_reduce in shard
//    order (records of width 1, in double), so it is the same bits on every shard and
//    nothing is left for the caller to reduce. Its cost: N x D doubles through the
//    all-reduce, in pieces of at most memory_budget bytes.
// The row-block plan depends only on what every shard shares (N, D, num_classes, the dtype,
// the kind, memory_budget), so every shard makes the same sequence of all_reduce calls;
// within a shard, classes may be split into blocks too (merged in process, then once
// through shard.all_reduce). Calls of shard.all_reduce: one (two for divergence jsd with
// logits or hidden-state teachers) per block of rows, one for the denominator of
// reduction 'mean' with class weights, and the pieces of grad_hidden.
double linear_cross_entropy(const class_shard& shard, const array_view& hidden,
                            const array_view& weight, const std::optional<array_view>& bias,
                            const array_view& target, const cross_entropy_options& options = {},
                            const linear_options& linear = {}, const linear_outputs& out = {});
double linear_cross_entropy(const class_shard& shard, const array_view& hidden,
                            const array_view& weight, const std::optional<array_view>& bias,
                            const topk& target, const cross_entropy_options& options = {},
                            const linear_options& linear = {}, const linear_outputs& out = {});
double linear_distillation_loss(const class_shard& shard, const array_view& hidden,
                                const array_view& weight, const std::optional<array_view>& bias,
                                const array_view& teacher_logits,
                                const distillation_options& options = {},
                                const linear_options& linear = {},
                                const linear_outputs& out = {});
double linear_distillation_loss(const class_shard& shard, const array_view& hidden,
                                const array_view& weight, const std::optional<array_view>& bias,
                                const topk& teacher, const distillation_options& options = {},
                                const linear_options& linear = {},
                                const linear_outputs& out = {});
double linear_distillation_loss(const class_shard& shard, const array_view& hidden,
                                const array_view& weight, const std::optional<array_view>& bias,
                                const linear_teacher& teacher,
                                const distillation_options& options = {},
                                const linear_options& linear = {},
                                const linear_outputs& out = {});

// ---------------------------------------------------------------------------------------
// the agreement protocol
//
// One class-parallel call, on every rank:
//   1. the front's own checks, then the core validates its local arguments (no communication);
//   2. agreement, in front of the core's first all_reduce: one all_gather of a fixed record
//      of int64 "facts" per rank (did this rank's checks fail? the call, the shard, the row
//      shape, the options, the dtype, the transport's reduce mode, one 64-bit fingerprint of
//      the arrays that must be identical on every rank and one of the mask; for the linear
//      calls also D, bias, grad_hidden, memory_budget, the teacher's form and fingerprints
//      of the replicated hidden states); every rank takes the same decision from
//      the same table: go on, or throw the same error;
//   3. the core's all_reduce(s) of the row statistics (transport::all_reduce).
// A rank whose validation threw joins step 2 from its catch handler, so the others learn of
// it: they throw "<function>: failed on rank R: <R's message>" (a shard_failure), the failing
// rank rethrows its own error. `run` below does all of this around a core call.

// How a transport combines the row-statistics records (transport::mode).
enum class reduce_mode : std::int64_t { ordered = 0, commutative = 1 };

// The collectives of one group of ranks (shards). Every member is called on every rank the
// same number of times with the same sizes, on the thread that called the loss; a transport
// error is thrown as an exception and ends the call on that rank (it is the transport's job
// to fail the others too, as MPI and torch.distributed do).
struct transport {
  int rank = 0;  // this rank, in [0, size); shards are in rank order
  int size = 1;
  // all[r * count + i] = element i of rank r's `mine`, for every rank r.
  std::function<void(const std::int64_t* mine, std::int64_t count, std::int64_t* all)> all_gather;
  // Every rank's bytes[0, count) become rank `root`'s.
  std::function<void(char* bytes, std::int64_t count, int root)> broadcast;
  // The ordered all-reduce of row-statistics records: class_shard::all_reduce's contract.
  std::function<void(double* records, std::int64_t count, int width, row_stats_merge_fn merge)> all_reduce;
  // How the records are combined (agreed: a rank with another mode is an error on every rank):
  //  ordered      all_reduce above, the records merged in rank order: the result is the
  //               same bits for any transport, bitwise equal to the one-process merge order.
  //  commutative  all_reduce_max of the records' shift fields, then all_reduce_sum of the
  //               records rescaled to those shifts (commutative_all_reduce below): built-in
  //               operations whose per-rank cost does not grow with the rank count.
  reduce_mode mode = reduce_mode::ordered;
  // Built-in element-wise all-reduces of `count` doubles, in place (commutative mode only);
  // every rank must receive the same bits (MPI_Allreduce and the usual NCCL / gloo
  // algorithms do so for identical inputs).
  std::function<void(double* values, std::int64_t count)> all_reduce_max;
  std::function<void(double* values, std::int64_t count)> all_reduce_sum;
};

// class_shard::all_reduce's contract in the commutative form: the global maxima of the
// records' shift fields by `all_reduce_max`, every record rescaled to them through `merge`
// (merged into a record of those shifts and zero sums), then `all_reduce_sum` of the
// rescaled records. Knows the records of softce's merge functions (the row statistics of
// every class-parallel loss, the top-k records, plain sums); another `merge` is an error.
// The result is the same on every rank and repeatable, but not bitwise equal to the ordered
// merge (additions in another order).
void commutative_all_reduce(double* records, std::int64_t count, int width, row_stats_merge_fn merge,
                            const std::function<void(double*, std::int64_t)>& all_reduce_max,
                            const std::function<void(double*, std::int64_t)>& all_reduce_sum);

// Which function a rank called (a different one on some rank is an error).
enum class call_kind : std::int64_t {
  cross_entropy_index = 1,
  cross_entropy_probabilities,
  cross_entropy_topk,
  distillation_logits,
  distillation_topk,
  linear_cross_entropy_index,
  linear_cross_entropy_probabilities,
  linear_cross_entropy_topk,
  linear_distillation_logits,
  linear_distillation_topk,
  linear_distillation_hidden,
};
std::string_view call_kind_name(call_kind kind) noexcept;  // "cross_entropy with top-k targets"

// One class-parallel call as the agreement sees it: copies of the views and options (the
// arrays themselves must outlive the agreement). Built by `describe`; `function` prefixes
// every message ("mpi::cross_entropy", "cross_entropy") and must outlive the call too.
struct call_description {
  std::string_view function;
  call_kind kind = call_kind::cross_entropy_index;
  std::int64_t class_offset = 0;  // this rank's shard
  std::int64_t num_classes = 0;
  array_view input;               // the logits (input / student_logits)
  array_view target;              // index targets (identical on every rank); unused otherwise
  topk top;                       // top-k targets / teachers (identical on every rank)
  cross_entropy_options cross_entropy;  // for the cross_entropy kinds
  distillation_options distillation;    // for the distillation kinds
  // the linear_* kinds: `input` is the hidden states (..., D) (replicated, compared by
  // fingerprint), `weight` this rank's rows (V_local, D)
  array_view weight;
  bool bias = false;
  std::optional<array_view> teacher_hidden;  // linear_distillation_hidden (replicated)
  bool teacher_bias = false;
  std::size_t memory_budget = 0;
  bool grad_hidden = false;  // requested: its sum over the ranks is a collective of its own
};

// Descriptions of the four calls of class_parallel::, from the same arguments (sharded
// probability targets and teacher logits are not compared: they only set the kind).
call_description describe(std::string_view function, std::int64_t class_offset,
                          std::int64_t num_classes, const array_view& input,
                          const array_view& target, const cross_entropy_options& options);
call_description describe(std::string_view function, std::int64_t class_offset,
                          std::int64_t num_classes, const array_view& input, const topk& target,
                          const cross_entropy_options& options);
call_description describe(std::string_view function, std::int64_t class_offset,
                          std::int64_t num_classes, const array_view& student_logits,
                          const array_view& teacher_logits, const distillation_options& options);
call_description describe(std::string_view function, std::int64_t class_offset,
                          std::int64_t num_classes, const array_view& student_logits,
                          const topk& teacher, const distillation_options& options);

// Descriptions of the five linear calls of class_parallel:: (sharded probability targets,
// teacher logits and teacher weights are not compared; of `out`, only whether grad_hidden is
// requested: every rank must request it or none).
call_description describe_linear(std::string_view function, std::int64_t class_offset,
                                 std::int64_t num_classes, const array_view& hidden,
                                 const array_view& weight, const std::optional<array_view>& bias,
                                 const array_view& target, const cross_entropy_options& options,
                                 const linear_options& linear, const linear_outputs& out);
call_description describe_linear(std::string_view function, std::int64_t class_offset,
                                 std::int64_t num_classes, const array_view& hidden,
                                 const array_view& weight, const std::optional<array_view>& bias,
                                 const topk& target, const cross_entropy_options& options,
                                 const linear_options& linear, const linear_outputs& out);
call_description describe_linear(std::string_view function, std::int64_t class_offset,
                                 std::int64_t num_classes, const array_view& hidden,
                                 const array_view& weight, const std::optional<array_view>& bias,
                                 const array_view& teacher_logits,
                                 const distillation_options& options, const linear_options& linear,
                                 const linear_outputs& out);
call_description describe_linear(std::string_view function, std::int64_t class_offset,
                                 std::int64_t num_classes, const array_view& hidden,
                                 const array_view& weight, const std::optional<array_view>& bias,
                                 const topk& teacher, const distillation_options& options,
                                 const linear_options& linear, const linear_outputs& out);
call_description describe_linear(std::string_view function, std::int64_t class_offset,
                                 std::int64_t num_classes, const array_view& hidden,
                                 const array_view& weight, const std::optional<array_view>& bias,
                                 const linear_teacher& teacher, const distillation_options& options,
                                 const linear_options& linear, const linear_outputs& out);

// What a rank tells the others when its own checks failed. `code` travels as is: the
// error_kind values 0..2 (value, index, type) keep their meaning; a front may define
// codes >= 3 of its own (the Python front: NotImplementedError, RuntimeError).
struct local_failure {
  std::string message;
  std::int64_t code = 0;
};
std::int64_t failure_code(error_kind kind) noexcept;

// Thrown on the ranks whose own checks passed when another rank's failed: the message is
// "<function>: failed on rank R: <R's message>"; kind() is R's error_kind (value for codes
// of a front's own), code() R's code, rank() R (the lowest failing rank).
class shard_failure : public error {
 public:
  shard_failure(const std::string& message, int rank, std::int64_t code);
  int rank() const noexcept { return rank_; }
  std::int64_t code() const noexcept { return code_; }

 private:
  int rank_;
  std::int64_t code_;
};

// The agreement step (collective). `failure`: null when this rank's checks passed (then
// `call` must have passed the core's validation: its arrays are read), else this rank's
// failure (`call` is not read beyond its function and kind). Returns normally when every rank
// passed and all agree, and on a failing rank (which then rethrows its own error); throws
// softce::error (a shard_failure when some rank failed) with the same message on every other
// rank.
void agree(const transport& t, const call_description& call, const local_failure* failure = nullptr);

// Runs `core` (one class_parallel:: call) with the agreement in front of its first
// all_reduce, which then goes to t.all_reduce; a core that throws before it joins the
// agreement with its failure (described by `describe_failure`, default: the what() of the
// exception, code from softce::error's kind, else 0) and the exception is rethrown as is; a
// core that makes no collective call still takes the agreement before returning.
double run(const transport& t, const call_description& call,
           const std::function<double(const class_shard&)>& core,
           const std::function<local_failure(const std::exception&)>& describe_failure = {});

// Collective: the shard of this rank from every rank's class count: class_offset = the counts
// of the lower ranks summed, num_classes = all of them summed. A negative count anywhere is an
// error on every rank ("<function>: local_classes: expected a count >= 0 on every rank, got
// -3 on rank 2"); with `failure` (a rank whose own checks failed before it knew its count)
// this is the agreement on failures alone, as in `agree`.
struct shard_range {
  std::int64_t class_offset = 0;
  std::int64_t num_classes = 0;
};
shard_range shard_from_local_classes(const transport& t, std::string_view function,
                                     std::int64_t local_classes,
                                     const local_failure* failure = nullptr);

// The 64-bit fingerprint the agreement compares: dtype, shape and element bits (in index
// order, not memory order) of `count` arrays; an absent array (nullopt) has a marker of its
// own. The same on every platform softce runs on (little-endian, 64-bit).
std::uint64_t fingerprint(const std::optional<array_view>* arrays, std::size_t count);

// The number of int64 facts one rank contributes to the agreement's all_gather.
inline constexpr int agreement_facts = 34;
}  // namespace class_parallel

}  // namespace softce
