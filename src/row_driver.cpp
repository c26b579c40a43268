// The row driver's non-template half: reduction, row mask, per-row losses output.
#include "row_driver.hpp"

#include <string>

namespace softce::detail {

double ce_loss_from_log(double a, double log_sum, double b) { return a * log_sum - b; }

double reduce_total(double total, const reduce_plan& plan) {
  if (plan.mode == reduction::mean || plan.mode == reduction::batchmean)
    return plan.denominator == 0.0 ? kNaN : total / plan.denominator;
  return total;
}

double finish_reduction(const std::vector<double>& row_losses, const reduce_plan& plan) {
  double total = 0.0;
  for (double v : row_losses) total += v;
  return reduce_total(total, plan);
}

double gradient_coef(const reduce_plan& plan) {
  if (plan.mode == reduction::mean || plan.mode == reduction::batchmean)
    return plan.denominator == 0.0 ? 0.0 : 1.0 / plan.denominator;
  return 1.0;
}

void write_row_losses(const outputs& out, const row_space& space, const std::vector<double>& row_losses) {
  if (!out.losses) return;
  const row_operand op = row_shaped_operand(space, *out.losses);
  char* base = const_cast<char*>(op.base);
  for (std::int64_t r = 0; r < space.rows; ++r)
    store_float<double>(base, op.type, op.row_offset(r), row_losses[static_cast<std::size_t>(r)]);
}

std::optional<row_operand> mask_operand(std::string_view fn, const std::optional<array_view>& mask,
                                        const row_space& space) {
  if (!mask) return std::nullopt;
  check_row_shape(fn, "mask", *mask, space);
  if (mask->type != dtype::boolean)
    fail(fn, "mask", "expected a bool array, got " + std::string(dtype_name(mask->type)), error_kind::type);
  return row_shaped_operand(space, *mask);
}

std::int64_t count_kept(const std::optional<row_operand>& mask, std::int64_t rows) {
  if (!mask) return rows;
  std::int64_t kept = 0;
  for (std::int64_t r = 0; r < rows; ++r)
    kept += reinterpret_cast<const bool*>(mask->base)[mask->row_offset(r)] ? 1 : 0;
  return kept;
}

}  // namespace softce::detail
