// Cross-entropy with top-k targets and class weights or label smoothing: every class's
// target is needed then anyway, so each row's top-k is scattered into a dense row of zeros
// and the row runs as a dense probability target (no target gradient: the top-k arrays
// have none). Class-parallel: each shard scatters the entries of its own classes.
#include <algorithm>

#include "cross_entropy_rows.hpp"

namespace softce::detail {
namespace {

template <class T>
struct sparse_rows : ce_rows_base<T> {
  struct state {
    std::vector<T> dense;  // a top-k row scattered into zeros
  };
  const ce_setup<T>& s;
  const topk_operands& target;

  state make_state() const { return state{std::vector<T>(static_cast<std::size_t>(s.C))}; }
  bool piecewise() const { return false; }  // prepare() fills a dense row on the row's thread

  template <class Context>
  double prepare(Context& c, std::int64_t r) const {
    c.skip = !row_kept(s.mask, r);
    if (c.skip) return 0.0;
    std::vector<T>& dense = c.state.dense;
    std::fill(dense.begin(), dense.end(), T(0));
    const row_operand& ix = target.indices;
    const row_operand& vs = target.values;
    for (std::int64_t j = 0; j < target.k; ++j) {
      const std::int64_t local = load_index(ix.base, ix.type, ix.row_offset(r) + j * ix.class_stride) - s.offset;
      if (local >= 0 && local < s.C)
        dense[static_cast<std::size_t>(local)] = load_float<T>(vs.base, vs.type, vs.row_offset(r) + j * vs.class_stride);
    }
    c.desc.dense = dense.data();
    c.xr = c.x.row(r);
    return 0.0;
  }
};

}  // namespace

template <class T>
double cross_entropy_sparse_topk(const ce_call& call, const row_space& space, const topk_operands& target) {
  ce_setup<T> s = make_ce_setup<T>(call, space);
  if (s.plan.mode == reduction::mean) s.plan.denominator = static_cast<double>(count_kept(s.mask, space.rows));
  return run_ce_rows(s, sparse_rows<T>{{}, s, target});
}

template double cross_entropy_sparse_topk<float>(const ce_call&, const row_space&, const topk_operands&);
template double cross_entropy_sparse_topk<double>(const ce_call&, const row_space&, const topk_operands&);

}  // namespace softce::detail
