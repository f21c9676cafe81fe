"""`pyharness report`: Markdown, CSV and PNG reports rendered from the results store, and from nothing else.

Runs are grouped by environment: hardware (CPU, GPU, driver, CUDA) and upstream commit, and, for patched builds,
the patch-series hash. Each group gets its own tables, headed by the hardware and commits they came from; when a
report spans several groups it opens with a warning block saying so, and never compares numbers across groups.

Throughput tables follow upstream's compare-llama-bench.py (model, test, baseline t/s, candidate t/s, speedup), but
each t/s is the median over all stored samples with their standard deviation. Perplexity tables show PPL ± error,
the PPL ratio to the KLD base, mean KLD and same-top-token %. When a configuration was run more than once (same
configuration hash), the latest successful run is used.
"""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyharness.batched_report import batched_runs, batched_section, table_rows
from pyharness.errors import HarnessError
from pyharness.host import hardware_key
from pyharness.paged_report import is_paged_metric, paged_sections
from pyharness.retrieval_report import plot_retrieval, retrieval_rows, retrieval_section, summarize
from pyharness.store import Store

BUSY_THRESHOLD = 0.10  # share of the machine's CPU used by other processes above which a bench is flagged


@dataclass
class Group:
    """Runs comparable with each other: same hardware, same upstream commit, at most one patch series."""

    hardware: str
    upstream_commit: str
    series_hash: str  # of the patched runs in the group ("none" when there are none)
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def title(self) -> str:
        if self.series_hash != "none":
            series = f", patch series {self.series_hash[:12]}"
        elif any(r.get("variant") != "upstream" for r in self.runs):
            series = ", empty patch series (patched = upstream source)"
        else:
            series = ""
        return f"{self.hardware} — upstream {self.upstream_commit[:12]}{series}"


@dataclass
class Report:
    markdown: str
    csv: dict[str, str]
    groups: list[Group]
    bench_rows: list[dict[str, Any]]
    ppl_rows: list[dict[str, Any]]
    warnings: list[str]
    retrieval_rows: list[dict[str, Any]] = field(default_factory=list)  # retrieval_report.summarize() rows


# ------------------------------------------------------------------------------------------------ loading


def latest_runs(store: Store, matrix: str | None) -> list[dict[str, Any]]:
    runs = store.runs(matrix=matrix, status="ok")
    latest: dict[str, dict[str, Any]] = {}
    for run in runs:  # ordered by run_id
        latest[run["config_hash"]] = run
    return sorted(latest.values(), key=lambda r: r["run_id"])


def run_hardware(run: dict[str, Any]) -> str:
    return hardware_key(
        run.get("host_cpu") or "unknown CPU",
        run.get("gpu_name") or "",
        run.get("gpu_driver") or "",
        run.get("cuda_version") or "",
    )


def group_runs(runs: list[dict[str, Any]]) -> list[Group]:
    """Split runs into comparable groups; upstream runs join every group of their hardware and commit."""
    by_env: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_env[(run_hardware(run), run.get("upstream_commit") or "?")].append(run)
    groups: list[Group] = []
    for (hw, commit), members in by_env.items():
        series = sorted({r["series_hash"] for r in members if r.get("variant") != "upstream"})
        if not series:
            groups.append(Group(hw, commit, "none", members))
            continue
        for s in series:
            groups.append(
                Group(hw, commit, s, [r for r in members if r.get("variant") == "upstream" or r["series_hash"] == s])
            )
    return groups


def in_group(run: dict[str, Any], group: Group) -> bool:
    """Would `run` (of any status) have joined `group`: same hardware and upstream commit, and for a patched run the
    group's patch series."""
    if run_hardware(run) != group.hardware or (run.get("upstream_commit") or "?") != group.upstream_commit:
        return False
    return run.get("variant") == "upstream" or run.get("series_hash") == group.series_hash


def samples_of(store: Store, run_id: int, test_index: int) -> list[float]:
    rows = store.conn.execute(
        "SELECT ts FROM bench_sample WHERE run_id = ? AND test_index = ? ORDER BY sample_index", (run_id, test_index)
    ).fetchall()
    return [float(r["ts"]) for r in rows]


def _extra(run: dict[str, Any]) -> str:
    params = json.loads(run.get("params") or "{}")
    return " ".join(params.get("extra") or [])


