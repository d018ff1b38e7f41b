#!/usr/bin/env bash
# On the GPU machine (device tool), from the repository root, after `source .gpu/setup.sh`:
# builds the project, runs the OpenCL, graph and stream tests on the NVIDIA device, the tensor-core
# harness (checks + timings at the TFLA anchor setup), the portable forward at the same setup through
# `mlstm bench` (host timing, transfers included), and `mlstm run` on CPU workers + the GPU.
set -o pipefail
out=${OUT:-/tmp}
# .gpu/setup.sh puts the serial OpenBLAS first on LD_LIBRARY_PATH; the library wants the pthread build.
export LD_LIBRARY_PATH=/opt/deps/usr/lib/x86_64-linux-gnu/openblas-pthread:$LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
build=/tmp/build-gpu
cmake -S . -B $build -DCMAKE_BUILD_TYPE=Release -DMLSTM_BUILD_PYTHON=OFF >$out/cmake.log 2>&1 || { tail -30 $out/cmake.log; exit 1; }
cmake --build $build -j16 --target test_opencl test_graph test_stream test_cpu_kernels mlstm >$out/build.log 2>&1 || { grep -E "error" $out/build.log | head -30; exit 1; }
$build/tools/mlstm devices
for t in kernels/test_cpu_kernels opencl/test_opencl graph/test_stream graph/test_graph; do
  echo "== $t"; timeout 300 $build/tests/$t 2>&1 | tee -a $out/tests.log | grep -E "^\[  (PASSED|FAILED|SKIPPED) |rel error|Failure" | head -20
done
if [ "${SKIP_TIMINGS:-0}" != 1 ]; then
echo "== tensor-core harness"
timeout 240 bash benchmarks/gpu_tc/run_gpu.sh 2>&1 | tail -40
echo "== portable OpenCL forward, anchor setup (host timing incl. transfers)"
timeout 120 $build/tools/mlstm bench --kernels chunkwise--opencl_xl_chunk --tokens 65536 --seq-lens 8192 65536 \
  --chunk-sizes 64 --heads 16 --dqk 128 --dhv 256 --dtype bfloat16 --repeats 3 --csv $out/portable.csv --json-out $out/portable.json 2>&1 | tail -4
fi
echo "== mlstm run: CPU workers + GPU, 1M tokens"
timeout 120 $build/tools/mlstm run --devices workers+gpu:all 2>&1 | tail -4
