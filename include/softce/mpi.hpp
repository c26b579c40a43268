// softce class-parallel losses on MPI: the class dimension of the logits is split across the
// ranks of a communicator, one contiguous range of classes per rank, in rank order.
//
// Every rank calls the same function with the same arguments except for its own slice of the
// class dimension (input, probability targets, class weights, teacher logits, gradient).
// Every rank gets the global loss (bitwise the same on all ranks) and the gradient of its own
// classes. Communication per call: one small MPI_Allgather that checks the ranks agree, then
// one MPI_Allreduce of a few doubles per row (two for divergence jsd); in the commutative
// reduce mode (shard::mode) an MPI_MAX of the shifts and an MPI_SUM instead of each. See
// docs/class_parallel.md for the costs.
//
// Errors: any argument error, on any rank, raises softce::error on EVERY rank (never a hang):
// the rank that saw it throws its own message, the others
//   "mpi::<function>: failed on rank R: <message>".
// Arguments that must agree across ranks and are checked: the row shape, num_classes, that
// the shards tile [0, num_classes) in rank order, the options, whether a class weight and a
// mask are given, the dtype, and the contents of index targets, top-k targets and masks (the
// core's agreement protocol, softce::class_parallel::agree, as the torch.distributed front).
//
// Requires MPI to be initialised by the caller (any thread level; the collectives run on the
// calling thread). Link with softce::mpi.
#pragma once

#include <mpi.h>

#include <softce/class_parallel.hpp>
#include <softce/linear.hpp>
#include <softce/softce.hpp>

#include <cstdint>
#include <optional>

namespace softce::mpi {

// This rank's place in the class dimension.
struct shard {
  MPI_Comm comm = MPI_COMM_NULL;
  std::int64_t class_offset = 0;  // global id of this rank's first class
  std::int64_t num_classes = 0;   // C over all ranks together
  // How the row statistics are combined (the same on every rank, agreed):
  //  ordered      one MPI_Allreduce with a non-commutative operation merging in rank order:
  //               bitwise the single-process merge order; MPI may only use algorithms that
  //               keep the order, whose per-rank cost grows with the rank count for long
  //               messages (docs/class_parallel.md).
  //  commutative  MPI_MAX of the shift fields, then MPI_SUM of the rescaled records:
  //               built-in operations (reduce-scatter + allgather for long messages, per-rank
  //               cost independent of the rank count); the same on every rank, not bitwise
  //               the ordered result.
  class_parallel::reduce_mode mode = class_parallel::reduce_mode::ordered;

  shard() = default;
  shard(MPI_Comm comm_, std::int64_t class_offset_, std::int64_t num_classes_,
        class_parallel::reduce_mode mode_ = class_parallel::reduce_mode::ordered)
      : comm(comm_), class_offset(class_offset_), num_classes(num_classes_), mode(mode_) {}

