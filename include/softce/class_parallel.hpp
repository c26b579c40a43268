// softce class-parallel losses: the class dimension of the logits is split across shards
// (processes, ranks). Each shard holds a contiguous range of classes; the per-row softmax
// statistics of the shards are combined with one all-reduce of a few doubles per row (two
// for the generalised JSD), so every shard gets the global loss and the gradient of its own
// classes. This header has no MPI dependency: the caller supplies the all-reduce
// (softce::mpi does so for MPI, the Python front for torch.distributed).
#pragma once

#include <softce/softce.hpp>

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
}  // namespace class_parallel

}  // namespace softce
