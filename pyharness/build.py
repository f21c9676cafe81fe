"""`pyharness build`: configure and build a variant (upstream or patched) for a backend (cpu or cuda).

Each variant compiles from its own detached worktree of vendor/llama.cpp (vendor/trees/<variant>) into
build/<variant>-<backend>/. Only the targets the harness runs are built. ccache is used when installed, with the
project root as its base directory, so the upstream and patched trees share cached objects for unchanged files.
A build that succeeds writes pyharness-build.json (its provenance); a build without that file is not a build.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pyharness import paths
from pyharness.errors import HarnessError
from pyharness.patches import (
    PATCHED_BRANCH,
    apply,
    branch_tip,
    patched_in_sync,
    require_vendored,
    series_hash,
)
from pyharness.proc import git, run
from pyharness.vendor import load_pin

VARIANTS = ("upstream", "patched")
BACKENDS = ("cpu", "cuda")
BASE_TARGETS = (
    "llama",
    "ggml",
    "llama-bench",
    "llama-perplexity",
    "llama-completion",
    "llama-batched-bench",
    "test-backend-ops",
)
METADATA_FILE = "pyharness-build.json"
COMMON_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_BUILD_TESTS=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",
)
# Targets that CMake defines only when an option is on: the options they need, which replace COMMON_FLAGS' value of
# the same option. llama-server is built without its web UI (no download of prebuilt assets; the API is what the
# harness uses).
TARGET_OPTIONS: dict[str, tuple[str, ...]] = {
    "llama-server": ("-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_USE_PREBUILT_UI=OFF"),
}
# Files of the source tree a target's CMake needs beyond the base build's: a tree unpacked from a `pyharness pack`
# archive leaves tools/ui out (PACK_EXCLUDES), and with LLAMA_BUILD_SERVER on CMake fails without it.
TARGET_SOURCES: dict[str, tuple[str, ...]] = {
    "llama-server": ("tools/server/CMakeLists.txt", "tools/ui/CMakeLists.txt"),
    "llama-needle": ("tools/needle/CMakeLists.txt",),
}


def target_sources(target: str) -> tuple[str, ...]:
    """The files a target needs in the source tree: TARGET_SOURCES', or for a feature's test program (not one of
    upstream's BASE_TARGETS) its tests/<name>.cpp, which a tree checked out at an earlier patch of the series does not
    have yet."""
    if target in TARGET_SOURCES:
        return TARGET_SOURCES[target]
    if target.startswith("test-") and target not in BASE_TARGETS:
        return (f"tests/{target}.cpp",)
    return ()


@dataclass
class BuildInfo:
    """What a build is: where it lives and where it came from."""

    variant: str
    backend: str
    build_dir: str
    source_commit: str
    upstream_commit: str
    series_hash: str
    series_in_sync: bool
    cmake_flags: list[str]
    targets: list[str]
    compiler: str
    cuda_version: str
    ccache: bool
    host: str
    built_at: str
    seconds: float
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def bin_dir(self) -> Path:
        return Path(self.build_dir) / "bin"

    def tool(self, name: str) -> Path:
        path = self.bin_dir / name
        if not path.is_file():
            raise HarnessError(
                f"{name} is not in {self.bin_dir}",
                f"rebuild with `pyharness build --variant {self.variant} --backend {self.backend}`",
            )
        return path


def check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise HarnessError(f"unknown {what} '{value}'", f"choose one of: {', '.join(allowed)}")


def build_dir_for(variant: str, backend: str, root: Path | None = None) -> Path:
    return paths.build_root(root) / f"{variant}-{backend}"


def load_build(variant: str, backend: str, root: Path | None = None) -> BuildInfo:
    """The finished build of a variant, or an error saying how to make it."""
    check_choice(variant, VARIANTS, "variant")
    check_choice(backend, BACKENDS, "backend")
    meta = build_dir_for(variant, backend, root) / METADATA_FILE
    if not meta.is_file():
        raise HarnessError(
            f"no finished {variant}-{backend} build in {meta.parent}",
            f"run `pyharness build --variant {variant} --backend {backend}`",
        )
    return BuildInfo(**json.loads(meta.read_text()))


def feature_targets(root: Path) -> list[str]:
    """Extra targets the patch series' features add (patches/features.toml, `targets = [...]`)."""
    config = paths.patches_dir(root) / "features.toml"
    if not config.is_file():
        return []
    data = tomllib.loads(config.read_text())
    targets: list[str] = []
    for feature in data.get("features", {}).values():
        targets += [t for t in feature.get("targets", []) if t not in targets]
    return targets


def variant_targets(variant: str, root: Path) -> list[str]:
    """The targets a build of the variant makes: the base ones, and for the patched variant its features' too."""
    extra = feature_targets(root) if variant == "patched" else []
    return list(dict.fromkeys([*BASE_TARGETS, *extra]))


def buildable_targets(targets: Sequence[str], tree: Path) -> tuple[list[str], list[str]]:
    """(targets the source tree can build, messages for those it cannot: their sources are missing)."""
    kept, skipped = [], []
    for target in targets:
        missing = [f for f in target_sources(target) if not (tree / f).is_file()]
        if missing:
            skipped.append(
                f"{target} not built: the source tree has no {', '.join(missing)} (a packed tree leaves it out, "
                "or the series' branch stands at a patch before the one that adds it)"
            )
        else:
            kept.append(target)
    return kept, skipped


def variant_commit(variant: str, root: Path) -> tuple[str, bool]:
    """(commit to build, whether it is exactly the series in patches/)."""
    repo = paths.vendor_dir(root)
    base = require_vendored(repo)
    if variant == "upstream":
        return base, True
    if not branch_tip(repo, PATCHED_BRANCH):
        apply(root=root)
    in_sync = patched_in_sync(repo, paths.patches_dir(root))
    if not in_sync:
        print(
            f"warning: branch {PATCHED_BRANCH} differs from patches/ (building the branch; "
            "`pyharness patches export` or `apply` brings them together)",
            file=sys.stderr,
        )
    return branch_tip(repo, PATCHED_BRANCH), in_sync


def checkout_tree(variant: str, commit: str, root: Path, force: bool) -> Path:
    """vendor/trees/<variant> at `commit`; files that do not change keep their timestamps."""
    repo = paths.vendor_dir(root)
    tree = paths.trees_dir(root) / variant
    if not (tree / ".git").exists():
        shutil.rmtree(tree, ignore_errors=True)
        git(repo, "worktree", "prune")
        tree.parent.mkdir(parents=True, exist_ok=True)
        git(repo, "worktree", "add", "--quiet", "--detach", str(tree), commit)
        return tree
    if git(tree, "status", "--porcelain") and not force:
        raise HarnessError(f"{tree} has local edits", "edit vendor/llama.cpp instead, or pass --force to discard")
    if git(tree, "rev-parse", "HEAD") != commit:
        git(tree, "checkout", "--quiet", "--force", "--detach", commit)
    return tree


def link_source(build_dir: Path, tree: Path) -> Path:
    """build_dir/source-tree -> the variant's tree. Configuring through this link makes every build's paths the same
    relative to its build folder, so ccache (base dir: the project) serves one variant's objects to another."""
    link = build_dir / "source-tree"
    target = os.path.relpath(tree, build_dir)
    if link.is_symlink() and os.readlink(link) == target:
        return link
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        raise HarnessError(f"{link} is a folder, not the link pyharness makes", f"remove {link}")
    link.symlink_to(target, target_is_directory=True)
    return link


def set_option(flags: list[str], option: str) -> None:
    """Set a `-DNAME=VALUE` flag in place: replace the flag of the same NAME, or append it."""
    name = option.split("=", 1)[0]
    for i, flag in enumerate(flags):
        if flag.split("=", 1)[0] == name:
            flags[i] = option
            return
    flags.append(option)


def cmake_flags(backend: str, cuda_arch: str, extra: list[str], targets: Sequence[str] = ()) -> list[str]:
    """CMake flags of a build: COMMON_FLAGS, the options its targets need (TARGET_OPTIONS), the compiler launchers,
    the backend's, then `extra`."""
    flags = list(COMMON_FLAGS)
    for target in targets:
        for option in TARGET_OPTIONS.get(target, ()):
            set_option(flags, option)
    if shutil.which("ccache"):
        flags += [f"-DCMAKE_{lang}_COMPILER_LAUNCHER=ccache" for lang in ("C", "CXX")]
    if backend == "cuda":
        flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}"]
        if shutil.which("ccache"):
            flags.append("-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache")
    return flags + extra


