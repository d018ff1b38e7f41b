#!/usr/bin/env bash
# Strong and weak scaling of one sequence over MPI ranks on one machine (issue 17), and the exchange cost against
# the state size: bench_mpi under `mpirun -np P` for P = 1, 2, 4, every rank bound to CORES cores (so P ranks use
# P * CORES cores: the resources grow with the ranks, as on a cluster), then once more with the machine's cores
# split among the ranks (P * CORES = all cores: the same hardware, the cost of splitting it into processes).
#   benchmarks/mpi/scaling.sh BUILD_DIR OUT_DIR [CORES] [extra bench_mpi options...]
set -euo pipefail
build=${1:?build dir}
out=${2:?output dir}
cores=${3:-4}
shift $(( $# >= 3 ? 3 : $# ))
mkdir -p "$out"
bench="$build/benchmarks/bench_mpi"
all=$(nproc)
run() {  # ranks, cores per rank, tag, bench_mpi options...
  local p=$1 pe=$2 tag=$3
  shift 3
  mpirun --allow-run-as-root -np "$p" --map-by "slot:PE=$pe" --bind-to core "$bench" \
    --json-out "$out/bench_mpi_${tag}_np$p.json" "$@" > "$out/bench_mpi_${tag}_np$p.log" 2>&1 ||
    { tail -20 "$out/bench_mpi_${tag}_np$p.log"; return 1; }
}
for p in 1 2 4; do
  if [ $((p * cores)) -le "$all" ]; then run "$p" "$cores" "cores$cores" "$@"; fi
  if [ $((all / p)) -ge 1 ]; then run "$p" $((all / p)) "split$all" "$@"; fi
done
echo "scaling: results in $out"
