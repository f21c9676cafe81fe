"""Shared fixtures: the real checkout, its vendored upstream, and scratch projects cloned from it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

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