def ccache_env(root: Path) -> dict[str, str]:
    return {"CCACHE_BASEDIR": str(root), "CCACHE_NOHASHDIR": "1", "CCACHE_COMPILERCHECK": "content"}


def configure(source: Path, build_dir: Path, flags: list[str], root: Path, log: Path) -> None:
    """Run cmake when the build folder is new or its flags changed."""
    stamp = build_dir / "pyharness-flags.json"
    wanted = json.dumps({"source": str(source), "flags": flags})
    if (build_dir / "CMakeCache.txt").is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return
    build_dir.mkdir(parents=True, exist_ok=True)
    cache = build_dir / "CMakeCache.txt"
    if cache.is_file() and f"CMAKE_HOME_DIRECTORY:INTERNAL={source}\n" not in cache.read_text(errors="replace"):
        # Configured from another source path: CMake refuses to reuse that cache.
        cache.unlink()
        shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)
    print(f"configuring {build_dir.name} ...", file=sys.stderr)
    with log.open("a") as out:
        proc = subprocess.run(
            ["cmake", "-S", str(source), "-B", str(build_dir), "-G", "Ninja", *flags],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **ccache_env(root)},
        )
    if proc.returncode != 0:
        stamp.unlink(missing_ok=True)
        raise HarnessError(f"cmake configure of {build_dir.name} failed", f"see {log}")
    stamp.write_text(wanted)


