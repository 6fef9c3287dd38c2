#!/usr/bin/env bash
# Builds tsan_streamer (clang, -fsanitize=thread) in OUT (default build-tsan/) and runs it: a data race
# in the streamer, the checkpoint or the safetensors reader is a ThreadSanitizer report and a failure.
#   tsan/run.sh [OUT]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/build-tsan}"
command -v clang++ >/dev/null || { echo "SKIP: clang++ not found (launch/install.sh --fuzz)"; exit 77; }
venv="${PARDIT_VENV:-$("$root/launch/install.sh" | tail -n 1)}"
cmake -S "$root" -B "$out" -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DPARDIT_TSAN=ON \
      -DPARDIT_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPARDIT_PYTHON="$venv/bin/python" \
      >"$out.configure.log" 2>&1 || { cat "$out.configure.log"; exit 1; }
cmake --build "$out" -j 2 --target tsan_streamer >"$out.build.log" 2>&1 || { tail -40 "$out.build.log"; exit 1; }
TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 ${TSAN_OPTIONS:-}" "$out/tsan/tsan_streamer"
