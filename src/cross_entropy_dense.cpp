// Cross-entropy with dense probability targets (the soft-label case): every class's target
// is read, a row mask may exclude rows, and the target's gradient may be asked for.
// bfloat16 logits, targets and gradient in contiguous rows (no class weights, one process,
// no target gradient) are read and written in place by the 16-bit kernels, without staging.
#include <algorithm>
#include <type_traits>

#include "cross_entropy_rows.hpp"

namespace softce::detail {
namespace {

template <class T>
struct dense_rows : ce_rows_base<T> {
  struct state {
    row_reader<T> t;
  };
  const ce_setup<T>& s;
  row_operand t_op;

  state make_state() const { return state{row_reader<T>(&t_op)}; }
  bool piecewise() const { return direct_rows<T>(t_op); }

  template <class Context>
  double prepare(Context& c, std::int64_t r) const {
    c.skip = !row_kept(s.mask, r);
    if (!c.skip) c.desc.dense = c.state.t.row(r);
    if (!c.skip) c.xr = c.x.row(r);
    return 0.0;
  }
};

// bfloat16 rows read in place: the statistics pass widens them in registers and leaves its
// exps in a float scratch row; the gradient pass rounds straight into the bfloat16 output.
struct bf16_rows {
  struct state {
    const std::uint16_t* x16 = nullptr;
    const std::uint16_t* t16 = nullptr;
    scratch_row<float> ecache;  // the exp cache
  };
  const ce_setup<float>& s;
  row_operand t_op;
  const half_kernel_table& half;

  state make_state() const {
    state st;
    if (s.g_op) st.ecache = scratch_row<float>(static_cast<std::size_t>(s.C));
    return st;
  }
  bool piecewise() const { return false; }  // 16-bit rows: not measured one at a time

  template <class Context>
  double prepare(Context& c, std::int64_t r) const {
    c.skip = !row_kept(s.mask, r);
    if (!c.skip) {
      c.state.x16 = s.x_op.template ptr<std::uint16_t>(s.x_op.row_offset(r));
      c.state.t16 = t_op.template ptr<std::uint16_t>(t_op.row_offset(r));
    }
    return 0.0;
  }

  template <class Context>
  ce_record stats(const ce_setup<float>&, Context& c, std::int64_t, double target_weight) const {
    if (c.skip) return ce_record{{-kInf, 0.0, 0.0, 0.0}, 0.0};
    exp_cache<float> cache;
    if (c.g) cache = exp_cache<float>{c.state.ecache.data(), c.shifts.data()};
    const target_stats st = row_stats_in_pieces<target_stats>(
        s.C,
        [&](std::int64_t c0, std::int64_t len) {
          return half.target_row_stats_bf16(c.state.x16 + c0, c.state.t16 + c0, len, c.desc.keep, c.desc.add,
                                            cache_from(cache, c0));
        },
        merge_target);
    return ce_record{st, target_weight};
  }

  template <class Context>
  double finish(const ce_setup<float>&, Context& c, std::int64_t r, const ce_record& rec) const {
    if (c.skip || nothing_to_average(s)) {
      if (c.g) c.g->zero_row(r);
      return 0.0;
    }
    std::uint16_t* g16 = c.g ? const_cast<std::uint16_t*>(s.g_op->template ptr<std::uint16_t>(s.g_op->row_offset(r)))
                             : nullptr;
    if (ce_row_poisoned(rec.st)) {
      if (g16) std::fill(g16, g16 + s.C, float_to_bf16(std::numeric_limits<float>::quiet_NaN()));
      return kNaN;
    }
    if (g16) {  // written straight into the bfloat16 output row
      const exp_cache<float> cache{c.state.ecache.data(), c.shifts.data()};
      const row_normaliser<float> norm = normaliser<float>(rec.st.shift, rec.st.sum);
      row_in_pieces(s.C, [&](std::int64_t c0, std::int64_t len) {
        half.target_row_grad_cached_bf16(cache_from(cache, c0), c.state.t16 + c0, len, c.desc.keep, c.desc.add, norm,
                                         static_cast<float>(rec.st.a), static_cast<float>(s.coef), g16 + c0);
      });
    }
    return ce_row_loss(rec.st);
  }

  void after_exchange(ce_setup<float>&, std::vector<ce_record>&) const {}
};

// bfloat16 logits, probability targets and gradient, contiguous rows, no class weights,
// one process, no target gradient.
template <class T>
bool bf16_in_place(const ce_setup<T>& s, const row_operand& t_op) {
  return std::is_same_v<T, float> && s.weight.empty() && !s.call.shard && !s.gt_op &&
         s.x_op.type == dtype::bfloat16 && s.x_op.contiguous_rows() && t_op.type == dtype::bfloat16 &&
         t_op.contiguous_rows() && (!s.g_op || (s.g_op->type == dtype::bfloat16 && s.g_op->contiguous_rows()));
}

}  // namespace

template <class T>
double cross_entropy_probabilities(const ce_call& call, const row_space& space, const array_view& target) {
  ce_setup<T> s = make_ce_setup<T>(call, space);
  const row_operand t_op = class_operand(space, target);
  if (s.plan.mode == reduction::mean) s.plan.denominator = static_cast<double>(count_kept(s.mask, space.rows));
  if constexpr (std::is_same_v<T, float>) {
    if (bf16_in_place(s, t_op)) return run_ce_rows(s, bf16_rows{s, t_op, kernels().half});
  }
  if (small_rows(s, &t_op)) return run_small_rows(s, &t_op, nullptr);
  return run_ce_rows(s, dense_rows<T>{{}, s, t_op});
}

template double cross_entropy_probabilities<float>(const ce_call&, const row_space&, const array_view&);
template double cross_entropy_probabilities<double>(const ce_call&, const row_space&, const array_view&);

}  // namespace softce::detail
