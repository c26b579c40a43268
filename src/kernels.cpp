// The kernel table: every SIMD row kernel, compiled for every x86/Arm target Highway knows
// (foreach_target re-includes this file once per target), and the best one present chosen
// at run time (HWY_DYNAMIC_DISPATCH). The kernel bodies are in the -inl.h files:
//   simd-inl.h                building blocks (exp/log that keep 0, -inf, NaN; partial vectors)
//   softmax_kernels-inl.h     softmax and probability / one-hot target statistics, gradients
//   bf16_kernels-inl.h        bfloat16 rows in place, 16-bit conversion
//   distill_kernels-inl.h     distillation (kl, reverse_kl, jsd)
//   elementwise_kernels-inl.h kl_div and binary cross-entropy
// This file only lists them, one table per target (kKernelSet), and exports the one
// function that hands a target's table out (kernels(), kernels.hpp).

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include <string>

#include "kernels.hpp"
#include "simd-inl.h"
#include "softmax_kernels-inl.h"
#include "bf16_kernels-inl.h"
#include "distill_kernels-inl.h"
#include "elementwise_kernels-inl.h"

HWY_BEFORE_NAMESPACE();
namespace softce::detail {
namespace HWY_NAMESPACE {

// One line of the table per kernel: a kernel declared in kernel_table but missing here is a
// compile error (GCC and clang check designated initializers with this warning).
#pragma GCC diagnostic push
#pragma GCC diagnostic error "-Wmissing-field-initializers"

template <class T>
constexpr kernel_table<T> TableFor() {
  return kernel_table<T>{
      .softmax_row_stats = &SoftmaxRowStats<T>,
      .softmax_row_grad_cached = &SoftmaxRowGradCached<T>,
      .softmax_row_grad = &SoftmaxRowGrad<T>,
      .scale_row = &ScaleRow<T>,
      .chunk_max = &ChunkMaxOf<T>,
      .exp_sum_excluding = &ExpSumExcluding<T>,
      .target_row_stats = &TargetRowStats<T>,
      .target_row_grad = &TargetRowGrad<T>,
      .target_row_grad_cached = &TargetRowGradCached<T>,
      .small_target_rows = &SmallTargetRows<T>,
      .small_row_classes = &SmallRowClasses<T>,
      .distill_row_stats = &DistillRowStats<T>,
      .distill_row_grad_kl_cached = &DistillRowGradKlCached<T>,
      .jsd_row_stats = &JsdRowStats<T>,
      .jsd_row_stats_cached = &JsdRowStatsCached<T>,
      .distill_row_grad_log_cached = &DistillRowGradLogCached<T>,
      .distill_row_grad_reverse_cached = &DistillRowGradReverseCached<T>,
      .distill_row_grad = &DistillRowGrad<T>,
      .kl_div_elements = &KlDivElements<T>,
      .bce_elements = &BceElements<T>,
  };
}

const char* TargetName() { return hwy::TargetName(HWY_TARGET); }

constexpr kernel_set kKernelSet{
    .f32 = TableFor<float>(),
    .f64 = TableFor<double>(),
    .half =
        {
            .target_row_stats_bf16 = &TargetRowStatsBf16,
            .target_row_grad_cached_bf16 = &TargetRowGradCachedBf16,
            .half_to_float = &HalfToFloat,
            .float_to_half = &FloatToHalf,
        },
    .target_name = &TargetName,
};
#pragma GCC diagnostic pop

const kernel_set* KernelSet() { return &kKernelSet; }

}  // namespace HWY_NAMESPACE
}  // namespace softce::detail
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace softce::detail {

HWY_EXPORT(KernelSet);

const kernel_set& kernels() { return *HWY_DYNAMIC_DISPATCH(KernelSet)(); }

std::string simd_target_name() { return kernels().target_name(); }

}  // namespace softce::detail
#endif  // HWY_ONCE
