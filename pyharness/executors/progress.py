"""What the progress bar says about a cluster: how many cells run on each node right now."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping


def running_by_node(running: Mapping[int, str]) -> dict[str, int]:
    """{node label: cells running there} from {cell index: node label}."""
    return dict(sorted(Counter(running.values()).items()))


def format_running(running: Mapping[int, str]) -> str:
    counts = running_by_node(running)
    if not counts:
        return "waiting for a node"
    return "running: " + ", ".join(f"{node} {n}" for node, n in counts.items())


def format_placements(placements: Mapping[int, str]) -> str:
    """The end-of-matrix summary: cells finished per node."""
    counts = running_by_node(placements)
    return ", ".join(f"{node} {n} cell{'s' if n != 1 else ''}" for node, n in counts.items())
