#!/usr/bin/env bash
# The whole FLUX.1-dev pipeline at its real shapes (transformer 23.8 GB, T5-XXL 9.5 GB, CLIP-L, VAE; bf16
# sparse zero files from `pardit synth`, so nothing is downloaded) on 4 ranks from a text prompt: every rank
# reads only its PipeFusion stage's transformer share (and the VAE decoder), exactly one rank reads the text
# encoders (T5 block by block under the budget), and every rank's peak RSS is compared with its plan.
#   bash bench/text_placement_proof.sh          (BUDGET=3GiB RANKS=4 OUT=out/placement)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pardit="${PARDIT:-$root/build/pardit}"
out="${OUT:-$root/out/placement}"
budget="${BUDGET:-3GiB}" ranks="${RANKS:-4}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
mkdir -p "$out"
[[ -e "$out/model/done" ]] || { "$pardit" synth --preset flux-dev --fill zeros --out "$out/model" -q && touch "$out/model/done"; }
flags=(--pipefusion-degree "$ranks" --num-pipeline-patch 1 --pp-partition memory --device-memory-budget "$budget"
       --offload auto --stream-from file --height 64 --width 64 --max-sequence-length 16)
echo "== plan"
"$pardit" plan --model "$out/model" "${flags[@]}" --world-size "$ranks" --dtype bf16 --text-len 16 \
  | grep -v '^model\|^stages' || true
echo "== run: generate --prompt on $ranks ranks"
mpiexec -n "$ranks" --oversubscribe "$pardit" generate --model "$out/model" --prompt "a cat on the moon" \
  "${flags[@]}" --steps 1 --threads 1 --dtype bf16 --log-level debug --output "$out/cat.png" >"$out/run.log" 2>&1 ||
  { tail -20 "$out/run.log"; exit 1; }
grep -E "encoded|decoded|denoised" "$out/run.log" | sed 's/^/  /'
python3 - "$out/run.log" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
rows, planned = {}, {}
for m in re.finditer(r"\[rank (\d+)/\d+\] debug: rank bytes: stage=(\d+) read=(\d+) vae_read=(\d+) text_read=(\d+) "
                     r"total=(\d+) tensors=(\d+) peak_rss=(\d+)", text):
    r, s, rd, vae, txt, tot, n, rss = map(int, m.groups())
    rows[r] = dict(stage=s, read=rd, vae=vae, text=txt, total=tot, rss=rss)
for m in re.finditer(r"\[rank (\d+)/\d+\] debug: plan: streamed_bytes=(\d+) resident_bytes=(\d+) total_bytes=(\d+)", text):
    planned[int(m.group(1))] = int(m.group(4))
enc = {int(m.group(1)) for m in re.finditer(r"\[rank (\d+)/\d+\] encoded", text)}
GiB = 2**30
print("rank stage  transformer_read_GiB  share  vae_read_GiB  encoders_read_GiB  peak_RSS_GiB  planned_GiB  encodes")
for r in sorted(rows):
    v = rows[r]
    print(f"{r:4d} {v['stage']:5d}  {v['read'] / GiB:20.3f}  {v['read'] / v['total']:5.3f}  {v['vae'] / GiB:12.3f}"
          f"  {v['text'] / GiB:17.3f}  {v['rss'] / GiB:12.3f}  {planned.get(r, 0) / GiB:11.3f}  {'yes' if r in enc else ''}")
print(f"ranks that ran the text encoders: {sorted(enc)}")
PY
