#!/usr/bin/env bash
# The whole FLUX.1-dev pipeline at its real shapes (transformer 23.8 GB, T5-XXL 9.5 GB, CLIP-L, VAE; bf16
# sparse zero files from `pardit synth`, so nothing is downloaded) on 4 ranks from a text prompt: every rank
# reads only its PipeFusion stage's transformer share (and the VAE decoder), exactly one rank reads the text
# encoders (T5 block by block under the budget), and every rank's peak RSS is compared with its plan plus
# the runtime's fixed overhead (the largest rank's peak RSS in the same job on the tiny pipeline) and the
# VAE decoder's weights.
#   bash bench/text_placement_proof.sh          (BUDGET=3GiB RANKS=4 OUT=out/placement)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pardit="${PARDIT:-$root/build/pardit}"
out="${OUT:-$root/out/placement}"
budget="${BUDGET:-3GiB}" ranks="${RANKS:-4}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
mkdir -p "$out"
[[ -e "$out/model/done" ]] || { "$pardit" synth --preset flux-dev --fill zeros --out "$out/model" -q && touch "$out/model/done"; }
[[ -e "$out/tiny/done" ]] || { "$pardit" synth --preset tiny --out "$out/tiny" -q && touch "$out/tiny/done"; }
flags=(--pipefusion-degree "$ranks" --num-pipeline-patch 1 --pp-partition memory --device-memory-budget "$budget"
       --offload auto --stream-from file --height 64 --width 64 --max-sequence-length 16)
echo "== plan"
"$pardit" plan --model "$out/model" "${flags[@]}" --world-size "$ranks" --dtype bf16 --text-len 16 \
  | grep -v '^model\|^stages' || true
echo "== runtime overhead: the same job on the tiny pipeline"
mpiexec -n "$ranks" --oversubscribe "$pardit" generate --model "$out/tiny" --prompt "a cat on the moon" \
  --pipefusion-degree "$ranks" --num-pipeline-patch 1 --height 64 --width 64 --max-sequence-length 16 --steps 1 \
  --threads 1 --log-level debug --output "$out/tiny.png" >"$out/tiny.log" 2>&1 || { tail -20 "$out/tiny.log"; exit 1; }
echo "== run: generate --prompt on $ranks ranks"
mpiexec -n "$ranks" --oversubscribe "$pardit" generate --model "$out/model" --prompt "a cat on the moon" \
  "${flags[@]}" --steps 1 --threads 1 --dtype bf16 --log-level debug --output "$out/cat.png" >"$out/run.log" 2>&1 ||
  { tail -20 "$out/run.log"; exit 1; }
grep -E "encoded|decoded|denoised" "$out/run.log" | sed 's/^/  /'
python3 - "$out/run.log" "$out/tiny.log" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
overhead = max(int(m) for m in re.findall(r"rank bytes: .* peak_rss=(\d+)", open(sys.argv[2]).read()))
rows, planned, weights = {}, {}, {}
for m in re.finditer(r"\[rank (\d+)/\d+\] debug: rank bytes: stage=(\d+) read=(\d+) vae_read=(\d+) text_read=(\d+) "
                     r"total=(\d+) tensors=(\d+) peak_rss=(\d+)", text):
    r, s, rd, vae, txt, tot, n, rss = map(int, m.groups())
    rows[r] = dict(stage=s, read=rd, vae=vae, text=txt, total=tot, rss=rss)
for m in re.finditer(r"\[rank (\d+)/\d+\] debug: plan: streamed_bytes=(\d+) resident_bytes=(\d+) total_bytes=(\d+)", text):
    planned[int(m.group(1))] = int(m.group(4))
    weights[int(m.group(1))] = int(m.group(2)) + int(m.group(3))
enc = {int(m.group(1)) for m in re.finditer(r"\[rank (\d+)/\d+\] encoded", text)}
GiB = 2**30
print(f"runtime overhead (largest rank's peak RSS on the tiny pipeline): {overhead / GiB:.3f} GiB")
print("rank stage  stage_weights_GiB  transformer_read_GiB  share  vae_read_GiB  encoders_read_GiB  peak_RSS_GiB  "
      "plan+overhead+VAE_GiB  within  encodes")
ok = True
for r in sorted(rows):
    v = rows[r]
    limit = planned.get(r, 0) + overhead + v["vae"]
    ok &= v["rss"] <= limit
    print(f"{r:4d} {v['stage']:5d}  {weights.get(r, 0) / GiB:17.3f}  {v['read'] / GiB:20.3f}  {v['read'] / v['total']:5.3f}  {v['vae'] / GiB:12.3f}"
          f"  {v['text'] / GiB:17.3f}  {v['rss'] / GiB:12.3f}  {limit / GiB:21.3f}  {'yes' if v['rss'] <= limit else 'NO':>6}"
          f"  {'yes' if r in enc else ''}")
print(f"ranks that ran the text encoders: {sorted(enc)}")
print("every rank within its plan" if ok else "SOME RANK EXCEEDS ITS PLAN")
sys.exit(0 if ok and len(enc) == 1 else 1)
PY
