#!/usr/bin/env bash
# A clang build for the checks that need clang (fuzz/, tsan/, asan/): configures OUT with clang and the
# given CMake options, builds TARGETS (comma-separated), logs beside OUT (OUT.configure.log, OUT.build.log).
# Exits 77 (a skip in CTest) when clang is missing.
#   launch/clang_build.sh OUT TARGETS [CMAKE OPTIONS...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$1" targets="$2"
shift 2
command -v clang++ >/dev/null || { echo "SKIP: clang++ not found (launch/install.sh --fuzz)"; exit 77; }
venv="${PARDIT_VENV:-$("$root/launch/install.sh" | tail -n 1)}"
# The compiler cache of launch/build.sh; these builds carry line tables, whose compile folder is left out of
# the hash so that another checkout (or build folder) reuses the objects.
export CCACHE_DIR="${CCACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/pardit/ccache}" CCACHE_BASEDIR="${CCACHE_BASEDIR:-$root}"
# Every source is compiled with the precompiled header (-include): ccache caches those only with this
# sloppiness (its manual's setting for precompiled headers), and a fresh checkout's headers are newer than
# the cache (the mtime/ctime checks would refuse them).
export CCACHE_SLOPPINESS="${CCACHE_SLOPPINESS:-pch_defines,time_macros,include_file_mtime,include_file_ctime}"
export CCACHE_NOHASHDIR=1
# (No CUDA kernels: these checks run on the CPU, and nvcc would compile them with its own host compiler.)
cmake -S "$root" -B "$out" -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DPARDIT_PYTHON="$venv/bin/python" \
      -DPARDIT_CUDA_KERNELS=OFF "$@" >"$out.configure.log" 2>&1 || { cat "$out.configure.log"; exit 1; }
jobs="${PARDIT_JOBS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"
# shellcheck disable=SC2046
cmake --build "$out" -j "$jobs" --target $(tr ',' ' ' <<<"$targets") >"$out.build.log" 2>&1 ||
  { tail -40 "$out.build.log"; exit 1; }
