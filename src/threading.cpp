// softce::set_num_threads and detail::parallel_for, on OpenMP.
//
// Why OpenMP and not a pool of our own: in a PyTorch process the intra-op threads are
// libgomp's, and after every parallel torch operation they spin for a while (libgomp's
// default wait policy) waiting for the next parallel region. A pool of our own woken right
// after a torch operation (the output layer that made the logits) then shares the cores
// with those spinning threads: on 2 cores the second softce thread ran at about half speed
// and a 2-thread call was no faster than a 1-thread one (bench/bench.py, the long-row and
// in-place cases). Running our ranges as an OpenMP parallel region puts them on those very
// threads (torch's libgomp is loaded by its soname, libgomp.so.1, so the process has one
// OpenMP runtime), which also start the work sooner than a condition-variable wake-up.
//
// Contracts kept from the pool it replaces:
//  - a parallel_for inside another (a long row's pieces inside a range of rows) runs on the
//    calling thread alone;
//  - calls from several user threads at once are safe (each gets its own team);
//  - an exception from a range is rethrown on the caller (the first one, in range order of
//    catching), after every range has finished;
//  - fork(): GNU libgomp cannot run a parallel region in a child forked after the parent ran
//    one (the child's team threads do not exist; it would hang). A child forked after softce
//    ran a parallel region therefore computes on its calling thread alone (as PyTorch's
//    DataLoader workers, which it sets to one thread); results are bitwise the same.
#include "threading.hpp"

#include <softce/softce.hpp>

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <string>
#include <thread>

namespace softce {
namespace {

int default_threads() {
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

std::atomic<int> requested_threads{default_threads()};
// The process that ran softce's first parallel region (0: none yet). In any other process
// (a fork of it) parallel regions are not safe with libgomp: run on one thread.
std::atomic<pid_t> parallel_pid{0};

bool may_run_parallel() {
  const pid_t me = getpid();
  pid_t owner = parallel_pid.load(std::memory_order_relaxed);
  if (owner == me) return true;
  if (owner == 0 && parallel_pid.compare_exchange_strong(owner, me)) return true;
  return owner == me;
}

}  // namespace

void set_num_threads(int threads) {
  if (threads < 1)
    throw error("set_num_threads: threads: expected a value >= 1, got " + std::to_string(threads));
  requested_threads.store(threads);
}

int get_num_threads() noexcept { return requested_threads.load(); }

namespace detail {

void parallel_for(std::int64_t count, std::int64_t grain,
                  const std::function<void(std::int64_t, std::int64_t)>& body) {
  if (count <= 0) return;
  grain = std::max<std::int64_t>(grain, 1);
  const std::int64_t ranges = std::min<std::int64_t>(requested_threads.load(), (count + grain - 1) / grain);
  if (ranges <= 1 || omp_in_parallel() || !may_run_parallel()) {
    body(0, count);
    return;
  }
  // The split depends on `ranges` only; a team smaller than asked (OMP_THREAD_LIMIT, nested
  // limits) runs several ranges per thread.
  std::exception_ptr error;
  std::mutex error_mutex;
#pragma omp parallel num_threads(static_cast<int>(ranges))
  {
    const int team = omp_get_num_threads();
    for (std::int64_t r = omp_get_thread_num(); r < ranges; r += team) {
      const std::int64_t begin = count * r / ranges, end = count * (r + 1) / ranges;
      if (begin >= end) continue;
      try {
        body(begin, end);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace detail
}  // namespace softce
