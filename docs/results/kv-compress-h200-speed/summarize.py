"""Ratios and compression phases of this folder's runs, computed from their files (no figure typed by hand).

    python3 summarize.py [--phases DIR] [--ceiling R] [--amortized EVERY] [--batched CSV ...]
                         [--over NAME EXTRA CONFIG ...] [--perf DIR] [BENCH.csv ...]

Each row's median t/s is divided by that of the standard f16 cache (no extra flags, f16 K/V) of the same test, in
its own CSV or else in the first other CSV that has one: pass only CSVs of one machine and build, as each stop's
NOTES.md says. With --phases, each compression's phases (metric, selection, eviction, compaction) are summed up from the
`d*-phases.txt` files there (the cache's -v debug lines, written by `scripts/gpu-check kv-compress-phases`).
With --batched, llama-batched-bench's aggregate decoding speed (S_TG) of each row of each batched.csv over the full
pool's (the row without --kv-compress, in its own CSV or else the first CSV that has one), and of each configuration
over the same configuration in the first CSV; each --over NAME EXTRA CONFIG adds its S_TG over that of the row with
those extra flags and that configuration (e.g. the paged cache's 15 sequences of the kept size: the ceiling). With
--perf, the us/run of the op's perf cases in the perf-*.log files there (`scripts/gpu-check vec-threshold`), each
limit's over the series' (perf-series.log), flash_attn_ext's beside. With --amortized EVERY (and --phases, bench
CSVs), the costliest compression logged at each depth over the time to decode EVERY tokens with a compressed cache at
that depth (the issue's bound on compression overhead amortized over decoding)."""

import argparse
import csv
import re
import statistics
import sys
from pathlib import Path

PHASE = re.compile(r"(\d+) slots scored; metric ([\d.]+) ms, selection ([\d.]+) ms, eviction ([\d.]+) ms")
COMPACT = re.compile(r"compaction ([\d.]+) ms")
GATHER = re.compile(r"read-back and gather of the scores: ([\d.]+) ms")  # part of the selection (logged from stop 28)


def read_rows(paths: list[str]) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for path in paths:
        with open(path, newline="") as f:
            rows += [dict(r, file=path) for r in csv.DictReader(f)]
    return rows


def print_ratios(rows: list[dict[str, str]]) -> None:
    # a row's base: the standard f16 cell of its own CSV, else the first of the other CSVs
    own = {(r["file"], r["test"]): float(r["median_ts"]) for r in rows if not r["extra"] and r["type_k"] == "f16"}
    other: dict[str, float] = {}
    for (_, test), ts in own.items():
        other.setdefault(test, ts)
    print("median t/s and its ratio to the standard f16 cache of the same test (same store and build)")
    for r in rows:
        ts = float(r["median_ts"])
        kv = f"{r['type_k']}/{r['type_v']} fa={r['fa']}"
        extra = r["extra"] or "(standard cache)"
        base = own.get((r["file"], r["test"]), other.get(r["test"]))
        ratio = f"{ts / base:.3f}x" if base else "(no f16 base)"
        print(f"  {r['test']:14s} {kv:20s} {extra:90s} {ts:8.2f}  {ratio}")


