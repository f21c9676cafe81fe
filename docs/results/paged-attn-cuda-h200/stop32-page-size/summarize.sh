#!/usr/bin/env bash
# us/run of each perf case in this folder's logs (one line per case, the paged op's page size beside it) and each
# paged f16 case's ratio to FLASH_ATTN_EXT's f16 case of the same kv and nb (speed: EXT us over paged us).
#   ./summarize.sh > summary.txt
cd "$(dirname "$0")"
awk '
/FLASH_ATTN_EXT\(/ && /type_K=f16/ && !/prec_v/ {
    match($0, /kv=[0-9]+,nb=[0-9]+/); key = substr($0, RSTART, RLENGTH)
    us = $0; sub(/.*runs - */, "", us); sub(/ us\/run.*/, "", us)
    if (!(key in ext)) { ext[key] = us; order_e[++ne] = key }
}
/FLASH_ATTN_PAGED\(/ && /seq_runs=0/ {
    match($0, /kv=[0-9]+,nb=[0-9]+/); key = substr($0, RSTART, RLENGTH)
    match($0, /page_size=[0-9]+,type_KV=[a-z0-9_]+/); cfg = substr($0, RSTART, RLENGTH)
    us = $0; sub(/.*runs - */, "", us); sub(/ us\/run.*/, "", us)
    paged[++np] = key " " cfg " " us
}
END {
    print "FLASH_ATTN_EXT f16 (hsk=128, GQA 4, 8 KV heads), us/run:"
    for (i = 1; i <= ne; i++) printf "  %-20s %10.2f\n", order_e[i], ext[order_e[i]]
    print "FLASH_ATTN_PAGED (n_seq=1), us/run and EXT f16 us over it:"
    for (i = 1; i <= np; i++) {
        split(paged[i], f, " ")
        r = (f[1] in ext) ? sprintf("%.3fx", ext[f[1]] / f[3]) : "-"
        printf "  %-20s %-28s %10.2f  %s\n", f[1], f[2], f[3], r
    }
}' page-size-ext.log page-size-perf.log
