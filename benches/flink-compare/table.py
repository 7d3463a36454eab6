#!/usr/bin/env python3
"""Prints the comparison table of a benches/flink-compare run from the logs in DIR (.out/).

Reads `RESULT <backend> <workload> <value>` and `RESULT_CPU <backend> <workload> <ops/s>`
lines (the Java harness, peer-bench with PEER_BENCH_RESULT_LINES=1, the mmap checkpoint hook) and the human lines of
`cargo bench -p checkpoint --bench checkpoint`. Ratios are Flowstate over Flink for rates and
Flink over Flowstate for times: above 1 means Flowstate is faster.
"""
import os
import re
import sys

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), ".out")
res = {}
cpu = {}


def read(name):
    path = os.path.join(out, name)
    return open(path).read() if os.path.exists(path) else ""


for name in ("flink-workloads.txt", "flowstate-workloads.txt", "flink-checkpoint.txt",
             "flink-rescale.txt", "flowstate-mmap-checkpoint.txt"):
    for line in read(name).splitlines():
        f = line.split()
        if len(f) == 4 and f[0] == "RESULT":
            res[(f[1], f[2])] = float(f[3])
        elif len(f) == 4 and f[0] == "RESULT_CPU":
            cpu[(f[1], f[2])] = float(f[3])

# The mmap checkpoint benchmark (cargo bench -p integration-tests --bench mmap_checkpoint) prints
# `RESULT mmap checkpoint_full_s ...`: its names, in the harness's.
for theirs, ours in (("checkpoint_full_s", "ckpt_full_s"), ("checkpoint_full_mb", "ckpt_full_mb"),
                     ("checkpoint_incremental_s", "ckpt_delta_s"),
                     ("checkpoint_incremental_mb", "ckpt_delta_mb"), ("restore_s", "restore_s"),
                     ("rescale_2_to_3_s", "rescale_2_to_3_s"),
                     ("rescale_3_to_2_s", "rescale_3_to_2_s")):
    if ("mmap", theirs) in res:
        res[("flowstate-mmap", ours)] = res[("mmap", theirs)]

# The heap checkpoint benchmark prints sentences; take its figures from them.
ck = read("flowstate-checkpoint.txt")
for key, pattern in (
    ("ckpt_full_s", r"full checkpoint \(median of 3\):.*?total ([0-9.]+) s"),
    ("ckpt_full_mb", r"full checkpoint \(median of 3\):.*?, ([0-9.]+) MB written"),
    ("ckpt_delta_s", r"incremental after changing 1% of keys spread[^:]*:.*?total ([0-9.]+) s\)"),
    ("ckpt_delta_mb", r"incremental after changing 1% of keys spread[^:]*: ([0-9.]+) MB"),
    # "restore into registered states" (older runs printed "restore: all key groups").
    ("restore_s", r"restore(?: into registered states)?: all key groups ([0-9.]+) s"),
):
    m = re.search(pattern, ck)
    if m:
        res[("flowstate-heap", key)] = float(m.group(1))

BACKENDS = ("flink-hashmap", "flink-rocksdb", "flowstate-heap", "flowstate-mmap")
WORKLOADS = (
    ("noop", "no-op (set key only)"),
    ("value_get", "value get"),
    ("value_update", "value update"),
    ("value_add", "value add"),
    ("list_add", "list add"),
    ("list_append", "list append"),
    ("list_get", "list get"),
    ("list_add_all", "list add_all(100)"),
    ("map_get", "map get"),
    ("map_contains", "map contains"),
    ("map_iterate", "map iterate(10)"),
    ("map_put", "map put"),
)


def rate(x):
    if x is None:
        return "-"
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.0f}k"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "-"
    return f"**{a / b:.2f}**" if a / b < 1 else f"{a / b:.2f}"


def workload_header():
    print("| workload | Flink HashMap | Flink RocksDB | Flowstate heap | Flowstate mmap | heap / HashMap | mmap / RocksDB |")
    print("|---|---|---|---|---|---|---|")


def rate_table(values):
    """One row per workload: each backend's rate from `values`, Flowstate's ratios."""
    workload_header()
    for key, label in WORKLOADS:
        v = [values.get((b, key)) for b in BACKENDS]
        print(f"| {label} | {' | '.join(rate(x) for x in v)} | {ratio(v[2], v[0])} | {ratio(v[3], v[1])} |")


print(read("header.txt").strip())
print()
print("State workloads, ops/s (median of the rounds; Flink after a warm-up round):")
print()
rate_table(res)

print()
print("The same workloads, ops per second of the whole process's CPU time (all threads: Java's GC")
print("and JIT, RocksDB's and the mmap engine's background work included; less dependent on the")
print("machine's load than wall time):")
print()
rate_table(cpu)

