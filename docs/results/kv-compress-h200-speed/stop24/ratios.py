"""Each row's median t/s over the standard cache's (no extra flags) of the same test: python3 ratios.py"""

import csv

with open("bench.csv", newline="") as f:
    rows = list(csv.DictReader(f))
base = {r["test"]: float(r["median_ts"]) for r in rows if not r["extra"]}
print("ratio of median t/s to the standard f16 cache of the same build and run (computed from bench.csv)")
for r in rows:
    if r["extra"]:
        ts = float(r["median_ts"])
        print(f"{r['test']:16s} {r['extra']:50s} {ts:8.2f} t/s  {ts / base[r['test']]:.3f}x")
