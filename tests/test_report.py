"""Reports: rendered numbers equal the stored ones; mixed hardware/commits are separated and flagged; files."""

from __future__ import annotations

import csv
import io
import re
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import evalkit

from pyharness.errors import HarnessError
from pyharness.report import build_report, write_report
from pyharness.store import FeatureEval, Store

PATCHED = evalkit.fake_build("patched", source_commit="9" * 40, series="feedface" * 8)


def populate(store: Store, *, host: object = None) -> None:
    up = evalkit.fake_context(evalkit.fake_build(), host)  # type: ignore[arg-type]
    pa = evalkit.fake_context(PATCHED, host)  # type: ignore[arg-type]
    store.record(evalkit.bench_fixture_record("bench-upstream.jsonl", up, "b-up"))
    store.record(evalkit.bench_fixture_record("bench-patched.jsonl", pa, "b-pa"))
    store.record(evalkit.ppl_fixture_record("ppl-base", up, "p-up"))
    rec = evalkit.ppl_fixture_record("kld-q8_0", pa, "p-pa", kv="q8_0", kld=True)
    rec.feature_evals.append(FeatureEval("kv-compress", "bytes_per_token", 1234.0, "B"))
    store.record(rec)


def test_throughput_table_numbers_are_the_stored_samples(tmp_path: Path) -> None:
    with Store(tmp_path / "r.sqlite") as store:
        populate(store)
        report = build_report(store)
        header, body = evalkit.table_rows(report.markdown, "### Throughput")
        assert header[:4] == ["Model", "Test", "KV (K/V)", "FA"]
        assert header[-3:] == ["t/s upstream", "t/s patched", "Speedup patched"]
        assert len(body) == 16
        for row in body:
            test, kv = row[1], row[2]
            k, v = kv.split("/") if "/" in kv else (kv, kv)
            medians = {}
            for variant, cell in (("upstream", row[-3]), ("patched", row[-2])):
                # independently: every sample of that test, straight from bench_sample
                samples = [
                    r[0]
                    for r in store.conn.execute(
                        "SELECT s.ts FROM bench_sample s JOIN bench_test t USING (run_id, test_index) "
                        "JOIN runs r USING (run_id) "
                        "WHERE r.variant = ? AND t.test = ? AND t.type_k = ? AND t.type_v = ?",
                        (variant, test, k, v),
                    )
                ]
                assert len(samples) == 2
                median, stdev = statistics.median(samples), statistics.stdev(samples)
                assert cell == f"{median:.2f} ± {stdev:.2f}"
                medians[variant] = median
            assert row[-1] == f"{medians['patched'] / medians['upstream']:.2f}"


def test_perplexity_table_numbers_are_the_stored_ones(tmp_path: Path) -> None:
    with Store(tmp_path / "r.sqlite") as store:
        populate(store)
        report = build_report(store)
        header, body = evalkit.table_rows(report.markdown, "### Perplexity")
        assert header[6:13] == ["KV MiB", "KV / f16", "PPL", "PPL/PPL(base)", "Mean KLD", "99% KLD", "Same top %"]
        assert [r[1] for r in body] == ["upstream", "patched"]
        ppl = {r["run_id"]: r for r in store.conn.execute("SELECT * FROM perplexity")}
        kld = store.conn.execute("SELECT * FROM kld").fetchone()
        up_row, pa_row = body
        up = next(p for p in ppl.values() if p["source"] == "final_estimate")
        pa = ppl[kld["run_id"]]
        assert up_row[6:8] == ["-", "-"]  # the fixtures' logs do not show the KV cache size
        assert up_row[8] == f"{up['ppl']:.4f} ± {up['ppl_err']:.4f}" and up_row[9] == "-"
        assert pa_row[8] == f"{pa['ppl']:.4f} ± {pa['ppl_err']:.4f}"
        assert pa_row[9] == f"{kld['ppl_ratio']:.4f} ± {kld['ppl_ratio_err']:.4f}"
        assert pa_row[10] == f"{kld['kld_mean']:.6f} ± {kld['kld_mean_err']:.6f}"
        assert pa_row[11] == f"{kld['kld_p99']:.6f}"
        assert pa_row[12] == f"{kld['same_top_pct']:.2f} ± {kld['same_top_err_pct']:.2f}"
        assert pa_row[2] == "q8_0" and pa_row[13] == "upstream f16/f16"
        # and they are the fixture's printed values
        assert pa_row[10] == "0.004411 ± 0.000317" and up_row[8] == "33.1128 ± 7.4793"


def test_environment_is_stated(tmp_path: Path) -> None:
    with Store(tmp_path / "r.sqlite") as store:
        populate(store)
        md = build_report(store).markdown
    assert "AMD EPYC 7763 64-Core Processor (2 usable CPUs)" in md
    assert f"upstream commit: `{evalkit.UPSTREAM_COMMIT}`" in md
    assert "patch series `feedfacefeed`" in md and "GPU: none" in md
    assert "Warning" not in md
    assert "| kv-compress | bytes_per_token | patched |" in md