print()
print("Per operation net of the framework (wall ns per op minus wall ns of the no-op loop):")
print()
workload_header()


def net(b, key):
    x, n = res.get((b, key)), res.get((b, "noop"))
    if not x or not n:
        return None
    return max(1e9 / x - 1e9 / n, 0.0)


for key, label in WORKLOADS[1:]:
    v = [net(b, key) for b in BACKENDS]
    cells = " | ".join("-" if x is None else f"{x:.0f}" for x in v)
    # Times: Flink over Flowstate, above 1 means Flowstate spends less.
    print(f"| {label} | {cells} | {ratio(v[0], v[2])} | {ratio(v[1], v[3])} |")

print()
print("Checkpoints (seconds; local disk; ratios are Flink's time over Flowstate's):")
print()
print("| case | Flink HashMap | Flink RocksDB | Flowstate heap | Flowstate mmap | HashMap / heap | RocksDB / heap | RocksDB / mmap |")
print("|---|---|---|---|---|---|---|---|")
for key, label in (("ckpt_full_s", "full checkpoint"), ("ckpt_delta_s", "1% incremental"),
                   ("restore_s", "restore (mmap: at parallelism 2)")):
    v = [res.get((b, key)) for b in BACKENDS]
    cells = " | ".join("-" if x is None else f"{x:.3f}" for x in v)
    print(f"| {label} | {cells} | {ratio(v[0], v[2])} | {ratio(v[1], v[2])} | {ratio(v[1], v[3])} |")
for key, label in (("ckpt_full_mb", "full checkpoint MB"), ("ckpt_delta_mb", "1% incremental MB")):
    v = [res.get((b, key)) for b in BACKENDS]
    print(f"| {label} | {' | '.join('-' if x is None else f'{x:.1f}' for x in v)} | | | |")

# Restore and rescale in the same shape on both sides (`FlinkStateBench rescale`, mmap_checkpoint):
# a job of parallelism 2, restored at 2, rescaled to 3 and back to 2; the slowest subtask's time.
RESCALE = ("flink-rocksdb", "flink-rocksdb-ingest", "flowstate-mmap")
if any((b, "rescale_2_to_3_s") in res for b in RESCALE):
    print()
    print("Restore and rescale of a job of parallelism 2 (seconds, slowest subtask, subtasks side by")
    print("side; ratios are Flink's time over mmap's). Flink: 128 key groups, RocksDB incremental")
    print("handles, subtask i restores the handles that intersect its range; mmap: mmap_checkpoint.")
    print()
    print("| case | Flink RocksDB | Flink RocksDB, ingest-DB mode | Flowstate mmap | RocksDB / mmap | ingest-DB / mmap |")
    print("|---|---|---|---|---|---|")
    for key, mmap_key, label in (("restore_p2_s", "restore_s", "restore at parallelism 2"),
                                 ("rescale_2_to_3_s", "rescale_2_to_3_s", "rescale 2 -> 3"),
                                 ("rescale_3_to_2_s", "rescale_3_to_2_s", "rescale 3 -> 2")):
        v = [res.get(("flink-rocksdb", key)), res.get(("flink-rocksdb-ingest", key)),
             res.get(("flowstate-mmap", mmap_key))]
        cells = " | ".join("-" if x is None else f"{x:.3f}" for x in v)
        print(f"| {label} | {cells} | {ratio(v[0], v[2])} | {ratio(v[1], v[2])} |")
    for key, label in (("restore_p2", "restore at 2"), ("rescale_2_to_3", "rescale 2 -> 3"),
                       ("rescale_3_to_2", "rescale 3 -> 2")):
        for suffix, what in (("_total_s", "sum over subtasks"), ("_cpu_s", "CPU, all threads")):
            v = [res.get((b, key + suffix)) for b in RESCALE[:2]]
            if any(x is not None for x in v):
                cells = " | ".join("-" if x is None else f"{x:.3f}" for x in v)
                print(f"| {label}, {what} | {cells} | - | | |")
    for key, label in (("p2_ckpt_full_mb", "checkpoint at 2, full MB"),
                       ("p2_ckpt_delta_mb", "checkpoint at 2, 1% incremental MB"),
                       ("p3_ckpt_full_mb", "checkpoint at 3 after the rescale, MB")):
        v = [res.get((b, key)) for b in RESCALE[:2]]
        if any(x is not None for x in v):
            cells = " | ".join("-" if x is None else f"{x:.1f}" for x in v)
            print(f"| {label} | {cells} | - | | |")

if not any(b == "flowstate-mmap" and k.startswith(("ckpt", "restore")) for b, k in res):
    print()
    print("Flowstate mmap checkpoints: not measured in this run (no mmap checkpoint benchmark in this tree; see `run`).")
