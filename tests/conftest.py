"""Shared fixtures: the real checkout, its vendored upstream, and scratch projects cloned from it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pyharness.build import BASE_TARGETS
from pyharness.vendor import UPSTREAM_BRANCH

ROOT = Path(__file__).resolve().parent.parent


def git(repo: Path, *args: str) -> str:
    env_args = ["-c", "user.name=test", "-c", "user.email=test@localhost"]
    out = subprocess.run(["git", *env_args, "-C", str(repo), *args], capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.fixture(scope="session")
def vendored() -> Path:
    """The real vendored upstream; CI and scripts/setup create it with `pyharness vendor`."""
    repo = ROOT / "vendor" / "llama.cpp"
    assert (repo / ".git").exists(), "vendor/llama.cpp is missing: run `python -m pyharness vendor` first"
    return repo


@pytest.fixture
def scratch_project(tmp_path: Path, vendored: Path) -> Path:
    """A project root in tmp_path: our pin and patches, and a clone of the vendored repo on branch upstream."""
    root = tmp_path / "project"
    (root / "vendor").mkdir(parents=True)
    shutil.copy(ROOT / "vendor" / "pin.toml", root / "vendor" / "pin.toml")
    shutil.copytree(ROOT / "patches", root / "patches")
    clone = root / "vendor" / "llama.cpp"
    subprocess.run(
        ["git", "clone", "--quiet", "--shared", "--branch", UPSTREAM_BRANCH, str(vendored), str(clone)], check=True
    )
    return root


FAKE_CMAKE = """cmake_minimum_required(VERSION 3.21)
project(fake_llama C)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
set(CMAKE_LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
add_library(ggml SHARED ggml.c)
add_library(llama SHARED llama.c)
target_link_libraries(llama ggml)
foreach(tool {tools})
    add_executable(${tool} tool.c)
    target_link_libraries(${tool} llama)
endforeach()
"""


@pytest.fixture
def fake_project(tmp_path: Path) -> Path:
    """A project whose 'upstream' is a tiny C project with the harness's target names, and an empty series."""
    root = tmp_path / "project"
    repo = root / "vendor" / "llama.cpp"
    repo.mkdir(parents=True)
    tools = " ".join(t for t in BASE_TARGETS if t not in ("llama", "ggml"))
    (repo / "CMakeLists.txt").write_text(FAKE_CMAKE.replace("{tools}", tools))
    (repo / "ggml.c").write_text("int ggml_answer(void) { return 42; }\n")
    (repo / "llama.c").write_text("int ggml_answer(void);\nint llama_answer(void) { return ggml_answer(); }\n")
    (repo / "tool.c").write_text("int llama_answer(void);\nint main(void) { return llama_answer() != 42; }\n")
    git(repo, "init", "--quiet", "--initial-branch", "upstream")
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "-m", "fake upstream")
    commit = git(repo, "rev-parse", "HEAD")
    (root / "vendor" / "pin.toml").write_text(
        f'[upstream]\nname = "fake"\ncommit = "{commit}"\n'
        '[sdist]\npackage = "none"\nversion = "0"\nfile = "none.tar.gz"\nsha256 = "0"\ntree = "t"\ngit_dir = "g"\n'
    )
    (root / "patches").mkdir()
    (root / "patches" / "series").write_text("")
    return root
