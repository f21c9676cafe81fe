"""Report sections of the paged-cache comparisons (`kind = "paged-generate"` and `"paged-server"`), rendered by
`pyharness report` from the runs' stored JSON (their stdout) and nothing else."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyharness.paged_server import Trial, summarize, trials_from_dicts
from pyharness.runners.paged import GENERATE_KIND, SERVER_KIND

EXCERPT = 160


def is_paged_metric(metric: str) -> bool:
    """The feature_eval metrics these sections already show (kept out of the generic feature table)."""
    return metric.startswith(("generate ", "server "))


def excerpt(text: str, limit: int = EXCERPT) -> str:
    """Text for a Markdown table cell: newlines shown as ⏎, pipes escaped, cut at `limit` characters."""
    flat = text.replace("\r", "").replace("\n", "⏎").replace("|", "\\|").replace("`", "'")
    return flat if len(flat) <= limit else flat[:limit] + "…"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str]) -> str:
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _model(run: dict[str, Any]) -> str:
    name = run.get("model_name") or "?"
    return Path(name).name if "/" in name else name


def _stdout(run: dict[str, Any]) -> dict[str, Any] | None:
    try:
        data = json.loads(run.get("stdout") or "")
    except (TypeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _worker_json(run: dict[str, Any]) -> dict[str, Any] | None:
    lines = (run.get("stdout") or "").strip().splitlines()
    try:
        data = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def size_lines(lines: Sequence[str], cache: str) -> str:
    """llama.cpp's size line(s) of the cache a context made (an iSWA cache logs two), each once, as inline code.
    Only the cache's own lines: llama-server's memory fit first makes a probe context with the standard cache."""
    key = "llama_kv_cache_paged: size =" if cache == "paged" else "llama_kv_cache: size ="
    found = list(dict.fromkeys(ln.strip() for ln in lines if key in ln))
    return "; ".join(f"`{ln}`" for ln in found) or "no size line logged"


# ------------------------------------------------------------------------------------------------ generation


def generation_section(runs: Sequence[dict[str, Any]]) -> str:
    gens = [(r, d) for r in runs if r["kind"] == GENERATE_KIND and (d := _worker_json(r)) is not None]
    if not gens:
        return ""
    parts = [
        "### Greedy generation, standard vs paged KV cache (`paged-generate`)",
        "",
        "Both caches of the patched build in one process (llama-cpp-python; `llama_init_from_model_paged` for the "
        "paged one), stepped together: every sequence's prompt in one batch, then one token of each sequence per "
        "step, greedy (argmax), end-of-generation tokens not stopping a sequence. *First difference*: the first "
        "generated token that differs between the caches. *Logits*: the rows compared while a sequence had been fed "
        "the same tokens under both caches, and whether each was bitwise equal.",
        "",
    ]
    for run, d in gens:
        c = d["config"]
        parts.append(
            f"**{_model(run)}** (run {run['run_id']}): {len(c['prompts'])} sequences x {c['n_gen']} tokens, "
            f"n_ctx {c['ctx']}, n_ubatch {c['ubatch']}, page size {c['page_size']}, {c['threads']} threads, "
            f"flash attention {c['flash_attn']}; {d['identical']} of {len(d['sequences'])} sequences identical."
        )
        parts.append("")
        for cache in ("standard", "paged"):
            parts.append(f"- {cache} cache: {size_lines(d['logs'].get(cache, []), cache)}")
        parts.append("")
        rows = []
        for s in d["sequences"]:
            n_std, n_pag = len(s["tokens"]["standard"]), len(s["tokens"]["paged"])
            diff = s["first_token_difference"]
            logits = (
                "bitwise equal"
                if s["first_logits_difference"] is None
                else f"differ from token {s['first_logits_difference']} (max abs {s['max_abs_logit_diff']:.3g})"
            )
            text = excerpt(s["text"]["paged"])
            if diff is not None:
                text = f"standard: {excerpt(s['text']['standard'])}<br>paged: {text}"
            rows.append(
                [
                    s["seq"],
                    excerpt(s["prompt"], 60),
                    s["prompt_tokens"],
                    n_std if n_std == n_pag else f"{n_std} / {n_pag}",
                    "identical" if diff is None else diff,
                    f"{s['rows_compared']}: {logits}",
                    text,
                ]
            )
        headers = ["Seq", "Prompt", "Prompt tokens", "Tokens generated", "First difference", "Logits", "Generated text"]
        parts += [_table(headers, rows, ["r", "l", "r", "r", "l", "l", "l"]), ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ server


def server_verdict(summary: dict[str, Any]) -> str:
    """What the comparisons say, from the summary alone."""
    across, det = summary["across_caches"], summary["deterministic"]
    pairs = summary.get("same_batches", [])

    def same(mode: str) -> bool | None:
        diffs = across.get(mode)
        return None if diffs is None else all(d is None for d in diffs)

    modes = [m for m in across if across[m] is not None]
    if not modes:
        counts = []
        for cache in ("standard", "paged"):
            got = [v for k, v in summary["answered"].items() if k.startswith(cache + " ")]
            counts.append(f"the {cache} cache answered {sum(g[0] for g in got)} of {sum(g[1] for g in got)} requests")
        return f"The caches could not be compared: {counts[0]}, {counts[1]}."
    if all(same(m) for m in modes):
        return "The standard and the paged cache gave every prompt the same answer, token for token, in every mode."
    differing = [p for p in pairs if not p[4]]
    if differing:
        mode, r_std, r_pag, composition, _ = differing[0]
        return (
            f"A cache difference: {mode} trial {r_std + 1} of the standard cache and trial {r_pag + 1} of the paged "
            f"cache began their prompts in the same batches ({composition}) and still answered differently."
        )
    if same("sequential") and same("concurrent") is False:
        unstable = [c for c in ("standard", "paged") if det.get(f"{c} concurrent") is False]
        text = (
            "The caches agree on requests sent one after another (each alone in its batches) but not on requests "
            "sent together, whose prompts began in batches that depend on when each request reached the server"
        )
        if unstable:
            who = "the standard and the paged cache each" if len(unstable) == 2 else f"the {unstable[0]} cache"
            text += f"; {who} also changed its own answers between repeats"
        if pairs:
            text += (
                f"; the {len(pairs)} standard/paged pair(s) of trials whose prompts began in the same batches "
                "answered alike"
            )
        return text + ": the differences come with batch composition, not with the cache."
    return (
        "The caches differ on requests sent one after another (each request alone in its batches): a cache difference."
    )


def _yes_no(value: bool | None) -> str:
    return "n/a" if value is None else "yes" if value else "**no**"


def shown_command(cmd: Sequence[str]) -> str:
    """A server's command line as the report shows it: the port it happened to get as PORT."""
    args = list(cmd)
    if "--port" in args[:-1]:
        args[args.index("--port") + 1] = "PORT"
    return " ".join(args)


