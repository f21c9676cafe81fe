"""Which harness a process runs: its version and a hash of its Python sources.

The Ray executor refuses to mix harnesses: a worker whose sources differ from the driver's would store results made
by other code under the driver's name, so the driver compares every node's fingerprint with its own before a cell
runs, and each cell checks again on its node (a node may join after the check).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import pyharness


def package_dir() -> Path:
    return Path(pyharness.__file__).resolve().parent


def sources_hash(folder: Path) -> str:
    """sha256 of every .py file under `folder`, by relative path and content (order-independent of the walk)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.cache
def harness_fingerprint() -> str:
    """`<version>+<first 12 hex digits of the sources hash>`, computed once per process."""
    return f"{pyharness.__version__}+{sources_hash(package_dir())[:12]}"


def mismatch_message(where: str, theirs: str, ours: str) -> str:
    return f"harness version mismatch: {where} runs pyharness {theirs}, the driver {ours} ({package_dir()})"


MISMATCH_FIX = (
    "install the same pyharness (the same commit of this checkout) on the driver and every node, then restart Ray "
    "on the nodes (`ray stop; ray start ...`) so its workers load it"
)
