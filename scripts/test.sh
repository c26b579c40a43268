#!/usr/bin/env bash
# Runs every test: the C++ suite (unit, CLI, MPI, install/find_package consumer, fuzz smoke)
# under ctest, the same unit tests built with ASan + UBSan, and the Python tests.
# Assumes scripts/setup.sh has run once on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc)

cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DSOFTCE_MPI=ON -DSOFTCE_BENCH=ON
cmake --build build -j"$jobs"
ctest --test-dir build --output-on-failure -j"$jobs"

cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSOFTCE_SANITIZE=ON \
      -DSOFTCE_TOOLS=OFF -DSOFTCE_MPI=OFF
cmake --build build-asan -j"$jobs"
ASAN_OPTIONS=detect_leaks=1 ctest --test-dir build-asan --output-on-failure -j"$jobs" -L unit

if [ -d python/tests ]; then
  python3 -m pip install -q --no-build-isolation .
  python3 -m pytest -q python/tests
  # the benchmark still runs (a smoke run on small shapes; speed is not judged here)
  saved=$(mktemp)
  trap 'rm -f "$saved"' EXIT
  python3 bench/bench.py --quick --no-memory --json "$saved" > /dev/null
  python3 bench/bench.py --markdown --from-json "$saved" > /dev/null  # the report from the file
fi
