#!/usr/bin/env bash
# Quick start, command 2 (and CI's only command, via .ci/run): install what is missing, build, run the whole
# test suite (ctest; two PoCL OpenCL devices stand in for GPUs on CPU-only machines), then the reliability
# stages: the suite under AddressSanitizer + UndefinedBehaviorSanitizer (scripts/sanitize.sh), the flow-graph
# tests under ThreadSanitizer against a TSan-built oneTBB (scripts/tsan.sh), and a bounded libFuzzer run of
# the .npy and snapshot readers (scripts/fuzz.sh: a fixed seed and input count, so every run is the same).
# Every stage is deterministic: the tests draw their random inputs from fixed seeds (MLSTM_TEST_SEED=random for
# fresh draws: scripts/stress.sh), the fuzzers run a fixed seed and count, and third-party threads' reports are
# suppressed at their libraries (scripts/tsan.supp).
# MLSTM_TEST_QUICK=1 stops after the plain suite (for local edit-test loops). Arguments go to the first ctest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/install-deps.sh"
bash "$root/scripts/build.sh"
export POCL_DEVICES=${POCL_DEVICES:-"pthread pthread"}
# Every OpenCL buffer handed out is first filled with NaN bytes, so a kernel reading what nobody wrote fails
# a test instead of reusing a stale value (devices/src/opencl/device.cpp).
export MLSTM_OPENCL_POISON=${MLSTM_OPENCL_POISON:-1}
# The same for the CPU kernels' uninitialised and pooled buffers (kernels/src/stages.cpp).
export MLSTM_CPU_POISON=${MLSTM_CPU_POISON:-1}
# Transfers of 64 KiB and more go through the pinned staging slots in 64 KiB pieces (default: 32 MiB slots from
# 4 MiB), so the suite's tensors exercise the piecewise copies and the strided gathers.
export MLSTM_OPENCL_STAGING=${MLSTM_OPENCL_STAGING:-65536}
(cd "${MLSTM_BUILD_DIR:-$root/build}" && ctest --output-on-failure -j "${MLSTM_JOBS:-$(nproc)}" "$@")
if [ "${MLSTM_TEST_QUICK:-0}" = 1 ]; then
  echo "MLSTM_TEST_QUICK=1: sanitizer, ThreadSanitizer and fuzz stages skipped"
  exit 0
fi
echo "== AddressSanitizer + UndefinedBehaviorSanitizer: whole suite"
bash "$root/scripts/sanitize.sh"
echo "== ThreadSanitizer: flow-graph tests"
bash "$root/scripts/tsan.sh"
echo "== libFuzzer: .npy and snapshot readers, fixed seed and input count"
bash "$root/scripts/fuzz.sh"
