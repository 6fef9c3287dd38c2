#!/usr/bin/env python3
"""The GPU check (run by the bundle's run.sh; see bench/gpu_check.sh): one table of pardit against diffusers.

1. A FLUX model of the preset's shapes (FLUX.1-dev by default) made with diffusers (random init, bf16 on the
   device), written with save_pretrained: both sides load the same weights.
2. diffusers FluxTransformer2DModel, eager (and torch.compile with --compile): time per forward (median),
   peak device memory, at each size.
3. `pardit bench` on the same model: time per forward, peak device memory; bf16 weights (also as CUDA graph
   replays, --cuda-graphs) and FP8 weights.
   Each attention kernel alone (PyTorch's scaled_dot_product_attention with one backend) on the forward's
   shapes, on q/k/v laid out as pardit lays them out (token-major) and as diffusers does (head-major), and
   `pardit bench --attention K` where a kernel beats the one pardit's auto picks (or as --attention-kernels
   says).
4. Fidelity at the first size: `pardit forward` against diffusers' output on the same inputs (bf16), and FP8
   against bf16.
5. Offload rows (`pardit generate`, a few steps at the first size): resident, each --budgets with
   --stream-from host and file, --offload sequential, and FP8 under the first budget: seconds per step,
   streamed bytes per step, peak device memory, peak host RSS.
Prints a Markdown table and writes results.json to --out.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

PRESETS = {  # diffusers FluxTransformer2DModel arguments of pardit's presets
    "flux-dev": dict(num_layers=19, num_single_layers=38, num_attention_heads=24, attention_head_dim=128,
                     joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                     axes_dims_rope=(16, 56, 56)),
    "small": dict(num_layers=4, num_single_layers=8, num_attention_heads=6, attention_head_dim=128,
                  joint_attention_dim=1024, pooled_projection_dim=256, guidance_embeds=True,
                  axes_dims_rope=(16, 56, 56)),
}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def inputs_for(cfg, size, text_len, device, dtype, seed=7):
    g = torch.Generator().manual_seed(seed)
    rows = cols = size // 16
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] += torch.arange(rows)[:, None]
    ids[..., 2] += torch.arange(cols)[None, :]
    t = {
        "hidden_states": torch.randn(1, rows * cols, 64, generator=g),
        "encoder_hidden_states": torch.randn(1, text_len, cfg["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(1, cfg["pooled_projection_dim"], generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": ids.reshape(-1, 3),
        "txt_ids": torch.zeros(text_len, 3),
    }
    if cfg["guidance_embeds"]:
        t["guidance"] = torch.tensor([3.5])
    dev = {k: (v.to(device, dtype) if k in ("hidden_states", "encoder_hidden_states", "pooled_projections")
               else v.to(device)) for k, v in t.items()}
    return t, dev


def time_diffusers(model, kw, device, warmup, iters):
    with torch.inference_mode():
        for _ in range(warmup):
            model(**kw, return_dict=False)
        sync(device)
        samples = []
        for _ in range(iters):
            t = time.perf_counter()
            model(**kw, return_dict=False)
            sync(device)
            samples.append(time.perf_counter() - t)
    return statistics.median(samples), samples


def attention_kernels(cfg, sizes, text_len, device, dtype, iters):
    """Milliseconds per call of each scaled_dot_product_attention backend on one layer's attention of the
    forward (1 image, H heads, image + text tokens), for token-major q/k/v (views of [B, S, H, D] memory, as
    pardit computes them) and head-major ones (contiguous [B, H, S, D], as diffusers hands them over);
    None where the backend refuses the tensors."""
    import contextlib
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    heads, dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    backends = {"auto": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION}
    times = {}
    for size in sizes:
        tokens = (size // 16) ** 2 + text_len
        g = torch.Generator(device=device).manual_seed(11)
        token_major = [torch.randn(1, tokens, heads, dim, device=device, dtype=dtype, generator=g).transpose(1, 2)
                       for _ in range(3)]
        head_major = [t.contiguous() for t in token_major]
        for layout, qkv in (("token-major", token_major), ("head-major", head_major)):
            for name, backend in backends.items():
                ctx = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
                try:
                    with ctx, torch.inference_mode():
                        F.scaled_dot_product_attention(*qkv)
                        sync(device)
                        t = time.perf_counter()
                        for _ in range(iters):
                            F.scaled_dot_product_attention(*qkv)
                        sync(device)
                    times[(size, layout, name)] = 1e3 * (time.perf_counter() - t) / iters
                except RuntimeError:
                    times[(size, layout, name)] = None
        del token_major, head_major
    return times


def run(cmd, env, log):
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n" + p.stdout)
    if p.returncode != 0:
        print(f"  FAILED ({p.returncode}): {' '.join(cmd)}\n  " + "\n  ".join(p.stdout.strip().splitlines()[-5:]))
    return p.returncode, p.stdout, time.perf_counter() - t


def field(text, key):
    m = re.search(rf"\b{key}=([0-9.e+-]+)", text)
    return float(m.group(1)) if m else None


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item(), ((a - b).norm() / b.norm()).item()


def bench_result(what, size, out, flops):
    """A table row from `pardit bench`'s output (its BENCH line)."""
    gf, s = field(out, "gflops"), field(out, "median_s")
    flops[size] = gf * 1e9 * s if gf and s else None
    m = re.search(r"\battention=(\w+)", out)
    row = {"what": what, "size": size, "s": s, "peak_bytes": field(out, "peak_device_bytes"),
           "tflops": gf / 1e3 if gf else None}
    if m:
        row["attention"] = m.group(1)
        row["note"] = f"attention: {m.group(1)}"
    return row


