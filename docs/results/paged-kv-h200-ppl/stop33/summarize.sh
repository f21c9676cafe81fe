#!/bin/sh
# The figures of this folder, from its files: perplexity and KLD of each cell (series/ and wip0002/ ppl.csv), and the
# paged op's us/run per case in the five perf logs of wip0002/ (series and wip 0002 builds, alternating).
cd "$(dirname "$0")"
for d in series wip0002; do
    echo "## $d: variant, ctx, extra, ppl, kld_mean, kv_mib, kv_used_mib"
    python3 -c "
import csv, sys
for r in csv.DictReader(open('$d/ppl.csv')):
    print(r['variant'], r['ctx'], repr(r['extra']), r['ppl'], r['kld_mean'], r['kv_mib'], r['kv_used_mib'])
"
done
echo "## wip0002 perf (FLASH_ATTN_PAGED, hsk=128, nh=8, nr=4, kv=16384, page_size=64): log, type_KV, nb, us/run"
for f in wip0002/perf-series.log wip0002/perf-wip0002.log wip0002/perf-series-2.log wip0002/perf-wip0002-2.log wip0002/perf-series-3.log; do
    grep "us/run" "$f" | sed -E "s#.*nb=([0-9]+),.*type_KV=([a-z0-9_]+),.*runs - +([0-9.]+) us/run.*#$(basename "$f" .log) \2 \1 \3#"
done
