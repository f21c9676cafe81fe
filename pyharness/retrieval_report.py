"""Report section of llama-needle runs (`kind = "retrieval"`), rendered by `pyharness report` from the store's
`retrieval` rows and nothing else: per model and prompt length, the accuracy of every (method, rate) overall and per
depth, against the full cache's, with the KV memory it kept and the time compression took; a CSV of the same rows and
a plot of accuracy against KV memory."""

from __future__ import annotations

import sqlite3
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyharness.batched_report import run_params
from pyharness.runners.retrieval import KIND, METHODS


def setup_label(run: dict[str, Any]) -> str:
    """What besides the method and rate a retrieval run's numbers depend on: backend, KV cache types, flash attention
    and the extra arguments."""
    p = run_params(run)
    k, v = p.get("cache_type_k", "?"), p.get("cache_type_v", "?")
    extra = " ".join(p.get("extra") or [])
    label = f"{run.get('backend')} KV {k if k == v else f'{k}/{v}'} fa {p.get('flash_attn', '?')}"
    return f"{label} {extra}" if extra else label


def retrieval_rows(conn: sqlite3.Connection, runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every stored line of the given (retrieval) runs, with the run's model and setup."""
    out: list[dict[str, Any]] = []
    for run in runs:
        if run["kind"] != KIND:
            continue
        name = run.get("model_name") or "?"
        model = Path(name).name if "/" in name else name
        setup = setup_label(run)
        for row in conn.execute("SELECT * FROM retrieval WHERE run_id = ? ORDER BY row_index", (run["run_id"],)):
            out.append({**dict(row), "model": model, "setup": setup})
    return out


def _method_order(method: str) -> int:
    return METHODS.index(method) if method in METHODS else len(METHODS)


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, setup, length, method, rate): accuracy overall and per depth, its ratio to the full cache's
    accuracy (same model, setup and length), the number of answers, the median KV ratio, budget and times."""
    cells: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        cells[(r["model"], r["setup"], r["length"], r["method"], float(r["rate"]))].append(r)

    def accuracy(members: Sequence[dict[str, Any]]) -> float:
        return 100.0 * sum(int(m["correct"]) for m in members) / len(members)

    full = {key[:3]: accuracy(members) for key, members in cells.items() if key[3] == "full"}
    out: list[dict[str, Any]] = []
    ordered = sorted(cells, key=lambda k: (k[0], k[1], k[2], _method_order(k[3]), k[3], k[4]))
    for key in ordered:
        members = cells[key]
        model, setup, length, method, rate = key
        acc = accuracy(members)
        base = full.get(key[:3])
        by_depth: dict[float, list[dict[str, Any]]] = defaultdict(list)
        for m in members:
            by_depth[float(m["depth"])].append(m)
        row: dict[str, Any] = {
            "model": model,
            "setup": setup,
            "length": length,
            "method": method,
            "rate": rate,
            "budget": statistics.median(int(m["budget"]) for m in members),
            "n": len(members),
            "n_correct": sum(int(m["correct"]) for m in members),
            "accuracy_pct": acc,
            "full_accuracy_pct": base,
            "vs_full": acc / base if base else None,
            "kv_ratio_median": statistics.median(float(m["kv_ratio"]) for m in members),
            "t_compress_ms_median": statistics.median(float(m["t_compress_ms"]) for m in members),
            "t_decode_ms_median": statistics.median(float(m["t_decode_ms"]) for m in members),
        }
        for depth in sorted(by_depth):
            row[f"accuracy_pct_d{depth:g}"] = accuracy(by_depth[depth])
            row[f"n_d{depth:g}"] = len(by_depth[depth])
        out.append(row)
    return out


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str]) -> str:
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _depths(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The depth columns of the summary rows ('0.1', '0.3', ...), in order."""
    found = {k[len("accuracy_pct_d") :] for r in rows for k in r if k.startswith("accuracy_pct_d")}
    return sorted(found, key=float)


