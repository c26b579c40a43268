#!/usr/bin/env bash
# libFuzzer runs of the softce CLI's readers (tools/fuzz/fuzz_{csv,npy,idx}.cpp).
#
#   fuzz.sh build SOURCE_DIR WORK_DIR               compile the three fuzzers with clang++
#   fuzz.sh run SOURCE_DIR WORK_DIR PARSER SECONDS  fuzz one reader, starting from the
#                                                   committed seeds in tests/cli/fuzz/PARSER
#
# The main build may use gcc, so the fuzzers are compiled here with clang (libFuzzer comes
# with clang; Debian: clang libclang-rt-14-dev, installed by scripts/setup.sh). Without
# clang both steps fail: a fuzz test that cannot run is not a pass. New inputs found go to WORK_DIR/corpus-PARSER, not into the source tree; to keep
# interesting ones, merge them into the seed corpus:
#   WORK_DIR/fuzz_csv -merge=1 tests/cli/fuzz/csv WORK_DIR/corpus-csv
# A crash leaves its input in WORK_DIR/crash-PARSER-*; reproduce with WORK_DIR/fuzz_PARSER FILE.
set -euo pipefail
mode=$1 src=$2 work=$3

find_clang() {
  for c in "${CLANGXX:-}" clang++ clang++-19 clang++-18 clang++-17 clang++-16 clang++-15 clang++-14; do
    if [ -n "$c" ] && command -v "$c" >/dev/null 2>&1; then echo "$c"; return 0; fi
  done
  return 1
}

case $mode in
build)
  if ! clang=$(find_clang); then
    echo "clang++ not found: fuzzers not built (install clang and libclang-rt-14-dev)"
    exit 1
  fi
  mkdir -p "$work"
  flags=(-std=c++20 -O1 -g -fno-omit-frame-pointer -I"$src/tools")
  sanitize=-fsanitize=address,undefined
  # Probe for libFuzzer (Debian ships it in libclang-rt-NN-dev).
  echo 'extern "C" int LLVMFuzzerTestOneInput(const char*, unsigned long) { return 0; }' \
    > "$work/probe.cpp"
  if ! "$clang" -fsanitize=fuzzer "$work/probe.cpp" -o "$work/probe" 2>"$work/probe.log"; then
    cat "$work/probe.log"
    echo "$clang cannot link libFuzzer: fuzzers not built (install libclang-rt-14-dev)"
    exit 1
  fi
  "$clang" "${flags[@]}" $sanitize -fsanitize=fuzzer-no-link -c "$src/tools/table.cpp" \
    -o "$work/table.o"
  for parser in csv npy idx; do
    "$clang" "${flags[@]}" $sanitize -fsanitize=fuzzer "$src/tools/fuzz/fuzz_$parser.cpp" \
      "$work/table.o" -lz -o "$work/fuzz_$parser" &
  done
  wait
  for parser in csv npy idx; do test -x "$work/fuzz_$parser"; done
  echo "built $work/fuzz_{csv,npy,idx} with $clang"
  ;;
run)
  parser=$4 seconds=$5
  if [ ! -x "$work/fuzz_$parser" ]; then
    echo "fuzz_$parser not built (no clang or libFuzzer?): a fuzz test that cannot run fails"
    exit 1
  fi
  corpus="$work/corpus-$parser"
  rm -rf "$corpus" && mkdir -p "$corpus"
  # -malloc_limit_mb: no input of at most -max_len bytes may make a reader allocate more
  # (a header lying about a huge shape must be rejected before allocating).
  ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=0 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$work/fuzz_$parser" -max_total_time="$seconds" -max_len=4096 -rss_limit_mb=2048 \
      -malloc_limit_mb=256 -timeout=10 -print_final_stats=1 \
      -artifact_prefix="$work/crash-$parser-" "$corpus" "$src/tests/cli/fuzz/$parser"
  ;;
*)
  echo "usage: fuzz.sh build SOURCE_DIR WORK_DIR | run SOURCE_DIR WORK_DIR PARSER SECONDS" >&2
  exit 2
  ;;
esac
