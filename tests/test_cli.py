"""The command line: bad input gives one line naming the problem and the fix, and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


def pyharness(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyharness", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["build", "--variant", "nightly"], "unknown variant 'nightly'"),
        (["build", "--variant", "upstream", "--backend", "rocm"], "unknown backend 'rocm'"),
        (["vendor", "--from", "/nonexistent/clone"], "not a git clone"),
        (["models", "get", "no-such-model"], "no-such-model"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(args: list[str], needle: str) -> None:
    proc = pyharness(*args)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("pyharness: error: ") and needle in lines[0] and "fix:" in lines[0]


def test_patches_list_names_features() -> None:
    proc = pyharness("patches", "list")
    assert proc.returncode == 0
    series = [line.split() for line in (ROOT / "patches" / "series").read_text().splitlines()]
    assert len(proc.stdout.splitlines()) == len([s for s in series if s and not s[0].startswith("#")])
