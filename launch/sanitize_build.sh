#!/usr/bin/env bash
# The clang build that the AddressSanitizer run (asan/run.sh) and the fuzzers (fuzz/run.sh) share: one
# configuration (AddressSanitizer + UndefinedBehaviorSanitizer, libFuzzer's coverage on every target, -O0
# with line tables, the library as unity batches of 16), so whichever runs first builds the library and the
# other only adds its own targets. About a minute on two cores: the tests' time is spent in LibTorch, which
# is not instrumented.
#   launch/sanitize_build.sh OUT TARGETS   (TARGETS comma-separated)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "$root/launch/clang_build.sh" "$1" "$2" -DPARDIT_BUILD_TESTS=ON -DPARDIT_FUZZ=ON \
  -DPARDIT_SANITIZE=address,undefined -DCMAKE_BUILD_TYPE=None \
  "-DCMAKE_CXX_FLAGS=-O0 -gline-tables-only -fno-sanitize-recover=undefined" -DCMAKE_UNITY_BUILD=ON \
  -DCMAKE_UNITY_BUILD_BATCH_SIZE=16
