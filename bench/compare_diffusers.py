#!/usr/bin/env python3
"""pardit vs diffusers: transformer forward time on the same model, dtype, inputs and thread count.

Writes the model once with `pardit synth` (diffusers layout) so both load identical weights, then
alternates rounds of `pardit bench` and diffusers' FluxTransformer2DModel timing in this process, and
prints the ratio of the medians (pardit / diffusers; < 1 means pardit is faster).

    launch/install.sh --reference
    $PARDIT_VENV/bin/python bench/compare_diffusers.py --threads 1 --dtype fp32
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
from diffusers import FluxTransformer2DModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def diffusers_times(model, args, dtype):
    g = torch.Generator().manual_seed(1234)
    cfg = model.config
    tokens = (args.height // 16) * (args.width // 16)
    hs = torch.randn(1, tokens, cfg.in_channels, generator=g).to(dtype)
    enc = torch.randn(1, args.text_len, cfg.joint_attention_dim, generator=g).to(dtype)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g).to(dtype)
    rows, cols = args.height // 16, args.width // 16
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] += torch.arange(rows)[:, None]
    ids[..., 2] += torch.arange(cols)[None, :]
    kw = dict(hidden_states=hs, encoder_hidden_states=enc, pooled_projections=pooled,
              timestep=torch.full([1], 0.5), img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(args.text_len, 3),
              guidance=torch.full([1], 3.5) if cfg.guidance_embeds else None, return_dict=False)
    samples = []
    with torch.inference_mode():
        for _ in range(args.warmup):
            model(**kw)
        for _ in range(args.iters):
            t = time.perf_counter()
            model(**kw)
            samples.append(time.perf_counter() - t)
    return samples


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pardit", default=os.path.join(ROOT, "build", "pardit"))
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--text-len", type=int, default=128)
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
        model = FluxTransformer2DModel.from_pretrained(os.path.join(mdir, "transformer"), torch_dtype=dtype).eval()
        pardit_samples, diffusers_samples = [], []
        for r in range(args.rounds):
            out = os.path.join(tmp, f"round{r}.json")
            subprocess.run([args.pardit, "bench", "--model", mdir, "--dtype", args.dtype, "--threads", str(args.threads),
                            "--height", str(args.height), "--width", str(args.width), "--text-len", str(args.text_len),
                            "--warmup", str(args.warmup), "--iters", str(args.iters), "--output", out, "--quiet"],
                           check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            with open(out) as f:
                pj = json.load(f)
            pardit_samples += pj["samples_s"]
            diffusers_samples += diffusers_times(model, args, dtype)
    pm, dm = statistics.median(pardit_samples), statistics.median(diffusers_samples)
    result = {"preset": args.preset, "dtype": args.dtype, "threads": args.threads, "height": args.height,
              "width": args.width, "text_len": args.text_len, "torch": torch.__version__,
              "pardit_samples_s": pardit_samples, "diffusers_samples_s": diffusers_samples,
              "pardit_median_s": pm, "diffusers_median_s": dm, "ratio": pm / dm,
              "pardit_gflops": pj["flops"] / pm / 1e9, "gemm_gflops": pj["gemm_gflops"], "split_s": pj["split_s"]}
    print(f"preset {args.preset}, {args.dtype}, {args.threads} thread(s), {args.height}x{args.width}, "
          f"{args.text_len} text tokens, {args.rounds} rounds x {args.iters} iterations")
    print(f"pardit    median {pm:.4f} s  ({result['pardit_gflops']:.1f} GFLOP/s, "
          f"{100 * result['pardit_gflops'] / pj['gemm_gflops']:.1f}% of the measured GEMM rate {pj['gemm_gflops']:.1f})")
    print(f"diffusers median {dm:.4f} s")
    print(f"ratio pardit/diffusers = {pm / dm:.3f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
