"""Stop 27's numbers, computed from the files of this folder: python3 summary.py > summary.txt

- each row's median t/s over the standard f16 cache's (no extra flags, f16 K/V) of the same test and matrix
  (pp/bench.csv, int8/bench.csv: one store, one build);
- each compression's phases from the -v logs (phases/d*-phases.txt, lines of the cache's debug log)."""

import csv
import re
import statistics
from pathlib import Path


def ratios(path: str) -> None:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    base = {r["test"]: float(r["median_ts"]) for r in rows if not r["extra"] and r["type_k"] == "f16"}
    print(f"{path}: median t/s and its ratio to the standard f16 cache of the same test")
    for r in rows:
        ts = float(r["median_ts"])
        kv = f"{r['type_k']}/{r['type_v']} fa={r['fa']}"
        extra = r["extra"] or "(standard cache)"
        print(f"  {r['test']:14s} {kv:20s} {extra:90s} {ts:8.2f}  {ts / base[r['test']]:.3f}x")


PHASE = re.compile(r"(\d+) slots scored; metric ([\d.]+) ms, selection ([\d.]+) ms, eviction ([\d.]+) ms")
COMPACT = re.compile(r"compaction ([\d.]+) ms")


def phases(path: Path) -> None:
    text = path.read_text()
    rows = [tuple(float(x) for x in m.groups()) for m in PHASE.finditer(text)]
    compaction = [float(m.group(1)) for m in COMPACT.finditer(text)]
    if not rows:
        print(f"{path}: no compression logged")
        return
    metric = [r[1] for r in rows]
    rest = [r[2] + r[3] for r in rows]
    print(f"{path}: {len(rows)} compressions, slots scored {int(rows[0][0])} to {int(rows[-1][0])}")
    print(
        f"  metric median {statistics.median(metric):.1f} ms; selection + eviction median "
        f"{statistics.median(rest):.1f} ms; compaction median {statistics.median(compaction):.1f} ms; "
        f"metric share of the logged time {sum(metric) / (sum(metric) + sum(rest) + sum(compaction)):.3f}"
    )


ratios("pp/bench.csv")
ratios("int8/bench.csv")
for p in sorted(Path("phases").glob("d*-phases.txt")):
    phases(p)
