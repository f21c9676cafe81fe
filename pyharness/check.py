"""`pyharness patches check` and `pyharness cuda-check`: prove the series round-trips and builds patch by patch.

The round trip applies patches/ in a scratch worktree and exports it again: not a byte may differ. The build check
compiles the harness targets at every commit of the series in order (bisectability). The CUDA check compiles, without
linking the backend, the CUDA sources the series touches, so a CUDA compile error shows up on a machine with no GPU.
"""

from __future__ import annotations

import re
import subprocess
import sys
from contextlib import AbstractContextManager
from pathlib import Path

from pyharness import paths
from pyharness.build import (
    BASE_TARGETS,
    checkout_tree,
    cmake_flags,
    configure,
    feature_targets,
    link_source,
    ninja,
)
from pyharness.errors import HarnessError
from pyharness.file_lock import file_lock
from pyharness.patches import PATCHED_BRANCH, branch_tip, check_round_trip, read_series, require_vendored
from pyharness.proc import git

CUDA_DIR = "ggml/src/ggml-cuda"
# The build at a patch (`patches check` at every commit of the series, `pr` at every stage) is there to prove that
# the harness targets compile and link, so it is compiled without optimization or debug info: the harness targets
# of the tip take 161 s instead of 263 s to build from nothing on 2 cores, test-backend-ops.cpp about 8 s instead of
# 35 s. The build type stays Release, so NDEBUG is defined as in the variant builds and the preprocessor keeps the
# code they compile (Debug would also define _GLIBCXX_ASSERTIONS in ggml). The CUDA check keeps the real flags.
CHECK_FLAGS = ("-DCMAKE_C_FLAGS_RELEASE=-O0 -g0 -DNDEBUG", "-DCMAKE_CXX_FLAGS_RELEASE=-O0 -g0 -DNDEBUG")


def available_targets(build_dir: Path, log: Path) -> set[str]:
    """The targets of the build folder's build system, regenerated first: a folder configured at another commit
    keeps its flags (so `configure` skips CMake) but may list targets this commit does not have."""
    with log.open("a") as out:
        regen = subprocess.run(["ninja", "-C", str(build_dir), "build.ninja"], stdout=out, stderr=subprocess.STDOUT)
    if regen.returncode != 0:
        raise HarnessError(f"regenerating the build system of {build_dir.name} failed", f"see {log}")
    out = subprocess.run(["ninja", "-C", str(build_dir), "-t", "targets", "all"], capture_output=True, text=True)
    return {line.split(":", 1)[0] for line in out.stdout.splitlines()}


def feature_ends(features: list[str]) -> list[int]:
    """The 1-based positions of the last patch of each run of one feature in a series of patches in order (the tip
    among them): where `pyharness pr` cuts a feature's stack, and the commits a build at feature ends checks."""
    return [i + 1 for i, feature in enumerate(features) if i + 1 == len(features) or features[i + 1] != feature]


def check_tree_lock(root: Path) -> AbstractContextManager[None]:
    """The check tree (vendor/trees/check) and build/check-* serve one command at a time: `patches check`, `pr` and
    `cuda-check` hold this lock for their whole run (a second one waits, saying so), since one command's checkout
    under another's build makes that build fail or test the wrong patch."""
    return file_lock(
        paths.build_root(root) / ".check-tree.lock",
        waiting="waiting for another `pyharness patches check` or `pyharness pr` (they share the check tree and "
        "build/check-*)",
    )


def check_series(
    *, build: bool = True, cuda: bool = False, root: Path | None = None, feature_ends_only: bool = False
) -> int:
    """0 when the series round-trips (and builds at every patch, or with `feature_ends_only` at the last patch of each
    run of one feature); 1 with the problems listed otherwise."""
    root = root or paths.project_root()
    with check_tree_lock(root):
        return _check_series(build=build, cuda=cuda, root=root, feature_ends_only=feature_ends_only)


def _check_series(*, build: bool, cuda: bool, root: Path, feature_ends_only: bool) -> int:
    repo, tip, problems = check_round_trip(root)
    for problem in problems:
        print(f"patches check: {problem}", file=sys.stderr)
    if problems:
        print(
            "patches check: FAILED (fix the patch files, or `pyharness patches export` from the branch)",
            file=sys.stderr,
        )
        return 1
    base = require_vendored(repo)
    commits = git(repo, "rev-list", "--reverse", f"{base}..{tip}").split()
    print(f"patches check: {len(commits)} patch(es) apply and export byte for byte", file=sys.stderr)
    if build:
        wanted = set(range(1, len(commits) + 1))
        if feature_ends_only:
            entries = read_series(paths.patches_dir(root))
            if len(entries) != len(commits):
                raise HarnessError(
                    f"patches/series names {len(entries)} patches, the branch has {len(commits)} commits",
                    "run `pyharness patches apply`",
                )
            wanted = set(feature_ends([entry.feature for entry in entries]))
            print(f"patches check: building at the {len(wanted)} feature ends only", file=sys.stderr)
        for index, commit in enumerate(commits, start=1):
            if index not in wanted:
                continue
            subject = git(repo, "log", "-1", "--format=%s", commit)
            print(f"patches check: building [{index}/{len(commits)}] {subject}", file=sys.stderr)
            build_at(commit, "cpu", root)
    if cuda and commits:
        compile_cuda_touched(root=root, commit=tip)
    print("patches check: OK", file=sys.stderr)
    return 0


