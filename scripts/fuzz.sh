#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, AddressSanitizer + UndefinedBehaviorSanitizer, coverage in every
# module) in ${MLSTM_FUZZ_DIR:-build-fuzz} and runs each from the seed corpora (written by fuzz/make_seeds: valid
# .npy files of every dtype, valid snapshots of both gates).
# By default a run is deterministic, as CI needs: a fixed libFuzzer seed (FUZZ_SEED, default 1), a fixed number
# of inputs (FUZZ_RUNS per target, default 300000), a fresh corpus each run, and FUZZ_SECONDS (default 300)
# only as a cap for very slow machines. To explore, give FUZZ_SEED=random (libFuzzer picks one and prints it),
# more FUZZ_RUNS or FUZZ_RUNS=0 with FUZZ_SECONDS, and FUZZ_KEEP_CORPUS=1 to grow build-fuzz/corpus/<target>
# across runs. A crash, a sanitizer report or an unexpected exception leaves its input in
# build-fuzz/crashes/<run>/ and makes the script fail: turn it into a regression test in
# tests/tools/test_npy.cpp or tests/graph/test_stream.cpp, then fix the reader.
#   FUZZ_SEED=random FUZZ_RUNS=0 FUZZ_SECONDS=600 FUZZ_KEEP_CORPUS=1 bash scripts/fuzz.sh   # explore
#   build-fuzz/fuzz/fuzz_npy build-fuzz/crashes/<run>/npy_crash-...   # replay one input
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${MLSTM_FUZZ_DIR:-$root/build-fuzz}
seconds=${FUZZ_SECONDS:-300}
runs=${FUZZ_RUNS:-300000}
seed=${FUZZ_SEED:-1}
[ "$seed" = random ] && seed=0   # libFuzzer: 0 = pick a seed from the clock, and print it
case "$runs$seed$seconds" in
  *[!0-9]*) echo "fuzz.sh: FUZZ_RUNS, FUZZ_SEED and FUZZ_SECONDS take a number (FUZZ_SEED also 'random')" >&2; exit 2;;
esac
limit=$runs
[ "$runs" -eq 0 ] && limit=-1    # libFuzzer: -1 = no count limit
command -v clang++ >/dev/null || { echo "fuzz.sh: clang++ is needed (apt-get install clang libclang-rt-14-dev)"; exit 1; }
CC=clang CXX=clang++ cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMLSTM_BUILD_FUZZERS=ON \
  -DMLSTM_SANITIZE=address,undefined -DMLSTM_BUILD_TESTS=OFF -DMLSTM_BUILD_BENCHMARKS=OFF \
  -DMLSTM_BUILD_EXAMPLES=OFF -DMLSTM_BUILD_TOOLS=OFF -DMLSTM_BUILD_PYTHON=OFF >/dev/null
cmake --build "$build" -j "${MLSTM_JOBS:-$(nproc)}" --target fuzz_npy fuzz_snapshot make_seeds
"$build/fuzz/make_seeds" "$build/seeds" >/dev/null
run=$build/crashes/$(date +%Y%m%d-%H%M%S)
mkdir -p "$run"
status=0
for target in npy snapshot; do
  [ "${FUZZ_KEEP_CORPUS:-0}" = 1 ] || rm -rf "$build/corpus/$target"
  mkdir -p "$build/corpus/$target"
  echo "== fuzz_$target: seed $seed, $runs inputs (0: no count limit), at most ${seconds}s"
  rc=0
  MLSTM_NUMA=off ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    "$build/fuzz/fuzz_$target" -seed="$seed" -runs="$limit" -max_total_time="$seconds" -artifact_prefix="$run/${target}_" \
      -print_final_stats=1 "$build/corpus/$target" "$build/seeds/$target" >"$run/fuzz_$target.log" 2>&1 || rc=$?
  grep -E "^#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss|ERROR|SUMMARY|runtime error|deadly" \
    "$run/fuzz_$target.log" || true
  if [ "$rc" -ne 0 ] || ls "$run/${target}_"* >/dev/null 2>&1; then
    echo "fuzz_$target FAILED (exit $rc): log and crash input in $run"
    tail -n 40 "$run/fuzz_$target.log"
    status=1
  fi
done
[ "$status" -ne 0 ] || rm -rf "$run"
exit $status
