#!/usr/bin/env bash
# Installs every Debian package that mlstm-flow's build, tests (incl. the fuzzers: clang + libFuzzer; the
# ThreadSanitizer stage downloads oneTBB's source with curl and xz from Debian's archive), benchmarks and
# Python bindings need.
# Does nothing (and needs no network) when all of them are already present.
set -euo pipefail
PKGS=(
  build-essential cmake pkg-config
  libtbb-dev libtbbbind-2-5 libhwloc-dev
  ocl-icd-opencl-dev opencl-headers opencl-clhpp-headers clinfo pocl-opencl-icd
  libspdlog-dev libfmt-dev
  libgtest-dev libgmock-dev googletest libbenchmark-dev
  libopenblas-pthread-dev libopenblas-dev libdnnl-dev libblis-pthread-dev libxsmm-dev
  libcli11-dev nlohmann-json3-dev
  libopenmpi-dev openmpi-bin
  python3 python3-dev python3-numpy pybind11-dev python3-matplotlib
  clang libclang-rt-14-dev curl ca-certificates xz-utils
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "install-deps: installing ${missing[*]}" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
