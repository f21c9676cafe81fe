"""Report section of llama-batched-bench runs (`kind = "batched"`), rendered by `pyharness report` from the store's
`batched_bench` and `kv_memory` rows and nothing else. Failed runs are shown beside the others: a configuration that
did not fit or a pool that ran out is a result of this evaluation, not an accident."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyharness.runners.batched import KIND

BUSY_THRESHOLD = 0.10  # share of the machine's CPU used by other processes above which speeds are flagged
NOTE_LIMIT = 220


def batched_runs(conn: sqlite3.Connection, matrix: str | None) -> list[dict[str, Any]]:
    """The batched runs to show, one per configuration hash: its latest successful run, else its latest failed one."""
    sql, args = "SELECT * FROM runs WHERE kind = ?", [KIND]
    if matrix is not None:
        sql, args = sql + " AND matrix = ?", [*args, matrix]
    chosen: dict[str, dict[str, Any]] = {}
    for row in conn.execute(sql + " ORDER BY run_id", args):
        run = dict(row)
        prior = chosen.get(run["config_hash"])
        if prior is None or run["status"] == "ok" or prior["status"] != "ok":
            chosen[run["config_hash"]] = run
    return sorted(chosen.values(), key=lambda r: r["run_id"])


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str]) -> str:
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell_text(text: str, limit: int = NOTE_LIMIT) -> str:
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[:limit] + "…"


def run_params(run: dict[str, Any]) -> dict[str, Any]:
    """A stored run's parameters (its `params` JSON), {} when absent or not an object."""
    try:
        params = json.loads(run.get("params") or "{}")
    except ValueError:
        return {}
    return params if isinstance(params, dict) else {}


def pool_text(mem: dict[str, Any] | None) -> str:
    """The cache a run made: the paged pool (tokens per KV head, pages) or the standard cache's cells."""
    if not mem:
        return "-"
    if mem["cache"] == "paged":
        return f"paged: {mem['pool_tokens'] if mem['pool_tokens'] is not None else '?'} tokens ({mem['pages']} pages)"
    if mem["cells"] is None:
        return mem["cache"] or "-"
    if mem["n_stream"] and mem["n_stream"] > 1:
        return f"standard: {mem['cells']} cells ({mem['n_stream']} streams)"
    return f"standard: {mem['cells']} cells (unified)"


def row_status(status: str, note: str | None) -> str:
    if status == "ok":
        return "ok"
    return f"**{status}**: {_cell_text(note or '')}" if note else f"**{status}**"


def table_rows(conn: sqlite3.Connection, runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per stored configuration of each run (one row for a run that stored none), with its memory figures."""
    out = []
    for run in runs:
        mem_row = conn.execute("SELECT * FROM kv_memory WHERE run_id = ?", (run["run_id"],)).fetchone()
        mem = dict(mem_row) if mem_row else None
        params = run_params(run)
        name = run.get("model_name") or "?"
        base = {
            "run_id": run["run_id"],
            "model": Path(name).name if "/" in name else name,
            "variant": run["variant"],
            "extra": " ".join(params.get("extra") or []),
            "n_ctx": mem["n_ctx"] if mem and mem["n_ctx"] is not None else params.get("ctx"),
            "pool": pool_text(mem),
            "kv_mib": (mem["kv_buffer_mib"] if mem["kv_buffer_mib"] is not None else mem["kv_mib"]) if mem else None,
            "run_status": run["status"],
            "busy": (run.get("other_cpu") or 0.0) > BUSY_THRESHOLD,
        }
        rows = conn.execute(
            "SELECT * FROM batched_bench WHERE run_id = ? ORDER BY row_index", (run["run_id"],)
        ).fetchall()
        if not rows:
            out.append({**base, "config": "-", "n_ctx_req": None, "status": "failed", "note": run.get("error")})
            continue
        for r in rows:
            out.append(
                {
                    **base,
                    "config": f"{r['pp']}+{r['tg']} ×{r['pl']}",
                    "n_ctx_req": r["n_ctx_req"],
                    "speed_pp": r["speed_pp"],
                    "speed_tg": r["speed_tg"],
                    "speed": r["speed"],
                    "status": r["status"],
                    "note": r["note"],
                }
            )
    return out


def reference_kv(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per model, the largest KV buffer of an upstream run without extra arguments that ran every configuration: the
    standard cache's full reservation the other rows are compared with."""
    ref: dict[str, float] = {}
    for r in rows:
        if r["variant"] == "upstream" and not r["extra"] and r["run_status"] == "ok" and r["kv_mib"]:
            ref[r["model"]] = max(ref.get(r["model"], 0.0), float(r["kv_mib"]))
    return ref


def _speed(value: float | None, busy: bool) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" + (" †" if busy else "")


def batched_section(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return ""
    ref = reference_kv(rows)
    headers = [
        "Variant",
        "Extra",
        "n_ctx",
        "KV cache",
        "KV MiB",
        "KV / upstream",
        "pp+tg ×pl",
        "n_ctx_req",
        "S_PP t/s",
        "S_TG t/s",
        "S t/s",
        "Status",
    ]
    align = ["l", "l", "r", "l", "r", "r", "l", "r", "r", "r", "r", "l"]
    parts = [
        "### Batched decoding and KV memory (llama-batched-bench)",
        "",
        "One row per configuration asked for (pp prompt tokens, then tg tokens generated by each of pl sequences). "
        "*KV cache* and *KV MiB*: the cache llama.cpp made and its KV buffer as it logs them (`llama_kv_cache: size` "
        "with its cells and streams, or `llama_kv_cache_paged: size` with its pages; the paged pool holds the tokens "
        "shown per KV head, positions included in its MiB); *KV / upstream*: against the largest KV buffer of an "
        "upstream run of the model without extra arguments that ran every configuration. *n_ctx_req*: the context "
        "llama-batched-bench asks of a configuration before running it (with a shared prompt, `-pps`: pp + pl×tg in "
        "a unified cache, pl×(pp+tg) with a stream per sequence); above n_ctx the tool skips the configuration "
        "without a word, which is stored as *skipped*. S_PP counts a shared prompt once. *failed*: the "
        "configuration running when the tool stopped, with its log's warning and error lines.",
        "",
    ]
    for model in sorted({r["model"] for r in rows}):
        body = []
        for r in (r for r in rows if r["model"] == model):
            kv = r["kv_mib"]
            body.append(
                [
                    r["variant"],
                    f"`{r['extra']}`" if r["extra"] else "-",
                    r["n_ctx"] if r["n_ctx"] is not None else "-",
                    r["pool"],
                    f"{kv:.2f}" if kv is not None else "-",
                    f"{kv / ref[model]:.3f}" if kv is not None and model in ref else "-",
                    r["config"],
                    r["n_ctx_req"] if r["n_ctx_req"] is not None else "-",
                    _speed(r.get("speed_pp"), r["busy"]),
                    _speed(r.get("speed_tg"), r["busy"]),
                    _speed(r.get("speed"), r["busy"]),
                    row_status(r["status"], r["note"]),
                ]
            )
        parts += [f"#### {model}", "", _table(headers, body, align), ""]
    if any(r["busy"] for r in rows):
        parts += [
            f"† other processes used more than {BUSY_THRESHOLD:.0%} of the machine's CPU while this run's tool ran "
            "(`runs.other_cpu`): its speeds are not a measurement of the build alone.",
            "",
        ]
    return "\n".join(parts).rstrip() + "\n"