def retrieval_section(summary: Sequence[dict[str, Any]]) -> str:
    if not summary:
        return ""
    several = len({r["setup"] for r in summary}) > 1
    parts = [
        "### Retrieval under KV compression (llama-needle)",
        "",
        "Needle in a haystack: a key planted at a depth of a wikitext haystack of the given length, asked for after "
        "it, the answer decoded greedily from a copy of the prefilled sequence compressed by each method at each rate"
        " R (a budget of length / R slots per layer and KV head; *full*: the uncompressed copy). *Accuracy*: answers "
        "that match, over every trial and depth (*n* answers), then per depth; *vs full*: the accuracy over the full "
        "cache's of the same model, setup and length; *KV ratio*: KV bytes the compressed copy holds over the "
        "uncompressed sequence's (median over the answers); *compress ms*: median time of the compression step.",
        "",
    ]
    for model, length in sorted({(r["model"], r["length"]) for r in summary}):
        rows = [r for r in summary if r["model"] == model and r["length"] == length]
        depths = _depths(rows)
        headers = ["Setup"] if several else []
        headers += ["Method", "Rate", "Budget", "Accuracy %", *(f"d={d}" for d in depths)]
        headers += ["vs full", "n", "KV ratio", "Compress ms"]
        align = (["l"] if several else []) + ["l", "r", "r", "r", *("r" for _ in depths), "r", "r", "r", "r"]
        body = []
        for r in rows:
            line: list[Any] = [r["setup"]] if several else []
            line += [r["method"], f"{r['rate']:g}", f"{r['budget']:g}", f"{r['accuracy_pct']:.1f}"]
            line += [
                f"{r[f'accuracy_pct_d{d}']:.1f}" if f"accuracy_pct_d{d}" in r else "-"
                for d in depths  # a depth this configuration has no answer at
            ]
            line += [
                f"{r['vs_full']:.3f}" if r["vs_full"] is not None else "-",
                r["n"],
                f"{r['kv_ratio_median']:.3f}",
                f"{r['t_compress_ms_median']:.2f}",
            ]
            body.append(line)
        parts += [f"#### {model}, {length} tokens", "", _table(headers, body, align), ""]
    return "\n".join(parts).rstrip() + "\n"


def plot_retrieval(summary: Sequence[dict[str, Any]], out: Path, plt: Any, *, tag_groups: bool = False) -> Path | None:
    """Accuracy against KV memory (median KV ratio), one line per method through its rates, a panel per model and
    length (and setup); the full cache as a star and a dashed level."""
    panels: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in summary:
        key = (r["model"], r["length"], r["setup"], r.get("group") if tag_groups else None)
        panels[key].append(r)
    if not panels:
        return None
    several = len({k[2] for k in panels}) > 1
    n = len(panels)
    cols = min(n, 3)
    rows_n = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.5 * cols, 4.2 * rows_n), squeeze=False)
    for ax, (key, members) in zip(axes.flat, sorted(panels.items(), key=lambda kv: str(kv[0])), strict=False):
        model, length, setup, group = key
        for method in sorted({m["method"] for m in members}, key=_method_order):
            pts = sorted((m for m in members if m["method"] == method), key=lambda m: m["kv_ratio_median"])
            xs = [p["kv_ratio_median"] for p in pts]
            ys = [p["accuracy_pct"] for p in pts]
            if method == "full":
                ax.plot(xs, ys, marker="*", markersize=12, linestyle="none", color="black", label="full")
                for y in ys:
                    ax.axhline(y, color="black", linestyle="--", linewidth=0.8, alpha=0.5)
                continue
            ax.plot(xs, ys, marker="o", label=method)
            for p in pts:
                ax.annotate(
                    f"R{p['rate']:g}",
                    (p["kv_ratio_median"], p["accuracy_pct"]),
                    textcoords="offset points",
                    xytext=(3, 3),
                    fontsize=6,
                )
        title = f"{model}, {length} tokens" + (f"\n{setup}" if several else "") + (f" [g{group}]" if group else "")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("KV memory kept (bytes / uncompressed, median)")
        ax.set_ylabel("retrieval accuracy (%)")
        ax.set_ylim(-3, 103)
        ax.set_xlim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    path = out / "retrieval_accuracy_vs_kv.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
