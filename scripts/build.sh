#!/usr/bin/env bash
# Configures and builds mlstm-flow into ${MLSTM_BUILD_DIR:-build} (Release). Extra arguments go to cmake.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${MLSTM_BUILD_DIR:-$root/build}
jobs=${MLSTM_JOBS:-$(nproc)}
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=${MLSTM_BUILD_TYPE:-Release} "$@" >/dev/null
cmake --build "$build" -j "$jobs"
