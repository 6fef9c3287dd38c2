#!/usr/bin/env bash
# A scaling sweep: every parallel layout of each world size, at each resolution, one `pardit generate`
# each, all appended to one HDF5 metrics file (plot it with tools/plot_metrics.py).
# Usage: launch/sweep.sh --model M --prompt-embeds E --metrics sweep.h5 [--ranks "1 2 4"]
#          [--resolutions "256x256 512x512"] [--steps 4] [--negative-prompt-embeds N]
#          [--layouts "--ulysses-degree 2;--pipefusion-degree 2 --ulysses-degree 2"] [-- extra generate flags]
# Layouts per world size n: Ulysses n, Ring n, Ulysses x Ring, PipeFusion n, PipeFusion x Ulysses, and
# CFG 2 x the rest when negative embeddings are given; --layouts replaces that list with explicit flag sets
# (separated by ';', each run on the world size its degrees multiply to, if that size is in --ranks); a 1 in
# --ranks always adds the single-rank baseline.
# Layouts the model or image cannot take (as `pardit plan` finds) are reported and skipped; a run that
# fails for any other reason fails the sweep (listed at the end, exit status 1), and so does a model or
# image size that no run can take.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"  # launch/ in a checkout, bin/ in an installed prefix
model="" embeds="" negative="" metrics="" ranks="1 2 4" resolutions="256x256" steps=4 extra=() explicit=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --prompt-embeds) embeds="$2"; shift 2 ;;
    --negative-prompt-embeds) negative="$2"; shift 2 ;;
    --metrics) metrics="$2"; shift 2 ;;
    --ranks) ranks="$2"; shift 2 ;;
    --resolutions) resolutions="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --layouts) explicit="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "sweep.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
[[ -n "$model" && -n "$embeds" && -n "$metrics" ]] || { echo "sweep.sh: --model, --prompt-embeds and --metrics are required" >&2; exit 2; }

# World size of a flag set: the product of its degrees.
worldOf() {
  local flags=$1 size=1 d
  for d in ulysses-degree ring-degree pipefusion-degree cfg-degree; do
    if [[ " $flags " =~ --$d\ ([0-9]+) ]]; then size=$((size * BASH_REMATCH[1])); fi
  done
  echo "$size"
}

layouts() {  # n -> lines of flags
  local n=$1 u r
  if (( n == 1 )); then echo ""; return; fi  # the single-rank baseline
  if [[ -n "$explicit" ]]; then
    local IFS=';' f
    for f in $explicit; do
      f="$(echo "$f" | sed 's/^ *//; s/ *$//')"
      [[ "$(worldOf "$f")" -eq "$n" ]] && echo "$f"
    done
    return 0
  fi
  echo "--ulysses-degree $n"
  echo "--ring-degree $n"
  for ((u = 2; u < n; u++)); do (( n % u == 0 )) && echo "--ulysses-degree $u --ring-degree $((n / u))"; done
  echo "--pipefusion-degree $n"
  (( n >= 4 && n % 2 == 0 )) && echo "--pipefusion-degree $((n / 2)) --ulysses-degree 2"
  if [[ -n "$negative" ]]; then
    (( n == 2 )) && echo "--cfg-degree 2"
    (( n >= 4 && n % 2 == 0 )) && echo "--cfg-degree 2 --ulysses-degree $((n / 2))"
  fi
  return 0
}

cfgflags=() planflags=()
[[ -n "$negative" ]] && cfgflags=(--negative-prompt-embeds "$negative" --true-cfg-scale 2) && planflags=(--true-cfg-scale 2)
if [[ -x "$here/pardit" ]]; then pardit="${PARDIT:-$here/pardit}"; else pardit="${PARDIT:-$here/../build/pardit}"; fi
export PARDIT="$pardit"  # the runs (launch/pardit-run) use the same binary as the plans
firstError() { grep -m1 'error:' "$1" | sed 's/.*error: //'; }
ok=0 skipped=0 failures=()
for res in $resolutions; do
  h=${res%x*} w=${res#*x}
  # The model and the image size on one rank: if these fail, no run of the sweep can succeed.
  if ! "$pardit" plan --model "$model" --height "$h" --width "$w" "${planflags[@]}" >"$metrics.last.log" 2>&1; then
    echo "sweep.sh: ${res}: $(firstError "$metrics.last.log")" >&2
    rm -f "$metrics.last.log"
    exit 1
  fi
  for n in $ranks; do
    while IFS= read -r flags; do
      # shellcheck disable=SC2086
      if ! "$pardit" plan --model "$model" --height "$h" --width "$w" "${planflags[@]}" $flags >"$metrics.last.log" 2>&1; then
        skipped=$((skipped + 1)); echo "sweep: ${res} n=${n} ${flags}: skipped ($(firstError "$metrics.last.log"))"
        continue
      fi
      # shellcheck disable=SC2086
      if "$here/pardit-run" -n "$n" generate --model "$model" --prompt-embeds "$embeds" "${cfgflags[@]}" \
           --height "$h" --width "$w" --steps "$steps" --seed 0 --quiet --metrics "$metrics" $flags "${extra[@]}" \
           >"$metrics.last.log" 2>&1 </dev/null; then
        ok=$((ok + 1)); echo "sweep: ${res} n=${n} ${flags:-single rank}: ok"
      else
        failures+=("${res} n=${n} ${flags:-single rank}: $(firstError "$metrics.last.log")")
        echo "sweep: ${res} n=${n} ${flags:-single rank}: FAILED (${failures[-1]#*: })"
      fi
    done < <(layouts "$n")
  done
done
rm -f "$metrics.last.log"
echo "sweep done: $ok runs in $metrics, $skipped skipped (layouts the model or image cannot take), ${#failures[@]} failed"
if (( ${#failures[@]} > 0 )); then
  printf 'failed: %s\n' "${failures[@]}" >&2
  exit 1
fi
