// The row driver shared by every row loss (cross-entropy of each target kind, top-k,
// distillation) and, for the reduction, by the element-wise losses:
//   - the reduction plan: the denominator of mean / batchmean, the gradient's factor, and
//     the fixed-order sum of per-row losses (bitwise identical for any thread count);
//   - the row mask and the per-row losses output;
//   - run_rows: statistics and finish per row back to back (single process), or all
//     statistics, the class-parallel all-reduce, then all finishes (sharded);
//   - long rows in pieces: a row of more than kRowPiece classes (threading.hpp) has its
//     statistics computed piece by piece, merged with the row-statistics monoid in order;
//     rows of more than kSplitRowMin classes may run one at a time, each over all threads.
#pragma once

#include <softce/softce.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <vector>

#include "kernels.hpp"
#include "row_stats.hpp"
#include "staging.hpp"
#include "threading.hpp"
#include "validate.hpp"

namespace softce::detail {

inline constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---------------------------------------------------------------------------------------
// the reduction

struct reduce_plan {
  reduction mode;
  double denominator;  // for mean / batchmean; 1 otherwise
};

// The reduction's division of a total. With a denominator of 0 (no valid rows) the result
// is NaN, as in PyTorch.
double reduce_total(double total, const reduce_plan& plan);

// Sum of per-row losses in row order, then the reduction's division.
double finish_reduction(const std::vector<double>& row_losses, const reduce_plan& plan);

// The factor of the gradient: 1 for none/sum, 1/denominator for mean (0 when there is
// nothing to average: every row has a zero gradient then).
double gradient_coef(const reduce_plan& plan);

void write_row_losses(const outputs& out, const row_space& space, const std::vector<double>& row_losses);

// ---------------------------------------------------------------------------------------
// the row mask (true keeps the row)

std::optional<row_operand> mask_operand(std::string_view fn, const std::optional<array_view>& mask,
                                        const row_space& space);

// The number of kept rows.
std::int64_t count_kept(const std::optional<row_operand>& mask, std::int64_t rows);

inline bool row_kept(const std::optional<row_operand>& mask, std::int64_t r) {
  return !mask || reinterpret_cast<const bool*>(mask->base)[mask->row_offset(r)];
}

// ---------------------------------------------------------------------------------------
// rows

// Rows longer than this (1 MiB of float32 logits, as much of targets) may run one at a
// time, each row's pieces over the threads, however many rows there are (run_rows): a
// thread's share of a row then fits its core's cache better, so the gradient pass finds
// more of what the statistics pass read (N = 8, C = 1M, dense soft CE in place, 2 threads,
// Intel Xeon AVX-512: 6.2/6.4 -> 5.4/5.4 ms with the gradient's pieces in reverse order).
// The pieces, and so the results, do not depend on the thread count.
inline constexpr std::int64_t kSplitRowMin = 256 * 1024;

// Whether run_rows takes rows one at a time over all threads: more than one row, rows
// longer than kSplitRowMin, at least as many pieces per row as threads (no thread idles),
// and `piecewise`: the caller says every pass over a row runs in pieces (row_in_pieces /
// row_stats_in_pieces) -- no staged copy of a row, no target or teacher gradient, nothing
// else over the whole row that the row's thread would then do alone while the team waits.
inline bool rows_one_at_a_time(std::int64_t rows, std::int64_t row_length, bool piecewise) {
  return piecewise && rows > 1 && row_length > kSplitRowMin &&
         (row_length + kRowPiece - 1) / kRowPiece >= get_num_threads();
}

// Runs `rows` rows. Single process: stats and finish per row back to back (the row stays
// in cache); rows that qualify (rows_one_at_a_time) one at a time, each over all threads.
// Class-parallel: all stats, the all-reduce (inside `exchange`), then finish.
template <class Context, class Stats, class StatsFn, class FinishFn, class ExchangeFn>
void run_rows(std::int64_t rows, std::int64_t row_length, bool sharded, bool piecewise, const Context& make_context,
              StatsFn stats_fn, ExchangeFn exchange, FinishFn finish_fn, std::vector<double>& row_losses) {
  const std::int64_t grain = grain_for(row_length);
  if (!sharded && rows_one_at_a_time(rows, row_length, piecewise)) {
    auto ctx = make_context();
    for (std::int64_t r = 0; r < rows; ++r) {
      Stats st = stats_fn(ctx, r);
      row_losses[static_cast<std::size_t>(r)] = finish_fn(ctx, r, st);
    }
    return;
  }
  if (!sharded) {
    parallel_for(rows, grain, [&](std::int64_t begin, std::int64_t end) {
      auto ctx = make_context();
      for (std::int64_t r = begin; r < end; ++r) {
        Stats st = stats_fn(ctx, r);
        row_losses[static_cast<std::size_t>(r)] = finish_fn(ctx, r, st);
      }
    });
    return;
  }
  std::vector<Stats> all(static_cast<std::size_t>(rows));
  parallel_for(rows, grain, [&](std::int64_t begin, std::int64_t end) {
    auto ctx = make_context();
    for (std::int64_t r = begin; r < end; ++r) all[static_cast<std::size_t>(r)] = stats_fn(ctx, r);
  });
  exchange(all);
  parallel_for(rows, grain, [&](std::int64_t begin, std::int64_t end) {
    auto ctx = make_context();
    for (std::int64_t r = begin; r < end; ++r)
      row_losses[static_cast<std::size_t>(r)] = finish_fn(ctx, r, all[static_cast<std::size_t>(r)]);
  });
}

// ---------------------------------------------------------------------------------------
// long rows in pieces (kRowPiece in threading.hpp: the split and its cost model)

static_assert(kRowPiece % kChunk == 0, "pieces must hold whole chunks (the exp cache's chunk shifts)");

// A row's statistics: piece(begin, length) for each piece of kRowPiece classes (spread over
// the threads when the caller's thread is free to split), merged with merge(acc, part) in
// piece order, so the result never depends on the thread count. A row of at most
// kRowPiece classes is one piece: one call on this thread.
template <class Stats, class PieceFn, class MergeFn>
[[gnu::noinline]] Stats row_stats_split(std::int64_t C, PieceFn& piece, MergeFn& merge) {
  const std::int64_t pieces = (C + kRowPiece - 1) / kRowPiece;
  std::vector<Stats> parts(static_cast<std::size_t>(pieces));
  parallel_for(pieces, 1, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t p = begin; p < end; ++p) {
      const std::int64_t c0 = p * kRowPiece;
      parts[static_cast<std::size_t>(p)] = piece(c0, std::min(kRowPiece, C - c0));
    }
  });
  Stats acc = parts[0];
  for (std::size_t p = 1; p < parts.size(); ++p) merge(acc, parts[p]);
  return acc;
}

