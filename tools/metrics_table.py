#!/usr/bin/env python3
"""One row per run of a pardit metrics file (its /run_index, docs/metrics.md) as CSV.

    "$(launch/install.sh --plots | tail -n 1)/bin/python" tools/metrics_table.py runs.h5 --out runs.csv

Columns: id, date, command, model, dtype, device, height, width, images, steps, world_size, the four
degrees, total_latency_s, mean_step_time_s, images_per_second, peak_host_rss_max, peak_device_memory_max;
and when the file holds runs of a queue (--prompt-file): queue_index, replica_group and queue_wait_s of each
image's run, and images_per_hour and device_seconds_per_image of the queue job's run (command "queue").
Needs h5py (launch/install.sh --plots). In pandas the same table is one line:
    pd.DataFrame(h5py.File("runs.h5", "r")["run_index"][()])
"""
import argparse
import csv
import sys

import h5py


def rows(path):
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        sys.exit(f"metrics_table.py: {path}: not a readable HDF5 file ({e})")
    with f:
        if f.attrs.get("schema") not in ("pardit-metrics", b"pardit-metrics"):
            sys.exit(f"metrics_table.py: {path}: not a pardit metrics file (no schema attribute 'pardit-metrics')")
        if "run_index" not in f:
            sys.exit(f"metrics_table.py: {path}: no /run_index (its runs predate it; the next run appended adds it)")
        table = f["run_index"][()]
        names = list(table.dtype.names)
        queue = {}  # run id -> its "queue" group's attributes
        for rid, run in f["runs"].items():
            if "queue" in run:
                queue[rid] = {k: float(v) for k, v in run["queue"].attrs.items()}
    extra = []
    if queue:
        extra = ["queue_index", "replica_group", "queue_wait_s", "images_per_hour", "device_seconds_per_image"]
    for r in table:
        row = {n: (v.decode() if isinstance(v, bytes) else v.item()) for n, v in zip(names, r)}
        q = queue.get(row["id"], {})
        row.update({"queue_index": q.get("index", ""), "replica_group": q.get("replica_group", ""),
                    "queue_wait_s": q.get("queue_wait_s", ""), "images_per_hour": q.get("images_per_hour", ""),
                    "device_seconds_per_image": q.get("device_seconds_per_image", "")} if extra else {})
        for k in ("queue_index", "replica_group"):
            if isinstance(row.get(k), float):
                row[k] = int(row[k])
        yield row, names + extra


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", help="a pardit metrics file (--metrics FILE.h5)")
    p.add_argument("--out", help="CSV file to write (default: standard output)")
    args = p.parse_args()
    out = open(args.out, "w", newline="") if args.out else sys.stdout
    writer = None
    n = 0
    for row, names in rows(args.metrics):
        if writer is None:
            writer = csv.DictWriter(out, fieldnames=list(names))
            writer.writeheader()
        writer.writerow(row)
        n += 1
    if args.out:
        out.close()
        print(f"wrote {n} run(s) to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
