#!/usr/bin/env python3
"""Plots and a Markdown summary from a pardit metrics file (docs/metrics.md).

    python tools/plot_metrics.py sweep.h5 --out docs/sweep

Writes latency.png (latency against rank count, one line per layout and resolution), timeline.png (per-rank
step times of the largest run), comm_share.png (communication share of the step time per run),
memory.png (peak host RSS / device memory per rank per run) and summary.md (one row per run).
Needs h5py and matplotlib (launch/install.sh --plots).
"""
import argparse
import os
import sys

import h5py
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

KINDS = ["all_to_all", "all_gather", "broadcast", "all_reduce", "send_recv"]


def text(v):
    return v.decode() if isinstance(v, bytes) else str(v)


def layout_name(a):
    parts = []
    for key, short in (("cfg_degree", "CFG"), ("pipefusion_degree", "PP"), ("ring_degree", "R"), ("ulysses_degree", "U")):
        if int(a[key]) > 1:
            parts.append(f"{short}{int(a[key])}")
    return "x".join(parts) or "single"


def load(path):
    runs = []
    with h5py.File(path, "r") as f:
        for rid, g in f["runs"].items():
            a = dict(g.attrs)
            cfg = dict(line.split(" = ", 1) for line in text(a["config"]).splitlines() if " = " in line)
            step = g["step_time"][()]
            comm = sum(g[f"comm_time/{k}"][()] for k in KINDS)
            s = dict(g["summary"].attrs)
            runs.append(dict(
                id=rid, command=text(a["command"]), ranks=int(a["world_size"]), layout=layout_name(a),
                resolution=f"{cfg.get('width', '?')}x{cfg.get('height', '?')}", step=step, comm=comm,
                latency=float(s["total_latency_s"]), mean_step=float(s["mean_step_time_s"]),
                ips=float(s["images_per_second"]), rss=g["peak_host_rss"][()], dev=g["peak_device_memory"][()],
                read=g["bytes_read"][()], hosts=text(a["hosts"]), commit=text(a["git_commit"])))
    return runs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    runs = load(args.metrics)
    if not runs:
        print(f"{args.metrics}: no runs", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)

    # Latency against rank count, per layout family and resolution.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    single = {r["resolution"]: r["mean_step"] for r in runs if r["ranks"] == 1}
    groups = {}
    for r in runs:
        fam = "".join(ch for ch in r["layout"] if not ch.isdigit()) or "single"
        groups.setdefault((fam, r["resolution"]), []).append(r)
    for (fam, res), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["ranks"])
        xs = [1] + [r["ranks"] for r in rs] if res in single and fam != "single" else [r["ranks"] for r in rs]
        ys = ([single[res]] if res in single and fam != "single" else []) + [r["mean_step"] for r in rs]
        ax.plot(xs, ys, marker="o", label=f"{fam} {res}")
    ax.set_xlabel("ranks")
    ax.set_ylabel("mean step time (s, slowest rank)")
    ax.set_xticks(sorted({r["ranks"] for r in runs}))
    ax.set_title("Step time against rank count")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "latency.png"), dpi=120)

    # Per-rank timeline of the largest run.
    big = max(runs, key=lambda r: (r["ranks"], r["latency"]))
    fig, ax = plt.subplots(figsize=(7, 0.6 * big["ranks"] + 1.5))
    for rank in range(big["ranks"]):
        t = 0.0
        for s, dur in enumerate(big["step"][rank]):
            c = big["comm"][rank][s]
            ax.barh(rank, dur - c, left=t, color="tab:blue", edgecolor="white")
            ax.barh(rank, c, left=t + dur - c, color="tab:orange", edgecolor="white")
            t += dur
    ax.set_yticks(range(big["ranks"]))
    ax.set_yticklabels([f"rank {i}" for i in range(big["ranks"])])
    ax.set_xlabel("time (s): compute (blue) and communication (orange) per step")
    ax.set_title(f"Per-rank step timeline: {big['layout']} {big['resolution']}")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "timeline.png"), dpi=120)

    # Communication share per run.
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['layout']}\n{r['resolution']}" for r in runs]
    shares = [100 * float(np.sum(r["comm"]) / max(np.sum(r["step"]), 1e-12)) for r in runs]
    ax.bar(range(len(runs)), shares, color="tab:orange")
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels(labels, fontsize=6)
    ax.set_ylabel("communication share of step time (%)")
    ax.set_title("Communication share per run (all ranks)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "comm_share.png"), dpi=120)

    # Memory per rank.
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, r in enumerate(runs):
        mem = r["dev"] if np.any(r["dev"]) else r["rss"]
        ax.scatter([i] * len(mem), np.asarray(mem) / 2**30, s=12)
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels(labels, fontsize=6)
    ax.set_ylabel("peak memory per rank (GiB; device, else host RSS)")
    ax.set_title("Memory per rank")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "memory.png"), dpi=120)

    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(f"Runs in `{os.path.basename(args.metrics)}` (commit {runs[0]['commit']}, host {runs[0]['hosts'].split(',')[0]}).\n\n")
        f.write("| run | command | resolution | ranks | layout | mean step (s) | speedup | comm share | latency (s) | images/s | max RSS (GiB) |\n")
        f.write("|---|---|---|---|---|---|---|---|---|---|---|\n")
        for r, share in zip(runs, shares):
            base = single.get(r["resolution"])
            speed = f"{base / r['mean_step']:.2f}x" if base else "-"
            f.write(f"| {r['id']} | {r['command']} | {r['resolution']} | {r['ranks']} | {r['layout']} | {r['mean_step']:.4f} | "
                    f"{speed} | {share:.1f}% | {r['latency']:.3f} | {r['ips']:.3f} | {np.max(r['rss']) / 2**30:.2f} |\n")
    print(f"wrote latency.png, timeline.png, comm_share.png, memory.png and summary.md to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
