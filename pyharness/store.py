"""The results store: one SQLite file, one row per run with full provenance, written in one transaction per run.

Tables
------
`llama_bench`, `test_backend_ops`
    Exactly the tables (names, columns, column types) that `llama-bench -o sql` and `test-backend-ops --output sql`
    create, so upstream's `scripts/compare-llama-bench.py -i results.sqlite` reads this file directly. One extra
    column, `pyharness_run_id`, links each row to `runs` (upstream's scripts name their columns, so they ignore it).
    Output of `llama-bench -o sql | sqlite3 results.sqlite` can be added by hand; its rows have no run id.
`runs`
    Provenance and status of every run: build (variant, backend, commits, patch-series hash, flags, compiler), host
    (CPU, GPU, driver, CUDA), model and text hashes, every parameter, the command line, timestamps, the raw output,
    the configuration hash (`config_hash`) matrices resume by, and `status` ('ok' or 'failed' with `error`).
`perplexity`, `kld`
    Parsed llama-perplexity results (final PPL and its error; the KL-divergence statistics against a base run).
`bench_test`, `bench_sample`
    One row per llama-bench test (with mean, median and stdev of t/s) and one per repetition (every `samples_ns`
    and `samples_ts` value).
`feature_eval`
    Generic evaluations of patch features: run id, feature, metric, value, unit.
`batched_bench`, `kv_memory`
    llama-batched-bench runs (`pyharness.runners.batched`): one row per requested (pp, tg, pl) with its status ('ok',
    'skipped' when it did not fit the context, 'failed', 'not run') and the tool's jsonl fields; and per run the KV
    cache's memory as llama.cpp logged it (the cache's cells or pages and pool, K/V/positions MiB, buffers).
`retrieval`
    llama-needle runs (`pyharness.runners.retrieval`): one row per (trial, configuration) the tool printed: the
    prompt's length and the key's depth, the trial, the method (full, kvc, uniform, streaming) and rate with its
    budget, the expected and generated answers and whether they match, the KV bytes the compressed copy holds against
    the uncompressed sequence, and the prefill, compression and decoding times.
`matrix_runs`
    One row per `pyharness matrix` invocation that ran cells: executor, wall time, counts, and the nodes cells ran on
    (`pyharness scaling` compares a serial and a parallel invocation of one matrix).

A run's rows are written after its process has finished, in one `BEGIN IMMEDIATE ... COMMIT`: an interrupted run
leaves nothing behind, and a matrix resumes by looking up `config_hash` among the 'ok' runs.
"""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyharness import paths
from pyharness.errors import HarnessError

DB_ENV = "PYHARNESS_DB"
SCHEMA_VERSION = 1
RUN_LINK_COLUMN = "pyharness_run_id"

# tools/llama-bench/llama-bench.cpp: test::get_fields() in order, typed by sql_printer::get_sql_field_type
# (STRING -> TEXT, BOOL/INT -> INTEGER, FLOAT -> REAL). tests/test_store.py checks this against the CREATE TABLE
# our build prints (tests/fixtures/llama-bench-sql.txt).
LLAMA_BENCH_COLUMNS: tuple[tuple[str, str], ...] = (
    ("build_commit", "TEXT"),
    ("build_number", "INTEGER"),
    ("cpu_info", "TEXT"),
    ("gpu_info", "TEXT"),
    ("backends", "TEXT"),
    ("model_filename", "TEXT"),
    ("model_type", "TEXT"),
    ("model_size", "INTEGER"),
    ("model_n_params", "INTEGER"),
    ("n_batch", "INTEGER"),
    ("n_ubatch", "INTEGER"),
    ("n_threads", "INTEGER"),
    ("cpu_mask", "TEXT"),
    ("cpu_strict", "INTEGER"),
    ("poll", "INTEGER"),
    ("type_k", "TEXT"),
    ("type_v", "TEXT"),
    ("n_gpu_layers", "INTEGER"),
    ("n_cpu_moe", "INTEGER"),
    ("split_mode", "TEXT"),
    ("main_gpu", "INTEGER"),
    ("no_kv_offload", "INTEGER"),
    ("flash_attn", "INTEGER"),
    ("devices", "TEXT"),
    ("tensor_split", "TEXT"),
    ("tensor_buft_overrides", "TEXT"),
    ("load_mode", "TEXT"),
    ("lazy_mode", "TEXT"),
    ("embeddings", "INTEGER"),
    ("no_op_offload", "INTEGER"),
    ("no_host", "INTEGER"),
    ("repack", "INTEGER"),
    ("fit_target", "INTEGER"),
    ("fit_min_ctx", "INTEGER"),
    ("n_prompt", "INTEGER"),
    ("n_gen", "INTEGER"),
    ("n_depth", "INTEGER"),
    ("test_time", "TEXT"),
    ("avg_ns", "INTEGER"),
    ("stddev_ns", "INTEGER"),
    ("avg_ts", "REAL"),
    ("stddev_ts", "REAL"),
)

