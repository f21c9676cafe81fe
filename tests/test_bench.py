"""llama-bench: parsing real jsonl output, fidelity to upstream's own sql output, parameters, and a real run."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import evalkit

from pyharness.errors import HarnessError
from pyharness.runners import bench
from pyharness.store import LLAMA_BENCH_COLUMNS, TEST_BACKEND_OPS_COLUMNS, Store


def test_jsonl_tests_and_every_sample_are_parsed() -> None:
    text = evalkit.fixture("bench-upstream.jsonl")
    raw = [json.loads(line) for line in text.splitlines()]
    tests = bench.parse_bench_jsonl(text)
    assert len(tests) == len(raw) == 16
    for test, obj in zip(tests, raw, strict=True):
        assert test.samples_ns == obj["samples_ns"] and test.samples_ts == obj["samples_ts"]
        assert len(test.samples_ts) == 2  # -r 2
        assert test.row["avg_ts"] == obj["avg_ts"] and test.row["n_depth"] == obj["n_depth"]
        assert test.row["cpu_strict"] == 0 and test.row["repack"] == 1  # JSON booleans stored as upstream's 0/1
    assert {(t.row["type_k"], t.row["type_v"]) for t in tests} == {
        ("f16", "f16"),
        ("f16", "q8_0"),
        ("q8_0", "f16"),
        ("q8_0", "q8_0"),
    }
    assert {t.row["n_depth"] for t in tests} == {0, 64}


def test_schema_is_upstreams() -> None:
    """Our llama_bench / test_backend_ops columns are what our builds' sql printers create."""
    assert bench.parse_sql_schema(evalkit.fixture("bench-upstream.sql"))["llama_bench"] == list(LLAMA_BENCH_COLUMNS)
    ops = bench.parse_sql_schema(evalkit.fixture("test-backend-ops-upstream.sql"))["test_backend_ops"]
    assert ops == list(TEST_BACKEND_OPS_COLUMNS)


def test_rows_equal_what_upstreams_sql_printer_stores(tmp_path: Path) -> None:
    """The same llama-bench run printed jsonl (stdout) and sql (stderr, -oe sql): `sqlite3 db < sql` and our store
    must hold identical llama_bench rows, value for value and type for type."""
    upstream_db = sqlite3.connect(":memory:")
    upstream_db.executescript(evalkit.fixture("bench-upstream.sql"))
    columns = [name for name, _ in LLAMA_BENCH_COLUMNS]
    select = f"SELECT {', '.join(f'{c}, typeof({c})' for c in columns)} FROM llama_bench ORDER BY rowid"
    expected = upstream_db.execute(select).fetchall()
    with Store(tmp_path / "r.sqlite") as store:
        ctx = evalkit.fake_context(evalkit.fake_build())
        store.record(evalkit.bench_fixture_record("bench-upstream.jsonl", ctx, "cfg"))
        got = store.conn.execute(select).fetchall()
    assert len(expected) == 16
    assert [tuple(r) for r in got] == [tuple(r) for r in expected]


def test_backend_ops_sql_rows_are_parsed() -> None:
    rows = bench.parse_backend_ops_sql(evalkit.fixture("test-backend-ops-upstream.sql"))
    assert len(rows) == 2
    assert rows[0]["op_name"] == "ADD" and rows[0]["supported"] == 1 and rows[0]["passed"] == 1
    assert rows[0]["bandwidth_gb_s"] == pytest.approx(34.670799)
    assert rows[1]["op_params"] == "type=f32,ne=[4096,1,1,1],nr=[1,512,1,1],nf=1,perm1=0,src_overlap=0"


