"""`pyharness bench`: llama-bench of a built variant with `-o jsonl`, every repetition kept.

Each jsonl line is one llama-bench test: its fields become a row of the upstream `llama_bench` table (typed the way
llama-bench's own sql printer types them, so upstream's compare-llama-bench.py reads it), and its `samples_ns` /
`samples_ts` become `bench_sample` rows. test-backend-ops `--output sql` output is parsed here too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from pyharness.errors import HarnessError
from pyharness.runners import Execution, RunContext, config_hash, execute, run_fields, tool_env
from pyharness.runners.perplexity import check_kv_fa, check_kv_type, normalize_fa
from pyharness.store import LLAMA_BENCH_COLUMNS, TEST_BACKEND_OPS_COLUMNS, BenchTest, RunRecord


class ParseError(ValueError):
    pass


def _ints(values: Sequence[int | str]) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


@dataclass(frozen=True)
class BenchParams:
    """llama-bench settings; every tuple is a llama-bench list (it runs the cross product)."""

    n_prompt: tuple[int, ...] = (512,)
    n_gen: tuple[int, ...] = (128,)
    depth: tuple[int, ...] = (0,)
    cache_type_k: tuple[str, ...] = ("f16",)
    cache_type_v: tuple[str, ...] = ("f16",)
    flash_attn: tuple[str, ...] = ("auto",)
    repetitions: int = 5
    n_gpu_layers: tuple[int, ...] = ()
    threads: tuple[int, ...] = ()
    batch: tuple[int, ...] = ()
    ubatch: tuple[int, ...] = ()
    extra: tuple[str, ...] = ()

    def validate(self) -> BenchParams:
        if self.repetitions < 1:
            raise HarnessError(f"repetitions must be at least 1, got {self.repetitions}")
        if not self.n_prompt and not self.n_gen:
            raise HarnessError("a bench needs prompt sizes (-p) or generation lengths (-n)")
        for size in (*self.n_prompt, *self.n_gen, *self.depth):
            if int(size) < 0:
                raise HarnessError(f"negative size {size} in a bench")
        for t in self.cache_type_k:
            check_kv_type(t, "K cache type")
        for t in self.cache_type_v:
            check_kv_type(t, "V cache type")
        fa = tuple(normalize_fa(f) for f in self.flash_attn)
        for v in self.cache_type_v:
            for f in fa:
                for k in self.cache_type_k:
                    check_kv_fa(v, f, k)
        return replace(
            self,
            n_prompt=_ints(self.n_prompt),
            n_gen=_ints(self.n_gen),
            depth=_ints(self.depth),
            flash_attn=fa,
            n_gpu_layers=_ints(self.n_gpu_layers),
            threads=_ints(self.threads),
            batch=_ints(self.batch),
            ubatch=_ints(self.ubatch),
            extra=tuple(self.extra),
        )

    def args(self) -> list[str]:
        def join(values: Sequence[object]) -> str:
            return ",".join(str(v) for v in values)

        out = [
            "-p",
            join(self.n_prompt) or "0",
            "-n",
            join(self.n_gen) or "0",
            "-d",
            join(self.depth) or "0",
            "-ctk",
            join(self.cache_type_k),
            "-ctv",
            join(self.cache_type_v),
            "-fa",
            join(self.flash_attn),
            "-r",
            str(self.repetitions),
        ]
        for flag, values in (
            ("-ngl", self.n_gpu_layers),
            ("-t", self.threads),
            ("-b", self.batch),
            ("-ub", self.ubatch),
        ):
            if values:
                out += [flag, join(values)]
        return out + list(self.extra)

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def identity(self) -> dict[str, Any]:
        """Threads are part of a bench's identity (unlike perplexity): they change the numbers measured."""
        return self.as_dict()


# ------------------------------------------------------------------------------------------------ parsing

_TYPES = dict(LLAMA_BENCH_COLUMNS)