def print_ceilings(rows: list[dict[str, str]], rate: int) -> None:
    # a cache compressed `rate` times from depth d keeps d / rate slots per head: it decodes at best as fast as a full
    # cache at that depth (same CSV, same cache kind)
    cells = {(r["file"], r["extra"], int(r["n_depth"])): float(r["median_ts"]) for r in rows if r["n_gen"] != "0"}
    print(f"the ceiling of {rate}x compression: t/s at depth d / {rate} over t/s at depth d, same CSV and cache")
    for (file, extra, depth), ts in sorted(cells.items()):
        kept = cells.get((file, extra, depth // rate))
        if kept and depth % rate == 0:
            cache = extra or "(standard cache)"
            print(f"  {file:28s} {cache:20s} depth {depth:6d}: {kept:8.2f} / {ts:8.2f} = {kept / ts:.3f}x")


def logged_phases(text: str) -> tuple[list[tuple[float, ...]], list[float]]:
    """Each compression's (slots, metric, selection, eviction) and each compaction, in ms, in the log's order."""
    rows = [tuple(float(x) for x in m.groups()) for m in PHASE.finditer(text)]
    return rows, [float(m.group(1)) for m in COMPACT.finditer(text)]


def print_phases(path: Path) -> None:
    text = path.read_text()
    rows, compaction = logged_phases(text)
    if not rows:
        print(f"{path}: no compression logged")
        return
    metric = [r[1] for r in rows]
    selection = [r[2] for r in rows]
    eviction = [r[3] for r in rows]
    total = sum(metric) + sum(selection) + sum(eviction) + sum(compaction)
    print(f"{path}: {len(rows)} compressions, slots scored {int(rows[0][0])} to {int(rows[-1][0])}")
    print(
        f"  median ms: metric {statistics.median(metric):.1f}, selection {statistics.median(selection):.1f}, "
        f"eviction {statistics.median(eviction):.1f}, compaction {statistics.median(compaction):.1f}; "
        f"shares of the logged time: metric {sum(metric) / total:.3f}, selection {sum(selection) / total:.3f}, "
        f"eviction {sum(eviction) / total:.3f}, compaction {sum(compaction) / total:.3f}"
    )
    gather = [float(m.group(1)) for m in GATHER.finditer(text)]
    if gather:
        print(f"  of the selection, the scores' read-back and gather: median {statistics.median(gather):.1f} ms")


def compression_totals(path: Path) -> list[float]:
    """Each logged compression's metric + selection + eviction + compaction, in ms, in the log's order."""
    rows, compaction = logged_phases(path.read_text())
    if len(compaction) != len(rows):
        sys.exit(f"{path}: {len(rows)} compressions but {len(compaction)} compactions logged")
    return [r[1] + r[2] + r[3] + c for r, c in zip(rows, compaction, strict=True)]


def print_amortized(folder: Path, rows: list[dict[str, str]], every: int) -> None:
    # the costliest compression logged at a depth (the phases step logs KV-Compress on f16 pages), against decoding
    # `every` tokens of an f16 cache compressed by KV-Compress at that depth
    print(
        f"compression amortized over decoding: the costliest compression logged at a depth over the time to decode "
        f"{every} tokens (one compression per {every}) with a compressed cache at that depth (tg rows, same machine)"
    )
    for path in sorted(folder.glob("d*-phases.txt")):
        depth = int(re.match(r"d(\d+)-", path.name).group(1))
        worst = max(compression_totals(path), default=0.0)
        for r in rows:
            compressed_f16 = "--kv-compress kvc" in r["extra"] and r["type_k"] == "f16"
            if r["n_gen"] == "0" or int(r["n_depth"]) != depth or not compressed_f16:
                continue
            decode_ms = every / float(r["median_ts"]) * 1000.0
            print(
                f"  depth {depth:6d} {r['type_k']}/{r['type_v']} {r['extra']:60s} compression {worst:7.1f} ms, "
                f"decoding {every} tokens {decode_ms:8.1f} ms: {worst / decode_ms:.4f}"
            )


def print_batched(paths: list[str], over: list[list[str]]) -> None:
    rows = [r for r in read_rows(paths) if r["status"] == "ok" and r["speed_tg"]]
    refs: list[tuple[str, float]] = []
    for name, extra, config in over:
        match = [float(r["speed_tg"]) for r in rows if r["extra"] == extra and r["config"] == config]
        if not match:
            sys.exit(f"--over {name}: no row with extra {extra!r} and configuration {config!r}")
        refs.append((name, match[0]))
    full: dict[str, float] = {}
    for r in rows:
        if "--kv-compress" not in r["extra"]:
            full.setdefault(r["file"], float(r["speed_tg"]))
    first_full = next(iter(full.values()), None)
    first_of: dict[str, float] = {}
    names = "".join(f", over {name}" for name, _ in refs)
    print(
        f"llama-batched-bench S_TG (t/s), over the full pool's, and over the same configuration in the first CSV{names}"
    )
    for r in rows:
        tg = float(r["speed_tg"])
        base = full.get(r["file"], first_full)
        first_of.setdefault(r["extra"], tg)
        vs_full = f"{tg / base:.3f}x" if base else "-"
        vs_first = tg / first_of[r["extra"]]
        vs_refs = "".join(f"  {tg / ref:.3f}x" for _, ref in refs)
        print(f"  {r['file']:60s} {r['extra']:120s} {r['config']:14s} {tg:8.2f}  {vs_full}  {vs_first:.3f}x{vs_refs}")


PERF = re.compile(r"(FLASH_ATTN_\w+)\((.*?)\):\s+\d+ runs -\s+([\d.]+) us/run")


def print_perf(folder: Path) -> None:
    def cases(path: Path) -> dict[str, float]:
        # keyed by kv and sequence count: the paged op's n_seq, flash_attn_ext's streams (nr23=[gqa,n_seq])
        out: dict[str, float] = {}
        for m in PERF.finditer(path.read_text()):
            fields = dict(kv.split("=", 1) for kv in re.split(r",(?![^\[]*\])", m.group(2)))
            n_seq = fields["n_seq"] if "n_seq" in fields else fields["nr23"].strip("[]").split(",")[1]
            out[f"kv={fields['kv']} n_seq={n_seq}"] = float(m.group(3))
        return out

    series = cases(folder / "perf-series.log")
    ext = cases(folder / "perf-ext.log") if (folder / "perf-ext.log").is_file() else {}
    others = {
        p.stem.removeprefix("perf-"): cases(p)
        for p in sorted(folder.glob("perf-*.log"))
        if p.stem not in ("perf-series", "perf-ext")
    }
    print(
        f"{folder}: us/run of the paged op's decode cases under the series' limit and under forced limits "
        "(ratio: over the series'), flash_attn_ext at the same shape"
    )
    for key, us in series.items():
        line = f"  {key:22s} series {us:8.2f}"
        for limit, other in others.items():
            v = other.get(key)
            if v is not None:
                line += f"  {limit}: {v:8.2f} ({v / us:.3f}x)"
        if key in ext:
            line += f"  flash_attn_ext {ext[key]:8.2f}"
        print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", nargs="*", help="bench.csv files of one run (pyharness report)")
    parser.add_argument("--phases", type=Path, help="folder of d*-phases.txt files")
    parser.add_argument("--ceiling", type=int, metavar="R", help="also print the ceilings of R-fold compression")
    parser.add_argument("--batched", nargs="+", default=[], metavar="CSV", help="batched.csv files (pyharness report)")
    parser.add_argument(
        "--over",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "EXTRA", "CONFIG"),
        help="with --batched: also S_TG over the row with these extra flags and configuration",
    )
    parser.add_argument(
        "--amortized",
        type=int,
        metavar="EVERY",
        help="with --phases and bench CSVs: the costliest logged compression at each depth over decoding EVERY tokens",
    )
    parser.add_argument("--perf", type=Path, help="folder of perf-*.log files (scripts/gpu-check vec-threshold)")
    args = parser.parse_args()
    for path in args.bench + args.batched:
        if not Path(path).is_file():
            print(f"summarize.py: {path}: no such file", file=sys.stderr)
            return 2
    rows = read_rows(args.bench)
    if rows:
        print_ratios(rows)
    if args.ceiling:
        print_ceilings(rows, args.ceiling)
    if args.phases:
        for p in sorted(args.phases.glob("d*-phases.txt")):
            print_phases(p)
    if args.amortized:
        if not args.phases:
            print("summarize.py: --amortized needs --phases", file=sys.stderr)
            return 2
        print_amortized(args.phases, rows, args.amortized)
    if args.batched:
        print_batched(args.batched, args.over)
    if args.perf:
        print_perf(args.perf)
    return 0


if __name__ == "__main__":
    sys.exit(main())
