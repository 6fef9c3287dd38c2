#!/usr/bin/env python3
"""pardit vs transformers: prompt encoding time (tokenizers, CLIP, T5) on the same pipeline folder,
prompt, dtype and thread count.

Writes the pipeline once with `pardit synth` (diffusers layout, text encoders included), then
alternates rounds of `pardit bench --encode` and FluxPipeline.encode_prompt timing in this process,
and prints the ratio of the medians (pardit / transformers; < 1 means pardit is faster).

    launch/install.sh --reference
    $PARDIT_VENV/bin/python bench/compare_encode.py --threads 1
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from diffusers import FluxPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = ("a photograph of an astronaut riding a horse across the surface of the moon, earth in the sky, "
          "35 mm film, high detail")


def transformers_times(pipe, args):
    prompts = [PROMPT] * args.batch
    samples = []
    with torch.inference_mode():
        for i in range(args.warmup + args.iters):
            t = time.perf_counter()
            pipe.encode_prompt(prompt=prompts, prompt_2=prompts, device="cpu", max_sequence_length=args.max_len)
            if i >= args.warmup:
                samples.append(time.perf_counter() - t)
    return samples


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pardit", default=os.path.join(ROOT, "build", "pardit"))
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output", help="write all samples as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        mdir = os.path.join(tmp, "model")
        subprocess.run([args.pardit, "synth", "--preset", args.preset, "--out", mdir, "--quiet"], check=True)
        pipe = FluxPipeline.from_pretrained(mdir, torch_dtype=dtype)
        pardit_samples, ref_samples = [], []
        for r in range(args.rounds):
            out = os.path.join(tmp, f"round{r}.json")
            subprocess.run([args.pardit, "bench", "--encode", "--model", mdir, "--dtype", args.dtype, "--threads",
                            str(args.threads), "--batch", str(args.batch), "--prompt", PROMPT,
                            "--max-sequence-length", str(args.max_len), "--warmup", str(args.warmup), "--iters",
                            str(args.iters), "--output", out, "--quiet"],
                           check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            with open(out) as f:
                pardit_samples += json.load(f)["samples_s"]
            ref_samples += transformers_times(pipe, args)
    pm, tm = statistics.median(pardit_samples), statistics.median(ref_samples)
    spread = lambda v: (min(v), max(v))
    result = {"preset": args.preset, "dtype": args.dtype, "threads": args.threads, "batch": args.batch,
              "max_len": args.max_len, "torch": torch.__version__,
              "pardit_samples_s": pardit_samples, "transformers_samples_s": ref_samples,
              "pardit_median_s": pm, "transformers_median_s": tm, "ratio": pm / tm}
    print(f"preset {args.preset} text encoders, {args.dtype}, {args.threads} thread(s), batch {args.batch}, "
          f"T5 {args.max_len} tokens, {args.rounds} rounds x {args.iters} encodes")
    print(f"pardit       median {pm * 1e3:.1f} ms  (min {spread(pardit_samples)[0] * 1e3:.1f}, "
          f"max {spread(pardit_samples)[1] * 1e3:.1f})")
    print(f"transformers median {tm * 1e3:.1f} ms  (min {spread(ref_samples)[0] * 1e3:.1f}, "
          f"max {spread(ref_samples)[1] * 1e3:.1f})")
    print(f"ratio pardit/transformers = {pm / tm:.3f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
