// softce CLI — staged outputs, signal handling, array writers (see outputs.hpp).
#include "outputs.hpp"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <new>
#include <stdexcept>
#include <utility>

#include "cli_error.hpp"

namespace softce::cli {

namespace {

// ---- what the signal handler removes: paths in a fixed table, read without allocating.
// A slot holds a strdup'd path or null; it is filled before the file or directory is
// created and emptied (then freed) once it no longer needs removing.
constexpr int cleanup_slots = 256;
std::atomic<char*> cleanup_files[cleanup_slots];
std::atomic<char*> cleanup_dirs[cleanup_slots];

int claim_slot(std::atomic<char*>* table, const std::string& path) {
  char* copy = ::strdup(path.c_str());
  if (!copy) throw std::bad_alloc();
  for (int i = 0; i < cleanup_slots; ++i) {
    char* expected = nullptr;
    if (table[i].compare_exchange_strong(expected, copy)) return i;
  }
  std::free(copy);
  throw std::runtime_error("too many staged outputs");
}

void release_slot(std::atomic<char*>* table, int slot) {
  if (slot >= 0) std::free(table[slot].exchange(nullptr));
}

// ---- signal state. 0: running (a signal ends the program at once), 1: committing (a signal
// is recorded and acted on when the commit is over), 2: exiting.
std::atomic<int> state{0};
volatile std::sig_atomic_t pending_signal = 0;
std::atomic<bool> outputs_written{false};
pid_t main_tid = 0;
pthread_t main_thread;

static_assert(std::atomic<int>::is_always_lock_free && std::atomic<char*>::is_always_lock_free &&
                  std::atomic<bool>::is_always_lock_free,
              "the signal handler needs lock-free atomics");

void write_stderr(const char* s) {
  std::size_t n = std::strlen(s);
  while (n > 0) {
    const ssize_t w = ::write(STDERR_FILENO, s, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return;
    s += w;
    n -= static_cast<std::size_t>(w);
  }
}

// Async-signal-safe: unlink, rmdir, write and _exit only.
[[noreturn]] void exit_on_signal(int sig) {
  for (auto& slot : cleanup_files)
    if (const char* p = slot.load()) ::unlink(p);
  for (int pass = 0; pass < 8; ++pass)  // deepest directory first, whatever the slot order
    for (int i = cleanup_slots - 1; i >= 0; --i)
      if (const char* p = cleanup_dirs[i].load()) ::rmdir(p);
  write_stderr(sig == SIGINT ? "softce: interrupted" : sig == SIGTERM ? "softce: terminated"
                                                                      : "softce: hung up");
  write_stderr(outputs_written.load() ? " after the outputs were written\n"
                                      : "; no output written, earlier outputs unchanged\n");
  ::_exit(128 + sig);
}

extern "C" void on_signal(int sig) {
  const int saved_errno = errno;
  // A signal sent to the process may land on a BLAS worker thread: hand it to the main
  // thread, so that the clean-up never runs concurrently with the main thread's file work.
  if (static_cast<pid_t>(::syscall(SYS_gettid)) != main_tid) {
    ::pthread_kill(main_thread, sig);
    errno = saved_errno;
    return;
  }
  int expected = 0;
  if (!state.compare_exchange_strong(expected, 2)) {
    if (expected == 1) pending_signal = sig;  // committing: acted on at the end of commit()
    errno = saved_errno;
    return;
  }
  exit_on_signal(sig);
}

std::string errno_text(int e = errno) { return std::strerror(e); }

std::vector<staged_outputs*>& live_outputs() {
  static std::vector<staged_outputs*> live;
  return live;
}

std::string base_name(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

}  // namespace

void install_interrupt_handlers() {
  main_tid = static_cast<pid_t>(::syscall(SYS_gettid));
  main_thread = ::pthread_self();
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigaddset(&sa.sa_mask, SIGINT);
  sigaddset(&sa.sa_mask, SIGTERM);
  sigaddset(&sa.sa_mask, SIGHUP);
  sa.sa_flags = 0;  // no SA_RESTART: nothing to restart, the handler does not return
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGHUP, &sa, nullptr);
}

bool interrupt_requested() { return pending_signal != 0; }

void throw_if_interrupted() {
  if (pending_signal) throw interrupted();
}

void require_replaceable(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT || errno == ENOTDIR) return;  // absent (or the parent is reported)
    throw input_error(path + ": cannot write: " + errno_text());
  }
  if (S_ISREG(st.st_mode)) return;
  const char* kind = S_ISLNK(st.st_mode)    ? "a symbolic link"
                     : S_ISFIFO(st.st_mode) ? "a FIFO"
                     : S_ISCHR(st.st_mode)  ? "a character device"
                     : S_ISBLK(st.st_mode)  ? "a block device"
                     : S_ISSOCK(st.st_mode) ? "a socket"
                     : S_ISDIR(st.st_mode)  ? "a directory"
                                            : "not a regular file";
  throw input_error(path + ": is " + kind +
                    "; softce only replaces regular files (remove it or choose another --out)");
}