def server_run_section(run: dict[str, Any], trials: list[Trial], summary: dict[str, Any]) -> str:
    parts = []
    first = trials[0]
    config = json.loads(run.get("params") or "{}")
    parts.append(
        f"**{_model(run)}** (run {run['run_id']}): {len(first.answers)} requests, n_predict "
        f"{config.get('n_predict')}, temperature 0, `-c {config.get('ctx')} --parallel {config.get('parallel')}"
        f"{''.join(' ' + a for a in config.get('extra') or [])}`, {config.get('repeats')} trial(s) per cache and "
        "mode, a fresh server per trial."
    )
    parts.append("")
    for cache in ("standard", "paged"):
        ts = [t for t in trials if t.cache == cache]
        if ts:
            cmd = shown_command(ts[0].command)
            parts.append(f"- {cache}: `{cmd}`")
            parts.append(f"  - KV cache: {size_lines(ts[0].kv_log, cache)}")
    parts.append("")
    rows = []
    for key, (ok, sent) in summary["answered"].items():
        cache, mode = key.split(" ", 1)
        ts = [t for t in trials if t.cache == cache and t.mode == mode]
        problems = sorted({p for t in ts for p in t.problems})
        errors = sorted({t.error for t in ts if t.error} | {a.error for t in ts for a in t.answers if a.error})
        slots = [f"{t.composition()} (slots {'/'.join(str(a.id_slot) for a in t.answers)})" for t in ts]
        rows.append(
            [
                cache,
                mode,
                f"{ok} of {sent}",
                _yes_no(summary["deterministic"].get(key)),
                "yes" if all(t.paged_active for t in ts) else "no" if cache == "paged" else "-",
                ", ".join(slots),
                excerpt("; ".join(errors + problems), 300) or "none",
            ]
        )
    headers = [
        "Cache",
        "Requests",
        "Answered",
        "Same answers every trial",
        "Paged cache used",
        "Prompts by batch, per trial",
        "Problems",
    ]
    parts += [_table(headers, rows, ["l", "l", "r", "l", "l", "l", "l"]), ""]
    diff_rows = []
    for i in range(len(first.answers)):
        row: list[Any] = [i, excerpt(first_prompt(run, i), 50)]
        for mode in summary["across_caches"]:
            diffs = summary["across_caches"][mode]
            row.append("n/a" if diffs is None else "identical" if diffs[i] is None else f"token {diffs[i]}")
        std = next((t for t in trials if t.cache == "standard" and t.answered == len(t.answers)), None)
        row.append(len(std.answers[i].tokens) if std else "-")
        row.append(excerpt(std.answers[i].content) if std else "-")
        diff_rows.append(row)
    modes = list(summary["across_caches"])
    headers = ["#", "Prompt", *[f"standard vs paged, {m}" for m in modes], "Tokens", "Answer (standard, first trial)"]
    parts += [_table(headers, diff_rows, ["r", "l", *["l"] * len(modes), "r", "l"]), ""]
    parts += [server_verdict(summary), ""]
    return "\n".join(parts)