def test_mixed_hardware_and_commits_are_not_mixed(tmp_path: Path) -> None:
    with Store(tmp_path / "r.sqlite") as store:
        populate(store)
        other = evalkit.fake_host(cpu="Intel Xeon Platinum 8480+", gpu="NVIDIA H100 80GB HBM3")
        store.record(
            evalkit.bench_fixture_record(
                "bench-upstream.jsonl", evalkit.fake_context(evalkit.fake_build(), other), "b-up-h100"
            )
        )
        newer = evalkit.fake_build(source_commit="a" * 40, upstream_commit="a" * 40)
        store.record(evalkit.bench_fixture_record("bench-upstream.jsonl", evalkit.fake_context(newer), "b-up-new"))
        report = build_report(store)
    md = report.markdown
    assert len(report.groups) == 3
    assert "Warning: this report covers 3 different hardware / commit combinations" in md
    assert md.count("### Throughput") == 3
    assert "NVIDIA H100 80GB HBM3 (driver 550.54, CUDA 12.4)" in md
    # the H100 and new-commit groups hold only upstream: no speedup column compares them with anything
    sections = md.split("\n## ")[1:]
    alone = [s for s in sections if "H100" in s.splitlines()[0] or "aaaaaaaaaaaa" in s.splitlines()[0]]
    assert len(alone) == 2 and all("Speedup" not in s and "t/s patched" not in s for s in alone)


def test_benchmarks_on_a_busy_machine_are_flagged(tmp_path: Path) -> None:
    with Store(tmp_path / "r.sqlite") as store:
        up = evalkit.bench_fixture_record("bench-upstream.jsonl", evalkit.fake_context(evalkit.fake_build()), "b-up")
        pa = evalkit.bench_fixture_record("bench-patched.jsonl", evalkit.fake_context(PATCHED), "b-pa")
        up.fields["other_cpu"], pa.fields["other_cpu"] = 0.02, 0.45
        store.record(up)
        busy = store.record(pa)
        md = build_report(store).markdown
    assert "Warning: the machine was busy" in md
    assert f"run {busy} (patched): 45%" in md and "(upstream)" not in md.split("machine was busy")[1]


def test_files_are_written(tmp_path: Path) -> None:
    with Store(tmp_path / "r.sqlite") as store:
        populate(store)
        report = build_report(store, matrix="fixtures")
    written = write_report(report, tmp_path / "out")
    names = {p.name for p in written}
    assert names == {"README.md", "bench.csv", "ppl.csv", "throughput_vs_depth.png", "ppl_kld.png"}
    for png in ("throughput_vs_depth.png", "ppl_kld.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "bench.csv").read_text())))
    assert len(rows) == 32
    md_numbers = set(re.findall(r"\d+\.\d\d ± \d+\.\d\d", report.markdown))
    for r in rows:
        assert f"{float(r['median_ts']):.2f} ± {float(r['stdev_ts']):.2f}" in md_numbers
    assert "![ppl_kld](ppl_kld.png)" in (tmp_path / "out" / "README.md").read_text()


def test_empty_store_is_an_error(tmp_path: Path) -> None:
    with Store(tmp_path / "r.sqlite") as store, pytest.raises(HarnessError, match="no successful runs"):
        build_report(store, matrix="nothing")


def test_one_variant_compares_its_extra_flags_against_its_own_runs(tmp_path: Path) -> None:
    # --baseline X --candidate X: the rows with extra flags against the same variant's rows without them (a matrix
    # of one build, e.g. its standard cache against --kv-cache paged)
    with Store(tmp_path / "r.sqlite") as store:
        populate(store)
        store.conn.execute(
            "UPDATE runs SET params = json_set(params, '$.extra', json('[\"--kv-cache\", \"paged\"]')) "
            "WHERE variant = 'upstream'"
        )
        # one build: the upstream fixture's runs become the patched build's runs with the extra flag
        store.conn.execute(
            "UPDATE runs SET variant = 'patched', source_commit = p.source_commit, series_hash = p.series_hash "
            "FROM (SELECT source_commit, series_hash FROM runs WHERE variant = 'patched' LIMIT 1) AS p"
        )
        store.conn.commit()
        report = build_report(store, baseline="patched", candidate="patched")
        header, body = evalkit.table_rows(report.markdown, "### Throughput")
        assert header[-3:] == ["t/s patched", "t/s patched --kv-cache paged", "Speedup patched --kv-cache paged"]
        assert body
        for row in body:
            base, paged = (float(cell.split(" ± ")[0]) for cell in row[-3:-1])
            assert row[-1] == f"{paged / base:.2f}"
        # the defaults (upstream against patched) on a store without upstream runs: the same comparison
        assert build_report(store).markdown == report.markdown
        # upstream against patched leaves the baseline's extra-flag runs out
        header, _ = evalkit.table_rows(
            build_report(store, baseline="patched", candidate="upstream").markdown, "### Throughput"
        )
        assert "t/s patched --kv-cache paged" not in header