// (the short row inline at the call site: a 64 x 10 call is ~9 us, a function call per
// row and pass shows)
template <class Stats, class PieceFn, class MergeFn>
[[gnu::always_inline]] inline Stats row_stats_in_pieces(std::int64_t C, PieceFn piece, MergeFn merge) {
  if (C <= kRowPiece) [[likely]]
    return piece(std::int64_t{0}, C);
  return row_stats_split<Stats>(C, piece, merge);
}

template <class PieceFn>
[[gnu::noinline]] void row_split(std::int64_t C, PieceFn& piece) {
  parallel_for((C + kRowPiece - 1) / kRowPiece, 1, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t p = end - 1; p >= begin; --p) {
      const std::int64_t c0 = p * kRowPiece;
      piece(c0, std::min(kRowPiece, C - c0));
    }
  });
}

// An element-wise pass over a row (the gradient): piece(begin, length) for each piece.
// Each thread walks its pieces last to first: the statistics pass walked them first to
// last, so the pieces it read last (still in this core's cache when the row is longer than
// the cache) are read again first. Bitwise the same results in any order (element-wise).
template <class PieceFn>
[[gnu::always_inline]] inline void row_in_pieces(std::int64_t C, PieceFn piece) {
  if (C <= kRowPiece) [[likely]] {
    piece(std::int64_t{0}, C);
    return;
  }
  row_split(C, piece);
}

// The part of an exp cache (or of a target) that belongs to classes [c0, c0 + length).
template <class T>
exp_cache<T> cache_from(exp_cache<T> cache, std::int64_t c0) {
  return exp_cache<T>{cache.e ? cache.e + c0 : nullptr, cache.shifts ? cache.shifts + c0 / kChunk : nullptr};
}

template <class T>
target_desc<T> desc_slice(const target_desc<T>& t, std::int64_t c0, std::int64_t length) {
  target_desc<T> s = t;
  if (t.dense) s.dense = t.dense + c0;
  if (t.weight) s.weight = t.weight + c0;
  s.onehot = t.onehot >= c0 && t.onehot < c0 + length ? t.onehot - c0 : -1;
  return s;
}

inline void merge_target(target_stats& acc, const target_stats& part) { merge_into(acc, part); }

// The number of exp-cache chunk shifts of a row of C classes.
inline std::size_t chunk_count(std::int64_t C) { return static_cast<std::size_t>((C + kChunk - 1) / kChunk); }

}  // namespace softce::detail
