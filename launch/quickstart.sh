#!/usr/bin/env bash
# The quickstart: installs and builds pardit, writes the built-in synthetic pipeline ('small' preset, random
# weights in the diffusers layout: tokenizers, CLIP and T5 text encoders, transformer, VAE), and generates a
# PNG from a prompt. The weights are random, so the picture is noise; see the README for real FLUX.1 folders.
# Output goes to $PARDIT_OUT (default: out/quickstart/). Extra arguments go to `pardit generate`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${PARDIT_BUILD_DIR:-$root/build}"
out="${PARDIT_OUT:-$root/out/quickstart}"
export PARDIT_VENV="${PARDIT_VENV:-$("$root/launch/install.sh" | tail -n 1)}"
"$root/launch/build.sh" -DPARDIT_BUILD_TESTS=OFF
pardit="$build/pardit"
if [[ ! -f "$out/model/text_encoder_2/config.json" ]]; then
  "$pardit" synth --preset small --layout diffusers --seed 0 --out "$out/model"
fi
"$pardit" generate --model "$out/model" --prompt "a photo of a cat sitting on a mat in the sun" \
  --max-sequence-length 64 --height 256 --width 256 --steps 4 --seed 42 --output "$out/image.png" "$@"
echo "quickstart: image in $out/image.png (random weights: the picture is noise)"
