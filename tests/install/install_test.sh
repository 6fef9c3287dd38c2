#!/usr/bin/env bash
# `cmake --install` gives a relocatable prefix and a usable CMake package: installs the build tree into a
# temporary prefix, moves it, checks that the installed pardit needs nothing outside it and the system, builds
# examples/generate against it with find_package(pardit), and runs the example (1 and 2 ranks) and the
# installed pardit (in an empty environment) on a tiny synthetic model.
# usage: install_test.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
build="$1" source="$2"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cmake --install "$build" --prefix "$work/installed" >/dev/null
# The prefix is relocatable: moved elsewhere, the binary finds everything it needs inside it (RUNPATH
# $ORIGIN/../lib, LibTorch/NCCL/CUDA copied there) or in the system folders, in an empty environment.
mv "$work/installed" "$work/prefix"
runpath="$(readelf -d "$work/prefix/bin/pardit" | sed -n 's/.*RUNPATH.*\[\(.*\)\]/\1/p')"
[[ "$runpath" == '$ORIGIN/../lib' ]] || { echo "installed pardit has RUNPATH '$runpath', expected \$ORIGIN/../lib"; exit 1; }
outside="$(env -i PATH=/usr/bin:/bin ldd "$work/prefix/bin/pardit" | awk '/=>/ {print $3}' \
           | grep -vE "^($work/prefix/|/lib/|/lib64/|/usr/lib/|/usr/lib64/)" || true)"
[[ -z "$outside" ]] || { echo "installed pardit loads libraries from outside its prefix and the system:"; echo "$outside"; exit 1; }
env -i PATH=/usr/bin:/bin "$work/prefix/bin/pardit" --version
test -f "$work/prefix/lib/cmake/pardit/parditConfig.cmake"
test -f "$work/prefix/include/pardit/pipeline/engine.h"
cmake -S "$source/examples/generate" -B "$work/example" -DCMAKE_PREFIX_PATH="$work/prefix" \
      -DCMAKE_BUILD_TYPE=Release ${CMAKE_CXX_COMPILER_LAUNCHER:+-DCMAKE_CXX_COMPILER_LAUNCHER=$CMAKE_CXX_COMPILER_LAUNCHER} \
      >"$work/configure.log" 2>&1 || { cat "$work/configure.log"; exit 1; }
cmake --build "$work/example" -j 2 >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
env -i PATH=/usr/bin:/bin "$work/prefix/bin/pardit" synth --preset tiny --out "$work/m" -q
"$work/example/generate_latents" "$work/m" "$work/m/prompt_embeds.safetensors" "$work/one.safetensors"
mpiexec -n 2 --oversubscribe "$work/example/generate_latents" "$work/m" "$work/m/prompt_embeds.safetensors" \
        "$work/two.safetensors"
env -i PATH=/usr/bin:/bin "$work/prefix/bin/pardit" generate --model "$work/m" --prompt-embeds "$work/m/prompt_embeds.safetensors" \
        --height 128 --width 128 --steps 4 --seed 42 --threads 1 -q --save-latents "$work/cli.safetensors"
# The example, the example on 2 ranks and the command line agree.
python_check='
import sys, struct, json
def read(p):
    b = open(p, "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n])
    s, e = h["latents"]["data_offsets"]; return h["latents"]["shape"], b[8 + n + s:8 + n + e]
a, b, c = (read(p) for p in sys.argv[1:4])
assert a[0] == [1, 64, 64], a[0]
assert a == c, "example and pardit generate differ"
print("example latents", a[0], "equal to pardit generate; 2 ranks", "bit-identical" if a == b else "differ")
'
python3 -c "$python_check" "$work/one.safetensors" "$work/two.safetensors" "$work/cli.safetensors"
# One engine, three different requests, the weights loaded by the first only.
mkdir -p "$work/served"
"$work/example/serve_requests" "$work/m" "$work/served" | tee "$work/served.log"
[[ $(grep -c "weights loaded in this request: no" "$work/served.log") -eq 2 ]] || { echo "serve_requests loaded more than once"; exit 1; }
for i in 0 1 2; do [[ -s "$work/served/request-$i.png" ]] || { echo "serve_requests wrote no request-$i.png"; exit 1; }; done
echo "install test: ok"
