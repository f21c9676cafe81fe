"""llama-needle runs (`kind = "retrieval"` in a matrix): needle-in-a-haystack accuracy under KV-cache compression.

llama-needle (patched builds only, feature kv-compress) prefills, for every trial, one prompt: a wikitext haystack
cut from the text (`-f`) at a seeded random offset, the key(s) planted at a depth, then a question. Then, for each
configuration (method `full` once at rate 1; every other method, kvc / uniform / streaming, at every rate R, a budget
of length / R slots per (layer, KV head)), it copies the prefilled sequence, compresses the copy, greedy-decodes the
answer and scores it. It prints one JSON object per line per (trial, configuration) on stdout and nothing else there:

    {"length": 4096, "depth": 0.1, "trial": 0, "keys": 1, "method": "kvc", "rate": 4.0, "budget": 1024,
     "expected": "48213", "output": "48213.", "correct": true, "n_prompt": 4096, "kv_bytes": 123, "kv_bytes_full": 456,
     "kv_ratio": 0.2697, "t_prefill_ms": 812.5, "t_compress_ms": 3.1, "t_decode_ms": 40.2}

The runner passes the eval's values as the tool's `--needle-*` flags (and a fixed `--seed`, so every cell cuts the
same haystacks), checks every line (keys, types, values among those asked for, no repeats, every expected line there)
and stores one `retrieval` row per line. A malformed line, a missing or unexpected result, or a non-zero exit fails
the run; the rows of a tool that failed part way are kept beside the failed run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pyharness.errors import HarnessError
from pyharness.runners import Execution, RunContext, cache_and_run_args, config_hash, execute, run_fields, tool_env
from pyharness.runners.bench import ParseError, jsonl_objects
from pyharness.runners.perplexity import check_kv_fa, check_kv_type, normalize_fa
from pyharness.store import RunRecord
from pyharness.text import cached_sha256

KIND = "retrieval"
TOOL = "llama-needle"
METHODS = ("full", "kvc", "uniform", "streaming")
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
DEFAULT_RATES = (2.0, 2.5, 4.0, 8.0)
MIN_LENGTH = 256
# the haystacks' seed: fixed, so that every cell of a matrix (every cache type, build and extra flag) answers the same
# trials (llama.cpp's common --seed defaults to a random one)
SEED = 1234
# arguments the runner sets itself (from the eval and [flags]); [flags] extra must not repeat them
OWN_ARGS = (
    "-m",
    "--model",
    "-f",
    "--file",
    "-c",
    "--ctx-size",
    "-s",
    "--seed",
    "--needle-lengths",
    "--needle-depths",
    "--needle-trials",
    "--needle-keys",
    "--needle-methods",
    "--needle-rates",
)
# the common tools' compression schedule: llama-needle compresses each configuration itself (methods x rates), so a
# schedule on its context would compress the prefilled sequence before the configurations see it
SCHEDULE_ARGS = ("--kv-compress", "--kv-compress-budget", "--kv-compress-rate", "--kv-compress-every")

# the keys of every line and their types (bool is not an int here; a float field takes an integer too)
LINE_TYPES: dict[str, tuple[type, ...]] = {
    "length": (int,),
    "depth": (float, int),
    "trial": (int,),
    "keys": (int,),
    "method": (str,),
    "rate": (float, int),
    "budget": (int,),
    "expected": (str,),
    "output": (str,),
    "correct": (bool,),
    "n_prompt": (int,),
    "kv_bytes": (int,),
    "kv_bytes_full": (int,),
    "kv_ratio": (float, int),
    "t_prefill_ms": (float, int),
    "t_compress_ms": (float, int),
    "t_decode_ms": (float, int),
}
TOLERANCE = 1e-6  # a depth or rate printed by the tool matches the one asked for within this


def number_arg(value: float) -> str:
    """A depth or rate as a command-line argument: 2.0 -> '2', 2.5 -> '2.5', 0.1 -> '0.1' (exact, no rounding)."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def default_ctx(lengths: list[int]) -> int:
    """The prefilled sequence and its compressed copy share one pool: twice the longest prompt, plus room to answer."""
    return 2 * max(lengths) + 256


