#!/usr/bin/env bash
# tools/metrics_table.py and tools/plot_metrics.py on a metrics file pardit wrote (one-rank and two-rank
# runs): the CSV has one row per run with the recorded size and layout, and every plot is written.
# Skipped (77) without h5py and matplotlib (launch/install.sh --plots installs them).
# usage: tools_test.sh PARDIT SOURCE_DIR PYTHON
set -uo pipefail
pardit="$1" source="$2" python="$3"
"$python" -c "import h5py, matplotlib" 2>/dev/null || { echo "h5py/matplotlib not installed: skipped"; exit 77; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
export OMP_NUM_THREADS=1
"$pardit" synth --preset tiny --text-len 8 --out "$work/m" -q || fail "synth"
run=(generate --model "$work/m" --prompt-embeds "$work/m/prompt_embeds.safetensors" --height 64 --width 96 --steps 2
     --threads 1 --metrics "$work/runs.h5" -q)
"$pardit" "${run[@]}" || fail "one-rank run"
mpiexec -n 2 "$pardit" "${run[@]}" --ulysses-degree 2 || fail "two-rank run"
"$python" "$source/tools/metrics_table.py" "$work/runs.h5" --out "$work/runs.csv" || fail "metrics_table.py"
cat "$work/runs.csv"
[[ $(wc -l <"$work/runs.csv") -eq 3 ]] || fail "expected a header and 2 rows"
head -1 "$work/runs.csv" | grep -q "^id,date,command,model,dtype,device,height,width" || fail "CSV header"
grep -q ",generate,.*,fp32,cpu,64,96,1,2,2,1,1,1,2," "$work/runs.csv" || fail "the two-rank row"
"$python" "$source/tools/plot_metrics.py" "$work/runs.h5" --out "$work/plots" || fail "plot_metrics.py"
for f in scaling.png timeline.png comm.png memory.png summary.md; do
  [[ -s "$work/plots/$f" ]] || fail "$f not written"
done
grep -q "| 2 | U2 |" "$work/plots/summary.md" || fail "summary.md lacks the U2 run"
# A queue on two replica groups: one row per image (its index and group) and one for the job (images/hour).
printf 'a cat\na dog\na fox\n' >"$work/q.txt"
mpiexec -n 2 "$pardit" generate --model "$work/m" --prompt-file "$work/q.txt" --output-dir "$work/q" --height 64 \
  --width 64 --steps 2 --threads 1 --data-parallel-degree 2 --metrics "$work/queue.h5" -q || fail "queue run"
"$python" "$source/tools/metrics_table.py" "$work/queue.h5" --out "$work/queue.csv" || fail "metrics_table.py (queue)"
cat "$work/queue.csv"
head -1 "$work/queue.csv" | grep -q ",queue_index,replica_group,queue_wait_s,images_per_hour,device_seconds_per_image" \
  || fail "queue columns"
[[ $(grep -c ",generate," "$work/queue.csv") -eq 3 ]] || fail "expected 3 image rows"
[[ $(cut -d, -f3 "$work/queue.csv" | grep -c "^queue$") -eq 1 ]] || fail "expected one queue row"
grep ",generate," "$work/queue.csv" | awk -F, '{print $(NF-3)}' | sort -u | tr '\n' ' ' | grep -q "^0 1 $" \
  || fail "both replica groups have image rows"
out=$("$python" "$source/tools/metrics_table.py" "$source/README.md" 2>&1) && fail "a file that is not HDF5 was accepted"
grep -q "README.md: not a readable HDF5 file" <<<"$out" || fail "the error does not name the file: $out"
echo "tools test passed"
