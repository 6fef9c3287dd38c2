#!/usr/bin/env python3
"""The GPU check (run by the bundle's run.sh; see bench/gpu_check.sh): one table of pardit against diffusers.

1. A FLUX model of the preset's shapes (FLUX.1-dev by default) made with diffusers (random init, bf16 on the
   device), written once with save_pretrained (--model-dir): both sides load the same weights.
2. diffusers FluxTransformer2DModel, eager (and torch.compile with --compile): time per forward (median),
   peak device memory, at each size; its output at the first size for fidelity.
3. pardit, most wanted first: `pardit bench` with bf16 weights at the first size (and one profiled forward),
   `pardit forward` against diffusers' output (fidelity); each attention kernel alone (PyTorch's
   scaled_dot_product_attention with one backend) on the forward's shapes, on q/k/v laid out as pardit lays
   them out (token-major) and as diffusers does (head-major); bf16 at the other sizes; FP8 weights (and their
   fidelity); CUDA graph replays (--cuda-graphs); ATen's compositions in place of the fused passes
   (--unfused); `pardit bench --attention K` where a kernel beats the one auto picks (or as
   --attention-kernels says).
4. Offload rows (`pardit generate`, a few steps at the first size): resident, the first of --budgets with
   --stream-from host and file, --offload sequential, FP8 under the first budget, then the other budgets:
   seconds per step, streamed bytes per step, peak device memory, peak host RSS.
5. FP8 and CUDA graphs at the other sizes.
Every row is printed as it is measured and results.json and table.md in --out are rewritten; with
--deadline-s, a command gets at most what is left and rows that cannot start are skipped, so the table
always comes out. Each command's output goes to --logs.
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


class Clock:
    """The check's deadline: commands get what is left of it (capped); a command is not started when less is
    left than the longest one so far took (it would be cut off)."""

    def __init__(self, seconds):
        self.end = time.monotonic() + seconds if seconds is not None else None
        self.longest = 0.0

    def left(self):
        return float("inf") if self.end is None else self.end - time.monotonic()


def run(cmd, env, log, clock, cap=240, least=20):
    """Runs a pardit command with a timeout: min(cap, what the deadline leaves). Returns (returncode, output,
    seconds); returncode None when it was skipped (too little time left) or timed out (the output says which)."""
    limit = min(cap, clock.left() - 5)
    if limit < max(least, clock.longest):
        return None, "skipped: the deadline is near", 0.0
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=limit)
        code, out = p.returncode, p.stdout
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        # Cut off by the deadline (it had less than the cap): skipped, not failed.
        code, out = None, ("skipped: cut off at the deadline" if limit < cap else "") + out + \
            f"\ntimed out after {limit:.0f} s"
    clock.longest = max(clock.longest, time.perf_counter() - t)
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n" + out)
    if code is None:
        print(f"  timed out after {limit:.0f} s: {' '.join(cmd)}")
    elif code != 0:
        print(f"  FAILED ({code}): {' '.join(cmd)}\n  " + "\n  ".join(out.strip().splitlines()[-5:]))
    return code, out, time.perf_counter() - t


def failure_note(code, out):
    if code is None:
        return "skipped (deadline)" if out.startswith("skipped") else "timed out"
    return "failed"


MARKER = "pardit-gpu-check.json"  # written last into a complete model folder: what made it


def field(text, key):
    m = re.search(rf"\b{key}=([0-9.e+-]+)", text)
    return float(m.group(1)) if m else None


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item(), ((a - b).norm() / b.norm()).item()


def bench_result(what, size, out):
    """A table row from `pardit bench`'s output (its BENCH line)."""
    gf, s = field(out, "gflops"), field(out, "median_s")
    m = re.search(r"\battention=(\w+)", out)
    row = {"what": what, "size": size, "s": s, "peak_bytes": field(out, "peak_device_bytes"),
           "tflops": gf / 1e3 if gf else None}
    if m:
        row["attention"] = m.group(1)
        row["note"] = f"attention: {m.group(1)}"
    return row


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


