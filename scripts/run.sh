#!/usr/bin/env bash
# Quick start, command 1: install what is missing, build, and run the main job
# (`mlstm run`: a synthetic 1M-token sequence streamed through the flow graph on every usable device).
# Arguments are passed to `mlstm run` (see `mlstm run --help`).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/install-deps.sh"
bash "$root/scripts/build.sh"
exec "${MLSTM_BUILD_DIR:-$root/build}/tools/mlstm" run "$@"
