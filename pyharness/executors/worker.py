"""What runs on a node: a survey of the node (its harness, hardware, builds and the cells' configuration hashes
there) and one matrix cell. Plain Python: the Ray executor calls these inside its tasks, and tests call them directly.

A cell's worker checks that its harness is the driver's, gets the builds the cell needs from the node's build cache
(building them there once), resolves the model through the node's model cache, runs the cell with the runners the
local executor uses, and returns the run record: parsed results, raw output, and the node's own provenance (host,
CPU, GPU, driver). It never writes the store: the driver does.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pyharness import matrix, paths
from pyharness.build import BuildInfo, load_build
from pyharness.errors import HarnessError
from pyharness.executors.fingerprint import MISMATCH_FIX, harness_fingerprint, mismatch_message
from pyharness.executors.node_builds import (
    BuildWant,
    NodeBuilder,
    NodeBuildError,
    ensure_build,
    missing_build_tools,
)
from pyharness.file_lock import file_lock
from pyharness.host import HostInfo, host_info
from pyharness.matrix import MODEL_FREE_KINDS, NO_MODEL, Cell, MatrixSpec
from pyharness.runners import ModelRef, RunContext, resolve_model
from pyharness.store import RunRecord

if TYPE_CHECKING:
    from pyharness.store import Store

CellRunner = Callable[[Cell, RunContext, str | None, Path | None], RunRecord]
BuildKey = tuple[str, str]  # (variant, backend)


@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    hostname: str

    def label(self) -> str:
        """`host/abc123`: the host name and the start of Ray's node id (several nodes may share a host)."""
        return f"{self.hostname}/{self.node_id[:6]}"


@dataclass
class JobSettings:
    """What every cell of one matrix run shares (sent to the cluster once)."""

    spec: MatrixSpec
    text: str | None
    echo: bool
    no_build: bool
    fingerprint: str  # the driver's harness fingerprint
    wants: dict[BuildKey, BuildWant]
    cell_runner: CellRunner | None = None  # None: pyharness.matrix.run_cell (tests put fakes here)
    node_builder: NodeBuilder | None = None  # None: pyharness.build.build


@dataclass
class CellOutcome:
    index: int
    node: NodeIdentity
    record: RunRecord
    seconds: float


def needed_builds(cell: Cell) -> list[BuildKey]:
    """The builds a cell runs: its own, and its KLD base's."""
    keys: list[BuildKey] = [(cell.variant, cell.backend)]
    base = matrix.kld_base_of(cell)
    if base and (base.variant, base.backend or cell.backend) not in keys:
        keys.append((base.variant, base.backend or cell.backend))
    return keys


def _failed(cell: Cell, s: JobSettings, chash: str, error: str, log: str = "") -> RunRecord:
    record = matrix.failed_build_record(cell, s.spec, error, chash)
    if log:
        record.fields["stderr"] = log
    return record


def resolve_here(name: str) -> ModelRef:
    """The model from this node's cache, fetched or generated once even when several cells start together."""
    key = hashlib.sha256(name.encode()).hexdigest()[:16]
    with file_lock(paths.cache_dir() / "models" / f".resolve-{key}.lock"):
        return resolve_model(name)


