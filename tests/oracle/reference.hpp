// softce reference: the oracle the tests compare the fast kernels against.
//
// Plain scalar code, float64 arithmetic throughout, one row at a time, written straight from
// docs/semantics.md. It shares no code with the fast kernels (only the public view and option
// types of softce.hpp), so a mistake in a kernel cannot hide by being repeated here. It reads
// every dtype and any strides (zero, negative, permuted), writes outputs of any float dtype
// rounded to nearest-even, allows the gradient to be the input itself, and assumes valid
// arguments (no validation: call the public function first if the arguments may be bad).
#pragma once

#include <softce/softce.hpp>

#include <cstdint>
#include <optional>

namespace softce::reference {

// The losses: the same signatures and contracts as softce.hpp.
double cross_entropy(const array_view& input, const array_view& target,
                     const cross_entropy_options& options = {}, const outputs& out = {});
double cross_entropy(const array_view& input, const topk& target,
                     const cross_entropy_options& options = {}, const outputs& out = {});
double cross_entropy_with_probs(const array_view& input, const array_view& target,
                                std::optional<array_view> weight = std::nullopt,
                                reduction reduce = reduction::mean, const outputs& out = {});
double kl_div(const array_view& input, const array_view& target,
              const kl_div_options& options = {}, const outputs& out = {});
double binary_cross_entropy_with_logits(const array_view& input, const array_view& target,
                                        const bce_options& options = {},
                                        const outputs& out = {});
double distillation_loss(const array_view& student_logits, const array_view& teacher_logits,
                         const distillation_options& options = {}, const outputs& out = {});
double distillation_loss(const array_view& student_logits, const topk& teacher,
                         const distillation_options& options = {}, const outputs& out = {});

// Element access, also used by the tests to fill and read views. `index` has view.ndim
// entries. Integer and bool elements load as their value; stores round to nearest-even.
double load(const array_view& view, const std::int64_t* index);
std::int64_t load_integer(const array_view& view, const std::int64_t* index);
void store(const mutable_array_view& view, const std::int64_t* index, double value);

// IEEE binary16 and bfloat16 conversions (correctly rounded from double, nearest-even).
std::uint16_t float16_bits(double value);
std::uint16_t bfloat16_bits(double value);
double from_float16_bits(std::uint16_t bits);
double from_bfloat16_bits(std::uint16_t bits);

}  // namespace softce::reference
