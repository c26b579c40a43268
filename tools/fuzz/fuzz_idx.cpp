// libFuzzer target for the softce CLI's IDX reader, behind the gzip layer (gzip'd or plain input).
// Seed corpus: tests/cli/fuzz/idx/ (tests/cli/fuzz.sh runs this).
#include "fuzz_reader.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return softce::cli::fuzz_reader(
      data, size,
      [](std::string_view bytes, const std::string& name, const softce::cli::read_options& options) {
        return softce::cli::parse_table(bytes, name, options);
      },
      "fuzz-idx3-ubyte.gz");
}
