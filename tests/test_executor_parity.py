"""The same small CPU matrix, run for real by the local executor and by the Ray executor (a local Ray instance,
through the command line), gives the same store: the same runs under the same configuration hashes, with the same
provenance and the same parsed results (timings aside)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import evalkit

from tests.conftest import ROOT

MATRIX = """\
[matrix]
name = "parity"
variants = ["upstream", "patched"]
backends = ["cpu"]
models = ["{model}"]
timeout = 600

[flags]
kv = ["f16", "q8_0"]
flash_attn = "on"
threads = 1

[[eval]]
kind = "ppl"
ctx = 128
chunks = 4
kld_base = {{ variant = "upstream", kv = "f16" }}

[[eval]]
kind = "bench"
prompt = [8]
gen = [2]
repetitions = 1
"""

# what differs from one run of a cell to the next: when, how long, the raw output (it prints timings), the load
VOLATILE = {"run_id", "started_at", "finished_at", "duration_s", "other_cpu", "stdout", "stderr", "pyharness_run_id"}
TIMINGS = {"test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "median_ts", "min_ts", "max_ts", "median_ns"}


def contents(db: Path) -> dict[str, Any]:
    """The store's runs and results by configuration hash, without what changes from run to run."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    runs = {r["run_id"]: dict(r) for r in conn.execute("SELECT * FROM runs")}
    out: dict[str, Any] = {}
    for run_id, run in runs.items():
        key = run["config_hash"]
        assert key not in out, f"{run['cell']} stored twice"
        entry: dict[str, Any] = {"run": {k: v for k, v in run.items() if k not in VOLATILE}}
        for table, link in (
            ("perplexity", "run_id"),
            ("kld", "run_id"),
            ("bench_test", "run_id"),
            ("llama_bench", "pyharness_run_id"),
        ):
            rows = conn.execute(f"SELECT * FROM {table} WHERE {link} = ? ORDER BY rowid", (run_id,))
            entry[table] = [{k: v for k, v in dict(r).items() if k not in VOLATILE | TIMINGS} for r in rows]
        entry["samples"] = conn.execute("SELECT COUNT(*) FROM bench_sample WHERE run_id = ?", (run_id,)).fetchone()[0]
        out[key] = entry
    conn.close()
    return out


def matrix_cli(path: Path, db: Path, env: dict[str, str], *executor: str) -> subprocess.CompletedProcess[str]:
    args = ["matrix", str(path), "--no-build", "--no-progress", "--db", str(db), *executor]
    return subprocess.run(
        [sys.executable, "-m", "pyharness", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_local_and_ray_executors_store_the_same_results(tmp_path: Path) -> None:
    path = tmp_path / "parity.toml"
    path.write_text(MATRIX.format(model=evalkit.real_model()))
    env = evalkit.isolated_env(tmp_path)  # the same model, text and caches for both
    local = matrix_cli(path, tmp_path / "local.sqlite", env, "--executor", "local")
    assert local.returncode == 0, local.stderr
    on_ray = matrix_cli(path, tmp_path / "ray.sqlite", env, "--executor", "ray")
    assert on_ray.returncode == 0, on_ray.stderr
    assert "8 to run on 1 Ray node(s)" in on_ray.stderr and "ran on " in on_ray.stderr

    a, b = contents(tmp_path / "local.sqlite"), contents(tmp_path / "ray.sqlite")
    assert len(a) == 8 and all(e["run"]["status"] == "ok" for e in a.values())
    assert sorted(a) == sorted(b)  # the same configuration hashes
    for key in a:
        assert a[key] == b[key], a[key]["run"]["cell"]
    kinds = sorted(e["run"]["kind"] for e in a.values())
    assert kinds == ["bench"] * 4 + ["ppl"] * 4
    assert all(e["kld"] and e["perplexity"][0]["ppl"] > 1 for e in a.values() if e["run"]["kind"] == "ppl")
    assert all(e["bench_test"] and e["samples"] for e in a.values() if e["run"]["kind"] == "bench")

    again = matrix_cli(path, tmp_path / "ray.sqlite", env, "--executor", "ray")  # resumes: everything stored
    assert again.returncode == 0 and "8 already stored, 0 to run" in again.stderr

    # each invocation that ran cells left its matrix_runs row; the resumed one (nothing ran) left none
    for db, executor in (("local.sqlite", "local"), ("ray.sqlite", "ray")):
        conn = sqlite3.connect(tmp_path / db)
        rows = conn.execute("SELECT executor, ran, ok, failed, seconds, placements FROM matrix_runs").fetchall()
        conn.close()
        assert len(rows) == 1 and rows[0][:4] == (executor, 8, 8, 0) and rows[0][4] > 0, rows
    scaling = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyharness",
            "scaling",
            "--serial",
            str(tmp_path / "local.sqlite"),
            "--parallel",
            str(tmp_path / "ray.sqlite"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert scaling.returncode in (0, 1), scaling.stderr  # 1: target not met (a CPU matrix on one node need not be)
    assert "# Scaling: matrix `parity`" in scaling.stdout and "| cells | 8 |" in scaling.stdout
