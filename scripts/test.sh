#!/usr/bin/env bash
# Quick start, command 2: install what is missing, build, and run the whole test suite (ctest).
# Two PoCL OpenCL devices stand in for GPUs on CPU-only machines.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/install-deps.sh"
bash "$root/scripts/build.sh"
export POCL_DEVICES=${POCL_DEVICES:-"pthread pthread"}
cd "${MLSTM_BUILD_DIR:-$root/build}"
ctest --output-on-failure -j "${MLSTM_JOBS:-$(nproc)}" "$@"