def ninja(build_dir: Path, targets: list[str], root: Path, log: Path, jobs: int | None) -> None:
    """Build the targets, showing [done/total] progress, the whole output going to `log`."""
    args = ["cmake", "--build", str(build_dir), "--target", *targets]
    if jobs:
        args += ["--parallel", str(jobs)]
    env = {**os.environ, **ccache_env(root), "NINJA_STATUS": "[%f/%t] "}
    progress = re.compile(r"^\[(\d+)/(\d+)\] ")
    with log.open("a") as out:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            match = progress.match(line)
            if match and sys.stderr.isatty():
                print(f"\r  {build_dir.name}: {match.group(1)}/{match.group(2)}", end="", file=sys.stderr)
            elif (
                match and (int(match.group(1)) % 25 == 0 or match.group(1) == match.group(2)) and match.group(1) != "0"
            ):
                print(f"  {build_dir.name}: {match.group(1)}/{match.group(2)}", file=sys.stderr)
        code = proc.wait()
    if sys.stderr.isatty():
        print(file=sys.stderr)
    if code != 0:
        raise HarnessError(f"building {build_dir.name} failed", f"see {log}")


def compiler_of(build_dir: Path) -> str:
    cache = (build_dir / "CMakeCache.txt").read_text(errors="replace")
    match = re.search(r"^CMAKE_CXX_COMPILER:\w+=(.*)$", cache, re.MULTILINE)
    if not match:
        return "unknown"
    return run([match.group(1), "--version"], check=False).stdout.splitlines()[0].strip()


def cuda_version() -> str:
    if not shutil.which("nvcc"):
        return ""
    out = run(["nvcc", "--version"], check=False).stdout
    match = re.search(r"release ([\d.]+)", out)
    return match.group(1) if match else out.strip().splitlines()[-1]


def build(
    variant: str,
    backend: str,
    *,
    cuda_arch: str = "90",
    jobs: int | None = None,
    extra_flags: list[str] | None = None,
    force: bool = False,
    root: Path | None = None,
) -> BuildInfo:
    """Build a variant and return its provenance; a second call with nothing changed takes seconds."""
    check_choice(variant, VARIANTS, "variant")
    check_choice(backend, BACKENDS, "backend")
    root = root or paths.project_root()
    started = time.time()
    commit, in_sync = variant_commit(variant, root)
    tree = checkout_tree(variant, commit, root, force)
    build_dir = build_dir_for(variant, backend, root)
    build_dir.mkdir(parents=True, exist_ok=True)
    meta = build_dir / METADATA_FILE
    meta.unlink(missing_ok=True)
    log = build_dir / "build.log"
    log.write_text(f"# pyharness build {variant}-{backend} at {commit}\n")
    targets, skipped = buildable_targets(variant_targets(variant, root), tree)
    for message in skipped:
        print(f"pyharness build: {message}", file=sys.stderr)
        with log.open("a") as f:
            f.write(f"# {message}\n")
    flags = cmake_flags(backend, cuda_arch, extra_flags or [], targets)
    configure(link_source(build_dir, tree), build_dir, flags, root, log)
    ninja(build_dir, targets, root, log, jobs)
    info = BuildInfo(
        variant=variant,
        backend=backend,
        build_dir=str(build_dir),
        source_commit=commit,
        upstream_commit=load_pin(root).commit,
        series_hash=series_hash(paths.patches_dir(root)) if variant == "patched" else "none",
        series_in_sync=in_sync,
        cmake_flags=flags,
        targets=targets,
        compiler=compiler_of(build_dir),
        cuda_version=cuda_version() if backend == "cuda" else "",
        ccache=shutil.which("ccache") is not None,
        host=platform.node(),
        built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        seconds=round(time.time() - started, 1),
    )
    tmp = meta.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(info), indent=2) + "\n")
    tmp.replace(meta)
    print(f"built {build_dir.name} ({commit[:12]}) in {info.seconds:.0f} s", file=sys.stderr)
    return info


def build_id(info: BuildInfo) -> str:
    """A short stable identity of a build's inputs (commit, flags), for configuration hashes."""
    text = json.dumps([info.source_commit, info.series_hash, info.backend, info.cmake_flags])
    return hashlib.sha256(text.encode()).hexdigest()[:12]
