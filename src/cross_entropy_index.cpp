// Cross-entropy with class-index targets (torch's nll_loss of log_softmax): each row's
// target is the one-hot of its class y (or, with label smoothing, keep * one-hot + add);
// ignore_index skips a row; mean divides by the total weight of the non-ignored targets.
// Class-parallel: the shard that owns y contributes the one-hot and its weight.
#include <string>
#include <vector>

#include "cross_entropy_rows.hpp"

namespace softce::detail {
namespace {

template <class T>
struct index_rows : ce_rows_base<T> {
  struct state {};
  const ce_setup<T>& s;
  row_operand t_op;
  std::int64_t ignore_index;

  state make_state() const { return {}; }

  std::int64_t label(std::int64_t r) const { return load_index(t_op.base, t_op.type, t_op.row_offset(r)); }

  // Returns the weight of the row's target on this shard (0 if another shard owns it).
  template <class Context>
  double prepare(Context& c, std::int64_t r) const {
    const std::int64_t y = label(r);
    c.skip = y == ignore_index;
    const std::int64_t local = y - s.offset;
    // Without smoothing a row uses the weight of its own class only, as torch's nll_loss:
    // w_y goes in as the one-hot's value, so a NaN or inf weight of a class no row uses
    // never meets a row (w_c * 0 would be NaN). With smoothing every weight is used.
    if (s.eps == 0.0) {
      c.desc.weight = nullptr;
      c.desc.keep = T(0);
    }
    double target_weight = 0.0;
    if (!c.skip && local >= 0 && local < s.C) {
      c.desc.onehot = local;
      target_weight = s.weight.empty() ? 1.0 : static_cast<double>(s.weight[static_cast<std::size_t>(local)]);
      if (s.eps == 0.0) c.desc.keep = static_cast<T>(target_weight);
    }
    if (!c.skip) c.xr = c.x.row(r);
    return target_weight;
  }

  // mean's denominator from every shard's target weights
  void after_exchange(ce_setup<T>& setup, std::vector<ce_record>& records) const {
    if (setup.plan.mode != reduction::mean) return;
    double total = 0.0;
    for (std::int64_t r = 0; r < setup.space.rows; ++r)
      if (label(r) != ignore_index) total += records[static_cast<std::size_t>(r)].target_weight;
    setup.plan.denominator = total;
    setup.coef = gradient_coef(setup.plan);
  }
};

// Validates every class index, and sums the weights of the non-ignored targets (mean's
// denominator, as torch's nll_loss; class-parallel: summed after the exchange).
template <class T>
double checked_target_weight(const ce_setup<T>& s, const index_rows<T>& rows) {
  double weight_total = 0.0;
  for (std::int64_t r = 0; r < s.space.rows; ++r) {
    const std::int64_t y = rows.label(r);
    if (y == rows.ignore_index) continue;
    if (y < 0 || y >= s.total_classes)
      fail(s.call.fn, "target", "class index " + std::to_string(y) + " at row " + std::to_string(r) +
                                    " is out of range for " + std::to_string(s.total_classes) + " classes",
           error_kind::index);
    if (!s.call.shard) weight_total += s.weight.empty() ? 1.0 : static_cast<double>(s.weight[static_cast<std::size_t>(y)]);
  }
  return weight_total;
}

}  // namespace

template <class T>
double cross_entropy_index(const ce_call& call, const row_space& space, const array_view& target) {
  ce_setup<T> s = make_ce_setup<T>(call, space);
  const index_rows<T> rows{{}, s, row_shaped_operand(space, target), call.options.ignore_index};
  const double weight_total = checked_target_weight(s, rows);
  if (s.plan.mode == reduction::mean) s.plan.denominator = weight_total;
  if (small_rows(s, nullptr)) {
    std::vector<std::int64_t> labels(static_cast<std::size_t>(space.rows));
    for (std::int64_t r = 0; r < space.rows; ++r) {
      const std::int64_t y = rows.label(r);  // checked above: ignore_index or in [0, C)
      labels[static_cast<std::size_t>(r)] = y == rows.ignore_index ? -1 : y;
    }
    return run_small_rows(s, nullptr, labels.data());
  }
  return run_ce_rows(s, rows);
}

template double cross_entropy_index<float>(const ce_call&, const row_space&, const array_view&);
template double cross_entropy_index<double>(const ce_call&, const row_space&, const array_view&);

}  // namespace softce::detail
