// Merging the class-parallel records (see shard_records.hpp).
#include "shard_records.hpp"

#include <cmath>

#include "row_stats.hpp"

namespace softce::detail {

void merge_ce_records(double* inout, const double* in, std::int64_t count) {
  auto* a = reinterpret_cast<ce_record*>(inout);
  const auto* b = reinterpret_cast<const ce_record*>(in);
  for (std::int64_t i = 0; i < count; ++i) {
    merge_into(a[i].st, b[i].st);
    a[i].target_weight += b[i].target_weight;
  }
}

void merge_topk(topk_record& acc, const topk_record& part, double inv_t) {
  if (std::isnan(acc.sum) || std::isnan(part.sum)) {  // a poisoned row stays poisoned
    acc.sum = kNaNValue;
    return;
  }
  const double shift = std::fmax(acc.shift, part.shift);
  if (shift != -kInf) {
    const double fa = rescale(acc.shift, shift, inv_t), fb = rescale(part.shift, shift, inv_t);
    double b_acc = acc.b, b_part = part.b;
    if (acc.a != 0.0 && acc.shift != -kInf) b_acc += acc.a * (acc.shift - shift) * inv_t;
    if (part.a != 0.0 && part.shift != -kInf) b_part += part.a * (part.shift - shift) * inv_t;
    acc.sum = acc.sum * fa + part.sum * fb;
    acc.e = acc.e * fa + part.e * fb;
    acc.b = b_acc + b_part;
  } else {
    acc.b += part.b;
  }
  acc.shift = shift;
  acc.a += part.a;
  const double tail_shift = std::fmax(acc.tail_shift, part.tail_shift);
  if (tail_shift != -kInf)
    acc.e_tail = acc.e_tail * rescale(acc.tail_shift, tail_shift, inv_t) +
                 part.e_tail * rescale(part.tail_shift, tail_shift, inv_t);
  acc.tail_shift = tail_shift;
}

void merge_topk_records(double* inout, const double* in, std::int64_t count) {
  auto* a = reinterpret_cast<topk_record*>(inout);
  const auto* b = reinterpret_cast<const topk_record*>(in);
  for (std::int64_t i = 0; i < count; ++i) merge_topk(a[i], b[i], 1.0);
}

void merge_distill_kl(double* inout, const double* in, std::int64_t count) {
  auto* a = reinterpret_cast<distill_stats*>(inout);
  const auto* b = reinterpret_cast<const distill_stats*>(in);
  for (std::int64_t i = 0; i < count; ++i) merge_into(a[i], b[i], 1.0, distill_kind::kl);
}

void merge_distill_reverse(double* inout, const double* in, std::int64_t count) {
  auto* a = reinterpret_cast<distill_stats*>(inout);
  const auto* b = reinterpret_cast<const distill_stats*>(in);
  for (std::int64_t i = 0; i < count; ++i) merge_into(a[i], b[i], 1.0, distill_kind::reverse_kl);
}

void merge_sums(double* inout, const double* in, std::int64_t count) {
  for (std::int64_t i = 0; i < count; ++i) inout[i] += in[i];
}

}  // namespace softce::detail
