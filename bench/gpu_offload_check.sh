#!/usr/bin/env bash
# GPU check of the memory planner and the weight streamer (run on a machine with one CUDA GPU and pardit's
# build dependencies: it builds there). A GPU host with only a driver and PyTorch runs the same offload rows
# from bench/gpu_check.sh's bundle.
# Builds pardit against the machine's own PyTorch (CUDA LibTorch), writes FLUX.1-dev-shaped weights
# (bf16, 23.8 GB, zero-filled sparse files: timing does not depend on values), and runs a few 1024x1024
# steps each of: fully resident, --device-memory-budget 24GiB, 12GiB, and --offload sequential; then with
# FP8 block weights (--weight-dtype fp8): resident, 24GiB and 12GiB.
# Reports seconds per step, peak device memory (caching allocator), the measured pinned host-to-device
# bandwidth, and the ratios to the resident run and to the transfer bound (streamed bytes per step /
# bandwidth). Everything it prints also goes to $OUT/summary.txt.
#   bash bench/gpu_offload_check.sh
# Knobs (for a CPU dry run of the script itself): DEVICE=cpu PRESET=small HEIGHT=256 WIDTH=256
# BUDGETS="400MB 250MB" STEPS=2 PYTHON=python3 BUILD=build-gpu OUT=out/gpu_offload
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
build="${BUILD:-$root/build-gpu}"
out="${OUT:-$root/out/gpu_offload}"
device="${DEVICE:-cuda}"
preset="${PRESET:-flux-dev}"
height="${HEIGHT:-1024}" width="${WIDTH:-1024}" steps="${STEPS:-4}"
budgets=(${BUDGETS:-24GiB 12GiB})
mkdir -p "$out"
exec > >(tee "$out/summary.txt") 2>&1

if [[ ! -x "$build/pardit" ]]; then
  cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DPARDIT_PYTHON="$py" -DPARDIT_BUILD_TESTS=OFF >"$out/configure.log" 2>&1 ||
    { cat "$out/configure.log"; exit 1; }
  cmake --build "$build" -j "$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)" >"$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
fi
pardit="$build/pardit"
model="$out/model-$preset"
[[ -e "$model/done" ]] || { "$pardit" synth --preset "$preset" --fill zeros --dtype bf16 --out "$model" --quiet && touch "$model/done"; }

echo "== host-to-device bandwidth (pinned, 1 GiB)"
bw=$("$py" - "$device" <<'PY'
import sys, time, torch
if sys.argv[1] != "cuda" or not torch.cuda.is_available():
    print(0.0); sys.exit(0)
x = torch.empty(1 << 30, dtype=torch.uint8).pin_memory(); y = torch.empty_like(x, device="cuda")
for _ in range(2): y.copy_(x, non_blocking=True)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(5): y.copy_(x, non_blocking=True)
torch.cuda.synchronize(); print(5 * (1 << 30) / (time.perf_counter() - t) / 1e9)
PY
)
echo "H2D ${bw} GB/s"

run() {  # name flags...
  local name=$1; shift
  "$pardit" generate --model "$model" --prompt-embeds "$model/prompt_embeds.safetensors" --device "$device" \
    --dtype bf16 --height "$height" --width "$width" --steps "$steps" --seed 0 --log-level debug "$@" \
    >"$out/$name.log" 2>&1 ||
    { echo "$name failed:"; tail -5 "$out/$name.log"; return 0; }
  local step streamed peak
  # Mean of the steps after the first (which includes the first prefetches and kernel selection).
  # The exact numbers come from the debug lines (the info lines use human units).
  step=$(sed -n 's/.*debug: step [0-9]* seconds=\([0-9.e+-]*\).*/\1/p' "$out/$name.log" | tail -n +2 | awk '{s+=$1; n++} END {if (n) printf "%.4f", s/n; else print "nan"}')
  streamed=$(sed -n 's/.*debug: plan: streamed_bytes=\([0-9]*\).*/\1/p' "$out/$name.log" | head -1 | awk '{printf "%.3f", $1/2^30}')
  peak=$(sed -n 's/.*debug: rank bytes: .* peak_device=\([0-9]*\).*/\1/p' "$out/$name.log" | head -1)
  printf '%-12s step %8s s  peak device memory %8.3f GiB  streamed per step %8s GiB\n' "$name" "$step" \
    "$(awk -v p="${peak:-0}" 'BEGIN{print p/2^30}')" "${streamed:-0}"
  echo "$name $step ${streamed:-0} ${peak:-0}" >>"$out/rows.txt"
}
rm -f "$out/rows.txt"
run resident --offload none --device-memory-budget 1000GiB
for b in "${budgets[@]}"; do run "budget-$b" --offload auto --device-memory-budget "$b" --stream-from host; done
run sequential --offload sequential --device-memory-budget 1000GiB --stream-from host
# FP8 block weights (quantized while loading; FP8 tensor cores on sm_89+): resident, and under the budgets.
run fp8-resident --weight-dtype fp8 --offload none --device-memory-budget 1000GiB
for b in "${budgets[@]}"; do run "fp8-$b" --weight-dtype fp8 --offload auto --device-memory-budget "$b" --stream-from host; done
echo "== ratios"
awk -v bw="$bw" 'NR == 1 {base = $2} {bound = (bw > 0 && $3 > 0) ? $3 * 1.073741824 / bw : 0;
  printf "%-12s %6.3fx resident", $1, $2 / base;
  if (bound > 0) printf "   transfer bound %.3f s -> %.3fx of it", bound, $2 / bound;
  printf "\n"}' "$out/rows.txt"
