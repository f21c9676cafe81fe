"""`pyharness vendor`: put the pinned upstream into vendor/llama.cpp as a git repository.

The source is the llama-cpp-python sdist named in vendor/pin.toml, fetched with pip (no URL lives in this
repository) and checked against its recorded sha256. The sdist carries llama.cpp as a submodule with its git
data, so the vendored tree is a real git repository whose HEAD is the pinned upstream commit.
"""

from __future__ import annotations

import re
import shutil
import sys
import tarfile
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pyharness import paths
from pyharness.errors import HarnessError
from pyharness.proc import git, run, sha256_file

UPSTREAM_BRANCH = "upstream"
# Never read by a build of the harness targets (CPU, CUDA): left out of `pyharness pack` archives.
PACK_EXCLUDES = (
    "models",
    "docs",
    "media",
    "examples",
    "app",
    "benches",
    "gguf-py/tests",
    "tools/ui",
    "tools/server/public",
    "ggml/src/ggml-vulkan",
    "ggml/src/ggml-sycl",
    "ggml/src/ggml-metal",
    "ggml/src/ggml-opencl",
    "ggml/src/ggml-cann",
    "ggml/src/ggml-hexagon",
    "ggml/src/ggml-webgpu",
    "ggml/src/ggml-openvino",
    "ggml/src/ggml-et",
    "ggml/src/ggml-virtgpu",
    "ggml/src/ggml-zdnn",
    "ggml/src/ggml-musa",
    "ggml/src/ggml-zendnn",
)
CLEAN_GIT_CONFIG = """[core]
\trepositoryformatversion = 0
\tfilemode = true
\tbare = false
\tlogallrefupdates = true
[gc]
\tauto = 0
"""


@dataclass(frozen=True)
class Pin:
    commit: str
    package: str
    version: str
    file: str
    sha256: str
    tree: str
    git_dir: str

    @property
    def short(self) -> str:
        return self.commit[:7]


def load_pin(root: Path | None = None) -> Pin:
    path = (root or paths.project_root()) / paths.PIN_FILE
    try:
        data = tomllib.loads(path.read_text())
        return Pin(commit=data["upstream"]["commit"], **data["sdist"])
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise HarnessError(f"{path} is unreadable or incomplete: {exc}", "restore it from git") from exc


def is_dirty(repo: Path) -> bool:
    return bool(git(repo, "status", "--porcelain", "--untracked-files=normal"))


def has_commit(repo: Path, commit: str) -> bool:
    return bool(git(repo, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}", check=False))


def synthetic_marker(repo: Path) -> Path:
    """Present when the sdist carried no git data and the pinned tree was committed here (see unpack_sdist)."""
    return repo / ".git" / "pyharness-synthetic-commit"


def base_commit(repo: Path, pin: Pin) -> str:
    """The commit in `repo` that holds the pinned upstream tree."""
    if synthetic_marker(repo).exists():
        return git(repo, "rev-list", "--max-parents=0", UPSTREAM_BRANCH)
    return pin.commit


def vendored_state(repo: Path, pin: Pin) -> str:
    """'missing', 'ok' (pinned commit present, upstream branch on it) or a reason it is not usable."""
    if not repo.exists():
        return "missing"
    if not (repo / ".git").exists():
        return f"{repo} exists but is not a git repository"
    branch = git(repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{UPSTREAM_BRANCH}", check=False)
    if not branch:
        return f"{repo} has no branch {UPSTREAM_BRANCH}"
    if not has_commit(repo, base_commit(repo, pin)):
        return f"{repo} does not contain the pinned commit {pin.short}"
    if branch != base_commit(repo, pin):
        return f"branch {UPSTREAM_BRANCH} of {repo} is not at the pinned commit {pin.short}"
    return "ok"


def fetch_sdist(pin: Pin) -> Path:
    """The pinned sdist from the cache, else downloaded with pip; its sha256 is always checked."""
    cache = paths.cache_dir() / "sdist"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / pin.file
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            print(f"fetching {pin.package}=={pin.version} (sdist) with pip ...", file=sys.stderr)
            run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    "--dest",
                    tmp,
                    f"{pin.package}=={pin.version}",
                ],
                what=f"pip download {pin.package}=={pin.version}",
            )
            got = Path(tmp) / pin.file
            if not got.exists():
                raise HarnessError(f"pip did not produce {pin.file}", "check the pin's file name")
            got.replace(target)
    return check_sdist(target, pin)


