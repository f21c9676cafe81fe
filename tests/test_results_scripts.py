"""The scripts that print the figures of docs/results/kv-compress-h200-speed from a run's files: planted inputs whose
ratios and sums are known give exactly those figures."""

from __future__ import annotations

import csv
import json
import runpy
import sys
from pathlib import Path

import pytest

from pyharness import paths

SCRIPTS = paths.project_root() / "docs" / "results" / "kv-compress-h200-speed"

BATCHED_FIELDS = ["run_id", "extra", "config", "speed_tg", "status"]
BENCH_FIELDS = ["test", "n_gen", "n_depth", "type_k", "type_v", "fa", "extra", "median_ts"]


def run_script(name: str, args: list[str], monkeypatch: pytest.MonkeyPatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [name, *args])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(SCRIPTS / name), run_name="__main__")
    assert done.value.code in (0, None), capsys.readouterr().err
    return capsys.readouterr().out


def write_csv(path: Path, fields: list[str], rows: list[dict[str, object]]) -> str:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return str(path)


def test_batched_ratios_over_chosen_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    ceiling = write_csv(
        tmp_path / "ceiling.csv",
        BATCHED_FIELDS,
        [
            {"run_id": 1, "extra": "--kv-cache paged", "config": "32768+128 ×3", "speed_tg": 400.0, "status": "ok"},
            {"run_id": 2, "extra": "--kv-cache paged", "config": "8192+128 ×15", "speed_tg": 1200.0, "status": "ok"},
        ],
    )
    compressed = write_csv(
        tmp_path / "compressed.csv",
        BATCHED_FIELDS,
        [{"run_id": 3, "extra": "--kv-compress uniform", "config": "32768+128 ×15", "speed_tg": 900.0, "status": "ok"}],
    )
    args = ["--batched", ceiling, compressed, "--over", "full", "--kv-cache paged", "32768+128 ×3"]
    out = run_script("summarize.py", [*args, "--over", "kept", "--kv-cache paged", "8192+128 ×15"], monkeypatch, capsys)
    rows = [line.split() for line in out.splitlines() if "×15" in line]
    # the ceiling: 1200 / 400; the compressed row: 900 / 400 over the full pool, 900 / 1200 over the ceiling
    assert rows[0][-2:] == ["3.000x", "1.000x"]
    assert rows[1][-2:] == ["2.250x", "0.750x"]


def test_batched_refuses_a_reference_row_it_cannot_find(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    only = write_csv(
        tmp_path / "b.csv",
        BATCHED_FIELDS,
        [{"run_id": 1, "extra": "", "config": "1+1 ×1", "speed_tg": 1.0, "status": "ok"}],
    )
    monkeypatch.setattr(sys, "argv", ["summarize.py", "--batched", only, "--over", "x", "no such flags", "1+1 ×1"])
    with pytest.raises(SystemExit, match="no row with extra 'no such flags'"):
        runpy.run_path(str(SCRIPTS / "summarize.py"), run_name="__main__")


def test_amortized_overhead_from_phases_and_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    phases = tmp_path / "phases"
    phases.mkdir()
    # two compressions: 10+20+5+5 = 40 ms and 30+40+10+20 = 100 ms (the costliest)
    (phases / "d32768-phases.txt").write_text(
        "compress: sequence 0: 100 slots scored; metric 10.0 ms, selection 20.0 ms, eviction 5.0 ms\n"
        "run_compress: compaction 5.0 ms\n"
        "compress: sequence 0: 200 slots scored; metric 30.0 ms, selection 40.0 ms, eviction 10.0 ms\n"
        "run_compress: compaction 20.0 ms\n"
    )
    row = {"test": "tg128@d32768", "n_gen": 128, "n_depth": 32768, "type_k": "f16", "type_v": "f16", "fa": "on"}
    bench = write_csv(
        tmp_path / "bench.csv",
        BENCH_FIELDS,
        [
            {**row, "extra": "", "median_ts": 100.0},
            {**row, "extra": "--kv-compress kvc --kv-compress-rate 4", "median_ts": 200.0},
            {**row, "type_k": "q8_kv", "type_v": "q8_kv", "extra": "--kv-compress kvc", "median_ts": 150.0},
        ],
    )
    out = run_script("summarize.py", ["--phases", str(phases), "--amortized", "2048", bench], monkeypatch, capsys)
    lines = [line for line in out.splitlines() if line.startswith("  depth")]
    # one f16 KV-Compress row: 2048 tokens at 200 t/s take 10240 ms; 100 / 10240
    assert len(lines) == 1
    assert "compression   100.0 ms" in lines[0] and "10240.0 ms" in lines[0] and lines[0].endswith(": 0.0098")


def test_restore_probe_splits_each_repetition(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    run = {"n_prompt": 1024, "n_batch": 512, "samples_ts": [1000.0, 900.0], "samples_ns": [30_000_000, 45_000_000]}
    probe = tmp_path / "probe.txt"
    probe.write_text("# a run\n" + json.dumps(run) + "\nllama-bench: depth 64 restored in 12.5 ms (1.0 MiB of state)\n")
    step = tmp_path / "step.err"
    lines = [
        # the warm-up run, the depth (a group of another size), then the two timed repetitions
        "llama-bench: batch of 512 after 0: host 1.00 ms, then device 1.00 ms",
        "llama-bench: batch of 512 after 512: host 1.00 ms, then device 1.00 ms",
        "llama-bench: batch of 64 after 0: host 9.00 ms, then device 9.00 ms",
        "llama-bench: batch of 512 after 0: host 2.00 ms, then device 10.00 ms",
        "llama-bench: batch of 512 after 512: host 3.00 ms, then device 10.00 ms",
        "llama-bench: depth 64 restored in 12.5 ms (1.0 MiB of state)",
        "llama-bench: batch of 512 after 0: host 2.00 ms, then device 10.00 ms",
        "llama-bench: batch of 512 after 512: host 3.00 ms, then device 10.00 ms",
    ]
    step.write_text("\n".join(lines) + "\n")
    out = run_script("restore_probe.py", [str(probe), str(step), str(probe)], monkeypatch, capsys)
    assert "t/s per repetition: 1000.0, 900.0" in out and "restores (ms): 12.5" in out
    # 30 ms and 45 ms per repetition, 25 ms of batches in each: 5 ms and 20 ms beyond them
    assert "repetition 1: host 5.0 ms, device 20.0 ms, beyond the batches 5.0 ms" in out
    assert "repetition 2: host 5.0 ms, device 20.0 ms, beyond the batches 20.0 ms" in out