def model_label(name: str | None) -> str:
    """A model as tables show it: its registry name, or the file name of a path."""
    name = name or "?"
    return Path(name).name if "/" in name else name


def _fa(value: Any) -> str:
    return {"1": "on", "0": "off", "-1": "auto", "2": "int8"}.get(str(value), str(value))


def bench_rows(store: Store, runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (run, llama-bench test) with the median and stdev over its samples."""
    rows = []
    for run in runs:
        if run["kind"] != "bench":
            continue
        tests = store.conn.execute(
            "SELECT * FROM bench_test WHERE run_id = ? ORDER BY test_index", (run["run_id"],)
        ).fetchall()
        for t in tests:
            ts = samples_of(store, run["run_id"], t["test_index"])
            rows.append(
                {
                    "run_id": run["run_id"],
                    "variant": run["variant"],
                    "backend": run["backend"],
                    "model": model_label(run["model_name"]),
                    "test": t["test"],
                    "n_prompt": t["n_prompt"],
                    "n_gen": t["n_gen"],
                    "n_depth": t["n_depth"],
                    "type_k": t["type_k"],
                    "type_v": t["type_v"],
                    "fa": _fa(t["flash_attn"]),
                    "threads": t["n_threads"],
                    "ngl": t["n_gpu_layers"],
                    "n_batch": t["n_batch"],
                    "n_ubatch": t["n_ubatch"],
                    "extra": _extra(run),
                    "n_samples": len(ts),
                    "median_ts": statistics.median(ts) if ts else None,
                    "stdev_ts": statistics.stdev(ts) if len(ts) > 1 else 0.0,
                    "mean_ts": statistics.fmean(ts) if ts else None,
                    "source_commit": run["source_commit"],
                    "series_hash": run["series_hash"],
                    "other_cpu": run.get("other_cpu"),
                }
            )
    return rows


def ppl_rows(store: Store, runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        if run["kind"] != "ppl":
            continue
        p = store.conn.execute("SELECT * FROM perplexity WHERE run_id = ?", (run["run_id"],)).fetchone()
        if p is None:
            continue
        k = store.conn.execute("SELECT * FROM kld WHERE run_id = ?", (run["run_id"],)).fetchone()
        params = json.loads(run["params"])
        base = json.loads(k["base_config"]) if k else None
        row = {
            "run_id": run["run_id"],
            "variant": run["variant"],
            "backend": run["backend"],
            "model": model_label(run["model_name"]),
            "ctx": p["n_ctx"],
            "chunks": p["n_chunks"],
            "type_k": params.get("cache_type_k"),
            "type_v": params.get("cache_type_v"),
            "fa": params.get("flash_attn"),
            "extra": _extra(run),
            "ppl": p["ppl"],
            "ppl_err": p["ppl_err"],
            "kv_mib": p["kv_mib"],  # a column Store adds to older stores when it opens them
            "kv_used_mib": p["kv_used_mib"],  # the paged cache's pages in use at the end (same)
            "base": f"{base['variant']} {base['params']['cache_type_k']}/{base['params']['cache_type_v']}"
            if base
            else "",
        }
        if k:
            for name in (
                "ppl_base",
                "ppl_ratio",
                "ppl_ratio_err",
                "kld_mean",
                "kld_mean_err",
                "kld_p99",
                "kld_max",
                "same_top_pct",
                "same_top_err_pct",
                "dp_rms_pct",
            ):
                row[name] = k[name]
        rows.append(row)
    return rows


def feature_rows(store: Store, runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    ids = {r["run_id"]: r for r in runs}
    if not ids:
        return []
    marks = ",".join("?" * len(ids))
    out = []
    for row in store.conn.execute(f"SELECT * FROM feature_eval WHERE run_id IN ({marks}) ORDER BY run_id", list(ids)):
        run = ids[row["run_id"]]
        out.append(
            {
                "run_id": row["run_id"],
                "variant": run["variant"],
                "model": model_label(run["model_name"]),
                "feature": row["feature"],
                "metric": row["metric"],
                "value": row["value"],
                "unit": row["unit"],
                "device": _device(run),
            }
        )
    return out


def _device(run: dict[str, Any]) -> str:
    """The ggml backend a sampler run measured on (its params' backend_name), else the build's backend."""
    try:
        params = json.loads(run.get("params") or "{}")
    except (TypeError, ValueError):
        params = {}
    return str(params.get("backend_name") or run.get("backend") or "")


SAMPLER_METRIC = re.compile(r"^(?P<mode>[a-z-]+) vocab=(?P<vocab>\d+) rows=(?P<rows>\d+) median$")
# (variant, mode) columns of the sampler table, and the speedups shown: (numerator column, denominator column)
SAMPLER_COLUMNS = (
    ("upstream", "chain"),
    ("upstream", "backend-chain"),
    ("patched", "sortfree"),
    ("patched", "backend-sortfree"),
    ("patched", "op"),
)
SAMPLER_RATIOS = (
    (("upstream", "chain"), ("patched", "sortfree")),
    (("upstream", "chain"), ("patched", "op")),
    (("upstream", "backend-chain"), ("patched", "backend-sortfree")),
    (("upstream", "backend-chain"), ("patched", "op")),
)


DECODE_METRIC = re.compile(r"^decode (?P<setup>[a-z-]+) tokens/s$")


def decode_section(rows: list[dict[str, Any]]) -> str:
    """Decode tokens/s per sampler setup and variant, relative to the same variant's greedy decoding."""
    cells: dict[tuple[str, str], dict[str, float]] = {}
    setups: list[str] = []
    for r in rows:
        m = DECODE_METRIC.match(r["metric"])
        if not m or r["value"] is None:
            continue
        cells.setdefault((r["model"], r["variant"]), {})[m["setup"]] = float(r["value"])
        if m["setup"] not in setups:
            setups.append(m["setup"])
    if not cells:
        return ""
    headers = ["Model", "Variant", *[f"{s} (t/s)" for s in setups]]
    others = [s for s in setups if s != "greedy"]
    if "greedy" in setups:
        headers += [f"{s} / greedy" for s in others]
    body = []
    for (model, variant), v in sorted(cells.items()):
        line: list[Any] = [model, variant, *[f"{v[s]:.1f}" if s in v else "-" for s in setups]]
        if "greedy" in setups:
            line += [f"{v[s] / v['greedy']:.3f}" if s in v and v.get("greedy") else "-" for s in others]
        body.append(line)
    return (
        "### Decoding with sampling\n\nGenerated tokens per second of `llama-completion` (eval + sampling time, "
        "median of the repetitions), and each setup relative to greedy decoding of the same build.\n\n"
        + md_table(headers, body, ["l", "l"] + ["r"] * (len(headers) - 2))
        + "\n"
    )


def sampler_section(rows: list[dict[str, Any]]) -> str:
    """Sampler latencies (median us per call) pivoted by device, vocabulary and rows, with speedups."""
    cells: dict[tuple[str, int, int], dict[tuple[str, str], float]] = {}
    for r in rows:
        m = SAMPLER_METRIC.match(r["metric"])
        if not m or r["value"] is None:
            continue
        key = (r["device"], int(m["vocab"]), int(m["rows"]))
        cells.setdefault(key, {})[(r["variant"], m["mode"])] = float(r["value"])
    if not cells:
        return ""
    present = [c for c in SAMPLER_COLUMNS if any(c in v for v in cells.values())]
    ratios = [(a, b) for a, b in SAMPLER_RATIOS if a in present and b in present]
    headers = ["Device", "Vocab", "Rows"]
    headers += [f"{v} {m} (us)" for v, m in present]
    headers += [f"{a[1]} / {b[1]}" for a, b in ratios]
    # the op on an accelerator against the CPU chain of the same host, vocabulary and rows (issue 4's CPU target)
    chain, op = ("upstream", "chain"), ("patched", "op")
    cross = {
        key: cells[("CPU", key[1], key[2])][chain] / v[op]
        for key, v in cells.items()
        if key[0] != "CPU" and op in v and v[op] > 0 and chain in cells.get(("CPU", key[1], key[2]), {})
    }
    if cross:
        headers.append("CPU chain / op")
    body = []
    for key in sorted(cells):
        v = cells[key]
        line: list[Any] = [key[0], key[1], key[2]]
        line += [f"{v[c]:.1f}" if c in v else "-" for c in present]
        line += [f"{v[a] / v[b]:.1f}x" if a in v and b in v and v[b] > 0 else "-" for a, b in ratios]
        if cross:
            line.append(f"{cross[key]:.1f}x" if key in cross else "-")
        body.append(line)
    return (
        "### Sampler latency\n\nMedian microseconds per call (every timed call is in the run's stdout); "
        "ratios are upstream over patched. `chain`: `llama_sampler_apply` of top_k -> top_p -> (min_p ->) temp -> "
        "dist on a `llama_token_data` array; `sortfree`: `llama_sampler_apply` of the sortfree sampler on the same "
        "array (it copies the logits into a tensor first); `backend-chain` / `backend-sortfree`: the samplers' "
        "backend-sampling graphs, one per row; `op`: one `GGML_OP_SAMPLE_SORTFREE` node for all rows. "
        "`CPU chain / op`: the CPU chain measured on the same host's CPU (same vocabulary and rows) over the op "
        "on the row's device.\n\n" + md_table(headers, body, ["l", "r", "r"] + ["r"] * (len(headers) - 3)) + "\n"
    )


# ------------------------------------------------------------------------------------------------ formatting


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    align = align or ["l"] * len(headers)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ts(median: float | None, stdev: float | None) -> str:
    if median is None:
        return "-"
    return f"{median:.2f} ± {stdev or 0.0:.2f}"


def fmt_pm(value: float | None, err: float | None, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f} ± {(err or 0.0):.{digits}f}"


def kv_label(k: str, v: str) -> str:
    return k if k == v else f"{k}/{v}"


def environment_block(group: Group) -> str:
    """Hardware and commits the group's numbers came from (all taken from the runs' provenance)."""
    runs = group.runs
    first = runs[0]
    cpus = sorted({f"{r['host_cpu']} ({r['host_cpu_count']} usable CPUs)" for r in runs})
    gpus = sorted(
        {
            f"{r['gpu_name']} ×{r['gpu_count']}, driver {r['gpu_driver']}, CUDA {r['cuda_version']}"
            for r in runs
            if r.get("gpu_name")
        }
    ) or ["none"]
    lines = [
        f"- CPU: {'; '.join(cpus)}; OS: {first.get('host_os')}",
        f"- GPU: {'; '.join(gpus)}",
        f"- upstream commit: `{group.upstream_commit}`",
    ]
    for variant in sorted({r["variant"] for r in runs}, key=lambda v: (v != "upstream", v)):
        vr = [r for r in runs if r["variant"] == variant]
        commits = sorted({r["source_commit"] for r in vr})
        series = sorted({r["series_hash"] for r in vr})
        sync = "" if all(r["series_in_sync"] for r in vr) else " (**built from a branch not in sync with patches/**)"
        flags = sorted({" ".join(json.loads(r["cmake_flags"] or "[]")) for r in vr})
        backends = ", ".join(sorted({r["backend"] for r in vr}))
        lines.append(
            f"- {variant} ({backends}): source `{', '.join(c[:12] for c in commits)}`, patch series "
            f"`{', '.join(s[:12] for s in series)}`{sync}; compiler {vr[0]['compiler']}"
        )
        lines.append(f"  - build flags: `{'` / `'.join(flags)}`")
    ids = [r["run_id"] for r in runs]
    start = min(r["started_at"] or "" for r in runs)
    end = max(r["finished_at"] or "" for r in runs)
    lines.append(f"- runs: {len(runs)} (ids {min(ids)}–{max(ids)}), {start} – {end}")
    return "\n".join(lines)


def bench_section(rows: list[dict[str, Any]], baseline: str, candidate: str) -> str:
    if not rows:
        return ""
    key_fields = (
        "model",
        "backend",
        "type_k",
        "type_v",
        "fa",
        "threads",
        "ngl",
        "n_batch",
        "n_ubatch",
        "n_depth",
        "n_prompt",
        "n_gen",
        "test",
    )
    variants = sorted({r["variant"] for r in rows}, key=lambda v: (v != baseline, v != candidate, v))
    optional = [
        ("backend", "Backend"),
        ("threads", "Threads"),
        ("ngl", "ngl"),
        ("n_batch", "Batch"),
        ("n_ubatch", "uBatch"),
    ]
    shown = [(k, h) for k, h in optional if len({r[k] for r in rows}) > 1]
    extras = sorted({r["extra"] for r in rows})
    cells: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        key = tuple(r[k] for k in key_fields)
        # an extra-flag run of the candidate is its own row; the baseline row it compares to has no extra flags (with
        # the baseline as candidate: the variant's extra-flag runs against its own runs without them)
        extra = r["extra"]
        if r["variant"] == baseline and extra and baseline != candidate:
            continue
        slot = r["variant"] if not extra else f"{r['variant']} {extra}"
        cells[key][slot] = r
    slots = sorted({s for c in cells.values() for s in c}, key=lambda s: (not s.startswith(baseline), s))
    compare = baseline in variants and any(s != baseline for s in slots)
    headers = ["Model", "Test", "KV (K/V)", "FA", *(h for _, h in shown)]
    headers += [f"t/s {s}" for s in slots]
    if compare:
        headers += [f"Speedup {s}" for s in slots if s != baseline]
    out_rows = []
    ordered = sorted(cells, key=lambda k: (k[0], k[1], k[2], k[3], str(k[4]), k[10] == 0, k[9], k[10], k[11]))
    for key in ordered:
        c = cells[key]
        any_row = next(iter(c.values()))
        line = [any_row["model"], any_row["test"], kv_label(any_row["type_k"], any_row["type_v"]), any_row["fa"]]
        line += [any_row[k] for k, _ in shown]
        line += [fmt_ts(c[s]["median_ts"], c[s]["stdev_ts"]) if s in c else "-" for s in slots]
        if compare:
            base = c.get(baseline)
            for s in slots:
                if s == baseline:
                    continue
                if base and s in c and base["median_ts"]:
                    line.append(f"{c[s]['median_ts'] / base['median_ts']:.2f}")
                else:
                    line.append("-")
        out_rows.append(line)
    align = ["l", "l", "l", "l", *("r" for _ in shown), *("r" for _ in slots)]
    align += ["r"] * (len(headers) - len(align))
    note = f"t/s: median ± standard deviation over every llama-bench repetition; speedup: median ratio to {baseline}."
    if extras != [""]:
        note += " Candidate rows with extra flags are compared against the baseline without them."
    busy = sorted(
        {
            (r["run_id"], r["variant"], r["other_cpu"])
            for r in rows
            if r.get("other_cpu") is not None and r["other_cpu"] > BUSY_THRESHOLD
        }
    )
    if busy:
        listing = ", ".join(f"run {i} ({v}): {o:.0%}" for i, v, o in busy)
        note += (
            f"\n\n> **Warning: the machine was busy with other work during some of these runs** "
            f"(share of all CPU time used by other processes while llama-bench ran: {listing}). Their "
            "throughput is not a measurement of the build alone; re-run them on an idle machine."
        )
    return "### Throughput (llama-bench)\n\n" + md_table(headers, out_rows, align) + "\n\n" + note + "\n"


def ppl_section(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    ordered = sorted(
        rows,
        key=lambda r: (
            r["model"],
            r["ctx"],
            r["chunks"],
            r["variant"] != "upstream",
            r["variant"],
            r["type_k"],
            r["type_v"],
            str(r["fa"]),
            r["extra"],
        ),
    )
    headers = [
        "Model",
        "Variant",
        "KV (K/V)",
        "FA",
        "Extra",
        "ctx×chunks",
        "KV MiB",
        "KV / f16",
        "PPL",
        "PPL/PPL(base)",
        "Mean KLD",
        "99% KLD",
        "Same top %",
        "KLD base",
    ]
    # KV cache size against the f16 cache of the same model, context and variant (llama.cpp's own log line): the one
    # run without extra flags, else the first (extra flags can change the cache itself, e.g. --kv-cache paged)
    f16_kv: dict[tuple[Any, Any, Any], Any] = {}
    for r in sorted(ordered, key=lambda r: bool(r["extra"])):
        if r.get("kv_mib") and r["type_k"] == "f16" and r["type_v"] == "f16":
            f16_kv.setdefault((r["model"], r["ctx"], r["variant"]), r["kv_mib"])
    body = []
    for r in ordered:
        has_kld = r.get("kld_mean") is not None
        kv, kv_f16 = r.get("kv_mib"), f16_kv.get((r["model"], r["ctx"], r["variant"]))
        body.append(
            [
                r["model"],
                r["variant"],
                kv_label(r["type_k"], r["type_v"]),
                r["fa"],
                r["extra"] or "-",
                f"{r['ctx']}×{r['chunks']}",
                f"{kv:.2f}" if kv else "-",
                f"{kv / kv_f16:.3f}" if kv and kv_f16 else "-",
                fmt_pm(r["ppl"], r["ppl_err"], 4),
                fmt_pm(r.get("ppl_ratio"), r.get("ppl_ratio_err"), 4) if has_kld else "-",
                fmt_pm(r.get("kld_mean"), r.get("kld_mean_err"), 6) if has_kld else "-",
                f"{r['kld_p99']:.6f}" if has_kld else "-",
                fmt_pm(r.get("same_top_pct"), r.get("same_top_err_pct"), 2) if has_kld else "-",
                r["base"] or "-",
            ]
        )
    align = ["l", "l", "l", "l", "l", "r", "r", "r", "r", "r", "r", "r", "r", "l"]
    return (
        "### Perplexity and KL divergence (llama-perplexity)\n\n"
        + md_table(headers, body, align)
        + "\n\nPPL ± its standard error as llama-perplexity prints it; KLD statistics from `--kl-divergence` "
        "against the base run named in the last column. llama-perplexity stores the base's log-probabilities as "
        "16-bit values, so a configuration identical to its base shows KLD ≈ 0 and 100 % same top token but a "
        "PPL ratio slightly different from 1: read ratios against that row, not against 1. KV MiB: the KV cache "
        "size llama.cpp logs (`llama_kv_cache: size`, summed over its caches; the paged cache's pools with their "
        "positions); KV / f16: against the f16 cache of the same model, context and variant without extra flags.\n"
    )


def feature_section(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    body = [
        [
            r["feature"],
            r["metric"],
            r["variant"],
            r["model"],
            f"{r['value']:.6g}" if r["value"] is not None else "-",
            r["unit"] or "",
            r["run_id"],
        ]
        for r in rows
    ]
    return (
        "### Feature evaluations\n\n"
        + md_table(
            ["Feature", "Metric", "Variant", "Model", "Value", "Unit", "Run"], body, ["l", "l", "l", "l", "r", "l", "r"]
        )
        + "\n"
    )


def to_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    names = list(rows[0])
    for r in rows[1:]:
        names += [k for k in r if k not in names]
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ the report


def build_report(
    store: Store,
    *,
    matrix: str | None = None,
    baseline: str = "upstream",
    candidate: str = "patched",
    title: str | None = None,
) -> Report:
    runs = latest_runs(store, matrix)
    if not runs:
        where = f" of matrix '{matrix}'" if matrix else ""
        raise HarnessError(
            f"no successful runs{where} in {store.path}",
            "run `pyharness matrix FILE.toml` (or ppl / bench) first, or check --db / --matrix",
        )
    variants = {r["variant"] for r in runs}
    if baseline not in variants and candidate in variants:
        # a matrix of the candidate's build alone (no baseline runs): its extra-flag rows against its own rows
        baseline = candidate
    groups = group_runs(runs)
    warnings = []
    if len(groups) > 1:
        listing = "\n".join(f">  {i}. {g.title} ({len(g.runs)} runs)" for i, g in enumerate(groups, 1))
        warnings.append(
            f"> **Warning: this report covers {len(groups)} different hardware / commit combinations.** "
            "Each is reported in its own section; numbers are never compared across sections.\n>\n" + listing
        )
    unsynced = [r["run_id"] for r in runs if not r["series_in_sync"]]
    if unsynced:
        warnings.append(
            f"> **Warning:** runs {', '.join(map(str, unsynced))} used a patched build whose branch "
            "differed from patches/ (series hash does not describe its source exactly)."
        )
    failed = store.runs(matrix=matrix, status="failed")
    parts = [f"# {title or ('Results: ' + matrix if matrix else 'Results')}", ""]
    parts.append(
        f"Rendered by `pyharness report` from `{store.path.name}` ({len(runs)} runs"
        + (f", matrix `{matrix}`" if matrix else "")
        + "). Every number below comes from the store."
    )
    parts.append("")
    parts += [w + "\n" for w in warnings]
    all_bench: list[dict[str, Any]] = []
    all_ppl: list[dict[str, Any]] = []
    all_batched: list[dict[str, Any]] = []
    all_retrieval: list[dict[str, Any]] = []
    batched = batched_runs(store.conn, matrix)  # failed ones too: a configuration that does not fit is a result
    for i, group in enumerate(groups, 1):
        b = bench_rows(store, group.runs)
        p = ppl_rows(store, group.runs)
        f = feature_rows(store, group.runs)
        bb = table_rows(store.conn, [r for r in batched if in_group(r, group)])
        rv = summarize(retrieval_rows(store.conn, group.runs))
        for rows in (b, p, bb, rv):
            for r in rows:
                r["group"] = i
        all_bench += b
        all_ppl += p
        all_batched += bb
        all_retrieval += rv
        heading = f"## {group.title}" if len(groups) > 1 else "## Environment"
        parts += [heading, "", environment_block(group), ""]
        sampler = [r for r in f if SAMPLER_METRIC.match(r["metric"])]
        decode = [r for r in f if DECODE_METRIC.match(r["metric"])]
        others = [
            r
            for r in f
            if not SAMPLER_METRIC.match(r["metric"])
            and not DECODE_METRIC.match(r["metric"])
            and not (r["feature"] == "paged-kv" and is_paged_metric(r["metric"]))
        ]
        sections = (
            bench_section(b, baseline, candidate),
            ppl_section(p),
            sampler_section(sampler),
            decode_section(decode),
            *paged_sections(group.runs),
            batched_section(bb),
            retrieval_section(rv),
            feature_section(others),
        )
        for section in sections:
            if section:
                parts += [section, ""]
    if failed:
        parts += [
            "## Failed runs",
            "",
            md_table(
                ["Run", "Cell", "Error"],
                [
                    [
                        r["run_id"],
                        r["cell"] or f"{r['kind']} {r['variant']}-{r['backend']}",
                        (r["error"] or "").replace("|", "\\|")[:160],
                    ]
                    for r in failed
                ],
            ),
            "",
        ]
    return Report(
        markdown="\n".join(parts).rstrip() + "\n",
        csv={
            "bench.csv": to_csv(all_bench),
            "ppl.csv": to_csv(all_ppl),
            "batched.csv": to_csv(all_batched),
            "retrieval.csv": to_csv(all_retrieval),
        },
        groups=groups,
        bench_rows=all_bench,
        ppl_rows=all_ppl,
        warnings=warnings,
        retrieval_rows=all_retrieval,
    )


def test_kind(row: dict[str, Any]) -> str:
    return "pp" if row["n_gen"] == 0 else "tg" if row["n_prompt"] == 0 else "pp+tg"


def kv_memory(row: dict[str, Any]) -> float | None:
    """A perplexity run's KV memory in MiB: the paged cache's pages in use at the end of the run when it logged them
    (a compressed cache holds fewer than its pool), else the cache's size."""
    return row.get("kv_used_mib") or row.get("kv_mib") or None


KV_COMPRESS_ARG = "--kv-compress"


def ppl_series(row: dict[str, Any]) -> str:
    """The line a perplexity run belongs to in the PPL / KV memory plot: runs that differ only in their compression
    budget or rate (`--kv-compress-budget` / `-rate`) share a line; every other configuration is a point of its own."""
    args, rest, skip = row["extra"].split(), [], False
    for a in args:
        if skip:
            skip = False
        elif KV_COMPRESS_ARG in args and a in ("--kv-compress-budget", "--kv-compress-rate"):
            skip = True  # the budget is the line's x axis
        else:
            rest.append(a)
    return f"{row['variant']} {' '.join(rest) or 'standard cache'} KV {kv_label(row['type_k'], row['type_v'])}"


def plot_ppl_vs_kv(rows: list[dict[str, Any]], out: Path, plt: Any, *, tag_groups: bool) -> Path | None:
    """PPL against KV memory, a panel per model and context: a line per compression method through its budgets, a
    point per other configuration (full caches, quantized caches)."""
    rows = [r for r in rows if kv_memory(r)]
    if not rows:
        return None
    panels: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        panels[(r["model"], r["ctx"], r["group"] if tag_groups else None)].append(r)
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.8), squeeze=False)
    for ax, (key, members) in zip(axes[0], sorted(panels.items(), key=lambda kv: str(kv[0])), strict=True):
        series: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in members:
            series[ppl_series(r)].append(r)
        for label, pts in sorted(series.items()):
            pts.sort(key=lambda r: kv_memory(r) or 0.0)
            ax.errorbar(
                [kv_memory(p) for p in pts],
                [p["ppl"] for p in pts],
                yerr=[p["ppl_err"] for p in pts],
                marker="o",
                capsize=3,
                linestyle="-" if len(pts) > 1 else "none",
                label=label,
            )
        model, ctx, group = key
        ax.set_title(f"{model} c{ctx}: PPL vs KV memory" + (f" [g{group}]" if group else ""))
        ax.set_xlabel("KV memory (MiB: pages in use at the end for the paged cache, else the cache's size)")
        ax.set_ylabel("perplexity (± error)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    path = out / "ppl_vs_kv.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(report: Report, out: Path) -> list[Path]:
    """PNG plots: throughput against depth per variant; PPL and mean KLD per configuration; PPL against KV memory;
    retrieval accuracy against KV memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    if report.bench_rows:
        kinds = sorted({test_kind(r) for r in report.bench_rows})
        fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
        for ax, kind in zip(axes[0], kinds, strict=True):
            series: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for r in report.bench_rows:
                if test_kind(r) != kind:
                    continue
                size = r["n_prompt"] if kind == "pp" else r["n_gen"]
                label = (
                    f"{r['variant']}{' ' + r['extra'] if r['extra'] else ''} {r['model']} "
                    f"KV {kv_label(r['type_k'], r['type_v'])} {kind}{size}"
                    + (f" [g{r['group']}]" if len(report.groups) > 1 else "")
                )
                series[label].append(r)
            for label, pts in sorted(series.items()):
                pts.sort(key=lambda r: r["n_depth"])
                ax.errorbar(
                    [p["n_depth"] for p in pts],
                    [p["median_ts"] for p in pts],
                    yerr=[p["stdev_ts"] for p in pts],
                    marker="o",
                    capsize=3,
                    label=label,
                )
            ax.set_xlabel("context depth (tokens)")
            ax.set_ylabel("tokens/s (median ± stdev)")
            ax.set_title(f"{kind}: throughput vs depth")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "throughput_vs_depth.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if report.ppl_rows:
        rows = sorted(
            report.ppl_rows,
            key=lambda r: (r["model"], r["variant"] != "upstream", r["variant"], r["type_k"], r["type_v"], r["extra"]),
        )
        labels = [
            f"{r['variant']}{' ' + r['extra'] if r['extra'] else ''}\nKV {kv_label(r['type_k'], r['type_v'])}"
            f"\n{r['model']} c{r['ctx']}"
            for r in rows
        ]
        has_kld = any(r.get("kld_mean") is not None for r in rows)
        fig, axes = plt.subplots(
            1, 2 if has_kld else 1, figsize=(max(6, 1.6 * len(rows)) * (2 if has_kld else 1), 4.5), squeeze=False
        )
        ax = axes[0][0]
        ax.bar(range(len(rows)), [r["ppl"] for r in rows], yerr=[r["ppl_err"] for r in rows], capsize=3)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_ylabel("perplexity (± error)")
        ax.set_title("PPL per configuration")
        if has_kld:  # only runs that measured KLD: a missing value is not a zero
            ax = axes[0][1]
            kld = [(label, r) for label, r in zip(labels, rows, strict=True) if r.get("kld_mean") is not None]
            ax.bar(
                range(len(kld)),
                [r["kld_mean"] for _, r in kld],
                yerr=[r["kld_mean_err"] for _, r in kld],
                capsize=3,
                color="tab:orange",
            )
            ax.set_xticks(range(len(kld)), [label + f"\nvs {r['base']}" for label, r in kld], fontsize=7)
            ax.set_ylabel("mean KLD vs base (± error)")
            ax.set_title("KL divergence per configuration")
        fig.tight_layout()
        path = out / "ppl_kld.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    several = len(report.groups) > 1
    for extra_plot in (
        plot_ppl_vs_kv(report.ppl_rows, out, plt, tag_groups=several),
        plot_retrieval(report.retrieval_rows, out, plt, tag_groups=several),
    ):
        if extra_plot is not None:
            written.append(extra_plot)
    return written


def write_report(report: Report, out: Path, *, plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    md = out / "README.md"
    md.write_text(report.markdown)
    written.append(md)
    for name, text in report.csv.items():
        if text:
            (out / name).write_text(text)
            written.append(out / name)
    if plots:
        pngs = plot(report, out)
        if pngs:
            with md.open("a") as fh:
                fh.write("\n## Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n")
        written += pngs
    return written