def first_prompt(run: dict[str, Any], index: int) -> str:
    prompts = json.loads(run.get("params") or "{}").get("prompts") or []
    return str(prompts[index]) if index < len(prompts) else "?"


def server_section(runs: Sequence[dict[str, Any]]) -> str:
    found = [(r, d) for r in runs if r["kind"] == SERVER_KIND and (d := _stdout(r)) is not None]
    if not found:
        return ""
    parts = [
        "### llama-server, standard vs paged KV cache (`paged-server`)",
        "",
        "`llama-server --parallel N` of the patched build, once per cache (`--kv-cache standard` / `paged`), "
        "answering one `/completion` request per prompt (temperature 0, `ignore_eos`, token ids returned). "
        "*concurrent*: every request sent at the same moment from its own thread (the server batches the sequences; "
        "which step each prompt joins depends on timing); *sequential*: one request after another, each alone in "
        "its batches. *Same answers every trial*: the cache gave every prompt the same tokens in each repeat of the "
        "mode. *standard vs paged*: the first differing token of the two caches' answers (first trial of each). "
        "*Prompts by batch*: the prompts (by index) grouped by the server batch in which their evaluation began "
        "(from the server's debug log), and the slot that served each. *Problems*: the server's warning and error "
        "lines.",
        "",
    ]
    for run, data in found:
        trials = trials_from_dicts(data["trials"])
        parts.append(server_run_section(run, trials, summarize(trials)))
    return "\n".join(parts)


def paged_sections(runs: Sequence[dict[str, Any]]) -> list[str]:
    return [s for s in (generation_section(runs), server_section(runs)) if s]