# tests/test-backend-ops.cpp: test_result::get_fields() / get_field_type(), same mapping.
TEST_BACKEND_OPS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("test_time", "TEXT"),
    ("build_commit", "TEXT"),
    ("backend_name", "TEXT"),
    ("op_name", "TEXT"),
    ("op_params", "TEXT"),
    ("test_mode", "TEXT"),
    ("supported", "INTEGER"),
    ("passed", "INTEGER"),
    ("error_message", "TEXT"),
    ("time_us", "REAL"),
    ("flops", "REAL"),
    ("bandwidth_gb_s", "REAL"),
    ("memory_kb", "INTEGER"),
    ("n_runs", "INTEGER"),
    ("device_description", "TEXT"),
    ("backend_reg_name", "TEXT"),
)

RUN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("run_id", "INTEGER PRIMARY KEY AUTOINCREMENT"),
    ("kind", "TEXT NOT NULL"),
    ("status", "TEXT NOT NULL CHECK (status IN ('ok', 'failed'))"),
    ("error", "TEXT"),
    ("config_hash", "TEXT NOT NULL"),
    ("config", "TEXT NOT NULL"),
    ("matrix", "TEXT"),
    ("cell", "TEXT"),
    ("variant", "TEXT"),
    ("backend", "TEXT"),
    ("source_commit", "TEXT"),
    ("upstream_commit", "TEXT"),
    ("series_hash", "TEXT"),
    ("series_in_sync", "INTEGER"),
    ("build_id", "TEXT"),
    ("build_dir", "TEXT"),
    ("cmake_flags", "TEXT"),
    ("compiler", "TEXT"),
    ("build_cuda_version", "TEXT"),
    ("built_at", "TEXT"),
    ("host_name", "TEXT"),
    ("host_cpu", "TEXT"),
    ("host_cpu_count", "INTEGER"),
    ("host_os", "TEXT"),
    ("host_memory_gib", "REAL"),
    ("gpu_name", "TEXT"),
    ("gpu_count", "INTEGER"),
    ("gpu_driver", "TEXT"),
    ("cuda_version", "TEXT"),
    ("model_name", "TEXT"),
    ("model_path", "TEXT"),
    ("model_sha256", "TEXT"),
    ("model_size", "INTEGER"),
    ("text_path", "TEXT"),
    ("text_sha256", "TEXT"),
    ("params", "TEXT NOT NULL"),
    ("command", "TEXT"),
    ("started_at", "TEXT"),
    ("finished_at", "TEXT"),
    ("duration_s", "REAL"),
    ("exit_code", "INTEGER"),
    ("other_cpu", "REAL"),
    ("stdout", "TEXT"),
    ("stderr", "TEXT"),
    ("harness_version", "TEXT"),
    ("gpu_visible", "TEXT"),  # CUDA_VISIBLE_DEVICES the run's tools saw (set by Ray for a GPU task), if any
)

