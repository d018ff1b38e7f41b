#!/usr/bin/env bash
# Builds mlstm-flow with AddressSanitizer + UndefinedBehaviorSanitizer (Debug) in ${MLSTM_ASAN_DIR:-build-asan}
# and runs the test suite there. Settings that the sanitizers need:
#  - MLSTM_NUMA=off: TBB loads libtbbbind with RTLD_DEEPBIND for its NUMA query, which ASan refuses.
#  - scripts/ubsan.supp: UBSan's vptr check fires inside oneTBB's flow-graph headers (a downcast of TBB's
#    own task objects in _flow_graph_impl.h); the library itself is not built with RTTI checks.
#  - detect_leaks=0: PoCL and the OpenCL ICD loader keep allocations alive until exit.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${MLSTM_ASAN_DIR:-$root/build-asan}
bash "$root/scripts/install-deps.sh"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Debug -DMLSTM_SANITIZE=address,undefined \
      -DMLSTM_BUILD_PYTHON=OFF -DMLSTM_BUILD_BENCHMARKS=OFF >/dev/null
cmake --build "$build" -j "${MLSTM_JOBS:-$(nproc)}"
cd "$build"
# use_sigaltstack=0: PoCL's LLVM installs an alternate signal stack of its own on the thread that first enumerates
# OpenCL; ASan then fails to unmap the one it had put there when that thread ends ("failed to deallocate ... unable
# to unmap", OpenCLDevices.FirstEnumerationFromSeveralThreadsFindsEveryDevice, whose threads enumerate first).
# Without its own alternate stack ASan only loses the report of a stack overflow, which the suite does not test.
MLSTM_NUMA=off POCL_DEVICES="pthread pthread" ASAN_OPTIONS=detect_leaks=0:use_sigaltstack=0 \
  UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:suppressions=$root/scripts/ubsan.supp" \
  ctest --output-on-failure -j "${MLSTM_JOBS:-$(nproc)}" -E install_and_consume "$@"