staged_outputs::staged_outputs(const std::string& dir, bool create)
    : dir_(dir.empty() ? std::string(".") : dir) {
  struct stat st {};
  const auto remove_created = [&] {
    for (auto s = created_dir_slots_.rbegin(); s != created_dir_slots_.rend(); ++s) {
      if (const char* p = cleanup_dirs[*s].load()) ::rmdir(p);
      release_slot(cleanup_dirs, *s);
    }
    created_dir_slots_.clear();
  };
  if (::stat(dir_.c_str(), &st) == 0) {
    if (!S_ISDIR(st.st_mode)) throw input_error(dir_ + ": exists and is not a directory");
  } else if (!create) {
    throw input_error(dir_ + ": cannot write there: " + errno_text());
  } else {
    // Create missing directories from the top, remembering them to remove on failure.
    std::vector<std::string> missing;
    for (std::filesystem::path p(dir_); !p.empty(); p = p.parent_path()) {
      if (::stat(p.c_str(), &st) == 0) break;
      missing.push_back(p.string());
      if (p == p.parent_path()) break;
    }
    for (auto it = missing.rbegin(); it != missing.rend(); ++it) {
      const int slot = claim_slot(cleanup_dirs, *it);  // before mkdir: a signal removes it
      if (::mkdir(it->c_str(), 0777) != 0) {
        const int e = errno;
        release_slot(cleanup_dirs, slot);
        if (e == EEXIST) continue;  // made meanwhile by someone else: not ours to remove
        remove_created();
        throw input_error(dir_ + ": cannot create the output directory: " + errno_text(e));
      }
      created_dir_slots_.push_back(slot);
    }
  }
  // Probe: can we create files there? (As root, permission bits are no guide.)
  std::string probe = dir_;  // (built up in steps: GCC 12's -Wrestrict misfires on a + chain)
  probe += "/.softce-probe-";
  probe += std::to_string(::getpid());
  const int probe_slot = claim_slot(cleanup_files, probe);
  ::unlink(probe.c_str());  // left by a killed process that had our PID
  int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) {
    const std::string why = errno_text();
    release_slot(cleanup_files, probe_slot);
    remove_created();
    throw input_error(dir_ + ": cannot write there: " + why);
  }
  ::close(fd);
  ::unlink(probe.c_str());
  release_slot(cleanup_files, probe_slot);
  live_outputs().push_back(this);
}

staged_outputs::~staged_outputs() {
  auto& live = live_outputs();
  live.erase(std::remove(live.begin(), live.end(), this), live.end());
  discard();
}

void staged_outputs::discard() {
  if (!committed_) {
    for (const auto& f : staged_) ::unlink(f.temp.c_str());
    for (auto s = created_dir_slots_.rbegin(); s != created_dir_slots_.rend(); ++s)
      if (const char* p = cleanup_dirs[*s].load()) ::rmdir(p);
  }
  for (const auto& f : staged_) release_slot(cleanup_files, f.slot);
  for (int s : created_dir_slots_) release_slot(cleanup_dirs, s);
  staged_.clear();
  created_dir_slots_.clear();
}

void remove_all_staged_outputs() {
  for (staged_outputs* s : live_outputs()) s->discard();
}

std::string staged_outputs::final_path(const std::string& name) const {
  return dir_ == "." ? name : dir_ + "/" + name;
}

void staged_outputs::claim(const std::string& name) const { require_replaceable(final_path(name)); }

std::string staged_outputs::stage(const std::string& name) {
  std::string temp = dir_ + "/." + name + ".softce-tmp-" + std::to_string(::getpid());
  const int slot = claim_slot(cleanup_files, temp);
  staged_.push_back({temp, final_path(name), slot});
  ::unlink(temp.c_str());  // a stale file (or link) of an earlier process with our PID
  return temp;
}

void staged_outputs::write(const std::string& name, std::string_view content) {
  write_file(stage(name), content);
}

