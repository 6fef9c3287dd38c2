#!/usr/bin/env bash
# Memory proof for per-stage sharded loading: a synthetic transformer of 2.6 GB in the real file layout
# (the `medium` preset: FLUX.1-dev's 19 double + 38 single blocks and interface dims at 1/3 width, bf16),
# run on 4 ranks with --pipefusion-degree 4 and the memory-balanced stage split. Reports every rank's bytes read and peak RSS against the checkpoint size,
# and the runtime's fixed overhead (the same run on the tiny model, whose weights are negligible).
#   bash bench/memory_proof.sh            (writes under $OUT, default out/memory_proof)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pardit="${PARDIT:-$root/build/pardit}"
out="${OUT:-$root/out/memory_proof}"
layout="${LAYOUT:-diffusers}"
mkdir -p "$out"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
mpirun=(mpiexec --oversubscribe --bind-to none -n 4)

if [[ ! -e "$out/model-$layout/done" ]]; then
  rm -rf "$out/model-$layout"
  "$pardit" synth --preset medium --dtype bf16 --layout "$layout" --text-len 8 \
    --out "$out/model-$layout" --quiet
  touch "$out/model-$layout/done"
fi
if [[ ! -e "$out/tiny/done" ]]; then
  "$pardit" synth --preset tiny --text-len 8 --out "$out/tiny" --quiet && touch "$out/tiny/done"
fi
model="$out/model-$layout"
[[ "$layout" == bfl ]] && model="$out/model-$layout/flux1-medium.safetensors"
run() {  # model embeds dtype -> each rank's exact byte counts
  "${mpirun[@]}" "$pardit" generate --model "$1" --prompt-embeds "$2" --dtype "$3" --threads 1 --log-level debug \
    --height 64 --width 64 --steps 1 --pipefusion-degree 4 --num-pipeline-patch 1 --pp-partition memory \
    --save-latents "$out/latents.safetensors" 2>&1 | grep -E "rank bytes|pipeline stages|error"
}
echo "== runtime overhead (tiny model, 4 stages)"
run "$out/tiny" "$out/tiny/prompt_embeds.safetensors" bf16 | tee "$out/overhead.txt"
echo "== $layout checkpoint: $(du -sb "$out/model-$layout" | cut -f1) bytes on disk"
run "$model" "$out/model-$layout/prompt_embeds.safetensors" bf16 | tee "$out/proof.txt"
python3 - "$out/overhead.txt" "$out/proof.txt" <<'PY'
import re, sys
def parse(path):
    rows = {}
    for line in open(path):
        m = re.search(r"\[rank (\d+)/\d+\] debug: rank bytes: stage=(\d+) read=(\d+) vae_read=\d+ text_read=\d+ "
                      r"total=(\d+) tensors=(\d+) peak_rss=(\d+)", line)
        if m:
            r, s, rd, tot, n, rss = map(int, m.groups())
            rows[r] = dict(stage=s, read=rd, total=tot, tensors=n, rss=rss)
    return rows
over, proof = parse(sys.argv[1]), parse(sys.argv[2])
overhead = max(v["rss"] for v in over.values())
GiB = 2**30
print(f"fixed runtime overhead (largest tiny-model rank RSS): {overhead / GiB:.3f} GiB")
print("rank stage  bytes_read_GiB  share_of_checkpoint  peak_RSS_GiB  budget_GiB (1/4 + 10% + overhead)  ok")
ok_all = True
for r in sorted(proof):
    v = proof[r]
    budget = v["total"] / 4 * 1.10 + overhead
    ok = v["rss"] <= budget
    ok_all &= ok
    print(f"{r:4d} {v['stage']:5d}  {v['read'] / GiB:14.3f}  {v['read'] / v['total']:19.3f}  {v['rss'] / GiB:12.3f}  {budget / GiB:33.3f}  {'yes' if ok else 'NO'}")
print("all ranks within budget" if ok_all else "SOME RANK EXCEEDS THE BUDGET")
PY