def sql_value(name: str, value: Any, types: dict[str, str] = _TYPES) -> Any:
    """A jsonl value as llama-bench's sql printer stores it: bools and ints as INTEGER, floats REAL, text TEXT."""
    kind = types.get(name)
    if isinstance(value, bool):
        return int(value)
    if kind == "INTEGER":
        return int(value)
    if kind == "REAL":
        return float(value)
    if kind == "TEXT":
        return str(value)
    return value  # a field this schema does not know: keep the jsonl type (store adds the column)


def jsonl_objects(text: str, tool: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each line of a tool's jsonl output; blank lines are skipped, anything else that is not
    a JSON object is a ParseError naming the tool and the line."""
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ParseError(f"{tool} jsonl line {number} is not JSON: {line[:80]!r} ({exc})") from exc
        if not isinstance(obj, dict):
            raise ParseError(f"{tool} jsonl line {number} is not an object")
        yield number, obj


def parse_bench_jsonl(text: str) -> list[BenchTest]:
    """Every test in llama-bench `-o jsonl` output (one JSON object per line)."""
    tests: list[BenchTest] = []
    for number, obj in jsonl_objects(text, "llama-bench"):
        samples_ns = obj.pop("samples_ns", None)
        samples_ts = obj.pop("samples_ts", None)
        if samples_ns is None or samples_ts is None:
            raise ParseError(f"llama-bench jsonl line {number} has no samples_ns/samples_ts")
        if len(samples_ns) != len(samples_ts):
            raise ParseError(
                f"llama-bench jsonl line {number}: {len(samples_ns)} samples_ns but {len(samples_ts)} samples_ts"
            )
        missing = [c for c in ("build_commit", "n_prompt", "n_gen", "n_depth", "avg_ts", "test_time") if c not in obj]
        if missing:
            raise ParseError(f"llama-bench jsonl line {number} lacks {', '.join(missing)}")
        row = {k: sql_value(k, v) for k, v in obj.items()}
        tests.append(
            BenchTest(row=row, samples_ns=[int(x) for x in samples_ns], samples_ts=[float(x) for x in samples_ts])
        )
    return tests


_INSERT_RE = re.compile(r"^INSERT INTO (\w+) \(([^)]*)\) VALUES \((.*)\);\s*$")
_CREATE_RE = re.compile(r"CREATE TABLE IF NOT EXISTS (\w+) \((.*?)\);", re.DOTALL)


def parse_sql_schema(text: str) -> dict[str, list[tuple[str, str]]]:
    """{table: [(column, type), ...]} from the CREATE TABLE statements an upstream `sql` printer writes."""
    tables: dict[str, list[tuple[str, str]]] = {}
    for name, body in _CREATE_RE.findall(text):
        cols = []
        for part in body.split(","):
            bits = part.split()
            if len(bits) >= 2:
                cols.append((bits[0], bits[1]))
        tables[name] = cols
    return tables


def _split_values(text: str) -> list[str]:
    """The values of an upstream INSERT: '...' quoted, comma separated, no escaping (as the printers write them)."""
    values = []
    rest = text.strip()
    while rest:
        if not rest.startswith("'"):
            raise ParseError(f"unexpected SQL value list near {rest[:40]!r}")
        end = rest.find("', '", 1)
        if end < 0:
            if not rest.endswith("'"):
                raise ParseError(f"unterminated SQL value near {rest[:40]!r}")
            values.append(rest[1:-1])
            break
        values.append(rest[1:end])
        rest = rest[end + 3 :]
    return values


def parse_sql_inserts(text: str, table: str) -> list[dict[str, str]]:
    """Rows of `INSERT INTO table (...) VALUES (...);` lines, values as text (SQLite's column affinity types them)."""
    rows = []
    for line in text.splitlines():
        match = _INSERT_RE.match(line.strip())
        if not match or match.group(1) != table:
            continue
        names = [n.strip() for n in match.group(2).split(",")]
        values = _split_values(match.group(3))
        if len(names) != len(values):
            raise ParseError(f"INSERT INTO {table}: {len(names)} columns but {len(values)} values")
        rows.append(dict(zip(names, values, strict=True)))
    return rows


def parse_backend_ops_sql(text: str) -> list[dict[str, Any]]:
    """test-backend-ops `--output sql` rows, typed like its CREATE TABLE."""
    types = dict(TEST_BACKEND_OPS_COLUMNS)
    out = []
    for row in parse_sql_inserts(text, "test_backend_ops"):
        typed: dict[str, Any] = {}
        for name, value in row.items():
            kind = types.get(name, "TEXT")
            typed[name] = int(value) if kind == "INTEGER" else float(value) if kind == "REAL" else value
        out.append(typed)
    return out


# ------------------------------------------------------------------------------------------------ the runs


def bench_config(ctx: RunContext, params: BenchParams) -> tuple[str, dict[str, Any]]:
    stored = params.as_dict()
    return config_hash("bench", ctx.build, ctx.host, ctx.model, params.identity()), stored


def run_bench(ctx: RunContext, params: BenchParams) -> RunRecord:
    """Run llama-bench once and return the record to store (status 'failed' with the log when it fails)."""
    params = params.validate()
    chash, stored = bench_config(ctx, params)
    tool = ctx.build.tool("llama-bench")
    cmd = [str(tool), "-m", str(ctx.model.path), *params.args(), "-o", "jsonl"]
    fields = run_fields("bench", ctx, stored, chash)
    exe = execute(cmd, env=tool_env(ctx.build), timeout_s=ctx.timeout_s, echo=ctx.echo)
    return bench_record(fields, exe)


def bench_record(fields: dict[str, Any], exe: Execution) -> RunRecord:
    """The record of a finished llama-bench process: 'ok' with every test and sample, or 'failed' with the reason."""
    fields = {**fields, **exe.fields()}
    if error := exe.failure("llama-bench"):
        fields.update(status="failed", error=error)
        return RunRecord(fields=fields)
    try:
        tests = parse_bench_jsonl(exe.stdout)
    except ParseError as exc:
        fields.update(status="failed", error=str(exc))
        return RunRecord(fields=fields)
    if not tests:
        fields.update(status="failed", error="llama-bench printed no results" + _tail(exe.stderr))
        return RunRecord(fields=fields)
    fields.update(status="ok", error=None)
    return RunRecord(fields=fields, bench=tests)


@dataclass(frozen=True)
class OpsParams:
    """test-backend-ops settings: mode (perf or test), op names/regexes (-o), params regex (-p), backend (-b)."""

    mode: str = "perf"
    ops: str = ""
    params_regex: str = ""
    backend_name: str = ""

    def args(self) -> list[str]:
        out = [self.mode]
        if self.ops:
            out += ["-o", self.ops]
        if self.params_regex:
            out += ["-p", self.params_regex]
        if self.backend_name:
            out += ["-b", self.backend_name]
        return [*out, "--output", "sql"]


def run_backend_ops(ctx: RunContext, params: OpsParams) -> RunRecord:
    """Run test-backend-ops once with `--output sql`; its rows go to the upstream `test_backend_ops` table."""
    if params.mode not in ("perf", "test"):
        raise HarnessError(f"test-backend-ops mode {params.mode!r} is not stored", "use perf or test")
    tool = ctx.build.tool("test-backend-ops")
    cmd = [str(tool), *params.args()]
    fields = run_fields("ops", ctx, asdict(params))
    exe = execute(cmd, env=tool_env(ctx.build), timeout_s=ctx.timeout_s, echo=ctx.echo)
    fields.update(exe.fields())
    if error := exe.failure("test-backend-ops"):
        fields.update(status="failed", error=error)
        return RunRecord(fields=fields)
    try:
        rows = parse_backend_ops_sql(exe.stdout)
    except ParseError as exc:
        fields.update(status="failed", error=str(exc))
        return RunRecord(fields=fields)
    if not rows:
        fields.update(status="failed", error="test-backend-ops printed no results (do -o/-p match any test?)")
        return RunRecord(fields=fields)
    fields.update(status="ok", error=None)
    return RunRecord(fields=fields, backend_ops=rows)


def _tail(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return f": {lines[-1].strip()}" if lines else ""
