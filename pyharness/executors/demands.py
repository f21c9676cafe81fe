"""What a cell asks of a node (CPUs, a GPU, a GPU kind), and whether any node of a cluster has it.

A CPU cell asks for as many CPUs as it runs threads (`threads` in [flags], or the sampler eval's `threads`; 1 when
unset); a cuda cell asks for one GPU and one CPU, plus one unit of the custom resource named by the matrix's
`gpu_kind` (e.g. `H100`) when it pins one. Ray then never runs two GPU cells on one GPU, nor more threads than a
node has CPUs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pyharness.errors import HarnessError
from pyharness.matrix import MODEL_FREE_KINDS, Cell

# Ray's own bookkeeping resources, not worth naming in messages
_HIDDEN_PREFIXES = ("node:", "memory", "object_store_memory", "accelerator_type:", "bundle_group")


@dataclass(frozen=True)
class Demand:
    cpus: float = 1.0
    gpus: float = 0.0
    custom: tuple[tuple[str, float], ...] = field(default=())

    def as_resources(self) -> dict[str, float]:
        """In the names of Ray's resource table (CPU, GPU, custom)."""
        out = {"CPU": self.cpus}
        if self.gpus:
            out["GPU"] = self.gpus
        out.update(dict(self.custom))
        return out

    def describe(self) -> str:
        return describe_resources(self.as_resources())


def describe_resources(resources: Mapping[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if not k.startswith(_HIDDEN_PREFIXES)}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


def cell_demand(cell: Cell, gpu_kind: str = "") -> Demand:
    if cell.backend == "cuda":
        return Demand(cpus=1.0, gpus=1.0, custom=((gpu_kind, 1.0),) if gpu_kind else ())
    threads = cell.flags.get("threads") if cell.ev.kind not in MODEL_FREE_KINDS else None
    if cell.ev.kind == "sampler":
        threads = cell.ev.values.get("threads")
    return Demand(cpus=float(max(1, int(threads or 1))))


def fits(resources: Mapping[str, float], demand: Demand) -> bool:
    """Could a node with these total resources ever run the cell?"""
    return all(resources.get(name, 0.0) >= amount for name, amount in demand.as_resources().items())


@dataclass(frozen=True)
class NodeResources:
    label: str  # e.g. "gpu-host-3/1a2b3c"
    resources: Mapping[str, float]


def check_feasible(cells: Sequence[Cell], demands: Sequence[Demand], nodes: Sequence[NodeResources]) -> None:
    """Raise, naming the cells, when a cell asks for resources that no node has (before anything runs)."""
    stuck: dict[Demand, list[str]] = {}
    for cell, demand in zip(cells, demands, strict=True):
        if not any(fits(n.resources, demand) for n in nodes):
            stuck.setdefault(demand, []).append(cell.label())
    if not stuck:
        return
    parts = []
    for demand, labels in stuck.items():
        shown = "; ".join(labels[:8]) + (f"; and {len(labels) - 8} more" if len(labels) > 8 else "")
        parts.append(f"{len(labels)} cell(s) need {demand.describe()}: {shown}")
    have = ", ".join(f"{n.label} {describe_resources(n.resources)}" for n in nodes) or "none"
    raise HarnessError(
        "no node of the Ray cluster has the resources some cells need, so nothing was run: "
        + " | ".join(parts)
        + f" (nodes: {have})",
        "start a node that has them (`ray start --address HEAD:6379 --num-gpus N --resources '{\"H100\": N}'`), "
        "or change gpu_kind / [flags] threads, or drop those cells with [[exclude]]",
    )
