#!/usr/bin/env bash
# launch/sweep.sh tells layouts that cannot take the image (skipped) from runs that fail (the sweep fails,
# listing them), and stops at once on a model no run can open.
# usage: sweep_test.sh PARDIT SOURCE_DIR
set -uo pipefail
export PARDIT="$1" OMP_NUM_THREADS=1
source="$2"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
"$PARDIT" synth --preset tiny --text-len 8 --out "$work/m" -q || fail "synth"
embeds="$work/m/prompt_embeds.safetensors"

# A good sweep: 48x32 has 3 token rows, which PipeFusion 2 cannot split: skipped, not failed.
out=$(bash "$source/launch/sweep.sh" --model "$work/m" --prompt-embeds "$embeds" --metrics "$work/ok.h5" \
        --ranks "1 2" --resolutions 48x32 --steps 1 2>&1); rc=$?
echo "$out"
[[ $rc -eq 0 ]] || fail "a good sweep exited $rc"
grep -q "n=2 --pipefusion-degree 2: skipped" <<<"$out" || fail "PipeFusion 2 on 3 token rows was not skipped"
grep -q "3 runs in .*1 skipped.*0 failed" <<<"$out" || fail "wrong summary"

# A model that does not exist: an error naming it, exit 1, no runs.
out=$(bash "$source/launch/sweep.sh" --model "$work/nowhere" --prompt-embeds "$embeds" --metrics "$work/x.h5" \
        --ranks "1 2" --resolutions 48x32 --steps 1 2>&1); rc=$?
echo "$out"
[[ $rc -eq 1 ]] || fail "a missing model exited $rc"
grep -q "nowhere: no such file" <<<"$out" || fail "the error does not name the model"
[[ ! -e "$work/x.h5" ]] || fail "a metrics file was written"

# Runs that fail (missing prompt embeddings): listed, exit 1.
out=$(bash "$source/launch/sweep.sh" --model "$work/m" --prompt-embeds "$work/none.safetensors" \
        --metrics "$work/y.h5" --ranks "1" --resolutions 48x32 --steps 1 2>&1); rc=$?
echo "$out"
[[ $rc -eq 1 ]] || fail "failing runs exited $rc"
grep -q "failed: 48x32 n=1 single rank: .*none.safetensors" <<<"$out" || fail "the failure is not listed"
echo "sweep test passed"
