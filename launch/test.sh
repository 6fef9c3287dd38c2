#!/usr/bin/env bash
# Installs what is missing, builds, and runs the test suite with CTest (one intra-op thread per test).
# Extra arguments go to ctest, e.g. -L unit or -R Checkpoint.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${PARDIT_BUILD_DIR:-$root/build}"
# --plots: h5py and matplotlib for the tools test; --slurm: the Slurm test (label slurm) starts a one-node cluster; without root it is skipped visibly.
# --fuzz: clang for the fuzz and sanitizer tests; --vocab: the real tokenizer vocabularies (RealVocab.*).
venv="$("$root/launch/install.sh" --plots --fuzz --vocab $([[ $(id -u) -eq 0 ]] && echo --slurm) | tail -n 1)"
export PARDIT_VENV="${PARDIT_VENV:-$venv}"
# CI settings: warnings are errors, and every public header must compile on its own.
"$root/launch/build.sh" -DPARDIT_BUILD_TESTS=ON -DPARDIT_WARNINGS_AS_ERRORS=ON -DPARDIT_CHECK_HEADERS=ON
# Jobs from the cores (GNU nproc would take OMP_NUM_THREADS, about to be 1, for the answer).
jobs="${PARDIT_TEST_JOBS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"
export OMP_NUM_THREADS=1
cd "$build"
ctest --output-on-failure -j "$jobs" "$@"
