// Persistent worker threads behind softce::set_num_threads and detail::parallel_for.
//
// One job runs at a time (calls from several user threads take turns on a mutex; a call
// made while the pool is busy, or from inside a worker, runs on the calling thread alone,
// so concurrent Python threads never deadlock). Workers sleep on a condition variable
// between jobs. After fork() the child starts a fresh pool.
#include "threading.hpp"

#include <softce/softce.hpp>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace softce {
namespace {

int default_threads() {
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

std::atomic<int> requested_threads{default_threads()};
thread_local bool inside_worker = false;
// True on a thread while it runs its part of a job (the caller's range 0 included): a
// nested parallel_for (a long row's pieces inside a row range) then runs on that thread
// alone instead of re-locking the job mutex it already holds.
thread_local bool inside_job = false;

class pool {
 public:
  static pool& instance() {
    static pool* p = new pool();  // never destroyed: workers may outlive static destructors
    if (p->owner_pid_ != getpid()) p = new pool();  // forked child: the old workers are gone
    return *p;
  }

  // Runs ranges[i] for i in [0, ranges) on up to `ranges` threads; returns false if the
  // pool is busy (the caller then runs everything itself).
  bool run(int ranges, const std::function<void(int)>& task) {
    std::unique_lock<std::mutex> busy(job_mutex_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    ensure_workers(ranges - 1);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      task_ = &task;
      next_range_ = 1;
      ranges_ = ranges;
      pending_ = ranges - 1;
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    inside_job = true;
    try {
      task(0);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
    }
    inside_job = false;
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return pending_ == 0; });
    task_ = nullptr;
    if (error_) std::rethrow_exception(error_);
    return true;
  }

 private:
  pool() : owner_pid_(getpid()) {}

  void ensure_workers(int count) {
    while (static_cast<int>(workers_.size()) < count) {
      workers_.emplace_back([this] { worker_loop(); });
      workers_.back().detach();
    }
  }

  void worker_loop() {
    inside_worker = true;
    std::uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      while (task_ && next_range_ < ranges_) {
        int range = next_range_++;
        const auto* task = task_;
        lock.unlock();
        try {
          (*task)(range);
        } catch (...) {
          lock.lock();
          if (!error_) error_ = std::current_exception();
          lock.unlock();
        }
        lock.lock();
        if (--pending_ == 0) done_.notify_all();
      }
    }
  }

  pid_t owner_pid_;
  std::mutex job_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* task_ = nullptr;
  int next_range_ = 0, ranges_ = 0, pending_ = 0;
  std::uint64_t generation_ = 0;
  std::exception_ptr error_;
};

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
  std::int64_t ranges = std::min<std::int64_t>(requested_threads.load(), (count + grain - 1) / grain);
  if (ranges <= 1 || inside_worker || inside_job) {
    body(0, count);
    return;
  }
  auto range_body = [&](int r) {
    std::int64_t begin = count * r / ranges, end = count * (r + 1) / ranges;
    if (begin < end) body(begin, end);
  };
  if (!pool::instance().run(static_cast<int>(ranges), range_body)) body(0, count);
}

}  // namespace detail
}  // namespace softce
