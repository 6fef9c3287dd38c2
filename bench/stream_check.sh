#!/usr/bin/env bash
# The weight streamer's sources side by side on one machine (CPU or GPU): the same model run resident,
# streamed from a host copy and streamed from the checkpoint file, with the file in the page cache and
# evicted from it (cold: read from the disk), against what `dd` reads from the same file in the same state.
# Reports seconds per step (steps after the first), the file source's own read rate (parallel pread() of
# the stored bytes, from the rank's debug line), peak host RSS, and the ratios. Everything it prints also
# goes to $OUT/summary.txt.
#   bash bench/stream_check.sh
# Knobs: PARDIT=build/pardit DEVICE=cpu PRESET=small DTYPE=bf16 HEIGHT=64 WIDTH=64 STEPS=4 THREADS=1
# REPEAT=3 OUT=out/stream_check. The page cache is emptied for one file with posix_fadvise(DONTNEED)
# (no root needed; a disk cache below the machine may still answer).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pardit="${PARDIT:-$root/build/pardit}"
out="${OUT:-$root/out/stream_check}"
device="${DEVICE:-cpu}" preset="${PRESET:-small}" dtype="${DTYPE:-bf16}"
height="${HEIGHT:-64}" width="${WIDTH:-64}" steps="${STEPS:-4}" threads="${THREADS:-1}" repeat="${REPEAT:-3}"
mkdir -p "$out"
exec > >(tee "$out/summary.txt") 2>&1
[[ -x "$pardit" ]] || { echo "stream_check: no pardit binary at $pardit (set PARDIT)"; exit 1; }

model="$out/model-$preset-$dtype"
[[ -e "$model/done" ]] || { rm -rf "$model"; "$pardit" synth --preset "$preset" --dtype "$dtype" --layout bfl \
  --out "$model" --quiet && touch "$model/done"; }
file=$(ls "$model"/flux1-*.safetensors | head -1)
bytes=$(stat -c %s "$file")

evict() { python3 -c 'import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)' "$1"; }
ddrate() {  # GB/s of one dd pass over the file
  local t0 t1
  t0=$(date +%s.%N); dd if="$file" of=/dev/null bs=16M status=none; t1=$(date +%s.%N)
  awk -v b="$bytes" -v a="$t0" -v z="$t1" 'BEGIN { printf "%.2f", b / (z - a) / 1e9 }'
}
median() { tr ' ' '\n' | { grep -E '^[0-9.]+$' || true; } | sort -g | awk '{v[NR] = $1} END { if (NR) print v[int((NR + 1) / 2)]; else print "nan" }'; }

run() {  # name cold(0|1) steps flags... -> "s_per_step read_gbps peak_rss_bytes streamed_bytes_per_step"
  local name=$1 cold=$2 n=$3; shift 3
  local log="$out/$name.log"
  [[ "$cold" == 1 ]] && evict "$file"
  "$pardit" generate --model "$file" --prompt-embeds "$model/prompt_embeds.safetensors" --device "$device" \
    --dtype "$dtype" --height "$height" --width "$width" --steps "$n" --threads "$threads" --seed 0 \
    --output "$out/$name.png" --log-level debug "$@" >"$log" 2>&1 || { echo "$name failed:" >&2; tail -3 "$log" >&2; echo "nan nan nan 0"; return; }
  local step read rss streamed
  step=$(sed -n 's/.*debug: step [0-9]* seconds=\([0-9.e+-]*\).*/\1/p' "$log" | tail -n +2 |
         awk '{s += $1; n++} END { if (n) printf "%.4f", s / n; else print "nan" }')
  read=$(sed -n 's/.*stored_read=\([0-9]*\) stored_read_seconds=\([0-9.e+-]*\).*/\1 \2/p' "$log" | head -1 |
         awk '{ if ($2 > 0) printf "%.2f", $1 / $2 / 1e9; else print "-" }')
  rss=$(sed -n 's/.*peak_rss=\([0-9]*\).*/\1/p' "$log" | head -1)
  streamed=$(sed -n 's/.*debug: plan: streamed_bytes=\([0-9]*\).*/\1/p' "$log" | head -1)
  echo "$step ${read:--} ${rss:-0} ${streamed:-0}"
}

