#!/usr/bin/env bash
# The GPU check: pardit against diffusers on one GPU (speed, fidelity, peak memory, FP8, offload), run
# from a bundle that needs nothing on the GPU machine but its driver and a Python with PyTorch.
#
#   bench/gpu_check.sh bundle [DIR]    on a machine with the CUDA toolkit: a Release build against the
#                                      CUDA LibTorch of launch/install.sh, then DIR (default out/gpu-check):
#                                      bin/pardit and bin/pardit_unit_tests (its Cuda* suites run first, with
#                                      fixtures/), libs.tar.gz (lib/: the shared libraries a GPU host may
#                                      lack: Open MPI, HDF5, Boost, libpng, utf8proc and their dependencies;
#                                      not LibTorch or CUDA, which come from the host's PyTorch; openmpi/:
#                                      Open MPI's components for a singleton rank; unpacked by run.sh), python/ (diffusers, and for hosts
#                                      without them huggingface_hub and safetensors), gpu_check.py and run.sh
#   DIR/run.sh [gpu_check.py options]  on the GPU machine; prints each row as it is measured and the table
#                                      at the end, within DEADLINE_S (540 s); results in RESULTS_DIR
#   bench/gpu_check.sh dry-run [DIR]   bundle, then run it here on the CPU (small preset, 256 px) in a clean
#                                      environment (env -i): what CI runs
#
# Knobs: BUILD (build folder, default build-gpu-check; an existing build's pardit is used as it is),
# PYTHON (the build's and the dry run's Python).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cmd="${1:-}"
dir="${2:-$root/out/gpu-check}"
[[ "$cmd" == bundle || "$cmd" == dry-run ]] || { sed -n '2,19p' "${BASH_SOURCE[0]}"; exit 2; }

