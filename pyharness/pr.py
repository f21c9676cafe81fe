"""`pyharness pr FEATURE`: a feature's patches as a stack of upstream-ready pull requests.

Each patch of the feature (patches/series order) is one stage of the stack, as upstream prefers: the op with its CPU
implementation and tests first, then the CUDA kernel, then the llama.cpp integration. The stack is applied onto the
pinned upstream *without* the other features' patches (so it stands alone), kept as branches
`pr/<feature>/<NN>-<name>` in vendor/llama.cpp, exported with `git format-patch` under build/pr/<feature>/, checked
stage by stage (builds, test-backend-ops for the feature's ops, its own test programs, whitespace, clang-format on the
changed lines), and described in Markdown with the evidence from the results store.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyharness import paths
from pyharness.errors import HarnessError
from pyharness.patches import NEUTRAL_GIT_ENV, am_series, read_series, require_vendored, scratch_worktree
from pyharness.proc import GIT_IDENTITY, git, run


@dataclass
class Feature:
    name: str
    title: str
    motivation: str
    design: str
    ops: list[str] = field(default_factory=list)
    tests: list[str] = field(default_factory=list)
    matrices: list[str] = field(default_factory=list)
    depends: list[str] = field(default_factory=list)  # features whose stacks must be merged first (transitively)


@dataclass
class Stage:
    index: int
    patch: str
    subject: str
    branch: str
    commit: str
    checks: dict[str, str] = field(default_factory=dict)  # check name -> "ok" or what failed
    notes: dict[str, str] = field(default_factory=dict)  # advice that does not fail the stage

    @property
    def ok(self) -> bool:
        return all(result == "ok" for result in self.checks.values())


def load_feature(name: str, root: Path) -> Feature:
    config = paths.patches_dir(root) / "features.toml"
    features: dict[str, Any] = tomllib.loads(config.read_text()).get("features", {}) if config.is_file() else {}
    if name not in features:
        known = ", ".join(sorted(features)) or "none yet"
        raise HarnessError(f"unknown feature '{name}' (patches/features.toml)", f"known features: {known}")
    data = features[name]

    # the stacks to merge first: the features it depends on and, before them, theirs
    depends: list[str] = []

    def visit(dep: str, path: tuple[str, ...]) -> None:
        if dep in path:
            raise HarnessError(
                f"features depend on each other in a cycle: {' -> '.join((*path, dep))}",
                "fix `depends` in patches/features.toml",
            )
        for sub in features.get(dep, {}).get("depends", []):
            visit(sub, (*path, dep))
        if dep not in depends:
            depends.append(dep)

    for dep in data.get("depends", []):
        visit(dep, (name,))
    return Feature(
        name=name,
        title=data.get("title", name),
        motivation=data.get("motivation", "").strip(),
        design=data.get("design", "").strip(),
        ops=list(data.get("ops", [])),
        tests=list(data.get("tests", [])),
        matrices=list(data.get("matrices", [])),
        depends=depends,
    )


def stage_name(index: int, patch: str) -> str:
    return f"{index:02d}-{patch.removesuffix('.patch')}"


def build_stack(feature: Feature, root: Path) -> tuple[str, list[Stage]]:
    """Apply the feature's patches onto the pinned upstream, one branch per stage: alone, or on top of the stacks of
    the features it depends on (applied first, in series order; the base the stack is reviewed against)."""
    repo, patch_dir = paths.vendor_dir(root), paths.patches_dir(root)
    base = require_vendored(repo)
    series = read_series(patch_dir)
    entries = [e for e in series if e.feature == feature.name]
    if not entries:
        raise HarnessError(f"patches/series has no patch of feature '{feature.name}'", "add its patches first")
    known = {e.feature for e in series}
    for name in feature.depends:
        if name not in known or name == feature.name:
            raise HarnessError(
                f"feature '{feature.name}' depends on '{name}', which has no patches in patches/series",
                "fix `depends` in patches/features.toml",
            )
    prerequisites = [e for e in series if e.feature in feature.depends]
    stages: list[Stage] = []
    with scratch_worktree(repo, base) as tree:
        if prerequisites:
            print(f"pr {feature.name}: on top of {', '.join(feature.depends)}", file=sys.stderr)
            base = am_series(tree, patch_dir, prerequisites)
            git(repo, "branch", "--force", f"pr/{feature.name}/00-base", base)
        for index, entry in enumerate(entries, start=1):
            commit = am_series(tree, patch_dir, [entry])
            branch = f"pr/{feature.name}/{stage_name(index, entry.file)}"
            git(repo, "branch", "--force", branch, commit)
            subject = git(repo, "log", "-1", "--format=%s", commit)
            stages.append(Stage(index=index, patch=entry.file, subject=subject, branch=branch, commit=commit))
    return base, stages


def export_stage(repo: Path, parent: str, stage: Stage, out: Path) -> Path:
    folder = out / stage_name(stage.index, stage.patch)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    git(
        repo,
        "format-patch",
        "--quiet",
        "--no-signature",
        "-o",
        str(folder),
        f"{parent}..{stage.commit}",
        env=NEUTRAL_GIT_ENV,
    )
    return folder


def clang_format_binary() -> str | None:
    """A clang-format that reads upstream's .clang-format (15 or newer): the `clang-format` wheel, else PATH."""
    try:
        import clang_format  # the PyPI wheel of LLVM's binary (test extras)

        candidate = Path(clang_format.__file__).parent / "data" / "bin" / "clang-format"
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("clang-format")
    if not found:
        return None
    version = run([found, "--version"], check=False).stdout
    major = re.search(r"version (\d+)", version)
    return found if major and int(major.group(1)) >= 15 else None


