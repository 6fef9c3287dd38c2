#!/usr/bin/env bash
# Builds tsan_streamer and the modules it links (clang, -fsanitize=thread, unity batches) in OUT (default
# build-tsan/) and runs it: a data race in the streamer, the checkpoint or the safetensors reader is a
# ThreadSanitizer report and a failure.
#   tsan/run.sh [OUT]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/build-tsan}"
"$root/launch/clang_build.sh" "$out" tsan_streamer -DPARDIT_TSAN=ON -DPARDIT_BUILD_TESTS=OFF \
  -DCMAKE_BUILD_TYPE=None "-DCMAKE_CXX_FLAGS=-O1 -gline-tables-only" -DCMAKE_UNITY_BUILD=ON \
  -DCMAKE_UNITY_BUILD_BATCH_SIZE=16
TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 ${TSAN_OPTIONS:-}" "$out/tsan/tsan_streamer"
