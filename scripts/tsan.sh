#!/usr/bin/env bash
# ThreadSanitizer run of the flow-graph tests (tests labelled "graph": the graph, streams, device streams).
# TSan needs every library that hands data between threads instrumented: Debian's libtbb is not, and gives
# hundreds of false reports (docs/RELIABILITY.md). So this builds oneTBB 2021.8.0 (the Debian version) with
# -fsanitize=thread once (cached, below), from $MLSTM_TBB_SOURCE (a source tree)
# or the release tarball (Debian's archive first: CI reaches it where it cannot reach GitHub), then the
# graph tests against it, and runs them (halt on the first race).
# Nothing of oneTBB is vendored; the instrumented build is cached per compiler outside the tree
# (${XDG_CACHE_HOME:-~/.cache}/mlstm-flow/tbb-tsan-*; MLSTM_TSAN_TBB_PREFIX names another place; delete it to redo
# it), so fresh clones on one machine build it once.
# scripts/tsan.supp silences third-party code only (PoCL's own threads, tbbmalloc's free lists), never our frames.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${MLSTM_TSAN_DIR:-$root/build-tsan}
cache=${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/mlstm-flow
compiler_id=$( (c++ --version | head -n 1) | cksum | cut -d' ' -f1)
prefix=${MLSTM_TSAN_TBB_PREFIX:-$cache/tbb-tsan-2021.8.0-$compiler_id}
jobs=${MLSTM_JOBS:-$(nproc)}
mkdir -p "$build"
if [ ! -e "$prefix/.done" ]; then
  src=${MLSTM_TBB_SOURCE:-}
  if [ -z "$src" ]; then
    # The release source, sha256-checked: Debian's archive (the same upstream tarball Debian builds libtbb-dev
    # from; reachable wherever apt is), else GitHub's release tarball, else a copy cached by an earlier run.
    tarball=$build/oneTBB-2021.8.0.tar.xz
    debian_url=http://deb.debian.org/debian/pool/main/o/onetbb/onetbb_2021.8.0.orig.tar.xz
    debian_sha=7e9111b8bb59c8800bf6d0b06afe7b0891937443d2dae1ee1101c8e2ede6a7ef
    if [ ! -s "$tarball" ] && [ -s "$cache/onetbb_2021.8.0.orig.tar.xz" ]; then
      cp "$cache/onetbb_2021.8.0.orig.tar.xz" "$tarball"
    fi
    if [ ! -s "$tarball" ]; then
      if curl -fsSL --retry 3 -o "$tarball.part" "$debian_url" &&
         echo "$debian_sha  $tarball.part" | sha256sum -c --quiet -; then
        mv "$tarball.part" "$tarball"
        mkdir -p "$cache" && cp "$tarball" "$cache/onetbb_2021.8.0.orig.tar.xz" || true
      elif curl -fsSL --retry 3 -o "$tarball.part" \
             https://github.com/oneapi-src/oneTBB/archive/refs/tags/v2021.8.0.tar.gz; then
        gzip -dc "$tarball.part" | xz -c >"$tarball" && rm -f "$tarball.part"
      else
        rm -f "$tarball.part"
        echo "tsan.sh: cannot download oneTBB 2021.8.0 (tried $debian_url and GitHub); offline, point" \
             "MLSTM_TBB_SOURCE at a oneTBB 2021.8.0 source tree" >&2
        exit 1
      fi
    fi
    rm -rf "$build/oneTBB-src" && mkdir -p "$build/oneTBB-src"
    tar -xJf "$tarball" -C "$build/oneTBB-src" --strip-components=1
    src=$build/oneTBB-src
  fi
  echo "== building oneTBB with ThreadSanitizer from $src"
  cmake -S "$src" -B "$build/tbb-build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTBB_TEST=OFF -DTBB_EXAMPLES=OFF \
    -DTBB_STRICT=OFF -DTBB_DISABLE_HWLOC_AUTOMATIC_SEARCH=ON -DCMAKE_INSTALL_PREFIX="$prefix" \
    -DCMAKE_CXX_FLAGS="-fsanitize=thread -g -Wno-tsan" -DCMAKE_C_FLAGS="-fsanitize=thread -g -Wno-tsan" \
    -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=thread" >/dev/null
  # oneTBB's own warnings go to a log (shown if its build fails), not into the test output.
  cmake --build "$build/tbb-build" -j "$jobs" >"$build/tbb-build.log" 2>&1 || { tail -40 "$build/tbb-build.log"; exit 1; }
  rm -rf "$prefix.part"
  cmake --install "$build/tbb-build" --prefix "$prefix.part" >/dev/null
  touch "$prefix.part/.done"
  rm -rf "$prefix" && mkdir -p "$(dirname "$prefix")" && mv "$prefix.part" "$prefix"
fi
cmake -S "$root" -B "$build/mlstm" -DCMAKE_BUILD_TYPE=Debug -DMLSTM_SANITIZE=thread -DCMAKE_PREFIX_PATH="$prefix" \
  -DMLSTM_BUILD_PYTHON=OFF -DMLSTM_BUILD_BENCHMARKS=OFF -DMLSTM_BUILD_EXAMPLES=OFF -DMLSTM_BUILD_TOOLS=OFF >/dev/null
cmake --build "$build/mlstm" -j "$jobs" --target test_graph test_stream test_device_stream
cd "$build/mlstm"
LD_LIBRARY_PATH="$prefix/lib:${LD_LIBRARY_PATH:-}" MLSTM_NUMA=off POCL_DEVICES="pthread pthread" \
  TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$root/scripts/tsan.supp" \
  ctest --output-on-failure -j "$jobs" -L graph "$@"
