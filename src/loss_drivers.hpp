// The row-loss drivers the public entry points (losses.cpp) route to, one per target kind,
// as PyTorch's LossNLL.cpp has one function per target form:
//   cross_entropy_index.cpp       class-index targets (one-hot rows, ignore_index)
//   cross_entropy_dense.cpp       dense probability targets (bfloat16 rows in place)
//   cross_entropy_sparse.cpp      top-k targets with class weights or label smoothing
//   topk.cpp                      top-k targets (cross-entropy, and kl distillation from a
//                                 top-k teacher), with or without the tail bucket
//   distillation.cpp              distillation with dense teacher logits
// Each validates what only it can see, runs its rows through the row driver
// (row_driver.hpp) and returns the reduced loss. T is the compute type (float or double).
#pragma once

#include <softce/class_parallel.hpp>
#include <softce/softce.hpp>

#include <cstdint>
#include <optional>
#include <string_view>

#include "validate.hpp"

namespace softce::detail {

// One cross-entropy call as the entry point validated it.
struct ce_call {
  std::string_view fn;
  const array_view& input;
  const cross_entropy_options& options;
  const outputs& out;
  const class_shard* shard;
};

// A top-k target's arrays as row operands: K entries per row, `class_stride` apart.
struct topk_operands {
  row_operand indices, values;
  std::int64_t k;
};

// Checks shapes and dtypes, then every row's indices: in range and without duplicates.
// `name` is the argument's name in messages ("target" or "teacher").
topk_operands validate_topk(std::string_view fn, std::string_view name, const topk& target, const row_space& space,
                            std::int64_t total_classes);

template <class T>
double cross_entropy_index(const ce_call& call, const row_space& space, const array_view& target);

template <class T>
double cross_entropy_probabilities(const ce_call& call, const row_space& space, const array_view& target);

// Top-k targets with class weights or label smoothing: each row's top-k is scattered into
// a dense row (every class's target is needed then anyway).
template <class T>
double cross_entropy_sparse_topk(const ce_call& call, const row_space& space, const topk_operands& target);

// Top-k rows: `temperature` is T for distillation (loss T^2 x, gradient T x) and 1 for
// cross-entropy; `entropy_term` adds Σ v log v (the KL rather than the cross-entropy).
template <class T>
double topk_loss(std::string_view fn, const array_view& input, const topk& target,
                 const std::optional<array_view>& mask, reduction mode, const outputs& out, const class_shard* shard,
                 double temperature, bool entropy_term);

template <class T>
double distillation_dense(std::string_view fn, const array_view& student, const array_view& teacher,
                          const distillation_options& options, const outputs& out, const class_shard* shard);

}  // namespace softce::detail