// All or nothing. For each output: keep the earlier file as a hard link (backup), then
// rename the new file over it (atomic). If one rename fails, the files already renamed are
// put back from their backups (or removed when there was none), newest first. Only when every
// rename has succeeded are the backups removed. Signals are deferred meanwhile.
// Test hooks: SOFTCE_TEST_FAIL_RENAME=NAME makes the rename of output NAME fail (EIO);
// SOFTCE_TEST_COMMIT_PAUSE=SECONDS pauses after the first rename (to signal mid-commit).
void staged_outputs::commit() {
  throw_if_interrupted();
  for (const auto& f : staged_) require_replaceable(f.final);
  int expected = 0;
  if (!state.compare_exchange_strong(expected, 1))
    for (;;) ::pause();  // the signal handler is ending the program

  struct renamed {
    std::string final, backup;
    bool had_earlier;
  };
  std::vector<renamed> done;
  std::string failure;
  const char* fail_name = std::getenv("SOFTCE_TEST_FAIL_RENAME");
  for (const auto& f : staged_) {
    renamed r{f.final, dir_ + "/." + base_name(f.final) + ".softce-old-" + std::to_string(::getpid()),
              false};
    bool moved_away = false;  // the backup was made by rename (no hard links here)
    struct stat st {};
    if (::lstat(f.final.c_str(), &st) == 0) {
      r.had_earlier = true;
      ::unlink(r.backup.c_str());
      if (::link(f.final.c_str(), r.backup.c_str()) != 0) {
        if (::rename(f.final.c_str(), r.backup.c_str()) != 0) {
          failure = f.final + ": cannot keep the earlier file while replacing it: " + errno_text();
          break;
        }
        moved_away = true;
      }
    }
    const bool inject = fail_name && base_name(f.final) == fail_name;
    if (inject || ::rename(f.temp.c_str(), f.final.c_str()) != 0) {
      const int e = inject ? EIO : errno;
      if (moved_away) ::rename(r.backup.c_str(), f.final.c_str());
      else if (r.had_earlier) ::unlink(r.backup.c_str());
      failure = f.final + ": cannot write: " + errno_text(e);
      break;
    }
    done.push_back(std::move(r));
    if (const char* pause = std::getenv("SOFTCE_TEST_COMMIT_PAUSE"); pause && done.size() == 1) {
      // (a signal cuts the sleep short: it is deferred, so sleep out the rest)
      struct timespec left {std::atoi(pause), 0};
      while (::nanosleep(&left, &left) != 0 && errno == EINTR) {
      }
    }
  }
  if (!failure.empty()) {
    for (auto it = done.rbegin(); it != done.rend(); ++it) {
      if (it->had_earlier) ::rename(it->backup.c_str(), it->final.c_str());
      else ::unlink(it->final.c_str());
    }
    state = 0;
    if (pending_signal) exit_on_signal(pending_signal);
    throw input_error(failure + " (no output written, earlier outputs unchanged)");
  }
  for (const auto& r : done)
    if (r.had_earlier) ::unlink(r.backup.c_str());
  if (int dfd = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); dfd >= 0) {
    ::fsync(dfd);  // make the renames durable
    ::close(dfd);
  }
  committed_ = true;
  outputs_written = true;
  for (auto& f : staged_) release_slot(cleanup_files, std::exchange(f.slot, -1));
  for (int s : created_dir_slots_) release_slot(cleanup_dirs, s);
  created_dir_slots_.clear();
  state = 0;
  if (pending_signal) exit_on_signal(pending_signal);
}

void write_file(const std::string& path, std::string_view content) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0666);
  if (fd < 0) throw input_error(path + ": cannot write: " + errno_text());
  std::size_t done = 0;
  while (done < content.size()) {
    ssize_t n = ::write(fd, content.data() + done, content.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      std::string why = errno_text();
      ::close(fd);
      throw input_error(path + ": cannot write: " + why);
    }
    done += static_cast<std::size_t>(n);
  }
  // On the disk before it is renamed into place, so a crash leaves the old file or the new
  // one, never an empty one.
  if (::fsync(fd) != 0 && errno != EINVAL && errno != EROFS) {
    std::string why = errno_text();
    ::close(fd);
    throw input_error(path + ": cannot write: " + why);
  }
  if (::close(fd) != 0) throw input_error(path + ": cannot write: " + errno_text());
}

std::string npy_bytes(const float* values, std::int64_t rows, std::int64_t cols) {
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" +
                       std::to_string(rows) + ", " + std::to_string(cols) + "), }";
  // magic (6) + version (2) + length (2) + header, padded with spaces to a multiple of 64,
  // ending in a newline
  std::size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::string out = std::string("\x93NUMPY\x01\x00", 8);
  out += static_cast<char>(header.size() & 0xff);
  out += static_cast<char>(header.size() >> 8);
  out += header;
  out.append(reinterpret_cast<const char*>(values), rows * cols * sizeof(float));
  return out;
}

std::string csv_bytes(const float* values, std::int64_t rows, std::int64_t cols) {
  std::string out;
  out.reserve(static_cast<std::size_t>(rows * cols * 12));
  char buffer[32];
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t c = 0; c < cols; ++c) {
      auto [ptr, ec] = std::to_chars(buffer, buffer + sizeof buffer, values[r * cols + c]);
      if (c) out += ',';
      out.append(buffer, ptr);
    }
    out += '\n';
  }
  return out;
}

}  // namespace softce::cli