# One row per `pyharness matrix` invocation that ran cells: which executor, its wall time, and where cells ran.
MATRIX_RUN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("matrix_run_id", "INTEGER PRIMARY KEY AUTOINCREMENT"),
    ("matrix", "TEXT NOT NULL"),
    ("executor", "TEXT NOT NULL"),
    ("address", "TEXT"),
    ("started_at", "TEXT"),
    ("finished_at", "TEXT"),
    ("seconds", "REAL"),
    ("setup_seconds", "REAL"),  # before the first cell was submitted (Ray: connecting, surveying nodes)
    ("cells_seconds", "REAL"),  # from the first cell's submission to the last cell's result
    ("ran", "INTEGER"),
    ("ok", "INTEGER"),
    ("failed", "INTEGER"),
    ("skipped", "INTEGER"),
    ("host_name", "TEXT"),
    ("gpu_name", "TEXT"),
    ("gpu_count", "INTEGER"),
    ("placements", "TEXT"),  # JSON: node label -> cells it ran (Ray), or {} (local: all on host_name)
    ("harness_version", "TEXT"),
)

PERPLEXITY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("n_ctx", "INTEGER"),
    ("n_chunks", "INTEGER"),
    ("ppl", "REAL"),
    ("ppl_err", "REAL"),
    ("source", "TEXT"),
    ("kv_mib", "REAL"),  # llama.cpp's KV cache size (its own log line), MiB
    ("kv_used_mib", "REAL"),  # the paged cache's MiB in use at exit (its memory breakdown line), else NULL
)

# llama-perplexity --kl-divergence: the "Perplexity", "KL divergence" and "Token probability" statistics blocks.
# Columns ending in _pct hold the percentages as printed.
KLD_STAT_COLUMNS: tuple[str, ...] = (
    "ppl_base",
    "ppl_base_err",
    "cor_ln_ppl_pct",
    "ln_ppl_ratio",
    "ln_ppl_ratio_err",
    "ppl_ratio",
    "ppl_ratio_err",
    "ppl_diff",
    "ppl_diff_err",
    "kld_mean",
    "kld_mean_err",
    "kld_max",
    "kld_p99_9",
    "kld_p99",
    "kld_p95",
    "kld_p90",
    "kld_median",
    "kld_p10",
    "kld_p5",
    "kld_p1",
    "kld_p0_1",
    "kld_min",
    "dp_mean_pct",
    "dp_mean_err_pct",
    "dp_max_pct",
    "dp_p99_9_pct",
    "dp_p99_pct",
    "dp_p95_pct",
    "dp_p90_pct",
    "dp_p75_pct",
    "dp_median_pct",
    "dp_p25_pct",
    "dp_p10_pct",
    "dp_p5_pct",
    "dp_p1_pct",
    "dp_p0_1_pct",
    "dp_min_pct",
    "dp_rms_pct",
    "dp_rms_err_pct",
    "same_top_pct",
    "same_top_err_pct",
)
KLD_COLUMNS: tuple[tuple[str, str], ...] = (
    ("base_key", "TEXT"),
    ("base_variant", "TEXT"),
    ("base_source_commit", "TEXT"),
    ("base_config", "TEXT"),
    *((name, "REAL") for name in KLD_STAT_COLUMNS),
)

BENCH_TEST_COLUMNS: tuple[tuple[str, str], ...] = (
    ("test_index", "INTEGER NOT NULL"),
    ("test", "TEXT"),
    ("n_prompt", "INTEGER"),
    ("n_gen", "INTEGER"),
    ("n_depth", "INTEGER"),
    ("type_k", "TEXT"),
    ("type_v", "TEXT"),
    ("flash_attn", "INTEGER"),
    ("n_threads", "INTEGER"),
    ("n_gpu_layers", "INTEGER"),
    ("n_batch", "INTEGER"),
    ("n_ubatch", "INTEGER"),
    ("n_samples", "INTEGER"),
    ("avg_ts", "REAL"),
    ("stddev_ts", "REAL"),
    ("median_ts", "REAL"),
    ("min_ts", "REAL"),
    ("max_ts", "REAL"),
    ("avg_ns", "INTEGER"),
    ("median_ns", "INTEGER"),
)


