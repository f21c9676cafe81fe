"""PPL ratio to the f16 base, mean KLD and KV MiB (allocated, and the paged cache's pages in use at exit) per
configuration, from ppl.csv: python3 ratios.py"""

import csv

with open("ppl.csv", newline="") as f:
    rows = list(csv.DictReader(f))
print("per configuration (from ppl.csv; base: the standard f16 cache of the same run)")
for r in rows:
    used = f"{float(r['kv_used_mib']):.2f}" if r["kv_used_mib"] else "-"
    name = f"{r['type_k']} {r['extra'] or '(standard cache)'}"
    print(
        f"{name:80s} ppl_ratio {float(r['ppl_ratio']):.4f} +- {float(r['ppl_ratio_err']):.4f}"
        f"  kld {float(r['kld_mean']):.5f}  kv_mib {float(r['kv_mib']):.2f}  kv_used_mib {used}"
    )