def gemm_rate(device, dtype, gpu):
    """The device's bf16 GEMM rate (TFLOP/s): the best of several timed rounds after the clocks have risen."""
    n = 8192 if gpu else 1024
    x = torch.randn(n, n, device=device, dtype=dtype)
    t = time.perf_counter()
    while time.perf_counter() - t < (1.0 if gpu else 0.2):  # warm-up: a GPU idles at a low clock
        x @ x
        sync(device)
    best = 0.0
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        for _ in range(10 if gpu else 2):
            x @ x
        sync(device)
        best = max(best, (10 if gpu else 2) * 2 * n ** 3 / (time.perf_counter() - t) / 1e12)
    return best


def model_dir(requested, preset, bytes_needed):
    """The check's own model folder, gpu-check-PRESET inside --model-dir, else inside a temporary folder with
    room for it (or /dev/shm). Nothing outside it is touched."""
    import shutil
    import tempfile
    name = "pardit-gpu-check-" + preset
    if requested:
        os.makedirs(requested, exist_ok=True)
        return os.path.join(requested, name)
    for base in (tempfile.gettempdir(), "/dev/shm"):
        d = os.path.join(base, name)
        if os.path.exists(os.path.join(d, MARKER)):
            return d
        if os.path.isdir(base) and shutil.disk_usage(base).free > 1.1 * bytes_needed:
            return d
    raise SystemExit(f"gpu_check: no folder with {bytes_needed / 1e9:.0f} GB free for the model (give --model-dir)")


def same_model(mdir, made):
    """Whether the check's folder mdir holds a complete model made as `made` says; else it is emptied (a run
    killed while writing leaves no marker)."""
    import shutil
    try:
        with open(os.path.join(mdir, MARKER)) as f:
            if json.load(f) == made:
                return True
    except (OSError, ValueError):
        pass
    shutil.rmtree(mdir, ignore_errors=True)
    os.makedirs(mdir)
    return False


def mark(mdir, made):
    with open(os.path.join(mdir, MARKER), "w") as f:
        json.dump(made, f)