# llama-batched-bench (`pyharness.runners.batched`): the requested configuration, its status and the tool's jsonl fields
BATCHED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("row_index", "INTEGER NOT NULL"),
    ("pp", "INTEGER"),
    ("tg", "INTEGER"),
    ("pl", "INTEGER"),
    ("n_ctx_req", "INTEGER"),
    ("status", "TEXT NOT NULL CHECK (status IN ('ok', 'skipped', 'failed', 'not run'))"),
    ("note", "TEXT"),
    ("n_kv_max", "INTEGER"),
    ("n_batch", "INTEGER"),
    ("n_ubatch", "INTEGER"),
    ("flash_attn", "INTEGER"),
    ("is_pp_shared", "INTEGER"),
    ("n_gpu_layers", "INTEGER"),
    ("n_threads", "INTEGER"),
    ("n_threads_batch", "INTEGER"),
    ("n_kv", "INTEGER"),
    ("t_pp", "REAL"),
    ("speed_pp", "REAL"),
    ("t_tg", "REAL"),
    ("speed_tg", "REAL"),
    ("t", "REAL"),
    ("speed", "REAL"),
)

# The KV cache of a run as llama.cpp logs it (`pyharness.runners.batched.KvMemory`, field for field); MiB as printed
KV_MEMORY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("cache", "TEXT"),
    ("n_ctx", "INTEGER"),
    ("n_ctx_seq", "INTEGER"),
    ("n_seq_max", "INTEGER"),
    ("kv_unified", "INTEGER"),
    ("kv_buffer_mib", "REAL"),
    ("kv_mib", "REAL"),
    ("k_mib", "REAL"),
    ("v_mib", "REAL"),
    ("positions_mib", "REAL"),
    ("cells", "INTEGER"),
    ("n_stream", "INTEGER"),
    ("pages", "INTEGER"),
    ("page_size", "INTEGER"),
    ("n_head_kv", "INTEGER"),
    ("pool_tokens", "INTEGER"),
    ("pool_tokens_requested", "INTEGER"),
    ("compute_mib", "REAL"),
    ("output_mib", "REAL"),
    ("fallback", "TEXT"),
    ("log_lines", "TEXT"),
)


# llama-needle (`pyharness.runners.retrieval`): one row per line of its stdout, the line's keys in its order
RETRIEVAL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("row_index", "INTEGER NOT NULL"),
    ("length", "INTEGER"),
    ("depth", "REAL"),
    ("trial", "INTEGER"),
    ("keys", "INTEGER"),
    ("method", "TEXT"),
    ("rate", "REAL"),
    ("budget", "INTEGER"),
    ("expected", "TEXT"),
    ("output", "TEXT"),
    ("correct", "INTEGER"),
    ("n_prompt", "INTEGER"),
    ("kv_bytes", "INTEGER"),
    ("kv_bytes_full", "INTEGER"),
    ("kv_ratio", "REAL"),
    ("t_prefill_ms", "REAL"),
    ("t_compress_ms", "REAL"),
    ("t_decode_ms", "REAL"),
)


def _ddl(table: str, columns: Sequence[tuple[str, str]], extra: str = "") -> str:
    body = ",\n  ".join(f"{name} {kind}" for name, kind in columns)
    return f"CREATE TABLE IF NOT EXISTS {table} (\n  {body}{extra}\n)"


