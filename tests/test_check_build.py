"""The build at a patch (`pyharness patches check`, `pyharness pr`) on a small stand-in for llama.cpp: unoptimized,
without debug info, every target linked, and a folder an older pyharness configured at -O3 is configured again."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pyharness import check
from pyharness.build import BASE_TARGETS, checkout_tree, cmake_flags, configure, link_source, ninja
from pyharness.check import CHECK_FLAGS, build_at, check_flags, check_series
from pyharness.patches import apply, export
from tests.conftest import git


def compile_command(build_dir: Path, source: str, target: str = "llama-bench") -> str:
    """The command ninja runs to compile `source` of `target` in build_dir."""
    obj = f"CMakeFiles/{target}.dir/{source}.o"
    out = subprocess.run(["ninja", "-C", str(build_dir), "-t", "commands", obj], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def built_tools(build_dir: Path) -> list[str]:
    return sorted(t for t in BASE_TARGETS if (build_dir / "bin" / t).is_file())


def test_check_flags_are_the_variant_flags_unoptimized() -> None:
    flags = check_flags("cpu", "90")
    assert flags == [*cmake_flags("cpu", "90", []), *CHECK_FLAGS]  # ccache launchers included when installed
    assert "-DCMAKE_BUILD_TYPE=Release" in flags  # NDEBUG as in the variant builds, no Debug-only definitions
    assert sorted(flag.split("=", 1)[0] for flag in CHECK_FLAGS) == [
        "-DCMAKE_CXX_FLAGS_RELEASE",
        "-DCMAKE_C_FLAGS_RELEASE",
    ]
    assert all(flag.endswith("=-O0 -g0 -DNDEBUG") for flag in CHECK_FLAGS)


def test_build_at_a_patch_compiles_unoptimized_and_links_every_target(fake_project: Path) -> None:
    commit = git(fake_project / "vendor" / "llama.cpp", "rev-parse", "HEAD")
    build_dir = build_at(commit, "cpu", fake_project)
    command = compile_command(build_dir, "tool.c").split()
    assert {"-O0", "-g0", "-DNDEBUG"} <= set(command)
    assert not {"-O2", "-O3", "-g"} & set(command)
    assert built_tools(build_dir) == sorted(t for t in BASE_TARGETS if t not in ("llama", "ggml"))


def test_folder_configured_with_the_old_flags_is_configured_again(fake_project: Path) -> None:
    """A build/check-cpu left by the old check (plain Release flags, its flags stamp and all) must not keep -O3."""
    repo = fake_project / "vendor" / "llama.cpp"
    commit = git(repo, "rev-parse", "HEAD")
    build_dir = fake_project / "build" / "check-cpu"
    build_dir.mkdir(parents=True)
    log = build_dir / "build.log"
    # What the previous `build_at` did: the variant builds' flags as they are.
    tree = checkout_tree("check", commit, fake_project, force=True)
    configure(link_source(build_dir, tree), build_dir, cmake_flags("cpu", "90", []), fake_project, log)
    ninja(build_dir, ["llama-bench"], fake_project, log, None)
    assert "-O3" in compile_command(build_dir, "tool.c").split()

    build_at(commit, "cpu", fake_project)
    command = compile_command(build_dir, "tool.c").split()
    assert "-O0" in command and "-O3" not in command
    assert "tool.c.o" in log.read_text()  # recompiled with the new flags, not kept from the -O3 build


def test_patches_check_builds_every_patch_unoptimized(fake_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = fake_project / "vendor" / "llama.cpp"
    apply(root=fake_project)
    for answer in (43, 44):
        (repo / "ggml.c").write_text(f"int ggml_answer(void) {{ return {answer}; }}\n")
        git(repo, "commit", "--quiet", "-am", f"ggml : answer {answer}")
    export(feature="answers", root=fake_project)
    built: list[tuple[str, list[str]]] = []

    real_build_at = check.build_at

    def recording_build_at(commit: str, backend: str, root: Path, cuda_arch: str = "90") -> Path:
        build_dir = real_build_at(commit, backend, root, cuda_arch)
        subject = git(repo, "log", "-1", "--format=%s", commit)
        built.append((subject, compile_command(build_dir, "ggml.c", "ggml").split()))
        return build_dir

    monkeypatch.setattr(check, "build_at", recording_build_at)
    assert check_series(root=fake_project) == 0
    assert [subject for subject, _ in built] == ["ggml : answer 43", "ggml : answer 44"]
    assert all("-O0" in command and "-O3" not in command for _, command in built)
    build_dir = fake_project / "build" / "check-cpu"
    assert built_tools(build_dir) == sorted(t for t in BASE_TARGETS if t not in ("llama", "ggml"))


def test_feature_ends_are_the_last_patch_of_each_run_of_one_feature() -> None:
    assert check.feature_ends(["a", "a", "b", "c", "c", "c"]) == [2, 3, 6]
    assert check.feature_ends(["a", "b", "a"]) == [1, 2, 3]  # a feature interrupted ends twice
    assert check.feature_ends(["a"]) == [1]
    assert check.feature_ends([]) == []


def test_patches_check_at_feature_ends_builds_only_there(fake_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = fake_project / "vendor" / "llama.cpp"
    apply(root=fake_project)
    for feature, answers in (("first", (43, 44)), ("second", (45, 46, 47))):
        for answer in answers:
            (repo / "ggml.c").write_text(f"int ggml_answer(void) {{ return {answer}; }}\n")
            git(repo, "commit", "--quiet", "-am", f"ggml : answer {answer}")
        export(feature=feature, root=fake_project)
    built: list[str] = []

    def recording_build_at(commit: str, backend: str, root: Path, cuda_arch: str = "90") -> Path:
        built.append(git(repo, "log", "-1", "--format=%s", commit))
        return root / "build" / "check-cpu"

    monkeypatch.setattr(check, "build_at", recording_build_at)
    assert check_series(root=fake_project, feature_ends_only=True) == 0
    assert built == ["ggml : answer 44", "ggml : answer 47"]
    built.clear()
    assert check_series(root=fake_project) == 0
    assert built == [f"ggml : answer {answer}" for answer in range(43, 48)]
