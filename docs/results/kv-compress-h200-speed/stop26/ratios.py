"""Each row's median t/s over the standard f16 cache's (no extra flags, f16 K/V) of the same test, for the f16 matrix
(bench.csv) and the INT8-pages matrix (int8-pages/bench.csv), which share that base (one store, one build):
python3 ratios.py"""

import csv


def read(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


rows = read("bench.csv") + read("int8-pages/bench.csv")
base = {r["test"]: float(r["median_ts"]) for r in rows if not r["extra"] and r["type_k"] == "f16"}
print("ratio of median t/s to the standard f16 cache of the same build and run (computed from the bench.csv files)")
for r in rows:
    if r["extra"] or r["type_k"] != "f16":
        ts = float(r["median_ts"])
        kv = f"{r['type_k']}/{r['type_v']}"
        print(f"{r['test']:16s} {kv:13s} {r['extra']:42s} {ts:8.2f} t/s  {ts / base[r['test']]:.3f}x")
