"""Running commands: captured, logged, and turned into HarnessError on failure."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from pyharness.errors import HarnessError

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "pyharness",
    "GIT_AUTHOR_EMAIL": "pyharness@localhost",
    "GIT_COMMITTER_NAME": "pyharness",
    "GIT_COMMITTER_EMAIL": "pyharness@localhost",
}


def run(
    args: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    what: str = "",
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output as text, raise HarnessError naming it when it fails."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    try:
        proc = subprocess.run(
            [str(a) for a in args], cwd=cwd, env=full_env, text=True, capture_output=True, check=False
        )
    except FileNotFoundError as exc:
        raise HarnessError(f"{args[0]} is not installed", f"install it and retry ({exc})") from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        last = detail[-1] if detail else f"exit {proc.returncode}"
        label = what or " ".join(str(a) for a in args[:3])
        raise HarnessError(f"{label} failed: {last}")
    return proc


def git(repo: Path, *args: str, check: bool = True, env: Mapping[str, str] | None = None) -> str:
    """A git command in `repo`, stdout stripped of its final newline."""
    merged = {**GIT_IDENTITY, **(env or {})}
    proc = run(
        ["git", "-c", "core.hooksPath=/dev/null", "-C", str(repo), *args],
        check=check,
        env=merged,
        what=f"git {args[0]}",
    )
    return proc.stdout.rstrip("\n")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
