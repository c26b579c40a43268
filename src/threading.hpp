// Splitting rows across threads (an OpenMP team: threading.cpp says why).
//
// Work is split into at most num_threads contiguous ranges; the caller's thread runs the
// first range. Results never depend on the split: callers write per-row (or per-block)
// partial results and reduce them in a fixed order afterwards.
#pragma once

#include <cstdint>
#include <functional>

namespace softce::detail {

// Runs body(begin, end) over [0, count) in contiguous ranges of at least `grain` items.
// Uses one thread when count <= grain. Exceptions from `body` are rethrown on the caller.
void parallel_for(std::int64_t count, std::int64_t grain,
                  const std::function<void(std::int64_t begin, std::int64_t end)>& body);

// Cost model for `grain`: a thread wake-up and join costs of the order of 5-10 us, while a
// fused loss pass costs ~0.3-1 ns per element, so a range should hold at least ~32k
// elements for the split to pay off.
inline constexpr std::int64_t min_elements_per_thread = 32 * 1024;
inline std::int64_t grain_for(std::int64_t elements_per_item) {
  std::int64_t per = elements_per_item > 0 ? elements_per_item : 1;
  std::int64_t grain = min_elements_per_thread / per;
  return grain > 0 ? grain : 1;
}

// Long rows (N small, C large): a row of more than `kRowPiece` classes is processed as
// pieces of kRowPiece classes (a multiple of kChunk, so the exp cache's chunk shifts line
// up), each piece's statistics computed on its own and merged with the row-statistics
// monoid in piece order. The pieces depend on C only, never on the thread count, so the
// merged statistics are bitwise identical however the pieces are spread over threads.
// Cost model (as ATen's SoftMaxKernel.cpp): a piece is 64k elements, ~20-60 us of work at
// 0.3-1 ns per element, against ~5-10 us to wake and join a thread; the merge costs a few
// exps per piece (~100 ns), under 0.5 % of the piece. Rows of up to 64k classes stay one
// piece (one kernel call, as before): the split pays only where a row is long enough that
// 2 threads each get >= 32k elements. When rows already fill the threads, the nested
// parallel_for runs the pieces on the row's thread -- except for rows of more than
// kSplitRowMin classes (row_driver.hpp), which run one at a time over all threads.
inline constexpr std::int64_t kRowPiece = 64 * 1024;

}  // namespace softce::detail
