// softce fused output layer + loss: hidden states in, the N x V logits never materialised.
//
// linear_cross_entropy(hidden, weight, bias, target) is exactly
// cross_entropy(hidden · weightᵀ + bias, target) and linear_distillation_loss the same for
// distillation_loss, with the gradients for the hidden states, the weight and the bias. The
// logits are computed a block of rows at a time by a BLAS GEMM into a buffer bounded by
// `linear_options::memory_budget`, the fused loss runs over the block in place (the block
// becomes its own logit gradient), and two more GEMMs turn that gradient into the hidden
// and weight gradients. When one row of V logits does not fit the budget, the classes are
// split into blocks too, merged through the row-statistics monoid (the class-parallel path,
// run in one process).
//
// Shapes: hidden (..., D) — rows are every position but the last dimension, which is D;
// weight (V, D); bias (V,). Per-row arrays (index targets, mask, per-row losses) have the
// row shape hidden.shape[:-1]; probability targets and teacher logits (..., V); top-k arrays
// (..., K). The row dimensions of every array must flatten to one stride (any contiguous
// array, or a slice of rows of one).
//
// Numerics: float32 / bfloat16 / float16 hidden and weight compute in float32 (16-bit
// operands are widened block by block; products accumulate in float32), float64 in float64.
// Hidden and weight (and bias) share one dtype. Hidden states must be finite.
//
// Class-parallel (vocabulary-parallel weight rows per rank, hidden states replicated, the
// full grad_hidden on every rank): softce::class_parallel::linear_* (class_parallel.hpp) and
// softce::mpi::linear_* (mpi.hpp).
//
// Validation: every argument is checked before anything is written (errors name the
// argument: "linear_cross_entropy: weight: expected ..."). No output may overlap an input or
// another output.
#pragma once

#include <softce/softce.hpp>

#include <cstddef>
#include <cstdint>
#include <optional>

namespace softce {

struct linear_options {
  // Bytes for the block of logits (two blocks when the teacher is hidden states) and the
  // float staging of a block of hidden states; the N x V-shaped memory never exceeds it.
  // Too small for a block of one row and min(V, 16) classes: an error.
  std::size_t memory_budget = std::size_t{64} << 20;
  // Check every argument (as a call would, values included) and return NaN without
  // computing or writing anything: for fronts that run the products themselves (the Python
  // front runs them through torch's matmul) and want the same validation and messages.
  bool validate_only = false;
};

// Every output is optional.
//  losses:       with reduction none, the per-row losses (row shape, any float dtype).
//  grad_hidden:  d loss / d hidden, hidden's shape, any float dtype; overwritten.
//  grad_weight:  d loss / d weight, (V, D), any float dtype; overwritten, or added to when
//                `accumulate` (the sum is formed in float32/float64 and rounded once).
//  grad_bias:    d loss / d bias, (V,); overwritten or added to as grad_weight.
// With reduction none the gradients are those of the sum of the per-row losses.
struct linear_outputs {
  std::optional<mutable_array_view> losses;
  std::optional<mutable_array_view> grad_hidden;
  std::optional<mutable_array_view> grad_weight;
  std::optional<mutable_array_view> grad_bias;
  bool accumulate = false;
};

// cross_entropy(hidden · weightᵀ + bias, target, options): class-index targets (row shape,
// with ignore_index, class weights, label smoothing), probability targets (..., V) with
// mask, or top-k targets. Returns the reduced loss.
double linear_cross_entropy(const array_view& hidden, const array_view& weight,
                            const std::optional<array_view>& bias, const array_view& target,
                            const cross_entropy_options& options = {},
                            const linear_options& linear = {}, const linear_outputs& out = {});
double linear_cross_entropy(const array_view& hidden, const array_view& weight,
                            const std::optional<array_view>& bias, const topk& target,
                            const cross_entropy_options& options = {},
                            const linear_options& linear = {}, const linear_outputs& out = {});

// A teacher given by its hidden states: teacher logits = hidden · weightᵀ + bias, computed
// block by block like the student's (hidden (..., Dt) with the student's row shape, weight
// (V, Dt)); no gradient flows to it.
struct linear_teacher {
  array_view hidden;
  array_view weight;
  std::optional<array_view> bias;
};

// distillation_loss(hidden · weightᵀ + bias, teacher, options) with the class dimension
// last (options.dim must be unset or -1). The teacher is logits (..., V), a top-k of
// probabilities, or hidden states with their own output layer.
double linear_distillation_loss(const array_view& hidden, const array_view& weight,
                                const std::optional<array_view>& bias,
                                const array_view& teacher_logits,
                                const distillation_options& options = {},
                                const linear_options& linear = {}, const linear_outputs& out = {});
double linear_distillation_loss(const array_view& hidden, const array_view& weight,
                                const std::optional<array_view>& bias, const topk& teacher,
                                const distillation_options& options = {},
                                const linear_options& linear = {}, const linear_outputs& out = {});
double linear_distillation_loss(const array_view& hidden, const array_view& weight,
                                const std::optional<array_view>& bias,
                                const linear_teacher& teacher,
                                const distillation_options& options = {},
                                const linear_options& linear = {}, const linear_outputs& out = {});

}  // namespace softce
