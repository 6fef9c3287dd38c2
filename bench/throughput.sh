#!/usr/bin/env bash
# Images per hour of one queue under several layouts, side by side in one run on this machine (the layouts
# alternate within each repeat, so a noisy neighbour hits them alike). Each run starts a fresh job on an
# empty output directory: loading, encoding, denoising, decoding and writing are all counted.
#   bench/throughput.sh [--preset small] [--size 256] [--steps 4] [--prompts 8] [--repeats 3]
#                       [--layout "NAME:RANKS:FLAGS"]...      (default: 1 rank with all cores; dp2)
# Prints one line per layout (median and spread of images/hour) and writes $RESULTS_DIR/throughput-*.json (default out/).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pardit="${PARDIT:-$root/build/pardit}"
preset=small size=256 steps=4 prompts=8 repeats=3
layouts=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --preset) preset="$2"; shift 2 ;;
    --size) size="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --prompts) prompts="$2"; shift 2 ;;
    --repeats) repeats="$2"; shift 2 ;;
    --layout) layouts+=("$2"); shift 2 ;;
    *) echo "throughput.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
cores="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
if [[ ${#layouts[@]} -eq 0 ]]; then
  layouts=("1 rank x $cores threads:1:--threads $cores"
           "dp2 (2 ranks x $((cores / 2 > 0 ? cores / 2 : 1)) threads):2:--data-parallel-degree 2 --threads $((cores / 2 > 0 ? cores / 2 : 1))")
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$pardit" synth --preset "$preset" --out "$work/model" -q
for i in $(seq 0 $((prompts - 1))); do echo "a test image number $i"; done >"$work/queue.txt"
if [[ $(id -u) -eq 0 ]]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
cpu="$(lscpu | sed -n 's/^Model name: *//p' | head -n 1)"
declare -A rates
for r in $(seq 1 "$repeats"); do
  for l in "${layouts[@]}"; do
    IFS=: read -r name ranks flags <<<"$l"
    out="$work/out-$r-$ranks"
    rm -rf "$out"
    # shellcheck disable=SC2086
    log="$(OMP_NUM_THREADS=1 mpiexec -n "$ranks" --oversubscribe "$pardit" generate --model "$work/model" \
           --prompt-file "$work/queue.txt" --output-dir "$out" --height "$size" --width "$size" --steps "$steps" \
           --max-sequence-length 64 $flags 2>&1)" || { echo "$log" >&2; exit 1; }
    rate="$(sed -n 's/.*images made.* (\([0-9.e+]*\) images\/hour).*/\1/p' <<<"$log" | tail -n 1)"
    echo "repeat $r: $name: $rate images/hour"
    rates["$name"]+="$rate "
  done
done
results="${RESULTS_DIR:-$root/out}"
mkdir -p "$results"
json="$results/throughput-$(date +%Y%m%d-%H%M%S).json"
python3 - "$json" "$cpu" "$preset" "$size" "$steps" "$prompts" "${layouts[@]}" <<PY
import json, statistics, sys
out, cpu, preset, size, steps, prompts = sys.argv[1:7]
rates = {$(for l in "${layouts[@]}"; do IFS=: read -r name _ _ <<<"$l"; printf '"%s": [%s], ' "$name" "$(sed 's/ $//; s/ /, /g' <<<"${rates[$name]}")"; done)}
rows = []
for name, v in rates.items():
    rows.append({"layout": name, "images_per_hour": v, "median": statistics.median(v), "min": min(v), "max": max(v)})
base = rows[0]["median"]
print(f"{prompts} images {size}x{size}, {steps} steps, preset {preset}, on {cpu}:")
for row in rows:
    row["vs_first"] = row["median"] / base
    print(f"  {row['layout']:<32} {row['median']:10.0f} images/hour (min {row['min']:.0f}, max {row['max']:.0f}), x{row['vs_first']:.2f}")
json.dump({"cpu": cpu, "preset": preset, "size": int(size), "steps": int(steps), "prompts": int(prompts), "rows": rows},
          open(out, "w"), indent=2)
print("wrote", out)
PY
