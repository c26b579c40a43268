#!/usr/bin/env bash
# The dedicated run of the library's differential fuzzer (tests/differential): every loss
# against the float64 oracle with random shapes, layouts, dtypes, options, NaN/inf placement
# and aliasing, for SECONDS (default 1800) per family, with a fresh seed each run (printed;
# replay one failing case with SOFTCE_FUZZ_CASE=<case seed>). Builds into build-fuzz-api.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-1800}
seed=${SOFTCE_FUZZ_SEED:-$(date +%s)}
cmake -S . -B build-fuzz-api -G Ninja -DCMAKE_BUILD_TYPE=Release -DSOFTCE_TOOLS=OFF > /dev/null
cmake --build build-fuzz-api --target differential_fuzz
echo "differential fuzzer: seed $seed, $seconds s per family"
SOFTCE_FUZZ_SEED=$seed SOFTCE_FUZZ_SECONDS=$seconds build-fuzz-api/tests/differential/differential_fuzz
