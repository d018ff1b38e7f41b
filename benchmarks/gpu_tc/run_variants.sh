#!/usr/bin/env bash
# Variant sweep used for docs/notes/tensor-cores.md (after run_gpu.sh has built /tmp/tc_bench and
# picked LDSM): split-M fragments, chunk 128.
ldsm=${1:-1}
b="/tmp/tc_bench --cl-dir kernels/opencl/tc --ldsm $ldsm"
echo "== MSPLIT=1, L=64";   TC_EXTRA_OPTS=-DMSPLIT=1 $b --time-only --anchors 01 | grep -E "^TIME"
echo "== L=128, OT=64 (check + time)"; TC_OT=64 $b --chunk 128 --cases 0 --anchors 01 | grep -E "^TIME|^CHECK"
