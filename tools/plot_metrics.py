#!/usr/bin/env python3
"""Plots and a Markdown summary from a pardit metrics file (docs/metrics.md).

    python tools/plot_metrics.py sweep.h5 --out docs/sweep

Writes scaling.png (speedup and parallel efficiency against the one-rank run on log2 axes, one colour per
layout family, one marker per resolution, the ideal dashed), timeline.png (per-rank step times of the
largest run), comm.png (communication time per collective kind as a share of the step time, per run),
memory.png (peak host RSS and, on GPUs, device memory per rank, axes from 0) and summary.md (one row
per run with speedup and efficiency).
Needs h5py and matplotlib (launch/install.sh --plots).
"""
import argparse
import os
import sys

import h5py
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
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


def family(layout):
    """The layout without its degrees: U2 and U4 are one family."""
    return "".join(ch for ch in layout if not ch.isdigit()) or "single"


def load(path):
    runs = []
    with h5py.File(path, "r") as f:
        for rid, g in f["runs"].items():
            a = dict(g.attrs)
            cfg = dict(line.split(" = ", 1) for line in text(a["config"]).splitlines() if " = " in line)
            step = g["step_time"][()]
            comm_kind = {k: g[f"comm_time/{k}"][()] for k in KINDS}
            comm = sum(comm_kind.values())
            height = int(a["height"]) if "height" in a else cfg.get("height", "?")
            width = int(a["width"]) if "width" in a else cfg.get("width", "?")
            s = dict(g["summary"].attrs)
            runs.append(dict(
                id=rid, command=text(a["command"]), ranks=int(a["world_size"]), layout=layout_name(a),
                resolution=f"{width}x{height}", step=step, comm=comm, comm_kind=comm_kind,
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

    single = {r["resolution"]: r["mean_step"] for r in runs if r["ranks"] == 1}
    families = sorted({family(r["layout"]) for r in runs if r["ranks"] > 1})
    colour = {fam: plt.get_cmap("tab10")(i % 10) for i, fam in enumerate(families)}
    resolutions = sorted({r["resolution"] for r in runs}, key=lambda res: [int(x) for x in res.split("x") if x.isdigit()])
    marker = {res: "osD^v<>p*h"[i % 10] for i, res in enumerate(resolutions)}
    rank_counts = sorted({r["ranks"] for r in runs})

    # Speedup and parallel efficiency against the single-rank run of the same resolution, log2 axes.
    fig, (ax_s, ax_e) = plt.subplots(1, 2, figsize=(11, 4.5))
    top = max(rank_counts)
    ideal = [2**i for i in range(0, int(np.log2(top)) + 1)]
    ax_s.plot(ideal, ideal, color="grey", linestyle="--", linewidth=1, label="ideal")
    ax_e.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="ideal")
    for fam in families:
        for res in resolutions:
            rs = sorted((r for r in runs if family(r["layout"]) == fam and r["resolution"] == res and r["ranks"] > 1),
                        key=lambda r: r["ranks"])
            if not rs or res not in single:
                continue
            xs = [1] + [r["ranks"] for r in rs]
            speed = [1.0] + [single[res] / r["mean_step"] for r in rs]
            ax_s.plot(xs, speed, color=colour[fam], marker=marker[res], label=f"{fam} {res}")
            ax_e.plot(xs, [s / x for s, x in zip(speed, xs)], color=colour[fam], marker=marker[res], label=f"{fam} {res}")
    for res in resolutions:  # the baselines
        if res in single:
            ax_s.scatter([1], [1], color="black", marker=marker[res], zorder=5)
            ax_e.scatter([1], [1], color="black", marker=marker[res], zorder=5)
    for ax in (ax_s, ax_e):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ideal)
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("ranks")
        ax.grid(alpha=0.3, which="both")
    ax_s.set_yscale("log", base=2)
    ax_s.set_yticks(ideal)
    ax_s.get_yaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax_s.set_ylabel("speedup over one rank (mean step time)")
    ax_s.set_title("Speedup (black: the one-rank baselines)")
    ax_e.set_ylim(0, 1.2)
    ax_e.set_ylabel("parallel efficiency (speedup / ranks)")
    ax_e.set_title("Parallel efficiency")
    ax_e.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "scaling.png"), dpi=120)
    plt.close(fig)

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
    plt.close(fig)

    # Communication per collective kind: share of the step time (all ranks), stacked per run.
    order = sorted(runs, key=lambda r: (r["resolution"], r["ranks"], r["layout"]))
    labels = [f"{r['layout']}\n{r['resolution']}" for r in order]
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(order) + 2), 4.5))
    bottom = np.zeros(len(order))
    for k, kind in enumerate(KINDS):
        share = np.array([100 * float(np.sum(r["comm_kind"][kind]) / max(np.sum(r["step"]), 1e-12)) for r in order])
        if np.any(share > 0):
            ax.bar(range(len(order)), share, bottom=bottom, label=kind.replace("_", "-"), color=plt.get_cmap("Set2")(k))
            bottom += share
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylim(0, max(5.0, float(bottom.max()) * 1.15))
    ax.set_ylabel("share of the step time (%)")
    ax.set_title("Communication per collective (sum over ranks and steps)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "comm.png"), dpi=120)
    plt.close(fig)

    # Memory per rank: host RSS and device memory apart, axes from 0.
    has_device = any(np.any(r["dev"]) for r in order)
    fig, axes = plt.subplots(1, 2 if has_device else 1, figsize=(max(8, 0.55 * len(order) + 2) * (1.6 if has_device else 1), 4.5),
                             squeeze=False)
    panels = [("rss", "peak host RSS per rank (GiB)")] + ([("dev", "peak device memory per rank (GiB)")] if has_device else [])
    for ax, (key, title) in zip(axes[0], panels):
        for i, r in enumerate(order):
            mem = np.asarray(r[key]) / 2**30
            ax.scatter([i] * len(mem), mem, s=14, color=colour.get(family(r["layout"]), "black"))
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylim(0, max(0.1, max(float(np.max(np.asarray(r[key]))) for r in order) / 2**30 * 1.15))
        ax.set_ylabel("GiB")
        ax.set_title(title.replace(" (GiB)", "") + ": one dot per rank")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "memory.png"), dpi=120)
    plt.close(fig)
    shares = [100 * float(np.sum(r["comm"]) / max(np.sum(r["step"]), 1e-12)) for r in runs]

    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(f"Runs in `{os.path.basename(args.metrics)}` (commit {runs[0]['commit']}, host {runs[0]['hosts'].split(',')[0]}).\n\n")
        f.write("| run | command | resolution | ranks | layout | mean step (s) | speedup | efficiency | comm share | "
                "latency (s) | images/s | max RSS (GiB) | max device (GiB) |\n")
        f.write("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
        for r, share in sorted(zip(runs, shares), key=lambda x: (x[0]["resolution"], x[0]["ranks"], x[0]["layout"])):
            base = single.get(r["resolution"])
            speed = f"{base / r['mean_step']:.2f}x" if base else "-"
            eff = f"{100 * base / r['mean_step'] / r['ranks']:.0f}%" if base else "-"
            f.write(f"| {r['id']} | {r['command']} | {r['resolution']} | {r['ranks']} | {r['layout']} | {r['mean_step']:.4f} | "
                    f"{speed} | {eff} | {share:.1f}% | {r['latency']:.3f} | {r['ips']:.3f} | {np.max(r['rss']) / 2**30:.2f} | "
                    f"{np.max(r['dev']) / 2**30:.2f} |\n")
    print(f"wrote scaling.png, timeline.png, comm.png, memory.png and summary.md to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