def check_sdist(path: Path, pin: Pin) -> Path:
    digest = sha256_file(path)
    if digest != pin.sha256:
        path.unlink(missing_ok=True)
        raise HarnessError(
            f"sha256 of {path.name} is {digest}, the pin says {pin.sha256}; the file was removed",
            "re-run to download it again, or fix vendor/pin.toml if the pin itself is wrong",
        )
    return path


def unpack_sdist(sdist: Path, pin: Pin, dest: Path) -> None:
    """Extract the submodule's tree and git data from the sdist into `dest` (a fresh folder)."""
    with tarfile.open(sdist) as tar:
        top = tar.getmembers()[0].name.split("/")[0]
        prefixes = (f"{top}/{pin.tree}/", f"{top}/{pin.git_dir}/")
        members = [m for m in tar.getmembers() if m.name.startswith(prefixes)]
        tar.extractall(dest, members=members, filter="data")
    tree = dest / top / pin.tree
    git_data = dest / top / pin.git_dir
    if not tree.is_dir():
        raise HarnessError(f"{sdist.name} holds no {pin.tree}", "check the pin's tree path")
    (tree / ".git").unlink(missing_ok=True)
    if git_data.is_dir():
        git_data.rename(tree / ".git")
        # The submodule's config points its worktree elsewhere and includes CI credential files: replace it.
        (tree / ".git" / "config").write_text(CLEAN_GIT_CONFIG)
        git(tree, "reset", "--quiet")
    else:
        # No git data in the sdist: make the pinned tree a commit of our own and say so.
        commit_as_synthetic(tree, pin)
    tree.rename(dest / "llama.cpp")


def commit_as_synthetic(tree: Path, pin: Pin) -> None:
    """Make `tree` a git repository with one commit (fixed dates, so always the same hash) standing for the pin."""
    fixed = {"GIT_AUTHOR_DATE": "2000-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2000-01-01T00:00:00Z"}
    git(tree, "init", "--quiet")
    git(tree, "add", "--all", "--force")
    git(tree, "commit", "--quiet", "-m", f"llama.cpp {pin.commit} (tree only)", env=fixed)
    synthetic_marker(tree).write_text(pin.commit + "\n")


def series_touched_paths(root: Path) -> set[str]:
    """Every path a patch of the series (patches/series) changes, as `diff --git a/X b/Y` names them."""
    from pyharness.patches import read_series  # patches imports this module

    patch_dir = paths.patches_dir(root)
    touched: set[str] = set()
    for entry in read_series(patch_dir):
        for diff in re.finditer(r"^diff --git a/(\S+) b/(\S+)$", (patch_dir / entry.file).read_text(), re.M):
            touched.update(diff.groups())
    return touched


def pack_exclusions(repo: Path, touched: set[str]) -> list[str]:
    """git pathspecs leaving PACK_EXCLUDES out of the archive, except the files the series changes there (a patch
    to docs/build.md must still apply on the machine that unpacks the archive)."""
    specs = []
    for prefix in PACK_EXCLUDES:
        if not any(t == prefix or t.startswith(prefix + "/") for t in touched):
            specs.append(f":(exclude){prefix}")
            continue
        files = git(repo, "ls-tree", "-r", "--name-only", UPSTREAM_BRANCH, "--", prefix).splitlines()
        specs += [f":(exclude,literal){f}" for f in files if f not in touched]
    return specs


def pack_upstream(out: Path, root: Path | None = None) -> Path:
    """A tar.gz of the pinned tree without what builds never read (models, docs, other backends), for machines
    with no registry access; `pyharness vendor --from-archive` turns it back into a vendored repository."""
    root = root or paths.project_root()
    repo = paths.vendor_dir(root)
    pin = load_pin(root)
    if vendored_state(repo, pin) != "ok":
        raise HarnessError("vendor/llama.cpp is not at the pin", "run `pyharness vendor` first")
    excluded = pack_exclusions(repo, series_touched_paths(root))
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    run(
        ["git", "-C", str(repo), "archive", "--format=tar.gz", "-o", str(tmp), UPSTREAM_BRANCH, "--", ".", *excluded],
        what="git archive",
    )
    tmp.replace(out)
    return out


