// libFuzzer target for the softce CLI's NPY reader.
// Seed corpus: tests/cli/fuzz/npy/ (tests/cli/fuzz.sh runs this).
#include "fuzz_reader.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return softce::cli::fuzz_reader(
      data, size,
      [](std::string_view bytes, const std::string& name, const softce::cli::read_options& options) {
        return softce::cli::parse_npy(bytes, name, options);
      },
      "fuzz.npy");
}
