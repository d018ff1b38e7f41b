#!/usr/bin/env bash
# Ours against TFLA (mlstm_kernels' Triton xl_chunk kernels, chunk 128) in one call on the GPU machine (device tool),
# from the repository root after `source .gpu/setup.sh`. TFLA_SRC=<checkout of NX-AI/mlstm_kernels> (carried to the
# machine: it has no network). TFLA runs while our benchmark builds; then bench_opencl times the tensor cores at
# chunk 64 and 128 (and 128 with MLSTM_TC_CHUNK_ROWS=128, the kernels before query sub-tiles) on the same shapes:
#   the TFLA setup (B*S = 65536, NH = 16, 128/256: S = 8192 and 65536) and NH = 4, 128/128 at 1M tokens
#   (B = 64, S = 16384 and B = 1, S = 1M); bf16, both gates, forward and forward+backward, device-resident.
# Outputs: $OUT/tfla_*.json, $OUT/tc_*.json (bench_opencl JSON with each kernel's time).
set -o pipefail
out=${OUT:-/tmp}
: "${TFLA_SRC:?TFLA_SRC must name a checkout of NX-AI/mlstm_kernels}"
export LD_LIBRARY_PATH=/opt/deps/usr/lib/x86_64-linux-gnu/openblas-pthread:$LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
t0=$(date +%s)
build=${BUILD:-/tmp/build-tfla}
( cmake -S . -B $build -DCMAKE_BUILD_TYPE=Release -DMLSTM_BUILD_PYTHON=OFF -DMLSTM_BUILD_TESTS=OFF >$out/cmake.log 2>&1 &&
  cmake --build $build -j14 --target bench_opencl >$out/build.log 2>&1
  echo "build rc=$? after $(( $(date +%s) - t0 )) s" ) &
bpid=$!
shapes="8:16:8192:128:256,1:16:65536:128:256,64:4:16384:128:128,1:4:1048576:128:128"
echo "== TFLA"
# xl_chunk compiles on Triton 3.6 only with LLVM's optimiser off (ANCHORS.md); each kernel in its own process.
TFLA_SHAPES=$shapes TFLA_KERNELS=xl_chunk_siging OUT=$out timeout 150 python3 benchmarks/tfla/tfla_bench.py 2>&1 |
  grep -v -i warn | tail -8
mv $out/tfla.json $out/tfla_siging.json 2>/dev/null
TFLA_SHAPES=$shapes TFLA_KERNELS=xl_chunk DISABLE_LLVM_OPT=1 OUT=$out timeout 150 python3 benchmarks/tfla/tfla_bench.py \
  2>&1 | grep -v -i warn | tail -8
mv $out/tfla.json $out/tfla_exp.json 2>/dev/null
wait $bpid
med() { grep -E "median|ERROR|rror" | sed -E 's/iterations:1\/repeats:[0-9]+\/manual_time_//' | awk -v t="$1" '{print t": "$1" "$2" "$3}'; }
export MLSTM_BENCH_PATHS=tc MLSTM_BENCH_STREAM=0
echo "== ours, TFLA setup"
for cfg in "64 64" "128 64" "128 128"; do
  set -- $cfg
  MLSTM_BENCH_REPS=10 MLSTM_BENCH_CHUNK=$1 MLSTM_TC_CHUNK_ROWS=$2 timeout 90 $build/benchmarks/bench_opencl \
    --benchmark_filter='xl_chunk' --benchmark_out=$out/tc_L$1_q$2.json --benchmark_out_format=json 2>&1 | med "L=$1 rows=$2"
done
echo "== ours, NH=4 128/128, 1M tokens"
for cfg in "64 64" "128 64" "128 128"; do
  set -- $cfg
  MLSTM_BENCH_TOKENS=1048576 MLSTM_BENCH_HEADS=4 MLSTM_BENCH_DQK=128 MLSTM_BENCH_DHV=128 MLSTM_BENCH_SEQ=16384,1048576 \
    MLSTM_BENCH_REPS=5 MLSTM_BENCH_CHUNK=$1 MLSTM_TC_CHUNK_ROWS=$2 timeout 90 $build/benchmarks/bench_opencl \
    --benchmark_filter='xl_chunk' --benchmark_out=$out/tc4_L$1_q$2.json --benchmark_out_format=json 2>&1 |
    med "NH4 L=$1 rows=$2"
done
echo "done after $(( $(date +%s) - t0 )) s"