def run_cell_here(cell: Cell, s: JobSettings, node: NodeIdentity) -> RunRecord:
    """Run one cell on this node and return its record (a failure is a record too, never an exception)."""
    label = node.label()
    mine = harness_fingerprint()
    if mine != s.fingerprint:
        return _failed(
            cell,
            s,
            matrix.placeholder_hash("mismatch", cell),
            f"{mismatch_message(f'node {label}', mine, s.fingerprint)}; fix: {MISMATCH_FIX}",
        )
    builds: dict[BuildKey, BuildInfo] = {}
    try:
        for key in needed_builds(cell):
            builds[key] = ensure_build(s.wants[key], node=label, no_build=s.no_build, builder=s.node_builder)
    except NodeBuildError as exc:
        return _failed(cell, s, matrix.placeholder_hash("unbuilt", cell), f"build failed: {exc}", exc.log)
    except HarnessError as exc:
        return _failed(cell, s, matrix.placeholder_hash("unbuilt", cell), f"build failed on node {label}: {exc}")
    try:
        model = resolve_here(cell.model) if cell.ev.kind not in MODEL_FREE_KINDS else NO_MODEL
        ctx = RunContext(
            build=builds[(cell.variant, cell.backend)],
            model=model,
            matrix=s.spec.name,
            cell=cell.label(),
            timeout_s=s.spec.timeout,
            echo=s.echo,
        )
        chash = matrix.cell_config(cell, ctx, s.text, None)
    except HarnessError as exc:
        return _failed(cell, s, matrix.placeholder_hash("unresolved", cell), f"node {label}: {exc}")
    runner = s.cell_runner or matrix.run_cell
    try:
        return runner(cell, ctx, s.text, None)
    except HarnessError as exc:
        return matrix.failed_build_record(cell, s.spec, str(exc), chash)
    except Exception as exc:  # a bug in a runner: the cell fails with the traceback, the matrix goes on
        return _failed(cell, s, chash, f"node {label}: {type(exc).__name__}: {exc}", traceback.format_exc())


def run_job(
    index: int, cell: Cell, s: JobSettings, node: NodeIdentity, on_start: Callable[[], Any] | None = None
) -> CellOutcome:
    if on_start is not None:
        with contextlib.suppress(Exception):  # progress is best effort
            on_start()
    t0 = time.monotonic()
    record = run_cell_here(cell, s, node)
    return CellOutcome(index=index, node=node, record=record, seconds=round(time.monotonic() - t0, 3))


# ------------------------------------------------------------------------------------------------ the survey


@dataclass
class SurveyRequest:
    spec: MatrixSpec
    text: str | None
    fingerprint: str
    wants: dict[BuildKey, BuildWant]


@dataclass
class NodeSurvey:
    node: NodeIdentity
    host: HostInfo
    fingerprint: str
    root: str
    missing_tools: list[str]
    hashes: list[str | None] = field(default_factory=list)  # per cell of spec.cells(); None: not hashable here yet
    error: str = ""


class _NoStore:
    """plan() asks the store whether a configuration ran; on a node the answer comes later, from the driver."""

    def find_ok(self, config_hash: str) -> None:
        return None


def survey_node(req: SurveyRequest, node: NodeIdentity) -> NodeSurvey:
    """This node's harness, hardware and tools, and the configuration hash of every cell as it would run here.

    A cell whose build is not on this node yet (or whose synthetic model is not generated yet) has no hash here:
    the cell has not run here with this node's build, so the store cannot hold it under this node's hash."""
    survey = NodeSurvey(
        node=node,
        host=host_info(),
        fingerprint=harness_fingerprint(),
        root="",
        missing_tools=sorted({t for b in req.spec.backends for t in missing_build_tools(b)}),
    )
    if survey.fingerprint != req.fingerprint:
        survey.error = mismatch_message(f"node {node.label()}", survey.fingerprint, req.fingerprint)
        return survey
    try:
        root = paths.project_root()
        survey.root = str(root)

        def cached_only(variant: str, backend: str) -> BuildInfo:
            want = req.wants[(variant, backend)]
            info = load_build(variant, backend, root)
            if not want.matches(info):
                raise HarnessError(f"{want.label()} here is another build ({want.differences(info)})")
            return info

        with contextlib.redirect_stderr(io.StringIO()):
            planned = matrix.plan(
                req.spec, cast("Store", _NoStore()), builder=cached_only, text=req.text, root=root, dry_run=True
            )
        survey.hashes = [p.config_hash if p.ctx is not None else None for p in planned]
    except HarnessError as exc:
        survey.error = f"node {node.label()}: {exc}"
    return survey
