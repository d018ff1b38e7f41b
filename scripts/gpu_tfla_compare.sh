#!/usr/bin/env bash
# Ours against TFLA (mlstm_kernels' Triton xl_chunk kernels, chunk 128) in one call on the GPU machine (device tool),
# from the repository root after `source .gpu/setup.sh`. TFLA_SRC=<checkout of NX-AI/mlstm_kernels> (carried to the
# machine: it has no network). TFLA runs while our benchmark builds; then bench_opencl times the tensor cores on the
# same shapes, device-resident, bf16, both gates, forward and forward+backward, and benchmarks/tfla/compare.py prints
# one table of both with ours / TFLA.
#   SHAPES    comma list of B:NH:S:DHQK:DHHV (default: the TFLA setup at S = 8192 and 65536, and NH = 4, 128/128 at
#             1M tokens as B = 64, S = 16384 and B = 1, S = 1M)
#   VARIANTS  space list of chunk:rows[:keys] (MLSTM_BENCH_CHUNK : MLSTM_TC_CHUNK_ROWS : MLSTM_TC_KEY_BLOCK; default
#             "64:64 128:64 128:128:64 128:128", the last being the chunk kernels before query sub-tiles)
#   TFLA_KERNELS  space list of TFLA's kernels to run (default "xl_chunk xl_chunk_siging")
#   REPS      our repetitions (default 5); DEADLINE=<epoch s>: shapes of ours that would start after it are skipped;
#             TFLA_DEADLINE=<epoch s>: the same for TFLA's processes (leave time for ours on the shapes TFLA ran)
# Outputs under $OUT: tfla_*.json, tc_*.json (bench_opencl JSON with each kernel's time), compare.md.
set -o pipefail
out=${OUT:-/tmp}
: "${TFLA_SRC:?TFLA_SRC must name a checkout of NX-AI/mlstm_kernels}"
export LD_LIBRARY_PATH=/opt/deps/usr/lib/x86_64-linux-gnu/openblas-pthread:$LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
t0=$(date +%s)
build=${BUILD:-/tmp/build-tfla}
shapes=${SHAPES:-8:16:8192:128:256,1:16:65536:128:256,64:4:16384:128:128,1:4:1048576:128:128}
variants=${VARIANTS:-64:64 128:64 128:128:64 128:128}
( cmake -S . -B $build -DCMAKE_BUILD_TYPE=Release -DMLSTM_BUILD_PYTHON=OFF -DMLSTM_BUILD_TESTS=OFF >$out/cmake.log 2>&1 &&
  cmake --build $build -j14 --target bench_opencl >$out/build.log 2>&1
  echo "build rc=$? after $(( $(date +%s) - t0 )) s" ) &
bpid=$!
echo "== TFLA"
# One process per shape and kernel: a CUDA error poisons its process (session 26: one failing shape left every later
# one without a result). xl_chunk compiles on Triton 3.6 only with LLVM's optimiser off (ANCHORS.md).
n=0
for shape in ${shapes//,/ }; do
  for kernel in ${TFLA_KERNELS:-xl_chunk xl_chunk_siging}; do
    n=$((n + 1))
    if [ -n "${TFLA_DEADLINE:-}" ] && [ "$(date +%s)" -ge "$TFLA_DEADLINE" ]; then
      echo "(skipped: past TFLA_DEADLINE) TFLA $kernel $shape"; continue
    fi
    if [ $kernel = xl_chunk ]; then llvm=1; else llvm=0; fi
    DISABLE_LLVM_OPT=$llvm TFLA_SHAPES=$shape TFLA_KERNELS=$kernel OUT=$out timeout 120 \
      python3 benchmarks/tfla/tfla_bench.py >$out/tfla_$n.log 2>&1
    mv $out/tfla.json $out/tfla_$n.json 2>/dev/null
    grep -E "FAILED|Error" $out/tfla_$n.log | head -2 | cut -c1-300 | sed "s/^/TFLA $kernel $shape: /"
  done
done
wait $bpid
echo "== ours ($(( $(date +%s) - t0 )) s)"
export MLSTM_BENCH_PATHS=tc MLSTM_BENCH_STREAM=0 MLSTM_PROGRAM_CACHE=${MLSTM_PROGRAM_CACHE:-/tmp/tfla-program-cache}
for shape in ${shapes//,/ }; do
  IFS=: read -r B NH S DK DV <<<"$shape"
  for v in $variants; do
    IFS=: read -r L rows keys <<<"$v"
    if [ -n "${DEADLINE:-}" ] && [ "$(date +%s)" -ge "$DEADLINE" ]; then echo "(skipped: past DEADLINE) $shape $v"; continue; fi
    MLSTM_BENCH_TOKENS=$((B * S)) MLSTM_BENCH_SEQ=$S MLSTM_BENCH_HEADS=$NH MLSTM_BENCH_DQK=$DK MLSTM_BENCH_DHV=$DV \
      MLSTM_BENCH_REPS=${REPS:-5} MLSTM_BENCH_CHUNK=$L MLSTM_TC_CHUNK_ROWS=$rows MLSTM_TC_KEY_BLOCK=${keys:-} timeout 120 \
      $build/benchmarks/bench_opencl --benchmark_filter='xl_chunk' \
      --benchmark_out=$out/tc_${B}x${NH}x${S}_${DK}x${DV}_L${L}_q${rows}${keys:+_k$keys}.json \
      --benchmark_out_format=json >/dev/null 2>&1 ||
      echo "bench failed: $shape $v"
  done
done
python3 benchmarks/tfla/compare.py $out | tee $out/compare.md
echo "done after $(( $(date +%s) - t0 )) s"
