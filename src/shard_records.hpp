// The records the class-parallel all-reduce exchanges (plain doubles, merged in shard
// order with the row-statistics monoid), one kind per row loss, and the call that sends
// them through a shard's all-reduce.
#pragma once

#include <softce/class_parallel.hpp>

#include <cstdint>
#include <initializer_list>
#include <vector>

#include "kernels.hpp"

namespace softce::detail {

// Cross-entropy with dense, one-hot or scattered top-k targets.
struct ce_record {
  target_stats st;
  double target_weight;  // index targets: w[y] on the shard that owns y, else 0
};
static_assert(sizeof(ce_record) == 5 * sizeof(double));

// Top-k targets: softmax statistics of x / T plus, over the top-k entries, a = Σ v,
// b = Σ v (x_k - shift) / T and e = Σ exp((x_k - shift) / T); with a tail bucket also the
// sum outside the top k, e_tail, summed directly (1 - Q = e_tail / sum without the
// cancellation of 1 - e / sum when almost all the mass is in the top k). e_tail is taken
// against its own shift, tail_shift: the row's shift normally, the max outside the top k
// when the tail is so far below the row's max that float exps of it underflow (a gap of
// ~88 made log(1 - Q) = -inf although the exact value is finite).
// Shifts are kept in units of x / T while records travel, so merging needs no temperature.
struct topk_record {
  double shift, sum, a, b, e, e_tail, tail_shift;
};

void merge_topk(topk_record& acc, const topk_record& part, double inv_t);

// row_stats_merge_fn's for each record kind (distillation sends distill_stats, the JSD's
// second pass plain sums)
void merge_ce_records(double* inout, const double* in, std::int64_t count);
void merge_topk_records(double* inout, const double* in, std::int64_t count);
void merge_distill_kl(double* inout, const double* in, std::int64_t count);
void merge_distill_reverse(double* inout, const double* in, std::int64_t count);
void merge_sums(double* inout, const double* in, std::int64_t count);

// Calls the shard's all-reduce on an array of records; the shift fields (given by their
// positions) are scaled by inv_t on the way so that merges need no temperature.
template <class Record>
void all_reduce_records(const class_shard& shard, std::vector<Record>& records, row_stats_merge_fn merge,
                        std::initializer_list<int> shift_fields, double inv_t) {
  constexpr int width = sizeof(Record) / sizeof(double);
  auto* data = reinterpret_cast<double*>(records.data());
  const std::int64_t count = static_cast<std::int64_t>(records.size());
  if (inv_t != 1.0)
    for (std::int64_t i = 0; i < count; ++i)
      for (int f : shift_fields) data[i * width + f] *= inv_t;
  shard.all_reduce(data, count, width, merge);
  if (inv_t != 1.0)
    for (std::int64_t i = 0; i < count; ++i)
      for (int f : shift_fields) data[i * width + f] /= inv_t;
}

}  // namespace softce::detail