echo "== $preset preset, $dtype, $(awk -v b="$bytes" 'BEGIN { printf "%.0f MB", b / 1e6 }') file, ${height}x${width}, $steps steps, device $device, $threads thread(s), $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) cores; median of $repeat"
declare -A S R M
for name in resident host file file-cold; do S[$name]=""; R[$name]=""; M[$name]=""; done
dd_warm="" dd_cold=""
for ((i = 0; i < repeat; i++)); do
  evict "$file"; dd_cold+=" $(ddrate)"; dd_warm+=" $(ddrate)"
  for name in resident host file file-cold; do
    case $name in
      resident) r=$(run "$name" 0 "$steps" --offload none) ;;
      host) r=$(run "$name" 0 "$steps" --offload sequential --stream-from host --host-memory-budget 1000GiB) ;;
      file) dd if="$file" of=/dev/null bs=16M status=none; r=$(run "$name" 0 "$steps" --offload sequential --stream-from file) ;;
      file-cold) r=$(run "$name" 1 1 --offload sequential --stream-from file) ;;
    esac
    read -r s g m b <<<"$r"
    [[ $name == file ]] && per_step=$b
    S[$name]+=" $s"; R[$name]+=" $g"; M[$name]+=" $m"
  done
done
base=$(echo "${S[resident]}" | median)
# The overlap bound: a step streamed from the file can take no less than the compute (the resident step)
# or the transfer (the bytes streamed per step at the file source's read rate), whichever is longer.
bound=$(awk -v c="$base" -v b="${per_step:-0}" -v g="$(echo "${R[file]}" | median)" \
  'BEGIN { t = (g + 0 > 0) ? b / (g * 1e9) : 0; printf "%.4f %.4f", (c > t ? c : t), t }')
read -r bound transfer <<<"$bound"
printf '\n| run | s per step | vs resident | vs max(compute, transfer) | file read GB/s | dd GB/s (same cache state) | read / dd | peak host RSS MiB |\n|---|---|---|---|---|---|---|---|\n'
for name in resident host file file-cold; do
  s=$(echo "${S[$name]}" | median); g=$(echo "${R[$name]}" | median); [[ $g == nan ]] && g="-"
  m=$(echo "${M[$name]}" | median)
  d="-"; [[ $name == file ]] && d=$(echo "$dd_warm" | median); [[ $name == file-cold ]] && d=$(echo "$dd_cold" | median)
  ratio=$(awk -v s="$s" -v b="$base" 'BEGIN { if (s + 0 > 0 && b + 0 > 0) printf "%.3fx", s / b; else print "-" }')
  vsdd=$(awk -v g="$g" -v d="$d" 'BEGIN { if (g + 0 > 0 && d + 0 > 0) printf "%.2f", g / d; else print "-" }')
  overlap="-"; [[ $name == file ]] && overlap=$(awk -v s="$s" -v b="$bound" 'BEGIN { if (b > 0) printf "%.3fx", s / b; else print "-" }')
  [[ $name == file-cold ]] && { s="(1 step)"; ratio="-"; }
  printf '| %s | %s | %s | %s | %s | %s | %s | %.0f |\n' "$name" "$s" "$ratio" "$overlap" "$g" "$d" "$vsdd" \
    "$(awk -v m="$m" 'BEGIN { print m / 1048576 }')"
done
echo
echo "streamed per step $(awk -v b="${per_step:-0}" 'BEGIN { printf "%.0f MB", b / 1e6 }'): transfer at the file read rate ${transfer} s, compute (resident step) ${base} s"
echo "spread (all runs): resident${S[resident]}; host${S[host]}; file${S[file]}; file read GB/s warm${R[file]} cold${R[file-cold]}; dd warm$dd_warm cold$dd_cold"