  // Collective: each rank passes its own class count; offsets are the counts of the lower
  // ranks summed, num_classes the total. A negative count on any rank is an error on every
  // rank.
  static shard from_local_classes(MPI_Comm comm, std::int64_t local_classes);
};

// The contracts of softce::class_parallel (class_parallel.hpp): input, probability targets,
// class weights and teacher logits hold this rank's classes; index and top-k targets hold
// global class ids and must be identical on every rank.
double cross_entropy(const shard& s, const array_view& input, const array_view& target,
                     const cross_entropy_options& options = {}, const outputs& out = {});
double cross_entropy(const shard& s, const array_view& input, const topk& target,
                     const cross_entropy_options& options = {}, const outputs& out = {});
double distillation_loss(const shard& s, const array_view& student_logits,
                         const array_view& teacher_logits,
                         const distillation_options& options = {}, const outputs& out = {});
double distillation_loss(const shard& s, const array_view& student_logits, const topk& teacher,
                         const distillation_options& options = {}, const outputs& out = {});

// The fused output layer + loss (linear.hpp), vocabulary-parallel (Megatron's layout): the
// contracts of softce::class_parallel::linear_* (class_parallel.hpp). weight (V_local, D)
// holds this rank's rows of the output layer, [s.class_offset, s.class_offset + V_local) (V_local
// may be 0), and so do the bias, the class weights, probability targets, teacher logits and
// a teacher's weight and bias; hidden (and teacher.hidden) are replicated. Every rank gets
// the global loss (bitwise the same), grad_weight / grad_bias of its rows and the FULL
// grad_hidden (summed over the ranks in rank order: the same bits on every rank). The
// agreement also checks D, whether a bias is given, memory_budget, the teacher's form and a
// fingerprint of the hidden states (and of the teacher's).
// Communication per call: the agreement's MPI_Allgather, one MPI_Allreduce of a few doubles
// per row per block of rows (two for divergence jsd with teacher logits or hidden states),
// one of N x D doubles for grad_hidden (in pieces of at most memory_budget bytes), and one of
// one double for reduction 'mean' with class weights.
double linear_cross_entropy(const shard& s, const array_view& hidden, const array_view& weight,
                            const std::optional<array_view>& bias, const array_view& target,
                            const cross_entropy_options& options = {},
                            const linear_options& linear = {}, const linear_outputs& out = {});
double linear_cross_entropy(const shard& s, const array_view& hidden, const array_view& weight,
                            const std::optional<array_view>& bias, const topk& target,
                            const cross_entropy_options& options = {},
                            const linear_options& linear = {}, const linear_outputs& out = {});
double linear_distillation_loss(const shard& s, const array_view& hidden, const array_view& weight,
                                const std::optional<array_view>& bias,
                                const array_view& teacher_logits,
                                const distillation_options& options = {},
                                const linear_options& linear = {},
                                const linear_outputs& out = {});
double linear_distillation_loss(const shard& s, const array_view& hidden, const array_view& weight,
                                const std::optional<array_view>& bias, const topk& teacher,
                                const distillation_options& options = {},
                                const linear_options& linear = {},
                                const linear_outputs& out = {});
double linear_distillation_loss(const shard& s, const array_view& hidden, const array_view& weight,
                                const std::optional<array_view>& bias,
                                const linear_teacher& teacher,
                                const distillation_options& options = {},
                                const linear_options& linear = {},
                                const linear_outputs& out = {});

// The same, with the shard given by its parts.
inline double cross_entropy(MPI_Comm comm, std::int64_t class_offset, std::int64_t num_classes,
                            const array_view& input, const array_view& target,
                            const cross_entropy_options& options = {}, const outputs& out = {}) {
  return cross_entropy(shard(comm, class_offset, num_classes), input, target, options, out);
}
inline double cross_entropy(MPI_Comm comm, std::int64_t class_offset, std::int64_t num_classes,
                            const array_view& input, const topk& target,
                            const cross_entropy_options& options = {}, const outputs& out = {}) {
  return cross_entropy(shard(comm, class_offset, num_classes), input, target, options, out);
}
inline double distillation_loss(MPI_Comm comm, std::int64_t class_offset, std::int64_t num_classes,
                                const array_view& student_logits, const array_view& teacher_logits,
                                const distillation_options& options = {}, const outputs& out = {}) {
  return distillation_loss(shard(comm, class_offset, num_classes), student_logits, teacher_logits,
                           options, out);
}
inline double distillation_loss(MPI_Comm comm, std::int64_t class_offset, std::int64_t num_classes,
                                const array_view& student_logits, const topk& teacher,
                                const distillation_options& options = {}, const outputs& out = {}) {
  return distillation_loss(shard(comm, class_offset, num_classes), student_logits, teacher, options,
                           out);
}

// The all-reduce the functions above use, for callers of softce::class_parallel that bring
// their own checks: replaces `records` (count records of `width` doubles, the same count and
// width on every rank) by their combination over the ranks of `comm` in rank order,
// merge(inout = lower ranks, in = higher ranks). One MPI_Allreduce with a non-commutative
// user-defined operation; every rank receives the same bits.
void all_reduce(MPI_Comm comm, double* records, std::int64_t count, int width,
                row_stats_merge_fn merge);

}  // namespace softce::mpi