@dataclass
class RetrievalParams:
    """One llama-needle run: the eval's values and the cell's [flags]."""

    lengths: list[int]
    depths: list[float] = field(default_factory=lambda: list(DEFAULT_DEPTHS))
    trials: int = 50
    keys: int = 1
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    rates: list[float] = field(default_factory=lambda: list(DEFAULT_RATES))
    ctx: int = 0  # 0: default_ctx(lengths)
    seed: int = SEED
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: str = "auto"
    threads: int | None = None
    batch: int | None = None
    ubatch: int | None = None
    n_gpu_layers: int | None = None
    extra: list[str] = field(default_factory=list)

    def validate(self) -> RetrievalParams:
        """Checked, with the context resolved and the numbers typed."""
        if not self.lengths or any(int(v) < MIN_LENGTH for v in self.lengths):
            raise HarnessError(f"retrieval lengths must be integers >= {MIN_LENGTH}, got {self.lengths}")
        if not self.depths or any(not 0 < float(d) < 1 for d in self.depths):
            raise HarnessError(f"retrieval depths must lie strictly between 0 and 1, got {self.depths}")
        if self.trials < 1 or self.keys < 1:
            raise HarnessError(f"retrieval trials and keys must be at least 1, got {self.trials} and {self.keys}")
        unknown = [m for m in self.methods if m not in METHODS]
        if not self.methods or unknown:
            raise HarnessError(f"unknown retrieval methods {unknown or self.methods}", f"use: {', '.join(METHODS)}")
        if not self.rates or any(float(r) < 1 for r in self.rates):
            raise HarnessError(f"retrieval rates must be at least 1, got {self.rates}")
        own = [a for a in self.extra if a in OWN_ARGS]
        if own:
            raise HarnessError(f"extra arguments {' '.join(own)} are set by the retrieval evaluation itself")
        schedule = [a for a in self.extra if a in SCHEDULE_ARGS]
        if schedule:
            raise HarnessError(
                f"extra arguments {' '.join(schedule)} put compression on a schedule; {TOOL} compresses each "
                "configuration itself",
                "set methods and rates in the [[eval]] (--kv-compress-window, -sink and -obs may stay in extra)",
            )
        check_kv_type(self.cache_type_k, "K cache type")
        check_kv_type(self.cache_type_v, "V cache type")
        fa = normalize_fa(self.flash_attn)
        check_kv_fa(self.cache_type_v, fa, self.cache_type_k)
        lengths = [int(v) for v in self.lengths]
        ctx = self.ctx or default_ctx(lengths)
        if ctx <= max(lengths):
            raise HarnessError(f"retrieval ctx {ctx} does not hold a prompt of {max(lengths)} tokens")
        return replace(
            self,
            lengths=lengths,
            depths=[float(d) for d in self.depths],
            methods=list(dict.fromkeys(self.methods)),
            rates=[float(r) for r in self.rates],
            ctx=ctx,
            flash_attn=fa,
            extra=list(self.extra),
        )

    def configs(self) -> list[tuple[str, float]]:
        """(method, rate) in the tool's order: full once at rate 1, then every other method at every rate."""
        out: list[tuple[str, float]] = [("full", 1.0)] if "full" in self.methods else []
        out += [(m, float(r)) for m in self.methods if m != "full" for r in self.rates]
        return out

    def expected_lines(self) -> int:
        return len(self.lengths) * len(self.depths) * self.trials * len(self.configs())

    def args(self) -> list[str]:
        out = [
            "-c",
            str(self.ctx),
            "--needle-lengths",
            ",".join(str(v) for v in self.lengths),
            "--needle-depths",
            ",".join(number_arg(d) for d in self.depths),
            "--needle-trials",
            str(self.trials),
            "--needle-keys",
            str(self.keys),
            "--needle-methods",
            ",".join(self.methods),
            "--needle-rates",
            ",".join(number_arg(r) for r in self.rates),
            "--seed",
            str(self.seed),
            *cache_and_run_args(self),
        ]
        return out + list(self.extra)


# ------------------------------------------------------------------------------------------------ parsing


def _match(value: float, allowed: list[float]) -> float | None:
    """The requested value `value` stands for (within TOLERANCE), or None."""
    return next((a for a in allowed if abs(a - value) <= TOLERANCE), None)


