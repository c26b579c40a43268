// softce CLI — staged outputs, interrupt flag, array writers (see outputs.hpp).
#include "outputs.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <charconv>
#include <cstdint>
#include <cstring>
#include <filesystem>

#include "cli_error.hpp"

namespace softce::cli {

namespace {

volatile std::sig_atomic_t interrupt_flag = 0;

std::vector<staged_outputs*>& live_outputs() {
  static std::vector<staged_outputs*> live;
  return live;
}

extern "C" void on_interrupt(int) { interrupt_flag = 1; }

std::string errno_text() { return std::strerror(errno); }

}  // namespace

void install_interrupt_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_interrupt;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART | SA_RESETHAND;  // a second SIGINT terminates at once
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

bool interrupt_requested() { return interrupt_flag != 0; }

void throw_if_interrupted() {
  if (interrupt_flag) throw interrupted();
}

staged_outputs::staged_outputs(const std::string& dir, bool create)
    : dir_(dir.empty() ? std::string(".") : dir) {
  struct stat st {};
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
      if (::mkdir(it->c_str(), 0777) != 0 && errno != EEXIST) {
        std::string why = errno_text();
        for (auto d = created_dirs_.rbegin(); d != created_dirs_.rend(); ++d) ::rmdir(d->c_str());
        created_dirs_.clear();
        throw input_error(dir_ + ": cannot create the output directory: " + why);
      }
      created_dirs_.push_back(*it);
    }
  }
  // Probe: can we create files there? (As root, permission bits are no guide.)
  std::string probe = dir_;  // (built up in steps: GCC 12's -Wrestrict misfires on a + chain)
  probe += "/.softce-probe-";
  probe += std::to_string(::getpid());
  int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    std::string why = errno_text();
    for (auto d = created_dirs_.rbegin(); d != created_dirs_.rend(); ++d) ::rmdir(d->c_str());
    created_dirs_.clear();
    throw input_error(dir_ + ": cannot write there: " + why);
  }
  ::close(fd);
  ::unlink(probe.c_str());
  live_outputs().push_back(this);
}

staged_outputs::~staged_outputs() {
  auto& live = live_outputs();
  live.erase(std::remove(live.begin(), live.end(), this), live.end());
  discard();
}

void staged_outputs::discard() {
  if (committed_) return;
  for (const auto& [temp, final] : staged_) ::unlink(temp.c_str());
  for (auto d = created_dirs_.rbegin(); d != created_dirs_.rend(); ++d) ::rmdir(d->c_str());
  staged_.clear();
  created_dirs_.clear();
}

void remove_all_staged_outputs() {
  for (staged_outputs* s : live_outputs()) s->discard();
}

std::string staged_outputs::final_path(const std::string& name) const {
  return dir_ == "." ? name : dir_ + "/" + name;
}

std::string staged_outputs::stage(const std::string& name) {
  std::string temp = dir_ + "/." + name + ".softce-tmp-" + std::to_string(::getpid());
  staged_.emplace_back(temp, final_path(name));
  return temp;
}

void staged_outputs::write(const std::string& name, std::string_view content) {
  write_file(stage(name), content);
}

void staged_outputs::commit() {
  throw_if_interrupted();
  for (const auto& [temp, final] : staged_) {
    struct stat st {};
    if (::stat(final.c_str(), &st) == 0 && S_ISDIR(st.st_mode))
      throw input_error(final + ": is a directory; cannot replace it with a file");
  }
  for (const auto& [temp, final] : staged_)
    if (::rename(temp.c_str(), final.c_str()) != 0)
      throw input_error(final + ": cannot write: " + errno_text());
  committed_ = true;
}

void write_file(const std::string& path, std::string_view content) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
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
