"""FlashAttention kernel timings from test-backend-ops perf logs, one table per log, K/V types side by side.

`test-backend-ops perf -o FLASH_ATTN_EXT` prints one line per case with its parameters and microseconds per run. This
module parses those lines (nothing else is read), groups the cases by shape, and shows each K/V type's time and the
ratios of the baselines over the candidate type, so a kernel and its baselines measured in one run are compared
without typing a number by hand.

FLASH_ATTN_PAGED lines (the paged op) join the same table: a case with one sequence and every head holding all `kv`
slots has the shape of a FLASH_ATTN_EXT case (`nr` is its GQA), under the type `paged-<type>` (with `-p<page size>`
when not 64). Several sequences of `kv` slots each, `nb` tokens spread evenly over them, have the shape of
FLASH_ATTN_EXT with one stream per sequence (`nr23=[nr,n_seq]`, `nb/n_seq` tokens per stream).
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from pyharness.errors import HarnessError
from pyharness.report import md_table

ROUND = re.compile(r"^## round \S+ env (?P<env>\S+) op ", re.M)
LINE = re.compile(r"FLASH_ATTN_(?P<op>EXT|PAGED)\((?P<params>[^)]*)\):\s+(?P<runs>\d+) runs -\s+(?P<us>[0-9.]+) us/run")
SHAPE_KEYS = ("hsk", "nr23", "kv", "nb")


@dataclass(frozen=True)
class FaCase:
    params: dict[str, str]
    us: float

    @property
    def shape(self) -> tuple[str, ...]:
        return tuple(self.params.get(k, "") for k in SHAPE_KEYS)

    @property
    def kv_type(self) -> str:
        if "type_KV" in self.params:  # the paged op
            name = f"paged-{self.params['type_KV']}"
            if self.params.get("page_size", "64") != "64":
                name += f"-p{self.params['page_size']}"
            return name
        k, v = self.params.get("type_K", "?"), self.params.get("type_V", "?")
        return k if k == v else f"{k}/{v}"


def split_params(text: str) -> dict[str, str]:
    """`a=1,b=[4,1],c=x` -> {'a': '1', 'b': '[4,1]', 'c': 'x'} (commas inside brackets belong to the value)."""
    out: dict[str, str] = {}
    depth, start = 0, 0
    for i, ch in enumerate(text + ","):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            key, _, value = text[start:i].partition("=")
            if key:
                out[key.strip()] = value.strip()
            start = i + 1
    return out


def parse(text: str) -> list[FaCase]:
    cases = []
    for m in LINE.finditer(text):
        params = split_params(m["params"])
        if m["op"] == "PAGED":
            if params.get("uneven", "0") != "0" or params.get("hsk") != params.get("hsv"):
                continue  # no flash_attn_ext shape to stand beside
            n_seq = int(params.get("n_seq", "1"))
            nb = int(params.get("nb", "1"))
            if nb % n_seq != 0:
                continue  # sequences of unequal token counts: no flash_attn_ext shape
            params["nr23"] = f"[{params.get('nr', '1')},{n_seq}]"
            params["nb"] = str(nb // n_seq)
        cases.append(FaCase(params, float(m["us"])))
    return cases


def select_env(text: str, env: str) -> str:
    """The sections of a gpu-check perf-env log (`## round R env VAR=VALUE op OP regex ...` headings) run under `env`,
    every round's, joined: the baseline and the candidate of one environment, from the same rounds."""
    heads = list(ROUND.finditer(text))
    if not heads:
        raise HarnessError("no `## round R env VAR=VALUE` headings: --env needs gpu-check's perf-env.log")
    found = sorted({h["env"] for h in heads})
    if env not in found:
        raise HarnessError(f"no section run under {env!r} in the log (environments found: {', '.join(found)})")
    ends = [h.start() for h in heads[1:]] + [len(text)]
    return "".join(text[h.start() : end] for h, end in zip(heads, ends, strict=True) if h["env"] == env)


def gqa(nr23: str) -> str:
    return nr23.strip("[]").split(",")[0]


def streams(nr23: str) -> str:
    """Sequences, each with K/V of its own (flash_attn_ext's ne[3])."""
    parts = nr23.strip("[]").split(",")
    return parts[1] if len(parts) > 1 else "1"


def table(cases: list[FaCase], candidate: str, baselines: tuple[str, ...] = ("f16", "q8_0")) -> str:
    """Markdown: one row per shape, median us per K/V type, and baseline / candidate ratios (> 1: candidate faster)."""
    if not cases:
        raise HarnessError(
            "no FLASH_ATTN_EXT perf lines found: pass the output of `test-backend-ops perf -o FLASH_ATTN_EXT`"
        )
    times: dict[tuple[str, ...], dict[str, list[float]]] = {}
    for c in cases:
        times.setdefault(c.shape, {}).setdefault(c.kv_type, []).append(c.us)
    types = [t for t in (*baselines, candidate) if any(t in v for v in times.values())]
    if candidate not in types:
        raise HarnessError(
            f"no case with K/V type {candidate!r} in the log (types found: {sorted({c.kv_type for c in cases})})"
        )
    ratios = [b for b in baselines if b in types]
    with_seqs = any(streams(shape[1]) != "1" for shape in times)
    headers = ["head dim", "GQA", *(["seqs"] if with_seqs else []), "kv", "nb"]
    headers += [*[f"{t} (us)" for t in types], *[f"{b} / {candidate}" for b in ratios]]
    body = []
    for shape in sorted(
        times,
        key=lambda s: tuple(int(x) if x.isdigit() else 0 for x in (s[0], gqa(s[1]), streams(s[1]), s[2], s[3])),
    ):
        med = {t: statistics.median(v) for t, v in times[shape].items()}
        row = [shape[0], gqa(shape[1]), *([streams(shape[1])] if with_seqs else []), shape[2], shape[3]]
        row += [f"{med[t]:.2f}" if t in med else "-" for t in types]
        row += [f"{med[b] / med[candidate]:.2f}x" if b in med and candidate in med else "-" for b in ratios]
        body.append(row)
    return md_table(headers, body, ["r"] * len(headers))


def render(log: Path, candidate: str, env: str | None = None) -> str:
    if not log.is_file():
        raise HarnessError(f"{log}: no such file (a test-backend-ops perf log, e.g. gpu-check's int8-kernel-perf.log)")
    text = log.read_text(errors="replace")
    return table(parse(select_env(text, env) if env else text), candidate)
