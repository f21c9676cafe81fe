"""PPL ratio to the base and KV MiB in use at exit, per configuration, from ppl.csv: python3 ratios.py"""

import csv

with open("ppl.csv", newline="") as f:
    rows = list(csv.DictReader(f))
print("ppl_ratio and kv_used_mib per configuration (from ppl.csv)")
for r in rows:
    used = f"{float(r['kv_used_mib']):.2f}" if r["kv_used_mib"] else "-"
    print(f"{r['extra'] or '-':75s} ppl_ratio {float(r['ppl_ratio']):.4f}  kv_used_mib {used}")
