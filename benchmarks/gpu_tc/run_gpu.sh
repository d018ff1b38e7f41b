#!/usr/bin/env bash
# On the GPU machine, from the repository root:
#   source .gpu/setup.sh && bash benchmarks/gpu_tc/run_gpu.sh [tc_bench args...]
# Builds the harness, picks the fragment-load path (ldmatrix address mode) with the probe, then runs
# the checks and the timings. Full log in $OUT/tc_bench.log (or /tmp).
set -o pipefail
out=${OUT:-/tmp}
g++ -O2 -std=c++20 -o /tmp/tc_bench benchmarks/gpu_tc/tc_bench.cpp -lOpenCL -lpthread || exit 1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
ldsm=
for m in 1 2 0; do
  if /tmp/tc_bench --cl-dir kernels/opencl/tc --probe-only --ldsm $m 2>&1 | grep -v "^device"; then ldsm=$m; break; fi
done
[ -z "$ldsm" ] && { echo "no fragment-load path works"; exit 1; }
echo "using -DLDSM=$ldsm"
/tmp/tc_bench --cl-dir kernels/opencl/tc --ldsm $ldsm "$@" 2>&1 | tee "$out/tc_bench.log"
