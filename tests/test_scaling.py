"""`pyharness scaling`: a serial and a parallel invocation of one matrix, compared from their stores only."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyharness.cli import main
from pyharness.errors import HarnessError
from pyharness.scaling import compare, scaling_markdown
from pyharness.store import RunRecord, Store


def write_store(
    db: Path,
    executor: str,
    cells: dict[str, tuple[float, str | None]],
    seconds: float,
    *,
    host_cpu: str = "Xeon 8480",
    gpu_name: str = "NVIDIA H200",
    failed: tuple[str, ...] = (),
    matrix: str = "demo",
    setup: float = 0.0,
) -> None:
    with Store(db) as store:
        for i, (cell, (duration, gpu)) in enumerate(cells.items()):
            store.record(
                RunRecord(
                    fields={
                        "kind": "bench",
                        "status": "ok",
                        "config_hash": f"h{i}",
                        "config": {"cell": cell},
                        "params": {},
                        "matrix": matrix,
                        "cell": cell,
                        "variant": "upstream",
                        "backend": "cuda",
                        "upstream_commit": "0c1e57098bba43ac",
                        "host_name": "gpu-host",
                        "host_cpu": host_cpu,
                        "gpu_name": gpu_name,
                        "gpu_count": 4,
                        "gpu_driver": "580.1",
                        "cuda_version": "13.0",
                        "duration_s": duration,
                        "gpu_visible": gpu,
                    }
                )
            )
        for j, cell in enumerate(failed):
            store.record(
                RunRecord(
                    fields={
                        "kind": "bench",
                        "status": "failed",
                        "error": "boom",
                        "config_hash": f"f{j}",
                        "config": {},
                        "params": {},
                        "matrix": matrix,
                        "cell": cell,
                    }
                )
            )
        n = len(cells) + len(failed)
        store.record_matrix_run(
            {
                "matrix": matrix,
                "executor": executor,
                "started_at": "2026-11-26T03:00:00Z",
                "finished_at": "2026-11-26T03:05:00Z",
                "seconds": seconds,
                "setup_seconds": setup,
                "cells_seconds": seconds - setup - 1.0 if executor == "ray" else None,
                "ran": n,
                "ok": len(cells),
                "failed": len(failed),
                "skipped": 0,
                "host_name": "gpu-host",
                "placements": {"gpu-host/abc123": n} if executor == "ray" else {},
            }
        )


SERIAL = {"a": (40.0, None), "b": (50.0, None), "c": (60.0, None), "d": (45.0, None)}
PARALLEL = {"a": (41.0, "0"), "b": (52.0, "1"), "c": (63.0, "2"), "d": (44.0, "3")}


def test_ratio_is_parallel_wall_over_slowest_cell(tmp_path: Path) -> None:
    write_store(tmp_path / "s.sqlite", "local", SERIAL, 240.0)
    write_store(tmp_path / "p.sqlite", "ray", PARALLEL, 78.0, setup=8.0)
    sc = compare(tmp_path / "s.sqlite", tmp_path / "p.sqlite")
    assert sc.slowest_cell == ("c", 63.0)
    assert sc.ratio == pytest.approx(70.0 / 63.0) and sc.wall_ratio == pytest.approx(78.0 / 63.0)
    assert sc.serial_cell_seconds == pytest.approx(195.0)
    assert sc.gpus_used == 4 and sc.met
    md = scaling_markdown(sc)
    assert (
        "| (wall - setup) / slowest cell | 1.11x (target <= 1.2x) |" in md and "| wall / slowest cell | 1.24x |" in md
    )
    assert "| of which cells (first submitted to last result) | 69.0 s |" in md
    assert "| target | met |" in md and "| c | 60.0 | 63.0 | gpu-host GPU 2 |" in md
    assert "gpu-host/abc123 4" in md


def test_cli_fails_when_the_target_is_missed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_store(tmp_path / "s.sqlite", "local", SERIAL, 240.0)
    write_store(tmp_path / "p.sqlite", "ray", PARALLEL, 120.0)  # 1.9x the slowest cell
    out = tmp_path / "report" / "README.md"
    rc = main(
        ["scaling", "--serial", str(tmp_path / "s.sqlite"), "--parallel", str(tmp_path / "p.sqlite"), "--out", str(out)]
    )
    assert rc == 1 and "| target | not met |" in out.read_text()


def test_a_failed_parallel_cell_misses_the_target(tmp_path: Path) -> None:
    write_store(tmp_path / "s.sqlite", "local", {**SERIAL, "e": (10.0, None)}, 240.0)
    write_store(tmp_path / "p.sqlite", "ray", {**PARALLEL, "e": (10.0, "0")}, 64.0, failed=("x",))
    write_store(tmp_path / "s2.sqlite", "local", {**SERIAL, "e": (10.0, None)}, 240.0, failed=("x",))
    sc = compare(tmp_path / "s2.sqlite", tmp_path / "p.sqlite")
    assert sc.ratio < 1.2 and not sc.met and "Failed in the parallel run: x" in scaling_markdown(sc)


def test_different_hardware_is_refused(tmp_path: Path) -> None:
    write_store(tmp_path / "s.sqlite", "local", SERIAL, 240.0, gpu_name="NVIDIA H100 80GB HBM3")
    write_store(tmp_path / "p.sqlite", "ray", PARALLEL, 70.0)
    with pytest.raises(HarnessError, match="different hardware"):
        compare(tmp_path / "s.sqlite", tmp_path / "p.sqlite")


def test_different_cells_are_refused(tmp_path: Path) -> None:
    write_store(tmp_path / "s.sqlite", "local", SERIAL, 240.0)
    write_store(tmp_path / "p.sqlite", "ray", {k: v for k, v in PARALLEL.items() if k != "d"}, 70.0)
    with pytest.raises(HarnessError, match="only in one: d"):
        compare(tmp_path / "s.sqlite", tmp_path / "p.sqlite")


def test_a_store_without_an_invocation_says_what_to_do(tmp_path: Path) -> None:
    write_store(tmp_path / "p.sqlite", "ray", PARALLEL, 70.0)
    Store(tmp_path / "empty.sqlite").close()
    with pytest.raises(HarnessError, match="holds no invocation") as info:
        compare(tmp_path / "empty.sqlite", tmp_path / "p.sqlite")
    assert "pyharness matrix" in (info.value.fix or "")
    with pytest.raises(HarnessError, match="no results store"):
        compare(tmp_path / "missing.sqlite", tmp_path / "p.sqlite")
