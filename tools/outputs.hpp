// softce CLI — writing outputs so that a failed or interrupted command leaves nothing behind.
//
// Every output file is written under a temporary name in its final directory
// (".NAME.softce-tmp-PID") and renamed into place only when the whole command has succeeded
// (rename within one directory is atomic). Until then, earlier outputs of the same name are
// untouched. The set of outputs is committed all-or-nothing: the earlier files are kept as
// hard links (".NAME.softce-old-PID") until every rename has succeeded, and a rename that
// fails midway puts every earlier file back. If the command fails, the destructor removes
// the temporary files and any directory the command created. The directory is created and
// probed for writability up front, so an unwritable --out fails before any training starts.
// An output is only ever put in place of a regular file: a symlink, FIFO, device node,
// socket or directory of that name is refused (input_error) before any work.
//
// Signals: SIGINT, SIGTERM and SIGHUP end the program at once, from the handler: it removes
// the temporary files and created directories (their paths are kept in a fixed table the
// handler reads without allocating), prints one line and exits with 128 + the signal number
// (130, 143, 129). A signal that arrives during the commit is acted on right after it.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace softce::cli {

// Installs the SIGINT / SIGTERM / SIGHUP handlers (call first thing in main()).
void install_interrupt_handlers();
// Only true between a signal arriving during a commit and the end of that commit.
bool interrupt_requested();
void throw_if_interrupted();  // throws interrupted when interrupt_requested()

// Removes the temporary files of every live staged_outputs (for fatal-error paths that
// cannot unwind, such as PLplot's exit handler).
void remove_all_staged_outputs();

// input_error unless `path` does not exist or is a regular file (checked with lstat, so a
// symlink is refused even when it points at a regular file).
void require_replaceable(const std::string& path);

class staged_outputs {
 public:
  // `dir` is created (with missing parents) when `create` is true; otherwise it must exist.
  staged_outputs(const std::string& dir, bool create);
  ~staged_outputs();
  staged_outputs(const staged_outputs&) = delete;
  staged_outputs& operator=(const staged_outputs&) = delete;

  // Checks up front that DIR/NAME can be replaced (require_replaceable).
  void claim(const std::string& name) const;
  // The temporary path to write NAME to; it becomes DIR/NAME at commit().
  std::string stage(const std::string& name);
  // Writes `content` to the staged path of NAME.
  void write(const std::string& name, std::string_view content);
  // Renames every staged file into place, all or nothing (input_error on failure, with
  // every earlier file restored).
  void commit();

  std::string final_path(const std::string& name) const;

 private:
  friend void remove_all_staged_outputs();
  void discard();
  std::string dir_;
  std::vector<int> created_dir_slots_;  // cleanup-table slots of created dirs, deepest last
  struct staged_file {
    std::string temp, final;
    int slot;  // cleanup-table slot of `temp`
  };
  std::vector<staged_file> staged_;
  bool committed_ = false;
};

// Writes bytes to a file and flushes them to the disk (input_error naming the file).
void write_file(const std::string& path, std::string_view content);

// Arrays as files: NPY (float32, C order) or CSV (shortest round-trip decimals).
std::string npy_bytes(const float* values, std::int64_t rows, std::int64_t cols);
std::string csv_bytes(const float* values, std::int64_t rows, std::int64_t cols);

}  // namespace softce::cli
