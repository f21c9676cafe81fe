"""KV-Compress with and without a layer cap of 1, per budget, from ppl.csv: python3 ratios.py

Prints the PPL ratio to the base (the same run's standard f16 cache), the mean KLD and the KV MiB in use at exit of
each configuration, then per budget the capped run's PPL ratio over the uncapped one's.
"""

import csv
import re

with open("ppl.csv", newline="") as f:
    rows = list(csv.DictReader(f))

print("per configuration (from ppl.csv)")
by_budget: dict[tuple[str, bool], dict[str, str]] = {}
for r in rows:
    used = f"{float(r['kv_used_mib']):.2f}" if r["kv_used_mib"] else "-"
    print(
        f"{r['extra'] or '-':100s} ppl_ratio {float(r['ppl_ratio']):.4f} +- {float(r['ppl_ratio_err']):.4f}"
        f"  kld {float(r['kld_mean']):.5f}  kv_used_mib {used}"
    )
    m = re.search(r"--kv-compress-budget (\d+)", r["extra"])
    if m:
        by_budget[(m.group(1), "--kv-compress-layer-cap" in r["extra"])] = r

print("\ncapped over uncapped, per budget")
for budget in sorted({b for b, _ in by_budget}, key=int, reverse=True):
    free, capped = by_budget.get((budget, False)), by_budget.get((budget, True))
    if free and capped:
        ratio = float(capped["ppl"]) / float(free["ppl"])
        print(
            f"budget {budget:>5s}: ppl_ratio {float(free['ppl_ratio']):.4f} -> {float(capped['ppl_ratio']):.4f}"
            f" (capped / uncapped {ratio:.4f}); kld {float(free['kld_mean']):.5f} -> {float(capped['kld_mean']):.5f}"
        )
