// The public entry points of the row losses (cross_entropy, cross_entropy_with_probs,
// distillation_loss and their class-parallel forms): validation at the boundary, then a
// small router to the driver of the target kind (loss_drivers.hpp), in the compute type.
//
// Data flow of one call:
//   validate (validate.hpp) -> per row: stage the row if needed (staging.hpp), statistics
//   pass (kernels, through the kernel table), loss from the statistics, gradient pass while
//   the row is in cache -> per-row losses summed in row order (bitwise identical for any
//   thread count); the row driver (row_driver.hpp) runs this for every target kind.
// In class-parallel mode (class_parallel.hpp) the statistics of all rows are computed
// first, combined across shards by the caller's all-reduce (shard_records.hpp), and the
// loss and gradient passes follow.
#include <softce/class_parallel.hpp>
#include <softce/softce.hpp>

#include <cmath>
#include <string>

#include "kernels.hpp"
#include "loss_drivers.hpp"
#include "validate.hpp"

namespace softce {
using namespace detail;

namespace {

double validate_smoothing(std::string_view fn, double eps) {
  if (!(eps >= 0.0 && eps <= 1.0))
    fail(fn, "label_smoothing", "expected a value in [0, 1], got " + format_number(eps));
  return eps;
}

// ---------------------------------------------------------------------------------------
// public entry points (shared by the single-process and class-parallel forms)

bool computes_in_double(const array_view& input) { return input.type == dtype::float64; }

void check_shard(std::string_view fn, const class_shard* shard, const row_space& space) {
  if (!shard) return;
  if (!shard->all_reduce) fail(fn, "shard", "expected an all_reduce function, got none");
  // the end of the shard's class range, overflow-checked (an offset near 2^63 would wrap)
  std::int64_t end = 0;
  if (__builtin_add_overflow(shard->class_offset, space.classes, &end))
    fail(fn, "shard", "class_offset " + std::to_string(shard->class_offset) + " plus " +
                          std::to_string(space.classes) + " classes overflows a 64-bit index");
  if (shard->class_offset < 0 || end > shard->num_classes)
    fail(fn, "shard", "expected classes [" + std::to_string(shard->class_offset) + ", " + std::to_string(end) +
                          ") to lie within " + std::to_string(shard->num_classes) + " classes");
}

double cross_entropy_entry(const array_view& input, const array_view& target, const cross_entropy_options& opt,
                           const outputs& out, const class_shard* shard, std::string_view fn = "cross_entropy") {
  const row_space space = logits_space(fn, input);
  check_shard(fn, shard, space);
  check_reduction(fn, opt.reduce, {reduction::none, reduction::mean, reduction::sum});
  validate_smoothing(fn, opt.label_smoothing);
  check_extent(fn, "target", target);
  const bool index_target = is_index(target.type);
  if (index_target) {
    check_row_shape(fn, "target", target, space);
    if (opt.mask) fail(fn, "mask", "expected no mask with class-index targets (use ignore_index)");
  } else if (is_float(target.type)) {
    check_same_shape(fn, "target", target, input, "input");
    if (opt.ignore_index >= 0)  // as torch: probability targets have no ignore_index
      fail(fn, "ignore_index", "expected no ignore_index with probability targets (use mask), got " +
                                   std::to_string(opt.ignore_index));
  } else {
    fail(fn, "target", "expected class indices (int32/int64) or probabilities (float), got " +
                           std::string(dtype_name(target.type)), error_kind::type);
  }
  if (opt.weight) check_class_vector(fn, "weight", *opt.weight, space.classes);
  check_outputs(fn, out, input, space.dims, space.ndim, opt.reduce);
  check_aliasing(fn, out, {{"target", target}, {"weight", opt.weight}, {"mask", opt.mask}});
  check_grad_target(fn, out, index_target ? nullptr : &target, "target", "with class-index targets (no gradient)");
  const ce_call call{fn, input, opt, out, shard};
  if (index_target)
    return computes_in_double(input) ? cross_entropy_index<double>(call, space, target)
                                     : cross_entropy_index<float>(call, space, target);
  return computes_in_double(input) ? cross_entropy_probabilities<double>(call, space, target)
                                   : cross_entropy_probabilities<float>(call, space, target);
}

double cross_entropy_topk_entry(const array_view& input, const topk& target, const cross_entropy_options& opt,
                                const outputs& out, const class_shard* shard) {
  constexpr std::string_view fn = "cross_entropy";
  const row_space space = logits_space(fn, input);
  check_shard(fn, shard, space);
  check_reduction(fn, opt.reduce, {reduction::none, reduction::mean, reduction::sum});
  validate_smoothing(fn, opt.label_smoothing);
  if (opt.weight) check_class_vector(fn, "weight", *opt.weight, space.classes);
  check_outputs(fn, out, input, space.dims, space.ndim, opt.reduce);
  check_aliasing(fn, out, {{"target.indices", target.indices}, {"target.values", target.values},
                           {"weight", opt.weight}, {"mask", opt.mask}});
  check_grad_target(fn, out, nullptr, "target", "with top-k targets (only dense probability targets have one)");
  if (target.tail && (opt.weight || opt.label_smoothing != 0.0))
    fail(fn, "target.tail", "expected no class weight and no label smoothing with a tail bucket");
  if (opt.weight || opt.label_smoothing != 0.0) {
    const topk_operands ops = validate_topk(fn, "target", target, space, shard ? shard->num_classes : space.classes);
    const ce_call call{fn, input, opt, out, shard};
    return computes_in_double(input) ? cross_entropy_sparse_topk<double>(call, space, ops)
                                     : cross_entropy_sparse_topk<float>(call, space, ops);
  }
  return computes_in_double(input)
             ? topk_loss<double>(fn, input, target, opt.mask, opt.reduce, out, shard, 1.0, false)
             : topk_loss<float>(fn, input, target, opt.mask, opt.reduce, out, shard, 1.0, false);
}

void check_distillation_options(std::string_view fn, const distillation_options& opt) {
  if (!(opt.temperature > 0.0) || !std::isfinite(opt.temperature))
    fail(fn, "temperature", "expected a finite value > 0, got " + format_number(opt.temperature));
  // the kernels scale by 1 / T in float32: an infinite factor would turn x - max = 0 into NaN
  if (!std::isfinite(static_cast<float>(1.0 / opt.temperature)))
    fail(fn, "temperature", "expected a value whose reciprocal is finite in float32, got " +
                                format_number(opt.temperature));
  if (!(opt.beta >= 0.0 && opt.beta <= 1.0))
    fail(fn, "beta", "expected a value in [0, 1], got " + format_number(opt.beta));
}

double distillation_entry(const array_view& student_logits, const array_view& teacher_logits,
                          const distillation_options& opt, const outputs& out_logits, const class_shard* shard) {
  constexpr std::string_view fn = "distillation_loss";
  // the class dimension moved to index 1 (options.dim)
  const class_first_views views = distillation_layout(fn, opt, student_logits, &teacher_logits, out_logits);
  const array_view &student = views.student, &teacher = views.teacher;
  const outputs& out = views.out;
  const row_space space = logits_space(fn, student);
  check_shard(fn, shard, space);
  check_distillation_options(fn, opt);
  check_float(fn, "teacher", teacher);
  check_same_shape(fn, "teacher", teacher, student, "student");
  check_outputs(fn, out, student, space.dims, space.ndim, opt.reduce);
  check_aliasing(fn, out, {{"teacher", teacher}, {"mask", opt.mask}});
  check_grad_target(fn, out, &teacher, "teacher");
  return computes_in_double(student) ? distillation_dense<double>(fn, student, teacher, opt, out, shard)
                                     : distillation_dense<float>(fn, student, teacher, opt, out, shard);
}

double distillation_topk_entry(const array_view& student_logits, const topk& teacher, const distillation_options& opt,
                               const outputs& out_logits, const class_shard* shard) {
  constexpr std::string_view fn = "distillation_loss";
  // the class dimension moved to index 1 (options.dim)
  const class_first_views views = distillation_layout(fn, opt, student_logits, nullptr, out_logits);
  const array_view& student = views.student;
  const outputs& out = views.out;
  const row_space space = logits_space(fn, student);
  check_shard(fn, shard, space);
  check_distillation_options(fn, opt);
  if (opt.kind != divergence::kl)
    fail(fn, "teacher", "expected teacher logits for divergence '" + std::string(divergence_name(opt.kind)) +
                            "' (a top-k teacher supports 'kl' only)");
  check_outputs(fn, out, student, space.dims, space.ndim, opt.reduce);
  check_aliasing(fn, out, {{"teacher.indices", teacher.indices}, {"teacher.values", teacher.values}, {"mask", opt.mask}});
  check_grad_target(fn, out, nullptr, "teacher", "with a top-k teacher (no teacher logits)");
  return computes_in_double(student)
             ? topk_loss<double>(fn, student, teacher, opt.mask, opt.reduce, out, shard, opt.temperature, true)
             : topk_loss<float>(fn, student, teacher, opt.mask, opt.reduce, out, shard, opt.temperature, true);
}

}  // namespace

double cross_entropy(const array_view& input, const array_view& target, const cross_entropy_options& options,
                     const outputs& out) {
  return cross_entropy_entry(input, target, options, out, nullptr);
}

double cross_entropy(const array_view& input, const topk& target, const cross_entropy_options& options,
                     const outputs& out) {
  return cross_entropy_topk_entry(input, target, options, out, nullptr);
}

double cross_entropy_with_probs(const array_view& input, const array_view& target, std::optional<array_view> weight,
                                reduction reduce, const outputs& out) {
  check_reduction("cross_entropy_with_probs", reduce, {reduction::none, reduction::mean, reduction::sum});
  if (!is_float(target.type))
    fail("cross_entropy_with_probs", "target",
         "expected probabilities (float), got " + std::string(dtype_name(target.type)), error_kind::type);
  cross_entropy_options opt;
  opt.weight = weight;
  opt.reduce = reduce;
  return cross_entropy_entry(input, target, opt, out, nullptr, "cross_entropy_with_probs");
}

double distillation_loss(const array_view& student_logits, const array_view& teacher_logits,
                         const distillation_options& options, const outputs& out) {
  return distillation_entry(student_logits, teacher_logits, options, out, nullptr);
}

double distillation_loss(const array_view& student_logits, const topk& teacher, const distillation_options& options,
                         const outputs& out) {
  return distillation_topk_entry(student_logits, teacher, options, out, nullptr);
}

std::string simd_target() { return simd_target_name(); }

namespace class_parallel {
double cross_entropy(const class_shard& shard, const array_view& input, const array_view& target,
                     const cross_entropy_options& options, const outputs& out) {
  return cross_entropy_entry(input, target, options, out, &shard);
}
double cross_entropy(const class_shard& shard, const array_view& input, const topk& target,
                     const cross_entropy_options& options, const outputs& out) {
  return cross_entropy_topk_entry(input, target, options, out, &shard);
}
double distillation_loss(const class_shard& shard, const array_view& student_logits,
                         const array_view& teacher_logits, const distillation_options& options,
                         const outputs& out) {
  return distillation_entry(student_logits, teacher_logits, options, out, &shard);
}
double distillation_loss(const class_shard& shard, const array_view& student_logits, const topk& teacher,
                         const distillation_options& options, const outputs& out) {
  return distillation_topk_entry(student_logits, teacher, options, out, &shard);
}
}  // namespace class_parallel

}  // namespace softce