def check_line(number: int, obj: dict[str, Any], params: RetrievalParams) -> dict[str, Any]:
    """One line as a `retrieval` row, or a ParseError naming the line and what is wrong with it."""
    where = f"{TOOL} line {number}"
    missing = [k for k in LINE_TYPES if k not in obj]
    if missing:
        raise ParseError(f"{where} lacks {', '.join(missing)}")
    for key, types in LINE_TYPES.items():
        value = obj[key]
        ok = isinstance(value, types) and (bool not in types) == (not isinstance(value, bool))
        if ok and isinstance(value, float) and not math.isfinite(value):
            ok = False
        if not ok:
            want = " or ".join(t.__name__ for t in types)
            raise ParseError(f"{where}: {key} = {value!r} is not a finite {want}")
    row = {k: obj[k] for k in LINE_TYPES}
    if row["length"] not in params.lengths:
        raise ParseError(f"{where}: length {row['length']} was not asked for ({params.lengths})")
    depth = _match(float(row["depth"]), params.depths)
    if depth is None:
        raise ParseError(f"{where}: depth {row['depth']} was not asked for ({params.depths})")
    if not 0 <= row["trial"] < params.trials:
        raise ParseError(f"{where}: trial {row['trial']} is outside 0..{params.trials - 1}")
    if row["keys"] != params.keys:
        raise ParseError(f"{where}: keys = {row['keys']}, asked for {params.keys}")
    configs = params.configs()
    rate = _match(float(row["rate"]), [r for m, r in configs if m == row["method"]])
    if rate is None:
        raise ParseError(
            f"{where}: method {row['method']!r} at rate {row['rate']} was not asked for "
            f"({', '.join(f'{m} {r:g}' for m, r in configs)})"
        )
    if row["kv_bytes_full"] < 1 or row["kv_bytes"] < 0:
        raise ParseError(f"{where}: kv_bytes = {row['kv_bytes']}, kv_bytes_full = {row['kv_bytes_full']}")
    row.update(depth=depth, rate=rate, kv_ratio=float(row["kv_ratio"]), correct=int(row["correct"]))
    for key in ("t_prefill_ms", "t_compress_ms", "t_decode_ms"):
        row[key] = float(row[key])
    return row


def parse_lines(text: str, params: RetrievalParams, *, complete: bool = True) -> list[dict[str, Any]]:
    """The tool's lines as `retrieval` rows (row_index in output order). Each line is checked (check_line); a
    (length, depth, trial, method, rate) printed twice is an error, and with `complete` so is any expected line not
    printed."""
    rows: list[dict[str, Any]] = []
    seen: dict[tuple[Any, ...], int] = {}
    for number, obj in jsonl_objects(text, TOOL):
        row = check_line(number, obj, params)
        key = (row["length"], row["depth"], row["trial"], row["method"], row["rate"])
        if key in seen:
            raise ParseError(
                f"{TOOL} line {number} repeats line {seen[key]} (length, depth, trial, method, rate {key})"
            )
        seen[key] = number
        rows.append({"row_index": len(rows), **row})
    if complete and len(rows) != params.expected_lines():
        configs = params.configs()
        missing = next(
            (
                (length, depth, trial, method, rate)
                for length in params.lengths
                for depth in params.depths
                for trial in range(params.trials)
                for method, rate in configs
                if (length, depth, trial, method, rate) not in seen
            ),
            None,
        )
        raise ParseError(
            f"{TOOL} printed {len(rows)} of the {params.expected_lines()} results asked for "
            f"({len(params.lengths)} lengths x {len(params.depths)} depths x {params.trials} trials x "
            f"{len(configs)} configurations); the first missing: length, depth, trial, method, rate = {missing}"
        )
    return rows


def retrieval_record(fields: dict[str, Any], exe: Execution, params: RetrievalParams) -> RunRecord:
    """The record of a finished llama-needle process: 'ok' with one row per line when every expected line is there
    and well formed, else 'failed' with the reason (a tool that failed part way keeps the rows it printed)."""
    fields = {**fields, **exe.fields()}
    failure = exe.failure(TOOL)
    if failure is not None:
        try:
            rows = parse_lines(exe.stdout, params, complete=False)
        except ParseError:
            rows = []  # a run killed mid-line: its error is the failure, not the cut line
        fields.update(status="failed", error=failure)
        return RunRecord(fields=fields, retrieval=rows)
    try:
        rows = parse_lines(exe.stdout, params)
    except ParseError as exc:
        fields.update(status="failed", error=str(exc))
        return RunRecord(fields=fields)
    fields.update(status="ok", error=None)
    return RunRecord(fields=fields, retrieval=rows)


def retrieval_config(ctx: RunContext, params: RetrievalParams, text: Path) -> tuple[str, dict[str, Any], str]:
    """(config hash, params as stored, text sha256) of a run, without running anything."""
    params = params.validate()
    text_sha = cached_sha256(text)
    stored = asdict(params)
    return config_hash(KIND, ctx.build, ctx.host, ctx.model, stored, text_sha), stored, text_sha


def run_retrieval(ctx: RunContext, params: RetrievalParams, text: Path) -> RunRecord:
    """Run llama-needle once and return the record to store."""
    params = params.validate()
    chash, stored, text_sha = retrieval_config(ctx, params, text)
    tool = ctx.build.tool(TOOL)
    cmd = [str(tool), "-m", str(ctx.model.path), "-f", str(text), *params.args()]
    fields = {**run_fields(KIND, ctx, stored, chash), "text_path": str(text), "text_sha256": text_sha}
    exe = execute(cmd, env=tool_env(ctx.build), timeout_s=ctx.timeout_s, echo=ctx.echo)
    return retrieval_record(fields, exe, params)