def test_bad_output_fails_the_run() -> None:
    ctx = evalkit.fake_context(evalkit.fake_build())
    fields = evalkit.base_fields(ctx, "bench", "h", {})
    line = evalkit.fixture("bench-upstream.jsonl").splitlines()[0]
    truncated = bench.bench_record(fields, evalkit.execution(line[: len(line) // 2]))
    assert truncated.fields["status"] == "failed" and "not JSON" in truncated.fields["error"]
    empty = bench.bench_record(fields, evalkit.execution("", "main: error: failed to load model\n"))
    assert empty.fields["status"] == "failed" and "failed to load model" in empty.fields["error"]
    crashed = bench.bench_record(fields, evalkit.execution(line, "error: invalid parameter for argument: -x\n", 1))
    assert crashed.fields["status"] == "failed" and crashed.bench == []


def test_parameters() -> None:
    p = bench.BenchParams(
        n_prompt=(64,),
        n_gen=(16,),
        depth=(0, 256),
        cache_type_k=("f16", "q8_0"),
        cache_type_v=("f16", "q8_0"),
        flash_attn=("1",),
        repetitions=3,
        threads=(2,),
    ).validate()
    assert p.args() == [
        "-p",
        "64",
        "-n",
        "16",
        "-d",
        "0,256",
        "-ctk",
        "f16,q8_0",
        "-ctv",
        "f16,q8_0",
        "-fa",
        "on",
        "-r",
        "3",
        "-t",
        "2",
    ]
    with pytest.raises(HarnessError, match="needs flash attention"):
        bench.BenchParams(cache_type_v=("q8_0",), flash_attn=("0",)).validate()
    with pytest.raises(HarnessError, match="repetitions"):
        bench.BenchParams(repetitions=0).validate()


@pytest.fixture(scope="module")
def model_path() -> Path:
    return evalkit.real_model()


@pytest.mark.slow
def test_real_bench_run_keeps_every_sample(model_path: Path, tmp_path: Path) -> None:
    from pyharness.cli import main

    db = tmp_path / "r.sqlite"
    code = main(
        [
            "bench",
            "--variant",
            "upstream",
            "--model",
            str(model_path),
            "--db",
            str(db),
            "-p",
            "16",
            "-n",
            "4",
            "-d",
            "0,32",
            "-r",
            "3",
            "-t",
            "2",
            "-ctk",
            "q8_0",
            "-ctv",
            "q8_0",
            "-fa",
            "on",
        ]
    )
    assert code == 0
    with Store(db) as store:
        run = store.runs(kind="bench")[0]
        assert (
            run["status"] == "ok"
            and run["variant"] == "upstream"
            and json.loads(run["command"])[0].endswith("llama-bench")
        )
        tests = store.conn.execute("SELECT * FROM bench_test ORDER BY test_index").fetchall()
        assert [t["test"] for t in tests] == ["pp16", "tg4", "pp16@d32", "tg4@d32"]
        assert all(t["type_k"] == "q8_0" and t["flash_attn"] == 1 and t["n_samples"] == 3 for t in tests)
        assert store.count("bench_sample") == 12
        assert store.count("llama_bench") == 4
        # provenance
        build = evalkit.real_build("upstream")
        assert run["upstream_commit"] == build.upstream_commit and run["source_commit"] == build.source_commit
        assert run["series_hash"] == "none" and json.loads(run["cmake_flags"]) == build.cmake_flags
        from pyharness.host import host_info
        from pyharness.models import find_spec

        assert run["model_sha256"] == find_spec("smollm2-135m").sha256
        assert run["host_cpu"] == host_info().cpu and run["host_cpu_count"] == host_info().cpu_count
        assert run["other_cpu"] is not None and run["started_at"] <= run["finished_at"]
        assert json.loads(run["params"])["repetitions"] == 3 and "samples_ns" in run["stdout"]
        linked = store.conn.execute(
            "SELECT COUNT(*) FROM llama_bench WHERE pyharness_run_id = ?", (run["run_id"],)
        ).fetchone()[0]
        assert linked == 4


def test_cpu_used_by_other_processes_is_measured() -> None:
    """execute() records the share of the machine's CPU used by anything but the tool: a concurrent busy loop shows."""
    import subprocess

    from pyharness.runners import execute

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = execute(["sleep", "1.5"])
    finally:
        spinner.kill()
        spinner.wait()
    assert busy.other_cpu is not None
    cpus = len(Path("/proc/stat").read_text().split("\ncpu")) - 1
    assert busy.other_cpu >= 0.8 / cpus  # one spinning core of `cpus`
    own = execute([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.0: pass"])
    assert own.other_cpu is not None and own.other_cpu < busy.other_cpu  # the tool's own CPU is not "other"


def test_int8_attention_needs_a_q8_kv_cache() -> None:
    ok = bench.BenchParams(cache_type_k=("q8_kv",), cache_type_v=("q8_kv",), flash_attn=("int8",)).validate()
    assert ok.flash_attn == ("int8",)
    with pytest.raises(HarnessError, match="int8 needs a q8_kv K and V cache"):
        bench.BenchParams(cache_type_k=("f16",), cache_type_v=("q8_kv",), flash_attn=("int8",)).validate()
    with pytest.raises(HarnessError, match="not on, off, auto or int8"):
        bench.BenchParams(flash_attn=("int4",)).validate()
