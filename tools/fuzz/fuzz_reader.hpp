// The check shared by the libFuzzer targets of the CLI's readers: any input either gives a
// consistent table or throws input_error; crashes, leaks, sanitizer reports and allocations
// beyond -malloc_limit_mb are bugs. Each fuzz_<format>.cpp names its reader and file name.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "cli_error.hpp"
#include "table.hpp"

namespace softce::cli {

template <class Reader>
int fuzz_reader(const std::uint8_t* data, std::size_t size, Reader read, std::string_view file_name) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  for (bool allow_nonfinite : {false, true}) {
    read_options options;
    options.allow_nonfinite = allow_nonfinite;
    try {
      table t = read(bytes, std::string(file_name), options);
      if (t.rows <= 0 || t.cols <= 0 ||
          t.values.size() != static_cast<std::size_t>(t.rows) * static_cast<std::size_t>(t.cols))
        std::abort();
      if (t.format == table_format::csv && t.line.size() != static_cast<std::size_t>(t.rows))
        std::abort();
      (void)t.where(t.rows - 1);
    } catch (const input_error&) {
    }
  }
  return 0;
}

}  // namespace softce::cli
