// softce CLI — writing outputs so that a failed or interrupted command leaves nothing behind.
//
// Every output file is written under a temporary name in its final directory
// (".NAME.softce-tmp-PID") and renamed into place only when the whole command has succeeded
// (rename within one directory is atomic). Until then, earlier outputs of the same name are
// untouched. If the command fails or is interrupted, the destructor removes the temporary
// files and any directory the command created. The directory is created and probed for
// writability up front, so an unwritable --out fails before any training starts.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace softce::cli {

// SIGINT / SIGTERM set a flag that long loops poll (a second SIGINT kills at once).
void install_interrupt_handlers();
bool interrupt_requested();
void throw_if_interrupted();  // throws interrupted

// Removes the temporary files of every live staged_outputs (for fatal-error paths that
// cannot unwind, such as PLplot's exit handler).
void remove_all_staged_outputs();

class staged_outputs {
 public:
  // `dir` is created (with missing parents) when `create` is true; otherwise it must exist.
  staged_outputs(const std::string& dir, bool create);
  ~staged_outputs();
  staged_outputs(const staged_outputs&) = delete;
  staged_outputs& operator=(const staged_outputs&) = delete;

  // The temporary path to write NAME to; it becomes DIR/NAME at commit().
  std::string stage(const std::string& name);
  // Writes `content` to the staged path of NAME.
  void write(const std::string& name, std::string_view content);
  // Renames every staged file into place.
  void commit();

  std::string final_path(const std::string& name) const;

 private:
  friend void remove_all_staged_outputs();
  void discard();
  std::string dir_;
  std::vector<std::string> created_dirs_;  // deepest last
  std::vector<std::pair<std::string, std::string>> staged_;  // (temp, final)
  bool committed_ = false;
};

// Writes bytes to a file (input_error naming the file on failure).
void write_file(const std::string& path, std::string_view content);

// Arrays as files: NPY (float32, C order) or CSV (shortest round-trip decimals).
std::string npy_bytes(const float* values, std::int64_t rows, std::int64_t cols);
std::string csv_bytes(const float* values, std::int64_t rows, std::int64_t cols);

}  // namespace softce::cli
