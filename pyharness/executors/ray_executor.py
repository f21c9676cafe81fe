"""`pyharness matrix --executor ray`: the cells of a matrix as Ray tasks, on one machine or a cluster.

The driver (the process running `pyharness matrix`) joins Ray, surveys every node (harness fingerprint, hardware,
build tools, and the configuration hash each cell has there), refuses to start when a cell needs resources no node
has or a node runs another harness, skips the cells the store already holds, and submits one task per remaining
cell. Each task declares what its cell needs (`demands`), so Ray places it and never shares a GPU between cells.
Results come back to the driver, which alone writes the store, one transaction per run.

Faults: a task lost with its node or worker is submitted again (at most `retries` times), then stored as failed with
the errors of its attempts; a failure inside the cell (a tool that exits non-zero, a build that fails) is a result,
stored as such, and not retried. Ctrl-C cancels every outstanding task and writes nothing more; a re-run resumes.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ray.exceptions import GetTimeoutError, RayError, RayTaskError, TaskCancelledError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pyharness import matrix
from pyharness.errors import HarnessError
from pyharness.executors.demands import Demand, NodeResources, cell_demand, check_feasible, fits
from pyharness.executors.fingerprint import MISMATCH_FIX, harness_fingerprint
from pyharness.executors.node_builds import NodeBuilder, want_for
from pyharness.executors.progress import format_placements, format_running
from pyharness.executors.ray_cluster import RayNode, alive_nodes, ray, ray_session
from pyharness.executors.worker import (
    CellOutcome,
    CellRunner,
    JobSettings,
    NodeIdentity,
    NodeSurvey,
    SurveyRequest,
    needed_builds,
    run_job,
    survey_node,
)
from pyharness.host import HostInfo
from pyharness.matrix import Builder, Cell, MatrixResult, MatrixSpec
from pyharness.store import RunRecord, Store

SURVEY_TIMEOUT_S = 900.0  # a first survey may fetch models on every node


def _this_node() -> NodeIdentity:
    from pyharness.host import host_info

    return NodeIdentity(node_id=ray.get_runtime_context().get_node_id(), hostname=host_info().hostname)


@ray.remote(num_cpus=0, max_retries=0)
def _survey_task(req: SurveyRequest) -> NodeSurvey:
    return survey_node(req, _this_node())


@ray.remote(max_retries=0)
def _cell_task(index: int, cell: Cell, settings: JobSettings, board: ray.actor.ActorHandle) -> CellOutcome:
    node = _this_node()
    return run_job(index, cell, settings, node, on_start=lambda: board.started.remote(index, node.label()))


@ray.remote(num_cpus=0, max_restarts=0)
class ProgressBoard:
    """Where each cell started (reported by the cells themselves), read by the driver for its progress line."""

    def __init__(self) -> None:
        self.where: dict[int, str] = {}

    def started(self, index: int, node: str) -> None:
        self.where[index] = node

    def snapshot(self) -> dict[int, str]:
        return dict(self.where)


@dataclass
class RayExecutor:
    """Cells as Ray tasks. `address`: None starts a local Ray instance, `auto` or HOST:PORT joins a cluster."""

    address: str | None = None
    retries: int = 2
    no_build: bool = False
    num_cpus: int | None = None  # CPUs of a local instance (default: all)
    cuda_arch: str = "90"
    poll_s: float = 0.5
    cell_runner: CellRunner | None = None  # tests: a fake cell (default pyharness.matrix.run_cell)
    node_builder: NodeBuilder | None = None  # tests: a fake build (default pyharness.build.build)
    name: str = "ray"
    placements: dict[int, str] = field(default_factory=dict)  # cell index -> node that ran it (last run)
    surveys: list[NodeSurvey] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise HarnessError(f"--retries {self.retries} is negative", "pass 0 or more")

    # -------------------------------------------------------------------------------------------- the run

    def run(
        self,
        spec: MatrixSpec,
        store: Store,
        *,
        builder: Builder | None = None,  # unused: nodes build for themselves
        text: str | None = None,
        root: Path | None = None,
        retry_failed: bool = True,
        dry_run: bool = False,
        echo: bool = False,
        progress: bool = True,
    ) -> MatrixResult:
        t0 = time.monotonic()
        cells = spec.cells()
        demands = [cell_demand(c, spec.gpu_kind) for c in cells]
        keys = dict.fromkeys(key for c in cells for key in needed_builds(c))
        wants = {key: want_for(*key, root=root, cuda_arch=self.cuda_arch) for key in keys}
        self.placements = {}
        fingerprint = harness_fingerprint()
        with ray_session(self.address, num_cpus=self.num_cpus, resources=self._local_resources(spec), verbose=echo):
            nodes = alive_nodes()
            check_feasible(cells, demands, [NodeResources(n.label(), n.resources) for n in nodes])
            self.surveys = self._survey(nodes, SurveyRequest(spec, text, fingerprint, wants))
            result = MatrixResult()
            todo, shown = self._select(cells, demands, nodes, store, retry_failed, result)
            print(
                f"matrix {spec.name}: {len(cells)} cells, {result.skipped} already stored, {len(todo)} to run "
                f"on {len(nodes)} Ray node(s)",
                file=sys.stderr,
            )
            if dry_run:
                for chash, label, state in shown:
                    print(f"  {chash}  {label}  [{state}]")
                return result
            settings = JobSettings(
                spec=spec,
                text=text,
                echo=echo,
                no_build=self.no_build,
                fingerprint=fingerprint,
                wants=wants,
                cell_runner=self.cell_runner,
                node_builder=self.node_builder,
            )
            t1 = time.monotonic()
            result.setup_seconds = round(t1 - t0, 1)
            self._execute(spec, cells, demands, todo, settings, store, result, progress)
            result.cells_seconds = round(time.monotonic() - t1, 1)
        result.seconds = round(time.monotonic() - t0, 1)
        if self.placements:
            print(f"matrix {spec.name}: ran on {format_placements(self.placements)}", file=sys.stderr)
        return result

    # -------------------------------------------------------------------------------------------- before running

    def _local_resources(self, spec: MatrixSpec) -> dict[str, float]:
        """A local instance on a machine with GPUs of the pinned kind offers them under that kind's name."""
        if self.address is not None or not spec.gpu_kind:
            return {}
        from pyharness.host import host_info

        host = host_info()
        if host.gpu_count and spec.gpu_kind.lower() in host.gpu_name.lower():
            return {spec.gpu_kind: float(host.gpu_count)}
        return {}

    def _survey(self, nodes: list[RayNode], req: SurveyRequest) -> list[NodeSurvey]:
        """Every alive node's survey; refuse to start if a node runs another harness."""
        refs = {
            _survey_task.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n.node_id, soft=False)
            ).remote(req): n
            for n in nodes
        }
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=SURVEY_TIMEOUT_S)
        surveys: list[NodeSurvey] = []
        for ref in late:
            ray.cancel(ref, force=True)
            print(
                f"pyharness: node {refs[ref].label()} did not answer its survey; planning without it", file=sys.stderr
            )
        for ref in ready:
            try:
                surveys.append(ray.get(ref))
            except RayError as exc:
                print(f"pyharness: node {refs[ref].label()} failed its survey ({type(exc).__name__})", file=sys.stderr)
        mismatched = [s for s in surveys if s.fingerprint != req.fingerprint]
        if mismatched:
            raise HarnessError("; ".join(s.error for s in mismatched) + "; nothing was run", MISMATCH_FIX)
        if not surveys:
            raise HarnessError("no node of the Ray cluster answered its survey; nothing was run", "see `ray status`")
        if all(s.error for s in surveys):
            raise HarnessError(f"no node can plan the matrix: {surveys[0].error}; nothing was run")
        gpus = {n.node_id: n.resources.get("GPU", 0.0) for n in refs.values()}
        for s in surveys:
            if s.error:
                print(f"pyharness: {s.error} (its cells fail there with that error)", file=sys.stderr)
            missing = [t for t in s.missing_tools if gpus.get(s.node.node_id) or not t.startswith("nvcc")]
            if missing:
                print(
                    f"pyharness: node {s.node.label()} lacks {', '.join(missing)}: a cell that needs a build it does "
                    "not have yet fails there",
                    file=sys.stderr,
                )
        return surveys

    def _select(
        self,
        cells: list[Cell],
        demands: list[Demand],
        nodes: list[RayNode],
        store: Store,
        retry_failed: bool,
        result: MatrixResult,
    ) -> tuple[list[int], list[tuple[str, str, str]]]:
        """The cells to run: those the store holds under none of the hashes they have on the nodes that can run them."""
        resources = {n.node_id: n.resources for n in nodes}
        todo: list[int] = []
        shown: list[tuple[str, str, str]] = []
        for i, cell in enumerate(cells):
            hashes = sorted(
                {
                    h
                    for s in self.surveys
                    if s.hashes and fits(resources.get(s.node.node_id, {}), demands[i])
                    for h in [s.hashes[i]]
                    if h
                }
            )
            existing = next((run for h in hashes if (run := store.find_ok(h)) is not None), None)
            failed_before = not retry_failed and any(
                (row := store.find_any(h)) is not None and row["status"] == "failed" for h in hashes
            )
            shown_hash = hashes[0] if hashes else matrix.placeholder_hash("unbuilt", cell)
            if existing is not None:
                result.skipped += 1
                shown.append((shown_hash, cell.label(), f"stored as run {existing}"))
            elif failed_before:
                result.skipped += 1
                shown.append((shown_hash, cell.label(), "failed before; skipped"))
            else:
                todo.append(i)
                shown.append((shown_hash, cell.label(), "to run" if hashes else "to run; no node has its build yet"))
        return todo, shown

    # -------------------------------------------------------------------------------------------- running

    def _execute(
        self,
        spec: MatrixSpec,
        cells: list[Cell],
        demands: list[Demand],
        todo: list[int],
        settings: JobSettings,
        store: Store,
        result: MatrixResult,
        progress: bool,
    ) -> None:
        from tqdm import tqdm

        hosts = {s.node.label(): s.host for s in self.surveys}
        board = ProgressBoard.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(
                node_id=ray.get_runtime_context().get_node_id(), soft=True
            )
        ).remote()
        settings_ref = ray.put(settings)
        pending: dict[ray.ObjectRef, int] = {}
        lost: dict[int, list[str]] = {}
        finished: set[int] = set()
        where: dict[int, str] = {}
        bar = tqdm(total=len(todo), unit="run", disable=not progress, dynamic_ncols=True, file=sys.stderr)

        def say(line: str) -> None:
            bar.write(line, file=sys.stderr)

        def submit(i: int) -> None:
            d = demands[i]
            ref = _cell_task.options(
                num_cpus=d.cpus, num_gpus=d.gpus, resources=dict(d.custom), name=f"pyharness: {cells[i].label()}"
            ).remote(i, cells[i], settings_ref, board)
            pending[ref] = i

        try:
            for i in todo:
                submit(i)
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=self.poll_s)
                where.update(self._where(board))
                active = set(pending.values()) - {pending[ref] for ref in ready}
                running = {i: node for i, node in where.items() if i in active}
                bar.set_postfix_str(format_running(running), refresh=True)
                for ref in ready:
                    i = pending.pop(ref)
                    record = self._collect(ref, i, spec, cells[i], where.get(i), lost, hosts, say)
                    if record is None:
                        submit(i)
                        continue
                    if i in finished:  # a result already stored for this cell: never write a cell twice
                        continue
                    finished.add(i)
                    matrix.record_outcome(store, result, cells[i].label(), record, bar.write)
                    bar.update(1)
        except BaseException:
            # Ctrl-C (or any error): nothing more is written; stop every task still queued or running
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            bar.close()
            with contextlib.suppress(RayError):
                ray.kill(board)

    def _where(self, board: ray.actor.ActorHandle) -> dict[int, str]:
        try:
            return ray.get(board.snapshot.remote(), timeout=10)
        except (RayError, GetTimeoutError):
            return {}

    def _collect(
        self,
        ref: ray.ObjectRef,
        i: int,
        spec: MatrixSpec,
        cell: Cell,
        node: str | None,
        lost: dict[int, list[str]],
        hosts: dict[str, HostInfo],
        say: Callable[[str], None],
    ) -> RunRecord | None:
        """The cell's record, or None when it was lost and is to be submitted again."""
        try:
            outcome: CellOutcome = ray.get(ref)
        except RayTaskError as exc:  # the task itself raised: not a lost node, retrying would fail the same way
            return self._lost_record(spec, cell, f"the cell's task failed: {_first_line(exc)}", str(exc), node, hosts)
        except (RayError, TaskCancelledError) as exc:
            attempts = lost.setdefault(i, [])
            attempts.append(f"attempt {len(attempts) + 1} on node {node or '?'}: {type(exc).__name__}: {exc}")
            if len(attempts) <= self.retries:
                say(
                    f"lost {cell.label()} on node {node or '?'} ({type(exc).__name__}); "
                    f"retry {len(attempts)} of {self.retries}"
                )
                return None
            return self._lost_record(
                spec,
                cell,
                f"lost {len(attempts)} times (last on node {node or '?'}: {type(exc).__name__}); "
                f"not retried again (--retries {self.retries})",
                "\n\n".join(attempts),
                node,
                hosts,
            )
        self.placements[i] = outcome.node.label()
        return outcome.record

    def _lost_record(
        self, spec: MatrixSpec, cell: Cell, error: str, log: str, node: str | None, hosts: dict[str, HostInfo]
    ) -> RunRecord:
        record = matrix.failed_build_record(cell, spec, error, matrix.placeholder_hash("lost", cell))
        record.fields["stderr"] = log
        host = hosts.get(node or "")
        if host is not None:  # the provenance of the node it was lost on, not the driver's
            record.fields.update(
                host_name=host.hostname,
                host_cpu=host.cpu,
                host_cpu_count=host.cpu_count,
                host_os=host.os,
                gpu_name=host.gpu_name,
                gpu_driver=host.gpu_driver,
                cuda_version=host.cuda_version,
            )
        return record


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__
