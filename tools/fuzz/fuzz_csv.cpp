// libFuzzer target for the softce CLI's CSV reader.
// Any input must either give a consistent table or throw input_error; crashes, leaks,
// sanitizer reports and allocations beyond -malloc_limit_mb are bugs. Seed corpus:
// tests/cli/fuzz/csv/ (tests/cli/fuzz.sh runs this).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "cli_error.hpp"
#include "table.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace softce::cli;
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  for (bool allow_nonfinite : {false, true}) {
    read_options options;
    options.allow_nonfinite = allow_nonfinite;
    try {
      table t = parse_csv(bytes, "fuzz.csv", options);
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
