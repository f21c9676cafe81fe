"""The results store: schema, transactional writes (also under a real kill), and upstream's compare script."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import evalkit

from pyharness import paths
from pyharness.store import RUN_LINK_COLUMN, BenchTest, RunRecord, Store


def test_schema_and_reopen(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    with Store(db) as store:
        tables = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {
            "runs",
            "perplexity",
            "kld",
            "bench_test",
            "bench_sample",
            "feature_eval",
            "llama_bench",
            "test_backend_ops",
        } <= tables
        assert store.columns("llama_bench")[-1] == RUN_LINK_COLUMN
        feature_cols = store.columns("feature_eval")
        assert feature_cols == ["run_id", "feature", "metric", "value", "unit"]
    with Store(db) as store:  # reopening changes nothing
        assert store.columns("llama_bench").count(RUN_LINK_COLUMN) == 1


def test_table_made_by_upstream_llama_bench_is_adopted(tmp_path: Path) -> None:
    """`llama-bench -o sql | sqlite3 results.sqlite` rows stay; our link column is added beside them."""
    db = tmp_path / "r.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript(evalkit.fixture("bench-upstream.sql"))
    conn.close()
    with Store(db) as store:
        assert store.count("llama_bench") == 16
        assert RUN_LINK_COLUMN in store.columns("llama_bench")
        run_id = store.record(
            evalkit.bench_fixture_record("bench-upstream.jsonl", evalkit.fake_context(evalkit.fake_build()), "cfg")
        )
        assert store.count("llama_bench") == 32
        n = store.conn.execute(f"SELECT COUNT(*) FROM llama_bench WHERE {RUN_LINK_COLUMN} = ?", (run_id,)).fetchone()
        assert n[0] == 16


def test_run_and_results_are_one_transaction(tmp_path: Path) -> None:
    """A failure after the run row and some result rows were inserted leaves nothing at all."""
    ctx = evalkit.fake_context(evalkit.fake_build())
    good = evalkit.bench_fixture_record("bench-upstream.jsonl", ctx, "cfg")
    broken = BenchTest(row=dict(good.bench[0].row), samples_ns=[1, 2, 3], samples_ts=[1.0])  # zip(strict) fails
    bad = RunRecord(fields=good.fields, bench=[*good.bench[:3], broken])
    with Store(tmp_path / "r.sqlite") as store:
        with pytest.raises(ValueError):
            store.record(bad)
        for table in ("runs", "llama_bench", "bench_test", "bench_sample"):
            assert store.count(table) == 0, table
        run_id = store.record(good)
        assert store.count("runs") == 1 and store.count("bench_sample") == 32
        assert store.find_ok("cfg") == run_id


def test_failed_runs_are_kept_with_their_log_but_not_resumed_from(tmp_path: Path) -> None:
    ctx = evalkit.fake_context(evalkit.fake_build())
    fields = evalkit.base_fields(ctx, "bench", "cfg", {})
    from pyharness.runners.bench import bench_record

    failed = bench_record(fields, evalkit.execution("", "error: unknown argument: --bogus\n", 1))
    with Store(tmp_path / "r.sqlite") as store:
        run_id = store.record(failed)
        row = store.conn.execute(
            "SELECT status, error, stderr, exit_code FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        assert row["status"] == "failed" and "--bogus" in row["error"] and "--bogus" in row["stderr"]
        assert row["exit_code"] == 1
        assert store.find_ok("cfg") is None


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_killed_run_leaves_no_row_and_no_process(tmp_path: Path) -> None:
    """Start a real `pyharness ppl` in a subprocess, SIGKILL it while llama-perplexity runs: no row is written and
    the tool dies with it. Then the same command, not killed, does write its row (so the check can fail)."""
    model = evalkit.real_model()
    env = evalkit.isolated_env(tmp_path)
    db = Path(env["PYHARNESS_DB"])
    Store(db).close()  # the schema exists before the run, so "no row" means no row, not no file
    cmd = [
        sys.executable,
        "-m",
        "pyharness",
        "ppl",
        "--variant",
        "upstream",
        "--model",
        str(model),
        "-c",
        "128",
        "--chunks",
        "4",
        "-t",
        "2",
    ]
    proc = subprocess.Popen(cmd, env=env, cwd=paths.project_root(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tool = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and tool is None:
        for child in _children(proc.pid):
            if "llama-perplexity" in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
                tool = child
        time.sleep(0.05)
    assert tool is not None, "llama-perplexity never started: " + (proc.stderr.read().decode() if proc.stderr else "")
    time.sleep(0.5)  # midway: the model is loading or evaluating
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    for _ in range(100):
        if not _alive(tool):
            break
        time.sleep(0.05)
    assert not _alive(tool), "llama-perplexity kept running after the harness was killed"
    with Store(db) as store:
        for table in ("runs", "perplexity", "kld"):
            assert store.count(table) == 0, table
    done = subprocess.run(cmd, env=env, cwd=paths.project_root(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with Store(db) as store:
        assert store.count("runs") == 1 and store.count("perplexity") == 1


def _store_two_builds(db: Path) -> tuple[str, str]:
    """Fixtures of two real builds (upstream 0c1e570, patched 81755ab), stored through the harness. Should the
    fixtures come from builds with equal commits (an empty series), the patched rows get a distinct commit so the two
    builds can be told apart, which is all compare-llama-bench.py keys on."""
    up = evalkit.bench_fixture_record("bench-upstream.jsonl", evalkit.fake_context(evalkit.fake_build()), "cfg-up")
    pa_build = evalkit.fake_build(
        "patched", source_commit="81755ab0c74c204e574e818bd7cd2b7ea4d7d8cb", series="c07513bc37bd" + "0" * 52
    )
    pa = evalkit.bench_fixture_record("bench-patched.jsonl", evalkit.fake_context(pa_build), "cfg-pa")
    base_commit = up.bench[0].row["build_commit"]
    if pa.bench[0].row["build_commit"] == base_commit:
        for test in pa.bench:
            test.row["build_commit"] = "9" * len(base_commit)
    with Store(db) as store:
        store.record(up)
        store.record(pa)
    return base_commit, pa.bench[0].row["build_commit"]


def test_upstream_compare_script_reads_the_store(tmp_path: Path) -> None:
    """vendor/llama.cpp/scripts/compare-llama-bench.py, run from the vendored tree, on our database."""
    db = tmp_path / "results.sqlite"
    baseline, candidate = _store_two_builds(db)
    script = paths.vendor_dir() / "scripts" / "compare-llama-bench.py"
    out = subprocess.run(
        [sys.executable, str(script), "-i", str(db), "-b", baseline, "-c", candidate, "--tool", "llama-bench"],
        cwd=paths.vendor_dir(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr + out.stdout
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("|") and not set(ln) <= set("|:- ")]
    header, body = rows[0], rows[1:]
    assert "Speedup" in header
    assert len(body) == 16  # 4 tests x 4 KV combinations, every one joined across the two builds
    conn = sqlite3.connect(db)
    for line in body:
        cells = [c.strip() for c in line.strip("|").split("|")]
        test, base_ts, cand_ts, speedup = cells[-4], float(cells[-3]), float(cells[-2]), float(cells[-1])
        k, v = cells[-6], cells[-5]
        match = re.fullmatch(r"(pp|tg)(\d+)(?:@d(\d+))?", test)
        assert match, test
        n_prompt, n_gen = (int(match.group(2)), 0) if match.group(1) == "pp" else (0, int(match.group(2)))
        depth = int(match.group(3) or 0)
        query = (
            "SELECT avg_ts FROM llama_bench WHERE build_commit = ? AND type_k = ? AND type_v = ? "
            "AND n_prompt = ? AND n_gen = ? AND n_depth = ?"
        )
        stored = [
            conn.execute(query, (commit, k, v, n_prompt, n_gen, depth)).fetchone()[0]
            for commit in (baseline, candidate)
        ]
        assert base_ts == pytest.approx(stored[0], abs=0.006)
        assert cand_ts == pytest.approx(stored[1], abs=0.006)
        assert speedup == pytest.approx(stored[1] / stored[0], abs=0.006)


def test_config_hash_lookup_uses_latest_ok(tmp_path: Path) -> None:
    ctx = evalkit.fake_context(evalkit.fake_build())
    with Store(tmp_path / "r.sqlite") as store:
        first = store.record(evalkit.bench_fixture_record("bench-upstream.jsonl", ctx, "same"))
        second = store.record(evalkit.bench_fixture_record("bench-upstream.jsonl", ctx, "same"))
        assert store.find_ok("same") == second != first
        params = json.loads(store.conn.execute("SELECT params FROM runs WHERE run_id = ?", (first,)).fetchone()[0])
        assert params["fixture"] == "bench-upstream.jsonl"


def test_host_probes() -> None:
    from pyharness.host import cpu_model, hardware_key, parse_nvidia_smi

    banner = "| NVIDIA-SMI 550.54.15      Driver Version: 550.54.15      CUDA Version: 12.4     |\n"
    query = "NVIDIA H100 80GB HBM3, 550.54.15\nNVIDIA H100 80GB HBM3, 550.54.15\n"
    assert parse_nvidia_smi(query, banner) == ("NVIDIA H100 80GB HBM3", 2, "550.54.15", "12.4")
    assert parse_nvidia_smi("", "") == ("", 0, "", "")
    assert cpu_model("processor\t: 0\nmodel name\t: AMD EPYC  7763 64-Core Processor\n") == (
        "AMD EPYC 7763 64-Core Processor"
    )
    assert hardware_key("X", "", "", "") == "X / no GPU"
    assert hardware_key("X", "H100", "550", "12.4") == "X / H100 (driver 550, CUDA 12.4)"


def test_runs_record_the_harness_by_version_and_sources_hash(tmp_path: Path) -> None:
    """Known without git metadata or an installed package (the GPU machine runs a copy of the tree)."""
    import re

    from pyharness.executors.fingerprint import harness_fingerprint
    from pyharness.store import harness_version

    assert re.fullmatch(r"\d+\.\d+\.\d+\+[0-9a-f]{12}", harness_version())
    assert harness_version() == harness_fingerprint()
    ctx = evalkit.fake_context(evalkit.fake_build())
    with Store(tmp_path / "r.sqlite") as store:
        run_id = store.record(evalkit.bench_fixture_record("bench-upstream.jsonl", ctx, "cfg"))
        row = store.conn.execute("SELECT harness_version FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    assert row["harness_version"] == harness_version()
