"""How a matrix scales over GPUs: one invocation run one cell at a time against one run through Ray.

Both invocations of the same matrix write their own store (a store skips cells it already holds, so the second run
needs a fresh file). Each store holds the invocation's `matrix_runs` row (executor, wall time, placements) and its
cells' `runs` rows (duration, host, the GPU Ray gave the cell). The report says, from those rows only:

- the parallel invocation's wall time, less its one-time setup (starting or joining Ray, surveying the nodes and
  their builds), against its slowest cell (issue 9's target: at most 1.2x, the builds having been made by the serial
  run first); the whole wall time against it too; and the speed-up over the serial invocation's cells;
- every cell's duration in both runs, and where the parallel run placed it.

Runs from different hardware are refused: a ratio between two machines says nothing about scaling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyharness.errors import HarnessError
from pyharness.report import md_table
from pyharness.store import Store

TARGET_RATIO = 1.2


@dataclass(frozen=True)
class Invocation:
    """One `pyharness matrix` invocation and the latest ok run of each of its cells."""

    row: dict[str, Any]
    cells: dict[str, dict[str, Any]]  # cell label -> run row
    failed: list[str]

    @property
    def executor(self) -> str:
        return str(self.row["executor"])

    @property
    def seconds(self) -> float:
        return float(self.row["seconds"] or 0.0)

    @property
    def setup_seconds(self) -> float:
        """The one-time part before any cell ran (Ray: starting or joining it, surveying the nodes' builds)."""
        return float(self.row.get("setup_seconds") or 0.0)

    @property
    def placements(self) -> dict[str, int]:
        return dict(json.loads(self.row["placements"] or "{}"))

    def hardware(self) -> tuple[str, str]:
        hosts = {str(r["host_cpu"]) for r in self.cells.values()}
        gpus = {str(r["gpu_name"]) for r in self.cells.values()}
        return (" / ".join(sorted(hosts)), " / ".join(sorted(gpus)))


def load_invocation(store: Store, matrix: str | None) -> Invocation:
    rows = store.matrix_runs(matrix)
    if not rows:
        what = f"matrix '{matrix}'" if matrix else "any matrix"
        raise HarnessError(
            f"{store.path} holds no invocation of {what}",
            "run `pyharness matrix FILE --db THIS_DB` first (stores written before matrix_runs existed cannot be used)",
        )
    names = {r["matrix"] for r in rows}
    if matrix is None and len(names) > 1:
        raise HarnessError(f"{store.path} holds several matrices ({', '.join(sorted(names))})", "name one: --matrix")
    row = rows[-1]
    cells: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    for run in store.runs(matrix=row["matrix"], status=None):
        if run["status"] == "ok":
            cells[str(run["cell"])] = run
        else:
            failed.append(str(run["cell"]))
    failed = [c for c in dict.fromkeys(failed) if c not in cells]
    if not cells:
        raise HarnessError(f"{store.path}: matrix '{row['matrix']}' has no successful cell", "see its failed runs")
    return Invocation(row=row, cells=cells, failed=failed)


@dataclass(frozen=True)
class Scaling:
    matrix: str
    serial: Invocation
    parallel: Invocation
    serial_ts: dict[tuple[str, str], float] = field(default_factory=dict)
    parallel_ts: dict[tuple[str, str], float] = field(default_factory=dict)

    @property
    def slowest_cell(self) -> tuple[str, float]:
        label, run = max(self.parallel.cells.items(), key=lambda kv: float(kv[1]["duration_s"] or 0.0))
        return label, float(run["duration_s"] or 0.0)

    @property
    def ratio(self) -> float:
        """The target's measure: the parallel run's wall time without its one-time setup, over its slowest cell."""
        slowest = self.slowest_cell[1]
        return (self.parallel.seconds - self.parallel.setup_seconds) / slowest if slowest > 0 else float("inf")

    @property
    def wall_ratio(self) -> float:
        """The whole wall time, setup included, over the slowest cell."""
        slowest = self.slowest_cell[1]
        return self.parallel.seconds / slowest if slowest > 0 else float("inf")

    @property
    def serial_cell_seconds(self) -> float:
        return sum(float(r["duration_s"] or 0.0) for r in self.serial.cells.values())

    @property
    def gpus_used(self) -> int:
        return len({(r["host_name"], r["gpu_visible"]) for r in self.parallel.cells.values()})

    @property
    def met(self) -> bool:
        return not self.parallel.failed and self.ratio <= TARGET_RATIO


def bench_medians(store: Store, inv: Invocation) -> dict[tuple[str, str], float]:
    """Median t/s of every llama-bench test of the invocation's cells, by (cell, test)."""
    ids = {int(r["run_id"]): cell for cell, r in inv.cells.items()}
    rows = store.conn.execute("SELECT run_id, test, median_ts FROM bench_test").fetchall()
    return {(ids[r["run_id"]], str(r["test"])): float(r["median_ts"]) for r in rows if r["run_id"] in ids}


def compare(serial_db: Path, parallel_db: Path, matrix: str | None = None) -> Scaling:
    for path in (serial_db, parallel_db):
        if not path.is_file():
            raise HarnessError(f"no results store at {path}", "give the --db files the two matrix runs wrote")
    with Store(serial_db) as s, Store(parallel_db) as p:
        serial = load_invocation(s, matrix)
        parallel = load_invocation(p, matrix or str(serial.row["matrix"]))
        serial_ts, parallel_ts = bench_medians(s, serial), bench_medians(p, parallel)
    if serial.row["matrix"] != parallel.row["matrix"]:
        raise HarnessError(
            f"the stores hold different matrices ('{serial.row['matrix']}' and '{parallel.row['matrix']}')",
            "compare two runs of one matrix",
        )
    if serial.hardware() != parallel.hardware():
        raise HarnessError(
            f"the two runs come from different hardware ({serial.hardware()} against {parallel.hardware()})",
            "run both invocations on one machine",
        )
    missing = sorted(set(serial.cells) ^ set(parallel.cells))
    if missing:
        raise HarnessError(
            f"the two runs did not run the same cells (only in one: {', '.join(missing)})",
            "re-run the invocation that lacks them (it resumes), then compare again",
        )
    return Scaling(
        matrix=str(serial.row["matrix"]),
        serial=serial,
        parallel=parallel,
        serial_ts=serial_ts,
        parallel_ts=parallel_ts,
    )


def _where(run: dict[str, Any]) -> str:
    gpu = run.get("gpu_visible")
    return f"{run['host_name']}" + (f" GPU {gpu}" if gpu not in (None, "") else "")


def scaling_markdown(sc: Scaling) -> str:
    ser, par = sc.serial, sc.parallel
    cpu, gpu = par.hardware()
    label, slowest = sc.slowest_cell
    any_run = next(iter(par.cells.values()))
    cells_s = f"{float(par.row['cells_seconds']):.1f} s" if par.row.get("cells_seconds") is not None else "-"
    speedup = f"{sc.serial_cell_seconds / par.seconds:.2f}x" if par.seconds else "-"
    lines = [
        f"# Scaling: matrix `{sc.matrix}`",
        "",
        f"- Hardware: {gpu} x {any_run['gpu_count']} on {any_run['host_name']} ({cpu}); "
        f"driver {any_run['gpu_driver']}, CUDA {any_run['cuda_version']}",
        f"- Serial: `{ser.executor}` executor, {ser.row['started_at']} – {ser.row['finished_at']}, "
        f"{ser.row['ran']} cells run, {ser.seconds:.1f} s wall (includes the one-time builds and model preparation)",
        f"- Parallel: `{par.executor}` executor, {par.row['started_at']} – {par.row['finished_at']}, "
        f"{par.row['ran']} cells run on {sc.gpus_used} GPU(s), {par.seconds:.1f} s wall; cells per node: "
        + ", ".join(f"{n} {c}" for n, c in sorted(par.placements.items())),
        f"- Harness {par.row['harness_version']}; upstream `{str(any_run['upstream_commit'])[:12]}`",
        "",
        "## Result",
        "",
        md_table(
            ["measure", "value"],
            [
                ["cells", len(par.cells)],
                ["slowest cell (parallel run)", f"{slowest:.1f} s ({label})"],
                ["parallel wall time", f"{par.seconds:.1f} s"],
                ["of which one-time setup (start Ray, survey nodes and builds)", f"{par.setup_seconds:.1f} s"],
                ["of which cells (first submitted to last result)", cells_s],
                ["(wall - setup) / slowest cell", f"{sc.ratio:.2f}x (target <= {TARGET_RATIO}x)"],
                ["wall / slowest cell", f"{sc.wall_ratio:.2f}x"],
                ["sum of cell times (serial run)", f"{sc.serial_cell_seconds:.1f} s"],
                ["serial cells / parallel wall", speedup],
                ["target", "met" if sc.met else "not met"],
            ],
            ["l", "r"],
        ),
    ]
    if par.failed:
        lines += ["", f"Failed in the parallel run: {', '.join(par.failed)}"]
    rows = []
    for cell in sorted(par.cells):
        s, p = ser.cells[cell], par.cells[cell]
        rows.append([cell, f"{float(s['duration_s'] or 0):.1f}", f"{float(p['duration_s'] or 0):.1f}", _where(p)])
    lines += [
        "",
        "## Cells",
        "",
        md_table(["cell", "serial s", "parallel s", "parallel: ran on"], rows, ["l", "r", "r", "l"]),
        "",
    ]
    both = sorted(set(sc.serial_ts) & set(sc.parallel_ts))
    if both:
        ts_rows = []
        for cell, test in both:
            alone, shared = sc.serial_ts[cell, test], sc.parallel_ts[cell, test]
            ratio = f"{shared / alone:.3f}" if alone else "-"
            ts_rows.append([cell, test, f"{alone:.2f}", f"{shared:.2f}", ratio])
        lines += [
            "## Throughput alone and beside the other cells",
            "",
            "llama-bench medians of each cell when it ran alone (serial run) and while the other cells ran on the "
            "host's other GPUs (parallel run): what sharing the host costs each cell.",
            "",
            md_table(
                ["cell", "test", "t/s alone", "t/s in parallel", "parallel / alone"], ts_rows, ["l", "l", "r", "r", "r"]
            ),
            "",
        ]
    return "\n".join(lines)
