"""The patch series: apply/export round trip on real commits, determinism, and the failure paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyharness import patches
from pyharness.errors import HarnessError
from pyharness.patches import PATCHED_BRANCH, apply, check_round_trip, export, read_series, series_hash
from tests.conftest import ROOT, git


def snapshot(patch_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(patch_dir.iterdir()) if p.is_file()}


def commit_a_change(repo: Path, subject: str) -> None:
    """A real source change in llama.cpp, committed on the checked-out branch."""
    header = repo / "ggml" / "include" / "ggml.h"
    header.write_text(header.read_text().replace("#pragma once", f"#pragma once\n\n// {subject}", 1))
    git(repo, "commit", "--quiet", "-am", subject)


def test_committed_series_round_trips_byte_for_byte() -> None:
    repo, tip, problems = check_round_trip(ROOT)
    assert problems == []
    assert git(repo, "rev-list", "--count", f"upstream..{tip}") == str(len(read_series(ROOT / "patches")))


def test_apply_then_export_changes_no_byte(scratch_project: Path) -> None:
    before = snapshot(scratch_project / "patches")
    tip = apply(root=scratch_project)
    export(root=scratch_project)
    assert snapshot(scratch_project / "patches") == before
    # Same series, same commits: apply is deterministic down to the hashes.
    git(scratch_project / "vendor" / "llama.cpp", "checkout", "--quiet", "upstream")
    git(scratch_project / "vendor" / "llama.cpp", "branch", "-D", PATCHED_BRANCH)
    git(scratch_project / "vendor" / "llama.cpp", "config", "--unset", "pyharness.applied")
    assert apply(root=scratch_project) == tip


def test_new_commit_exports_into_the_series_and_applies_again(scratch_project: Path, tmp_path: Path) -> None:
    repo = scratch_project / "vendor" / "llama.cpp"
    apply(root=scratch_project)
    commit_a_change(repo, "ggml : note the harness round trip")
    entries = export(feature="roundtrip-test", root=scratch_project)
    new = entries[-1]
    assert new.file == "ggml-note-the-harness-round-trip.patch"
    text = (scratch_project / "patches" / new.file).read_text()
    assert text.startswith("From 0000000000000000000000000000000000000000 ")
    assert "+// ggml : note the harness round trip" in text
    assert f"{new.feature} {new.file}" in (scratch_project / "patches" / "series").read_text()
    exported = snapshot(scratch_project / "patches")
    tree = git(repo, "rev-parse", f"{PATCHED_BRANCH}^{{tree}}")
    # A fresh apply of the exported series reproduces the branch's tree, and exporting again changes nothing.
    assert git(repo, "rev-parse", f"{apply(root=scratch_project, force=True)}^{{tree}}") == tree
    export(root=scratch_project)
    assert snapshot(scratch_project / "patches") == exported


def test_first_commit_of_an_empty_series_needs_a_feature(scratch_project: Path) -> None:
    patch_dir = scratch_project / "patches"
    for old in patch_dir.glob("*.patch"):
        old.unlink()
    (patch_dir / "series").write_text("")
    repo = scratch_project / "vendor" / "llama.cpp"
    assert apply(root=scratch_project) == git(repo, "rev-parse", "upstream")
    commit_a_change(repo, "ggml : first patch")
    with pytest.raises(HarnessError, match="--feature"):
        export(root=scratch_project)
    assert [e.feature for e in export(feature="first", root=scratch_project)] == ["first"]


def test_unexported_work_is_not_overwritten(scratch_project: Path) -> None:
    repo = scratch_project / "vendor" / "llama.cpp"
    apply(root=scratch_project)
    commit_a_change(repo, "ggml : work not yet exported")
    tip = git(repo, "rev-parse", PATCHED_BRANCH)
    with pytest.raises(HarnessError, match="patches export"):
        apply(root=scratch_project)
    assert git(repo, "rev-parse", PATCHED_BRANCH) == tip
    apply(root=scratch_project, force=True)
    backups = git(repo, "branch", "--list", f"{PATCHED_BRANCH}-backup-*").split()
    assert len(backups) == 1 and git(repo, "rev-parse", backups[0]) == tip


def test_a_new_series_replaces_a_branch_without_work_of_its_own(scratch_project: Path) -> None:
    """After `git pull` brings a changed series, apply replaces the branch it made itself (no --force needed)."""
    repo = scratch_project / "vendor" / "llama.cpp"
    apply(root=scratch_project)
    first = read_series(scratch_project / "patches")[0]
    patch = scratch_project / "patches" / first.file
    patch.write_text(patch.read_text().replace("Subject: [PATCH] ", "Subject: [PATCH] (pulled) ", 1))
    tip = apply(root=scratch_project)
    assert "(pulled)" in git(repo, "log", "--format=%s", f"upstream..{tip}")
    assert git(repo, "branch", "--list", f"{PATCHED_BRANCH}-backup-*") == ""
    # but a commit made on the branch since is still protected
    commit_a_change(repo, "ggml : local work")
    patch.write_text(patch.read_text().replace("(pulled) ", "(pulled again) ", 1))
    with pytest.raises(HarnessError, match="patches export"):
        apply(root=scratch_project)


def test_dirty_tree_is_refused(scratch_project: Path) -> None:
    repo = scratch_project / "vendor" / "llama.cpp"
    (repo / "README.md").write_text("uncommitted\n")
    with pytest.raises(HarnessError, match="uncommitted"):
        apply(root=scratch_project)
    assert (repo / "README.md").read_text() == "uncommitted\n"


def test_patch_that_does_not_apply_names_patch_and_hunk_and_changes_nothing(scratch_project: Path) -> None:
    repo = scratch_project / "vendor" / "llama.cpp"
    apply(root=scratch_project)
    commit_a_change(repo, "ggml : a patch that will break")
    export(feature="broken-test", root=scratch_project)
    name = read_series(scratch_project / "patches")[-1].file
    patch = scratch_project / "patches" / name
    patch.write_text(patch.read_text().replace(" #pragma once\n", " #pragma twice\n"))
    head_before = git(repo, "rev-parse", "HEAD")
    branches_before = git(repo, "for-each-ref", "--format=%(refname) %(objectname)")
    with pytest.raises(HarnessError) as info:
        apply(root=scratch_project, force=True)
    message = str(info.value)
    assert name in message and "ggml/include/ggml.h:" in message and "@@" in message
    assert git(repo, "rev-parse", "HEAD") == head_before
    assert git(repo, "for-each-ref", "--format=%(refname) %(objectname)") == branches_before
    assert git(repo, "status", "--porcelain") == ""
    assert git(repo, "worktree", "list").count("\n") == 0


def test_series_file_errors_name_the_line(tmp_path: Path) -> None:
    (tmp_path / "series").write_text("# comment\nsampler missing.patch\n")
    with pytest.raises(HarnessError, match=r"series:2: missing.patch does not exist"):
        read_series(tmp_path)
    (tmp_path / "series").write_text("just-one-field\n")
    with pytest.raises(HarnessError, match=r"series:1: expected"):
        read_series(tmp_path)


def test_series_hash_follows_content(tmp_path: Path) -> None:
    assert series_hash(tmp_path) == "none"
    (tmp_path / "a.patch").write_text("one\n")
    (tmp_path / "series").write_text("feat a.patch\n")
    first = series_hash(tmp_path)
    (tmp_path / "a.patch").write_text("two\n")
    assert series_hash(tmp_path) != first


def test_failing_hunk_points_at_file_and_line() -> None:
    patch = "diff --git a/x.c b/x.c\n--- a/x.c\n+++ b/x.c\n@@ -10,3 +10,4 @@ int f(void)\n ctx\n+new\n"
    assert patches.failing_hunk("error: patch failed: x.c:10\n", patch) == "x.c:10 @@ -10,3 +10,4 @@ int f(void)"


def test_cuda_check_builds_the_flash_attention_instances_the_series_touches() -> None:
    from pyharness.check import FATTN_QUANTS_DEFAULT, fattn_quants_flag

    sources = [
        "ggml/src/ggml-cuda/fattn.cu",
        "ggml/src/ggml-cuda/template-instances/fattn-vec-instance-q8_kv-q8_kv.cu",
        "ggml/src/ggml-cuda/template-instances/fattn-vec-instance-f16-q8_kv.cu",
        "ggml/src/ggml-cuda/template-instances/fattn-tile-instance-dkq64-dv64.cu",
    ]
    (flag,) = fattn_quants_flag(sources)
    assert flag == f"-DGGML_CUDA_FA_QUANTS={FATTN_QUANTS_DEFAULT};f16-q8_kv;q8_kv-q8_kv"
    assert fattn_quants_flag(["ggml/src/ggml-cuda/fattn.cu"]) == [f"-DGGML_CUDA_FA_QUANTS={FATTN_QUANTS_DEFAULT}"]