bundle() {
  local venv py build
  venv="${PARDIT_VENV:-$("$root/launch/install.sh" | tail -n 1)}"
  py="${PYTHON:-$venv/bin/python}"
  build="${BUILD:-$root/build-gpu-check}"
  mkdir -p "$(dirname "$dir")"
  if [[ -z "${BUILD:-}" || ! -x "$build/pardit" ]]; then  # BUILD=an existing build: its binaries as they are
    cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DPARDIT_PYTHON="$py" -DPARDIT_BUILD_TESTS=ON \
          -DPARDIT_INSTALL_RUNTIME=OFF >"$dir.configure.log" 2>&1 || { cat "$dir.configure.log"; exit 1; }
    cmake --build "$build" -j "$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)" --target pardit pardit_unit_tests \
      >"$dir.build.log" 2>&1 || { tail -40 "$dir.build.log"; exit 1; }
  fi
  rm -rf "$dir" && mkdir -p "$dir/bin" "$dir/lib" "$dir/openmpi" "$dir/python"
  cp "$build/pardit" "$dir/bin/"
  # The CUDA unit tests (suites Cuda*, CTest label gpu) with the fixture model they read.
  if [[ -x "$build/tests/pardit_unit_tests" ]]; then
    cp "$build/tests/pardit_unit_tests" "$dir/bin/"
    mkdir -p "$dir/fixtures/flux_tiny_dev" "$dir/fixtures/flux_tiny_schnell"
    cp -r "$root/tests/fixtures/flux_tiny_dev/diffusers" "$dir/fixtures/flux_tiny_dev/"
    cp -r "$root/tests/fixtures/flux_tiny_schnell/diffusers" "$dir/fixtures/flux_tiny_schnell/"
    cp "$root"/tests/fixtures/{generate_tiny_dev,generate_tiny_schnell_cfg,pipeline_tiny_dev_image}.safetensors \
       "$dir/fixtures/"
  fi
  strip --strip-unneeded "$dir"/bin/* 2>/dev/null || true  # their symbol tables: a sixth of their size
  # Open MPI's components for one rank without mpirun; the network transports (UCX, libfabric, verbs, PSM)
  # and OpenSHMEM are left out with the libraries they pull in.
  local comps
  comps="$(dirname "$(ldd "$build/pardit" | awk '$1 ~ /^libmpi.so/ {print $3}')")/openmpi/lib/openmpi3"
  [[ -d "$comps" ]] || comps=/usr/lib/x86_64-linux-gnu/openmpi/lib/openmpi3
  local deps
  for c in "$comps"/*.so; do
    # (ldd's output first, then the match: `ldd | grep -q` under pipefail fails whenever grep's early exit
    # kills ldd with SIGPIPE, and the component was then taken.)
    deps="$(ldd "$c" 2>/dev/null || true)"
    grep -Eq 'libucp|libucs|libuct|libfabric|libibverbs|libpsm|liboshmem|libmlx' <<<"$deps" && continue
    cp "$c" "$dir/openmpi/"
  done
  # Every library the binary and those components load, except glibc's, the C++ runtime's, LibTorch's and CUDA's.
  local skip='(/site-packages/torch/|/nvidia/|/usr/local/cuda|/libc\.so|/libm\.so|/libdl\.so|/librt\.so|/libpthread\.so|/ld-linux|/libstdc\+\+|/libgcc_s|/libresolv\.so|/libutil\.so)'
  for f in "$dir"/bin/* "$dir"/openmpi/*.so; do ldd "$f" 2>/dev/null | awk '$3 ~ /^\// {print $3}'; done |
    sort -u | grep -Ev "$skip" | while read -r lib; do cp -L "$lib" "$dir/lib/"; done
  # diffusers (pure Python), and for a host without them huggingface_hub (pinned to a release whose
  # dependencies, httpx and its own, a PyTorch image usually has: bundled too) and safetensors. run.sh puts
  # each on the path only where the host cannot import its own: a newer huggingface_hub in front of the
  # host's would shadow it and need what the host lacks.
  local wheels
  wheels="$(mktemp -d)"
  # shellcheck disable=SC1091
  source "$root/launch/versions.env"
  if "$py" -m pip download -q --no-deps -d "$wheels" "diffusers==$PARDIT_DIFFUSERS_VERSION" \
       "huggingface_hub==$PARDIT_HUB_FALLBACK_VERSION" httpx httpcore h11 anyio sniffio certifi idna safetensors \
       >/dev/null 2>&1; then
    mkdir -p "$dir/python/hub"
    cp "$wheels"/diffusers-*.whl "$dir/python/"
    for w in huggingface_hub httpx httpcore h11 anyio sniffio certifi idna; do cp "$wheels/$w"-*.whl "$dir/python/hub/"; done
    # safetensors has a compiled module: unpacked (a zip on PYTHONPATH cannot load it).
    "$py" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$wheels"/safetensors-*.whl \
      "$dir/python/safetensors-pkg"
  else
    echo "gpu_check: could not download the diffusers wheels (offline?); the GPU host must have diffusers" >&2
  fi
  rm -rf "$wheels"
  cp "$root/bench/gpu_check.py" "$dir/"
  cat >"$dir/run.sh" <<'RUN'
#!/usr/bin/env bash
# The GPU check with the host's PyTorch (its libraries and CUDA's come from the torch package). Options go to
# gpu_check.py; the environment may set:
#   RESULTS_DIR  where results.json and table.md (rewritten after every row), gpu_tests.log and logs.tar.gz go
#                (default: results/ beside this script)
#   MODEL_DIR    where the model is written once and reused (default: gpu_check.py's choice, ~24 GB free needed)
#   DEADLINE_S   seconds for the whole check, tests included (default 540): rows that would end later are
#                skipped and the table is printed all the same
set -uo pipefail
start=$(date +%s)
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-python3}"
results="${RESULTS_DIR:-$here/results}"
deadline="${DEADLINE_S:-540}"
export PYTHONUNBUFFERED=1
mkdir -p "$results" "$here/logs"
trap 'tar czf "$results/logs.tar.gz" -C "$here" logs 2>/dev/null || true' EXIT
[[ -d "$here/lib" && -d "$here/openmpi" ]] || tar xzf "$here/libs.tar.gz" -C "$here" ||
  { echo "gpu_check: cannot unpack libs.tar.gz" >&2; exit 1; }
libs="$("$py" -c 'import glob, os, torch
d = os.path.dirname(torch.__file__)
print(":".join([os.path.join(d, "lib")] + sorted(glob.glob(os.path.join(d, "..", "nvidia", "*", "lib")))))')" ||
  { echo "gpu_check: $py cannot import torch" >&2; exit 1; }
# pardit's libraries for pardit's processes only: the host's Python keeps its own libssl, libz, libffi.
export PARDIT_LD_LIBRARY_PATH="$here/lib:$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# One rank without mpirun: Open MPI's singleton mode with the bundled components.
export OMPI_MCA_ess_singleton_isolated=1 OMPI_MCA_mca_base_component_path="$here/openmpi"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# The bundled Python packages where the host cannot import its own (all of them when PARDIT_BUNDLED_PYTHON is
# set: the dry run checks that diffusers imports with the bundled huggingface_hub, as on a host without it).
extra=""
lacks() { [[ -n "${PARDIT_BUNDLED_PYTHON:-}" ]] || ! "$py" -c "import $1" 2>/dev/null; }
if lacks diffusers; then for w in "$here"/python/diffusers-*.whl; do [[ -e "$w" ]] && extra="$extra:$w"; done; fi
if lacks huggingface_hub; then for w in "$here"/python/hub/*.whl; do [[ -e "$w" ]] && extra="$extra:$w"; done; fi
if ! "$py" -c "import safetensors" 2>/dev/null; then extra="$extra:$here/python/safetensors-pkg"; fi
[[ -n "$extra" ]] && export PYTHONPATH="${extra#:}${PYTHONPATH:+:$PYTHONPATH}"
# The binary loads with what the bundle and the host give it.
missing="$(LD_LIBRARY_PATH="$PARDIT_LD_LIBRARY_PATH" ldd "$here/bin/pardit" 2>&1 | grep 'not found' || true)"
[[ -z "$missing" ]] || { echo "gpu_check: bin/pardit cannot load: $missing" >&2; exit 1; }
LD_LIBRARY_PATH="$PARDIT_LD_LIBRARY_PATH" "$here/bin/pardit" --version || exit 1
# The CUDA unit tests first (they skip without a CUDA device), within a fifth of the time.
tests=0
if [[ -x "$here/bin/pardit_unit_tests" ]]; then
  LD_LIBRARY_PATH="$PARDIT_LD_LIBRARY_PATH" PARDIT_FIXTURE_DIR="$here/fixtures" PARDIT_BINARY="$here/bin/pardit" \
    OMP_NUM_THREADS=1 timeout $((deadline / 5)) "$here/bin/pardit_unit_tests" --gtest_filter='Cuda*' \
    >"$results/gpu_tests.log" 2>&1 || tests=$?
  (( tests == 124 )) && echo "gpu tests: stopped after $((deadline / 5)) s"
  grep -E '^\[cuda\]' "$results/gpu_tests.log" || true
  echo "gpu tests: $(grep -E '^\[  (PASSED|SKIPPED|FAILED) +\] [0-9]' "$results/gpu_tests.log" | tr -s ' ' | paste -sd ';')" \
       "(gpu_tests.log)"
  grep -E '^\[  FAILED  \] [A-Z]' "$results/gpu_tests.log" || true
fi
rc=0
"$py" "$here/gpu_check.py" --pardit "$here/bin/pardit" --out "$results" --logs "$here/logs" \
  ${MODEL_DIR:+--model-dir "$MODEL_DIR"} --deadline-s "$(( (left = deadline - ($(date +%s) - start)) > 1 ? left : 1 ))" \
  "$@" || rc=$?
(( rc != 0 )) && exit $rc
exit $tests
RUN
  chmod +x "$dir/run.sh"
  # The shared libraries travel compressed (half their size); run.sh unpacks them where it runs.
  local libs
  libs="lib $(du -sh "$dir/lib" | cut -f1), openmpi $(du -sh "$dir/openmpi" | cut -f1)"
  tar czf "$dir/libs.tar.gz" -C "$dir" lib openmpi && rm -rf "$dir/lib" "$dir/openmpi"
  echo "bundle: $dir ($(du -sh "$dir" | cut -f1); bin $(du -sh "$dir/bin" | cut -f1), libs.tar.gz" \
       "$(du -sh "$dir/libs.tar.gz" | cut -f1) ($libs), python $(du -sh "$dir/python" | cut -f1))"
}

bundle
if [[ "$cmd" == dry-run ]]; then
  # What travels to a GPU host stays within 50 MB.
  size=$(du -sm "$dir" | cut -f1)
  (( size <= 50 )) || { echo "gpu_check: the bundle is $size MB, more than 50 MB" >&2; exit 1; }
  venv="${PARDIT_VENV:-$("$root/launch/install.sh" | tail -n 1)}"
  # A clean environment, as on a GPU host: only the bundle, the venv's torch and the system's basics.
  env -i HOME="${HOME:-/tmp}" PATH=/usr/bin:/bin PYTHON="${PYTHON:-$venv/bin/python}" PARDIT_BUNDLED_PYTHON=1 \
    DEADLINE_S=1800 MODEL_DIR="$dir-model" bash "$dir/run.sh" --device cpu --preset small --sizes 128 --text-len 32 --iters 2 --warmup 1 --steps 3 \
    --budgets "150MB" --attention-kernels math --threads "${PARDIT_DRY_RUN_THREADS:-2}"
fi
