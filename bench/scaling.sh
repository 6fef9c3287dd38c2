#!/usr/bin/env bash
# 1 rank vs 2 ranks on the `small` preset, one intra-op thread per rank, for each 2-rank layout
# (Ulysses 2, Ring 2, CFG 2 over a batch of 2), plus the collective micro-benchmark. Prints the
# speedups and each layout's communication share of the step time; JSON per run goes to $OUT.
#   bash bench/scaling.sh [extra pardit bench flags]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pardit="${PARDIT:-$root/build/pardit}"
out="${OUT:-$root/out/scaling}"
mkdir -p "$out"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
mpirun=(mpiexec --oversubscribe --bind-to none)
common=(bench --preset small --threads 1 --height 256 --width 256 --text-len 128 --warmup 1 --iters "${ITERS:-5}" --quiet "$@")

run() {  # name ranks batch flags...
  local name=$1 n=$2 batch=$3; shift 3
  "${mpirun[@]}" -n "$n" "$pardit" "${common[@]}" --batch "$batch" --output "$out/$name.json" "$@" >/dev/null
}
field() { sed -n "s/.*\"$2\": \([0-9.e+-]*\).*/\1/p" "$out/$1.json" | head -n 1; }

run single_b1 1 1
run single_b2 1 2
run ulysses2 2 1 --ulysses-degree 2
run ring2 2 1 --ring-degree 2
run cfg2 2 2 --cfg-degree 2
printf '%-10s %10s %10s %8s %12s\n' layout ranks median_s speedup comm_share
printf '%-10s %10s %10s %8s %12s\n' single 1 "$(field single_b1 median_s)" 1.00 0
for l in ulysses2:single_b1 ring2:single_b1 cfg2:single_b2; do
  name=${l%%:*} base=${l##*:}
  t=$(field "$name" median_s) t1=$(field "$base" median_s) share=$(field "$name" comm_share)
  printf '%-10s %10s %10.4f %8.2f %12.3f\n' "$name" 2 "$t" "$(awk -v a="$t1" -v b="$t" 'BEGIN{print a/b}')" "$share"
done
"${mpirun[@]}" -n 2 "$pardit" bench --comm --comm-max-bytes $((16 << 20)) --output "$out/comm.json"
