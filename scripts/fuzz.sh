#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, AddressSanitizer + UndefinedBehaviorSanitizer) in
# ${MLSTM_FUZZ_DIR:-build-fuzz} and runs each for FUZZ_SECONDS (default 60) from the seed corpora.
# Corpora grow in build-fuzz/corpus/<target>; a crash leaves its input in build-fuzz/crashes/ and makes the
# script fail (turn it into a regression test in tests/tools/test_npy.cpp or tests/graph/test_stream.cpp).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${MLSTM_FUZZ_DIR:-$root/build-fuzz}
seconds=${FUZZ_SECONDS:-60}
command -v clang++ >/dev/null || { echo "fuzz.sh: clang++ is needed (apt-get install clang)"; exit 1; }
CC=clang CXX=clang++ cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMLSTM_BUILD_FUZZERS=ON \
  -DMLSTM_SANITIZE=address,undefined -DMLSTM_BUILD_TESTS=OFF -DMLSTM_BUILD_BENCHMARKS=OFF \
  -DMLSTM_BUILD_EXAMPLES=OFF -DMLSTM_BUILD_TOOLS=OFF -DMLSTM_BUILD_PYTHON=OFF >/dev/null
cmake --build "$build" -j "${MLSTM_JOBS:-$(nproc)}" --target fuzz_npy fuzz_snapshot make_seeds
mkdir -p "$build/corpus" "$build/crashes"
"$build/fuzz/make_seeds" "$build/seeds" >/dev/null
status=0
for target in npy snapshot; do
  mkdir -p "$build/corpus/$target"
  echo "== fuzz_$target for ${seconds}s"
  MLSTM_NUMA=off ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    "$build/fuzz/fuzz_$target" -max_total_time="$seconds" -artifact_prefix="$build/crashes/${target}_" \
      -print_final_stats=1 "$build/corpus/$target" "$build/seeds/$target" 2>&1 | \
    grep -E "^#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss|ERROR|SUMMARY|crash|deadly" || true
  if ls "$build/crashes/${target}_"* >/dev/null 2>&1; then
    echo "fuzz_$target: crash inputs in $build/crashes"; status=1
  fi
done
exit $status
