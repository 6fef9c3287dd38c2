#!/usr/bin/env bash
# Per-rank activation memory of the patch-parallel VAE decode on 1, 2 and 4 ranks (one thread each):
# FLUX.1's VAE at 1024^2, and the small preset's VAE (the same structure at 1/4 of the width) at 2048^2 and
# 4096^2 (FLUX.1's VAE at 2048^2 needs about 20 GB of activations on one rank in fp32: DTYPE=bf16 halves it).
# Random weights in memory; prints one table row per run (the largest rank's peak RSS growth during the
# decode, the planner's estimate, the decode time). TILING=on (TILE=PX) measures the tiled decode instead.
#   bash bench/vae_decode_memory.sh   (RUNS="flux:1024 small:2048 small:4096" RANKS="1 2 4" DTYPE=fp32 TILING=off)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pardit="${PARDIT:-$root/build/pardit}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
printf '%-6s %6s %5s %14s %14s %10s %9s  %s\n' vae size ranks measured_MiB planned_MiB ratio_to_1 decode_s mode
for run in ${RUNS:-flux:1024 small:2048 small:4096}; do
  preset=${run%%:*} size=${run##*:} base=""
  [[ $preset == flux ]] && preset=flux-dev
  for n in ${RANKS:-1 2 4}; do
    line=$(mpiexec -n "$n" --oversubscribe "$pardit" bench --decode --preset "$preset" --height "$size" --width "$size" \
             --iters 1 --warmup 0 --threads 1 --ulysses-degree "$n" --dtype "${DTYPE:-fp32}" \
             --vae-tiling "${TILING:-off}" --vae-tile-size "${TILE:-0}" 2>&1 | grep '^BENCH pardit-decode') || {
      echo "$run n=$n failed"; continue; }
    measured=$(sed -n 's/.*activation_bytes_max=\([0-9]*\).*/\1/p' <<<"$line")
    planned=$(sed -n 's/.*activation_bytes_planned=\([0-9]*\).*/\1/p' <<<"$line")
    secs=$(sed -n 's/.*median_s=\([0-9.]*\).*/\1/p' <<<"$line")
    mode=$(sed -n 's/.* mode=\([a-z0-9:]*\).*/\1/p' <<<"$line")
    [[ -z $base ]] && base=$measured
    awk -v p="${run%%:*}" -v s="$size" -v n="$n" -v m="$measured" -v pl="$planned" -v b="$base" -v t="$secs" -v md="$mode" \
      'BEGIN { printf "%-6s %6s %5d %14.0f %14.0f %10.2f %9.1f  %s\n", p, s, n, m / 2^20, pl / 2^20, m / b, t, md }'
  done
done
