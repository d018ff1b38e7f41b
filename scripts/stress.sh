#!/usr/bin/env bash
# Flake hunt: runs the built suite ROUNDS times (default 20) with fresh random inputs in every test
# (MLSTM_TEST_SEED=random), two PoCL devices and poisoned device buffers as scripts/test.sh sets them, and
# prints each failure with the seed that replays it. CI draws fixed seeds (scripts/test.sh); this is where
# rare tolerance failures are found, to be fixed at their cause (docs/RELIABILITY.md lists what was found).
#   bash scripts/stress.sh 50 -L graph        # 50 rounds of the graph tests; extra arguments go to ctest
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
rounds=${1:-20}
shift || true
case "$rounds" in ''|*[!0-9]*) echo "stress.sh: ROUNDS must be a number (got '$rounds')" >&2; exit 2;; esac
cd "${MLSTM_BUILD_DIR:-$root/build}"
export POCL_DEVICES=${POCL_DEVICES:-"pthread pthread"} MLSTM_OPENCL_POISON=${MLSTM_OPENCL_POISON:-1}
export MLSTM_OPENCL_STAGING=${MLSTM_OPENCL_STAGING:-65536} MLSTM_TEST_SEED=random
log=$(mktemp -d)/stress
failed=0
for r in $(seq 1 "$rounds"); do
  if ! ctest --output-on-failure -j "${MLSTM_JOBS:-$(nproc)}" "$@" >"$log.$r" 2>&1; then
    failed=$((failed + 1))
    echo "round $r: FAILED ($log.$r)"
    grep -E "^\[  FAILED  \]|\[ seed     \]|Failure|rel=" "$log.$r" | head -40 || true
  else
    rm -f "$log.$r"
  fi
done
echo "stress: $failed of $rounds rounds failed"
[ "$failed" -eq 0 ]
