"""`pyharness patches apply|export|check`: the patch series as files in patches/ and as commits in git.

patches/series names the patches in order, one per line: `<feature> <file>`; `#` starts a comment. Applying puts
them with `git am --3way` onto the branch `patched` of vendor/llama.cpp (author and committer dates are the patch's
own, so the same series always gives the same commit hashes). Exporting writes the branch's commits back with
`git format-patch` under a fixed configuration, so exporting right after applying changes no byte.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pyharness import paths
from pyharness.errors import HarnessError
from pyharness.proc import GIT_IDENTITY, git, run
from pyharness.vendor import base_commit, is_dirty, load_pin, vendored_state

PATCHED_BRANCH = "patched"
SERIES_FILE = "series"
# format-patch and am must not depend on the user's git configuration.
NEUTRAL_GIT_ENV = {"GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}
FORMAT_PATCH_ARGS = (
    "format-patch",
    "-1",
    "--stdout",
    "--zero-commit",
    "--no-signature",
    "--full-index",
    "--no-renames",
    "--diff-algorithm=myers",
    "--subject-prefix=PATCH",
    "--encoding=UTF-8",
    "--no-numbered",
)


@dataclass(frozen=True)
class SeriesEntry:
    feature: str
    file: str


def read_series(patch_dir: Path) -> list[SeriesEntry]:
    """The series in order; every named file must exist."""
    series = patch_dir / SERIES_FILE
    if not series.is_file():
        return []
    entries: list[SeriesEntry] = []
    for number, raw in enumerate(series.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[1].endswith(".patch"):
            raise HarnessError(
                f"{series}:{number}: expected '<feature> <file>.patch', got {raw!r}", "fix the series file"
            )
        if not (patch_dir / fields[1]).is_file():
            raise HarnessError(f"{series}:{number}: {fields[1]} does not exist", "restore it or drop the line")
        entries.append(SeriesEntry(feature=fields[0], file=fields[1]))
    return entries


def write_series(patch_dir: Path, entries: list[SeriesEntry]) -> None:
    lines = ["# The patch series, in the order it applies: <feature> <file>. Written by `pyharness patches export`."]
    lines += [f"{entry.feature} {entry.file}" for entry in entries]
    (patch_dir / SERIES_FILE).write_text("\n".join(lines) + "\n")


def series_hash(patch_dir: Path | None = None) -> str:
    """sha256 over the series file and every patch in it, in order (12 hex digits); 'none' for no patches."""
    patch_dir = patch_dir or paths.patches_dir()
    entries = read_series(patch_dir)
    if not entries:
        return "none"
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(f"{entry.feature} {entry.file}\n".encode())
        digest.update((patch_dir / entry.file).read_bytes())
    return digest.hexdigest()[:12]


def patch_subject(text: str) -> str:
    """The commit subject from a format-patch file (folded header lines joined)."""
    match = re.search(r"^Subject: (?:\[PATCH[^\]]*\] )?(.*(?:\n .*)*)", text, re.MULTILINE)
    return " ".join(match.group(1).split()) if match else ""


def slug(subject: str) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", subject.lower()).strip("-")
    return (words[:60].rstrip("-") or "patch") + ".patch"


def require_vendored(repo: Path) -> str:
    """The base commit of the vendored repo (vendor/llama.cpp of its project), or an error saying what to run."""
    pin = load_pin(repo.parent.parent)
    state = vendored_state(repo, pin)
    if state != "ok":
        raise HarnessError(
            "vendor/llama.cpp is not ready: " + ("not fetched" if state == "missing" else state),
            "run `pyharness vendor` first",
        )
    return base_commit(repo, pin)


@contextmanager
def scratch_worktree(repo: Path, commit: str) -> Iterator[Path]:
    """A detached worktree at `commit`, removed afterwards whatever happens."""
    tmp = Path(tempfile.mkdtemp(prefix="pyharness-wt-"))
    tree = tmp / "tree"
    git(repo, "worktree", "add", "--quiet", "--detach", str(tree), commit)
    try:
        yield tree
    finally:
        git(tree, "am", "--abort", check=False)
        git(repo, "worktree", "remove", "--force", str(tree), check=False)
        shutil.rmtree(tmp, ignore_errors=True)
        git(repo, "worktree", "prune", check=False)


def failing_hunk(output: str, patch_text: str) -> str:
    """'file:line' and the first lines of the hunk that git am could not place."""
    match = re.search(r"error: patch failed: (\S+):(\d+)", output)
    if not match:
        lines = [ln for ln in output.splitlines() if ln.startswith(("error:", "fatal:"))]
        return lines[0] if lines else output.strip().splitlines()[-1] if output.strip() else "unknown failure"
    path, line = match.group(1), match.group(2)
    section = patch_text.split(f"diff --git a/{path} b/{path}", 1)
    hunk = ""
    if len(section) == 2:
        for candidate in re.finditer(r"^@@ -(\d+)(?:,\d+)? \+\d+(?:,\d+)? @@.*$", section[1], re.MULTILINE):
            if candidate.group(1) == line:
                hunk = candidate.group(0)
                break
    return f"{path}:{line} {hunk}".strip()


def am_series(tree: Path, patch_dir: Path, entries: list[SeriesEntry]) -> str:
    """Apply the series onto the detached HEAD of `tree`, one patch at a time; the resulting commit."""
    for index, entry in enumerate(entries, start=1):
        patch = patch_dir / entry.file
        print(f"  [{index}/{len(entries)}] {entry.file}", file=sys.stderr)
        result = run(
            ["git", "-C", str(tree), "am", "--3way", "--keep-cr", "--committer-date-is-author-date", str(patch)],
            check=False,
            env={**GIT_IDENTITY, **NEUTRAL_GIT_ENV},
        )
        if result.returncode != 0 or not am_succeeded(tree):
            detail = failing_hunk(result.stdout + result.stderr, patch.read_text(errors="replace"))
            raise HarnessError(
                f"patch {entry.file} does not apply: {detail}",
                "rebase the patch onto the pinned upstream (edit it as a commit, then `pyharness patches export`)",
            )
    return git(tree, "rev-parse", "HEAD")


def am_succeeded(tree: Path) -> bool:
    git_dir = Path(git(tree, "rev-parse", "--absolute-git-dir"))
    return not (git_dir / "rebase-apply").exists()


def export_commits(
    repo: Path, base: str, tip: str, out_dir: Path, old: list[SeriesEntry], patch_dir: Path, feature: str | None
) -> list[SeriesEntry]:
    """format-patch each commit of base..tip into out_dir; features kept from `old` by subject."""
    by_subject = {patch_subject((patch_dir / e.file).read_text(errors="replace")): e for e in old}
    commits = git(repo, "rev-list", "--reverse", f"{base}..{tip}").split()
    entries: list[SeriesEntry] = []
    for commit in commits:
        if len(git(repo, "rev-list", "--parents", "-n1", commit).split()) > 2:
            raise HarnessError(f"commit {commit[:12]} is a merge", "rebase the patched branch into a linear series")
        text = git(repo, *FORMAT_PATCH_ARGS, commit, env=NEUTRAL_GIT_ENV) + "\n"
        subject = patch_subject(text)
        known = by_subject.get(subject)
        name = known.file if known else slug(subject)
        chosen = known.feature if known else feature or (entries[-1].feature if entries else None)
        if chosen is None:
            raise HarnessError(f"new commit '{subject}' belongs to no feature", "pass --feature NAME")
        if any(e.file == name for e in entries):
            raise HarnessError(f"two commits export to {name}", "give them different subjects")
        (out_dir / name).write_text(text)
        entries.append(SeriesEntry(feature=chosen, file=name))
    return entries


def differences(patch_dir: Path, entries: list[SeriesEntry], exported: Path) -> list[str]:
    """What differs between the committed series and a fresh export (empty: identical)."""
    problems = []
    current = read_series(patch_dir)
    if [(e.feature, e.file) for e in current] != [(e.feature, e.file) for e in entries]:
        problems.append("the series file lists other patches or another order")
    for entry in entries:
        ours = patch_dir / entry.file
        if not ours.is_file() or ours.read_bytes() != (exported / entry.file).read_bytes():
            problems.append(f"{entry.file} differs from its commit")
    return problems


def applied_marker(repo: Path) -> tuple[str, str]:
    """(series hash, tip) recorded by the last apply, or ('', '')."""
    recorded = git(repo, "config", "--get", "pyharness.applied", check=False).split()
    return (recorded[0], recorded[1]) if len(recorded) == 2 else ("", "")


def branch_tip(repo: Path, branch: str) -> str:
    return git(repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}", check=False)


def patched_in_sync(repo: Path, patch_dir: Path) -> bool:
    """Whether branch `patched` is exactly the series in patches/ as last applied."""
    recorded_hash, recorded_tip = applied_marker(repo)
    return recorded_hash == series_hash(patch_dir) and recorded_tip == branch_tip(repo, PATCHED_BRANCH) != ""


def apply(*, force: bool = False, root: Path | None = None) -> str:
    """Put the series onto branch `patched` (checked out in vendor/llama.cpp); returns its tip."""
    root = root or paths.project_root()
    repo, patch_dir = paths.vendor_dir(root), paths.patches_dir(root)
    base = require_vendored(repo)
    entries = read_series(patch_dir)
    if is_dirty(repo) and not force:
        raise HarnessError(
            "vendor/llama.cpp has uncommitted changes", "commit or stash them, or re-run with --force to discard"
        )
    old_tip = branch_tip(repo, PATCHED_BRANCH)
    unexported: list[str] = []
    # a branch still at the tip the last apply/export recorded holds nothing of its own, even if patches/ changed
    # since (a pull brought a new series): it is replaced; only commits made on it since are protected
    last_tip = applied_marker(repo)[1]
    if old_tip and old_tip != base and old_tip != last_tip and not patched_in_sync(repo, patch_dir):
        unexported = unexported_changes(repo, base, old_tip, patch_dir, entries)
        if unexported and not force:
            raise HarnessError(
                f"branch {PATCHED_BRANCH} holds work not in patches/ ({unexported[0]})",
                "run `pyharness patches export` first, or --force (the branch is kept as a backup)",
            )
    print(f"applying {len(entries)} patch(es) onto {base[:7]}", file=sys.stderr)
    with scratch_worktree(repo, base) as tree:
        tip = am_series(tree, patch_dir, entries)
    if unexported:
        backup = f"{PATCHED_BRANCH}-backup-{time.strftime('%Y%m%d-%H%M%S')}"
        git(repo, "branch", backup, old_tip)
        print(f"kept the old branch as {backup}", file=sys.stderr)
    if git(repo, "symbolic-ref", "--short", "-q", "HEAD", check=False) == PATCHED_BRANCH:
        git(repo, "reset", "--quiet", "--hard", tip)
    else:
        git(repo, "branch", "--force", PATCHED_BRANCH, tip)
        git(repo, "checkout", "--quiet", *(["--force"] if force else []), PATCHED_BRANCH)
    git(repo, "config", "pyharness.applied", f"{series_hash(patch_dir)} {tip}")
    print(f"branch {PATCHED_BRANCH} at {tip[:12]}", file=sys.stderr)
    return tip


def unexported_changes(repo: Path, base: str, tip: str, patch_dir: Path, entries: list[SeriesEntry]) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            exported = export_commits(repo, base, tip, Path(tmp), entries, patch_dir, feature="?")
        except HarnessError as exc:
            return [str(exc)]
        return differences(patch_dir, exported, Path(tmp))


def export(*, feature: str | None = None, root: Path | None = None) -> list[SeriesEntry]:
    """Write branch `patched`'s commits to patches/ and the series file; stale patch files are removed."""
    root = root or paths.project_root()
    repo, patch_dir = paths.vendor_dir(root), paths.patches_dir(root)
    base = require_vendored(repo)
    tip = branch_tip(repo, PATCHED_BRANCH)
    if not tip:
        raise HarnessError(f"vendor/llama.cpp has no branch {PATCHED_BRANCH}", "run `pyharness patches apply` first")
    old = read_series(patch_dir)
    patch_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=patch_dir, prefix=".export-") as tmp:
        entries = export_commits(repo, base, tip, Path(tmp), old, patch_dir, feature)
        for entry in entries:
            (Path(tmp) / entry.file).replace(patch_dir / entry.file)
    for stale in {e.file for e in old} - {e.file for e in entries}:
        (patch_dir / stale).unlink(missing_ok=True)
    write_series(patch_dir, entries)
    git(repo, "config", "pyharness.applied", f"{series_hash(patch_dir)} {tip}")
    print(f"exported {len(entries)} patch(es) to {patch_dir}", file=sys.stderr)
    return entries


def check_round_trip(root: Path | None = None) -> tuple[Path, str, list[str]]:
    """Apply the series in a scratch worktree and export it again; returns (repo, tip, problems)."""
    root = root or paths.project_root()
    repo, patch_dir = paths.vendor_dir(root), paths.patches_dir(root)
    base = require_vendored(repo)
    entries = read_series(patch_dir)
    with scratch_worktree(repo, base) as tree:
        tip = am_series(tree, patch_dir, entries)
        # Keep the checked commits reachable for the build step.
        git(repo, "update-ref", "refs/pyharness/checked", tip)
        with tempfile.TemporaryDirectory() as tmp:
            exported = export_commits(repo, base, tip, Path(tmp), entries, patch_dir, feature=None)
            problems = differences(patch_dir, exported, Path(tmp))
    whitespace = git(repo, "diff", "--check", f"{base}..{tip}", check=False)
    if whitespace:
        problems.append("whitespace errors: " + whitespace.splitlines()[0])
    return repo, tip, problems