def check_flags(backend: str, cuda_arch: str) -> list[str]:
    """CMake flags of the build at a patch: the variant builds' flags, unoptimized and without debug info."""
    return cmake_flags(backend, cuda_arch, list(CHECK_FLAGS))


def build_at(commit: str, backend: str, root: Path, cuda_arch: str = "90") -> Path:
    """Build the harness targets (those that exist at `commit`) in build/check-<backend>, with `check_flags`. A
    folder configured with other flags (an older pyharness built it at -O3) is configured again, since `configure`
    compares the flags, and ninja recompiles what they change."""
    with check_tree_lock(root):
        return _build_at(commit, backend, root, cuda_arch)


def _build_at(commit: str, backend: str, root: Path, cuda_arch: str) -> Path:
    tree = checkout_tree("check", commit, root, force=True)
    build_dir = paths.build_root(root) / f"check-{backend}"
    log = build_dir / "build.log"
    build_dir.mkdir(parents=True, exist_ok=True)
    log.write_text(f"# pyharness patches check at {commit}\n")
    configure(link_source(build_dir, tree), build_dir, check_flags(backend, cuda_arch), root, log)
    present = available_targets(build_dir, log)
    targets = [t for t in dict.fromkeys([*BASE_TARGETS, *feature_targets(root)]) if t in present]
    ninja(build_dir, targets, root, log, jobs=None)
    return build_dir


def cuda_sources_touched(repo: Path, base: str, tip: str, tree: Path) -> list[str]:
    """The .cu files to compile: those the series changes, those including a changed .cuh, and ggml-cuda.cu."""
    changed = git(repo, "diff", "--name-only", f"{base}..{tip}", "--", CUDA_DIR).split()
    sources = {f for f in changed if f.endswith(".cu") and (tree / f).is_file()}
    headers = [Path(f).name for f in changed if f.endswith(".cuh")]
    if headers:
        sources.add(f"{CUDA_DIR}/ggml-cuda.cu")
        include = re.compile(r'#include\s+"(' + "|".join(map(re.escape, headers)) + r')"')
        for cu in (tree / CUDA_DIR).glob("*.cu"):
            if include.search(cu.read_text(errors="replace")):
                sources.add(str(cu.relative_to(tree)))
    if changed and not headers and f"{CUDA_DIR}/ggml-cuda.cu" not in sources:
        sources.add(f"{CUDA_DIR}/ggml-cuda.cu")
    return sorted(sources)


FATTN_VEC_INSTANCE = re.compile(r"fattn-vec-instance-([a-z0-9_]+-[a-z0-9_]+)\.cu$")
FATTN_QUANTS_DEFAULT = "q4_0-q4_0;q8_0-q8_0;f16-f16;bf16-bf16"


def fattn_quants_flag(sources: list[str]) -> list[str]:
    """-DGGML_CUDA_FA_QUANTS with every FlashAttention vector instance the series touches (the default set is
    compiled anyway), so that those instances are targets of the check build; set explicitly because CMake keeps
    a cached value from an earlier configure"""
    combos = sorted({m.group(1) for s in sources if (m := FATTN_VEC_INSTANCE.search(s))})
    return [f"-DGGML_CUDA_FA_QUANTS={';'.join([FATTN_QUANTS_DEFAULT, *combos])}"]


def compile_cuda_touched(
    *, cuda_arch: str = "90", jobs: int | None = None, root: Path | None = None, commit: str | None = None
) -> list[str]:
    """Compile the CUDA objects the series touches at `commit` (default: branch patched); returns them."""
    root = root or paths.project_root()
    with check_tree_lock(root):
        return _compile_cuda_touched(cuda_arch=cuda_arch, jobs=jobs, root=root, commit=commit)


def _compile_cuda_touched(*, cuda_arch: str, jobs: int | None, root: Path, commit: str | None) -> list[str]:
    repo = paths.vendor_dir(root)
    base = require_vendored(repo)
    tip = commit or branch_tip(repo, PATCHED_BRANCH)
    if not tip:
        raise HarnessError(f"vendor/llama.cpp has no branch {PATCHED_BRANCH}", "run `pyharness patches apply` first")
    tree = checkout_tree("check", tip, root, force=True)
    sources = cuda_sources_touched(repo, base, tip, tree)
    if not sources:
        print("cuda-check: the series touches no CUDA source", file=sys.stderr)
        return []
    build_dir = paths.build_root(root) / "check-cuda"
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "build.log"
    log.write_text(f"# pyharness cuda-check at {tip}\n")
    flags = cmake_flags("cuda", cuda_arch, fattn_quants_flag(sources))
    configure(link_source(build_dir, tree), build_dir, flags, root, log)
    present = available_targets(build_dir, log)
    objects = []
    for source in sources:
        relative = Path(source).relative_to(CUDA_DIR)
        wanted = f"{CUDA_DIR}/CMakeFiles/ggml-cuda.dir/{relative}.o"
        if wanted not in present:
            raise HarnessError(f"no object target for {source} in {build_dir}", f"see {log}")
        objects.append(wanted)
    print(
        f"cuda-check: compiling {len(objects)} CUDA source(s) for sm_{cuda_arch}: "
        + ", ".join(Path(s).name for s in sources),
        file=sys.stderr,
    )
    ninja(build_dir, objects, root, log, jobs)
    print("cuda-check: OK", file=sys.stderr)
    return sources