HEADER = ("| run | px | s per forward (generate: per step) | vs diffusers eager | vs resident | TFLOP/s (share of GEMM "
          "rate) | peak device GiB | host RSS GiB | streamed GiB/step | note |\n|---|---|---|---|---|---|---|---|---|---|")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pardit", required=True)
    p.add_argument("--out", required=True, help="results.json and table.md, rewritten after every row")
    p.add_argument("--logs", default=None, help="each command's output (default: OUT/logs)")
    p.add_argument("--model-dir", default=None, help="where the check's model folder is made once and reused "
                                                     "(default: a temporary folder with room for it)")
    p.add_argument("--deadline-s", type=float, default=None, help="seconds for the check: rows that cannot end in "
                                                                  "time are skipped (default: no deadline)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS))
    p.add_argument("--sizes", default=None, help="square image sizes in px (default: 1024 2048 on a GPU)")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="denoising steps of the offload rows")
    p.add_argument("--budgets", default="12GiB 24GiB", help="device memory budgets of the offload rows ('' skips them)")
    p.add_argument("--compile", action="store_true", help="also time diffusers under torch.compile (slow first call)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (the CPU dry run)")
    p.add_argument("--attention-kernels", default="faster",
                   help="--attention kernels to time with pardit bench beside auto: 'faster' (those that beat auto's "
                        "pick alone on token-major q/k/v), '' (none) or a list such as 'flash cudnn'")
    a = p.parse_args()
    clock = Clock(a.deadline_s)
    gpu = a.device == "cuda"
    preset = a.preset or ("flux-dev" if gpu else "small")
    sizes = [int(s) for s in (a.sizes or ("1024 2048" if gpu else "256")).split()]
    first = sizes[0]
    dtype = torch.bfloat16
    logs = a.logs or os.path.join(a.out, "logs")
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(logs, exist_ok=True)
    if a.threads:
        torch.set_num_threads(a.threads)
    # pardit's processes get the bundle's libraries (run.sh keeps them out of this Python's own path).
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads or os.cpu_count()))
    if os.environ.get("PARDIT_LD_LIBRARY_PATH"):
        env["LD_LIBRARY_PATH"] = os.environ["PARDIT_LD_LIBRARY_PATH"]
    threads = ["--threads", str(a.threads)] if a.threads else []
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if gpu else "cpu", "preset": preset}
    rows, att, split = [], {}, []
    fidelity = {}

    def save():
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=2)
        with open(os.path.join(a.out, "table.md"), "w") as f:
            f.write(table() + "\n")

    def line(r):
        base = {x["size"]: x["s"] for x in rows if x["what"] == "diffusers eager" and x.get("s")}
        res = {x["size"]: x["s"] for x in rows if x["what"] == "generate resident" and x.get("s")}
        s = r.get("s")
        gen = r["what"].startswith("generate")
        vs = f"{s / base[r['size']]:.2f}x" if s and r["size"] in base and not gen else "-"
        vr = f"{s / res[r['size']]:.2f}x" if s and gen and r["size"] in res else "-"
        tf = f"{r['tflops']:.1f} ({100 * r['tflops'] / info['gemm_tflops']:.0f}%)" if r.get("tflops") else "-"
        gib = lambda v: f"{v / 2 ** 30:.2f}" if v else "-"
        return (f"| {r['what']} | {r['size']} | {f'{s:.4f}' if s else '-'} | {vs} | {vr} | {tf} | "
                f"{gib(r.get('peak_bytes'))} | {gib(r.get('rss_bytes'))} | {gib(r.get('streamed_bytes'))} | "
                f"{r.get('note', '')} |")

    def table():
        return HEADER + "\n" + "\n".join(line(r) for r in rows)

    def emit(r):
        rows.append(r)
        print(line(r))
        save()

    print(f"# pardit GPU check: {info['device']}, torch {info['torch']}, preset {preset}, bf16"
          + (f", deadline {a.deadline_s:.0f} s" if a.deadline_s is not None else ""))
    info["gemm_tflops"] = gemm_rate(a.device, dtype, gpu)
    print(f"measured bf16 GEMM rate: {info['gemm_tflops']:.1f} TFLOP/s")

    # 1. The model, written once by diffusers (without diffusers: pardit synth's zero weights, sparse files: the
    #    speed rows only).
    cfg = dict(PRESETS[preset], patch_size=1, in_channels=64)
    t = time.perf_counter()
    try:
        from diffusers import FluxTransformer2DModel
    except ImportError as e:
        FluxTransformer2DModel = None
        print(f"diffusers is not available ({e}): pardit rows only, on pardit synth's zero weights")
    model = None
    if FluxTransformer2DModel is not None:
        import diffusers
        import huggingface_hub
        print(f"diffusers {diffusers.__version__} from {os.path.dirname(diffusers.__file__)}, huggingface_hub "
              f"{huggingface_hub.__version__}")
        torch.manual_seed(0)
        with torch.device(a.device):
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            model = FluxTransformer2DModel(**cfg).eval()
            torch.set_default_dtype(previous)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        mdir = model_dir(a.model_dir, preset, weight_bytes)
        made = {"preset": preset, "source": "diffusers", "seed": 0}
        if not same_model(mdir, made):  # (a folder a killed run left half-written is written again)
            model.save_pretrained(os.path.join(mdir, "transformer"))
            mark(mdir, made)
        print(f"model: {weight_bytes / 2e9:.2f} B parameters in {mdir}, ready in {time.perf_counter() - t:.0f} s")
    else:
        mdir = model_dir(a.model_dir, preset, 0)
        made = {"preset": preset, "source": "pardit synth --fill zeros"}
        if not same_model(mdir, made):
            code, _, _ = run([a.pardit, "synth", "--preset", preset, "--dtype", "bf16", "--fill", "zeros", "--out", mdir],
                             env, os.path.join(logs, "synth.log"), clock)
            if code != 0:
                return 1
            mark(mdir, made)
    info["model_dir"] = mdir
    work = os.path.join(mdir, "check")  # inputs and outputs of the runs (not results: they stay here)
    os.makedirs(work, exist_ok=True)
    print(HEADER)

    # 2. diffusers, eager (and compiled), at each size; the first size's output kept for fidelity.
    ref = None
    for size in sizes:
        raw, kw = inputs_for(cfg, size, a.text_len, a.device, dtype)
        if size == first:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in raw.items()}, os.path.join(work, "inputs.safetensors"))
        if model is None:
            continue
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        try:
            med, _ = time_diffusers(model, kw, a.device, a.warmup, a.iters)
            emit({"what": "diffusers eager", "size": size, "s": med,
                  "peak_bytes": torch.cuda.max_memory_allocated() if gpu else 0})
        except torch.OutOfMemoryError:
            emit({"what": "diffusers eager", "size": size, "s": None, "note": "out of memory"})
        if size == first:
            with torch.inference_mode():
                ref = model(**kw, return_dict=False)[0].float().cpu()
        if a.compile and size == first and clock.left() > 300:
            compiled = torch.compile(model)
            t = time.perf_counter()
            with torch.inference_mode():
                compiled(**kw, return_dict=False)
            sync(a.device)
            took = time.perf_counter() - t
            med, _ = time_diffusers(compiled, kw, a.device, 1, a.iters)
            emit({"what": "diffusers torch.compile", "size": size, "s": med, "note": f"first call {took:.0f} s"})
            del compiled  # it holds the model
    del model
    if gpu:
        torch.cuda.empty_cache()

    def bench(size, weights="compute", extra=(), profile=False):
        """One `pardit bench` row."""
        extra = list(extra)
        what = ("pardit bench" + (" (FP8 weights)" if weights == "fp8" else "")
                + (f" ({' '.join(extra)})" if extra else ""))
        tag = "-".join([weights] + [x.strip("-") for x in extra])
        code, out, _ = run([a.pardit, "bench", "--model", mdir, "--device", a.device, "--dtype", "bf16",
                            "--weight-dtype", weights, "--height", str(size), "--width", str(size), "--text-len",
                            str(a.text_len), "--warmup", str(a.warmup), "--iters", str(a.iters)] + threads
                           + (["--profile"] if profile else []) + extra, env,
                           os.path.join(logs, f"bench-{tag}-{size}.log"), clock)
        if code != 0:
            emit({"what": what, "size": size, "s": None, "note": failure_note(code, out)})
            return None
        if profile:
            classes = re.findall(r"\]   ([A-Za-z/]+): ([0-9.]+ \w+) \(([0-9.]+)%, (\d+) calls\)", out)
            split[:] = [f"{name} {t} ({float(share):.0f}%)" for name, t, share, _ in classes]
            m = re.search(r"time split: (.*)", out)
            info["time_split"] = m.group(1).strip() if m else None
            info["operator_classes"] = split
        row = bench_result(what, size, out)
        emit(row)
        return row

    def forward(weights):
        """pardit's output on the saved inputs at the first size, for fidelity."""
        outp = os.path.join(work, f"forward-{weights}.safetensors")
        code, out, _ = run([a.pardit, "forward", "--model", mdir, "--device", a.device, "--dtype", "bf16",
                               "--weight-dtype", weights, "--inputs", os.path.join(work, "inputs.safetensors"),
                               "--output", outp] + threads, env, os.path.join(logs, f"forward-{weights}.log"), clock)
        if code != 0:
            emit({"what": f"pardit forward ({'FP8' if weights == 'fp8' else 'bf16'} weights, fidelity)", "size": first,
                  "s": None, "note": failure_note(code, out)})
        else:
            from safetensors.torch import load_file
            fidelity[weights] = load_file(outp)["sample"].float()
            os.remove(outp)
            if ref is not None:
                info[f"{'bf16' if weights == 'compute' else 'fp8'}_vs_diffusers_max_rel"], \
                    info[f"{'bf16' if weights == 'compute' else 'fp8'}_vs_diffusers_rel_l2"] = rel(fidelity[weights], ref)
            if "compute" in fidelity and "fp8" in fidelity:
                info["fp8_vs_bf16_rel_l2"] = rel(fidelity["fp8"], fidelity["compute"])[1]
            print("fidelity at %d px (max relative error, relative L2): " % first +
                  ", ".join(f"{k} {v:.2e}" for k, v in info.items() if "rel" in k))
            save()

    # 3. pardit, in order of what the issues ask first: bf16 at the first size (with one profiled forward) and
    #    its fidelity; each attention kernel alone; bf16 at the other sizes; FP8; CUDA graphs; --unfused; the
    #    attention kernels that beat auto's pick; the offload rows; then the rest at the other sizes.
    picks = {}
    row = bench(first, profile=True)
    picks[first] = row.get("attention") if row else None
    forward("compute")
    att.update(attention_kernels(cfg, sizes, a.text_len, a.device, dtype, a.iters))
    info["attention_ms"] = {f"{size} {layout} {name}": ms for (size, layout, name), ms in att.items()}
    for size in sizes[1:]:
        row = bench(size)
        picks[size] = row.get("attention") if row else None
    bench(first, "fp8")
    forward("fp8")
    if gpu:
        bench(first, extra=["--cuda-graphs"])
    bench(first, extra=["--unfused"])
    for size in sizes:
        for kernel in chosen_kernels(a.attention_kernels, att, size, picks.get(size)):
            bench(size, extra=["--attention", kernel])

    # 4. Offload rows (`pardit generate`, a few steps at the first size). The file rows read a checkpoint that
    #    was just written: the page cache may hold it (the note gives the read rate).
    budgets = a.budgets.split()
    if budgets:
        from safetensors.torch import save_file
        g = torch.Generator().manual_seed(3)
        embeds = os.path.join(work, "embeds.safetensors")
        save_file({"prompt_embeds": torch.randn(1, a.text_len, cfg["joint_attention_dim"], generator=g),
                   "pooled_prompt_embeds": torch.randn(1, cfg["pooled_projection_dim"], generator=g)}, embeds)
        cases = [("resident", ["--offload", "none", "--device-memory-budget", "100000GiB"]),
                 (f"{budgets[0]} host", ["--device-memory-budget", budgets[0], "--stream-from", "host"]),
                 (f"{budgets[0]} file", ["--device-memory-budget", budgets[0], "--stream-from", "file"]),
                 ("sequential", ["--offload", "sequential", "--device-memory-budget", "100000GiB", "--stream-from", "host"]),
                 (f"FP8 {budgets[0]} host", ["--weight-dtype", "fp8", "--device-memory-budget", budgets[0],
                                             "--stream-from", "host"]),
                 ("sequential file", ["--offload", "sequential", "--device-memory-budget", "100000GiB",
                                      "--stream-from", "file"])]
        for b in budgets[1:]:
            cases += [(f"{b} host", ["--device-memory-budget", b, "--stream-from", "host"]),
                      (f"{b} file", ["--device-memory-budget", b, "--stream-from", "file"])]
        for name, flags in cases:
            code, out, _ = run([a.pardit, "generate", "--model", mdir, "--prompt-embeds", embeds, "--device", a.device,
                                "--dtype", "bf16", "--height", str(first), "--width", str(first), "--steps",
                                str(a.steps), "--seed", "0", "--log-level", "debug"] + flags + threads,
                               env, os.path.join(logs, f"offload-{name.replace(' ', '-')}.log"), clock)
            if code != 0:
                emit({"what": f"generate {name}", "size": first, "s": None, "note": failure_note(code, out)})
                continue
            steps = [float(x) for x in re.findall(r"debug: step \d+ seconds=([0-9.e+-]+)", out)][1:]
            r = {"what": f"generate {name}", "size": first, "s": statistics.mean(steps) if steps else None,
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
                r["note"] = "; ".join(notes)
            emit(r)

    # 5. The rest at the other sizes.
    for size in sizes[1:]:
        bench(size, "fp8")
        if gpu:
            bench(size, extra=["--cuda-graphs"])

    # The whole table again, with the attention kernels, the profile and fidelity.
    print("\n" + table())
    print("\nattention alone, ms per call (one layer, bf16; -: the kernel refused the tensors):")
    print("| px | q/k/v layout | auto | flash | efficient | cudnn |")
    print("|---|---|---|---|---|---|")
    for size in sizes:
        for layout in ("token-major (pardit)", "head-major (diffusers)"):
            cells = [att.get((size, layout.split()[0], k)) for k in ("auto", "flash", "efficient", "cudnn")]
            print(f"| {size} | {layout} | " + " | ".join(f"{ms:.3f}" if ms is not None else "-" for ms in cells) + " |")
    if split:
        print(f"\npardit operators at {first} px, one profiled forward (device time): " + ", ".join(split))
        print(f"pardit GEMMs and attention timed alone: {info.get('time_split')}")
    if budgets:
        print("\nfile rows read a checkpoint written just before: the page cache may hold it (see the read rate)")
    print("\nfidelity at %d px (bf16; max relative error and relative L2): " % first +
          ", ".join(f"{k} {v:.2e}" for k, v in info.items() if "rel" in k))
    save()
    print(f"results: {os.path.join(a.out, 'results.json')}, {os.path.join(a.out, 'table.md')}")
    skipped = [r["what"] for r in rows if r.get("note") == "skipped (deadline)"]
    if skipped:
        print("skipped at the deadline: " + ", ".join(skipped))
    failed = [r["what"] for r in rows if r.get("note") in ("failed", "timed out")]
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
