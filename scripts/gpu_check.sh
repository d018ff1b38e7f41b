#!/usr/bin/env bash
# On the GPU machine (device tool), from the repository root, after `source .gpu/setup.sh`:
# builds the project, runs the OpenCL (portable + tensor-core), graph and stream tests on the NVIDIA device,
# then bench_opencl (Google Benchmark: tensor-core and portable chunkwise kernels at the TFLA anchor setup,
# device-resident, OpenCL event timing, medians) and `mlstm run` on CPU workers + the GPU.
#   SKIP_TIMINGS=1   tests only;  TESTS=0  timings only
#   BENCH_ARGS=...   extra bench_opencl arguments (e.g. --benchmark_filter=tc)
#   TEST_LIST=...    test binaries to run (default: the OpenCL and graph ones);  RUN_GRAPH=1  graph stream runs
#   TEST_SHARDS=6    gtest shards of each binary run at once;  TEST_TIMEOUT=300  seconds per shard
#   CACHE_RUNS=1     `mlstm run` twice on an empty program cache (cold, then warm): what the disk cache saves
set -o pipefail
out=${OUT:-/tmp}
# .gpu/setup.sh puts the serial OpenBLAS first on LD_LIBRARY_PATH; the library wants the pthread build.
export LD_LIBRARY_PATH=/opt/deps/usr/lib/x86_64-linux-gnu/openblas-pthread:$LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
build=/tmp/build-gpu
t0=$(date +%s)
cmake -S . -B $build -DCMAKE_BUILD_TYPE=Release -DMLSTM_BUILD_PYTHON=OFF >$out/cmake.log 2>&1 || { tail -30 $out/cmake.log; exit 1; }
targets="test_opencl test_opencl_tensor_cores test_graph test_stream test_device_stream mlstm bench_opencl"
for extra in test_opencl_backward test_opencl_forms test_opencl_program_cache; do
  [ -f tests/opencl/$extra.cpp ] && targets="$targets $extra"
done
cmake --build $build -j16 --target $targets >$out/build.log 2>&1 || { grep -E "error" -A3 $out/build.log | head -40; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
$build/tools/mlstm devices
if [ "${TESTS:-1}" != 0 ]; then
# Each binary in TEST_SHARDS gtest shards at once (default 6; the cold OpenCL program builds, ~1 s each on NVIDIA,
# run in parallel and share one program cache), each shard under TEST_TIMEOUT seconds (default 300).
export MLSTM_PROGRAM_CACHE=${MLSTM_PROGRAM_CACHE:-/tmp/mlstm-gpu-check-programs}
shards=${TEST_SHARDS:-6}
for t in ${TEST_LIST:-opencl/test_opencl_tensor_cores opencl/test_opencl opencl/test_opencl_backward opencl/test_opencl_forms opencl/test_opencl_program_cache graph/test_device_stream graph/test_stream graph/test_graph}; do
  [ -x $build/tests/$t ] || continue
  echo "== $t ($shards shards)"
  name=$(basename $t)
  for ((s = 0; s < shards; ++s)); do
    GTEST_TOTAL_SHARDS=$shards GTEST_SHARD_INDEX=$s timeout ${TEST_TIMEOUT:-300} $build/tests/$t > /tmp/$name.$s.log 2>&1 &
  done
  wait
  for ((s = 0; s < shards; ++s)); do
    cat /tmp/$name.$s.log >> $out/tests.log
    grep -E "^\[  (PASSED|FAILED|SKIPPED) |rel error|Failure|tensor-core|LDSM" /tmp/$name.$s.log | sed "s/^/  shard $s: /" | head -10
    grep -q "^\[  PASSED" /tmp/$name.$s.log || echo "  shard $s: no PASSED line (timed out or crashed)"
  done
done
fi
if [ "${SKIP_TIMINGS:-0}" != 1 ]; then
  echo "== bench_opencl (anchor setup: B*S=65536, NH=16, DHQK=128, DHHV=256, bf16)"
  timeout ${BENCH_TIMEOUT:-420} $build/benchmarks/bench_opencl --benchmark_out=$out/bench_opencl.json \
    --benchmark_out_format=json ${BENCH_ARGS:-} 2>&1 | grep -E "median|ERROR|error" | sed -E 's/iterations:1\/repeats:[0-9]+\/manual_time_//' | cut -c1-220
fi
if [ "${CACHE_RUNS:-0}" = 1 ]; then
  cache=$(mktemp -d)
  for pass in cold warm; do
    s0=$(date +%s.%N)
    MLSTM_PROGRAM_CACHE=$cache timeout 120 $build/tools/mlstm --json run --seq-len 65536 >$out/cache_$pass.json 2>&1
    echo "== program cache $pass: mlstm run --seq-len 65536 took $(echo "$(date +%s.%N) - $s0" | bc) s; $(ls $cache | wc -l) entries"
  done
fi
echo "== mlstm run (default: pipeline on the GPU), 1M tokens"
timeout 120 $build/tools/mlstm run 2>&1 | tail -4
if [ "${RUN_GRAPH:-0}" = 1 ]; then
  for d in gpu:all workers workers+gpu:all; do
    echo "== mlstm run --mode stream --devices $d, 1M tokens"
    timeout 120 $build/tools/mlstm run --mode stream --devices $d 2>&1 | tail -3
  done
fi