def unpack_archive(archive: Path, pin: Pin, dest: Path) -> None:
    """A `pack_upstream` archive into dest/llama.cpp; git archive records the commit in the tar's pax header."""
    try:
        with tarfile.open(archive) as tar:
            recorded = tar.pax_headers.get("comment", "")
            if recorded != pin.commit:
                raise HarnessError(
                    f"{archive} holds commit {recorded[:7] or 'unknown'}, not the pinned {pin.short}",
                    "make it with `pyharness pack` from a vendored tree at the pin",
                )
            tar.extractall(dest / "llama.cpp", filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise HarnessError(
            f"{archive} is not a readable archive ({exc.__class__.__name__}: {str(exc).splitlines()[0]})",
            "make it again with `pyharness pack`, or copy it again if it was truncated on the way",
        ) from exc
    commit_as_synthetic(dest / "llama.cpp", pin)


def prepare_from_clone(source: Path, pin: Pin, dest: Path) -> None:
    if not (source / ".git").exists():
        raise HarnessError(f"{source} is not a git clone", "pass the root of a llama.cpp clone")
    if not has_commit(source, pin.commit):
        raise HarnessError(f"{source} lacks the pinned commit {pin.short}", "fetch it there, or use the sdist")
    head = git(source, "rev-parse", "HEAD")
    if head != pin.commit:
        raise HarnessError(f"{source} is at {head[:7]}, not the pinned {pin.short}", f"git checkout {pin.short}")
    run(["git", "clone", "--quiet", "--no-checkout", str(source), str(dest / "llama.cpp")], what="git clone")
    git(dest / "llama.cpp", "checkout", "--quiet", "--detach", pin.commit)


def vendor(
    *, from_path: Path | None = None, archive: Path | None = None, force: bool = False, root: Path | None = None
) -> Path:
    """Make vendor/llama.cpp the pinned upstream; a no-op when it already is."""
    root = root or paths.project_root()
    pin = load_pin(root)
    if from_path and not (from_path / ".git").exists():
        raise HarnessError(f"{from_path} is not a git clone", "pass the root of a llama.cpp clone")
    if archive and not archive.is_file():
        raise HarnessError(f"{archive} does not exist", "make it with `pyharness pack`")
    repo = paths.vendor_dir(root)
    state = vendored_state(repo, pin)
    if state == "ok" and not force:
        print(f"vendor/llama.cpp is at the pinned upstream {pin.short}; nothing to do", file=sys.stderr)
        return repo
    if state not in ("missing", "ok") and not force:
        raise HarnessError(state, "re-run with --force to replace it (this discards its changes)")
    if state == "ok" and is_dirty(repo):
        print("--force: discarding uncommitted changes in vendor/llama.cpp", file=sys.stderr)
    source = from_path.resolve() if from_path else None
    sdist = None if source or archive else fetch_sdist(pin)
    repo.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=repo.parent, prefix=".vendor-") as tmp:
        staging = Path(tmp)
        if source:
            prepare_from_clone(source, pin, staging)
        elif archive:
            unpack_archive(archive, pin, staging)
        else:
            assert sdist is not None
            print(f"unpacking {sdist.name} ...", file=sys.stderr)
            unpack_sdist(sdist, pin, staging)
        fresh = staging / "llama.cpp"
        synthetic = synthetic_marker(fresh).exists()
        commit = git(fresh, "rev-parse", "HEAD") if synthetic else pin.commit
        if not synthetic and git(fresh, "rev-parse", "HEAD") != pin.commit:
            raise HarnessError(f"the unpacked tree is not at {pin.short}", "check vendor/pin.toml")
        git(fresh, "branch", "--force", UPSTREAM_BRANCH, commit)
        git(fresh, "checkout", "--quiet", UPSTREAM_BRANCH)
        if repo.exists():
            graveyard = staging / f"old-{int(time.time())}"
            repo.rename(graveyard)
        fresh.rename(repo)
    shutil.rmtree(paths.trees_dir(root), ignore_errors=True)
    print(f"vendor/llama.cpp: llama.cpp {pin.short} on branch {UPSTREAM_BRANCH}", file=sys.stderr)
    return repo