SCHEMA: tuple[str, ...] = (
    "CREATE TABLE IF NOT EXISTS pyharness_meta (key TEXT PRIMARY KEY, value TEXT)",
    _ddl("runs", RUN_COLUMNS),
    "CREATE INDEX IF NOT EXISTS runs_config_hash ON runs (config_hash, status)",
    "CREATE INDEX IF NOT EXISTS runs_matrix ON runs (matrix)",
    _ddl(
        "perplexity",
        (("run_id", "INTEGER PRIMARY KEY REFERENCES runs (run_id) ON DELETE CASCADE"), *PERPLEXITY_COLUMNS),
    ),
    _ddl("kld", (("run_id", "INTEGER PRIMARY KEY REFERENCES runs (run_id) ON DELETE CASCADE"), *KLD_COLUMNS)),
    _ddl(
        "bench_test",
        (("run_id", "INTEGER NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE"), *BENCH_TEST_COLUMNS),
        ",\n  PRIMARY KEY (run_id, test_index)",
    ),
    _ddl(
        "bench_sample",
        (
            ("run_id", "INTEGER NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE"),
            ("test_index", "INTEGER NOT NULL"),
            ("sample_index", "INTEGER NOT NULL"),
            ("ns", "INTEGER"),
            ("ts", "REAL"),
        ),
        ",\n  PRIMARY KEY (run_id, test_index, sample_index)",
    ),
    _ddl(
        "feature_eval",
        (
            ("run_id", "INTEGER NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE"),
            ("feature", "TEXT NOT NULL"),
            ("metric", "TEXT NOT NULL"),
            ("value", "REAL"),
            ("unit", "TEXT"),
        ),
    ),
    "CREATE INDEX IF NOT EXISTS feature_eval_run ON feature_eval (run_id)",
    _ddl(
        "batched_bench",
        (("run_id", "INTEGER NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE"), *BATCHED_COLUMNS),
        ",\n  PRIMARY KEY (run_id, row_index)",
    ),
    _ddl(
        "kv_memory",
        (("run_id", "INTEGER PRIMARY KEY REFERENCES runs (run_id) ON DELETE CASCADE"), *KV_MEMORY_COLUMNS),
    ),
    _ddl(
        "retrieval",
        (("run_id", "INTEGER NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE"), *RETRIEVAL_COLUMNS),
        ",\n  PRIMARY KEY (run_id, row_index)",
    ),
    _ddl("llama_bench", LLAMA_BENCH_COLUMNS),
    _ddl("test_backend_ops", TEST_BACKEND_OPS_COLUMNS),
    _ddl("matrix_runs", MATRIX_RUN_COLUMNS),
)


def default_db_path() -> Path:
    env = os.environ.get(DB_ENV)
    if env:
        return Path(env).expanduser()
    return paths.project_root() / "results" / "results.sqlite"


@dataclass
class FeatureEval:
    feature: str
    metric: str
    value: float | None
    unit: str = ""


@dataclass
class BenchTest:
    """One llama-bench test of a run (one line of its jsonl): the sql row and every sample."""

    row: dict[str, Any]  # the llama_bench columns, typed as llama-bench's sql printer types them
    samples_ns: list[int]
    samples_ts: list[float]


@dataclass
class RunRecord:
    """Everything one run writes. `fields` are `runs` columns; the rest go to the result tables."""

    fields: dict[str, Any]
    perplexity: dict[str, Any] | None = None
    kld: dict[str, Any] | None = None
    bench: list[BenchTest] = field(default_factory=list)
    backend_ops: list[dict[str, Any]] = field(default_factory=list)
    feature_evals: list[FeatureEval] = field(default_factory=list)
    batched: list[dict[str, Any]] = field(default_factory=list)  # batched_bench rows
    kv_memory: dict[str, Any] | None = None
    retrieval: list[dict[str, Any]] = field(default_factory=list)  # retrieval rows

    @property
    def ok(self) -> bool:
        return self.fields.get("status") == "ok"


def test_name(n_prompt: int, n_gen: int, n_depth: int) -> str:
    """compare-llama-bench.py's test names: pp512, tg128, pp512+tg128, with @d<depth> when the depth is not 0."""
    if n_prompt and not n_gen:
        name = f"pp{n_prompt}"
    elif n_gen and not n_prompt:
        name = f"tg{n_gen}"
    else:
        name = f"pp{n_prompt}+tg{n_gen}"
    return f"{name}@d{n_depth}" if n_depth else name