def whitespace_check(repo: Path, parent: str, commit: str) -> str:
    """'ok', or the first whitespace error the stage adds (upstream rejects these)."""
    problems = git(repo, "diff", "--check", f"{parent}..{commit}", check=False)
    return "ok" if not problems else "whitespace: " + problems.splitlines()[0]


def clang_format_advice(repo: Path, parent: str, commit: str) -> str:
    """How many changed lines clang-format (upstream's .clang-format) would reformat: advice for the reviewer, as
    CONTRIBUTING.md asks for clang-format 'when in doubt' and upstream's own files do not all follow it."""
    binary = clang_format_binary()
    if not binary or not shutil.which("git-clang-format"):
        return "not run: needs clang-format 15+ (pip install clang-format) and git-clang-format"
    proc = run(
        [
            "git",
            "-C",
            str(repo),
            "clang-format",
            "--binary",
            binary,
            "--style=file",
            "--diff",
            "--extensions",
            "c,h,cpp,hpp,cu,cuh",
            parent,
            commit,
        ],
        check=False,
        env={**GIT_IDENTITY, **NEUTRAL_GIT_ENV},
    )
    changed = [ln for ln in proc.stdout.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    if proc.returncode not in (0, 1) or "error:" in proc.stderr:
        return "not run: " + (proc.stderr.strip().splitlines() or ["clang-format failed"])[0]
    return f"{len(changed)} changed line(s) differ from clang-format's layout" if changed else "clean"


def stage_has_test(repo: Path, commit: str, test: str) -> bool:
    """Whether the tree at commit has the test program's source (tests/<test>.cpp)."""
    return bool(git(repo, "ls-tree", "--name-only", commit, f"tests/{test}.cpp"))


def check_stage(repo: Path, parent: str, stage: Stage, feature: Feature, root: Path) -> None:
    """Build the stage on its own (unoptimized, as `patches check` builds every patch, whose cached objects it
    reuses) and run the feature's tests; results go into stage.checks."""
    from pyharness.check import build_at

    stage.checks["whitespace"] = whitespace_check(repo, parent, stage.commit)
    stage.notes["clang-format"] = clang_format_advice(repo, parent, stage.commit)
    try:
        build_dir = build_at(stage.commit, "cpu", root)
    except HarnessError as exc:
        stage.checks["build"] = str(exc)
        return
    stage.checks["build"] = "ok"
    bin_dir = build_dir / "bin"
    for op in feature.ops:
        proc = subprocess.run([str(bin_dir / "test-backend-ops"), "test", "-o", op], capture_output=True, text=True)
        stage.checks[f"test-backend-ops -o {op}"] = (
            "ok" if proc.returncode == 0 else (proc.stdout + proc.stderr).strip().splitlines()[-1]
        )
    for test in feature.tests:
        if not stage_has_test(repo, stage.commit, test):
            continue  # a later stage adds it (a binary in the shared build folder may be another stage's)
        program = bin_dir / test
        if not program.is_file():
            stage.checks[test] = f"{program} was not built"
            continue
        proc = subprocess.run([str(program)], capture_output=True, text=True)
        stage.checks[test] = "ok" if proc.returncode == 0 else (proc.stdout + proc.stderr).strip().splitlines()[-1]


def _stores(db: Path | Sequence[Path] | None) -> list[Path | None]:
    paths_ = [db] if db is None or isinstance(db, Path) else list(db)
    for path in paths_:
        if path is not None and not path.is_file():
            raise HarnessError(f"no results store at {path}", "pass the results.sqlite of a matrix run (--db)")
    return paths_ or [None]


def evidence(feature: Feature, db: Path | Sequence[Path] | None) -> str:
    """The feature's tables from the results stores (every number from there), or a line saying none exist.

    Several stores (a CPU run here, GPU runs brought back from the device) are searched in order: each matrix's
    tables come from the first store that holds runs of it."""
    from pyharness.report import build_report
    from pyharness.store import Store

    sections = []
    with tempfile.TemporaryDirectory(prefix="pyharness-pr-") as scratch, ExitStack() as stack:
        opened = []
        for index, path in enumerate(_stores(db)):
            # a copy: opening a store brings its schema up to date, which would rewrite committed results
            copy = None
            if path is not None:
                copy = Path(scratch) / f"{index}.sqlite"
                shutil.copyfile(path, copy)
            opened.append(stack.enter_context(Store(copy)))
        for matrix in feature.matrices:
            for store in opened:
                try:
                    report = build_report(store, matrix=matrix, title=f"Matrix `{matrix}`")
                except HarnessError:
                    continue
                markdown = report.markdown.replace("\n# ", "\n### ").replace("\n## ", "\n#### ", -1).lstrip("# ")
                sections.append(markdown)
                break
            else:
                sections.append(f"No runs of matrix `{matrix}` in the store yet.")
    return "\n\n".join(sections) if sections else "No evaluation matrix is configured for this feature yet."


def description(feature: Feature, base: str, stages: list[Stage], repo: Path, db: Path | Sequence[Path] | None) -> str:
    lines = [f"# {feature.title}", "", "## Motivation", "", feature.motivation or "(see patches/features.toml)", ""]
    lines += ["## Design", "", feature.design or "(see the commit messages)", ""]
    if feature.depends:
        after = ", ".join(f"`{name}`" for name in feature.depends)
        branch = f"pr/{feature.name}/00-base"
        based = f"Based on upstream with the stacks of {after} applied (branch `{branch}`, `{base[:12]}`)"
    else:
        based = f"Based on upstream `{base[:12]}`"
    lines += ["## The stack", "", f"{based}; review and merge in this order:", ""]
    for stage in stages:
        stat = git(repo, "diff", "--shortstat", f"{stage.commit}~1..{stage.commit}")
        lines.append(f"{stage.index}. `{stage.subject}` (branch `{stage.branch}`;{stat})")
    lines += ["", "## How it was tested", ""]
    lines.append(
        "Each stage was built on its own (CPU, unoptimized, `pyharness pr` on the pinned upstream) and checked:"
    )
    lines.append("")
    lines.append("| stage | check | result |")
    lines.append("|---|---|---|")
    for stage in stages:
        for check, result in stage.checks.items():
            lines.append(f"| {stage.index} | `{check}` | {result.replace('|', '/')} |")
        for check, note in stage.notes.items():
            lines.append(f"| {stage.index} | `{check}` (advice) | {note.replace('|', '/')} |")
    lines += ["", "## Results", "", evidence(feature, db), ""]
    lines += [
        "## Use of AI tools",
        "",
        "This change was written with the help of an AI coding assistant (code, tests and this description), "
        "working inside the pyharness project. All numbers above were produced by the harness's own runs and read "
        "from its results store; none were typed by hand.",
        "",
        "<!-- Before opening the PR: llama.cpp's CONTRIBUTING.md requires the human submitting it to have reviewed "
        "every line, to be able to explain it, and to take responsibility for it. Replace this comment with a "
        "sentence saying that you did, or do not submit. -->",
        "",
    ]
    return "\n".join(lines)


def rebase_onto(feature: Feature, clone: Path, root: Path) -> list[str]:
    """Replay the feature's patches (after those of the features it depends on) onto another upstream clone's HEAD;
    returns conflicts (empty: clean)."""
    if not (clone / ".git").exists():
        raise HarnessError(f"{clone} is not a git clone", "pass the root of a newer llama.cpp clone")
    patch_dir = paths.patches_dir(root)
    conflicts = []
    with scratch_worktree(clone, git(clone, "rev-parse", "HEAD")) as tree:
        series = read_series(patch_dir)
        for entry in [e for e in series if e.feature in feature.depends or e.feature == feature.name]:
            try:
                am_series(tree, patch_dir, [entry])
            except HarnessError as exc:
                files = git(tree, "diff", "--name-only", "--diff-filter=U", check=False).split()
                conflicts.append(
                    f"{entry.file}: {exc.problem}" + (f" (conflicts in {', '.join(files)})" if files else "")
                )
                break
    return conflicts


def make_pr(
    feature_name: str,
    *,
    check: bool = True,
    rebase: Path | None = None,
    db: Path | Sequence[Path] | None = None,
    root: Path | None = None,
) -> Path:
    """Build, check, export and describe the stack; returns the folder holding it."""
    from pyharness.check import check_tree_lock

    root = root or paths.project_root()
    with check_tree_lock(root):
        return _make_pr(feature_name, check=check, rebase=rebase, db=db, root=root)


def _make_pr(
    feature_name: str, *, check: bool, rebase: Path | None, db: Path | Sequence[Path] | None, root: Path
) -> Path:
    feature = load_feature(feature_name, root)
    repo = paths.vendor_dir(root)
    out = paths.build_root(root) / "pr" / feature.name
    out.mkdir(parents=True, exist_ok=True)
    base, stages = build_stack(feature, root)
    parent = base
    for stage in stages:
        print(f"pr {feature.name}: stage {stage.index}/{len(stages)} {stage.subject}", file=sys.stderr)
        export_stage(repo, parent, stage, out)
        if check:
            check_stage(repo, parent, stage, feature, root)
        parent = stage.commit
    (out / "description.md").write_text(description(feature, base, stages, repo, db))
    if rebase:
        conflicts = rebase_onto(feature, rebase.resolve(), root)
        report = "\n".join(conflicts) if conflicts else f"the stack applies cleanly onto {rebase}"
        (out / "rebase.txt").write_text(report + "\n")
        print(f"pr {feature.name}: rebase onto {rebase}: {report}", file=sys.stderr)
    failed = [f"stage {s.index}: {k}: {v}" for s in stages for k, v in s.checks.items() if v != "ok"]
    if failed:
        raise HarnessError(f"the {feature.name} stack fails its checks: {failed[0]}", f"see {out / 'description.md'}")
    print(f"pr {feature.name}: {len(stages)} stage(s) in {out}", file=sys.stderr)
    return out
