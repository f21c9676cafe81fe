"""The build cache of one node: each variant built once per node, keyed by what it is built from.

A node's builds are the usual `build/<variant>-<backend>/` folders of its project root (`PYHARNESS_ROOT`, else the
checkout pyharness runs from), with their `pyharness-build.json`. A build is reused when it was made from the
driver's pinned upstream commit, patch-series hash, backend and cmake flags (`BuildWant`); otherwise the node builds
it, under a lock, so cells that start together on one node build once. A node that lacks the build tools fails the
cell with the node's name and what is missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyharness import paths
from pyharness.build import BuildInfo, build_dir_for, cmake_flags, load_build, variant_targets
from pyharness.errors import HarnessError
from pyharness.file_lock import file_lock

BUILD_TOOLS = ("cmake", "ninja", "git")
COMPILERS = ("c++", "g++", "clang++")


@dataclass(frozen=True)
class BuildWant:
    """The identity of a build a cell needs (as the driver sees it): upstream commit, series hash, backend, flags."""

    variant: str
    backend: str
    upstream_commit: str
    series_hash: str  # "none" for upstream
    flags: tuple[str, ...]  # cmake flags that do not depend on the node (no compiler launchers)
    cuda_arch: str = "90"

    def label(self) -> str:
        return f"{self.variant}-{self.backend}"

    def matches(self, info: BuildInfo) -> bool:
        return (
            info.variant == self.variant
            and info.backend == self.backend
            and info.upstream_commit == self.upstream_commit
            and info.series_hash == self.series_hash
            and all(flag in info.cmake_flags for flag in self.flags)
        )

    def differences(self, info: BuildInfo) -> str:
        diffs = []
        if info.upstream_commit != self.upstream_commit:
            diffs.append(f"upstream {info.upstream_commit[:12]}, driver {self.upstream_commit[:12]}")
        if info.series_hash != self.series_hash:
            diffs.append(f"series {info.series_hash[:12]}, driver {self.series_hash[:12]}")
        missing = [f for f in self.flags if f not in info.cmake_flags]
        if missing:
            diffs.append(f"built without {' '.join(missing)}")
        return "; ".join(diffs) or "no difference"


NodeBuilder = Callable[[BuildWant, Path], BuildInfo]


def want_for(variant: str, backend: str, root: Path | None = None, cuda_arch: str = "90") -> BuildWant:
    """What the driver's checkout says a build of `variant`-`backend` is made from."""
    from pyharness.patches import series_hash
    from pyharness.vendor import load_pin

    root = root or paths.project_root()
    targets = variant_targets(variant, root)
    flags = tuple(f for f in cmake_flags(backend, cuda_arch, [], targets) if "COMPILER_LAUNCHER" not in f)
    return BuildWant(
        variant=variant,
        backend=backend,
        upstream_commit=load_pin(root).commit,
        series_hash=series_hash(paths.patches_dir(root)) if variant == "patched" else "none",
        flags=flags,
        cuda_arch=cuda_arch,
    )


def missing_build_tools(backend: str) -> list[str]:
    """The tools a build needs that are not on this node's PATH."""
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    if not any(shutil.which(c) for c in COMPILERS):
        missing.append("a C++ compiler (c++, g++ or clang++)")
    if backend == "cuda" and shutil.which("nvcc") is None:
        missing.append("nvcc (the CUDA toolkit)")
    return missing


def default_node_builder(want: BuildWant, root: Path) -> BuildInfo:
    from pyharness.build import build

    return build(want.variant, want.backend, cuda_arch=want.cuda_arch, root=root)


def build_lock(root: Path, want: BuildWant) -> contextlib.AbstractContextManager[None]:
    """One builder per variant and backend on this node (cells that start together wait for the first)."""
    return file_lock(paths.build_root(root) / f".{want.label()}.lock")


def node_build_lock(root: Path) -> contextlib.AbstractContextManager[None]:
    """One build at a time on this node: builds of different variants share the vendored git repository."""
    return file_lock(paths.build_root(root) / ".pyharness-build.lock")


class NodeBuildError(HarnessError):
    """A build a cell needs could not be made on its node; `log` is what the node can say about it."""

    def __init__(self, problem: str, fix: str = "", log: str = "") -> None:
        super().__init__(problem, fix)
        self.log = log


def _log_tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def ensure_build(
    want: BuildWant,
    *,
    node: str,
    root: Path | None = None,
    no_build: bool = False,
    builder: NodeBuilder | None = None,
) -> BuildInfo:
    """This node's build matching `want`: the cached one, else built here once (unless `no_build`)."""
    root = root or paths.project_root()
    with build_lock(root, want):
        found: BuildInfo | None
        try:
            found = load_build(want.variant, want.backend, root)
        except HarnessError:
            found = None
        if found is not None and want.matches(found):
            return found
        where = build_dir_for(want.variant, want.backend, root)
        if no_build:
            why = f"its build ({want.differences(found)})" if found else "no finished build"
            raise NodeBuildError(
                f"node {node} has no {want.label()} build matching the driver's in {where}: {why}",
                "run without --no-build so the node builds it",
            )
        missing = missing_build_tools(want.backend)
        if missing:
            raise NodeBuildError(
                f"node {node} cannot build {want.label()}: {', '.join(missing)} not found",
                "install the build tools on the node (CMake, Ninja, git, a C++ compiler; nvcc for cuda), or build "
                "there beforehand",
                log=f"node {node}: PATH={os.environ.get('PATH', '')}\nmissing: {', '.join(missing)}\n",
            )
        try:
            with node_build_lock(root):
                info = (builder or default_node_builder)(want, root)
        except HarnessError as exc:
            raise NodeBuildError(
                f"node {node}: building {want.label()} failed: {exc.problem}",
                exc.fix,
                log=_log_tail(where / "build.log"),
            ) from exc
        if not want.matches(info):
            raise NodeBuildError(
                f"node {node}: its checkout {root} builds a different {want.label()} ({want.differences(info)})",
                "give every node the driver's checkout (same vendor/pin.toml and patches/)",
            )
        return info