class Store:
    """An open results database. Use as a context manager, or call close()."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path else default_db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        except sqlite3.Error as exc:
            raise HarnessError(f"cannot open results database {self.path}: {exc}", "check --db / PYHARNESS_DB") from exc
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA foreign_keys = ON")
        try:
            self._create()
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            raise HarnessError(
                f"{self.path} is not a usable SQLite database: {exc}", "point --db / PYHARNESS_DB at another file"
            ) from exc

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception (KeyboardInterrupt included)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _create(self) -> None:
        with self.transaction() as conn:
            for statement in SCHEMA:
                conn.execute(statement)
            have = set(self.columns("runs"))
            for name, kind in RUN_COLUMNS:  # columns added since a store was created
                if name not in have:
                    conn.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
            for table, columns in (("perplexity", PERPLEXITY_COLUMNS), ("matrix_runs", MATRIX_RUN_COLUMNS)):
                have = set(self.columns(table))
                for name, kind in columns:  # columns added since a store was created
                    if name not in have:
                        conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
            for table in ("llama_bench", "test_backend_ops"):
                if RUN_LINK_COLUMN not in self.columns(table):
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {RUN_LINK_COLUMN} INTEGER")
            conn.execute(
                "INSERT OR IGNORE INTO pyharness_meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )

    def columns(self, table: str) -> list[str]:
        return [row["name"] for row in self.conn.execute(f"PRAGMA table_info({table})")]

    def _insert(self, conn: sqlite3.Connection, table: str, row: Mapping[str, Any]) -> int:
        names = list(row)
        sql = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
        cur = conn.execute(sql, [row[n] for n in names])
        return int(cur.lastrowid or 0)

    def _ensure_columns(self, conn: sqlite3.Connection, table: str, row: Mapping[str, Any]) -> None:
        """A field a newer llama-bench prints that this schema lacks becomes a column typed as upstream types it."""
        have = set(self.columns(table))
        for name, value in row.items():
            if name in have:
                continue
            if not name.isidentifier():
                raise HarnessError(f"llama-bench printed an unusable field name {name!r}")
            kind = "REAL" if isinstance(value, float) else "INTEGER" if isinstance(value, int) else "TEXT"
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
            have.add(name)

    def record(self, record: RunRecord) -> int:
        """Write a run and all its results in one transaction; return its run id."""
        fields = dict(record.fields)
        for key in ("params", "config"):
            if not isinstance(fields.get(key), str):
                fields[key] = json.dumps(fields.get(key, {}), sort_keys=True)
        if isinstance(fields.get("command"), list):
            fields["command"] = json.dumps(fields["command"])
        fields.setdefault("harness_version", harness_version())
        unknown = set(fields) - {name for name, _ in RUN_COLUMNS}
        if unknown:
            raise HarnessError(f"internal: unknown runs columns {sorted(unknown)}")
        with self.transaction() as conn:
            run_id = self._insert(conn, "runs", fields)
            if record.perplexity:
                self._insert(conn, "perplexity", {"run_id": run_id, **record.perplexity})
            if record.kld:
                self._insert(conn, "kld", {"run_id": run_id, **record.kld})
            for index, test in enumerate(record.bench):
                row = {**test.row, RUN_LINK_COLUMN: run_id}
                self._ensure_columns(conn, "llama_bench", row)
                self._insert(conn, "llama_bench", row)
                self._insert(conn, "bench_test", {"run_id": run_id, **bench_test_row(index, test)})
                for rep, (ns, ts) in enumerate(zip(test.samples_ns, test.samples_ts, strict=True)):
                    self._insert(
                        conn,
                        "bench_sample",
                        {"run_id": run_id, "test_index": index, "sample_index": rep, "ns": ns, "ts": ts},
                    )
            for row in record.backend_ops:
                full = {**row, RUN_LINK_COLUMN: run_id}
                self._ensure_columns(conn, "test_backend_ops", full)
                self._insert(conn, "test_backend_ops", full)
            for ev in record.feature_evals:
                self._insert(
                    conn,
                    "feature_eval",
                    {"run_id": run_id, "feature": ev.feature, "metric": ev.metric, "value": ev.value, "unit": ev.unit},
                )
            for row in record.batched:
                self._insert(conn, "batched_bench", {"run_id": run_id, **row})
            if record.kv_memory:
                self._insert(conn, "kv_memory", {"run_id": run_id, **record.kv_memory})
            for row in record.retrieval:
                self._insert(conn, "retrieval", {"run_id": run_id, **row})
        return run_id

    def find_ok(self, config_hash: str) -> int | None:
        """The latest successful run with this configuration hash, if any."""
        row = self.conn.execute(
            "SELECT run_id FROM runs WHERE config_hash = ? AND status = 'ok' ORDER BY run_id DESC LIMIT 1",
            (config_hash,),
        ).fetchone()
        return int(row["run_id"]) if row else None

    def find_any(self, config_hash: str) -> sqlite3.Row | None:
        return self.conn.execute(
            "SELECT run_id, status FROM runs WHERE config_hash = ? ORDER BY run_id DESC LIMIT 1", (config_hash,)
        ).fetchone()

    def runs(self, *, matrix: str | None = None, kind: str | None = None, status: str | None = "ok") -> list[dict]:
        sql = "SELECT * FROM runs WHERE 1=1"
        args: list[Any] = []
        for column, value in (("matrix", matrix), ("kind", kind), ("status", status)):
            if value is not None:
                sql += f" AND {column} = ?"
                args.append(value)
        return [dict(row) for row in self.conn.execute(sql + " ORDER BY run_id", args)]

    def record_matrix_run(self, fields: Mapping[str, Any]) -> int:
        """Write one matrix invocation (its own transaction, after its cells' runs)."""
        row = dict(fields)
        if not isinstance(row.get("placements"), str):
            row["placements"] = json.dumps(row.get("placements") or {}, sort_keys=True)
        row.setdefault("harness_version", harness_version())
        unknown = set(row) - {name for name, _ in MATRIX_RUN_COLUMNS}
        if unknown:
            raise HarnessError(f"internal: unknown matrix_runs columns {sorted(unknown)}")
        with self.transaction() as conn:
            return self._insert(conn, "matrix_runs", row)

    def matrix_runs(self, matrix: str | None = None) -> list[dict]:
        sql, args = "SELECT * FROM matrix_runs", []
        if matrix is not None:
            sql, args = sql + " WHERE matrix = ?", [matrix]
        return [dict(row) for row in self.conn.execute(sql + " ORDER BY matrix_run_id", args)]

    def count(self, table: str) -> int:
        return int(self.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def bench_test_row(index: int, test: BenchTest) -> dict[str, Any]:
    row = test.row
    ts = test.samples_ts
    ns = test.samples_ns
    return {
        "test_index": index,
        "test": test_name(int(row["n_prompt"]), int(row["n_gen"]), int(row["n_depth"])),
        **{
            key: row.get(key)
            for key in (
                "n_prompt",
                "n_gen",
                "n_depth",
                "type_k",
                "type_v",
                "flash_attn",
                "n_threads",
                "n_gpu_layers",
                "n_batch",
                "n_ubatch",
                "avg_ts",
                "stddev_ts",
                "avg_ns",
            )
        },
        "n_samples": len(ts),
        "median_ts": statistics.median(ts) if ts else None,
        "min_ts": min(ts) if ts else None,
        "max_ts": max(ts) if ts else None,
        "median_ns": int(statistics.median(ns)) if ns else None,
    }


def harness_version() -> str:
    """The running harness: its version and a hash of its sources (`0.1.0+<12 hex>`), known with or without git or
    an installed package (the GPU machine runs a copy of the tree)."""
    from pyharness.executors.fingerprint import harness_fingerprint

    return harness_fingerprint()