def bench_row(a, mdir, size, weights, extra, threads, env, flops):
    """One more `pardit bench` at `size` with `extra` flags."""
    what = "pardit bench (" + " ".join(extra) + ")"
    rc, out, _ = run([a.pardit, "bench", "--model", mdir, "--device", a.device, "--dtype", "bf16", "--weight-dtype",
                      weights, "--height", str(size), "--width", str(size), "--text-len", str(a.text_len), "--warmup",
                      str(a.warmup), "--iters", str(a.iters)] + threads + extra, env,
                     os.path.join(a.out, f"bench-{weights}-{'-'.join(x.strip('-') for x in extra)}-{size}.log"))
    if rc != 0:
        return {"what": what, "size": size, "s": None, "note": "failed"}
    return bench_result(what, size, out, flops)


def chosen_kernels(spec, att, size, pick):
    """The --attention kernels to time at `size`: 'faster' = each named kernel faster alone than auto's pick
    on token-major q/k/v; '' = none; else the listed ones."""
    if spec != "faster":
        return spec.split()
    mine = att.get((size, "token-major", pick)) if pick else None
    if mine is None:
        return []
    alone = {k: att.get((size, "token-major", k)) for k in ("flash", "efficient", "cudnn")}
    return [k for k, ms in alone.items() if k != pick and ms is not None and ms < 0.95 * mine]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pardit", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS))
    p.add_argument("--sizes", default=None, help="square image sizes in px (default: 1024 2048 on a GPU)")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="denoising steps of the offload rows")
    p.add_argument("--budgets", default="24GiB 12GiB", help="device memory budgets of the offload rows ('' skips them)")
    p.add_argument("--compile", action="store_true", help="also time diffusers under torch.compile (slow first call)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (the CPU dry run)")
    p.add_argument("--attention-kernels", default="faster",
                   help="--attention kernels to time with pardit bench beside auto: 'faster' (those that beat auto's "
                        "pick alone on token-major q/k/v), '' (none) or a list such as 'flash cudnn'")
    a = p.parse_args()
    gpu = a.device == "cuda"
    preset = a.preset or ("flux-dev" if gpu else "small")
    sizes = [int(s) for s in (a.sizes or ("1024 2048" if gpu else "256")).split()]
    dtype = torch.bfloat16
    os.makedirs(a.out, exist_ok=True)
    if a.threads:
        torch.set_num_threads(a.threads)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads or os.cpu_count()))
    threads = ["--threads", str(a.threads)] if a.threads else []
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if gpu else "cpu", "preset": preset}
    print(f"# pardit GPU check: {info['device']}, torch {info['torch']}, preset {preset}, bf16")
    # The device's own GEMM rate, for the share of it a forward reaches.
    n = 8192 if gpu else 1024
    x = torch.randn(n, n, device=a.device, dtype=dtype)
    x @ x
    sync(a.device)
    t = time.perf_counter()
    for _ in range(5):
        x @ x
    sync(a.device)
    info["gemm_tflops"] = 5 * 2 * n ** 3 / (time.perf_counter() - t) / 1e12
    del x
    print(f"measured bf16 GEMM rate: {info['gemm_tflops']:.1f} TFLOP/s")

    # 1. The model, written once by diffusers (without diffusers: by pardit synth, and no diffusers rows).
    cfg = dict(PRESETS[preset], patch_size=1, in_channels=64)
    mdir = os.path.join(a.out, f"model-{preset}")
    t = time.perf_counter()
    try:
        from diffusers import FluxTransformer2DModel
    except ImportError as e:
        FluxTransformer2DModel = None
        print(f"diffusers is not available ({e}): pardit rows only, the model from pardit synth")
    model = None
    if FluxTransformer2DModel is not None:
        import diffusers
        print(f"diffusers {diffusers.__version__} from {os.path.dirname(diffusers.__file__)}")
        torch.manual_seed(0)
        with torch.device(a.device):
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            model = FluxTransformer2DModel(**cfg).eval()
            torch.set_default_dtype(previous)
        if not os.path.exists(os.path.join(mdir, "transformer", "config.json")):
            model.save_pretrained(os.path.join(mdir, "transformer"))
        print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, written in "
              f"{time.perf_counter() - t:.0f} s")
    elif not os.path.exists(os.path.join(mdir, "transformer", "config.json")):
        rc, _, _ = run([a.pardit, "synth", "--preset", preset, "--dtype", "bf16", "--out", mdir], env,
                       os.path.join(a.out, "synth.log"))
        if rc != 0:
            return 1
    ref = None

    # 2. diffusers, eager (and compiled), at each size; the first size's output kept for fidelity.
    rows = []
    flops = {}
    for size in sizes:
        raw, kw = inputs_for(cfg, size, a.text_len, a.device, dtype)
        if size == sizes[0]:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in raw.items()}, os.path.join(a.out, "inputs.safetensors"))
        if model is None:
            continue
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        try:
            med, _ = time_diffusers(model, kw, a.device, a.warmup, a.iters)
            peak = torch.cuda.max_memory_allocated() if gpu else 0
            rows.append({"what": "diffusers eager", "size": size, "s": med, "peak_bytes": peak})
        except torch.OutOfMemoryError:
            rows.append({"what": "diffusers eager", "size": size, "s": None, "note": "out of memory"})
        if size == sizes[0]:
            with torch.inference_mode():
                ref = model(**kw, return_dict=False)[0].float().cpu()
        if a.compile:
            compiled = torch.compile(model)
            t = time.perf_counter()
            with torch.inference_mode():
                compiled(**kw, return_dict=False)
            sync(a.device)
            first = time.perf_counter() - t
            med, _ = time_diffusers(compiled, kw, a.device, 1, a.iters)
            rows.append({"what": "diffusers torch.compile", "size": size, "s": med, "note": f"first call {first:.0f} s"})
    del model
    if gpu:
        torch.cuda.empty_cache()

    # Each attention kernel alone, on pardit's layout and diffusers'.
    att = attention_kernels(cfg, sizes, a.text_len, a.device, dtype, a.iters)
    info["attention_ms"] = {f"{size} {layout} {name}": ms for (size, layout, name), ms in att.items()}

    # 3. pardit bench, bf16 and FP8 weights; at the first size with bf16 weights also one profiled forward
    #    (each operator's device time) and the split of GEMMs and attention timed alone.
    #    On a GPU the bf16 forwards also as CUDA graph replays (--cuda-graphs).
    split = []
    picks = {}  # size -> the kernel pardit's --attention auto ran
    variants = [("compute", [])] + ([("compute", ["--cuda-graphs"])] if gpu else []) + [("fp8", [])]
    variants.append(("compute", ["--attention"]))  # expanded per size below
    for weights, extra in variants:
        for size in sizes:
            if extra == ["--attention"]:
                for kernel in chosen_kernels(a.attention_kernels, att, size, picks.get(size)):
                    rows.append(bench_row(a, mdir, size, "compute", ["--attention", kernel], threads, env, flops))
                continue
            profile = ["--profile"] if weights == "compute" and not extra and size == sizes[0] else []
            tag = weights + ("-graphs" if extra else "")
            rc, out, _ = run([a.pardit, "bench", "--model", mdir, "--device", a.device, "--dtype", "bf16",
                              "--weight-dtype", weights, "--height", str(size), "--width", str(size), "--text-len",
                              str(a.text_len), "--warmup", str(a.warmup), "--iters", str(a.iters)] + threads + profile +
                             extra, env, os.path.join(a.out, f"bench-{tag}-{size}.log"))
            if profile and rc == 0:
                classes = re.findall(r"\]   ([A-Za-z/]+): ([0-9.]+ \w+) \(([0-9.]+)%, (\d+) calls\)", out)
                split = [f"{name} {t} ({float(share):.0f}%)" for name, t, share, _ in classes]
                m = re.search(r"time split: (.*)", out)
                info["time_split"] = m.group(1).strip() if m else None
                info["operator_classes"] = split
            what = "pardit bench" + (" (FP8 weights)" if weights == "fp8" else "") + (" (CUDA graphs)" if extra else "")
            if rc != 0:
                rows.append({"what": what, "size": size, "s": None, "note": "failed"})
                continue
            row = bench_result(what, size, out, flops)
            if weights == "compute" and not extra:
                picks[size] = row.get("attention")
            rows.append(row)

    # 4. Fidelity at the first size.
    from safetensors.torch import load_file
    fidelity = {}
    for weights in ("compute", "fp8"):
        outp = os.path.join(a.out, f"forward-{weights}.safetensors")
        rc, _, _ = run([a.pardit, "forward", "--model", mdir, "--device", a.device, "--dtype", "bf16", "--weight-dtype",
                        weights, "--inputs", os.path.join(a.out, "inputs.safetensors"), "--output", outp] + threads,
                       env, os.path.join(a.out, f"forward-{weights}.log"))
        if rc == 0:
            fidelity[weights] = load_file(outp)["sample"].float()
    if "compute" in fidelity and ref is not None:
        info["bf16_vs_diffusers_max_rel"], info["bf16_vs_diffusers_rel_l2"] = rel(fidelity["compute"], ref)
    if "fp8" in fidelity:
        if ref is not None:
            info["fp8_vs_diffusers_max_rel"], info["fp8_vs_diffusers_rel_l2"] = rel(fidelity["fp8"], ref)
        if "compute" in fidelity:
            info["fp8_vs_bf16_rel_l2"] = rel(fidelity["fp8"], fidelity["compute"])[1]

    # 5. Offload rows.
    budgets = a.budgets.split()
    if budgets:
        from safetensors.torch import save_file
        g = torch.Generator().manual_seed(3)
        embeds = os.path.join(a.out, "embeds.safetensors")
        save_file({"prompt_embeds": torch.randn(1, a.text_len, cfg["joint_attention_dim"], generator=g),
                   "pooled_prompt_embeds": torch.randn(1, cfg["pooled_projection_dim"], generator=g)}, embeds)
        cases = [("resident", ["--offload", "none", "--device-memory-budget", "100000GiB"])]
        for b in budgets:
            cases += [(f"{b} host", ["--device-memory-budget", b, "--stream-from", "host"]),
                      (f"{b} file", ["--device-memory-budget", b, "--stream-from", "file"])]
        cases += [("sequential", ["--offload", "sequential", "--device-memory-budget", "100000GiB", "--stream-from", "host"]),
                  ("sequential file", ["--offload", "sequential", "--device-memory-budget", "100000GiB",
                                       "--stream-from", "file"]),
                  (f"FP8 {budgets[0]} host", ["--weight-dtype", "fp8", "--device-memory-budget", budgets[0],
                                              "--stream-from", "host"])]
        size = sizes[0]
        for name, flags in cases:
            rc, out, _ = run([a.pardit, "generate", "--model", mdir, "--prompt-embeds", embeds, "--device", a.device,
                              "--dtype", "bf16", "--height", str(size), "--width", str(size), "--steps", str(a.steps),
                              "--seed", "0", "--log-level", "debug"] + flags + threads,
                             env, os.path.join(a.out, f"offload-{name.replace(' ', '-')}.log"))
            if rc != 0:
                rows.append({"what": f"generate {name}", "size": size, "s": None, "note": "failed"})
                continue
            steps = [float(x) for x in re.findall(r"debug: step \d+ seconds=([0-9.e+-]+)", out)][1:]
            row = {"what": f"generate {name}", "size": size, "s": statistics.mean(steps) if steps else None,
                   "peak_bytes": field(out, "peak_device"), "rss_bytes": field(out, "peak_rss"),
                   "streamed_bytes": field(out, "streamed_bytes"), "per": "step"}
            # The file source's own read rate (parallel pread() into the staging buffers) and its host memory.
            read, secs = field(out, "stored_read"), re.search(r"stored_read_seconds=([0-9.e+-]+)", out)
            notes = []
            if read and secs and float(secs.group(1)) > 0 and "source=file" in out:
                notes.append(f"file read {read / float(secs.group(1)) / 1e9:.1f} GB/s")
            # How long the GPU's compute stream stood waiting for streamed weights (events around its waits).
            stood = re.search(r"device_wait_seconds=([0-9.e+-]+)", out)
            if stood and gpu:
                notes.append(f"compute stream waited {1e3 * float(stood.group(1)) / a.steps:.1f} ms/step for weights")
            if notes:
                row["note"] = "; ".join(notes)
            rows.append(row)

    # The table.
    base = {r["size"]: r["s"] for r in rows if r["what"] == "diffusers eager" and r.get("s")}
    res = {r["size"]: r["s"] for r in rows if r["what"] == "generate resident" and r.get("s")}
    print("\n| run | px | s per forward (generate: per step) | vs diffusers eager | vs resident | TFLOP/s (share of GEMM rate) "
          "| peak device GiB | host RSS GiB | streamed GiB/step | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    gib = lambda v: f"{v / 2 ** 30:.2f}" if v else "-"
    for r in rows:
        s = r.get("s")
        vs = f"{s / base[r['size']]:.2f}x" if s and r["size"] in base and not r["what"].startswith("generate") else "-"
        vr = f"{s / res[r['size']]:.2f}x" if s and r["what"].startswith("generate") and r["size"] in res else "-"
        tf = (f"{r['tflops']:.1f} ({100 * r['tflops'] / info['gemm_tflops']:.0f}%)" if r.get("tflops") else "-")
        print(f"| {r['what']} | {r['size']} | {f'{s:.4f}' if s else '-'} | {vs} | {vr} | {tf} | {gib(r.get('peak_bytes'))} "
              f"| {gib(r.get('rss_bytes'))} | {gib(r.get('streamed_bytes'))} | {r.get('note', '')} |")
    print("\nattention alone, ms per call (one layer, bf16; -: the kernel refused the tensors):")
    print("| px | q/k/v layout | auto | flash | efficient | cudnn |")
    print("|---|---|---|---|---|---|")
    for size in sizes:
        for layout in ("token-major (pardit)", "head-major (diffusers)"):
            cells = [att.get((size, layout.split()[0], k)) for k in ("auto", "flash", "efficient", "cudnn")]
            print(f"| {size} | {layout} | " + " | ".join(f"{ms:.3f}" if ms is not None else "-" for ms in cells) + " |")
    if split:
        print(f"\npardit operators at {sizes[0]} px, one profiled forward (device time): " + ", ".join(split))
        print(f"pardit GEMMs and attention timed alone: {info.get('time_split')}")
    print("\nfidelity at %d px (bf16; max relative error and relative L2): " % sizes[0] +
          ", ".join(f"{k} {v:.2e}" for k, v in info.items() if "rel" in k))
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=2)
    print(f"results: {os.path.join(a.out, 'results.json')}")
    failed = [r["what"] for r in rows if r.get("note") == "failed"] + [w for w in ("compute", "fp8") if w not in fidelity]
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
