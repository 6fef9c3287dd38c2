#!/usr/bin/env bash
# The GPU check: pardit against diffusers on one GPU (speed, fidelity, peak memory, FP8, offload), run
# from a bundle that needs nothing on the GPU machine but its driver and a Python with PyTorch.
#
#   bench/gpu_check.sh bundle [DIR]    on a machine with the CUDA toolkit: a Release build against the
#                                      CUDA LibTorch of launch/install.sh, then DIR (default out/gpu-check):
#                                      bin/pardit and bin/pardit_unit_tests (its Cuda* suites run first, with
#                                      fixtures/), lib/ (the shared libraries a GPU host may lack: Open MPI,
#                                      HDF5, Boost, libpng, utf8proc and their dependencies; not LibTorch or
#                                      CUDA, which come from the host's PyTorch), openmpi/ (Open MPI's
#                                      components for a singleton rank), python/ (diffusers, for hosts without
#                                      it), gpu_check.py and run.sh
#   DIR/run.sh [gpu_check.py options]  on the GPU machine; prints one table, writes DIR/results/
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
  # diffusers (pure Python) and its two packages a PyTorch host may lack, used only when the host has none.
  local wheels
  wheels="$(mktemp -d)"
  # shellcheck disable=SC1091
  source "$root/launch/versions.env"
  if "$py" -m pip download -q --no-deps -d "$wheels" "diffusers==$PARDIT_DIFFUSERS_VERSION" huggingface_hub safetensors \
       >/dev/null 2>&1; then
    # Pure-Python wheels import from the zip (PYTHONPATH); safetensors has a compiled module: unpacked.
    cp "$wheels"/diffusers-*.whl "$wheels"/huggingface_hub-*.whl "$dir/python/"
    "$py" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$wheels"/safetensors-*.whl "$dir/python"
  else
    echo "gpu_check: could not download the diffusers wheels (offline?); the GPU host must have diffusers" >&2
  fi
  rm -rf "$wheels"
  cp "$root/bench/gpu_check.py" "$dir/"
  cat >"$dir/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the GPU check with the host's PyTorch: its libraries and CUDA's come from the torch package.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-python3}"
libs="$("$py" -c 'import glob, os, torch
d = os.path.dirname(torch.__file__)
print(":".join([os.path.join(d, "lib")] + sorted(glob.glob(os.path.join(d, "..", "nvidia", "*", "lib")))))')"
export LD_LIBRARY_PATH="$here/lib:$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# One rank without mpirun: Open MPI's singleton mode with the bundled components.
export OMPI_MCA_ess_singleton_isolated=1 OMPI_MCA_mca_base_component_path="$here/openmpi"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# The bundled diffusers when the host has none (or when asked: the dry run checks that they import).
if [[ -n "${PARDIT_BUNDLED_PYTHON:-}" ]] || ! "$py" -c "import diffusers" 2>/dev/null; then
  extra="$here/python"
  for w in "$here"/python/*.whl; do [[ -e "$w" ]] && extra="$extra:$w"; done
  export PYTHONPATH="$extra${PYTHONPATH:+:$PYTHONPATH}"
fi
mkdir -p "$here/results"
# The CUDA unit tests first (they skip without a CUDA device); their log goes with the results.
tests=0
if [[ -x "$here/bin/pardit_unit_tests" ]]; then
  PARDIT_FIXTURE_DIR="$here/fixtures" PARDIT_BINARY="$here/bin/pardit" OMP_NUM_THREADS=1 \
    "$here/bin/pardit_unit_tests" --gtest_filter='Cuda*' \
    >"$here/results/gpu_tests.log" 2>&1 || tests=$?
  grep -E '^\[cuda\]' "$here/results/gpu_tests.log" || true
  echo "gpu tests: $(grep -E '^\[  (PASSED|SKIPPED|FAILED) +\] [0-9]' "$here/results/gpu_tests.log" | tr -s ' ' | paste -sd ';')" \
       "(results/gpu_tests.log)"
  grep -E '^\[  FAILED  \] [A-Z]' "$here/results/gpu_tests.log" || true
fi
rc=0
"$py" "$here/gpu_check.py" --pardit "$here/bin/pardit" --out "$here/results" "$@" || rc=$?
(( rc != 0 )) && exit $rc
exit $tests
RUN
  chmod +x "$dir/run.sh"
  echo "bundle: $dir ($(du -sh "$dir" | cut -f1); bin $(du -sh "$dir/bin" | cut -f1), lib $(du -sh "$dir/lib" | cut -f1)," \
       "openmpi $(du -sh "$dir/openmpi" | cut -f1), python $(du -sh "$dir/python" | cut -f1))"
}

bundle
if [[ "$cmd" == dry-run ]]; then
  # What travels to a GPU host stays within 50 MB.
  size=$(du -sm "$dir" | cut -f1)
  (( size <= 50 )) || { echo "gpu_check: the bundle is $size MB, more than 50 MB" >&2; exit 1; }
  venv="${PARDIT_VENV:-$("$root/launch/install.sh" | tail -n 1)}"
  # A clean environment, as on a GPU host: only the bundle, the venv's torch and the system's basics.
  env -i HOME="${HOME:-/tmp}" PATH=/usr/bin:/bin PYTHON="${PYTHON:-$venv/bin/python}" PARDIT_BUNDLED_PYTHON=1 \
    bash "$dir/run.sh" --device cpu --preset small --sizes 128 --text-len 32 --iters 2 --warmup 1 --steps 3 \
    --budgets "150MB" --attention-kernels math --threads "${PARDIT_DRY_RUN_THREADS:-2}"
fi
