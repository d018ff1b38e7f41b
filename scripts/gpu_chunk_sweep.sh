#!/usr/bin/env bash
# The measurements behind the automatic chunk size's table rows (devices/src/chunk_choice.cpp, docs/PERFORMANCE.md
# "The automatic chunk size"). On the GPU machine (device tool), from the repository root, after
# `source .gpu/setup.sh`: builds bench_opencl and bench_cpu (or uses BUILD=<dir> where they are built), then times
#   - the tensor cores at chunk 64 and 128, head dims 64/64, 128/128, 128/256, 256/256, B*S = 65536 tokens at NH=16
#     as S=8192 (128 rows) and S=65536 (16 rows), exp gate, forward and forward+backward (medians of 5);
#   - the CPU workers' kernels at chunk 32-256 (bench_cpu ChunkChoice: 4/16/64 rows, head dims 64/128/256);
#   - the portable kernels at 128/128, chunk 64 and 128 (medians of 3).
set -o pipefail
out=${OUT:-/tmp}
export LD_LIBRARY_PATH=/opt/deps/usr/lib/x86_64-linux-gnu/openblas-pthread:$LD_LIBRARY_PATH
build=${BUILD:-}
if [ -z "$build" ]; then
  build=/tmp/build-sweep
  cmake -S . -B $build -DCMAKE_BUILD_TYPE=Release -DMLSTM_BUILD_PYTHON=OFF -DMLSTM_BUILD_TESTS=OFF >$out/cmake_sweep.log 2>&1 &&
    cmake --build $build -j16 --target bench_opencl bench_cpu >$out/build_sweep.log 2>&1 || { tail -20 $out/build_sweep.log; exit 1; }
fi
# DEADLINE=<epoch seconds>: parts that would start after it are skipped (said so), to fit a device call's limit.
late() { [ -n "${DEADLINE:-}" ] && [ "$(date +%s)" -ge "$DEADLINE" ] && echo "(skipped: past DEADLINE) $1"; }
median() { grep -E "median|ERROR|rror" | sed -E 's/iterations:1\/repeats:[0-9]+\/manual_time_//'; }
echo "== tensor cores (bench_opencl, B*S=65536, NH=16: S=8192 -> 128 rows, S=65536 -> 16 rows; exp gate)"
for dims in "64 64" "128 128" "128 256" "256 256"; do
  set -- $dims
  for L in 64 128; do
    late "tc $1/$2 L=$L" && continue
    MLSTM_BENCH_PATHS=tc MLSTM_BENCH_STREAM=0 MLSTM_BENCH_DQK=$1 MLSTM_BENCH_DHV=$2 MLSTM_BENCH_CHUNK=$L \
      MLSTM_BENCH_SEQ=8192,65536 MLSTM_BENCH_REPS=5 timeout 100 $build/benchmarks/bench_opencl \
      --benchmark_filter='xl_chunk/' 2>&1 | median | awk -v d="$1/$2" -v L=$L '{print "tc "d" L="L": "$1" "$2" "$3}'
  done
done
echo "== CPU workers' kernels (bench_cpu ChunkChoice, $(nproc) cores)"
if ! late "bench_cpu ChunkChoice"; then
  timeout 150 $build/benchmarks/bench_cpu --benchmark_filter=ChunkChoice --benchmark_min_time=0.1 \
    --benchmark_out=$out/bench_cpu_chunk.json --benchmark_out_format=json 2>&1 | grep ChunkChoice |
    awk '{print $1, $2, $3}'
fi
echo "== portable kernels, 128/128"
for L in 64 128; do
  late "portable L=$L" && continue
  MLSTM_BENCH_PATHS=portable MLSTM_BENCH_STREAM=0 MLSTM_BENCH_DQK=128 MLSTM_BENCH_DHV=128 MLSTM_BENCH_CHUNK=$L \
    MLSTM_BENCH_SEQ=8192,65536 MLSTM_BENCH_REPS=3 timeout 100 $build/benchmarks/bench_opencl \
    --benchmark_filter='xl_chunk/' 2>&1 | median | awk -v L=$L '{print "portable 128/128 L="L": "$1" "$2" "$3}'
done
