#!/usr/bin/env bash
# Configures and builds pardit (Release, ccache) into $PARDIT_BUILD_DIR (default: build/).
# Extra arguments go to cmake's configure step, e.g. -DPARDIT_BUILD_TESTS=OFF.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${PARDIT_BUILD_DIR:-$root/build}"
venv="${PARDIT_VENV:-$("$root/launch/install.sh" | tail -n 1)}"
export PARDIT_VENV="$venv"
# One compiler cache for every build of every checkout: paths under the checkout are hashed relative to it.
export CCACHE_DIR="${CCACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pardit/ccache}" CCACHE_BASEDIR="${CCACHE_BASEDIR:-$root}"
# Every source is compiled with the precompiled header (-include): ccache caches those only with this
# sloppiness (its manual's setting for precompiled headers), and a fresh checkout's headers are newer than
# the cache (the mtime/ctime checks would refuse them).
export CCACHE_SLOPPINESS="${CCACHE_SLOPPINESS:-pch_defines,time_macros,include_file_mtime,include_file_ctime}"
mkdir -p "$build"
jobs="${PARDIT_JOBS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"  # (GNU nproc heeds OMP_NUM_THREADS)
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE="${PARDIT_BUILD_TYPE:-Release}" \
      -DPARDIT_PYTHON="$venv/bin/python" "$@" >"$build/configure.log" 2>&1 || {
  cat "$build/configure.log" >&2; exit 1; }
cmake --build "$build" -j "$jobs"
